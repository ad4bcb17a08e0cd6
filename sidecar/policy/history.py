"""Reading event history (JSON lines) for the operator tools.

Two shapes are read, line by line, in any mix:

- the daemon's local output (``--output``, or its stdout): flat objects with
  a ``type`` (``{"type": "connect", "daddr": ..., "dport": ...}``);
- what ``sidecar tail --json`` prints: a collector's stored event, the
  protobuf JSON of ``StoredEvent`` (``{"cursor": ..., "event": {"connect":
  {"address": ..., "port": ...}}}``), decoded here with the message itself.

Only ``connect``, ``exec`` and unix ``socket`` events matter here; other
types are ignored.  A line in neither shape is counted by
:func:`unrecognised`, so that a tool can say so instead of learning from
nothing.  A malformed line or field is a :class:`PolicyError` naming the
file, the line and the field, because a suggestion learnt from a history
that was silently half-read would be wrong in a way nobody sees.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format

from sidecar.api.v1 import collector_pb2, event_pb2
from sidecar.policy.model import PROTOCOL_BITS
from sidecar.policy.space import parse_address
from sidecar.util.errors import PolicyError
from sidecar.util.inputs import is_stdin, read_lines, source_name

_logger = logging.getLogger(__name__)

MAX_HISTORY_BYTES = 1024 * 1024 * 1024
VERDICTS = ("allow", "deny", "would_deny")

HistoryEvent = Mapping[str, Any]


@dataclass(frozen=True)
class ConnectEvent:
    identity: str | None
    protocol: str
    address: int  # in the 128-bit space (IPv4 mapped)
    port: int
    verdict: str


@dataclass(frozen=True)
class ExecEvent:
    identity: str | None
    exe: str
    verdict: str


@dataclass(frozen=True)
class UnixEvent:
    identity: str | None
    address: str  # as a policy's unix list spells it: /run/x.sock or @name
    verdict: str


Event = ConnectEvent | ExecEvent | UnixEvent


def read_history(path: str | Path) -> list[dict[str, Any]]:
    """Read a JSON-lines history file (``-``: standard input); blank lines are skipped.

    Each event gets a ``_line`` key (its line number) unless it has one, so
    that a bad field found later can still be reported at its line.
    """
    name = source_name(path)
    if not is_stdin(path):
        try:
            size = Path(path).stat().st_size
        except OSError as exc:
            raise PolicyError(f"{name}: cannot read: {exc.strerror or exc}") from exc
        if size > MAX_HISTORY_BYTES:
            raise PolicyError(f"{name}: history is larger than {MAX_HISTORY_BYTES} bytes")
    events: list[dict[str, Any]] = []
    for number, line in read_lines(path, PolicyError, MAX_HISTORY_BYTES):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise PolicyError(f"{name}:{number}: not a JSON event: {exc.msg}") from exc
        if not isinstance(value, dict):
            raise PolicyError(f"{name}:{number}: an event must be a JSON object")
        value.setdefault("_line", number)
        events.append(value)
    return events


def _is_daemon_event(raw: HistoryEvent) -> bool:
    return isinstance(raw.get("type"), str)


def _is_stored_event(raw: HistoryEvent) -> bool:
    return isinstance(raw.get("event"), dict)


def unrecognised(events: Iterable[HistoryEvent]) -> tuple[int, int | None]:
    """How many events are in neither shape this module reads, and the line of the first."""
    count, first = 0, None
    for index, raw in enumerate(events):
        if not (_is_daemon_event(raw) or _is_stored_event(raw)):
            count += 1
            if first is None:
                first = int(raw.get("_line", index + 1))
    return count, first


_PROTOCOL_NAMES = {event_pb2.PROTOCOL_TCP: "tcp", event_pb2.PROTOCOL_UDP: "udp"}
_VERDICT_NAMES = {
    event_pb2.VERDICT_ALLOW: "allow",
    event_pb2.VERDICT_DENY: "deny",
    event_pb2.VERDICT_WOULD_DENY: "would_deny",
}
_UNIX_OPERATIONS = ("connect", "sendmsg")  # a Socket body's operations on unix sockets


def _stored_event(raw: HistoryEvent, where: str) -> Event | None:
    """A typed event from one line of ``sidecar tail --json``; None for other kinds."""
    message = collector_pb2.StoredEvent()
    try:
        json_format.ParseDict({k: v for k, v in raw.items() if k != "_line"}, message)
    except json_format.ParseError as exc:
        raise PolicyError(
            f"{where}: not a stored event as 'sidecar tail --json' prints: {exc}"
        ) from exc
    ev = message.event
    identity = ev.identity or None
    kind = ev.WhichOneof("body")
    if kind == "connect":
        body: Any = ev.connect
    elif kind == "exec":
        body = ev.exec
    elif kind == "socket" and ev.socket.operation in _UNIX_OPERATIONS:
        body = ev.socket
    else:
        return None
    verdict = _VERDICT_NAMES.get(body.verdict)
    if verdict is None:
        raise PolicyError(f"{where}: event.{kind}.verdict: must be one of {', '.join(VERDICTS)}")
    if kind == "socket":
        if not body.kind:
            raise PolicyError(f"{where}: event.socket.kind: must be a unix socket address")
        return UnixEvent(identity, body.kind, verdict)
    if kind == "exec":
        if not body.exe:
            raise PolicyError(f"{where}: event.exec.exe: must be a non-empty string")
        return ExecEvent(identity, body.exe, verdict)
    protocol = _PROTOCOL_NAMES.get(body.protocol)
    if protocol is None:
        raise PolicyError(f"{where}: event.connect.protocol: must be PROTOCOL_TCP or PROTOCOL_UDP")
    if body.port > 65535:
        raise PolicyError(f"{where}: event.connect.port: must be an integer in 0-65535")
    try:
        address = parse_address(body.address)
    except ValueError as exc:
        raise PolicyError(f"{where}: event.connect.address: {exc}") from exc
    return ConnectEvent(identity, protocol, address, body.port, verdict)


def parse_events(events: Iterable[HistoryEvent], source: str = "<history>") -> list[Event]:
    """Typed connect, exec and unix events of either shape; other events are skipped."""
    out: list[Event] = []
    for index, raw in enumerate(events):
        where = f"{source}:{raw.get('_line', index + 1)}"
        if not _is_daemon_event(raw):
            if _is_stored_event(raw):
                stored = _stored_event(raw, where)
                if stored is not None:
                    out.append(stored)
            continue
        kind = raw.get("type")
        if kind == "socket" and raw.get("family") == "unix":
            kind = "unix"
        elif kind not in ("connect", "exec"):
            continue
        identity = raw.get("identity")
        if identity is not None and not isinstance(identity, str):
            raise PolicyError(f"{where}: identity: must be a string or null")
        verdict = raw.get("verdict")
        if verdict not in VERDICTS:
            raise PolicyError(f"{where}: verdict: must be one of {', '.join(VERDICTS)}")
        if kind == "unix":
            address = raw.get("address")
            if not isinstance(address, str) or not address:
                raise PolicyError(f"{where}: address: must be a non-empty string")
            out.append(UnixEvent(identity, address, verdict))
            continue
        if kind == "exec":
            exe = raw.get("exe")
            if not isinstance(exe, str) or not exe:
                raise PolicyError(f"{where}: exe: must be a non-empty string")
            out.append(ExecEvent(identity, exe, verdict))
            continue
        protocol = raw.get("protocol")
        if protocol not in PROTOCOL_BITS:
            raise PolicyError(f"{where}: protocol: must be tcp or udp")
        port = raw.get("dport")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise PolicyError(f"{where}: dport: must be an integer in 0-65535")
        daddr = raw.get("daddr")
        if not isinstance(daddr, str):
            raise PolicyError(f"{where}: daddr: must be an address string")
        try:
            address = parse_address(daddr)
        except ValueError as exc:
            raise PolicyError(f"{where}: daddr: {exc}") from exc
        out.append(ConnectEvent(identity, protocol, address, port, verdict))
    return out
