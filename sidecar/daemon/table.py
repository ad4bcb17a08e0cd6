"""The daemon's table of live processes in scope.

One row per live pid, created at the fork (or exec) record that started it
and removed at its exit record, so a recycled pid is always a new row.  The
row's ``start_ns`` is the kernel's time of that record (CLOCK_MONOTONIC),
which costs no /proc read on the hot path; the start time in clock ticks
that identifies a process instance to the outside is read through a pidfd
at attestation, where it matters.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field


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
