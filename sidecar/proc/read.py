"""Reading one process's facts from /proc: the product's one parser of each file.

Two kinds of caller share these parsers.  The daemon's hot path asks
"what is this pid now, if it still exists" and takes None for a process
that is gone (``read_*``).  Attestation asks the same through a pidfd and
must fail loudly instead (:mod:`sidecar.attest.facts` turns a None into an
``AttestationError``).  Both read the same fields the same way.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import NamedTuple

PROC = Path("/proc")


def parse_start_time(stat: str | bytes) -> int | None:
    """Start time in clock ticks since boot (field 22 of ``/proc/PID/stat``), None if malformed."""
    # comm (field 2) may hold spaces and ')': count fields after the last ')'.
    text = stat.decode("ascii", "replace") if isinstance(stat, bytes) else stat
    _, paren, rest = text.rpartition(")")
    fields = rest.split()
    if not paren or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22; fields[0] is field 3
    except ValueError:
        return None


def kernel_dev(st_dev: int) -> int:
    """A stat() device number in the kernel's internal form (MAJOR << 20 | MINOR)."""
    return (os.major(st_dev) << 20) | os.minor(st_dev)


class StatusFields(NamedTuple):
    """The fields of ``/proc/PID/status`` the product uses."""

    ppid: int
    uid: int  # real
    gid: int  # real, primary group only
    cap_eff: int  # effective capabilities, in the process's own user namespace


def _status_number(status: str, key: str, base: int = 10) -> int | None:
    """The first number after ``key`` (a line start such as ``"\\nUid:"``), None if absent."""
    at = status.find(key)
    if at < 0:
        return None
    start = at + len(key)
    end = status.find("\n", start)
    value = status[start : end if end >= 0 else len(status)].split(None, 1)
    try:
        return int(value[0], base) if value else None
    except ValueError:
        return None


def parse_status(status: str) -> StatusFields | None:
    """:class:`StatusFields` of ``/proc/PID/status``, None if a field is missing.

    Looks each field up instead of splitting all sixty lines: the daemon
    parses one status for every exec it attests.  ``Name`` comes first and
    is the only field a process chooses; a newline in it is shown as
    ``\\n``, so no line start inside it can pose as a field.
    """
    ppid = _status_number(status, "\nPPid:")
    uid = _status_number(status, "\nUid:")
    gid = _status_number(status, "\nGid:")
    cap_eff = _status_number(status, "\nCapEff:", 16)
    if ppid is None or uid is None or gid is None or cap_eff is None:
        return None
    return StatusFields(ppid, uid, gid, cap_eff)


def parse_status_ids(status: str) -> tuple[int, int, int] | None:
    """(ppid, real uid, real primary gid) from ``/proc/PID/status``, None if a field is missing."""
    fields = parse_status(status)
    return (fields.ppid, fields.uid, fields.gid) if fields is not None else None


def parse_cgroup(text: str) -> str | None:
    """The cgroup v2 path (the ``0::`` line of ``/proc/PID/cgroup``), None if in none."""
    for line in text.splitlines():
        if line.startswith("0::"):
            return line[3:]
    return None


def read_file(path: str) -> bytes:
    """A whole /proc file in as few system calls as it takes (open, read, close).

    Python's ``open()`` adds an fstat, a tty check and a seek per file; the
    daemon reads a few /proc files for every exec it attests.  OSError as
    ``open()`` raises it.
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunk = os.read(fd, 8192)
        if len(chunk) < 8192:
            return chunk
        parts = [chunk]
        while chunk:
            chunk = os.read(fd, 65536)
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def read_text(pid: int, name: str, proc: Path = PROC) -> str | None:
    """``/proc/PID/<name>`` as text, None if the process is gone or unreadable."""
    try:
        return read_file(f"{proc}/{pid}/{name}").decode("utf-8", "surrogateescape")
    except OSError:
        return None


def read_start_time(pid: int, proc: Path = PROC) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, None if gone."""
    try:
        raw = read_file(f"{proc}/{pid}/stat")
    except OSError:
        return None
    return parse_start_time(raw)


def read_exe(pid: int, proc: Path = PROC) -> str | None:
    try:
        return os.readlink(proc / str(pid) / "exe")
    except OSError:
        return None


def read_cgroup(pid: int, proc: Path = PROC) -> str | None:
    """The process's cgroup v2 path, None if gone."""
    text = read_text(pid, "cgroup", proc)
    return parse_cgroup(text) if text is not None else None


def read_status_ids(pid: int, proc: Path = PROC) -> tuple[int, int, int] | None:
    """(ppid, real uid, real gid), None if gone."""
    text = read_text(pid, "status", proc)
    return parse_status_ids(text) if text is not None else None


@functools.cache
def _own_user_ns(proc: Path) -> int | None:
    """Our user namespace (its inode), which never changes for a process."""
    try:
        return os.stat(proc / "self/ns/user").st_ino
    except OSError:
        return None


def host_caps(pid: int, cap_eff: int, proc: Path = PROC) -> int | None:
    """``cap_eff`` of ``pid`` as it counts on the host, None if the process is gone.

    A process in a user namespace other than ours holds its capabilities
    there only: they reach nothing of the host's, and count as none.  No
    capability needs no look at the namespace.
    """
    if not cap_eff:
        return 0
    try:
        if os.stat(proc / str(pid) / "ns" / "user").st_ino != _own_user_ns(proc):
            return 0
    except OSError:
        return None
    return cap_eff


def read_host_caps(pid: int, proc: Path = PROC) -> int | None:
    """Effective capabilities as they count on the host (:func:`host_caps`), None if gone."""
    text = read_text(pid, "status", proc)
    fields = parse_status(text) if text is not None else None
    if fields is None:
        return None
    return host_caps(pid, fields.cap_eff, proc)


def read_argv(pid: int, proc: Path = PROC) -> tuple[str, ...] | None:
    try:
        raw = read_file(f"{proc}/{pid}/cmdline")
    except OSError:
        return None
    return tuple(a.decode("utf-8", "surrogateescape") for a in raw.split(b"\0")[:-1])


def read_boot_id(proc: Path = PROC) -> str | None:
    """This boot's random id, which with (pid, start time) names a process instance."""
    try:
        return (proc / "sys/kernel/random/boot_id").read_text(encoding="ascii").strip()
    except OSError:
        return None
