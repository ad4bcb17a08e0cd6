"""cgroups: naming one by its id, starting a tool inside one, removing one the product made.

``CgroupNames`` turns the cgroup id a kernel record carries into the path.

``launch_argv`` wraps a command so that it starts in a cgroup (the demo's, a
benchmark's or a test's) without forking the caller with a ``preexec_fn``.

A cgroup can only be removed once no process is left in it, and a process
that outlived its parent (a tool an agent started, a storm's last child)
keeps it busy.  These helpers kill what is left, then remove the tree,
leaves first.  Only ever pass a cgroup this process created.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sidecar.policy import caps


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


# Runs in a fresh interpreter, started by vfork+exec from the caller, so no code
# of the caller's (and none of the gRPC fork handlers a live server registers)
# runs in a forked copy of it.  It moves itself into the cgroup, drops to the
# uid, and execs the tool: the tool's exec is the first one the cgroup sees.
_LAUNCH = """\
import os, sys
cg, uid, drop, done = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
argv = sys.argv[5:]
if done >= 0:
    os.set_inheritable(done, False)  # closed by the exec: the caller's sign that it happened
if drop:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in map(int, drop.split(",")):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP: gone after the exec
            sys.exit(f"cannot drop capability {cap}: errno {ctypes.get_errno()}")
if cg:
    fd = os.open(os.path.join(cg, "cgroup.procs"), os.O_WRONLY)
    os.write(fd, b"0")
    os.close(fd)
if uid >= 0:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
try:
    os.execvp(argv[0], argv)
except OSError as exc:
    sys.stderr.write(f"cannot run {argv[0]}: {exc.strerror}\\n")
    sys.exit(127)
"""


# The capabilities a policy refuses by default (CAP_SYS_ADMIN, CAP_BPF, ...).
DANGEROUS_CAPS = tuple(sorted(caps.NUMBERS[n] for n in caps.DANGEROUS))


def launch_argv(
    argv: Sequence[str],
    *,
    cgroup: Path | None = None,
    uid: int | None = None,
    drop_caps: Sequence[int] = (),
    exec_fd: int = -1,
) -> list[str]:
    """An argv that runs ``argv`` inside ``cgroup`` and as ``uid`` (group ``uid``), from its exec.

    ``drop_caps``: capabilities removed from the bounding set first, so that
    a tool started as root does not hold them (agents should not).
    ``exec_fd``: a descriptor passed to the child that the exec of ``argv``
    closes (see ``start_in``).

    Use it instead of a ``preexec_fn``: ``subprocess`` then starts the child
    with vfork, and a process that runs gRPC (a daemon, a collector, a test
    with servers) is never forked with its threads' state half-copied.
    """
    if not argv:
        raise ValueError("launch_argv needs a program to run")
    return [
        sys.executable,
        "-I",
        "-S",
        "-c",
        _LAUNCH,
        str(cgroup) if cgroup is not None else "",
        str(-1 if uid is None else uid),
        ",".join(map(str, drop_caps)),
        str(exec_fd),
        *argv,
    ]


def start_in(
    cgroup: Path,
    argv: Sequence[str],
    *,
    uid: int | None = None,
    drop_caps: Sequence[int] = (),
    timeout: float = 10.0,
    **popen: Any,
) -> subprocess.Popen[Any]:
    """Start ``argv`` in ``cgroup`` (as ``uid``) and return once the tool runs there.

    The tool's own exec, and everything after it, happens inside the cgroup;
    when this returns, that exec has happened (or the launch failed), as with
    a ``preexec_fn``: a caller may write the new process's identity at once.
    """
    r, w = os.pipe()
    try:
        popen["pass_fds"] = (*popen.get("pass_fds", ()), w)
        proc: subprocess.Popen[Any] = subprocess.Popen(
            launch_argv(argv, cgroup=cgroup, uid=uid, drop_caps=drop_caps, exec_fd=w), **popen
        )
        os.close(w)
        w = -1
        os.set_blocking(r, False)
        deadline = time.monotonic() + timeout
        while True:  # EOF once the exec closed the child's copy (or the child is gone)
            try:
                if os.read(r, 1) == b"":
                    break
            except BlockingIOError:
                pass
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                raise TimeoutError(f"pid {proc.pid} did not start in {cgroup} in {timeout} s")
            time.sleep(0.001)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)
    return proc


class CgroupNames:
    """cgroup id (the directory's inode number) -> path, for records of gone processes."""

    def __init__(self, root: Path, scope: Path) -> None:
        self.root = root
        self.scope = scope
        self._cache: dict[int, str] = {}

    def name(self, cgroup_id: int) -> str:
        if cgroup_id not in self._cache:
            self._rescan()
            # cgroup ids are never reused, so an unknown one stays unknown.
            self._cache.setdefault(cgroup_id, "")
        return self._cache[cgroup_id]

    def _rescan(self) -> None:
        for dirpath, _dirs, _files in os.walk(self.scope):
            with contextlib.suppress(OSError):
                ino = os.stat(dirpath).st_ino
                rel = "/" + os.path.relpath(dirpath, self.root)
                self._cache[ino] = "/" if rel == "/." else rel
