"""The product's events, one typed object per kind from the moment the daemon makes one.

Each kind is a slotted dataclass; its fields are the keys of its JSON line,
and every one of them has a place in ``event.proto`` (``tests/unit/
test_events.py`` checks both ways).  The two encodings, JSON lines for the
local output and the protobuf ``Event`` for the collector, live in
:mod:`sidecar.events.codec`; nothing else builds or parses an event.

Time is kept as nanoseconds since the Unix epoch, as the kernel's clock
gives it; the JSON encoding writes it as RFC 3339 to the nanosecond.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, TypeVar

Verdict = Literal["allow", "deny", "would_deny"]


@dataclass(slots=True, kw_only=True)
class Event:
    """What every event carries: when, where, and (where it has one) who."""

    KIND: ClassVar[str] = ""

    time_ns: int
    host: str
    identity: str | None = None  # SPIFFE ID, None when unattested
    instance_id: str | None = None
    svid_serial: str | None = None  # hex; None until the instance asked for a credential
    policy_version: str | None = None


@dataclass(slots=True, kw_only=True)
class ProcessEvent(Event):
    """An event about one process, from one kernel record."""

    pid: int
    ppid: int
    uid: int
    gid: int
    comm: str
    exe: str
    argv: tuple[str, ...]
    cgroup: str
    attestation_pending: bool = False  # JSON: "attestation": "pending"


@dataclass(slots=True, kw_only=True)
class Exec(ProcessEvent):
    KIND: ClassVar[str] = "exec"

    filename: str
    args_truncated: bool
    verdict: Verdict
    args_redacted: bool = False
    rule: str | None = None  # None when allowed
    capabilities: tuple[str, ...] = ()


@dataclass(slots=True, kw_only=True)
class Fork(ProcessEvent):
    """``pid`` is the child, ``ppid`` the parent."""

    KIND: ClassVar[str] = "fork"


@dataclass(slots=True, kw_only=True)
class Exit(ProcessEvent):
    KIND: ClassVar[str] = "exit"


@dataclass(slots=True, kw_only=True)
class Connect(ProcessEvent):
    KIND: ClassVar[str] = "connect"

    family: str  # inet, inet6
    protocol: str  # tcp, udp
    daddr: str
    dport: int
    hook: str
    verdict: Verdict
    rule: str


@dataclass(slots=True, kw_only=True)
class Socket(ProcessEvent):
    """A socket judged when made, an option refused, or a unix address connected or sent to.

    Exactly one of ``socket`` (create), ``option`` (setsockopt) and
    ``address`` (unix connect/sendmsg) is set.
    """

    KIND: ClassVar[str] = "socket"

    family: str
    operation: Literal["create", "setsockopt", "connect", "sendmsg"]
    verdict: Verdict
    rule: str
    socket: str | None = None
    option: str | None = None
    address: str | None = None


@dataclass(slots=True, kw_only=True)
class CredentialIssued(Event):
    KIND: ClassVar[str] = "credential_issued"

    not_after_ns: int  # JSON: "not_after", RFC 3339


@dataclass(slots=True, kw_only=True)
class CredentialRevoked(Event):
    KIND: ClassVar[str] = "credential_revoked"

    not_after_ns: int


@dataclass(slots=True, kw_only=True)
class PolicyLoaded(Event):
    KIND: ClassVar[str] = "policy_loaded"

    source: str
    identities: tuple[str, ...]


@dataclass(slots=True, kw_only=True)
class PolicyRejected(Event):
    """A policy file that failed to load; the one in force keeps enforcing."""

    KIND: ClassVar[str] = "policy_rejected"

    error: str  # file:line: field: message


@dataclass(slots=True, kw_only=True)
class EntriesLoaded(Event):
    KIND: ClassVar[str] = "entries_loaded"

    digest: str


@dataclass(slots=True, kw_only=True)
class EntriesRejected(Event):
    KIND: ClassVar[str] = "entries_rejected"

    error: str


@dataclass(slots=True, kw_only=True)
class Lost(Event):
    """Kernel records that could not be reserved, counted by kind."""

    KIND: ClassVar[str] = "lost"

    reason: str
    counts: dict[str, int] = field(default_factory=dict)


KINDS: dict[str, type[Event]] = {
    cls.KIND: cls
    for cls in (
        Exec,
        Fork,
        Exit,
        Connect,
        Socket,
        CredentialIssued,
        CredentialRevoked,
        PolicyLoaded,
        PolicyRejected,
        EntriesLoaded,
        EntriesRejected,
        Lost,
    )
}


E = TypeVar("E", bound=Event)


def positional(cls: type[E]) -> Callable[..., E]:
    """A constructor of ``cls`` that takes every field, in declaration order, positionally.

    For the daemon's hot path only: in an exec storm it builds two process
    events per exec, and matching some twenty keyword arguments cost more
    than building the event.  It sets the same fields the dataclass would,
    and ``tests/unit/test_events.py`` checks it builds equal events.
    """
    names = [f.name for f in fields(cls)]
    body = "".join(f"    ev.{name} = {name}\n" for name in names)
    text = f"def make({', '.join(names)}):\n    ev = new(cls)\n{body}    return ev\n"
    scope: dict[str, Any] = {"new": object.__new__, "cls": cls}
    exec(text, scope)  # the text comes from the dataclass's own field names
    make: Callable[..., E] = scope["make"]
    return make
