"""Where the daemon's start-up time goes, phase by phase.

Start-up (launch to READY=1) is the daemon's own work plus the prepare step,
a child that compiles, loads, attaches and pins the BPF programs
(``sidecar.kernel.prepare``).  This measures, on this machine:

- the whole start-up, as ``bench_pipeline`` does (``launch_daemon``), and how
  long the daemon waited for the prepare step (its "programs attached" log);
- the prepare step alone, run as a child the way the daemon runs it, with a
  timeline of its phases (interpreter and imports, BTF offsets, the BCC
  compile, the clang build of the unix-socket object, each program's load
  and verification, attaching and pinning), each as [start, end] seconds
  from the child's launch, so the critical path shows;
- the interpreter start and the imports of the daemon and of BCC, each in a
  fresh process.

Usage: benchmarks/bench_startup.py [--runs 5] [--json FILE]
Needs root; works in a scratch cgroup and pin directory it removes.  Hold
/tmp/kernel.lock on shared machines.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sidecar.testing.daemon_process import DaemonConfigFile, launch_daemon  # noqa: E402
from sidecar.testing.scratch import Scratch, remove_pins, repo_env  # noqa: E402

ATTACHED = re.compile(r"programs attached to \S+ in ([0-9.]+) s")
Span = tuple[float, float]


def _spawn_seconds(code: str) -> float:
    began = time.monotonic()
    subprocess.run([sys.executable, "-c", code], check=True, env=repo_env())
    return time.monotonic() - began


def _child_prepare(began: float, pin_dir: str, scope: str) -> None:
    """The prepare step with its phases timed (runs in a fresh child)."""
    spans: dict[str, list[Span]] = {}
    imported = time.monotonic()
    from sidecar.kernel import loader, prepare, unix
    from sidecar.kernel.checks import preflight

    spans["imports (loader, prepare)"] = [(imported - began, time.monotonic() - began)]

    def timed(name: str | Callable[..., str], fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            t0 = time.monotonic()
            try:
                return fn(*args, **kwargs)
            finally:
                label = name if isinstance(name, str) else name(*args, **kwargs)
                spans.setdefault(label, []).append((t0 - began, time.monotonic() - began))

        return run

    def patch(owner: Any, attr: str, name: str | Callable[..., str]) -> None:
        fn = getattr(owner, attr, None)
        if fn is not None:
            setattr(owner, attr, timed(name, fn))

    patch(loader, "kernel_offset_cflags", "BTF offsets")
    patch(loader, "build_cflags", "compiler flags")
    patch(loader, "has_group_dead", "tracefs: group_dead?")
    patch(loader.KernelPrograms, "_resize_ring", "check the pinned ring")
    patch(loader, "_make_module_class", "import bcc")
    make = loader._make_module_class

    def module_class() -> Any:
        cls = make()
        return timed("BCC compile + maps", cls)

    loader._make_module_class = module_class
    patch(unix, "compile_object", "clang unix.bpf.c")
    if hasattr(unix, "ObjectBuild"):
        patch(unix.ObjectBuild, "__init__", "start clang unix.bpf.c")
        patch(unix.ObjectBuild, "wait", "wait for clang")
    patch(unix.UnixHooks, "load", "unix object (build + load)")
    for attr, name in (("_verify_programs", "load all programs"), ("attach", "attach + pin")):
        patch(loader.KernelPrograms, attr, name)
    patch(loader.KernelPrograms, "_load_func", lambda _self, fn_name, *_a, **_k: f"load {fn_name}")
    patch(loader.KernelPrograms, "close", "close")

    t0 = time.monotonic()
    mounts = preflight()
    spans["preflight"] = [(t0 - began, time.monotonic() - began)]
    options = loader.LoadOptions(
        pin_dir=Path(pin_dir),
        scope=Path(scope),
        tracefs=mounts.tracefs,
        hook_root=mounts.cgroup2.resolve(),
    )
    t0 = time.monotonic()
    prepare.prepare_here(options)
    spans["prepare_here"] = [(t0 - began, time.monotonic() - began)]
    # A program is loaded on its first call; later ones (attach) only look it up.
    out = {k: [v[0][0], v[0][1]] for k, v in spans.items()}
    json.dump(out, sys.stdout)


def prepare_timeline(scratch: Scratch) -> dict[str, list[float]]:
    began = time.monotonic()
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--child",
            repr(began),
            str(scratch.pin_dir),
            str(scratch.cgroup),
        ],
        capture_output=True,
        text=True,
        env=repo_env(),
        check=True,
    )
    ended = time.monotonic() - began
    timeline: dict[str, list[float]] = json.loads(out.stdout)
    timeline["child exit"] = [ended, ended]
    return timeline


def daemon_startup(scratch: Scratch, run: int) -> tuple[float, float | None]:
    """(launch to READY=1, seconds the daemon spent in the prepare step)."""
    work = scratch.work
    cfg = DaemonConfigFile(pin_dir=scratch.pin_dir, cgroup=scratch.cgroup, ring_pages=1024)
    log = work / f"daemon-{run}.log"
    daemon = launch_daemon(cfg.write(work / "config.yaml"), work, log=log)
    try:
        ready = daemon.ready_seconds
    finally:
        daemon.stop()
    found = ATTACHED.search(log.read_text())
    return ready, float(found.group(1)) if found else None


def main() -> int:
    if len(sys.argv) == 5 and sys.argv[1] == "--child":
        _child_prepare(float(sys.argv[2]), sys.argv[3], sys.argv[4])
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()

    imports = {
        "python -c pass": "pass",
        "python: daemon imports": (
            "import sidecar.cli, sidecar.daemon.core, sidecar.daemon.config, sidecar.daemon.outputs"
        ),
        "python: import bcc": "import bcc",
    }
    figures: dict[str, Any] = {
        name: round(statistics.median(_spawn_seconds(code) for _ in range(args.runs)), 3)
        for name, code in imports.items()
    }
    scratch = Scratch.create("sidecar-bench-")
    ready: list[float] = []
    in_prepare: list[float] = []
    timelines: list[dict[str, list[float]]] = []
    try:
        for run in range(args.runs):
            r, p = daemon_startup(scratch, run)
            ready.append(r)
            if p is not None:
                in_prepare.append(p)
            remove_pins(scratch.pin_dir)
        for _ in range(args.runs):
            timelines.append(prepare_timeline(scratch))
            remove_pins(scratch.pin_dir)
    finally:
        scratch.remove()
    figures["daemon launch to READY=1, median"] = round(statistics.median(ready), 3)
    figures["daemon launch to READY=1, runs"] = [round(r, 3) for r in ready]
    if in_prepare:
        figures["of which preflight + prepare step, median"] = round(
            statistics.median(in_prepare), 3
        )
    phases = {}
    for name in timelines[0]:
        starts = [t[name][0] for t in timelines if name in t]
        ends = [t[name][1] for t in timelines if name in t]
        phases[name] = [round(statistics.median(starts), 3), round(statistics.median(ends), 3)]
    figures["prepare child timeline [start, end] s, medians"] = dict(
        sorted(phases.items(), key=lambda kv: (kv[1][0], kv[1][1]))
    )
    print("daemon start-up (bench_startup)")
    for k, v in figures.items():
        if isinstance(v, dict):
            print(f"  {k}")
            for name, (s, e) in v.items():
                print(f"    {name:34} {s:6.3f} .. {e:6.3f}  ({e - s:.3f})")
        else:
            print(f"  {k:42} {v}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
