"""The daemon's table of live processes in scope.

One row per live pid, created at the fork (or exec) record that started it
and removed at its exit record, so a recycled pid is always a new row.  The
row's ``start_ns`` is the kernel's time of that record (CLOCK_MONOTONIC),
which costs no /proc read on the hot path; the start time in clock ticks
that identifies a process instance to the outside is read through a pidfd
at attestation, where it matters.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(slots=True)  # one per live process, built per fork record: kept small
class Process:
    pid: int
    start_ns: int  # kernel time of the record that created the row
    ppid: int
    uid: int
    gid: int
    exe: str
    argv: tuple[str, ...]
    cgroup: str
    identity: str | None = None
    instance_id: str | None = None
    svid_serial: str | None = None
    exec_count: int = 0
    children: set[int] = field(default_factory=set)


def read_start_time(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of stat), None if gone."""
    try:
        raw = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    # comm (field 2) may hold spaces and parentheses: split after its last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return int(rest[19])
    except (IndexError, ValueError):
        return None


def read_exe(pid: int, proc: Path = Path("/proc")) -> str | None:
    try:
        return os.readlink(proc / str(pid) / "exe")
    except OSError:
        return None


def read_cgroup(pid: int, proc: Path = Path("/proc")) -> str | None:
    """The process's cgroup v2 path (the ``0::`` line), None if gone."""
    try:
        text = (proc / str(pid) / "cgroup").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def read_status_ids(pid: int, proc: Path = Path("/proc")) -> tuple[int, int, int] | None:
    """(ppid, real uid, real gid) from /proc/PID/status, None if gone."""
    try:
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    ppid = uid = gid = -1
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key == "PPid":
            ppid = int(value.split()[0])
        elif key == "Uid":
            uid = int(value.split()[0])
        elif key == "Gid":
            gid = int(value.split()[0])
    if min(ppid, uid, gid) < 0:
        return None
    return ppid, uid, gid


def read_host_caps(pid: int, proc: Path = Path("/proc")) -> int | None:
    """Effective capabilities as they count on the host, None if gone.

    A process in a user namespace other than ours holds its capabilities
    there only: they reach nothing of the host's, and count as none.
    """
    try:
        if os.stat(proc / str(pid) / "ns" / "user").st_ino != os.stat("/proc/self/ns/user").st_ino:
            return 0
        text = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return int(line.split()[1], 16)
    return None


def read_argv(pid: int, proc: Path = Path("/proc")) -> tuple[str, ...] | None:
    try:
        raw = (proc / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    return tuple(a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1])


class ProcessTable:
    """Live processes in scope; at most one row per pid at a time."""

    def __init__(self) -> None:
        self._by_pid: dict[int, Process] = {}

    def __len__(self) -> int:
        return len(self._by_pid)

    def __iter__(self) -> Iterator[Process]:
        return iter(list(self._by_pid.values()))

    def get(self, pid: int) -> Process | None:
        return self._by_pid.get(pid)

    def add(self, proc: Process) -> Process:
        """Insert ``proc``; an older row with the same pid (missed exit) is replaced."""
        self._by_pid[proc.pid] = proc
        parent = self._by_pid.get(proc.ppid)
        if parent is not None:
            parent.children.add(proc.pid)
        return proc

    def remove(self, pid: int) -> Process | None:
        proc = self._by_pid.pop(pid, None)
        if proc is not None:
            parent = self._by_pid.get(proc.ppid)
            if parent is not None:
                parent.children.discard(pid)
        return proc

    def descendants(self, pid: int) -> Iterator[Process]:
        stack = list(self._by_pid[pid].children) if pid in self._by_pid else []
        seen: set[int] = set()
        while stack:
            child = stack.pop()
            if child in seen or child not in self._by_pid:
                continue
            seen.add(child)
            proc = self._by_pid[child]
            yield proc
            stack.extend(proc.children)
