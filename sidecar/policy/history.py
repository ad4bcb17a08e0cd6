"""Reading the daemon's event history (JSON lines) for the operator tools.

Only ``connect`` and ``exec`` events matter here; every other type is
ignored.  A malformed line or field is a :class:`PolicyError` naming the
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


def parse_events(events: Iterable[HistoryEvent], source: str = "<history>") -> list[Event]:
    """Typed connect and exec events; other event types are skipped."""
    out: list[Event] = []
    for index, raw in enumerate(events):
        where = f"{source}:{raw.get('_line', index + 1)}"
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
