"""Attestation latency: from the kernel's exec record to the identity in the kernel map.

The daemon runs in this process on a scratch cgroup with one registration
entry (uid + sha256 of a copied binary).  The registered binary is exec'd
N times at a steady rate (warm hash cache after the first); the daemon
records, for each, the time from the exec tracepoint (bpf_ktime_get_ns) to
the moment it wrote the identity into the kernel map.  The baseline in the
same run is the daemon's handling of the same execs' records without
attestation (no entries): the cost attestation adds on top.

Usage: benchmarks/bench_attest.py [--execs 1000] [--rate 200]
Needs root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sidecar.daemon.config import DaemonConfig  # noqa: E402
from sidecar.daemon.core import Daemon  # noqa: E402
from sidecar.daemon.outputs import NullSink  # noqa: E402
from sidecar.testing.inprocess import inprocess_config, run_daemon_with  # noqa: E402
from sidecar.testing.scratch import Scratch  # noqa: E402

LOAD = r"""
import os, subprocess, sys, time
procs, binary, execs, rate = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
fd = os.open(procs, os.O_WRONLY); os.write(fd, b"0"); os.close(fd)  # the tools start in scope
children, start = [], time.monotonic()
for i in range(execs):
    due = start + i / rate
    if due > time.monotonic():
        time.sleep(due - time.monotonic())
    children.append(subprocess.Popen([binary, "0.2"]))
for c in children:
    c.wait(30)
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(
    cfg: DaemonConfig, binary: Path, cgroup: Path, execs: int, rate: float
) -> tuple[list[int], Daemon]:
    with run_daemon_with(cfg, NullSink()) as running:
        # The load comes from a process of its own, as it would in production: the
        # daemon's process holds only the daemon.
        procs = str(cgroup / "cgroup.procs")
        subprocess.run(
            [sys.executable, "-c", LOAD, procs, str(binary), str(execs), str(rate)], check=True
        )
        time.sleep(1.0)
    d = running.daemon
    return list(d.settler.latency_ns) if d.settler is not None else [], d


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--execs", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    scratch = Scratch.create("sidecar-bench-")
    cgroup, tmp = scratch.cgroup, scratch.work
    try:
        binary = tmp / "registered-agent"
        shutil.copy2("/bin/sleep", binary)
        digest = hashlib.sha256(binary.read_bytes()).hexdigest()
        entries = tmp / "entries.yaml"
        entries.write_text(
            "apiVersion: sidecar/v1\nkind: RegistrationEntries\ntrustDomain: example.org\n"
            "entries:\n  - spiffeId: spiffe://example.org/bench/agent\n"
            f"    selectors: [unix:uid:0, 'unix:sha256:{digest}']\n"
        )
        cfg = inprocess_config(
            cgroup,
            scratch.pin_dir,
            tmp,
            entries=entries,
            admin_socket=None,
            workload_socket=None,
        )
        latencies, d = run(cfg, binary, cgroup, args.execs, args.rate)
        attested = d.counts.get("credential_issued", 0)
    finally:
        scratch.remove()
    ms = [v / 1e6 for v in latencies]
    figures = {
        "execs": args.execs,
        "rate_per_s": args.rate,
        "attested": len(ms),
        "credentials_issued": attested,
        "latency_ms_p50": round(statistics.median(ms), 3) if ms else None,
        "latency_ms_p99": round(percentile(ms, 0.99), 3) if ms else None,
        "latency_ms_max": round(max(ms), 3) if ms else None,
    }
    print("attestation latency, exec record to identity in the kernel map (bench_attest)")
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
