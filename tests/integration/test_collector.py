"""Exporter -> collector over real mTLS gRPC on loopback, with a real SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import pytest

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import collector_pb2_grpc as pbg
from sidecar.api.v1 import event_pb2 as ev
from sidecar.collector.config import CollectorConfig
from sidecar.collector.server import CollectorServer
from sidecar.collector.tls import roots_pem
from sidecar.export.exporter import Exporter, ExporterConfig, HostIdentity
from sidecar.identity.spiffeid import parse_spiffe_id
from sidecar.identity.x509 import CertificateAuthority
from sidecar.testing.hosts import channel, host_identity, signed_batch

TD = "example.org"
ALICE = "spiffe://example.org/ops/alice"
REPO = Path(__file__).resolve().parents[2]


def make_config(tmp_path: Path, **kw: object) -> CollectorConfig:
    cfg = CollectorConfig(
        trust_domain=TD,
        data_dir=tmp_path / "collector",
        listen="127.0.0.1:0",
        enrollment_listen="127.0.0.1:0",
        subscribers=frozenset({parse_spiffe_id(ALICE)}),
        grace_s=0.5,
    )
    return replace(cfg, **kw)  # type: ignore[arg-type]


@asynccontextmanager
async def running(cfg: CollectorConfig) -> AsyncIterator[CollectorServer]:
    server = CollectorServer(cfg)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(0.2)


def svid_pair(ca: CertificateAuthority, sid: str, ttl: timedelta) -> tuple[bytes, bytes]:
    svid = ca.issue_x509_svid(sid, ttl)
    return svid.key_pem(), svid.cert_chain_pem()


def connect_event(i: int, verdict: int = ev.VERDICT_ALLOW) -> ev.Event:
    return ev.Event(
        time_ns=1_000_000 + i,
        identity="spiffe://example.org/agent/a",
        connect=ev.Connect(
            pid=100 + i,
            family=ev.ADDRESS_FAMILY_INET,
            protocol=ev.PROTOCOL_TCP,
            address="192.0.2.1",
            port=443,
            verdict=verdict,  # type: ignore[arg-type]
            rule="default",
        ),
    )


def exporter_for(
    tmp_path: Path, port: int, ident: HostIdentity, name: str = "spool", **kw: object
) -> Exporter:
    cfg = ExporterConfig(
        target=f"127.0.0.1:{port}",
        spool_dir=tmp_path / name,
        backoff_initial=0.05,
        backoff_max=0.2,
        **kw,  # type: ignore[arg-type]
    )
    return Exporter(cfg, lambda: ident, boot_id="boot-1")


async def until(cond: Callable[[], bool | Awaitable[bool]], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        res = cond()
        if not isinstance(res, bool):
            res = await res
        if res:
            return
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


def stored_sequences(db: Path, host: str) -> list[int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT seq FROM events WHERE host = ? AND seq IS NOT NULL ORDER BY id", (host,)
        ).fetchall()
    return [int(r[0]) for r in rows]


def verifications(db: Path, host: str) -> set[int]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT DISTINCT verification FROM events WHERE host = ? AND seq IS NOT NULL", (host,)
        ).fetchall()
    return {int(r[0]) for r in rows}


# ---- delivery ------------------------------------------------------------------------


def test_events_published_while_collector_restarts_are_stored_once_in_order(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        cfg = make_config(tmp_path)
        async with running(cfg) as server:
            port, ca = server.port, server.ca
            ident = host_identity(ca, "h1")
            exp = exporter_for(tmp_path, port, ident)
            task = asyncio.create_task(exp.run())
            for i in range(4000):
                assert exp.submit(connect_event(i))
            await until(lambda: server.store.count("h1") >= 1000)
        # Collector down: events keep coming and wait in the spool.
        for i in range(4000, 7000):
            assert exp.submit(connect_event(i))
        await asyncio.sleep(0.3)
        async with running(replace(cfg, listen=f"127.0.0.1:{port}")) as server:
            for i in range(7000, 10_000):
                assert exp.submit(connect_event(i))
            await until(lambda: exp.spool.acked == 10_000)
            assert await exp.close(5)
            await task
        seqs = stored_sequences(cfg.db_path, "h1")
        assert seqs == list(range(1, 10_001))
        assert verifications(cfg.db_path, "h1") == {pb.VERIFICATION_VERIFIED}

    asyncio.run(body())


_CHILD = textwrap.dedent(
    """
    import asyncio, sys, time
    from pathlib import Path
    from sidecar.api.v1 import event_pb2 as ev
    from sidecar.export.enroll import load_host_identity
    from sidecar.export.exporter import Exporter, ExporterConfig

    async def main():
        ident = load_host_identity(Path(sys.argv[2]))
        exp = Exporter(ExporterConfig(target=sys.argv[1], spool_dir=Path(sys.argv[3]),
                       backoff_initial=0.05, backoff_max=0.2), lambda: ident, "boot-1")
        task = asyncio.create_task(exp.run())
        i = 0
        while True:
            exp.submit(ev.Event(time_ns=i, exit=ev.Exit(pid=i)))
            i += 1
            if i % 50 == 0:
                await asyncio.sleep(0.001)

    asyncio.run(main())
    """
)


def _write_identity(ca: CertificateAuthority, host: str, folder: Path) -> None:
    svid = ca.issue_x509_svid(f"spiffe://{TD}/host/{host}", timedelta(hours=1))
    folder.mkdir()
    (folder / "host.pem").write_bytes(svid.cert_chain_pem())
    (folder / "host.key").write_bytes(svid.key_pem())
    (folder / "bundle.pem").write_bytes(roots_pem(ca))


def test_exporter_killed_mid_stream_resumes_without_gap_or_duplicate(tmp_path: Path) -> None:
    async def body() -> None:
        cfg = make_config(tmp_path)
        async with running(cfg) as server:
            creds = tmp_path / "creds"
            _write_identity(server.ca, "h2", creds)
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            child = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    _CHILD,
                    f"127.0.0.1:{server.port}",
                    str(creds),
                    str(tmp_path / "spool"),
                ],
                env=env,
            )
            try:
                await until(lambda: server.store.count("h2") >= 2000)
            finally:
                child.send_signal(signal.SIGKILL)
                child.wait()
            from sidecar.export.enroll import load_host_identity

            exp = exporter_for(tmp_path, server.port, load_host_identity(creds))
            before = exp.spool.last_sequence
            assert before >= 2000
            task = asyncio.create_task(exp.run())
            for i in range(500):
                exp.submit(ev.Event(time_ns=i, exit=ev.Exit(pid=i)))
            await until(lambda: exp.spool.acked == before + 500)
            assert await exp.close(5)
            await task
        seqs = stored_sequences(cfg.db_path, "h2")
        assert seqs == list(range(1, before + 501))
        assert verifications(cfg.db_path, "h2") == {pb.VERIFICATION_VERIFIED}

    asyncio.run(body())


# ---- authentication and enrollment --------------------------------------------------


async def _query_code(
    port: int, ca: CertificateAuthority, client: tuple[bytes, bytes] | None
) -> grpc.StatusCode:
    async with channel(port, ca, client) as ch:
        try:
            await pbg.CollectorStub(ch).Query(pb.QueryRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def test_clients_without_a_valid_listed_svid_are_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with running(make_config(tmp_path)) as server:
            ca, port = server.ca, server.port
            other = CertificateAuthority.generate_root("other.org")
            hour = timedelta(hours=1)
            workload_ca = ca.issue_intermediate(hour)
            assert await _query_code(port, ca, svid_pair(ca, ALICE, hour)) == grpc.StatusCode.OK
            # No certificate, another trust domain, expired: the TLS handshake fails.
            assert await _query_code(port, ca, None) == grpc.StatusCode.UNAVAILABLE
            foreign = svid_pair(other, "spiffe://other.org/ops/alice", hour)
            assert await _query_code(port, ca, foreign) == grpc.StatusCode.UNAVAILABLE
            expired = svid_pair(ca, ALICE, timedelta(seconds=-5))
            assert await _query_code(port, ca, expired) == grpc.StatusCode.UNAVAILABLE
            # Valid, but not listed as a subscriber, or not signed by the root itself.
            bob = svid_pair(ca, "spiffe://example.org/ops/bob", hour)
            assert await _query_code(port, ca, bob) == grpc.StatusCode.PERMISSION_DENIED
            via_host = svid_pair(workload_ca, ALICE, hour)
            assert await _query_code(port, ca, via_host) == grpc.StatusCode.UNAUTHENTICATED

    asyncio.run(body())


def test_enrollment_gives_working_credentials_once_per_token(tmp_path: Path) -> None:
    from sidecar.collector.server import create_join_token, token_hash
    from sidecar.export.enroll import enroll, load_intermediate, renew
    from sidecar.util.errors import TransportError

    async def body() -> None:
        async with running(make_config(tmp_path)) as server:
            bundle = roots_pem(server.ca)
            target = f"127.0.0.1:{server.enrollment_port}"
            token = create_join_token(server.store, TD, "web-1", 60)
            ident = await enroll(target, token, bundle, tmp_path / "creds")
            assert ident.host == "web-1"
            with pytest.raises(TransportError, match="PERMISSION_DENIED"):
                await enroll(target, token, bundle, tmp_path / "again")
            server.store.add_join_token(token_hash("stale"), "web-2", time.time_ns() - 1)
            with pytest.raises(TransportError, match="unknown, used or expired"):
                await enroll(target, "stale", bundle, tmp_path / "stale")
            # The host intermediate signs workload SVIDs that chain to the root.
            inter = load_intermediate(tmp_path / "creds")
            workload = inter.issue_x509_svid("spiffe://example.org/agent/x", timedelta(hours=1))
            from sidecar.identity.x509 import verify_svid

            sid = verify_svid(workload.certificate, workload.chain, server.ca.bundle())
            assert str(sid) == "spiffe://example.org/agent/x"
            # The host SVID publishes, and renews over mTLS.
            exp = exporter_for(tmp_path, server.port, ident)
            task = asyncio.create_task(exp.run())
            exp.submit(connect_event(1))
            await until(lambda: exp.spool.acked == 1)
            await exp.close(2)
            await task
            renewed = await renew(f"127.0.0.1:{server.port}", tmp_path / "creds")
            assert renewed.cert_chain_pem != ident.cert_chain_pem
            assert renewed.host == "web-1"

    asyncio.run(body())


# ---- tamper evidence ------------------------------------------------------------------


async def _publish(
    port: int, ca: CertificateAuthority, ident: HostIdentity, batches: list[pb.Batch]
) -> list[int]:
    """Send batches on one stream; the acks received (the first is the opening ack)."""
    async with channel(port, ca, (ident.key_pem(), ident.cert_chain_pem)) as ch:
        call = pbg.CollectorStub(ch).Publish()  # type: ignore[call-arg]
        acks = [_ack(await call.read())]
        for b in batches:
            await call.write(b)
            acks.append(_ack(await call.read()))
        await call.done_writing()
        return acks


def _ack(msg: object) -> int:
    assert isinstance(msg, pb.Ack), f"stream ended: {msg!r}"
    return msg.acked_sequence


def _stored(msg: object) -> pb.StoredEvent:
    assert isinstance(msg, pb.StoredEvent), f"stream ended: {msg!r}"
    return msg


def _alerts(server: CollectorServer) -> list[ev.IntegrityAlert]:
    rows = server.store.query(pb.EventFilter(kinds=["integrity"]), 0, 100)
    return [r.event.integrity for r in rows]


def test_a_batch_failing_its_signature_is_quarantined_and_the_genuine_one_stored(
    tmp_path: Path,
) -> None:
    from sidecar.export.chain import CHAIN_SEED

    async def body() -> None:
        async with running(make_config(tmp_path)) as server:
            ident = host_identity(server.ca, "h3")
            good, head = signed_batch(ident, 1, CHAIN_SEED, [connect_event(i) for i in range(3)])
            genuine, head2 = signed_batch(ident, 4, head, [connect_event(i) for i in range(3, 6)])
            after, _ = signed_batch(ident, 7, head2, [connect_event(i) for i in range(6, 9)])
            bad = pb.Batch.FromString(genuine.SerializeToString())
            altered = ev.Event.FromString(bad.events[1])
            altered.connect.verdict = ev.VERDICT_ALLOW if altered.connect.verdict else 2  # type: ignore[assignment]
            altered.connect.address = "203.0.113.9"
            bad.events[1] = altered.SerializeToString()
            # The forged batch is not acknowledged: the chain stays at 3.
            assert await _publish(server.port, server.ca, ident, [good, bad]) == [0, 3, 3]
            alerts = _alerts(server)
            assert [(a.kind, a.first_sequence, a.last_sequence) for a in alerts] == [
                (ev.IntegrityAlert.KIND_BAD_SIGNATURE, 4, 6)
            ]
            (q,) = server.store.quarantined("h3")
            assert q[:3] == (4, 6, "bad_signature") and q[3] == bad
            # The genuine resend takes its place, and the next batch continues the chain.
            assert await _publish(server.port, server.ca, ident, [genuine, after]) == [3, 6, 9]
            rows = server.store.query(pb.EventFilter(hosts=["h3"], kinds=["connect"]), 0, 100)
            assert [r.verification for r in rows] == [pb.VERIFICATION_VERIFIED] * 9
            assert [r.event.connect.address for r in rows].count("203.0.113.9") == 0
            assert len(_alerts(server)) == 1  # no chain break after the forged batch

    asyncio.run(body())


def test_missing_sequence_range_and_broken_chain_are_reported(tmp_path: Path) -> None:
    from sidecar.export.chain import CHAIN_SEED

    async def body() -> None:
        async with running(make_config(tmp_path)) as server:
            ident = host_identity(server.ca, "h4")
            b1, h1 = signed_batch(ident, 1, CHAIN_SEED, [connect_event(i) for i in range(10)])
            _, h2 = signed_batch(ident, 11, h1, [connect_event(i) for i in range(10, 20)])
            b3, _ = signed_batch(ident, 21, h2, [connect_event(i) for i in range(20, 30)])
            # A batch that claims to follow 30 but was chained from somewhere else.
            b4, _ = signed_batch(ident, 31, bytes(32), [connect_event(30)])
            acks = await _publish(server.port, server.ca, ident, [b1, b3, b4])
            assert acks == [0, 10, 30, 31]
            got = [(a.kind, a.first_sequence, a.last_sequence) for a in _alerts(server)]
            assert got == [
                (ev.IntegrityAlert.KIND_GAP, 11, 20),
                (ev.IntegrityAlert.KIND_CHAIN_BREAK, 31, 31),
            ]
            assert verifications(server.config.db_path, "h4") == {
                pb.VERIFICATION_VERIFIED,
                pb.VERIFICATION_AFTER_GAP,
                pb.VERIFICATION_CHAIN_BREAK,
            }
            # A retried batch is acknowledged and stored once.
            assert await _publish(server.port, server.ca, ident, [b1]) == [31, 31]
            assert server.store.count("h4") == 21 + 2  # 21 events + 2 alerts
            # ... and the collector's metrics say exactly that.
            sample = server.core.metrics.registry.get_sample_value
            assert sample("sidecar_collector_events_stored_total", {"host": "h4"}) == 23
            assert sample("sidecar_collector_events_duplicate_total", {"host": "h4"}) == 10
            seen = sample("sidecar_collector_host_last_seen_timestamp_seconds", {"host": "h4"})
            assert seen is not None and time.time() - 60 < seen <= time.time()
            ingests = sample("sidecar_collector_ingest_seconds_count")
            assert ingests is not None and ingests >= 3  # one per batch, retries too
            for kind in ("gap", "chain_break"):
                got = sample("sidecar_collector_verification_failures_total", {"reason": kind})
                assert got == 1, kind

    asyncio.run(body())


# ---- subscribe and query ----------------------------------------------------------------


def _mixed_events() -> list[ev.Event]:
    out = []
    for i in range(60):
        if i % 3 == 0:
            e = ev.Event(
                time_ns=10_000 + i,
                identity="spiffe://example.org/agent/a",
                exec=ev.Exec(pid=i, exe="/bin/sh", verdict=ev.VERDICT_DENY),
            )
        elif i % 3 == 1:
            e = connect_event(i, ev.VERDICT_WOULD_DENY if i % 2 else ev.VERDICT_ALLOW)
            e.time_ns = 10_000 + i
        else:
            e = ev.Event(
                time_ns=10_000 + i,
                identity="spiffe://example.org/agent/b",
                policy_loaded=ev.PolicyLoaded(version=f"v{i}"),
            )
        out.append(e)
    return out


async def _collect(
    call: grpc.aio.UnaryStreamCall[pb.SubscribeRequest, pb.StoredEvent], n: int
) -> list[pb.StoredEvent]:
    out: list[pb.StoredEvent] = []
    while len(out) < n:
        out.append(_stored(await asyncio.wait_for(call.read(), 10)))
    return out


def test_subscribe_filters_return_exactly_the_matching_events_and_resume_after_cursor(
    tmp_path: Path,
) -> None:
    from sidecar.export.chain import CHAIN_SEED

    async def body() -> None:
        async with running(make_config(tmp_path)) as server:
            alice = svid_pair(server.ca, ALICE, timedelta(hours=1))
            h5, h6 = host_identity(server.ca, "h5"), host_identity(server.ca, "h6")
            events = _mixed_events()
            first_half, _ = signed_batch(h5, 1, CHAIN_SEED, events[:30])
            await _publish(server.port, server.ca, h5, [first_half])
            flt = pb.EventFilter(
                hosts=["h5"],
                kinds=["connect", "exec"],
                verdicts=[ev.VERDICT_DENY, ev.VERDICT_WOULD_DENY],
                start_time_ns=10_005,
                end_time_ns=10_050,
            )
            expected = [
                i + 1
                for i, e in enumerate(events)
                if e.WhichOneof("body") in ("connect", "exec")
                and (e.exec.verdict if e.HasField("exec") else e.connect.verdict) in (2, 3)
                and 10_005 <= e.time_ns <= 10_050
            ]
            async with channel(server.port, server.ca, alice) as ch:
                stub = pbg.CollectorStub(ch)
                call = stub.Subscribe(pb.SubscribeRequest(filter=flt, after_cursor=0))
                replayed = await _collect(call, len([s for s in expected if s <= 30]))
                # Live: the rest from h5, and h6's events that the filter must exclude.
                b6, _ = signed_batch(h6, 1, CHAIN_SEED, _mixed_events())
                rest, _ = signed_batch(h5, 31, _chain_head(first_half), events[30:])
                await _publish(server.port, server.ca, h6, [b6])
                await _publish(server.port, server.ca, h5, [rest])
                live = await _collect(call, len([s for s in expected if s > 30]))
                call.cancel()
                got = replayed + live
                assert [se.event.sequence for se in got] == expected
                assert all(se.event.host == "h5" for se in got)
                # Resume after the 4th: continues with the 5th, nothing skipped or repeated.
                cursor = got[3].cursor
                call = stub.Subscribe(pb.SubscribeRequest(filter=flt, after_cursor=cursor))
                resumed = await _collect(call, len(got) - 4)
                call.cancel()
                assert [se.cursor for se in resumed] == [se.cursor for se in got[4:]]
                page = await stub.Query(pb.QueryRequest(filter=flt, after_cursor=cursor, limit=3))
                assert [se.cursor for se in page.events] == [se.cursor for se in got[4:7]]
                assert page.more and page.next_cursor == got[6].cursor

    asyncio.run(body())


def _chain_head(batch: pb.Batch) -> bytes:
    from sidecar.export.chain import chain_over

    return chain_over(batch.prev_chain, batch.first_sequence, batch.events)[-1]


def test_slow_subscriber_is_disconnected_with_a_resume_cursor(tmp_path: Path) -> None:
    from sidecar.export.chain import CHAIN_SEED

    async def body() -> None:
        async with running(make_config(tmp_path, subscriber_buffer=10)) as server:
            alice = svid_pair(server.ca, ALICE, timedelta(hours=1))
            h = host_identity(server.ca, "h7")
            async with channel(server.port, server.ca, alice) as ch:
                call = pbg.CollectorStub(ch).Subscribe(pb.SubscribeRequest())
                await asyncio.sleep(0.2)  # let the subscription register; we do not read
                big = "x" * 2000
                prev = CHAIN_SEED
                for k in range(10):
                    evs = [ev.Event(time_ns=i, exec=ev.Exec(pid=i, exe=big)) for i in range(100)]
                    b, prev = signed_batch(h, 1 + 100 * k, prev, evs)
                    await _publish(server.port, server.ca, h, [b])
                received: list[pb.StoredEvent] = []
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    while True:
                        received.append(_stored(await asyncio.wait_for(call.read(), 10)))
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "resume with after_cursor=" in (info.value.details() or "")
                assert len(received) < 1000
                last = received[-1].cursor
                assert f"after_cursor={last}" in (info.value.details() or "")

    asyncio.run(body())


# ---- bad input ------------------------------------------------------------------------


def test_malformed_and_oversized_batches_are_refused_and_nothing_acked_is_lost(
    tmp_path: Path,
) -> None:
    from sidecar.export.chain import CHAIN_SEED

    async def body() -> None:
        cfg = make_config(tmp_path, max_message_bytes=64 * 1024)
        async with running(cfg) as server:
            h = host_identity(server.ca, "h8")
            good, _ = signed_batch(h, 1, CHAIN_SEED, [connect_event(i) for i in range(5)])
            assert await _publish(server.port, server.ca, h, [good]) == [0, 5]
            garbage = pb.Batch(
                host="h8",
                first_sequence=6,
                last_sequence=6,
                prev_chain=bytes(32),
                events=[b"\xff\xff\xff"],
                signature=b"",
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _publish(server.port, server.ca, h, [garbage])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "cannot be decoded" in (info.value.details() or "")
            other, _ = signed_batch(
                host_identity(server.ca, "h9"), 6, CHAIN_SEED, [connect_event(1)]
            )
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _publish(server.port, server.ca, h, [other])
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            # Bytes that are no Batch at all.
            async with channel(server.port, server.ca, (h.key_pem(), h.cert_chain_pem)) as ch:
                raw = ch.stream_stream(
                    "/sidecar.api.v1.Collector/Publish",
                    request_serializer=lambda b: b,
                    response_deserializer=pb.Ack.FromString,
                )
                call = raw()
                assert _ack(await call.read()) == 5
                await call.write(b"\xff\xff\xff\xff not a protobuf")
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await call.read()
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            huge = [ev.Event(time_ns=1, exec=ev.Exec(exe="y" * 100_000))]
            big, _ = signed_batch(h, 6, CHAIN_SEED, huge)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await _publish(server.port, server.ca, h, [big])
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert stored_sequences(cfg.db_path, "h8") == [1, 2, 3, 4, 5]

    asyncio.run(body())


def test_unknown_enum_values_are_stored_and_filterable(tmp_path: Path) -> None:
    from sidecar.export.chain import CHAIN_SEED

    async def body() -> None:
        async with running(make_config(tmp_path)) as server:
            h = host_identity(server.ca, "h10")
            e = connect_event(1, verdict=42)
            b, _ = signed_batch(h, 1, CHAIN_SEED, [e, connect_event(2)])
            assert await _publish(server.port, server.ca, h, [b]) == [0, 2]
            rows = server.store.query(pb.EventFilter(verdicts=[42]), 0, 10)  # type: ignore[list-item]
            assert [r.event.sequence for r in rows] == [1]
            assert rows[0].event.connect.verdict == 42

    asyncio.run(body())


def test_exporter_stops_on_a_non_retryable_refusal(tmp_path: Path) -> None:
    from sidecar.util.errors import TransportError

    async def body() -> None:
        async with running(make_config(tmp_path)) as server:
            # A valid SVID of the trust domain that is not a host may not publish.
            svid = server.ca.issue_x509_svid(ALICE, timedelta(hours=1))
            ident = HostIdentity(
                "alice", svid.cert_chain_pem(), svid.private_key, roots_pem(server.ca)
            )
            exp = exporter_for(tmp_path, server.port, ident)
            exp.submit(connect_event(1))
            with pytest.raises(TransportError, match="PERMISSION_DENIED"):
                await asyncio.wait_for(exp.run(), 10)
            assert server.store.count() == 0

    asyncio.run(body())


def test_a_host_whose_certificate_the_collector_refuses_says_why(tmp_path: Path) -> None:
    async def body() -> None:
        async with running(make_config(tmp_path)) as server:
            # Expired a second after it was issued: the handshake is refused, which the
            # client only sees as a closed socket.
            svid = server.ca.issue_x509_svid(f"spiffe://{TD}/host/late", timedelta(seconds=1))
            ident = HostIdentity(
                "late", svid.cert_chain_pem(), svid.private_key, roots_pem(server.ca)
            )
            await asyncio.sleep(1.5)
            assert ident.problem() is not None and "expired" in ident.problem()  # type: ignore[operator]
            exp = exporter_for(tmp_path, server.port, ident)
            exp.submit(connect_event(1))
            task = asyncio.create_task(exp.run())
            for _ in range(100):
                if exp.last_error is not None:
                    break
                await asyncio.sleep(0.05)
            assert exp.last_error is not None and "expired" in exp.last_error
            assert not exp.connected
            await exp.close(timeout=0.5)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            assert server.store.count() == 0
            # A host whose certificate is fine has nothing to report.
            assert host_identity(server.ca, "fine").problem() is None

    asyncio.run(body())


def test_credentials_with_a_cliff_are_renewed_and_rotated_with_no_gap_in_streaming(
    tmp_path: Path,
) -> None:
    """Host SVID, intermediate and the collector's own certificate live 4 s; stream for 13 s."""
    from sidecar.collector.server import create_join_token
    from sidecar.export.enroll import Renewer, credential_expiry, enroll, load_host_identity

    async def body() -> None:
        cfg = make_config(tmp_path, host_svid_ttl_s=4, intermediate_ttl_s=4, server_cert_ttl_s=4)
        async with running(cfg) as server:
            creds = tmp_path / "creds"
            token = create_join_token(server.store, TD, "web-1", 60)
            await enroll(f"127.0.0.1:{server.enrollment_port}", token, roots_pem(server.ca), creds)
            first_expiry = credential_expiry(creds)["host_svid"]
            renewed: list[str] = []
            renewer = Renewer(
                f"127.0.0.1:{server.port}", creds, None, lambda ident: renewed.append(ident.host)
            )
            cfg_exp = ExporterConfig(
                target=f"127.0.0.1:{server.port}",
                spool_dir=tmp_path / "spool",
                backoff_initial=0.05,
                backoff_max=0.2,
            )
            # The exporter loads the credentials from disk for each stream, as the daemon's does.
            exp = Exporter(cfg_exp, lambda: load_host_identity(creds), boot_id="boot-1")
            tasks = [asyncio.create_task(exp.run()), asyncio.create_task(renewer.run())]
            sent = 0
            try:
                deadline = time.monotonic() + 13
                while time.monotonic() < deadline:
                    exp.submit(connect_event(sent))
                    sent += 1
                    await asyncio.sleep(0.05)
                assert await exp.close(timeout=10), "events left unacknowledged"
            finally:
                for t in tasks:
                    t.cancel()
                for t in tasks:
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await t
            assert len(renewed) >= 3, renewed  # renewed at half-life, again and again
            assert renewer.last_error is None
            assert credential_expiry(creds)["host_svid"] > first_expiry  # type: ignore[operator]
            assert server.cert_rotations >= 4  # the collector's certificate too
            # Every event stored once, in order, across every renewal and rotation.
            assert stored_sequences(cfg.db_path, "web-1") == list(range(1, sent + 1))

    asyncio.run(body())


def test_with_a_small_spool_and_the_collector_down_stored_plus_reported_lost_is_everything(
    tmp_path: Path,
) -> None:
    """The collector goes away mid-stream; the spool's cap removes what does not fit."""

    async def body() -> None:
        cfg = make_config(tmp_path)
        total = 0
        server = CollectorServer(cfg)
        await server.start()
        port, ca = server.port, server.ca
        ident = host_identity(ca, "h-cap")
        exp = exporter_for(tmp_path, port, ident, spool_max_bytes=256 * 1024)
        task = asyncio.create_task(exp.run())
        try:
            for _ in range(3000):
                assert exp.submit(connect_event(total))
                total += 1
                if total % 100 == 0:
                    await asyncio.sleep(0.01)
            await until(lambda: server.store.count("h-cap") >= 500)
            await server.stop(0.2)
            for _ in range(6000):  # collector gone: the spool overflows its cap
                assert exp.submit(connect_event(total))
                total += 1
                if total % 200 == 0:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)
            server = CollectorServer(replace(cfg, listen=f"127.0.0.1:{port}"))
            await server.start()
            for _ in range(1000):
                assert exp.submit(connect_event(total))
                total += 1
            await until(lambda: exp.spool.pending() == 0 and exp.spool.acked > 0, timeout=60)
            assert await exp.close(5)
            flt = pb.EventFilter(hosts=["h-cap"], kinds=["connect"])
            stored = server.store.query(flt, 0, 100_000)
            reports = server.store.query(pb.EventFilter(hosts=["h-cap"], kinds=["lost"]), 0, 1000)
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 10)
            await server.stop(0.2)
        lost = sum(c.count for r in reports for c in r.event.lost.counts if c.kind == "connect")
        assert lost > 0  # the cap did remove events
        assert len(stored) + lost == total

    asyncio.run(body())
