"""The two encodings of an event: a JSON line (the local output) and the wire ``Event``.

Both carry every field of the event's dataclass, so that what a host writes
locally and what the collector stores tell the same story, and each
decodes back into the same object (``tests/unit/test_events.py``).

JSON lines keep the shape the daemon has always written: ``type`` and an
RFC 3339 ``time`` (to the nanosecond) first, absent optional facts left out (``rule`` of an
allowed exec, ``capabilities``, ``args_redacted``, ``attestation``), and
unknown identities as ``null``.  On the wire, fields at their defaults are
not set (proto3), and a process's facts sit in ``process`` except for exec,
whose body has carried them from the start.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from datetime import datetime, timezone
from typing import Any

import orjson

from sidecar.api.v1 import event_pb2 as pb
from sidecar.events import _jsonline
from sidecar.events import model as m

# -- JSON lines --------------------------------------------------------------------------

_PLAIN, _OMIT_EMPTY, _TIME, _PENDING = range(4)
_RENAMED = {"time_ns": "time", "not_after_ns": "not_after", "attestation_pending": "attestation"}
_OMITTED_WHEN_EMPTY = {"args_redacted", "capabilities", "socket", "option", "address"}


def _plan(cls: type[m.Event]) -> tuple[tuple[str, str, int], ...]:
    out = []
    for f in fields(cls):
        if f.name == "time_ns":
            continue  # written first
        if f.name == "not_after_ns":
            mode = _TIME
        elif f.name == "attestation_pending":
            mode = _PENDING
        elif f.name in _OMITTED_WHEN_EMPTY or (cls is m.Exec and f.name == "rule"):
            mode = _OMIT_EMPTY
        else:
            mode = _PLAIN
        out.append((f.name, _RENAMED.get(f.name, f.name), mode))
    return tuple(out)


_PLANS = {cls: _plan(cls) for cls in m.KINDS.values()}

_second = -1
_prefix = ""


def format_time(ns: int) -> str:
    """RFC 3339 UTC to the nanosecond, as the kernel's clock gives it.

    2026-11-29T10:00:00.123456789+00:00; the second's text is cached, since
    events come in time order.
    """
    global _second, _prefix
    second, rest = divmod(ns, 1_000_000_000)
    if second != _second:
        when = datetime.fromtimestamp(second, timezone.utc)
        _prefix = when.strftime("%Y-%m-%dT%H:%M:%S.")
        _second = second
    return _prefix + str(rest).zfill(9) + "+00:00"  # a third cheaper than an f-string


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time, with any number of fraction digits."""
    fraction = 0
    dot = text.find(".", 19)
    if dot == 19:
        end = dot + 1
        while end < len(text) and text[end].isdigit():
            end += 1
        digits = text[dot + 1 : end]
        fraction = int(digits[:9].ljust(9, "0")) if digits else 0
        text = text[:dot] + text[end:]
    when = datetime.fromisoformat(text)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    delta = when - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 10**9 + fraction


def _json_encoder(cls: type[m.Event]) -> Callable[[Any], dict[str, Any]]:
    """A function that writes one kind's JSON object, generated from its plan.

    Up to twice as many events as execs go through here in an exec storm: a
    generated function with the keys as constants and one attribute access
    per field costs about a third of a loop over the plan.
    """
    plain = [f"{key!r}: ev.{name}" for name, key, mode in _PLANS[cls] if mode == _PLAIN]
    lines = [
        "def encode(ev):",
        f"    out = {{'type': {cls.KIND!r}, 'time': format_time(ev.time_ns), {', '.join(plain)}}}",
    ]
    for name, key, mode in _PLANS[cls]:
        if mode == _OMIT_EMPTY:
            lines += [f"    if ev.{name}:", f"        out[{key!r}] = ev.{name}"]
        elif mode == _PENDING:
            lines += [f"    if ev.{name}:", f"        out[{key!r}] = 'pending'"]
        elif mode == _TIME:
            lines.append(f"    out[{key!r}] = format_time(ev.{name})")
    lines.append("    return out")
    scope: dict[str, Any] = {"format_time": format_time}
    exec("\n".join(lines), scope)  # the text comes from our own dataclasses
    encode: Callable[[Any], dict[str, Any]] = scope["encode"]
    return encode


_ENCODERS = {cls: _json_encoder(cls) for cls in m.KINDS.values()}
# The same objects built in C from the same plans (_jsonline.c), three times
# cheaper; None for a time outside what C's calendar writes as Python does.
# Keys in the order the Python encoder writes them: the plain fields, then the others.
_C_ENCODERS: dict[type[m.Event], Callable[[Any], dict[str, Any] | None]] = {
    cls: _jsonline.Plan(
        cls, cls.KIND, tuple(sorted(_PLANS[cls], key=lambda entry: entry[2] != _PLAIN))
    ).encode
    for cls in m.KINDS.values()
}


def to_json(ev: m.Event) -> dict[str, Any]:
    """The event as its JSON line's object."""
    return _C_ENCODERS[type(ev)](ev) or _ENCODERS[type(ev)](ev)


def _printable_text(text: str) -> str:
    """``text`` as valid Unicode: bytes that were not UTF-8 written as ``\\xNN``.

    The kernel gives names and arguments as bytes, decoded with
    surrogateescape so that the daemon can use them as paths; neither
    encoding can carry those surrogates.
    """
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # a surrogate no decoding made: write it as \\udNNN
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return raw.decode("utf-8", "backslashreplace")


def _printable_value(value: Any) -> Any:
    if isinstance(value, str):
        return _printable_text(value)
    if isinstance(value, tuple):
        return tuple(_printable_value(v) for v in value)
    if isinstance(value, dict):
        return {_printable_value(k): _printable_value(v) for k, v in value.items()}
    return value


def printable(ev: m.Event) -> m.Event:
    """The event as both encodings carry it: every text valid Unicode (itself if it is).

    A program named with bytes that are not UTF-8, or run with such arguments,
    must still be recorded, not make its event (and the batch with it) fail
    to encode.
    """
    changes = {}
    for f in fields(ev):
        value = getattr(ev, f.name)
        shown = _printable_value(value)
        if shown != value:
            changes[f.name] = shown
    return replace(ev, **changes) if changes else ev


def encode_json(ev: m.Event) -> bytes:
    """One JSON line, newline included."""
    try:
        return orjson.dumps(to_json(ev), option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:  # text that is not valid Unicode (see printable)
        return orjson.dumps(to_json(printable(ev)), option=orjson.OPT_APPEND_NEWLINE)


def write_json_lines(events: Sequence[m.Event], write: Callable[[bytes], object]) -> None:
    """Hand ``write`` the JSON line of each event in turn (:func:`encode_json` of each).

    Line by line into a buffered file rather than joined first: each line is
    then freed as soon as it is copied, and in an exec storm that made
    encoding half as costly as keeping a batch's lines alive to join them.
    """
    fast, encoders, dumps, newline = _C_ENCODERS, _ENCODERS, orjson.dumps, orjson.OPT_APPEND_NEWLINE
    for ev in events:
        kind = type(ev)
        try:
            line = dumps(fast[kind](ev) or encoders[kind](ev), option=newline)
        except TypeError:  # text that is not valid Unicode (see printable)
            line = encode_json(ev)
        write(line)


def from_json(obj: dict[str, Any]) -> m.Event:
    """The event a JSON line's object encodes; ValueError for an unknown kind or a missing field."""
    cls = m.KINDS.get(obj.get("type", ""))
    if cls is None:
        raise ValueError(f"unknown event type {obj.get('type')!r}")
    args: dict[str, Any] = {}
    for name, key, mode in _PLANS[cls]:
        if key not in obj:
            continue  # left out because empty: the dataclass default says what
        value = obj[key]
        if mode == _TIME:
            value = parse_time(value)
        elif mode == _PENDING:
            value = value == "pending"
        elif isinstance(value, list):
            value = tuple(value)
        args[name] = value
    try:
        return cls(time_ns=parse_time(obj["time"]), **args)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{cls.KIND} event: {exc}") from exc


# -- the wire ------------------------------------------------------------------------------

_VERDICT = {"allow": pb.VERDICT_ALLOW, "deny": pb.VERDICT_DENY, "would_deny": pb.VERDICT_WOULD_DENY}
_VERDICT_NAME: dict[int, m.Verdict] = {v: k for k, v in _VERDICT.items()}  # type: ignore[misc]
_FAMILY = {"inet": pb.ADDRESS_FAMILY_INET, "inet6": pb.ADDRESS_FAMILY_INET6}
_FAMILY_NAME = {v: k for k, v in _FAMILY.items()}
_PROTOCOL = {"tcp": pb.PROTOCOL_TCP, "udp": pb.PROTOCOL_UDP}
_PROTOCOL_NAME = {v: k for k, v in _PROTOCOL.items()}


def _process(out: pb.Event, ev: m.ProcessEvent) -> None:
    p = out.process
    p.pid = ev.pid
    if ev.instance_id:
        p.instance_id = ev.instance_id
    if ev.attestation_pending:
        p.attestation_pending = True
    p.comm = ev.comm
    if isinstance(ev, m.Exec):
        return  # the exec body carries the rest
    p.ppid = ev.ppid
    p.uid = ev.uid
    p.gid = ev.gid
    p.exe = ev.exe
    p.argv.extend(ev.argv)
    p.cgroup = ev.cgroup


def to_proto(ev: m.Event) -> pb.Event:
    """The wire form of an event; the exporter fills in boot id and sequence."""
    try:
        return _to_proto(ev)
    except (UnicodeEncodeError, ValueError):  # text that is not valid Unicode
        return _to_proto(printable(ev))


def _to_proto(ev: m.Event) -> pb.Event:
    out = pb.Event(time_ns=ev.time_ns, host=ev.host)
    if ev.identity:
        out.identity = ev.identity
    if ev.svid_serial:
        out.credential_serial = ev.svid_serial
    if ev.policy_version:
        out.policy_version = ev.policy_version
    if isinstance(ev, m.ProcessEvent):
        _process(out, ev)
    elif ev.instance_id:
        out.process.instance_id = ev.instance_id
    if isinstance(ev, m.Exec):
        x = out.exec
        x.pid, x.ppid, x.uid, x.gid = ev.pid, ev.ppid, ev.uid, ev.gid
        x.exe = ev.exe
        x.argv.extend(ev.argv)
        x.cgroup = ev.cgroup
        x.verdict = _VERDICT[ev.verdict]
        if ev.rule:
            x.rule = ev.rule
        x.filename = ev.filename
        x.args_truncated = ev.args_truncated
        x.args_redacted = ev.args_redacted
        x.capabilities.extend(ev.capabilities)
    elif isinstance(ev, m.Fork):
        out.fork.parent_pid = ev.ppid
        out.fork.child_pid = ev.pid
    elif isinstance(ev, m.Exit):
        out.exit.pid = ev.pid
    elif isinstance(ev, m.Connect):
        c = out.connect
        c.pid = ev.pid
        c.family = _FAMILY.get(ev.family, pb.ADDRESS_FAMILY_UNSPECIFIED)
        c.protocol = _PROTOCOL.get(ev.protocol, pb.PROTOCOL_UNSPECIFIED)
        c.address = ev.daddr
        c.port = ev.dport
        c.verdict = _VERDICT[ev.verdict]
        c.rule = ev.rule
        c.hook = ev.hook
    elif isinstance(ev, m.Socket):
        k = out.socket
        k.pid = ev.pid
        k.operation = ev.operation
        k.kind = ev.socket or ev.option or ev.address or ""
        k.verdict = _VERDICT[ev.verdict]
        k.rule = ev.rule
        k.family = ev.family
    elif isinstance(ev, (m.CredentialIssued, m.CredentialRevoked)):
        body = (
            out.credential_issued if isinstance(ev, m.CredentialIssued) else out.credential_revoked
        )
        body.serial = ev.svid_serial or ""
        body.spiffe_id = ev.identity or ""
        body.not_after_ns = ev.not_after_ns
    elif isinstance(ev, m.PolicyLoaded):
        body_p = out.policy_loaded
        body_p.version = ev.policy_version or ""
        body_p.source = ev.source
        body_p.identities.extend(ev.identities)
    elif isinstance(ev, (m.PolicyRejected, m.EntriesRejected)):
        out.policy_rejected.what = "policy" if isinstance(ev, m.PolicyRejected) else "entries"
        out.policy_rejected.error = ev.error
    elif isinstance(ev, m.EntriesLoaded):
        out.entries_loaded.digest = ev.digest
    elif isinstance(ev, m.Lost):
        for name, n in sorted(ev.counts.items()):
            out.lost.counts.add(kind=name, reason=ev.reason, count=n)
    else:  # pragma: no cover - every kind is above; the round-trip test proves it
        raise TypeError(f"no wire form for {type(ev).__name__}")
    return out


def _header(wire: pb.Event) -> dict[str, Any]:
    return {
        "time_ns": wire.time_ns,
        "host": wire.host,
        "identity": wire.identity or None,
        "instance_id": wire.process.instance_id or None,
        "svid_serial": wire.credential_serial or None,
        "policy_version": wire.policy_version or None,
    }


def _process_fields(wire: pb.Event) -> dict[str, Any]:
    p = wire.process
    return {
        "pid": p.pid,
        "ppid": p.ppid,
        "uid": p.uid,
        "gid": p.gid,
        "comm": p.comm,
        "exe": p.exe,
        "argv": tuple(p.argv),
        "cgroup": p.cgroup,
        "attestation_pending": p.attestation_pending,
    }


def from_proto(wire: pb.Event) -> m.Event:
    """The event a wire ``Event`` encodes; ValueError for a body this host never sends."""
    head = _header(wire)
    body = wire.WhichOneof("body")
    if body == "exec":
        x = wire.exec
        return m.Exec(
            **head,
            pid=x.pid,
            ppid=x.ppid,
            uid=x.uid,
            gid=x.gid,
            comm=wire.process.comm,
            exe=x.exe,
            argv=tuple(x.argv),
            cgroup=x.cgroup,
            attestation_pending=wire.process.attestation_pending,
            filename=x.filename,
            args_truncated=x.args_truncated,
            args_redacted=x.args_redacted,
            verdict=_VERDICT_NAME[x.verdict],
            rule=x.rule or None,
            capabilities=tuple(x.capabilities),
        )
    if body == "fork":
        return m.Fork(**head, **_process_fields(wire))
    if body == "exit":
        return m.Exit(**head, **_process_fields(wire))
    if body == "connect":
        c = wire.connect
        return m.Connect(
            **head,
            **_process_fields(wire),
            family=_FAMILY_NAME.get(c.family, str(c.family)),
            protocol=_PROTOCOL_NAME.get(c.protocol, str(c.protocol)),
            daddr=c.address,
            dport=c.port,
            hook=c.hook,
            verdict=_VERDICT_NAME[c.verdict],
            rule=c.rule,
        )
    if body == "socket":
        k = wire.socket
        return m.Socket(
            **head,
            **_process_fields(wire),
            family=k.family,
            operation=k.operation,  # type: ignore[arg-type]
            verdict=_VERDICT_NAME[k.verdict],
            rule=k.rule,
            socket=k.kind if k.operation == "create" else None,
            option=k.kind if k.operation == "setsockopt" else None,
            address=k.kind if k.operation in ("connect", "sendmsg") else None,
        )
    if body in ("credential_issued", "credential_revoked"):
        cred = wire.credential_issued if body == "credential_issued" else wire.credential_revoked
        cls = m.CredentialIssued if body == "credential_issued" else m.CredentialRevoked
        head["identity"] = cred.spiffe_id or None
        head["svid_serial"] = cred.serial or None
        return cls(**head, not_after_ns=cred.not_after_ns)
    if body == "policy_loaded":
        pl = wire.policy_loaded
        head["policy_version"] = pl.version or None
        return m.PolicyLoaded(**head, source=pl.source, identities=tuple(pl.identities))
    if body == "policy_rejected":
        pr = wire.policy_rejected
        rejected = m.PolicyRejected if pr.what == "policy" else m.EntriesRejected
        return rejected(**head, error=pr.error)
    if body == "entries_loaded":
        return m.EntriesLoaded(**head, digest=wire.entries_loaded.digest)
    if body == "lost":
        counts = {c.kind: c.count for c in wire.lost.counts}
        reason = wire.lost.counts[0].reason if wire.lost.counts else ""
        return m.Lost(**head, reason=reason, counts=counts)
    raise ValueError(f"no host event has the body {body!r}")
