"""Collectors on a shared PostgreSQL store: one replica, and two on one database.

Real PostgreSQL (a throwaway cluster, see tests/conftest.py), real gRPC with
mTLS on loopback, real signed and chained batches; nothing mocked.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import psycopg
import pytest

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import collector_pb2_grpc as pbg
from sidecar.api.v1 import event_pb2 as ev
from sidecar.collector.config import CollectorConfig
from sidecar.collector.migrations import APPEND_LOCK, LOCK_CLASS, MIGRATIONS, migrate
from sidecar.collector.postgres_store import PostgresStore
from sidecar.collector.server import CollectorServer, create_join_token
from sidecar.collector.store import HostState, NewEvent, Plan, StoreError
from sidecar.collector.tls import roots_pem
from sidecar.export.chain import CHAIN_SEED, chain_over
from sidecar.identity.spiffeid import parse_spiffe_id
from sidecar.identity.x509 import CertificateAuthority
from sidecar.testing.hosts import SimulatedHost, channel, host_identity, publish
from sidecar.testing.scratch import free_port
from sidecar.testing.stack import wait_port

pytestmark = pytest.mark.timeout(60)  # each test takes seconds; a hang fails fast

TD = "example.org"
ALICE = "spiffe://example.org/ops/alice"


def replica_config(tmp_path: Path, name: str, dsn: str, **kw: object) -> CollectorConfig:
    """A replica's config: its own data folder holding a copy of the one shared CA."""
    shared_ca = tmp_path / "shared-ca"
    if not shared_ca.exists():
        CertificateAuthority.load_or_generate(shared_ca, TD)
    data = tmp_path / name
    if not data.exists():
        data.mkdir(mode=0o700)
        shutil.copytree(shared_ca, data / "ca")
    cfg = CollectorConfig(
        trust_domain=TD,
        data_dir=data,
        listen="127.0.0.1:0",
        enrollment_listen="127.0.0.1:0",
        subscribers=frozenset({parse_spiffe_id(ALICE)}),
        grace_s=0.5,
        store_dsn=dsn,
        store_connections=3,
    )
    return replace(cfg, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def replicas(tmp_path: Path, dsn: str, n: int) -> AsyncIterator[list[CollectorServer]]:
    """``n`` collector replicas on one database, started at once, stopped at the end."""
    async with AsyncExitStack() as stack:
        servers = [CollectorServer(replica_config(tmp_path, f"r{i}", dsn)) for i in range(n)]
        for s in servers:
            stack.push_async_callback(s.stop, 0.2)
        await asyncio.gather(*(s.start() for s in servers))
        yield servers


def connect_event(i: int, identity: str = "spiffe://example.org/agent/a") -> ev.Event:
    return ev.Event(
        time_ns=1_000_000 + i,
        identity=identity,
        process=ev.ProcessInstance(pid=100 + i, instance_id=f"inst-{i % 3}"),
        connect=ev.Connect(
            pid=100 + i,
            family=ev.ADDRESS_FAMILY_INET,
            protocol=ev.PROTOCOL_TCP,
            address="192.0.2.1",
            port=443,
            verdict=ev.VERDICT_ALLOW,
            rule="default",
        ),
    )


def rows_of(dsn: str, host: str) -> list[tuple[int, int, bytes]]:
    """(seq, verification, data) of the host's own events, by sequence, read straight from SQL."""
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT seq, verification, data FROM events WHERE host = %s AND seq IS NOT NULL"
            " ORDER BY seq",
            (host,),
        ).fetchall()
    return [(int(a), int(b), bytes(c)) for a, b, c in rows]


def assert_chain_verifies(dsn: str, sim: SimulatedHost) -> None:
    """Every event stored once, verified, and the stored bytes re-chain to the host's head."""
    rows = rows_of(dsn, sim.name)
    assert [r[0] for r in rows] == list(range(1, sim.next_sequence))
    assert {r[1] for r in rows} == {pb.VERIFICATION_VERIFIED}
    assert chain_over(CHAIN_SEED, 1, [r[2] for r in rows])[-1] == sim.head


def alerts(server: CollectorServer, host: str) -> list[tuple[int, int, int]]:
    rows = server.store.query(pb.EventFilter(hosts=[host], kinds=["integrity"]), 0, 100)
    return [
        (r.event.integrity.kind, r.event.integrity.first_sequence, r.event.integrity.last_sequence)
        for r in rows
    ]


# ---- schema -------------------------------------------------------------------------


def test_replicas_starting_at_once_apply_each_migration_exactly_once(pg_dsn: str) -> None:
    n = 6
    barrier = threading.Barrier(n)
    opened: list[PostgresStore] = []
    errors: list[BaseException] = []

    def open_one() -> None:
        barrier.wait(5)
        try:
            opened.append(PostgresStore(pg_dsn, connections=1))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for s in opened:
        s.close()
    # The migrations are plain CREATE TABLE: a second run of one would have failed.
    assert errors == []
    assert len(opened) == n
    with psycopg.connect(pg_dsn) as conn:
        versions = [r[0] for r in conn.execute("SELECT version FROM schema_version ORDER BY 1")]
    assert versions == sorted(v for v, _, _ in MIGRATIONS)
    PostgresStore(pg_dsn).close()  # and opening again later changes nothing
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT count(*) FROM schema_version").fetchone() == (len(MIGRATIONS),)


def test_a_schema_newer_than_the_collector_is_refused(pg_dsn: str) -> None:
    PostgresStore(pg_dsn).close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("INSERT INTO schema_version (version, description) VALUES (999, 'future')")
    with pytest.raises(StoreError, match="version 999, newer than this collector"):
        PostgresStore(pg_dsn)


def test_a_replica_with_another_root_ca_is_refused(tmp_path: Path, pg_dsn: str) -> None:
    CollectorServer(replica_config(tmp_path, "r0", pg_dsn)).core.close()
    stray = tmp_path / "stray"
    cfg = replace(replica_config(tmp_path, "r1", pg_dsn), data_dir=stray)  # generates its own CA
    with pytest.raises(StoreError, match="every replica must use the same CA folder"):
        CollectorServer(cfg)


# ---- the store's locks ---------------------------------------------------------------


def _rows(host: str, first: int, n: int) -> list[NewEvent]:
    out = []
    for i in range(n):
        e = connect_event(first + i)
        e.host, e.boot_id, e.sequence = host, "boot-1", first + i
        out.append(NewEvent(e, e.SerializeToString(), pb.VERIFICATION_VERIFIED))
    return out


def test_a_hosts_chain_is_read_and_extended_by_one_replica_at_a_time(pg_dsn: str) -> None:
    """Replica 2 decides on the host's state only after replica 1 committed its batch.

    Neither replica stored the host's last batch itself, so both read its head
    under the host's lock (the locked path).
    """
    seed = PostgresStore(pg_dsn, connections=1)
    seed.ingest("h", _rows("h", 1, 5), HostState(5, b"0" * 32))
    seed.close()
    one, two = PostgresStore(pg_dsn, connections=1), PostgresStore(pg_dsn, connections=1)
    inside, release = threading.Event(), threading.Event()
    seen: list[HostState] = []

    def first(state: HostState) -> Plan:
        inside.set()
        assert release.wait(10)
        return Plan(_rows("h", 6, 5), HostState(10, b"1" * 32))

    def second(state: HostState) -> Plan:
        seen.append(state)
        return Plan(_rows("h", 11, 5), HostState(15, b"2" * 32))

    try:
        # A host seen before (its row exists) and a new one (its row is being made).
        t1 = threading.Thread(target=one.ingest_checked, args=("h", first))
        t1.start()
        assert inside.wait(10)
        t2 = threading.Thread(target=two.ingest_checked, args=("h", second))
        t2.start()
        t2.join(0.5)
        assert t2.is_alive() and seen == []  # waiting on the host's lock
        third = PostgresStore(pg_dsn, connections=1)
        third.ingest("other", _rows("other", 1, 1), HostState(1, b"3" * 32))  # does not wait
        third.close()
        release.set()
        t1.join(10)
        t2.join(10)
        assert seen == [HostState(10, b"1" * 32)]
        assert one.host_state("h") == HostState(15, b"2" * 32)
        assert one.count("h") == 15
    finally:
        release.set()
        one.close()
        two.close()


def test_a_replica_deciding_on_the_head_it_knows_stores_nothing_when_another_moved_it(
    pg_dsn: str,
) -> None:
    """The one-statement path: replica 1 stored the host's last batch, so it decides
    on the head it remembers, without a lock; replica 2 stores a batch meanwhile.
    Replica 1's statement then finds the head moved, stores nothing, and replica 1
    decides again on the head replica 2 left, under the host's lock."""
    one, two = PostgresStore(pg_dsn, connections=1), PostgresStore(pg_dsn, connections=1)
    inside, release = threading.Event(), threading.Event()
    seen: list[HostState] = []

    def first(state: HostState) -> Plan:
        seen.append(state)
        if len(seen) == 1:
            inside.set()
            assert release.wait(10)
        n = state.last_sequence
        return Plan(_rows("h", n + 1, 5), HostState(n + 5, bytes([n + 5]) * 32))

    try:
        one.ingest("h", _rows("h", 1, 5), HostState(5, b"0" * 32))
        # Positive control: with nobody else writing, the remembered head holds.
        stored = one.ingest_checked(
            "h", lambda s: Plan(_rows("h", 6, 5), HostState(10, s.last_chain[:1] * 32))
        )
        assert [se.event.sequence for se in stored] == [6, 7, 8, 9, 10]
        t1 = threading.Thread(target=one.ingest_checked, args=("h", first))
        t1.start()
        assert inside.wait(10)
        # Replica 1 holds no lock while it decides: replica 2 does not wait.
        two.ingest_checked("h", lambda s: Plan(_rows("h", 11, 5), HostState(15, b"2" * 32)))
        release.set()
        t1.join(10)
        assert not t1.is_alive()
        assert seen == [HostState(10, b"0" * 32), HostState(15, b"2" * 32)]
        assert one.host_state("h") == HostState(20, bytes([20]) * 32)
        # Every sequence once: replica 1's first decision stored nothing.
        with psycopg.connect(pg_dsn) as conn:
            seqs = [r[0] for r in conn.execute("SELECT seq FROM events ORDER BY id")]
        assert seqs == list(range(1, 21))
    finally:
        release.set()
        one.close()
        two.close()


def test_inserts_wait_for_the_append_lock_so_cursors_become_visible_in_order(
    pg_dsn: str,
) -> None:
    store = PostgresStore(pg_dsn, connections=1)
    try:
        with psycopg.connect(pg_dsn) as holder:
            holder.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, APPEND_LOCK))
            t = threading.Thread(target=store.ingest, args=("h", _rows("h", 1, 3), None))
            t.start()
            t.join(0.5)
            with psycopg.connect(pg_dsn) as conn:
                assert conn.execute("SELECT count(*) FROM events").fetchone() == (0,)
            assert t.is_alive()
            holder.commit()
        t.join(10)
        assert store.count() == 3
    finally:
        store.close()


def test_a_reader_never_passes_a_cursor_that_a_writer_has_not_committed_yet(
    pg_dsn: str,
) -> None:
    """Writers insert side by side (the append lock is shared) and may commit out of
    cursor order.  A replica whose insert drew cursors and has not committed yet
    (a slow commit) holds every reader at the cursors below its own."""
    from sidecar.collector import postgres_store as ps
    from sidecar.collector.store import day_of

    store = PostgresStore(pg_dsn, connections=2)
    slow = psycopg.connect(pg_dsn)  # another replica, between its insert and its commit
    try:
        store.ingest("a", _rows("a", 1, 3), HostState(3, b"a" * 32))
        for cls, dumper in ps._DUMPERS:
            slow.adapters.register_dumper(cls, dumper)
        slow.execute("INSERT INTO hosts VALUES ('b', 0, %s)", (CHAIN_SEED,))
        rows_b = _rows("b", 1, 2)
        args = PostgresStore._append_args(
            "b",
            HostState(),
            Plan(rows_b, HostState(2, b"b" * 32)),
            rows_b,
            day_of(time.time_ns()),
            True,
        )
        ids_b = slow.execute(ps._APPEND, args).fetchone()[0]  # type: ignore[index]
        # Writers do not wait for each other: this one commits cursors after b's.
        later = store.ingest("a", _rows("a", 4, 3), HostState(6, b"a" * 32))
        assert min(se.cursor for se in later) > max(ids_b)
        with psycopg.connect(pg_dsn) as peek:  # the hazard: a plain read skips b's rows
            seen = [r[0] for r in peek.execute("SELECT id FROM events WHERE id > 3 ORDER BY id")]
        assert seen == [se.cursor for se in later]
        got: list[list[int]] = []
        reader = threading.Thread(
            target=lambda: got.append([r.cursor for r in store.query(pb.EventFilter(), 3, 100)])
        )
        reader.start()
        reader.join(0.5)
        assert reader.is_alive() and got == []  # held below b's cursors
        slow.commit()
        reader.join(10)
        assert got == [sorted([*ids_b, *seen])]
        assert store.last_cursor() == max(seen)
    finally:
        slow.close()
        store.close()


def test_readers_racing_three_writing_replicas_see_every_row_once_in_cursor_order(
    pg_dsn: str,
) -> None:
    """Three replicas store batches of many hosts at once while a reader follows
    "after my last cursor", as a subscriber does: it misses none, repeats none."""
    writers = [PostgresStore(pg_dsn, connections=2) for _ in range(3)]
    reader = PostgresStore(pg_dsn, connections=1)
    done = threading.Event()
    errors: list[BaseException] = []

    def write(k: int) -> None:
        try:
            store = writers[k % 3]
            host = f"h{k}"
            for b in range(15):
                store.ingest(host, _rows(host, 20 * b + 1, 20), HostState(20 * b + 20, b"x" * 32))
        except BaseException as exc:
            errors.append(exc)

    followed: list[int] = []

    def follow() -> None:
        cursor = 0
        while True:
            finished = done.is_set()
            page = reader.query(pb.EventFilter(), cursor, 500)
            followed.extend(r.cursor for r in page)
            if page:
                cursor = page[-1].cursor
            elif finished:
                return

    try:
        threads = [threading.Thread(target=write, args=(k,)) for k in range(9)]
        follower = threading.Thread(target=follow)
        follower.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        done.set()
        follower.join(30)
        assert errors == [] and not follower.is_alive()
        with psycopg.connect(pg_dsn) as conn:
            every = [r[0] for r in conn.execute("SELECT id FROM events ORDER BY id")]
        assert len(every) == 9 * 15 * 20
        assert followed == every
    finally:
        for s in [*writers, reader]:
            s.close()


# ---- exactly once and the chain, across replicas ----------------------------------------


def test_one_hosts_batches_alternating_between_two_replicas_store_once_and_chain(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def body() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            ca = a.ca
            sim = SimulatedHost(host_identity(ca, "h1"))
            batches = [sim.batch([connect_event(10 * k + i) for i in range(10)]) for k in range(12)]
            # One at a time, alternating replicas, each acknowledging the whole chain so far.
            for k, batch in enumerate(batches[:6]):
                port = (a, b)[k % 2].port
                assert await publish(port, ca, sim.ident, [batch]) == [10 * k, 10 * (k + 1)]
            # After a failover the same batches may reach both replicas at once, and a
            # host resends what it has no ack for: each batch goes to both, concurrently.
            for batch in batches[6:]:
                acks = await asyncio.gather(
                    publish(a.port, ca, sim.ident, [batch]),
                    publish(b.port, ca, sim.ident, [batch]),
                )
                assert [x[-1] for x in acks] == [batch.last_sequence] * 2
            # Old batches replayed to either replica store nothing.
            assert await publish(b.port, ca, sim.ident, batches[:3]) == [120, 120, 120, 120]
            assert await publish(a.port, ca, sim.ident, [batches[7]]) == [120, 120]
            assert_chain_verifies(pg_dsn, sim)
            assert alerts(a, "h1") == []
            assert a.store.count("h1") == b.store.count("h1") == 120
            # Each replica's metrics count its own share; together exactly what arrived.
            stored = sum(
                s.core.metrics.registry.get_sample_value(
                    "sidecar_collector_events_stored_total", {"host": "h1"}
                )
                or 0
                for s in (a, b)
            )
            assert stored == 120

    asyncio.run(body())


def test_a_resend_with_other_bytes_is_caught_by_whichever_replica_gets_it(
    tmp_path: Path, pg_dsn: str
) -> None:
    from tests.integration.test_collector_retention import integrity, resend, resend_altered

    async def body() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            ca = a.ca
            sim = SimulatedHost(host_identity(ca, "h1"))
            batches = [sim.batch([connect_event(10 * k + i) for i in range(10)]) for k in range(3)]
            assert await publish(a.port, ca, sim.ident, batches) == [0, 10, 20, 30]
            # Positive control: the same events resent to the other replica.
            assert await publish(b.port, ca, sim.ident, [resend(sim, 5, 15)]) == [30, 30]
            assert a.store.quarantined("h1") == []
            # Other bytes at 7 to the replica that did not store them, at 30 to the one
            # that did (and that knows the host's head).
            assert await publish(b.port, ca, sim.ident, [resend_altered(sim, 5, 15, 7)]) == [
                30,
                30,
            ]
            assert await publish(a.port, ca, sim.ident, [resend_altered(sim, 21, 30, 30)]) == [
                30,
                30,
            ]
            for r in (a, b):
                kept = [(x, y, why) for x, y, why, _ in r.store.quarantined("h1")]
                assert kept == [(5, 15, "resent_differs"), (21, 30, "resent_differs")]
            found = integrity(a.store, "h1")
            assert [(f, t) for _, f, t, d in found if "other bytes" in d] == [(7, 7), (30, 30)]
            rows = rows_of(pg_dsn, "h1")
            assert [r[0] for r in rows] == list(range(1, 31))
            assert chain_over(CHAIN_SEED, 1, [r[2] for r in rows])[-1] == sim.head

    asyncio.run(body())


def test_many_hosts_racing_on_two_replicas_each_store_once_and_chain(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def body() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            sims = [SimulatedHost(host_identity(a.ca, f"h{i}")) for i in range(8)]
            alice = a.ca.issue_x509_svid(ALICE, timedelta(hours=1))
            ch = channel(b.port, a.ca, (alice.key_pem(), alice.cert_chain_pem()))
            live = pbg.CollectorStub(ch).Subscribe(pb.SubscribeRequest())
            await asyncio.sleep(0.2)  # subscribed from now on

            async def drive(sim: SimulatedHost, i: int) -> None:
                for k in range(5):
                    batch = sim.batch([connect_event(20 * k + j) for j in range(20)])
                    first, second = (a, b) if (i + k) % 2 else (b, a)
                    await publish(first.port, a.ca, sim.ident, [batch])
                    await publish(second.port, a.ca, sim.ident, [batch])  # a replay

            await asyncio.gather(*(drive(s, i) for i, s in enumerate(sims)))
            for sim in sims:
                assert_chain_verifies(pg_dsn, sim)
                assert alerts(a, sim.name) == []
            assert a.store.count() == 8 * 100
            # A subscriber of replica B saw every row of both, once, in cursor order.
            got = await _read(live, 800)
            live.cancel()
            await ch.close()
            cursors = [se.cursor for se in got]
            assert cursors == sorted(set(cursors))
            assert {(se.event.host, se.event.sequence) for se in got} == {
                (s.name, q) for s in sims for q in range(1, 101)
            }

    asyncio.run(body())


def test_forged_thinned_and_gapped_batches_are_caught_whichever_replica_gets_them(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def body() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            ca = a.ca
            sim = SimulatedHost(host_identity(ca, "h2"))
            b1 = sim.batch([connect_event(i) for i in range(3)])
            genuine = sim.batch([connect_event(i) for i in range(3, 6)])
            assert await publish(a.port, ca, sim.ident, [b1]) == [0, 3]
            # Forged on the way (an address changed): replica B quarantines it, and the
            # chain stays at 3 on both replicas.
            forged = pb.Batch.FromString(genuine.SerializeToString())
            altered = ev.Event.FromString(forged.events[1])
            altered.connect.address = "203.0.113.9"
            forged.events[1] = altered.SerializeToString()
            assert await publish(b.port, ca, sim.ident, [forged]) == [3, 3]
            (q,) = a.store.quarantined("h2")
            assert q[:3] == (4, 6, "bad_signature") and q[3] == forged
            # Thinned on the way (an event taken out, the rest renumbered): the
            # signature no longer covers it.
            thinned = pb.Batch.FromString(genuine.SerializeToString())
            raws = list(thinned.events)
            kept = [ev.Event.FromString(raws[0]), ev.Event.FromString(raws[2])]
            kept[1].sequence = 5
            del thinned.events[:]
            thinned.events.extend(e.SerializeToString() for e in kept)
            thinned.last_sequence = 5
            assert await publish(a.port, ca, sim.ident, [thinned]) == [3, 3]
            assert len(b.store.quarantined("h2")) == 2
            # The genuine batch, on the other replica, continues the chain.
            assert await publish(b.port, ca, sim.ident, [genuine]) == [3, 6]
            # The host's own gap (signed, but sequences 7..9 never sent) is reported.
            sim.batch([connect_event(i) for i in range(6, 9)])  # never arrives
            after_gap = sim.batch([connect_event(i) for i in range(9, 12)])
            assert await publish(a.port, ca, sim.ident, [after_gap]) == [6, 12]
            # A batch chained from somewhere else: a chain break, seen on replica B.
            sim.head = bytes(32)
            broken = sim.batch([connect_event(12)])
            assert await publish(b.port, ca, sim.ident, [broken]) == [12, 13]
            K = ev.IntegrityAlert
            assert alerts(b, "h2") == [
                (K.KIND_BAD_SIGNATURE, 4, 6),
                (K.KIND_BAD_SIGNATURE, 4, 5),
                (K.KIND_GAP, 7, 9),
                (K.KIND_CHAIN_BREAK, 13, 13),
            ]
            got = {seq: v for seq, v, _ in rows_of(pg_dsn, "h2")}
            assert got == {
                **dict.fromkeys(range(1, 7), pb.VERIFICATION_VERIFIED),
                **dict.fromkeys(range(10, 13), pb.VERIFICATION_AFTER_GAP),
                13: pb.VERIFICATION_CHAIN_BREAK,
            }
            addresses = [r.event.connect.address for r in a.store.query(pb.EventFilter(), 0, 99)]
            assert "203.0.113.9" not in addresses

    asyncio.run(body())


def test_a_batch_stored_after_a_later_one_by_a_racing_replica_is_marked_late(
    tmp_path: Path, pg_dsn: str
) -> None:
    """Replicas race a host's batches: 4..6 lands first, 1..3 after it, elsewhere."""

    async def body() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            sim = SimulatedHost(host_identity(a.ca, "h3"))
            early = sim.batch([connect_event(i) for i in range(3)])
            later = sim.batch([connect_event(i) for i in range(3, 6)])
            assert await publish(b.port, a.ca, sim.ident, [later]) == [0, 6]
            assert await publish(a.port, a.ca, sim.ident, [early]) == [6, 6]
            got = {seq: v for seq, v, _ in rows_of(pg_dsn, "h3")}
            # Not checked against 4..6 (nothing stored says what 3 chains to): late,
            # never "verified".
            assert got == {
                **dict.fromkeys(range(1, 4), pb.VERIFICATION_LATE),
                **dict.fromkeys(range(4, 7), pb.VERIFICATION_AFTER_GAP),
            }
            assert alerts(a, "h3") == [(ev.IntegrityAlert.KIND_GAP, 1, 3)]

    asyncio.run(body())


# ---- subscribers, queries and cursors across replicas --------------------------------


async def _read(
    call: grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.StoredEvent], n: int
) -> list[pb.StoredEvent]:
    out: list[pb.StoredEvent] = []
    while len(out) < n:
        msg = await asyncio.wait_for(call.read(), 10)
        assert isinstance(msg, pb.StoredEvent), f"stream ended: {msg!r}"
        out.append(msg)
    return out


def test_a_subscriber_on_one_replica_sees_every_replicas_events_in_cursor_order(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def body() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            ca = a.ca
            alice = ca.issue_x509_svid(ALICE, timedelta(hours=1))
            creds = (alice.key_pem(), alice.cert_chain_pem())
            h1, h2 = SimulatedHost(host_identity(ca, "h1")), SimulatedHost(host_identity(ca, "h2"))
            stored_before = h1.batch([connect_event(i) for i in range(5)])
            await publish(a.port, ca, h1.ident, [stored_before])
            async with channel(b.port, ca, creds) as ch_b, channel(a.port, ca, creds) as ch_a:
                live = pbg.CollectorStub(ch_b).Subscribe(pb.SubscribeRequest(after_cursor=0))
                replayed = await _read(live, 5)
                # Ingested by A while the subscriber listens on B, and by B, interleaved.
                for k in range(4):
                    await publish(a.port, ca, h1.ident, [h1.batch([connect_event(k)])])
                    await publish(b.port, ca, h2.ident, [h2.batch([connect_event(k)])])
                got = replayed + await _read(live, 8)
                live.cancel()
                cursors = [se.cursor for se in got]
                assert cursors == sorted(cursors) and len(set(cursors)) == 13
                seen = [(se.event.host, se.event.sequence) for se in got]
                assert seen == [("h1", s) for s in range(1, 6)] + [
                    x for k in range(4) for x in (("h1", 6 + k), ("h2", 1 + k))
                ]
                # A cursor from replica B resumes on replica A: nothing skipped or repeated.
                resumed = pbg.CollectorStub(ch_a).Subscribe(
                    pb.SubscribeRequest(after_cursor=got[6].cursor)
                )
                again = await _read(resumed, len(got) - 7)
                resumed.cancel()
                assert [se.cursor for se in again] == cursors[7:]

    asyncio.run(body())


def test_query_by_identity_instance_host_kind_and_time_pages_on_either_replica(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def body() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            ca = a.ca
            alice = ca.issue_x509_svid(ALICE, timedelta(hours=1))
            creds = (alice.key_pem(), alice.cert_chain_pem())
            sims = [SimulatedHost(host_identity(ca, f"q{i}")) for i in range(2)]
            for k, sim in enumerate(sims):
                events = [
                    connect_event(i, f"spiffe://example.org/agent/{'ab'[i % 2]}") for i in range(40)
                ]
                events += [ev.Event(time_ns=2_000_000 + i, exit=ev.Exit(pid=i)) for i in range(5)]
                await publish((a, b)[k].port, ca, sim.ident, [sim.batch(events)])
            flt = pb.EventFilter(
                hosts=["q1"],
                identities=["spiffe://example.org/agent/b"],
                kinds=["connect"],
                start_time_ns=1_000_010,
                end_time_ns=1_000_029,
            )
            want = [s for s in range(1, 41) if s % 2 == 0 and 10 <= s - 1 <= 29]
            got: list[int] = []
            cursor, port = 0, a.port
            async with channel(a.port, ca, creds) as ch_a, channel(b.port, ca, creds) as ch_b:
                stubs = {a.port: pbg.CollectorStub(ch_a), b.port: pbg.CollectorStub(ch_b)}
                while True:  # pages of 3, alternating replicas
                    page = await stubs[port].Query(
                        pb.QueryRequest(filter=flt, after_cursor=cursor, limit=3)
                    )
                    got += [se.event.sequence for se in page.events]
                    cursor = page.next_cursor
                    port = b.port if port == a.port else a.port
                    if not page.more:
                        break
            assert got == want
            # The instance column is stored for every event (and indexed, as below).
            with psycopg.connect(pg_dsn) as conn:
                n = conn.execute(
                    "SELECT count(*) FROM events WHERE instance = 'inst-1' AND host = 'q0'"
                ).fetchone()
            assert n == (len([i for i in range(40) if i % 3 == 1]),)

    asyncio.run(body())


@pytest.mark.parametrize("column", ["identity", "instance", "host", "kind"])
def test_each_query_column_has_an_index_that_reads_in_cursor_order(
    pg_dsn: str, column: str
) -> None:
    PostgresStore(pg_dsn).close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                f"EXPLAIN SELECT id, data FROM events WHERE {column} = 'x' AND id > 10"
                " ORDER BY id LIMIT 100"
            )
        )
    # One index scan per day partition, each already in cursor order, merged: no sort.
    scans = [line for line in plan.splitlines() if "Scan" in line]
    assert len(scans) >= 3, plan  # today and the days made ahead
    assert all("Index Scan using events_" in s and f"_{column}_id_idx" in s for s in scans), plan
    assert not re.search(r"(^|->  )Sort ", plan, re.M), plan


# ---- enrollment ---------------------------------------------------------------------


def test_a_join_token_spent_on_one_replica_is_refused_on_the_other(
    tmp_path: Path, pg_dsn: str
) -> None:
    from sidecar.export.enroll import enroll
    from sidecar.util.errors import TransportError

    async def body() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            bundle = roots_pem(a.ca)
            token = create_join_token(a.store, TD, "web-1", 60)
            ident = await enroll(f"127.0.0.1:{a.enrollment_port}", token, bundle, tmp_path / "c1")
            assert ident.host == "web-1"
            with pytest.raises(TransportError, match="unknown, used or expired"):
                await enroll(f"127.0.0.1:{b.enrollment_port}", token, bundle, tmp_path / "c2")
            # The same token at both replicas at the same moment: one enrollment only.
            token = create_join_token(b.store, TD, "web-2", 60)

            async def attempt(port: int, out: Path) -> bool:
                try:
                    await enroll(f"127.0.0.1:{port}", token, bundle, out)
                except TransportError:
                    return False
                return True

            won = await asyncio.gather(
                *(attempt((a, b)[i % 2].enrollment_port, tmp_path / f"race{i}") for i in range(6))
            )
            assert won.count(True) == 1
            # The credentials from replica A publish to replica B: one CA for all.
            sim = SimulatedHost(ident)
            assert await publish(b.port, b.ca, sim.ident, [sim.batch([connect_event(1)])]) == [
                0,
                1,
            ]

    asyncio.run(body())


def _with_timeout(fn: Callable[[], None], seconds: float) -> None:
    t = threading.Thread(target=fn)
    t.start()
    t.join(seconds)
    assert not t.is_alive()


def test_a_replica_keeps_serving_subscribers_after_the_database_drops_its_listener(
    tmp_path: Path, pg_dsn: str
) -> None:
    """The LISTEN connection is killed by the server: it reconnects and nothing is missed."""

    async def body() -> None:
        async with replicas(tmp_path, pg_dsn, 2) as (a, b):
            ca = a.ca
            alice = ca.issue_x509_svid(ALICE, timedelta(hours=1))
            sim = SimulatedHost(host_identity(ca, "h9"))
            async with channel(b.port, ca, (alice.key_pem(), alice.cert_chain_pem())) as ch:
                live = pbg.CollectorStub(ch).Subscribe(pb.SubscribeRequest(after_cursor=0))
                await publish(a.port, ca, sim.ident, [sim.batch([connect_event(0)])])
                assert len(await _read(live, 1)) == 1

                def kill_listeners() -> None:
                    with psycopg.connect(pg_dsn, autocommit=True) as conn:
                        conn.execute(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                            " WHERE query LIKE 'LISTEN%%' AND datname = current_database()"
                        )

                _with_timeout(kill_listeners, 5)
                for k in range(3):
                    await publish(a.port, ca, sim.ident, [sim.batch([connect_event(k)])])
                    await asyncio.sleep(0.05)
                got = await _read(live, 3)
                live.cancel()
                assert [se.event.sequence for se in got] == [2, 3, 4]

    asyncio.run(body())


# ---- as deployed: `sidecar collector` processes --------------------------------------


def test_two_collector_processes_started_at_once_share_the_database(
    tmp_path: Path, pg_dsn: str
) -> None:
    """As deployed: the CLI makes the CA and a token; two replicas start together."""
    from sidecar.export.enroll import enroll

    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    uri = (
        f"postgresql:///{params['dbname']}?host={params['host']}&port={params['port']}"
        f"&user={params['user']}"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ports = [(free_port(), free_port()) for _ in range(2)]
    configs = []
    for i, (mtls, enr) in enumerate(ports):
        cfg = tmp_path / f"r{i}.yaml"
        cfg.write_text(
            f"apiVersion: sidecar/v1\nkind: CollectorConfig\ntrustDomain: {TD}\n"
            f"dataDir: r{i}\nlisten: 127.0.0.1:{mtls}\nenrollmentListen: 127.0.0.1:{enr}\n"
            f"metrics: ''\nstore: '{uri}'\n"
        )
        configs.append(cfg)
    cli = [sys.executable, "-m", "sidecar.cli", "collector", "--config"]
    token = subprocess.run(
        [*cli, str(configs[0]), "--join-token", "web-1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout.strip()
    shutil.copytree(tmp_path / "r0" / "ca", tmp_path / "r1" / "ca")
    procs = []
    try:
        for i, cfg in enumerate(configs):
            log = tmp_path / f"r{i}.log"
            with log.open("wb") as out:
                procs.append(subprocess.Popen([*cli, str(cfg)], env=env, stdout=out, stderr=out))
        for i, (mtls, enr) in enumerate(ports):
            wait_port(mtls, procs[i], tmp_path / f"r{i}.log")
            wait_port(enr, procs[i], tmp_path / f"r{i}.log")
        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
        assert rows == [(v,) for v, _, _ in sorted(MIGRATIONS)]
        bundle = (tmp_path / "r0" / "ca" / "ca.pem").read_bytes()

        async def body() -> SimulatedHost:
            from sidecar.util.errors import TransportError

            # The token the CLI made through replica 0's config enrolls on replica 1...
            ident = await enroll(f"127.0.0.1:{ports[1][1]}", token, bundle, tmp_path / "c")
            # ... and is then spent for both.
            with pytest.raises(TransportError, match="unknown, used or expired"):
                await enroll(f"127.0.0.1:{ports[0][1]}", token, bundle, tmp_path / "c2")
            sim = SimulatedHost(ident)
            ca = CertificateAuthority.load_or_generate(tmp_path / "r0" / "ca", TD)
            b1, b2 = sim.batch([connect_event(1)]), sim.batch([connect_event(2)])
            assert await publish(ports[0][0], ca, ident, [b1]) == [0, 1]
            assert await publish(ports[1][0], ca, ident, [b1, b2]) == [1, 1, 2]
            return sim

        assert_chain_verifies(pg_dsn, asyncio.run(body()))
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0]


# ---- migrations with gaps, and the upgrade to day partitions -----------------------------


def test_migrations_apply_each_missing_version_even_with_gaps_and_refuse_unknown_ones(
    pg_dsn: str,
) -> None:
    """Versions are numbered apart by separate lines of work: 1 and 3 first, 2 later."""
    one = (1, "one", "CREATE TABLE m1 (x INTEGER)")
    two = (2, "two", "CREATE TABLE m2 (x INTEGER)")
    three = (3, "three", "CREATE TABLE m3 (x INTEGER)")
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        assert migrate(conn, (one, three)) == [1, 3]
        assert migrate(conn, (one, two, three)) == [2]  # the gap, filled later
        assert migrate(conn, (three, one, two)) == []
        # A database that has a version this collector lacks (2) is refused.
        with pytest.raises(StoreError, match=r"version\(s\) \[2\] that this collector"):
            migrate(conn, (one, three))
        tables = conn.execute(
            "SELECT count(*) FROM pg_tables WHERE tablename IN ('m1', 'm2', 'm3')"
        ).fetchone()
    assert tables == (3,)


def test_schema_3_moves_earlier_events_into_a_day_partition_keeping_their_cursors(
    pg_dsn: str,
) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        migrate(conn, MIGRATIONS[:1])  # a database of the first release
        for i in range(1, 6):
            e = connect_event(i)
            e.host, e.boot_id, e.sequence = "h", "boot-1", i
            conn.execute(
                "INSERT INTO events (host, boot, seq, time_ns, identity, instance, kind,"
                " verdict, verification, data) VALUES ('h', 'boot-1', %s, %s, %s, %s,"
                " 'connect', 1, 1, %s)",
                (i, e.time_ns, e.identity, e.process.instance_id, e.SerializeToString()),
            )
        conn.execute("INSERT INTO hosts VALUES ('h', 5, %s)", (b"5" * 32,))
        old = conn.execute("SELECT id, seq FROM events ORDER BY id").fetchall()
    store = PostgresStore(pg_dsn, connections=1)
    try:
        got = store.query(pb.EventFilter(hosts=["h"]), 0, 100)
        assert [(r.cursor, r.event.sequence) for r in got] == old
        assert store.query(pb.EventFilter(instances=["inst-1"]), 0, 100)[0].event.sequence == 1
        # New events take cursors after them, and a resend of old ones is still a duplicate.
        assert store.ingest("h", _rows("h", 4, 4), HostState(7, b"7" * 32))[0].cursor == (
            old[-1][0] + 1
        )
        assert store.count("h") == 7
        # The old events have no kept batch: re-verification says so, and nothing else.
        from sidecar.collector.verify import verify_stored_chain

        report = verify_stored_chain(store, "h")
        assert (report.batches, report.unsigned, report.problems) == (0, 7, [])
    finally:
        store.close()
    with psycopg.connect(pg_dsn) as conn:
        assert conn.execute("SELECT to_regclass('events_v1')").fetchone() == (None,)


# ---- reading from a time on --------------------------------------------------------------


def test_first_cursor_since_is_exact_and_reads_only_the_recent_rows(pg_dsn: str) -> None:
    store = PostgresStore(pg_dsn, connections=1)
    try:
        rows = _rows("h", 1, 400)
        for i, ne in enumerate(rows):
            ne.event.time_ns = 1_000_000 + i
        rows[99].event.time_ns = 5_000_000  # a host clock ahead: stored early, time late
        stored = store.ingest(
            "h",
            [NewEvent(n.event, n.event.SerializeToString(), n.verification) for n in rows],
            HostState(400, b"4" * 32),
        )
        cursor = {se.event.sequence: se.cursor for se in stored}
        assert store.first_cursor_since(1_000_000) == cursor[1] - 1
        assert store.first_cursor_since(1_000_300) == cursor[100] - 1  # the early-stored one
        assert store.first_cursor_since(4_000_000) == cursor[100] - 1
        assert store.first_cursor_since(6_000_000) == store.last_cursor()
    finally:
        store.close()
    with psycopg.connect(pg_dsn) as conn:
        conn.execute("ANALYZE events")
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                "EXPLAIN SELECT min(id) FROM (SELECT id FROM events WHERE time_ns >= 1000300"
                " OFFSET 0) AS since"
            )
        )
    # Not a walk of the id index from the oldest row: the time index, from the time on.
    assert "id IS NOT NULL" not in plan and "_id_idx on" not in plan.replace("time_ns_id", ""), plan
    assert "time_ns_id_idx" in plan and "Index Cond: (time_ns >= " in plan, plan


# ---- a database that stops answering -------------------------------------------------------


def _freeze(c: object, sig: int) -> None:
    import psutil

    root = c.root  # type: ignore[attr-defined]
    pid = int((root / "data" / "postmaster.pid").read_text().split()[0])
    post = psutil.Process(pid)
    for p in [post, *post.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(sig)


def test_a_frozen_database_fails_calls_in_time_instead_of_hanging_them(tmp_path: Path) -> None:
    """A database server that stops answering (SIGSTOP) must not hang the replica: the
    call on a connection fails after the operation timeout, and a caller waiting for a
    connection fails after the pool timeout; both work again once it answers."""
    from sidecar.testing.postgres import cluster, create_database

    with cluster() as c:
        dsn = create_database(c, "frozen")
        store = PostgresStore(dsn, connections=1, pool_timeout_s=1.0, operation_timeout_s=3.0)
        try:
            assert store.count() == 0  # positive control, and a pooled connection
            _freeze(c, signal.SIGSTOP)
            failed: list[tuple[float, BaseException]] = []
            began = time.monotonic()

            def call() -> None:
                try:
                    store.count()
                except BaseException as exc:
                    failed.append((time.monotonic() - began, exc))

            t = threading.Thread(target=call)
            t.start()
            time.sleep(0.3)
            with pytest.raises(StoreError, match="no database connection came free in 1 s"):
                store.last_cursor()
            assert time.monotonic() - began < 2.5
            t.join(10)
            assert not t.is_alive()
            [(took, exc)] = failed
            assert isinstance(exc, StoreError) and "no answer in 3 s" in str(exc)
            assert 2.5 < took < 6
        finally:
            _freeze(c, signal.SIGCONT)
        try:
            assert store.count() == 0  # a new connection, once the server answers
        finally:
            store.close()


def test_a_replica_frozen_inside_a_transaction_does_not_hold_its_host_lock_for_ever(
    pg_dsn: str,
) -> None:
    """The server ends a session idle inside a transaction (a frozen replica holding a
    host's row lock), so the other replicas go on with that host."""
    frozen = PostgresStore(pg_dsn, connections=1, idle_in_transaction_timeout_s=1.0)
    other = PostgresStore(pg_dsn, connections=1)
    inside, thaw = threading.Event(), threading.Event()
    outcome: list[BaseException | None] = []

    def stuck(state: HostState) -> Plan:
        inside.set()
        thaw.wait(20)  # frozen with the host's row locked
        return Plan(_rows("h", 1, 5), HostState(5, b"f" * 32))

    def run() -> None:
        try:
            frozen.ingest_checked("h", stuck)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    t = threading.Thread(target=run)
    try:
        t.start()
        assert inside.wait(10)
        began = time.monotonic()
        other.ingest("h", _rows("h", 1, 5), HostState(5, b"o" * 32))  # waits, then goes on
        assert 0.5 < time.monotonic() - began < 10
        assert other.host_state("h") == HostState(5, b"o" * 32)
        thaw.set()
        t.join(10)
        assert isinstance(outcome[0], StoreError)  # its transaction is gone: nothing stored
        assert other.count("h") == 5
    finally:
        thaw.set()
        frozen.close()
        other.close()


def test_the_dsns_own_session_options_win_over_the_collectors_defaults(pg_dsn: str) -> None:
    plain = PostgresStore(pg_dsn, connections=1)
    mine = PostgresStore(f"{pg_dsn} options='-c statement_timeout=5s'", connections=1)
    try:
        assert plain._rows("SHOW statement_timeout") == [("1min",)]
        assert plain._rows("SHOW idle_in_transaction_session_timeout") == [("30s",)]
        assert mine._rows("SHOW statement_timeout") == [("5s",)]
        assert mine._rows("SHOW idle_in_transaction_session_timeout") == [("30s",)]
    finally:
        plain.close()
        mine.close()


def test_a_durable_throwaway_cluster_syncs_commits_and_the_default_one_does_not() -> None:
    """bench_fleet --durable compares PostgreSQL with SQLite's synchronous=FULL: the
    cluster it starts must really wait for the disk at commit."""
    import psycopg

    from sidecar.testing.postgres import cluster

    for durable, want in ((True, "on"), (False, "off")):
        with cluster(durable=durable) as c, psycopg.connect(c.dsn) as conn:
            fsync = conn.execute("SHOW fsync").fetchone()
            commit = conn.execute("SHOW synchronous_commit").fetchone()
            assert fsync is not None and commit is not None
            assert (fsync[0], commit[0]) == (want, "on")
