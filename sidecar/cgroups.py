"""Removing a cgroup the product made for itself (the demo's, a benchmark's or a test's).

A cgroup can only be removed once no process is left in it, and a process
that outlived its parent (a tool an agent started, a storm's last child)
keeps it busy.  These helpers kill what is left, then remove the tree,
leaves first.  Only ever pass a cgroup this process created.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path


def kill_all(cg: Path, timeout: float = 5.0) -> None:
    """SIGKILL every process in ``cg`` (not its children cgroups) and wait until it is empty."""
    kill = cg / "cgroup.kill"
    if kill.exists():  # Linux 5.14+: one write kills them all, new forks included
        with contextlib.suppress(OSError):
            kill.write_text("1")
    else:
        for line in (cg / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line), signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while (cg / "cgroup.procs").read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.02)


def remove_tree(cg: Path) -> None:
    """Kill whatever is left in ``cg`` and below, and remove it all; raises if it cannot."""
    if not cg.exists():
        return
    for sub in sorted((p for p in cg.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        kill_all(sub)
        with contextlib.suppress(OSError):
            sub.rmdir()
    kill_all(cg)
    for _ in range(50):
        try:
            cg.rmdir()
            return
        except OSError:
            time.sleep(0.05)
    cg.rmdir()
