"""ctypes mirrors of ``bpf/include/events.h`` and the decoder of ring-buffer records.

This module does not import bcc: the decoders work over bytes, so they are
unit-tested without a kernel.  :func:`decode` is plain Python, the reference;
:func:`decode_all`, which the daemon's reader uses, is its twin in C.
``tests/unit/test_abi_layout.py`` compiles the C header and proves every
size, offset and constant here (and in :mod:`sidecar.kernel.limits`, the
home of sizes and limits) matches it.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import struct
from dataclasses import dataclass
from typing import Any

# The sizes and limits (field lengths, map sizes, ...) live in limits.py, which
# the kernel-neutral policy package imports too; they are re-exported here so
# the rest of the kernel code reads every contract constant from one module.
from sidecar.kernel.limits import ADDR_LEN as ADDR_LEN
from sidecar.kernel.limits import ARG_MAX as ARG_MAX
from sidecar.kernel.limits import ARGS_LEN as ARGS_LEN
from sidecar.kernel.limits import COMM_LEN as COMM_LEN
from sidecar.kernel.limits import EGRESS_MAX as EGRESS_MAX
from sidecar.kernel.limits import EVENT_TYPE_SLOTS as EVENT_TYPE_SLOTS
from sidecar.kernel.limits import EXEC_ALLOW_MAX as EXEC_ALLOW_MAX
from sidecar.kernel.limits import EXEC_PATH_MAX_BYTES as EXEC_PATH_MAX_BYTES
from sidecar.kernel.limits import FILENAME_LEN as FILENAME_LEN
from sidecar.kernel.limits import LPM_PREFIX_BASE as LPM_PREFIX_BASE
from sidecar.kernel.limits import MAX_ARGS as MAX_ARGS
from sidecar.kernel.limits import MAX_PORT_RULES as MAX_PORT_RULES
from sidecar.kernel.limits import POLICIES_MAX as POLICIES_MAX
from sidecar.kernel.limits import PROCS_MAX_DEFAULT as PROCS_MAX_DEFAULT
from sidecar.kernel.limits import PROCS_MAX_RANGE as PROCS_MAX_RANGE
from sidecar.kernel.limits import PROTO_TCP as PROTO_TCP
from sidecar.kernel.limits import PROTO_UDP as PROTO_UDP
from sidecar.kernel.limits import RINGBUF_PAGE_BYTES as RINGBUF_PAGE_BYTES
from sidecar.kernel.limits import RINGBUF_PAGES_DEFAULT as RINGBUF_PAGES_DEFAULT
from sidecar.kernel.limits import RINGBUF_PAGES_MAX as RINGBUF_PAGES_MAX
from sidecar.kernel.limits import RULE_NUMBER_MAX as RULE_NUMBER_MAX
from sidecar.kernel.limits import SOCKET_ALLOW_MAX as SOCKET_ALLOW_MAX
from sidecar.kernel.limits import UNIX_ALLOW_MAX as UNIX_ALLOW_MAX
from sidecar.kernel.limits import UNIX_PATH_LEN as UNIX_PATH_LEN

ABI_VERSION = 3

IDENTITY_NONE = 0
IDENTITY_PENDING = 0xFFFFFFFF

SETTING_ATTEST = 0x1
SETTING_POLICY = 0x2
HEARTBEAT_STALE_NS = 5_000_000_000

POLICY_ENFORCE = 0x1
POLICY_EGRESS_ANY = 0x2
POLICY_EXEC_RESTRICTED = 0x4
POLICY_LOG_ALLOWED = 0x8
POLICY_UNIX_RESTRICTED = 0x10

EXEC_ARGS_TRUNCATED = 0x1
EXEC_NO_ARGS = 0x2
EXEC_FILE_CHANGED = 0x4
EXEC_FILE_UNKNOWN = 0x8
EXEC_PRIVILEGED = 0x10
EXEC_UNTRACKED = 0x20

AF_INET = 2
AF_INET6 = 10
IPPROTO_TCP = 6
IPPROTO_UDP = 17


class EventType(enum.IntEnum):
    EXEC = 1
    FORK = 2
    EXIT = 3
    CONNECT = 4
    SOCKET = 5
    UNIX = 6


class Verdict(enum.IntEnum):
    ALLOW = 1
    DENY = 2
    WOULD_DENY = 3


class Hook(enum.IntEnum):
    CONNECT4 = 1
    CONNECT6 = 2
    SENDMSG4 = 3
    SENDMSG6 = 4
    SOCKET_CREATE = 5
    SETSOCKOPT = 6
    CONNECT_UNIX = 7
    SENDMSG_UNIX = 8


class EventHeader(ctypes.Structure):
    _fields_ = (
        ("type", ctypes.c_uint16),
        ("version", ctypes.c_uint16),
        ("size", ctypes.c_uint32),
        ("ts_ns", ctypes.c_uint64),
    )


class TaskCtx(ctypes.Structure):
    _fields_ = (
        ("pid", ctypes.c_uint32),
        ("tid", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("uid", ctypes.c_uint32),
        ("gid", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("comm", ctypes.c_char * COMM_LEN),
    )


class ExecEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", EventHeader),
        ("task", TaskCtx),
        ("old_pid", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("policy_gen", ctypes.c_uint32),
        ("filename_len", ctypes.c_uint16),
        ("args_len", ctypes.c_uint16),
        ("args_count", ctypes.c_uint16),
        ("verdict", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("exe_dev", ctypes.c_uint32),
        ("caps_refused", ctypes.c_uint64),
        ("caps_host", ctypes.c_uint64),
        ("start_ns", ctypes.c_uint64),
        ("exe_ino", ctypes.c_uint64),
        ("filename", ctypes.c_char * FILENAME_LEN),
        ("args", ctypes.c_uint8 * ARGS_LEN),  # NUL-separated: not c_char, which stops at NUL
    )


class ForkEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", EventHeader),
        ("task", TaskCtx),
        ("child_pid", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class ExitEvent(ctypes.Structure):
    _fields_ = (("hdr", EventHeader), ("task", TaskCtx))


class ConnectEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", EventHeader),
        ("task", TaskCtx),
        ("family", ctypes.c_uint8),
        ("protocol", ctypes.c_uint8),
        ("hook", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("dport", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
        ("daddr", ctypes.c_uint8 * ADDR_LEN),
        ("rule", ctypes.c_uint32),
        ("policy_gen", ctypes.c_uint32),
    )


class SocketEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", EventHeader),
        ("task", TaskCtx),
        ("family", ctypes.c_uint16),
        ("type", ctypes.c_uint16),
        ("protocol", ctypes.c_uint16),
        ("hook", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("level", ctypes.c_int32),
        ("optname", ctypes.c_int32),
        ("policy_gen", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class UnixEvent(ctypes.Structure):
    _fields_ = (
        ("hdr", EventHeader),
        ("task", TaskCtx),
        ("hook", ctypes.c_uint8),
        ("verdict", ctypes.c_uint8),
        ("path_len", ctypes.c_uint16),
        ("policy_gen", ctypes.c_uint32),
        ("path", ctypes.c_uint8 * UNIX_PATH_LEN),
        ("pad", ctypes.c_uint32),
    )


class UnixKey(ctypes.Structure):
    _fields_ = (
        ("prefixlen", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("path", ctypes.c_uint8 * UNIX_PATH_LEN),
    )


class ProcState(ctypes.Structure):
    _fields_ = (
        ("identity", ctypes.c_uint32),
        ("ppid", ctypes.c_uint32),
        ("start_ns", ctypes.c_uint64),
    )


class HandledMark(ctypes.Structure):
    """Only the programs use it: mirrored so the layout test covers it."""

    _fields_ = (
        ("task", ctypes.c_uint64),
        ("key", ctypes.c_uint64),
        ("build", ctypes.c_uint32),
        ("kind", ctypes.c_uint32),
    )


class Settings(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("policy_gen", ctypes.c_uint32),
        ("heartbeat_ns", ctypes.c_uint64),
        ("scope_id", ctypes.c_uint64),
        ("scope_level", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class PolicyKey(ctypes.Structure):
    _fields_ = (("gen", ctypes.c_uint32), ("identity", ctypes.c_uint32))


class IdentityPolicy(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("caps_refused", ctypes.c_uint64),
    )


class EgressKey(ctypes.Structure):
    _fields_ = (
        ("prefixlen", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * ADDR_LEN),
    )


class PortRule(ctypes.Structure):
    _fields_ = (
        ("port_lo", ctypes.c_uint16),
        ("port_hi", ctypes.c_uint16),
        ("protocols", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
        ("rule", ctypes.c_uint16),
    )


class EgressRules(ctypes.Structure):
    _fields_ = (("count", ctypes.c_uint32), ("rules", PortRule * MAX_PORT_RULES))


class ExecKey(ctypes.Structure):
    _fields_ = (
        ("gen", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("dev", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
        ("ino", ctypes.c_uint64),
    )


class ExecFile(ctypes.Structure):
    _fields_ = (
        ("ctime_sec", ctypes.c_uint64),
        ("ctime_nsec", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    )


class SocketKey(ctypes.Structure):
    _fields_ = (
        ("gen", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("family", ctypes.c_uint16),
        ("type", ctypes.c_uint16),
        ("protocol", ctypes.c_uint16),
        ("pad", ctypes.c_uint16),
    )


# Every mirrored struct, by its C name, for the layout test.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "event_header": EventHeader,
    "task_ctx": TaskCtx,
    "exec_event": ExecEvent,
    "fork_event": ForkEvent,
    "exit_event": ExitEvent,
    "connect_event": ConnectEvent,
    "socket_event": SocketEvent,
    "unix_event": UnixEvent,
    "unix_key": UnixKey,
    "proc_state": ProcState,
    "handled_mark": HandledMark,
    "settings": Settings,
    "policy_key": PolicyKey,
    "identity_policy": IdentityPolicy,
    "egress_key": EgressKey,
    "port_rule": PortRule,
    "egress_rules": EgressRules,
    "exec_key": ExecKey,
    "exec_file": ExecFile,
    "socket_key": SocketKey,
}


class DecodeError(ValueError):
    """A record that is too short, of another ABI version, or of an unknown type."""


# Plain slotted classes rather than frozen dataclasses: a frozen dataclass
# costs four times as much to build, and the daemon builds two per record.
@dataclass(slots=True)
class Task:
    pid: int
    tid: int
    ppid: int
    uid: int
    gid: int
    identity: int
    cgroup_id: int
    comm: str


@dataclass(slots=True)
class Exec:
    ts_ns: int
    task: Task
    policy_gen: int
    filename: str
    argv: tuple[str, ...]
    args_truncated: bool
    args_missing: bool
    verdict: Verdict
    flags: int = 0  # EXEC_* as the kernel set them
    caps_refused: int = 0  # EXEC_PRIVILEGED: the capabilities held and refused
    #: The process as the kernel saw it at this exec (attestation reads no
    #: /proc file for these): effective capabilities as they count on the
    #: host, start time in ns since boot, and the running file (kernel
    #: device encoding and inode; 0 when it could not be read).
    caps_host: int = 0
    start_ns: int = 0
    exe_dev: int = 0
    exe_ino: int = 0


@dataclass(slots=True)
class Fork:
    ts_ns: int
    task: Task
    child_pid: int


@dataclass(slots=True)
class Exit:
    ts_ns: int
    task: Task


@dataclass(slots=True)
class Connect:
    ts_ns: int
    task: Task
    family: int
    protocol: int
    hook: Hook
    verdict: Verdict
    address: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    rule: int
    policy_gen: int


@dataclass(slots=True)
class Socket:
    ts_ns: int
    task: Task
    family: int
    type: int
    protocol: int
    hook: Hook
    verdict: Verdict
    level: int
    optname: int
    policy_gen: int


@dataclass(slots=True)
class Unix:
    ts_ns: int
    task: Task
    hook: Hook
    verdict: Verdict
    path: bytes  # sun_path as given: a leading NUL for an abstract name
    policy_gen: int


KernelEvent = Exec | Fork | Exit | Connect | Socket | Unix

_BY_TYPE: dict[int, type[ctypes.Structure]] = {
    EventType.EXEC: ExecEvent,
    EventType.FORK: ForkEvent,
    EventType.EXIT: ExitEvent,
    EventType.CONNECT: ConnectEvent,
    EventType.SOCKET: SocketEvent,
    EventType.UNIX: UnixEvent,
}


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# The decoder reads records with struct (several times faster than ctypes
# per record); the formats are checked against the ctypes mirrors at import,
# and the mirrors against the C header by tests/unit/test_abi_layout.py.
_HEADER = struct.Struct("<HHIQ")
_TASK = struct.Struct(f"<IIIIIIQ{COMM_LEN}s")
_HEADER_TASK = struct.Struct(f"<HHIQIIIIIIQ{COMM_LEN}s")  # both in one call, on the hot path
_EXEC_TAIL = struct.Struct(f"<IIIHHHBBIQQQQ{FILENAME_LEN}s")
_EXEC_FIXED = struct.Struct("<IIIHHHBBIQQQQ")  # the exec tail up to the file name
_FORK_TAIL = struct.Struct("<II")
_CONNECT_TAIL = struct.Struct(f"<BBBBHH{ADDR_LEN}sII")
_SOCKET_TAIL = struct.Struct("<HHHBBiiII")
_UNIX_TAIL = struct.Struct(f"<BBHI{UNIX_PATH_LEN}sI")
_T0 = _HEADER.size
_T1 = _T0 + _TASK.size
_NAME = _T1 + _EXEC_TAIL.size - FILENAME_LEN  # offset of exec_event.filename
_ARGS = _T1 + _EXEC_TAIL.size  # offset of exec_event.args

for _what, _got, _want in (
    ("event_header", _HEADER.size, ctypes.sizeof(EventHeader)),
    ("task_ctx", _TASK.size, ctypes.sizeof(TaskCtx)),
    ("event_header + task_ctx", _HEADER_TASK.size, _T1),
    ("exec_event.args", _ARGS, ExecEvent.args.offset),
    ("exec_event.filename", _NAME, ExecEvent.filename.offset),
    ("exec_event.filename (fixed part)", _T1 + _EXEC_FIXED.size, ExecEvent.filename.offset),
    ("fork_event", _T1 + _FORK_TAIL.size, ctypes.sizeof(ForkEvent)),
    ("exit_event", _T1, ctypes.sizeof(ExitEvent)),
    ("connect_event", _T1 + _CONNECT_TAIL.size, ctypes.sizeof(ConnectEvent)),
    ("socket_event", _T1 + _SOCKET_TAIL.size, ctypes.sizeof(SocketEvent)),
    ("unix_event", _T1 + _UNIX_TAIL.size, ctypes.sizeof(UnixEvent)),
):
    if _got != _want:  # pragma: no cover - a broken build, not bad input
        raise ImportError(f"struct format of {_what} disagrees with its ctypes mirror")

_SIZES = {t: ctypes.sizeof(m) for t, m in _BY_TYPE.items()}

# Policy map entries, packed straight to bytes: a 100,000-rule policy is
# built and written without a Python object per entry.
POLICY_KEY = struct.Struct("<II")  # gen, identity
IDENTITY_POLICY = struct.Struct("<IIQ")  # flags, pad, caps_refused
EGRESS_KEY = struct.Struct(f"<III{ADDR_LEN}s")  # prefixlen, gen, identity, addr
PORT_RULE = struct.Struct("<HHBBH")  # port_lo, port_hi, protocols, pad, rule
EGRESS_RULES_HEAD = struct.Struct("<I")  # count, then MAX_PORT_RULES port rules
EXEC_KEY = struct.Struct("<IIIIQ")  # gen, identity, dev (kernel dev_t), pad, ino
EXEC_FILE = struct.Struct("<QII")  # ctime_sec, ctime_nsec, pad
SOCKET_KEY = struct.Struct("<IIHHHH")  # gen, identity, family, type, protocol, pad
UNIX_KEY = struct.Struct(f"<III{UNIX_PATH_LEN}s")  # prefixlen, gen, identity, path

for _what, _got, _want in (
    ("policy_key", POLICY_KEY.size, ctypes.sizeof(PolicyKey)),
    ("identity_policy", IDENTITY_POLICY.size, ctypes.sizeof(IdentityPolicy)),
    ("egress_key", EGRESS_KEY.size, ctypes.sizeof(EgressKey)),
    ("port_rule", PORT_RULE.size, ctypes.sizeof(PortRule)),
    (
        "egress_rules",
        EGRESS_RULES_HEAD.size + MAX_PORT_RULES * PORT_RULE.size,
        ctypes.sizeof(EgressRules),
    ),
    ("exec_key", EXEC_KEY.size, ctypes.sizeof(ExecKey)),
    ("exec_file", EXEC_FILE.size, ctypes.sizeof(ExecFile)),
    ("socket_key", SOCKET_KEY.size, ctypes.sizeof(SocketKey)),
    ("unix_key", UNIX_KEY.size, ctypes.sizeof(UnixKey)),
):
    if _got != _want:  # pragma: no cover - a broken build, not bad input
        raise ImportError(f"struct format of {_what} disagrees with its ctypes mirror")


def pack_egress_rules(rules: list[tuple[int, int, int, int]]) -> bytes:
    """(port_lo, port_hi, protocols, rule) for each rule, padded to the fixed array."""
    if len(rules) > MAX_PORT_RULES:
        raise ValueError(f"more than {MAX_PORT_RULES} port rules under one prefix")
    body = b"".join(PORT_RULE.pack(lo, hi, proto, 0, rule) for lo, hi, proto, rule in rules)
    return EGRESS_RULES_HEAD.pack(len(rules)) + body.ljust(MAX_PORT_RULES * PORT_RULE.size, b"\0")


def _address(raw: bytes, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == AF_INET and raw[:12] == b"\0" * 10 + b"\xff\xff":
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


# Enum members by value, looked up by index: calling the enum class costs
# more than the rest of a small record's decoding.
_VERDICTS: tuple[Verdict | None, ...] = tuple(
    Verdict(v) if v in Verdict._value2member_map_ else None for v in range(max(Verdict) + 1)
)
_HOOKS: tuple[Hook | None, ...] = tuple(
    Hook(v) if v in Hook._value2member_map_ else None for v in range(max(Hook) + 1)
)

# Process names repeat: decode each distinct one once.
_COMMS: dict[bytes, str] = {}
_COMMS_MAX = 4096


def _comm(raw: bytes) -> str:
    text = _COMMS.get(raw)
    if text is None:
        if len(_COMMS) >= _COMMS_MAX:
            _COMMS.clear()
        text = _COMMS[raw] = _text(raw)
    return text


def _enum(table: tuple[Any, ...], value: int, what: str) -> Any:
    member = table[value] if value < len(table) else None
    if member is None:
        raise DecodeError(f"unknown {what} {value}")
    return member


def decode(data: bytes) -> KernelEvent:
    """Decode one ring-buffer record; raises ``DecodeError`` for anything unexpected."""
    if len(data) < _T1:  # every record is longer: _check says what is wrong with it
        if len(data) < _T0:
            raise DecodeError(f"record of {len(data)} bytes is shorter than its header")
        kind, version, size, _ts = _HEADER.unpack_from(data)
        _check(kind, version, size, len(data))
    kind, version, size, ts_ns, pid, tid, ppid, uid, gid, identity, cgroup_id, comm = (
        _HEADER_TASK.unpack_from(data)
    )
    _check(kind, version, size, len(data))
    task = Task(pid, tid, ppid, uid, gid, identity, cgroup_id, _comm(comm))
    if kind == EventType.FORK:
        return Fork(ts_ns, task, _FORK_TAIL.unpack_from(data, _T1)[0])
    if kind == EventType.EXIT:
        return Exit(ts_ns, task)
    if kind == EventType.EXEC:
        (
            _old,
            flags,
            gen,
            name_len,
            args_len,
            args_count,
            verdict,
            _p,
            exe_dev,
            caps,
            caps_host,
            start_ns,
            exe_ino,
        ) = _EXEC_FIXED.unpack_from(data, _T1)
        # name_len counts the NUL; past the field's end the name was not read whole.
        name_end = _NAME + (name_len - 1 if 0 < name_len <= FILENAME_LEN else 0)
        filename = data[_NAME:name_end].decode("utf-8", "surrogateescape")
        args = data[_ARGS : _ARGS + min(args_len, ARGS_LEN, size - _ARGS)].split(b"\0")
        if len(args) > args_count:
            del args[args_count:]
        argv = tuple([a.decode("utf-8", "surrogateescape") for a in args])
        return Exec(
            ts_ns,
            task,
            gen,
            filename,
            argv,
            bool(flags & EXEC_ARGS_TRUNCATED),
            bool(flags & EXEC_NO_ARGS),
            _enum(_VERDICTS, verdict, "verdict"),
            flags,
            caps,
            caps_host,
            start_ns,
            exe_dev,
            exe_ino,
        )
    if kind == EventType.UNIX:
        hook, verdict, path_len, gen, path, _pad = _UNIX_TAIL.unpack_from(data, _T1)
        return Unix(
            ts_ns,
            task,
            _enum(_HOOKS, hook, "hook"),
            _enum(_VERDICTS, verdict, "verdict"),
            path[: min(path_len, UNIX_PATH_LEN)],
            gen,
        )
    if kind == EventType.SOCKET:
        family, stype, protocol, hook, verdict, level, optname, gen, _pad = (
            _SOCKET_TAIL.unpack_from(data, _T1)
        )
        return Socket(
            ts_ns,
            task,
            family,
            stype,
            protocol,
            _enum(_HOOKS, hook, "hook"),
            _enum(_VERDICTS, verdict, "verdict"),
            level,
            optname,
            gen,
        )
    family, protocol, hook, verdict, dport, _pad, daddr, rule, gen = _CONNECT_TAIL.unpack_from(
        data, _T1
    )
    try:
        address = _address(daddr, family)
    except ValueError as exc:  # pragma: no cover - 16 bytes always make an address
        raise DecodeError(f"ConnectEvent with {exc}") from exc
    return Connect(
        ts_ns,
        task,
        family,
        protocol,
        _enum(_HOOKS, hook, "hook"),
        _enum(_VERDICTS, verdict, "verdict"),
        address,
        dport,
        rule,
        gen,
    )


_decoder: Any = None


def decode_all(raw: list[bytes]) -> tuple[list[KernelEvent], list[int]]:
    """Decode the records of one read in C (``_records.c``, built on the contract
    header): the records decoded, in order, and the indices of those it refused,
    which :func:`decode` then refuses with the reason.  Both decoders build the
    same objects (``tests/unit/test_abi_decode.py`` compares them record by record);
    the C one costs a third as much, which matters in an exec storm."""
    global _decoder
    if _decoder is None:
        from sidecar.kernel import _records

        _decoder = _records.Decoder(
            Task, Exec, Fork, Exit, Connect, Socket, Unix, _VERDICTS, _HOOKS, _address
        )
    return _decoder.decode(raw)  # type: ignore[no-any-return]


def _check(kind: int, version: int, size: int, length: int) -> None:
    if version != ABI_VERSION:
        raise DecodeError(f"record of ABI version {version}, expected {ABI_VERSION}")
    expected = _SIZES.get(kind)
    if expected is None:
        raise DecodeError(f"record of unknown type {kind}")
    if kind == EventType.EXEC:
        # Sent without the unused tail of args: the header says how much came.
        if not _ARGS <= size <= expected or length < size:
            raise DecodeError(
                f"ExecEvent of {length} bytes (header: {size}), expected {_ARGS} to {expected}"
            )
        return
    if length < expected or size != expected:
        raise DecodeError(f"{_BY_TYPE[kind].__name__} of {length} bytes, expected {expected}")
