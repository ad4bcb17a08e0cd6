"""Retention by whole days, the signed batches kept with their events, and host reboots.

Both stores (SQLite, and a real throwaway PostgreSQL): real signed, chained
batches through the collector's own ingest path (verification, chain decision,
store); only the store's clock is set by the test, to put batches on the days
it wants.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import event_pb2 as ev
from sidecar.collector.postgres_store import PostgresStore
from sidecar.collector.server import CollectorServer
from sidecar.collector.sqlite_store import SqliteStore
from sidecar.collector.store import DAY_NS, HostState, NewEvent, Store, day_name
from sidecar.collector.verify import verify_stored_chain
from sidecar.export.chain import batch_payload, chain_over, sign
from sidecar.testing.hosts import SimulatedHost, host_identity, signed_batch
from tests.integration.test_collector_postgres import connect_event, replica_config

pytestmark = pytest.mark.timeout(60)

D = 20_000  # a day (2024-10-04); the store's clock says which day it is


class Clock:
    """The store's clock: noon of the day the test sets."""

    def __init__(self, day: int) -> None:
        self.ns = 0
        self.day = day

    @property
    def day(self) -> int:
        return self.ns // DAY_NS

    @day.setter
    def day(self, day: int) -> None:
        self.ns = day * DAY_NS + 12 * 3600 * 1_000_000_000

    def __call__(self) -> int:
        return self.ns


@pytest.fixture(params=["sqlite", "postgresql"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def dsn(kind: str, request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue("pg_dsn")) if kind == "postgresql" else "sqlite"


@pytest.fixture
def clock() -> Clock:
    return Clock(D - 3)


@pytest.fixture
def server(tmp_path: Path, dsn: str, clock: Clock) -> Iterator[CollectorServer]:
    """A collector (not listening: batches go straight to its ingest path) whose store
    runs on ``clock``, with ``retention: 2d``."""
    cfg = replica_config(tmp_path, "r0", "" if dsn == "sqlite" else dsn, retention_days=2)
    srv = CollectorServer(cfg)
    srv.core.store.close()
    if dsn == "sqlite":
        srv.core.store = SqliteStore(cfg.db_path, clock=clock)
    else:
        srv.core.store = PostgresStore(dsn, connections=2, clock=clock)
    yield srv
    srv.core.close()


def events(n: int, start: int = 0) -> list[ev.Event]:
    return [connect_event(start + i) for i in range(n)]


async def ingest(srv: CollectorServer, sim: SimulatedHost, batch: pb.Batch) -> int:
    """Store ``batch`` through the collector's ingest path; the ack it would send."""
    key = sim.ident.private_key.public_key()
    checked = await srv.core.ingest_batch(sim.name, batch, key)
    return checked.state.last_sequence


def resend(sim: SimulatedHost, first: int, last: int) -> pb.Batch:
    """A batch of already sent events ``first..last`` cut differently, as a host that
    failed over resends from its last ack: signed again, chained from its start."""
    raws = [raw for b in sim.sent for raw in b.events]
    mine = raws[first - 1 : last]
    prev = (
        sim.sent[0].prev_chain
        if first == 1
        else chain_over(sim.sent[0].prev_chain, 1, raws[: first - 1])[-1]
    )
    head = chain_over(prev, first, mine)[-1]
    sig = sign(sim.ident.private_key, batch_payload(sim.name, first, last, prev, head))
    return pb.Batch(
        host=sim.name,
        first_sequence=first,
        last_sequence=last,
        prev_chain=prev,
        events=mine,
        signature=sig,
    )


def resend_altered(sim: SimulatedHost, first: int, last: int, at: int) -> pb.Batch:
    """A resend of ``first..last`` in which event ``at`` has other bytes than the one the
    host sent first, chained and signed with the host's key: a valid batch."""
    batch = resend(sim, first, last)
    raws = list(batch.events)
    other = ev.Event.FromString(raws[at - first])
    other.identity = "spiffe://example.org/agent/someone-else"
    raws[at - first] = other.SerializeToString()
    head = chain_over(batch.prev_chain, first, raws)[-1]
    payload = batch_payload(sim.name, first, last, batch.prev_chain, head)
    del batch.events[:]
    batch.events.extend(raws)
    batch.signature = sign(sim.ident.private_key, payload)
    return batch


def integrity(store: Store, host: str) -> list[tuple[int, int, int, str]]:
    rows = store.query(pb.EventFilter(hosts=[host], kinds=["integrity"]), 0, 100)
    return [
        (a.kind, a.first_sequence, a.last_sequence, a.detail)
        for a in (r.event.integrity for r in rows)
    ]


def stored(store: Store, host: str) -> list[tuple[int, int]]:
    """(sequence, cursor) of the host's stored events, in cursor order."""
    rows = store.query(pb.EventFilter(hosts=[host]), 0, 100_000)
    return [(r.event.sequence, r.cursor) for r in rows if r.event.sequence]


def partitions(dsn: str) -> set[str]:
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname IN ('events', 'batches')"
        ).fetchall()
    return {str(r[0]) for r in rows}


def sqlite_days(srv: CollectorServer) -> list[int]:
    import sqlite3

    with sqlite3.connect(srv.config.db_path) as db:
        return [int(r[0]) for r in db.execute("SELECT day FROM days ORDER BY day")]


# ---- retention -------------------------------------------------------------------------


def test_retention_drops_exactly_the_expired_days(
    server: CollectorServer, clock: Clock, dsn: str
) -> None:
    """Days D-3..D, 30 events a day in 3 batches; ``retention: 2d`` on day D drops D-3 only."""

    async def body() -> None:
        store = server.store
        sim = SimulatedHost(host_identity(server.ca, "h1"))
        for day in range(D - 3, D + 1):
            clock.day = day
            if day < D:
                assert await server.maintain() == []  # nothing is old enough before day D
            for k in range(3):
                await ingest(server, sim, sim.batch(events(10, 10 * k)))
        before = stored(store, "h1")
        assert [s for s, _ in before] == list(range(1, 121))
        cursor_of = dict(before)
        last = store.last_cursor()
        parts = partitions(dsn) if dsn != "sqlite" else set()

        clock.day = D  # D-3 is now more than 2 whole days old
        assert await server.maintain() == [D - 3]
        assert await server.maintain() == []  # a second run (or replica) finds nothing to do

        after = stored(store, "h1")
        # Exactly D-3's events are gone; the others keep their cursors.
        assert after == [(s, cursor_of[s]) for s in range(31, 121)]
        assert store.count("h1") == 90
        assert store.last_cursor() == last
        # Cursors a subscriber holds stay valid: one inside a kept day resumes right
        # after it; one inside the dropped day resumes at the first kept event.
        rest = store.query(pb.EventFilter(), cursor_of[45], 1000)
        assert [r.event.sequence for r in rest] == list(range(46, 121))
        rest = store.query(pb.EventFilter(), cursor_of[10], 1000)
        assert [r.event.sequence for r in rest] == list(range(31, 121))
        # The kept batches went with their day: what is left re-verifies against
        # the host's signatures, up to its stored head.
        report = verify_stored_chain(store, "h1")
        assert report.problems == []
        assert (report.batches, report.events, report.unsigned) == (9, 90, 0)
        assert (report.first_sequence, report.last_sequence) == (31, 120)
        assert {b.day for b in store.stored_batches("h1")} == {D - 2, D - 1, D}
        if dsn == "sqlite":
            assert sqlite_days(server) == [D - 2, D - 1, D]
        else:
            gone = {f"events_{day_name(D - 3)}", f"batches_{day_name(D - 3)}"}
            assert parts - partitions(dsn) == gone
            assert partitions(dsn) >= {f"events_{day_name(d)}" for d in range(D - 2, D + 3)}
        # And the host carries on.
        assert await ingest(server, sim, sim.batch(events(10))) == 130
        assert verify_stored_chain(store, "h1").events == 100

    asyncio.run(body())


def test_quarantined_batches_are_dropped_with_the_events_of_their_day(
    server: CollectorServer, clock: Clock
) -> None:
    """A batch kept aside (its signature failed) is evidence like the events: it stays
    as long as they do, and goes when its day expires, not before."""

    async def body() -> None:
        store = server.store
        sim = SimulatedHost(host_identity(server.ca, "h1"))

        async def forged(start: int) -> None:
            genuine = sim.batch(events(5, start))
            bad = pb.Batch()
            bad.CopyFrom(genuine)
            bad.signature = bytes(64)
            assert await ingest(server, sim, bad) == genuine.first_sequence - 1
            assert await ingest(server, sim, genuine) == genuine.last_sequence  # then the real one

        for day in (D - 3, D - 1):
            clock.day = day
            await forged(10 * day)
        kept = [(a, b, r) for a, b, r, _ in store.quarantined("h1")]
        assert kept == [(1, 5, "bad_signature"), (6, 10, "bad_signature")]
        clock.day = D - 1
        assert await server.maintain() == []  # nothing old enough: both stay
        assert len(store.quarantined("h1")) == 2
        clock.day = D  # D-3 is past retention (2 days), D-1 is not
        assert await server.maintain() == [D - 3]
        assert [(a, b) for a, b, _, _ in store.quarantined("h1")] == [(6, 10)]
        assert store.count("h1") == 6  # D-1 keeps its 5 events and the alert about the forgery
        clock.day = D + 2
        await server.maintain()
        assert store.quarantined("h1") == [] and store.count("h1") == 0

    asyncio.run(body())


def test_a_resend_with_other_bytes_for_stored_sequences_is_quarantined_with_an_alert(
    server: CollectorServer, clock: Clock
) -> None:
    """The host signed two different events for one sequence.  The stored one stays;
    the batch that differs is kept aside and an alert stored, whether the resend
    ends at the head (its chain differs there too) or before it (a late resend,
    nothing to compare its chain with), and on another day than the original."""

    async def body() -> None:
        store = server.store
        sim = SimulatedHost(host_identity(server.ca, "h1"))
        clock.day = D
        for k in range(3):
            assert await ingest(server, sim, sim.batch(events(10, 10 * k))) == 10 * (k + 1)
        original = {s: c for s, c in stored(store, "h1")}
        # Positive control: the same events resent, cut differently, are no news.
        assert await ingest(server, sim, resend(sim, 5, 15)) == 30
        assert store.quarantined("h1") == [] and integrity(store, "h1") == []
        # Ending before the head: this was skipped without a word before.
        clock.day = D + 1
        assert await ingest(server, sim, resend_altered(sim, 5, 15, at=7)) == 30
        # Ending at the head.
        assert await ingest(server, sim, resend_altered(sim, 21, 30, at=30)) == 30
        kept = [(a, b, r) for a, b, r, _ in store.quarantined("h1")]
        assert kept == [(5, 15, "resent_differs"), (21, 30, "resent_differs")]
        found = integrity(store, "h1")
        differ = [(f, t) for k, f, t, d in found if "other bytes than stored" in d]
        assert differ == [(7, 7), (30, 30)]
        assert {k for k, *_ in found} == {ev.IntegrityAlert.KIND_CHAIN_BREAK}
        # What is stored is what the host sent first, once.
        assert dict(stored(store, "h1")) == original
        for r in store.query(pb.EventFilter(hosts=["h1"]), 0, 100):
            if r.event.sequence in (7, 30):
                assert r.event.identity == "spiffe://example.org/agent/a"
        assert verify_stored_chain(store, "h1").problems == []

    asyncio.run(body())


def test_a_replay_across_a_day_boundary_stores_nothing_twice(
    server: CollectorServer, clock: Clock
) -> None:
    """The unique index of a partitioned table holds the day, so it cannot catch a resend
    on the next day: the host's chain state, read under its lock, does."""

    async def body() -> None:
        store = server.store
        sim = SimulatedHost(host_identity(server.ca, "h1"))
        clock.day = D
        b1, b2 = sim.batch(events(10)), sim.batch(events(10, 10))
        assert [await ingest(server, sim, b) for b in (b1, b2)] == [10, 20]
        b3 = sim.batch(events(10, 20))  # made, not sent yet
        clock.day = D + 1
        # The same batches again, then the host's resend cut differently (11..30).
        assert [await ingest(server, sim, b) for b in (b1, b2)] == [20, 20]
        assert store.count("h1") == 20
        assert await ingest(server, sim, resend(sim, 11, 30)) == 30
        assert await ingest(server, sim, b3) == 30
        assert [s for s, _ in stored(store, "h1")] == list(range(1, 31))
        assert {r.verification for r in store.query(pb.EventFilter(), 0, 100)} == {
            pb.VERIFICATION_VERIFIED
        }
        # The resend is kept from the first event it stored (21), with the chain
        # hash before it: once day D is dropped, it still re-verifies alone.
        dropped = store.maintain(0)  # (PostgreSQL also drops the empty days it made ahead)
        assert D in dropped and max(dropped) == D
        assert [s for s, _ in stored(store, "h1")] == list(range(21, 31))
        report = verify_stored_chain(store, "h1")
        assert report.problems == []
        assert (report.batches, report.first_sequence, report.last_sequence) == (1, 21, 30)

    asyncio.run(body())


def test_a_tampered_or_deleted_stored_event_fails_re_verification(
    server: CollectorServer, clock: Clock, dsn: str
) -> None:
    async def body() -> None:
        sim = SimulatedHost(host_identity(server.ca, "h1"))
        clock.day = D
        for k in range(3):
            await ingest(server, sim, sim.batch(events(10, 10 * k)))
        assert verify_stored_chain(server.store, "h1").ok  # positive control
        forged = connect_event(99)
        forged.host, forged.boot_id, forged.sequence = "h1", "boot-1", 15
        _sql(
            server,
            dsn,
            "UPDATE events SET data = ? WHERE host = 'h1' AND seq = 15",
            forged.SerializeToString(),
        )
        report = verify_stored_chain(server.store, "h1")
        assert report.problems == [
            f"batch 11..20 (stored {day_name(D)}): the stored events do not match the batch"
            " signature"
        ]
        _sql(server, dsn, "DELETE FROM events WHERE host = 'h1' AND seq = 25")
        report = verify_stored_chain(server.store, "h1")
        assert len(report.problems) == 2
        assert (
            "batch 21..30" in report.problems[1] and "25..25 are not stored" in report.problems[1]
        )

    asyncio.run(body())


def _sql(srv: CollectorServer, dsn: str, sql: str, *args: object) -> None:
    if dsn == "sqlite":
        import sqlite3

        with sqlite3.connect(srv.config.db_path) as db:
            db.execute(sql, args)
    else:
        with psycopg.connect(dsn) as conn:
            conn.execute(sql.replace("?", "%s"), args)


def _rows(host: str, first: int, n: int) -> list[NewEvent]:
    out = []
    for i in range(n):
        e = connect_event(first + i)
        e.host, e.boot_id, e.sequence = host, "boot-1", first + i
        out.append(NewEvent(e, e.SerializeToString(), pb.VERIFICATION_VERIFIED))
    return out


def test_replicas_running_retention_at_once_drop_each_day_once(pg_dsn: str) -> None:
    clock = Clock(D - 3)
    stores = [PostgresStore(pg_dsn, connections=1, clock=clock) for _ in range(3)]
    try:
        for day in range(D - 3, D + 1):
            clock.day = day
            stores[0].maintain(None)
            stores[0].ingest("h", _rows("h", 10 * (day - D + 3) + 1, 10), None)
        clock.day = D + 1  # D-3 and D-2 have expired
        barrier = threading.Barrier(3)
        dropped: list[list[int]] = []
        errors: list[BaseException] = []

        def run(s: PostgresStore) -> None:
            barrier.wait(5)
            try:
                dropped.append(s.maintain(2))
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s,)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert errors == []
        assert sorted(d for ds in dropped for d in ds) == [D - 3, D - 2]
        assert stores[1].count() == 20
        # Any replica asked later finds nothing more to drop.
        assert [s.maintain(2) for s in stores] == [[], [], []]
    finally:
        for s in stores:
            s.close()


def test_a_clock_past_the_days_made_ahead_still_stores(pg_dsn: str) -> None:
    """Partitions are made days ahead; a day without one (a clock that jumped) gets one."""
    clock = Clock(D)
    store = PostgresStore(pg_dsn, connections=1, clock=clock)
    try:
        clock.day = D + 30
        assert f"events_{day_name(D + 30)}" not in partitions(pg_dsn)
        assert len(store.ingest("h", _rows("h", 1, 5), HostState(5, b"x" * 32))) == 5
        assert f"events_{day_name(D + 30)}" in partitions(pg_dsn)
        assert store.count() == 5
    finally:
        store.close()


# ---- host reboots ------------------------------------------------------------------------


def test_a_reboot_continues_the_hosts_one_chain(server: CollectorServer, clock: Clock) -> None:
    """The daemon's spool keeps sequence and chain across daemon restarts and reboots:
    a new boot id continues the host's chain, it does not start one.  A batch may
    even hold events of both boots (the old boot's last ones were not sent yet)."""

    async def body() -> None:
        store = server.store
        sim = SimulatedHost(host_identity(server.ca, "h1"))
        clock.day = D
        assert await ingest(server, sim, sim.batch(events(10))) == 10
        mixed = events(10, 10)
        for i, e in enumerate(mixed):  # the old boot's last five, then the new boot's
            e.boot_id = "boot-1" if i < 5 else "boot-2"
        batch, sim.head = signed_batch(sim.ident, 11, sim.head, mixed)
        sim.next_sequence = 21
        sim.sent.append(batch)
        assert await ingest(server, sim, batch) == 20
        sim.boot_id = "boot-2"
        assert await ingest(server, sim, sim.batch(events(10, 20))) == 30
        rows = store.query(pb.EventFilter(hosts=["h1"]), 0, 100)
        assert [(r.event.sequence, r.event.boot_id) for r in rows] == [
            (s, "boot-1" if s <= 15 else "boot-2") for s in range(1, 31)
        ]
        assert {r.verification for r in rows} == {pb.VERIFICATION_VERIFIED}
        assert store.host_state("h1").last_sequence == 30
        assert verify_stored_chain(store, "h1").problems == []

    asyncio.run(body())


def test_an_old_boots_late_batch_is_stored_as_late_and_never_moves_the_chain(
    server: CollectorServer, clock: Clock
) -> None:
    """Replicas raced the host's batches: the new boot's batch was stored first, then the
    old boot's last batch arrives.  It is stored (not lost), marked late (not verified
    against a head it cannot reach), and the chain head stays the new boot's."""

    async def body() -> None:
        store = server.store
        sim = SimulatedHost(host_identity(server.ca, "h1"))
        clock.day = D
        old1, old2 = sim.batch(events(10)), sim.batch(events(10, 10))
        sim.boot_id = "boot-2"
        new = sim.batch(events(10, 20))
        assert await ingest(server, sim, old1) == 10
        assert await ingest(server, sim, new) == 30  # after a gap: 11..20 not here yet
        head = store.host_state("h1")
        assert await ingest(server, sim, old2) == 30
        assert store.host_state("h1") == head
        got = {
            (r.event.sequence, r.event.boot_id): r.verification
            for r in store.query(pb.EventFilter(hosts=["h1"]), 0, 100)
            if r.event.sequence
        }
        assert got == {
            **{(s, "boot-1"): pb.VERIFICATION_VERIFIED for s in range(1, 11)},
            **{(s, "boot-1"): pb.VERIFICATION_LATE for s in range(11, 21)},
            **{(s, "boot-2"): pb.VERIFICATION_AFTER_GAP for s in range(21, 31)},
        }
        # Sent again, it stores nothing twice.
        assert await ingest(server, sim, old2) == 30
        assert store.count("h1") == 30 + 1  # and the one gap alert
        # Checked again with all three batches at hand, the chain is whole after all.
        assert verify_stored_chain(store, "h1").problems == []

    asyncio.run(body())


# ---- query by process instance ------------------------------------------------------------


def test_query_and_live_filter_by_process_instance(server: CollectorServer, clock: Clock) -> None:
    from sidecar.collector.store import matches

    async def body() -> None:
        store = server.store
        sim = SimulatedHost(host_identity(server.ca, "h1"))
        clock.day = D
        for k in range(4):
            await ingest(server, sim, sim.batch(events(30, 30 * k)))  # instances inst-0..2
        flt = pb.EventFilter(instances=["inst-1"])
        got = store.query(flt, 0, 1000)
        assert [r.event.process.instance_id for r in got] == ["inst-1"] * 40
        assert [r.event.sequence for r in got] == [s for s in range(1, 121) if (s - 1) % 3 == 1]
        # Paged after a cursor, with another filter, and two instances at once.
        page = store.query(flt, got[9].cursor, 5)
        assert [r.cursor for r in page] == [r.cursor for r in got[10:15]]
        both = store.query(pb.EventFilter(instances=["inst-0", "inst-2"], hosts=["h1"]), 0, 1000)
        assert len(both) == 80 and all(r.event.process.instance_id != "inst-1" for r in both)
        assert store.query(pb.EventFilter(instances=["inst-1"], hosts=["h2"]), 0, 10) == []
        assert store.query(pb.EventFilter(instances=["nope"]), 0, 10) == []
        # The live filter of subscribers says the same.
        assert all(matches(flt, r.event) for r in got)
        assert not any(matches(flt, r.event) for r in both)

    asyncio.run(body())


def test_the_verify_chain_command_checks_a_hosts_stored_chain(tmp_path: Path) -> None:
    """``sidecar collector --verify-chain HOST`` on the store a config names (SQLite here)."""
    import os
    import subprocess
    import sys

    cfg_path = tmp_path / "collector.yaml"
    cfg_path.write_text(
        "apiVersion: sidecar/v1\nkind: CollectorConfig\ntrustDomain: example.org\n"
        "dataDir: data\nretention: 30d\n"
    )
    from sidecar.collector.config import load_config

    srv = CollectorServer(load_config(cfg_path))

    async def body() -> None:
        sim = SimulatedHost(host_identity(srv.ca, "h1"))
        for k in range(3):
            await ingest(srv, sim, sim.batch(events(10, 10 * k)))

    try:
        asyncio.run(body())
    finally:
        srv.core.close()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-m", "sidecar.cli", "collector", "--config", str(cfg_path)]

    def verify() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*cmd, "--verify-chain", "h1"], env=env, capture_output=True, text=True, timeout=60
        )

    ok = verify()
    assert ok.returncode == 0, ok.stderr
    assert "host h1: 3 batches, 30 events (sequences 1..30) re-verified" in ok.stdout
    import sqlite3

    with sqlite3.connect(tmp_path / "data" / "events.db") as db:
        db.execute("DELETE FROM events WHERE seq = 12")
    bad = verify()
    assert bad.returncode == 1
    assert "problem: batch 11..20" in bad.stdout and "12..12 are not stored" in bad.stdout


def test_an_sqlite_store_of_an_earlier_version_is_upgraded_in_place(tmp_path: Path) -> None:
    """A file made before retention and the instance column: its events get their
    instance (read from their stored bytes) and count as stored on the upgrade day."""
    import sqlite3

    from sidecar.collector.sqlite_store import _SCHEMA

    path = tmp_path / "events.db"
    with sqlite3.connect(path) as db:
        db.executescript(_SCHEMA)  # the first schema, user_version 0
        for i in range(1, 7):
            e = connect_event(i)
            e.host, e.boot_id, e.sequence = "h", "boot-1", i
            db.execute(
                "INSERT INTO events (host, boot, seq, time_ns, identity, kind, verdict,"
                " verification, data) VALUES ('h', 'boot-1', ?, ?, ?, 'connect', 1, 1, ?)",
                (i, e.time_ns, e.identity, e.SerializeToString()),
            )
    clock = Clock(D)
    store = SqliteStore(path, clock=clock)
    try:
        got = store.query(pb.EventFilter(instances=["inst-2"]), 0, 100)
        assert [r.event.sequence for r in got] == [2, 5]
        clock.day = D + 2
        store.ingest("h", _rows("h", 7, 3), HostState(9, b"9" * 32))
        assert store.maintain(1) == [D]  # the old events went with the upgrade day
        assert [r.event.sequence for r in store.query(pb.EventFilter(), 0, 100)] == [7, 8, 9]
    finally:
        store.close()
    SqliteStore(path).close()  # opened again: nothing left to upgrade
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (1,)


def test_events_stored_without_a_chain_state_are_still_stored_once_across_days(
    pg_dsn: str,
) -> None:
    """``ingest(…, state=None)`` does not move the host's head: the next day's copy of
    the same events is found by looking each one up, not taken as new."""
    clock = Clock(D)
    store = PostgresStore(pg_dsn, connections=1, clock=clock)
    try:
        assert len(store.ingest("h", _rows("h", 1, 5), None)) == 5
        clock.day = D + 1
        assert store.ingest("h", _rows("h", 1, 5), None) == []
        assert len(store.ingest("h", _rows("h", 4, 4), None)) == 2  # 6 and 7 are new
        assert store.count("h") == 7
    finally:
        store.close()
