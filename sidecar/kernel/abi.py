"""ctypes mirrors of ``bpf/include/events.h`` and the decoder of ring-buffer records.

This module does not import bcc: the decoder is plain Python over bytes, so
it is unit-tested without a kernel.  ``tests/unit/test_abi_layout.py``
compiles the C header and proves every size and offset here matches it.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import struct
from dataclasses import dataclass

ABI_VERSION = 1
COMM_LEN = 16
FILENAME_LEN = 256
ARGS_LEN = 1024
ARG_MAX = 256
MAX_ARGS = 32
MAX_PORT_RULES = 8

IDENTITY_NONE = 0
IDENTITY_PENDING = 0xFFFFFFFF

SETTING_ATTEST = 0x1
SETTING_POLICY = 0x2
HEARTBEAT_STALE_NS = 5_000_000_000

POLICY_ENFORCE = 0x1
POLICY_EGRESS_ANY = 0x2
POLICY_EXEC_RESTRICTED = 0x4
POLICY_LOG_ALLOWED = 0x8

PROTO_TCP = 0x1
PROTO_UDP = 0x2

EXEC_ARGS_TRUNCATED = 0x1
EXEC_NO_ARGS = 0x2

AF_INET = 2
AF_INET6 = 10
IPPROTO_TCP = 6
IPPROTO_UDP = 17


class EventType(enum.IntEnum):
    EXEC = 1
    FORK = 2
    EXIT = 3
    CONNECT = 4


class Verdict(enum.IntEnum):
    ALLOW = 1
    DENY = 2
    WOULD_DENY = 3


class Hook(enum.IntEnum):
    CONNECT4 = 1
    CONNECT6 = 2
    SENDMSG4 = 3
    SENDMSG6 = 4


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
        ("daddr", ctypes.c_uint8 * 16),
        ("rule", ctypes.c_uint32),
        ("policy_gen", ctypes.c_uint32),
    )


class ProcState(ctypes.Structure):
    _fields_ = (("identity", ctypes.c_uint32), ("ppid", ctypes.c_uint32))


class Settings(ctypes.Structure):
    _fields_ = (
        ("flags", ctypes.c_uint32),
        ("policy_gen", ctypes.c_uint32),
        ("heartbeat_ns", ctypes.c_uint64),
    )


class PolicyKey(ctypes.Structure):
    _fields_ = (("gen", ctypes.c_uint32), ("identity", ctypes.c_uint32))


class IdentityPolicy(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint32), ("pad", ctypes.c_uint32))


class EgressKey(ctypes.Structure):
    _fields_ = (
        ("prefixlen", ctypes.c_uint32),
        ("gen", ctypes.c_uint32),
        ("identity", ctypes.c_uint32),
        ("addr", ctypes.c_uint8 * 16),
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
        ("path", ctypes.c_char * FILENAME_LEN),
    )


# Every mirrored struct, by its C name, for the layout test.
MIRRORS: dict[str, type[ctypes.Structure]] = {
    "event_header": EventHeader,
    "task_ctx": TaskCtx,
    "exec_event": ExecEvent,
    "fork_event": ForkEvent,
    "exit_event": ExitEvent,
    "connect_event": ConnectEvent,
    "proc_state": ProcState,
    "settings": Settings,
    "policy_key": PolicyKey,
    "identity_policy": IdentityPolicy,
    "egress_key": EgressKey,
    "port_rule": PortRule,
    "egress_rules": EgressRules,
    "exec_key": ExecKey,
}


class DecodeError(ValueError):
    """A record that is too short, of another ABI version, or of an unknown type."""


@dataclass(frozen=True, slots=True)
class Task:
    pid: int
    tid: int
    ppid: int
    uid: int
    gid: int
    identity: int
    cgroup_id: int
    comm: str


@dataclass(frozen=True, slots=True)
class Exec:
    ts_ns: int
    task: Task
    policy_gen: int
    filename: str
    argv: tuple[str, ...]
    args_truncated: bool
    args_missing: bool
    verdict: Verdict


@dataclass(frozen=True, slots=True)
class Fork:
    ts_ns: int
    task: Task
    child_pid: int


@dataclass(frozen=True, slots=True)
class Exit:
    ts_ns: int
    task: Task


@dataclass(frozen=True, slots=True)
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


KernelEvent = Exec | Fork | Exit | Connect

_BY_TYPE: dict[int, type[ctypes.Structure]] = {
    EventType.EXEC: ExecEvent,
    EventType.FORK: ForkEvent,
    EventType.EXIT: ExitEvent,
    EventType.CONNECT: ConnectEvent,
}


def _text(raw: bytes) -> str:
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


# The decoder reads records with struct (several times faster than ctypes
# per record); the formats are checked against the ctypes mirrors at import,
# and the mirrors against the C header by tests/unit/test_abi_layout.py.
_HEADER = struct.Struct("<HHIQ")
_TASK = struct.Struct("<IIIIIIQ16s")
_EXEC_TAIL = struct.Struct(f"<IIIHHHBB{FILENAME_LEN}s")
_FORK_TAIL = struct.Struct("<II")
_CONNECT_TAIL = struct.Struct("<BBBBHH16sII")
_T0 = _HEADER.size
_T1 = _T0 + _TASK.size

for _what, _got, _want in (
    ("event_header", _HEADER.size, ctypes.sizeof(EventHeader)),
    ("task_ctx", _TASK.size, ctypes.sizeof(TaskCtx)),
    ("exec_event.args", _T1 + _EXEC_TAIL.size, ExecEvent.args.offset),
    ("fork_event", _T1 + _FORK_TAIL.size, ctypes.sizeof(ForkEvent)),
    ("exit_event", _T1, ctypes.sizeof(ExitEvent)),
    ("connect_event", _T1 + _CONNECT_TAIL.size, ctypes.sizeof(ConnectEvent)),
):
    if _got != _want:  # pragma: no cover - a broken build, not bad input
        raise ImportError(f"struct format of {_what} disagrees with its ctypes mirror")

_SIZES = {t: ctypes.sizeof(m) for t, m in _BY_TYPE.items()}

# Policy map entries, packed straight to bytes: a 100,000-rule policy is
# built and written without a Python object per entry.
POLICY_KEY = struct.Struct("<II")  # gen, identity
IDENTITY_POLICY = struct.Struct("<II")  # flags, pad
EGRESS_KEY = struct.Struct("<III16s")  # prefixlen, gen, identity, addr
PORT_RULE = struct.Struct("<HHBBH")  # port_lo, port_hi, protocols, pad, rule
EGRESS_RULES_HEAD = struct.Struct("<I")  # count, then MAX_PORT_RULES port rules
EXEC_KEY = struct.Struct(f"<II{FILENAME_LEN}s")  # gen, identity, path

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
):
    if _got != _want:  # pragma: no cover - a broken build, not bad input
        raise ImportError(f"struct format of {_what} disagrees with its ctypes mirror")


def pack_egress_rules(rules: list[tuple[int, int, int, int]]) -> bytes:
    """(port_lo, port_hi, protocols, rule) for each rule, padded to the fixed array."""
    if len(rules) > MAX_PORT_RULES:
        raise ValueError(f"more than {MAX_PORT_RULES} port rules under one prefix")
    body = b"".join(PORT_RULE.pack(lo, hi, proto, 0, rule) for lo, hi, proto, rule in rules)
    return EGRESS_RULES_HEAD.pack(len(rules)) + body.ljust(MAX_PORT_RULES * PORT_RULE.size, b"\0")


def _task(data: bytes) -> Task:
    pid, tid, ppid, uid, gid, identity, cgroup_id, comm = _TASK.unpack_from(data, _T0)
    return Task(pid, tid, ppid, uid, gid, identity, cgroup_id, _text(comm))


def _address(raw: bytes, family: int) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if family == AF_INET and raw[:12] == b"\0" * 10 + b"\xff\xff":
        return ipaddress.IPv4Address(raw[12:])
    return ipaddress.IPv6Address(raw)


def decode(data: bytes) -> KernelEvent:
    """Decode one ring-buffer record; raises ``DecodeError`` for anything unexpected."""
    if len(data) < _HEADER.size:
        raise DecodeError(f"record of {len(data)} bytes is shorter than its header")
    kind, version, size, ts_ns = _HEADER.unpack_from(data)
    if version != ABI_VERSION:
        raise DecodeError(f"record of ABI version {version}, expected {ABI_VERSION}")
    expected = _SIZES.get(kind)
    if expected is None:
        raise DecodeError(f"record of unknown type {kind}")
    if len(data) < expected or size != expected:
        raise DecodeError(f"{_BY_TYPE[kind].__name__} of {len(data)} bytes, expected {expected}")
    try:
        return _convert(kind, ts_ns, data)
    except ValueError as exc:
        raise DecodeError(f"{_BY_TYPE[kind].__name__} with {exc}") from exc


def _convert(kind: int, ts_ns: int, data: bytes) -> KernelEvent:
    task = _task(data)
    if kind == EventType.EXEC:
        _old, flags, gen, _flen, args_len, args_count, verdict, _pad, filename = (
            _EXEC_TAIL.unpack_from(data, _T1)
        )
        start = _T1 + _EXEC_TAIL.size
        args = data[start : start + min(args_len, ARGS_LEN)]
        argv = tuple(a.decode("utf-8", "surrogateescape") for a in args.split(b"\0")[:args_count])
        return Exec(
            ts_ns=ts_ns,
            task=task,
            policy_gen=gen,
            filename=_text(filename),
            argv=argv,
            args_truncated=bool(flags & EXEC_ARGS_TRUNCATED),
            args_missing=bool(flags & EXEC_NO_ARGS),
            verdict=Verdict(verdict),
        )
    if kind == EventType.FORK:
        child, _pad = _FORK_TAIL.unpack_from(data, _T1)
        return Fork(ts_ns=ts_ns, task=task, child_pid=child)
    if kind == EventType.EXIT:
        return Exit(ts_ns=ts_ns, task=task)
    family, protocol, hook, verdict, dport, _pad, daddr, rule, gen = _CONNECT_TAIL.unpack_from(
        data, _T1
    )
    return Connect(
        ts_ns=ts_ns,
        task=task,
        family=family,
        protocol=protocol,
        hook=Hook(hook),
        verdict=Verdict(verdict),
        address=_address(daddr, family),
        port=dport,
        rule=rule,
        policy_gen=gen,
    )
