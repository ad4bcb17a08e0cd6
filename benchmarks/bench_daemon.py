"""The daemon's steady-state CPU share and memory under a paced exec load.

`sidecar run` (its own process) on a scratch cgroup, with 20 registered
identities and a policy of 10,000 egress rules spread over them.  Paced
storms (storm.c) exec a registered tool at 100 and then 1,000 execs per
second; each exec is attested (the tool matches identity #1) and judged.
The tool lives 2 ms, as a short tool does: one that exits before the
daemon reads its /proc costs the daemon less than an agent, and would flatter
the figure (``execs_attested`` says how many were).  Four storms share the
1,000 per second, since one alone cannot start a 2 ms tool that often.
The baseline in the same run is the same daemon idle.

Usage: benchmarks/bench_daemon.py [--seconds 10]
Needs root.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench_pipeline import build_storm, cpu_seconds  # noqa: E402

from sidecar.proc.cgroups import DANGEROUS_CAPS, launch_argv  # noqa: E402
from sidecar.testing.daemon_process import (  # noqa: E402
    DaemonConfigFile,
    DaemonProcess,
    launch_daemon,
)
from sidecar.testing.scratch import Scratch  # noqa: E402

IDENTITIES = 20
RULES = 10_000
TOOL_LIFE_NS = 2_000_000
TOOL_C = f"""
#include <time.h>
int main(void) {{
    struct timespec ts = {{0, {TOOL_LIFE_NS}}};
    nanosleep(&ts, 0);
    return 0;
}}
"""


def build_tool(tmp: Path) -> Path:
    src, exe = tmp / "agent-tool.c", tmp / "agent-tool"
    src.write_text(TOOL_C)
    subprocess.run(["cc", "-O2", "-o", str(exe), str(src)], check=True)
    return exe


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def write_files(tmp: Path, cgroup: Path, pin_dir: Path, tool: Path) -> Path:
    digest = hashlib.sha256(tool.read_bytes()).hexdigest()
    entries = ["apiVersion: sidecar/v1", "kind: RegistrationEntries", "trustDomain: example.org"]
    entries.append("entries:")
    for i in range(IDENTITIES):
        sel = f"[unix:uid:0, 'unix:sha256:{digest}']" if i == 0 else f"[unix:uid:{10000 + i}]"
        entries += [f"  - spiffeId: spiffe://example.org/agent/a{i}", f"    selectors: {sel}"]
    (tmp / "entries.yaml").write_text("\n".join(entries) + "\n")
    policy = ["apiVersion: sidecar/v1", "kind: Policy", "identities:"]
    per = RULES // IDENTITIES
    for i in range(IDENTITIES):
        policy += [f"  - id: spiffe://example.org/agent/a{i}", "    mode: enforce", "    egress:"]
        policy += ["      - ports: [443]", "        cidrs:"]
        for j in range(per):
            n = i * per + j
            policy.append(f"          - 10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}/32")
        policy.append(f"    exec: [{tool}]")
    (tmp / "policy.yaml").write_text("\n".join(policy) + "\n")
    return DaemonConfigFile(
        pin_dir=pin_dir,
        cgroup=cgroup,
        work=tmp,
        ring_pages=1024,
        entries=tmp / "entries.yaml",
        policy=tmp / "policy.yaml",
    ).write(tmp / "daemon.yaml")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    scratch = Scratch.create("sidecar-bench-")
    cgroup, tmp = scratch.cgroup, scratch.work
    daemon: DaemonProcess | None = None
    figures: dict[str, object] = {"identities": IDENTITIES, "rules": RULES}
    try:
        tool = build_tool(tmp)
        storm = build_storm(tmp)
        cfg = write_files(tmp, cgroup, scratch.pin_dir, tool)
        daemon = launch_daemon(cfg, tmp)
        time.sleep(1.0)
        pid = daemon.pid

        def measure(label: str, rate: float | None, storms: int = 1) -> int:
            cpu0, t0 = cpu_seconds(pid), time.monotonic()
            done = 0
            if rate is None:
                time.sleep(args.seconds)
            else:
                procs = [
                    subprocess.Popen(
                        launch_argv(
                            [str(storm), str(args.seconds), str(tool), str(rate / storms)],
                            cgroup=cgroup,
                            # As agents should run: the policy refuses these capabilities,
                            # and a tool that held them would be killed at exec.
                            drop_caps=DANGEROUS_CAPS,
                        ),
                        stdout=subprocess.PIPE,
                    )
                    for _ in range(storms)
                ]
                done = sum(int(p.communicate()[0]) for p in procs)
                time.sleep(1.0)  # the tail of the load is handled too
            cpu1, t1 = cpu_seconds(pid), time.monotonic()
            figures[label] = {
                "execs": done,
                "exec_per_s": round(done / args.seconds, 1),
                "daemon_cpu_share_of_one_core": round((cpu1 - cpu0) / (t1 - t0), 3),
                "daemon_rss_mib": round(rss_kib(pid) / 1024, 1),
            }
            return done

        measure("idle_baseline", None)
        loaded = (
            measure("load_100_exec_per_s", 100),
            measure("load_1000_exec_per_s", 1000, storms=4),
        )
        attested = issued = 0
        for ev in daemon.events():
            if ev["type"] == "exec" and ev.get("identity"):
                attested += 1
            elif ev["type"] == "credential_issued":
                issued += 1
        figures["execs_attested"] = attested
        execs = loaded[0] + loaded[1]
        figures["share_attested"] = round(attested / execs, 3) if execs else 0.0
        # Signed only when an instance asks the Workload API; the tool never does.
        figures["credentials_issued"] = issued
    finally:
        if daemon is not None:
            daemon.stop()
        scratch.remove()
    print("daemon under paced exec load, 20 identities, 10,000 rules (bench_daemon)")
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
