"""The rules that let a burst stream at full speed, each held against a real collector.

- The exporter's spool writer makes each full batch durable as soon as it is
  written, so the sender ships it while the rest of the burst is still being
  written; what is not yet fsynced is never sent.
- The store returns what it inserted with the cursors of the rows in the
  database (all rows, or only the new ones of a replayed batch), whether or not
  anyone reads them as StoredEvents.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.collector.sqlite_store import SqliteStore
from sidecar.collector.store import HostState, NewEvent
from sidecar.testing.hosts import host_identity
from tests.integration.test_collector import (
    connect_event,
    exporter_for,
    make_config,
    running,
    stored_sequences,
    until,
)

BATCH = 10


def _blocking_mark() -> tuple[threading.Event, threading.Event, object]:
    """A mark that holds the spool writer until released: (reached, release, then)."""
    reached, release = threading.Event(), threading.Event()

    def then() -> None:
        reached.set()
        release.wait(30)

    return reached, release, then


def test_a_burst_is_made_durable_and_sent_batch_by_batch_while_it_is_being_written(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        cfg = make_config(tmp_path)
        async with running(cfg) as server:
            ident = host_identity(server.ca, "burst")
            # A long fsync interval: only the batch rule can make anything durable
            # while the queue is never empty.
            exp = exporter_for(
                tmp_path, server.port, ident, batch_max_events=BATCH, fsync_interval=60.0
            )
            task = asyncio.create_task(exp.run())
            try:
                first, release_first, hold_first = _blocking_mark()
                exp.submit_mark(hold_first)  # type: ignore[arg-type]
                await asyncio.to_thread(first.wait, 30)
                # Queued behind the held writer: 25 events, a second hold, 5 more.
                for i in range(25):
                    assert exp.submit(connect_event(i))
                second, release_second, hold_second = _blocking_mark()
                exp.submit_mark(hold_second)  # type: ignore[arg-type]
                for i in range(25, 30):
                    assert exp.submit(connect_event(i))
                release_first.set()
                await asyncio.to_thread(second.wait, 30)
                # The writer is held after event 25 with the queue never drained:
                # the two full batches are durable, and the collector stores them.
                assert exp.spool.last_sequence == 25
                assert exp.spool.durable_sequence == 2 * BATCH
                await until(lambda: exp.spool.acked == 2 * BATCH)
                assert stored_sequences(cfg.db_path, "burst") == list(range(1, 2 * BATCH + 1))
                # Not fsynced, not sent: 21..25 wait, however long the writer is held.
                await asyncio.sleep(0.3)
                assert exp.spool.acked == 2 * BATCH
                assert stored_sequences(cfg.db_path, "burst") == list(range(1, 2 * BATCH + 1))
                release_second.set()
                await until(lambda: exp.spool.acked == 30)
                assert stored_sequences(cfg.db_path, "burst") == list(range(1, 31))
            finally:
                release_first.set()
                await exp.close(5)
                await task

    asyncio.run(body())


def test_a_slow_trickle_is_still_made_durable_when_the_queue_drains(tmp_path: Path) -> None:
    """Positive control for the rule above: fewer events than a batch still go out."""

    async def body() -> None:
        cfg = make_config(tmp_path)
        async with running(cfg) as server:
            ident = host_identity(server.ca, "trickle")
            exp = exporter_for(
                tmp_path, server.port, ident, batch_max_events=BATCH, fsync_interval=60.0
            )
            task = asyncio.create_task(exp.run())
            try:
                for i in range(3):
                    assert exp.submit(connect_event(i))
                await until(lambda: exp.spool.acked == 3)
                assert stored_sequences(cfg.db_path, "trickle") == [1, 2, 3]
            finally:
                await exp.close(5)
                await task

    asyncio.run(body())


def _rows(host: str, first: int, n: int) -> list[NewEvent]:
    out = []
    for seq in range(first, first + n):
        e = connect_event(seq)
        e.host, e.boot_id, e.sequence = host, "b", seq
        out.append(NewEvent(e, e.SerializeToString(), pb.VERIFICATION_VERIFIED))
    return out


def _ids(db: Path, host: str) -> dict[int, int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT seq, id FROM events WHERE host = ?", (host,)).fetchall()
    return {int(s): int(i) for s, i in rows}


def test_what_the_store_returns_names_the_rows_it_inserted(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "events.db")
    try:
        store.ingest("other", _rows("other", 1, 3), HostState(3, b"o" * 32))
        first = store.ingest("h", _rows("h", 1, 5), HostState(5, b"a" * 32))
        ids = _ids(tmp_path / "events.db", "h")
        assert len(first) == 5
        assert [se.cursor for se in first] == [ids[s] for s in range(1, 6)]
        assert [se.event.sequence for se in first] == [1, 2, 3, 4, 5]
        assert first[-1].cursor == ids[5] and first[0].event.host == "h"
        assert [se.cursor for se in first[1:3]] == [ids[2], ids[3]]
        # A replay overlapping what is stored: only the new rows, with their own ids.
        again = store.ingest("h", _rows("h", 4, 4), HostState(7, b"b" * 32))
        ids = _ids(tmp_path / "events.db", "h")
        assert [se.event.sequence for se in again] == [6, 7]
        assert [se.cursor for se in again] == [ids[6], ids[7]]
        assert all(se.verification == pb.VERIFICATION_VERIFIED for se in again)
        # Stored exactly once, and a replay of only known rows inserts nothing.
        assert sorted(ids) == [1, 2, 3, 4, 5, 6, 7]
        assert len(store.ingest("h", _rows("h", 1, 7), HostState(7, b"b" * 32))) == 0
        # What is returned is what a reader of the store gets for those cursors.
        page = store.query(pb.EventFilter(hosts=["h"]), 0, 100)
        assert [(se.cursor, se.event) for se in page] == [
            (se.cursor, se.event) for se in [*first, *again]
        ]
    finally:
        store.close()
