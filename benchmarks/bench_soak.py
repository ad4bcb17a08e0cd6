"""The 30-minute soak: exec load through the whole product while its parts fail.

A collector and a daemon run as separate processes, as an operator runs them.
A driver starts ``/usr/bin/true`` at a steady rate (200/s by default) in a
scratch cgroup where every process is attested and held to an enforcing
policy, and every event streams to the collector.  In each fault cycle (six
in 30 minutes) the collector is frozen (SIGSTOP) and thawed, killed (SIGKILL)
and restarted, and the daemon killed (SIGKILL) and restarted.

Figures: execs made, execs in the collector's store, duplicates, losses the
host reported, and the daemon's RSS and open descriptors sampled through the
run (flat when the last cycle's figures match the first's).  Baseline: what
the driver made, counted by the driver itself.

    sudo .venv/bin/python benchmarks/bench_soak.py --seconds 1800 --rate 200
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sidecar.testing import soak
from sidecar.testing.scratch import Scratch
from sidecar.testing.stack import Stack


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=1800.0)
    ap.add_argument("--rate", type=float, default=200.0, help="execs per second")
    ap.add_argument("--cycles", type=int, default=6, help="fault cycles over the run")
    ap.add_argument(
        "--ring-pages",
        type=int,
        default=256,
        help="daemon ring buffer in pages; it must hold the load of a daemon outage",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("bench_soak: needs root (BPF programs, cgroups)", file=sys.stderr)
        return 2
    stack = Stack(Scratch.create("sidecar-soak-"), host="soak-host")
    try:
        result = soak.run(
            stack,
            seconds=args.seconds,
            rate=args.rate,
            cycles=args.cycles,
            settle_timeout=300,
            ring_pages=args.ring_pages,
            log=lambda msg: print(msg, flush=True),
        )
    finally:
        stack.cleanup()
    samples = result.samples
    per_cycle = max(1, len(samples) // args.cycles)
    first, last = samples[:per_cycle], samples[-per_cycle:]
    figures = {
        "seconds": args.seconds,
        "rate_per_s": args.rate,
        "fault_cycles": args.cycles,
        "ring_pages": args.ring_pages,
        "execs_made": result.started,
        "execs_stored": result.stored,
        "duplicates": result.duplicates,
        "reported_lost": {f"{k}/{r}": n for (k, r), n in sorted(result.lost.items())},
        "unaccounted": result.started - result.stored - result.lost_execs,
        "local_output": {
            "stored": result.sink_stored,
            "duplicates": result.sink_duplicates,
            "reported_lost_execs": result.sink_lost_execs,
        },
        "settle_seconds": round(result.settle_seconds, 1),
        "daemon_rss_mib_first_cycle_max": round(max(s[1] for s in first) / 1024, 1),
        "daemon_rss_mib_last_cycle_max": round(max(s[1] for s in last) / 1024, 1),
        "daemon_fds_first_cycle_max": max(s[2] for s in first),
        "daemon_fds_last_cycle_max": max(s[2] for s in last),
        "samples": len(samples),
    }
    print("soak: exec load with a collector, through freezes and kills (bench_soak)")
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**figures, "series": samples}, indent=2))
    return 0 if figures["unaccounted"] == 0 and not result.duplicates else 1


if __name__ == "__main__":
    sys.exit(main())
