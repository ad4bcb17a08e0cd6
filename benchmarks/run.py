"""`make bench`: every benchmark of the product, each against a baseline measured in the same run.

Runs each benchmark script in turn and prints its figures; with --json DIR
each also writes its figures as DIR/<name>.json.  Nothing here asserts a
time: the figures are for people (and issue notes) to read.  Needs root for
the kernel benchmarks.

  bench_pipeline   exec storm with and without the daemon: rate ratio, events
                   received / execs, kernel losses, daemon CPU and RSS, start-up
  bench_connect    added connect() latency with 10 / 10k / 100k rules, BPF
                   program run time, policy compile and load time
  bench_attest     attestation latency, exec record to identity in the kernel map
  bench_hash       cold sha256 of a 50 MB binary, warm cache lookups
  bench_daemon     daemon CPU and RSS at 100 and 1,000 exec/s, 20 identities, 10k rules
  bench_collector  exporter to collector over mTLS: events/s and latency vs raw SQLite
  bench_stream     daemon CPU at 200 attested exec/s streamed to a collector, vs idle
  bench_fleet      200 simulated hosts: events/s stored by SQLite and by 1, 2 and 3
                   PostgreSQL replicas, submit-to-ack p50/p99, Query by identity
                   over 1 million stored events (about 2 minutes)

Run on request only (--only bench_soak), for it takes 30 minutes:

  bench_soak       200 attested exec/s streamed to a collector while the collector is
                   frozen, killed and restarted and the daemon killed and restarted:
                   execs stored once or reported lost, RSS and descriptors over time
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

PLAN = [
    ("bench_pipeline", ["--seconds", "30", "--rounds", "6"]),  # the 30 s storm
    ("bench_connect", ["--reps", "5"]),
    ("bench_attest", ["--execs", "1000"]),
    ("bench_hash", []),
    ("bench_daemon", ["--seconds", "10"]),
    ("bench_collector", []),
    ("bench_stream", ["--seconds", "30"]),
    ("bench_fleet", ["--hosts", "200", "--query-events", "1000000"]),
]
ON_REQUEST = [("bench_soak", ["--seconds", "1800", "--rate", "200", "--ring-pages", "1024"])]


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--only", action="append", default=[], help="run only these (repeatable)")
    ap.add_argument("--json", type=Path, help="write each benchmark's figures into this folder")
    args = ap.parse_args()
    failed = []
    for name, extra in PLAN + ON_REQUEST:
        if (args.only and name not in args.only) or (not args.only and (name, extra) in ON_REQUEST):
            continue
        cmd = [sys.executable, str(HERE / f"{name}.py"), *extra]
        if args.json and name != "bench_hash" and name != "bench_collector":
            args.json.mkdir(parents=True, exist_ok=True)
            cmd += ["--json", str(args.json / f"{name}.json")]
        print(f"\n### {name}: {' '.join(cmd[1:])}", flush=True)
        began = time.monotonic()
        rc = subprocess.run(cmd).returncode
        print(f"### {name} done in {time.monotonic() - began:.0f} s (exit {rc})", flush=True)
        if rc != 0:
            failed.append(name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
