"""Added connect() latency of enforcement, hook on versus off in the same run.

In a scratch cgroup, a C loop (connect_loop.c) runs as a process with an
identity whose allowlist has 10, 10,000 and 100,000 entries:
  (a) 1,000,000 UDP connect() calls on one socket (the sensitive case);
  (b) TCP connect + accept + close on loopback (the realistic case);
and the connect4 program's own run time per invocation comes from the
kernel's BPF statistics (kernel.bpf_stats_enabled).  The hooks are attached
at the cgroup2 root, so every process on the host runs them: the same UDP
loop also runs as a process with no identity outside the scope (the fast
path every other process takes).  The baseline is the same loop with the
hooks detached, measured in the same rounds (detach, run, attach, run).
Also measured: the time to parse + compile a 100,000-entry policy and to
load it into the maps.

Usage: benchmarks/bench_connect.py [--udp 1000000] [--tcp 20000] [--reps 3]
Needs root.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from sidecar.enforce.enforcer import Enforcer, IdentityNumbers, identity_number  # noqa: E402
from sidecar.kernel import libbpf  # noqa: E402
from sidecar.kernel.checks import cgroup2_root, find_mount  # noqa: E402
from sidecar.kernel.loader import KernelPrograms, LoadOptions  # noqa: E402
from sidecar.policy import load_policy_text  # noqa: E402
from sidecar.proc.cgroups import launch_argv  # noqa: E402
from sidecar.testing.scratch import Scratch  # noqa: E402

AGENT = "spiffe://example.org/bench/agent"


def policy_text(entries: int, port: int) -> str:
    lines = [
        "apiVersion: sidecar/v1",
        "kind: Policy",
        "identities:",
        f"  - id: {AGENT}",
        "    mode: enforce",
        "    egress:",
        "      - name: loopback",
        "        cidrs: [127.0.0.1/32]",
        f"        ports: [{port}]",
    ]
    if entries > 1:
        lines += ["      - name: many", "        ports: [443]", "        cidrs:"]
        for n in range(entries - 1):
            lines.append(f"          - 10.{n >> 16 & 255}.{n >> 8 & 255}.{n & 255}/32")
    return "\n".join(lines) + "\n"


def run_loop(
    exe: Path, cgroup: Path, kind: str, n: int, port: int, programs: object | None
) -> float:
    p = subprocess.Popen(
        launch_argv([str(exe), kind, str(n), str(port)], cgroup=cgroup),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert p.stdout is not None and p.stdin is not None
    assert p.stdout.readline().strip() == "ready"
    if programs is not None:
        programs.set_identity(p.pid, identity_number(AGENT))  # type: ignore[attr-defined]
    p.stdin.write("x")
    p.stdin.flush()
    out = p.stdout.readline()
    if p.wait(600) != 0:
        raise SystemExit(f"{kind} loop failed")
    return float(out)


def prog_stats(prog_id: int) -> tuple[int, int]:
    out = subprocess.run(
        ["bpftool", "prog", "show", "id", str(prog_id), "-j"], capture_output=True, text=True
    )
    info = json.loads(out.stdout or "{}")
    return int(info.get("run_time_ns", 0)), int(info.get("run_cnt", 0))


def median(values: list[float]) -> float:
    return round(statistics.median(values), 1)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--udp", type=int, default=1_000_000)
    ap.add_argument("--tcp", type=int, default=10_000)
    ap.add_argument("--tcp-pairs", type=int, default=15)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    # Two sibling cgroups: programs attach to "on" only; "off" runs the same
    # loops in between, so drift on the machine hits both sides alike.
    scratch = Scratch.create("sidecar-bench-")
    cgroup, off_cgroup = scratch.cgroup / "on", scratch.cgroup / "off"
    pin_dir = scratch.pin_dir
    figures: dict[str, object] = {}
    programs = None
    stats_fd = None
    try:
        cgroup.mkdir()
        off_cgroup.mkdir()
        exe = scratch.work / "connect_loop"
        subprocess.run(
            ["cc", "-O2", "-o", str(exe), str(REPO / "benchmarks" / "connect_loop.c")],
            check=True,
        )
        port = 40000 + os.getpid() % 20000
        from bcc import BPF

        empty = BPF(text="int empty(struct bpf_sock_addr *ctx) { return 1; }")
        empty_fd = empty.load_func(
            b"empty", BPF.CGROUP_SOCK_ADDR, attach_type=libbpf.ATTACH_CGROUP_INET4_CONNECT
        ).fd
        root_fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)

        def measure(progs: KernelPrograms) -> tuple[dict[str, float], dict[str, float]]:
            """Rounds of: hooks detached (off), then attached: no identity, identity."""
            runs: dict[str, list[float]] = {k: [] for k in ("uo", "ue", "uf", "un", "to", "tn")}
            for _ in range(args.reps):
                progs.detach_cgroup_hooks()
                runs["uo"].append(run_loop(exe, off_cgroup, "udp", args.udp, port, None))
                # What the kernel charges for running any program there: an empty one.
                link = libbpf.link_create(empty_fd, root_fd, libbpf.ATTACH_CGROUP_INET4_CONNECT)
                runs["ue"].append(run_loop(exe, off_cgroup, "udp", args.udp, port, None))
                os.close(link)
                progs.attach_cgroup_hooks()
                runs["uf"].append(run_loop(exe, off_cgroup, "udp", args.udp, port, None))
                runs["un"].append(run_loop(exe, cgroup, "udp", args.udp, port, progs))
            # TCP loops vary by +-15% from run to run on a VM: many short pairs.
            for _ in range(args.tcp_pairs):
                progs.detach_cgroup_hooks()
                runs["to"].append(run_loop(exe, off_cgroup, "tcp", args.tcp, port, None))
                progs.attach_cgroup_hooks()
                runs["tn"].append(run_loop(exe, cgroup, "tcp", args.tcp, port, progs))
            off = {
                "udp_connect_ns": median(runs["uo"]),
                "tcp_connect_accept_close_ns": median(runs["to"]),
            }
            on = {
                "udp_connect_ns": median(runs["un"]),
                "tcp_connect_accept_close_ns": median(runs["tn"]),
                "udp_added_ns_empty_program_paired_median": median(
                    [e - o for e, o in zip(runs["ue"], runs["uo"], strict=True)]
                ),
                # A process with no identity outside the scope: the host's cost.
                "udp_added_ns_no_identity_paired_median": median(
                    [f - o for f, o in zip(runs["uf"], runs["uo"], strict=True)]
                ),
                # Paired: each on run against the off run just before it, which
                # cancels most of the machine's drift between runs.
                "udp_added_ns_paired_median": median(
                    [n - o for n, o in zip(runs["un"], runs["uo"], strict=True)]
                ),
                "tcp_ratio_paired_median": round(
                    statistics.median([n / o for n, o in zip(runs["tn"], runs["to"], strict=True)]),
                    4,
                ),
            }
            return off, on

        tracefs = find_mount("tracefs")
        assert tracefs is not None
        programs = KernelPrograms(
            LoadOptions(pin_dir=pin_dir, scope=cgroup, tracefs=tracefs, ringbuf_pages=1024)
        )
        programs.load()
        programs.attach()
        enforcer = Enforcer(programs, IdentityNumbers())
        for entries in (10, 10_000, 100_000):
            text = policy_text(entries, port)
            t0 = time.monotonic()
            policy = load_policy_text(text, f"bench-{entries}")
            t1 = time.monotonic()
            enforcer.load(policy)
            t2 = time.monotonic()
            off, on = measure(programs)
            # The program's own time, from the kernel's statistics (switched on only
            # for this run: the accounting itself costs a little).
            _, prog_id = libbpf.link_info(programs._link_fds["connect4"])
            stats_fd = libbpf.enable_run_time_stats()
            rt0, rc0 = prog_stats(prog_id)
            run_loop(exe, cgroup, "udp", args.udp, port, programs)
            rt1, rc1 = prog_stats(prog_id)
            os.close(stats_fd)
            stats_fd = None
            figures[f"hook_on_{entries}_entries"] = {
                "hook_off": off,
                **on,
                "udp_added_ns": round(on["udp_connect_ns"] - off["udp_connect_ns"], 1),
                "tcp_ratio_on_off": round(
                    on["tcp_connect_accept_close_ns"] / off["tcp_connect_accept_close_ns"], 4
                ),
                "prog_run_ns_per_call": round((rt1 - rt0) / max(1, rc1 - rc0), 1),
                "policy_parse_compile_s": round(t1 - t0, 3),
                "policy_load_into_maps_s": round(t2 - t1, 3),
            }
        added = [
            figures[f"hook_on_{n}_entries"]["udp_added_ns"]  # type: ignore[index]
            for n in (10, 10_000, 100_000)
        ]
        figures["udp_added_spread_across_rule_counts"] = round(
            (max(added) - min(added)) / max(1e-9, statistics.mean(added)), 3
        )
    finally:
        if stats_fd is not None:
            os.close(stats_fd)
        if programs is not None:
            programs.close(detach=True)
        scratch.remove()
    print("connect latency (bench_connect)")
    print(json.dumps(figures, indent=2))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
