"""The few BPF system calls BCC does not wrap, through the system's libbpf.

BCC attaches tracepoints with perf events and cgroup programs with the
legacy attach call; neither can be pinned, so neither survives the daemon.
We create BPF links instead (one per hook) and pin them in bpffs: a pinned
link stays attached when the daemon dies, and a restarted daemon swaps the
program behind it (``bpf_link_update``) or replaces it without a gap.

libbpf.so.1 is always present where BCC is (libbcc links against it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

from sidecar.util.errors import KernelError

# enum bpf_attach_type (uapi/linux/bpf.h)
ATTACH_CGROUP_INET_SOCK_CREATE = 2
ATTACH_CGROUP_INET4_CONNECT = 10
ATTACH_CGROUP_INET6_CONNECT = 11
ATTACH_CGROUP_UDP4_SENDMSG = 14
ATTACH_CGROUP_UDP6_SENDMSG = 15
ATTACH_CGROUP_SETSOCKOPT = 22
ATTACH_PERF_EVENT = 41

# enum bpf_prog_type
PROG_TYPE_CGROUP_SOCK = 9
PROG_TYPE_CGROUP_SOCK_ADDR = 18
PROG_TYPE_CGROUP_SOCKOPT = 25

# enum bpf_link_type
LINK_TYPE_CGROUP = 3

_PERF_TYPE_TRACEPOINT = 2
_PERF_FLAG_FD_CLOEXEC = 1 << 3
_NR_PERF_EVENT_OPEN = 298  # x86-64
_BPF_STATS_RUN_TIME = 0


class _PerfEventAttr(ctypes.Structure):
    # struct perf_event_attr, up to the fields we set; the kernel accepts a
    # smaller size than its own (PERF_ATTR_SIZE_VER0 = 64).
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("size", ctypes.c_uint32),
        ("config", ctypes.c_uint64),
        ("sample_period", ctypes.c_uint64),
        ("sample_type", ctypes.c_uint64),
        ("read_format", ctypes.c_uint64),
        ("flags", ctypes.c_uint64),
        ("wakeup_events", ctypes.c_uint32),
        ("bp_type", ctypes.c_uint32),
        ("config1", ctypes.c_uint64),
    )


class _LinkInfo(ctypes.Structure):
    # struct bpf_link_info: type, id, prog_id, then a union (8-aligned) whose
    # cgroup member is {cgroup_id, attach_type}; the rest we do not read.
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("pad0", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("attach_type", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 52),
    )


def _load() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise KernelError(
            f"cannot load libbpf ({name}): {exc}; install it (apt-get install libbpf1)"
        ) from exc


_lib: ctypes.CDLL | None = None
_libc = ctypes.CDLL(None, use_errno=True)


def lib() -> ctypes.CDLL:
    global _lib
    if _lib is None:
        _lib = _load()
        _lib.bpf_link_create.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        _lib.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        _lib.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        _lib.bpf_obj_get.argtypes = [ctypes.c_char_p]
        _lib.bpf_obj_get_info_by_fd.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint32),
        ]
        _lib.bpf_enable_stats.argtypes = [ctypes.c_int]
        _lib.bpf_map_update_elem.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_uint64,
        ]
        _lib.bpf_map_delete_elem.argtypes = [ctypes.c_int, ctypes.c_void_p]
        _lib.bpf_map_lookup_elem.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        _lib.bpf_map_get_next_key.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
        _lib.libbpf_num_possible_cpus.argtypes = []
        _lib.bpf_map_update_batch.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.c_void_p,
        ]
    return _lib


def _errno(res: int) -> int:
    """The error of a failed libbpf call: it returns -errno, or -1 with errno set."""
    return -res if res != -1 else ctypes.get_errno()


def _check(res: int, what: str) -> int:
    if res < 0:
        raise KernelError(f"{what}: {os.strerror(_errno(res))}")
    return res


BPF_ANY = 0
BPF_EXIST = 2  # update an entry that is there; ENOENT otherwise


def map_update(map_fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> bool:
    """One map write of packed key and value, straight to the system call.

    With ``BPF_EXIST``, False when there was no entry to update.
    """
    res = lib().bpf_map_update_elem(map_fd, key, value, flags)
    if res < 0:
        err = _errno(res)
        if err == errno.ENOENT and flags == BPF_EXIST:
            return False
        raise KernelError(f"bpf_map_update_elem: {os.strerror(err)}")
    return True


def map_update_batch(map_fd: int, keys: bytes, values: bytes, n: int) -> bool:
    """Write ``n`` packed entries in one system call; False when the map type cannot batch."""
    count = ctypes.c_uint32(n)
    res = lib().bpf_map_update_batch(map_fd, keys, values, ctypes.byref(count), None)
    if res < 0:
        err = _errno(res)
        if err in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP) and count.value == 0:
            return False
        raise KernelError(f"bpf_map_update_batch: {os.strerror(err)} after {count.value} of {n}")
    return True


def map_lookup(map_fd: int, key: bytes, value_size: int) -> bytes | None:
    """The packed value under ``key``, or None when there is none."""
    buf = ctypes.create_string_buffer(value_size)
    res = lib().bpf_map_lookup_elem(map_fd, key, buf)
    if res < 0:
        err = _errno(res)
        if err == errno.ENOENT:
            return None
        raise KernelError(f"bpf_map_lookup_elem: {os.strerror(err)}")
    return buf.raw


def map_keys(map_fd: int, key_size: int) -> list[bytes]:
    """Every key of a map, packed (a snapshot: entries may come and go meanwhile)."""
    out: list[bytes] = []
    key = ctypes.create_string_buffer(key_size)
    prev: bytes | None = None
    while True:
        res = lib().bpf_map_get_next_key(map_fd, prev, key)
        if res < 0:
            err = _errno(res)
            if err == errno.ENOENT:
                return out
            raise KernelError(f"bpf_map_get_next_key: {os.strerror(err)}")
        prev = key.raw
        out.append(prev)


def possible_cpus() -> int:
    """How many CPUs a per-CPU map holds a value for."""
    return _check(lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")


def map_delete(map_fd: int, key: bytes) -> bool:
    """Delete one entry (packed key); False when it was not there."""
    res = lib().bpf_map_delete_elem(map_fd, key)
    if res < 0:
        err = _errno(res)
        if err == errno.ENOENT:
            return False
        raise KernelError(f"bpf_map_delete_elem: {os.strerror(err)}")
    return True


def link_create(prog_fd: int, target_fd: int, attach_type: int) -> int:
    """Attach ``prog_fd`` to a cgroup or perf event as a BPF link; returns the link fd."""
    return _check(lib().bpf_link_create(prog_fd, target_fd, attach_type, None), "bpf_link_create")


def link_update(link_fd: int, prog_fd: int) -> None:
    """Atomically replace the program behind a link (cgroup links)."""
    _check(lib().bpf_link_update(link_fd, prog_fd, None), "bpf_link_update")


def _link_info(link_fd: int) -> _LinkInfo:
    info = _LinkInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(
        lib().bpf_obj_get_info_by_fd(link_fd, ctypes.byref(info), ctypes.byref(size)),
        "bpf_obj_get_info_by_fd",
    )
    return info


class _MapInfo(ctypes.Structure):
    # struct bpf_map_info, up to the fields we read.
    _fields_ = (
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
    )


def map_info(map_fd: int) -> _MapInfo:
    """Type, key and value sizes and capacity of a map."""
    info = _MapInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    _check(
        lib().bpf_obj_get_info_by_fd(map_fd, ctypes.byref(info), ctypes.byref(size)),
        "bpf_obj_get_info_by_fd",
    )
    return info


def map_max_entries(map_fd: int) -> int:
    return int(map_info(map_fd).max_entries)


def link_info(link_fd: int) -> tuple[int, int]:
    """(link type, program id) of a link."""
    info = _link_info(link_fd)
    return info.type, info.prog_id


def link_cgroup_id(link_fd: int) -> int | None:
    """The cgroup a cgroup link is attached to (its inode number), None for other links."""
    info = _link_info(link_fd)
    return int(info.cgroup_id) if info.type == LINK_TYPE_CGROUP else None


def obj_pin(fd: int, path: Path) -> None:
    _check(lib().bpf_obj_pin(fd, str(path).encode()), f"pin {path}")


def obj_get(path: Path) -> int | None:
    """Open a pinned object; None when nothing is pinned there."""
    fd = lib().bpf_obj_get(str(path).encode())
    if fd < 0:
        err = _errno(fd)
        if err == errno.ENOENT:
            return None
        raise KernelError(f"open pinned {path}: {os.strerror(err)}")
    return int(fd)


def tracepoint_id(tracefs: Path, category: str, event: str) -> int:
    path = tracefs / "events" / category / event / "id"
    try:
        return int(path.read_text().strip())
    except OSError as exc:
        raise KernelError(f"tracepoint {category}:{event} not found at {path}: {exc}") from exc


def perf_event_open_tracepoint(tp_id: int) -> int:
    """A perf event for one tracepoint on all tasks (the BPF program runs on every CPU)."""
    attr = _PerfEventAttr()
    attr.type = _PERF_TYPE_TRACEPOINT
    attr.size = ctypes.sizeof(attr)
    attr.config = tp_id
    attr.sample_period = 1
    attr.wakeup_events = 1
    fd = _libc.syscall(_NR_PERF_EVENT_OPEN, ctypes.byref(attr), -1, 0, -1, _PERF_FLAG_FD_CLOEXEC)
    if fd < 0:
        err = ctypes.get_errno()
        raise KernelError(f"perf_event_open for tracepoint {tp_id}: {os.strerror(err)}")
    return int(fd)


def enable_run_time_stats() -> int:
    """Turn on per-program run time statistics while the returned fd is open."""
    return _check(lib().bpf_enable_stats(_BPF_STATS_RUN_TIME), "bpf_enable_stats")
