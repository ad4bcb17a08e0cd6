"""A host fails over between collector replicas on one PostgreSQL database.

Real processes: two ``sidecar collector`` replicas share a throwaway
PostgreSQL database and one CA; the host's exporter (in this process, with
its real spool) is given both addresses.  The replica it streams to is
killed with SIGKILL mid-run: the exporter moves to the other, resumes from
what the database holds, and every event is stored exactly once on one
verified chain.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import event_pb2 as ev
from sidecar.export.chain import CHAIN_SEED, chain_over
from sidecar.export.enroll import Renewer, enroll, load_host_identity
from sidecar.export.exporter import Exporter, ExporterConfig, HostIdentity
from sidecar.testing.scratch import free_port
from sidecar.testing.stack import wait_port

TD = "example.org"


@dataclass
class Replicas:
    procs: list[subprocess.Popen[bytes]]
    mtls: list[str]  # host:port of each replica's mTLS port
    enrollment: list[str]
    token: str
    bundle: bytes


@contextmanager
def collector_processes(tmp_path: Path, pg_dsn: str, n: int) -> Iterator[Replicas]:
    """``n`` ``sidecar collector`` processes on ``pg_dsn`` with one CA, and a join token."""
    params = psycopg.conninfo.conninfo_to_dict(pg_dsn)
    uri = (
        f"postgresql:///{params['dbname']}?host={params['host']}&port={params['port']}"
        f"&user={params['user']}"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    ports = [(free_port(), free_port()) for _ in range(n)]
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
    for i in range(1, n):
        shutil.copytree(tmp_path / "r0" / "ca", tmp_path / f"r{i}" / "ca")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, cfg in enumerate(configs):
            with (tmp_path / f"r{i}.log").open("wb") as out:
                procs.append(subprocess.Popen([*cli, str(cfg)], env=env, stdout=out, stderr=out))
        for i, (mtls, enr) in enumerate(ports):
            wait_port(mtls, procs[i], tmp_path / f"r{i}.log")
            wait_port(enr, procs[i], tmp_path / f"r{i}.log")
        yield Replicas(
            procs,
            [f"127.0.0.1:{m}" for m, _ in ports],
            [f"127.0.0.1:{e}" for _, e in ports],
            token,
            (tmp_path / "r0" / "ca" / "ca.pem").read_bytes(),
        )
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _event(i: int) -> ev.Event:
    return ev.Event(
        time_ns=1_000_000 + i,
        identity="spiffe://example.org/agent/a",
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


async def _until(cond: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout}s: {what}")
        await asyncio.sleep(0.02)


@pytest.mark.parametrize("fault", ["killed", "frozen"])
def test_a_host_fails_over_to_the_other_replica_when_its_replica_is_killed_or_frozen(
    tmp_path: Path, pg_dsn: str, caplog: pytest.LogCaptureFixture, fault: str
) -> None:
    """SIGKILL closes the replica's socket; SIGSTOP leaves it open and silent, which
    only the exporter's ack timeout notices."""
    total, kill_after = 3000, 600
    caplog.set_level(logging.INFO, logger="sidecar.export.exporter")
    with collector_processes(tmp_path, pg_dsn, 2) as reps:

        async def body() -> tuple[Exporter, HostIdentity]:
            ident = await enroll(reps.enrollment[1], reps.token, reps.bundle, tmp_path / "host")
            exp = Exporter(
                ExporterConfig(
                    target=tuple(reps.mtls),
                    spool_dir=tmp_path / "spool",
                    batch_max_events=50,
                    backoff_initial=0.05,
                    backoff_max=0.5,
                    ack_timeout=2.0,
                ),
                lambda: ident,
                boot_id="boot-1",
            )
            runner = asyncio.create_task(exp.run())
            submitted = 0
            killed = False
            try:
                while submitted < total:
                    for _ in range(50):
                        submitted += 1
                        assert exp.submit(_event(submitted))
                    await asyncio.sleep(0.01)
                    if not killed and exp.spool.acked >= kill_after:
                        # Mid-run: the replica it streams to dies, or freezes, without a word.
                        assert exp.connected and exp.address == reps.mtls[0]
                        if fault == "killed":
                            reps.procs[0].send_signal(signal.SIGKILL)
                            reps.procs[0].wait(10)
                        else:
                            reps.procs[0].send_signal(signal.SIGSTOP)
                        killed = True
                assert killed, "the run ended before the kill"
                await _until(
                    lambda: exp.spool.acked == total, 30, f"all {total} acked: {exp.spool.acked}"
                )
                assert exp.address == reps.mtls[1] and exp.connected
                assert exp.failovers >= 1
            finally:
                if fault == "frozen":
                    reps.procs[0].send_signal(signal.SIGCONT)
                assert await exp.close(timeout=5)
                await runner
            return exp, ident

        exp, ident = asyncio.run(body())
    with psycopg.connect(pg_dsn) as conn:
        rows = conn.execute(
            "SELECT seq, verification, data FROM events WHERE host = %s AND seq IS NOT NULL"
            " ORDER BY seq",
            (ident.host,),
        ).fetchall()
        integrity = conn.execute("SELECT count(*) FROM events WHERE kind = 'integrity'").fetchone()
    # Every event exactly once, every one verified, no integrity alert, and the stored
    # bytes re-chain to the host's own head.
    assert [int(r[0]) for r in rows] == list(range(1, total + 1))
    assert {int(r[1]) for r in rows} == {pb.VERIFICATION_VERIFIED}
    assert integrity == (0,)
    assert chain_over(CHAIN_SEED, 1, [bytes(r[2]) for r in rows])[-1] == exp.spool.acked_chain
    # The log says which replica it streamed to, before and after.
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"streaming to {reps.mtls[0]} from sequence 1 ") for m in said)
    assert any(f"failing over to {reps.mtls[1]}" in m for m in said)
    assert any(m.startswith(f"streaming to {reps.mtls[1]} from sequence ") for m in said)


def test_host_renewal_tries_the_next_replica_when_one_is_down(tmp_path: Path, pg_dsn: str) -> None:
    with collector_processes(tmp_path, pg_dsn, 2) as reps:
        reps.procs[0].send_signal(signal.SIGKILL)
        reps.procs[0].wait(10)

        cred = tmp_path / "host"
        asyncio.run(enroll(reps.enrollment[1], reps.token, reps.bundle, cred))
        before = load_host_identity(cred).cert_chain_pem

        async def body() -> tuple[Renewer, list[HostIdentity]]:
            renewed: list[HostIdentity] = []
            renewer = Renewer(tuple(reps.mtls), cred, None, renewed.append)
            # Due now (a fresh SVID is due at half-life): renew once, then stop.
            renewer._seconds_until_due = lambda: 0.0 if not renewed else 3600.0  # type: ignore[method-assign]
            task = asyncio.create_task(renewer.run())
            try:
                await _until(lambda: bool(renewed), 20, "a renewal")
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            return renewer, renewed

        renewer, renewed = asyncio.run(body())
    assert renewer.renewals == 1 and renewer.target == reps.mtls[1]
    assert renewed[0].cert_chain_pem != before
    assert renewer.last_error is None
