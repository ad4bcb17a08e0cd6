"""Exporter -> collector over mTLS on loopback: throughput and submit-to-stored latency.

The collector runs in a process of its own, as deployed; this process plays the
host's exporter.  Baseline, measured in the same run: the raw SQLite ingest rate of the collector's
store (same schema, same batch size, same durability), with no network, TLS, spool
or verification.  The ratio says what the pipeline costs on top of the database.

Plain script: prints figures, asserts nothing about time.
    python benchmarks/bench_collector.py [--events N]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import event_pb2 as ev
from sidecar.collector.sqlite_store import SqliteStore
from sidecar.collector.store import NewEvent
from sidecar.collector.tls import roots_pem
from sidecar.export.exporter import Exporter, ExporterConfig, HostIdentity
from sidecar.identity.x509 import CertificateAuthority

REPO = Path(__file__).resolve().parents[1]

BATCH = ExporterConfig.batch_max_events  # what the daemon sends


def _event(i: int) -> ev.Event:
    return ev.Event(
        host="bench",
        boot_id="b",
        time_ns=time.time_ns(),
        identity="spiffe://bench.local/agent/a",
        connect=ev.Connect(
            pid=1000 + i % 100,
            family=ev.ADDRESS_FAMILY_INET,
            protocol=ev.PROTOCOL_TCP,
            address="192.0.2.1",
            port=443,
            verdict=ev.VERDICT_ALLOW,
            rule="default",
        ),
    )


def baseline(folder: Path, n: int) -> float:
    """Events/s of Store.ingest alone, in batches like the exporter sends."""
    store = SqliteStore(folder / "baseline.db")
    rows = []
    for i in range(n):
        e = _event(i)
        e.sequence = i + 1
        rows.append(NewEvent(e, e.SerializeToString(), pb.VERIFICATION_VERIFIED))
    start = time.perf_counter()
    for k in range(0, n, BATCH):
        store.ingest("bench", rows[k : k + BATCH], None)
    elapsed = time.perf_counter() - start
    store.close()
    return n / elapsed


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def pipeline(
    folder: Path, n: int, latency_samples: int
) -> tuple[float, list[float], float, float]:
    """The collector in a process of its own (as deployed); this process is the host."""
    data = folder / "collector"
    data.mkdir(mode=0o700)
    ca = CertificateAuthority.load_or_generate(data / "ca", "bench.local")  # the collector's root
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    (folder / "collector.yaml").write_text(
        "apiVersion: sidecar/v1\nkind: CollectorConfig\ntrustDomain: bench.local\n"
        f"dataDir: {data}\nlisten: 127.0.0.1:{port}\nenrollmentListen: null\nmetrics: ''\n"
    )
    collector = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar.cli",
            "collector",
            "--config",
            str(folder / "collector.yaml"),
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            if time.monotonic() > deadline or collector.poll() is not None:
                raise SystemExit("the collector did not start")
            await asyncio.sleep(0.1)
        svid = ca.issue_x509_svid("spiffe://bench.local/host/bench", timedelta(hours=1))
        ident = HostIdentity("bench", svid.cert_chain_pem(), svid.private_key, roots_pem(ca))
        exp = Exporter(
            ExporterConfig(
                target=f"127.0.0.1:{port}",
                spool_dir=folder / "spool",
                queue_size=n + latency_samples + 10,
                batch_max_events=BATCH,
            ),
            lambda: ident,
        )
        task = asyncio.create_task(exp.run())
        # Throughput: a burst of n events, timed until the collector acknowledged all
        # (an ack names the highest sequence durably stored).
        # CPU of each side over the burst: this process (the events' making
        # included, as in the daemon) and the collector's.
        cpu0 = (_cpu_seconds(os.getpid()), _cpu_seconds(collector.pid))
        start = time.perf_counter()
        for i in range(n):
            exp.submit(_event(i))
        while exp.spool.acked < n:
            await asyncio.sleep(0.005)
        rate = n / (time.perf_counter() - start)
        host_cpu = _cpu_seconds(os.getpid()) - cpu0[0]
        collector_cpu = _cpu_seconds(collector.pid) - cpu0[1]
        # Latency: one event at a time, from submit to the ack of its stored row.
        latencies = []
        for i in range(latency_samples):
            t0 = time.perf_counter()
            exp.submit(_event(i))
            while exp.spool.acked < n + i + 1:
                await asyncio.sleep(0.0005)
            latencies.append(time.perf_counter() - t0)
        await exp.close(5)
        await task
    finally:
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
    return rate, latencies, host_cpu / n, collector_cpu / n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--latency-samples", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        base = baseline(folder, args.events)
        rate, lat, host_cpu, collector_cpu = asyncio.run(
            pipeline(folder, args.events, args.latency_samples)
        )
    lat_ms = sorted(x * 1000 for x in lat)
    p50 = statistics.median(lat_ms)
    p99 = lat_ms[min(len(lat_ms) - 1, int(len(lat_ms) * 0.99))]
    print(f"baseline  SQLite ingest (store only):  {base:10.0f} events/s")
    print(f"pipeline  exporter -> collector mTLS:  {rate:10.0f} events/s")
    print(f"ratio     pipeline / baseline:         {rate / base:10.2f}")
    print(f"latency   submit -> ack of stored row:        p50 {p50:.2f} ms   p99 {p99:.2f} ms")
    print(
        f"cpu       per event, burst:  host (exporter) {host_cpu * 1e6:.1f} us"
        f"   collector {collector_cpu * 1e6:.1f} us"
    )


if __name__ == "__main__":
    main()
