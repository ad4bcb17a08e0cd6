"""Exporter -> collector over real mTLS gRPC on loopback, with a real SQLite store."""

from __future__ import annotations

import asyncio
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

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import event_pb2 as ev
from sidecar.collector.config import CollectorConfig
from sidecar.collector.server import CollectorServer
from sidecar.collector.tls import roots_pem
from sidecar.export.exporter import Exporter, ExporterConfig, HostIdentity
from sidecar.identity.x509 import CertificateAuthority
from sidecar.spiffeid import parse_spiffe_id

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


def host_identity(ca: CertificateAuthority, host: str) -> HostIdentity:
    svid = ca.issue_x509_svid(f"spiffe://{TD}/host/{host}", timedelta(hours=1))
    return HostIdentity(host, svid.cert_chain_pem(), svid.private_key, roots_pem(ca))


def channel(
    port: int, ca: CertificateAuthority, client: tuple[bytes, bytes] | None
) -> grpc.aio.Channel:
    key, chain = client if client else (None, None)
    creds = grpc.ssl_channel_credentials(roots_pem(ca), key, chain)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


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
    from sidecar.collector.enroll import load_host_identity
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
            from sidecar.collector.enroll import load_host_identity

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
