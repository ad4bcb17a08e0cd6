"""Facts about a running process, read from /proc without being fooled by PID reuse.

The kernel reports an exec by PID.  By the time the daemon reads /proc that
PID may belong to another process: the first one exited and the number was
handed out again.  :func:`gather` therefore

1. opens a pidfd first: it refers to one process for good, whatever happens
   to the number;
2. reads ``stat`` (start time), ``status`` (real uid/gid, capabilities), ``exe`` (opens it:
   the descriptor is the very image the kernel runs, even if its path was
   renamed or replaced since; then readlink) and ``cgroup``;
3. checks that the process behind the pidfd is still alive and that
   ``/proc/PID`` still shows the same start time and executable.  If the
   process exited, the PID could have been recycled between steps 1 and 2 and
   the facts could be someone else's: :class:`AttestationError`.

A process that execs again while it is read keeps its PID and start time;
step 3 notices if the executable changed.  The kernel reports that exec too,
and the daemon attests again for it.

The pidfd is closed before :func:`gather` returns; the daemon keys process
instances by ``(boot_id(), pid, start_time)``, which :class:`ProcessFacts`
carries.

For a process the kernel reported an exec of, the exec record already says
its start time, real uid/gid, capabilities and the file it runs
(:class:`ExecSeen`), as they were at that exec.  :func:`gather` then reads
only ``exe`` (the path, which the kernel cannot give at that tracepoint) and
the cgroup if asked, checks the file is the recorded one, and then asks the
kernel's process map whether the pid still names the recorded process (its
entry holds the start time, and goes at exit, before the pid can be reused):
no pidfd, no ``stat`` or ``status`` read, and facts that describe the exec
itself rather than whatever the process did since.  When the map does not
confirm it, the pidfd path decides, with ``stat`` tying the pidfd to the
recorded start time.
"""

from __future__ import annotations

import errno
import logging
import os
import pwd
import signal
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

from sidecar.attest import cgroup
from sidecar.attest.hashcache import HashCache
from sidecar.proc.read import (
    StatusFields,
    kernel_dev,
    parse_cgroup,
    parse_start_time,
    parse_status,
    read_boot_id,
    read_file,
)
from sidecar.util.errors import AttestationError

_logger = logging.getLogger(__name__)

_DELETED = " (deleted)"


@dataclass(frozen=True)
class ProcessFacts:
    """What selectors are matched against, for one process instance."""

    pid: int
    start_time: int  # clock ticks since boot, /proc/PID/stat field 22
    uid: int  # real
    gid: int  # real, primary group only
    user: str | None  # name of uid; None if it has none or it was not asked for
    exe_path: str  # as the kernel sees it, without the " (deleted)" mark
    exe_deleted: bool  # the image has no name any more (replaced or removed)
    exe_dev: int
    exe_ino: int
    exe_size: int
    exe_mtime_ns: int
    sha256: str | None  # None when no entry asked for it
    cgroup_path: str | None  # cgroup v2 path; None if in none or it was not asked for
    parent_identity: str | None
    #: Effective capabilities in the process's own user namespace (status
    #: ``CapEff``); :func:`sidecar.proc.read.host_caps` says what they count
    #: for on the host.
    cap_eff: int = 0
    #: What they count for on the host, when the kernel said so at exec
    #: (:class:`ExecSeen`); None when only ``cap_eff`` is known.
    cap_host: int | None = None

    @property
    def systemd_unit(self) -> str | None:
        return cgroup.systemd_unit(self.cgroup_path) if self.cgroup_path else None

    @property
    def pod_uid(self) -> str | None:
        return cgroup.pod_uid(self.cgroup_path) if self.cgroup_path else None

    @property
    def container_id(self) -> str | None:
        return cgroup.container_id(self.cgroup_path) if self.cgroup_path else None


@dataclass(frozen=True, slots=True)
class ExecSeen:
    """The process as the kernel's exec record describes it, at that exec."""

    start_ns: int  # task start, ns since boot (/proc/PID/stat shows it in ticks)
    uid: int  # real
    gid: int  # real
    cap_host: int  # effective capabilities as they count on the host
    exe_dev: int  # the running file: device, in the kernel's encoding (MAJOR << 20 | MINOR)
    exe_ino: int  # ... and inode; 0 when the kernel could not read it


@cache
def _ns_per_tick() -> int:
    return 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def boot_id() -> str:
    """This boot's random ID, which with (pid, start time) names a process instance."""
    value = read_boot_id()
    if value is None:
        raise AttestationError("cannot read the boot id")
    return value


def read_start_time(pid: int) -> int:
    """Start time of ``pid`` in clock ticks since boot; AttestationError if it is gone."""
    value = parse_start_time(_read_text(pid, "stat"))
    if value is None:
        raise AttestationError(f"pid {pid}: unexpected /proc/{pid}/stat format")
    return value


def gather(
    pid: int,
    parent_identity: str | None,
    hashes: HashCache,
    *,
    want_sha256: bool = True,
    want_user: bool = True,
    want_cgroup: bool = True,
    seen: ExecSeen | None = None,
    still_running: Callable[[], bool] | None = None,
) -> ProcessFacts:
    """Read the facts of process ``pid``; :class:`AttestationError` if it is gone or replaced.

    ``want_sha256=False`` skips hashing, ``want_user=False`` the user
    database lookup (which may go to LDAP) and ``want_cgroup=False`` the
    cgroup; the field is then None.  The attestor asks for each only when
    some entry has a selector that needs it.  ``seen``: what the kernel's
    exec record says of the process; the facts are then those of that exec
    (AttestationError if ``pid`` is no longer that process).
    ``still_running``: asked after the reads, True only if ``pid`` still
    names the process of ``seen`` (the kernel's process map says so, see
    :meth:`sidecar.kernel.maps.KernelMaps.holds_process`); it saves the
    pidfd and the start-time read.  False is no answer: the facts are then
    read again with a pidfd.
    """
    if pid <= 0:
        raise AttestationError(f"pid {pid}: not a process id")
    if seen is not None and not (seen.exe_ino and seen.start_ns):
        seen = None  # 0: the kernel could not read them
    if seen is not None and still_running is not None:
        read = _read_recorded_image(pid, seen, hashes, want_sha256, want_cgroup)
        if read is not None and still_running():
            return _facts_of_record(pid, seen, read, parent_identity, want_user)
    try:
        pidfd = os.pidfd_open(pid)
    except OSError as exc:
        raise _gone(pid, exc) from exc
    try:
        if seen is not None:
            # The pidfd was opened after the exec: if the pid's start time is
            # still the recorded one, the pidfd holds the recorded process (a
            # pid is reused only after its process is gone, and this one
            # existed before the pidfd did).  While it is alive at the end,
            # /proc/PID was its, so the path and the cgroup read are too.
            if read_start_time(pid) != seen.start_ns // _ns_per_tick():
                raise AttestationError(f"pid {pid}: replaced by another process since its exec")
            read = _read_recorded_image(pid, seen, hashes, want_sha256, want_cgroup)
            if read is not None:
                try:
                    signal.pidfd_send_signal(pidfd, 0)
                except OSError as exc:
                    raise _gone(pid, exc) from exc
                return _facts_of_record(pid, seen, read, parent_identity, want_user)
        return _gather_pinned(
            pid, pidfd, parent_identity, hashes, want_sha256, want_user, want_cgroup
        )
    finally:
        os.close(pidfd)


class _Image(NamedTuple):
    path: str
    st: os.stat_result
    sha256: str | None
    cgroup_path: str | None


def _read_recorded_image(
    pid: int, seen: ExecSeen, hashes: HashCache, want_sha256: bool, want_cgroup: bool
) -> _Image | None:
    """The path, file and cgroup of ``pid``; None when its file is not the recorded one.

    Not the recorded file: it exec'd again since (a later record attests
    that image), or this file system shows ``stat()`` another device than
    the kernel holds (overlay, btrfs); either way the caller reads it all
    from /proc.  The caller checks that ``pid`` was the recorded process
    throughout.
    """
    exe_link = f"/proc/{pid}/exe"
    # The name first, then the file: if the process execs in between, the
    # file opened is not the recorded one.
    try:
        exe_path = os.readlink(exe_link)
        exe_fd = os.open(exe_link, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _gone(pid, exc) from exc
    try:
        try:
            st = os.fstat(exe_fd)
        except OSError as exc:
            raise _gone(pid, exc) from exc
        if (kernel_dev(st.st_dev), st.st_ino) != (seen.exe_dev, seen.exe_ino):
            return None
        sha256 = hashes.digest_fd(exe_fd, f"pid {pid} executable", st)[1] if want_sha256 else None
    finally:
        os.close(exe_fd)
    cgroup_path = parse_cgroup(_read_text(pid, "cgroup")) if want_cgroup else None
    return _Image(exe_path, st, sha256, cgroup_path)


def _facts_of_record(
    pid: int, seen: ExecSeen, image: _Image, parent_identity: str | None, want_user: bool
) -> ProcessFacts:
    start_time = seen.start_ns // _ns_per_tick()
    ids = (seen.uid, seen.gid, seen.cap_host)
    return _facts(pid, start_time, ids, seen.cap_host, image, parent_identity, want_user)


def _facts(
    pid: int,
    start_time: int,
    ids: tuple[int, int, int],  # real uid and gid, effective capabilities
    cap_host: int | None,
    image: _Image,
    parent_identity: str | None,
    want_user: bool,
) -> ProcessFacts:
    uid, gid, cap_eff = ids
    st, exe_path = image.st, image.path
    # readlink appends " (deleted)" when the image lost its last name; a file
    # really named so still has links, so the link count decides.
    deleted = st.st_nlink == 0
    if deleted and exe_path.endswith(_DELETED):
        exe_path = exe_path[: -len(_DELETED)]
    return ProcessFacts(
        pid=pid,
        start_time=start_time,
        uid=uid,
        gid=gid,
        user=_user_name(uid) if want_user else None,
        exe_path=exe_path,
        exe_deleted=deleted,
        exe_dev=st.st_dev,
        exe_ino=st.st_ino,
        exe_size=st.st_size,
        exe_mtime_ns=st.st_mtime_ns,
        sha256=image.sha256,
        cgroup_path=image.cgroup_path,
        parent_identity=parent_identity,
        cap_eff=cap_eff,
        cap_host=cap_host,
    )


def _gather_pinned(
    pid: int,
    pidfd: int,
    parent_identity: str | None,
    hashes: HashCache,
    want_sha256: bool,
    want_user: bool,
    want_cgroup: bool,
) -> ProcessFacts:
    start_time = read_start_time(pid)
    status = _status(pid)
    exe_link = f"/proc/{pid}/exe"
    # Open before readlink: if the process execs in between, the final check
    # sees that /proc/PID/exe is no longer the file that was opened.
    try:
        exe_fd = os.open(exe_link, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _gone(pid, exc) from exc
    try:
        try:
            exe_path = os.readlink(exe_link)
            st = os.fstat(exe_fd)
        except OSError as exc:
            raise _gone(pid, exc) from exc
        sha256 = hashes.digest_fd(exe_fd, f"pid {pid} executable", st)[1] if want_sha256 else None
    finally:
        os.close(exe_fd)
    cgroup_path = parse_cgroup(_read_text(pid, "cgroup")) if want_cgroup else None
    _check_same_process(pid, pidfd, start_time, st)
    image = _Image(exe_path, st, sha256, cgroup_path)
    ids = (status.uid, status.gid, status.cap_eff)
    return _facts(pid, start_time, ids, None, image, parent_identity, want_user)


def _check_same_process(pid: int, pidfd: int, start_time: int, exe: os.stat_result) -> None:
    """Raise unless the pidfd's process is alive and /proc/PID still shows it."""
    try:
        signal.pidfd_send_signal(pidfd, 0)
    except OSError as exc:
        raise _gone(pid, exc) from exc
    if read_start_time(pid) != start_time:
        raise AttestationError(f"pid {pid}: replaced by another process while being attested")
    try:
        now = os.stat(f"/proc/{pid}/exe")
    except OSError as exc:
        raise _gone(pid, exc) from exc
    if (now.st_dev, now.st_ino) != (exe.st_dev, exe.st_ino):
        raise AttestationError(f"pid {pid}: exec'd another program while being attested")


def _gone(pid: int, exc: OSError) -> AttestationError:
    if exc.errno in (errno.ESRCH, errno.ENOENT):
        return AttestationError(f"pid {pid}: process is gone")
    return AttestationError(f"pid {pid}: cannot inspect: {exc.strerror or exc}")


def _read_text(pid: int, name: str) -> str:
    try:
        return read_file(f"/proc/{pid}/{name}").decode("utf-8", "surrogateescape")
    except OSError as exc:
        raise _gone(pid, exc) from exc


def _status(pid: int) -> StatusFields:
    fields = parse_status(_read_text(pid, "status"))
    if fields is None:
        raise AttestationError(f"pid {pid}: no PPid, Uid, Gid or CapEff in /proc/{pid}/status")
    return fields


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
