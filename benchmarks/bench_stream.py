"""What streaming costs the daemon: attested, enforced exec load sent to a collector.

A collector and a daemon run as separate processes (the harness of the soak,
without its faults).  A driver starts ``/usr/bin/true`` at a steady rate in a
scratch cgroup where every process is attested and held to an enforcing
policy; every event goes to the local output and streams to the collector.
The daemon's CPU share is read from /proc over the middle of the load.
Baseline, in the same run: the same daemon, connected, with no load.

    sudo .venv/bin/python benchmarks/bench_stream.py [--seconds 30] [--rate 200]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_pipeline import cpu_seconds

from sidecar.proc.cgroups import DANGEROUS_CAPS, launch_argv
from sidecar.testing import soak
from sidecar.testing.scratch import Scratch
from sidecar.testing.stack import Stack


def share(pid: int, seconds: float) -> float:
    cpu0, t0 = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=200.0, help="execs per second")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_stream: needs root (BPF programs, cgroups)", file=sys.stderr)
        return 2
    stack = Stack(Scratch.create("sidecar-stream-"), host="stream-host")
    try:
        stack.start_collector()
        stack.enroll()
        entries, policy = soak.config(stack)
        stack.write_daemon_config(entries, policy)
        stack.start_daemon()
        assert stack.daemon is not None
        pid = stack.daemon.pid
        time.sleep(2.0)
        idle = share(pid, min(10.0, args.seconds / 3))
        count_file = stack.work / "driver.count"
        driver = subprocess.Popen(
            launch_argv(
                [
                    sys.executable,
                    "-c",
                    soak.DRIVER,
                    str(args.rate),
                    str(args.seconds),
                    str(count_file),
                    soak.TRUE,
                ],
                cgroup=stack.cgroup,
                drop_caps=DANGEROUS_CAPS,
            ),
            env=stack.env,
        )
        stack.procs.append(driver)
        time.sleep(args.seconds * 0.2)
        loaded = share(pid, args.seconds * 0.6)
        driver.wait(args.seconds + 60)
        made = int(count_file.read_text())
        deadline = time.monotonic() + 60
        while len(stack.stored("exec")) < made and time.monotonic() < deadline:
            time.sleep(0.5)
        figures = {
            "rate_per_s": args.rate,
            "seconds": args.seconds,
            "execs_made": made,
            "exec_events_stored_at_collector_driver_included": len(stack.stored("exec")),
            "daemon_cpu_share_idle": round(idle, 3),
            "daemon_cpu_share_under_load": round(loaded, 3),
            "daemon_cpu_us_per_exec": round((loaded - idle) / args.rate * 1e6, 1),
        }
    finally:
        stack.cleanup()
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
