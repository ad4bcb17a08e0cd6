"""A fleet simulator: hundreds of simulated hosts streaming to collector replicas at once.

Each host is a :class:`~sidecar.testing.hosts.SimulatedHost`: its own host SVID
(issued by the collector's CA directly, not through a join token: enrolling
hundreds of hosts would only measure enrollment), its own boot, sequence and
signed hash chain.  All batches are signed before the run starts, so the
run measures the collectors, not the signing.

Each host streams its batches on one Publish stream, one batch in flight, and
waits for each ack.  When the stream breaks (the replica was killed, or is not
there yet) the host moves to the next replica and, like the daemon's exporter,
resumes from what that replica's opening ack says is stored: it drops every
batch the ack covers and resends the rest.

:class:`CollectorProcess` runs ``sidecar collector`` as a process of its own,
as deployed, so that a test can SIGKILL it and a benchmark can read its CPU time.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import collector_pb2_grpc as pbg
from sidecar.api.v1 import event_pb2 as ev
from sidecar.identity.x509 import CertificateAuthority
from sidecar.testing.hosts import SimulatedHost, channel, host_identity

#: Codes with which a Publish stream breaks when its replica goes away.
BROKEN = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.DEADLINE_EXCEEDED,
    }
)
RETRY_PAUSE_S = 0.05  # after a whole round of replicas failed


def fleet_event(host: int, k: int, identities: int = 50) -> ev.Event:
    """A connect event of one of ``identities`` agents (spread over hosts), one of 4 instances."""
    ident = (host * 7 + k) % identities
    return ev.Event(
        time_ns=time.time_ns(),
        identity=f"spiffe://fleet.test/agent/a{ident}",
        process=ev.ProcessInstance(pid=1000 + k % 500, instance_id=f"h{host}-i{k % 4}"),
        connect=ev.Connect(
            pid=1000 + k % 500,
            family=ev.ADDRESS_FAMILY_INET,
            protocol=ev.PROTOCOL_TCP,
            address="192.0.2.1",
            port=443,
            verdict=ev.VERDICT_ALLOW,
            rule="default",
        ),
    )


class StreamBroken(Exception):
    """The Publish stream ended or failed before acknowledging."""


@dataclass
class FleetResult:
    events: int  # events acknowledged (each host's last ack, summed)
    elapsed_s: float
    latencies_s: list[float]  # submit-to-ack of each acknowledged batch
    failovers: int  # streams that broke, after which the host moved to another replica
    resent_batches: int  # batches sent again after a failover (the ack did not cover them)
    per_host_acked: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.events / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, q: float) -> float:
        xs = sorted(self.latencies_s)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else 0.0


class Fleet:
    """``hosts`` simulated hosts of the CA's trust domain, each with its batches signed ahead."""

    def __init__(
        self,
        ca: CertificateAuthority,
        hosts: int,
        batches: int,
        events_per_batch: int,
        prefix: str = "fleet",
        boot: str = "boot-1",
    ) -> None:
        self.ca = ca
        self.sims = [
            SimulatedHost(host_identity(ca, f"{prefix}-{i:04d}"), boot_id=boot)
            for i in range(hosts)
        ]
        for i, sim in enumerate(self.sims):
            for b in range(batches):
                sim.batch(
                    [fleet_event(i, b * events_per_batch + j) for j in range(events_per_batch)]
                )
        self.pending: list[deque[pb.Batch]] = []
        self.rearm()
        self.total_events = hosts * batches * events_per_batch

    def rearm(self) -> None:
        """Queue every host's batches again, to send the same load to another store."""
        self.pending = [deque(sim.sent) for sim in self.sims]
        self.acked = 0  # events acknowledged so far, across hosts (a progress gauge)

    async def run(self, ports: Sequence[int], timeout_s: float = 120.0) -> FleetResult:
        """Stream every host's batches to ``ports`` (host i starts at replica i mod n)."""
        result = FleetResult(0, 0.0, [], 0, 0)
        began = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(self._drive(i, ports, result) for i in range(len(self.sims)))),
            timeout_s,
        )
        result.elapsed_s = time.perf_counter() - began
        result.events = sum(result.per_host_acked.values())
        return result

    async def _drive(self, i: int, ports: Sequence[int], result: FleetResult) -> None:
        sim, pending = self.sims[i], self.pending[i]
        creds = (sim.ident.key_pem(), sim.ident.cert_chain_pem)
        replica, tried, broke = i % len(ports), 0, False
        acked = 0
        while pending:
            try:
                async with channel(ports[replica], self.ca, creds) as ch:
                    call = pbg.CollectorStub(ch).Publish()  # type: ignore[call-arg]
                    ack = await _read_ack(call)
                    self._advance(ack - acked)
                    acked = max(acked, ack)
                    while pending and pending[0].last_sequence <= ack:
                        pending.popleft()
                    if broke:
                        result.resent_batches += len(pending)
                        broke = False
                    tried = 0
                    while pending:
                        batch = pending[0]
                        sent = time.perf_counter()
                        await call.write(batch)
                        ack = await _read_ack(call)
                        result.latencies_s.append(time.perf_counter() - sent)
                        if ack < batch.last_sequence:
                            raise AssertionError(
                                f"{sim.name}: batch {batch.first_sequence}..{batch.last_sequence}"
                                f" acknowledged only up to {ack}"
                            )
                        self._advance(ack - acked)
                        acked = ack
                        while pending and pending[0].last_sequence <= ack:
                            pending.popleft()
                    await call.done_writing()
            except (grpc.aio.AioRpcError, StreamBroken) as exc:
                if isinstance(exc, grpc.aio.AioRpcError) and exc.code() not in BROKEN:
                    raise
                result.failovers += 1
                broke = True
                replica = (replica + 1) % len(ports)
                tried += 1
                if tried >= len(ports):
                    tried = 0
                    await asyncio.sleep(RETRY_PAUSE_S)
        result.per_host_acked[sim.name] = acked

    def _advance(self, n: int) -> None:
        if n > 0:
            self.acked += n


async def _read_ack(call: grpc.aio.StreamStreamCall) -> int:  # type: ignore[type-arg]
    msg = await call.read()
    if not isinstance(msg, pb.Ack):
        raise StreamBroken(f"the Publish stream ended instead of acknowledging: {msg!r}")
    return msg.acked_sequence


# ---- collectors as processes -----------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def postgres_uri(dsn: str) -> str:
    """A libpq key=value DSN as the ``postgresql://`` URI a collector config takes."""
    import psycopg

    p = psycopg.conninfo.conninfo_to_dict(dsn)
    return f"postgresql:///{p['dbname']}?host={p['host']}&port={p['port']}&user={p['user']}"


class CollectorProcess:
    """One ``sidecar collector`` process with its own config and data folder.

    All replicas made with the same ``ca_from`` folder share that root CA (a copy each).
    """

    def __init__(
        self,
        folder: Path,
        name: str,
        trust_domain: str,
        ca_from: Path,
        store: str = "sqlite",
        subscribers: Sequence[str] = (),
        extra: str = "",
    ) -> None:
        self.name = name
        self.port, self.enrollment_port = free_port(), free_port()
        data = folder / name
        data.mkdir(mode=0o700)
        shutil.copytree(ca_from, data / "ca")
        self.config = folder / f"{name}.yaml"
        subs = "".join(f"\n  - {s}" for s in subscribers)
        self.config.write_text(
            f"apiVersion: sidecar/v1\nkind: CollectorConfig\ntrustDomain: {trust_domain}\n"
            f"dataDir: {name}\nlisten: 127.0.0.1:{self.port}\n"
            f"enrollmentListen: 127.0.0.1:{self.enrollment_port}\nmetrics: ''\n"
            f"store: '{store}'\nshutdownGraceSeconds: 1\n"
            + (f"subscribers:{subs}\n" if subs else "")
            + extra
        )
        self.log = folder / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 30.0) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        cmd = [sys.executable, "-m", "sidecar.cli", "collector", "--config", str(self.config)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
        deadline = time.monotonic() + timeout_s
        while True:
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), 0.2),
            ):
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"collector {self.name} did not listen on {self.port}:"
                    f" {self.log.read_text()[-2000:]}"
                )
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def cpu_seconds(self) -> float:
        """User + system CPU time of the running process so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def kill(self) -> None:
        """SIGKILL: no goodbye to the hosts, no commit of what is in flight."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        """SIGTERM and wait; the exit code (killed after 15 s)."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return -9
