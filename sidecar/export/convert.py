"""The daemon's events (plain dicts, as written to JSON lines) as wire ``Event`` messages.

One mapping, used by the exporter's caller: every field the JSON line has
that the wire format carries lands in the same place, so a collector's
record and a host's local log tell the same story.  The exporter fills in
host, boot id and sequence.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sidecar.api.v1 import event_pb2 as pb

_VERDICT = {
    "allow": pb.VERDICT_ALLOW,
    "deny": pb.VERDICT_DENY,
    "would_deny": pb.VERDICT_WOULD_DENY,
}
_FAMILY = {"inet": pb.ADDRESS_FAMILY_INET, "inet6": pb.ADDRESS_FAMILY_INET6}
_PROTOCOL = {"tcp": pb.PROTOCOL_TCP, "udp": pb.PROTOCOL_UDP}


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)

# Epoch seconds of the "YYYY-MM-DDTHH:MM:SS" prefixes seen lately: events
# come in time order, so a handful covers them.
_SECONDS: dict[str, int] = {}


def _ns(iso: str | None) -> int:
    """Nanoseconds since the epoch of an RFC 3339 time, exact to the microsecond.

    The daemon writes "YYYY-MM-DDTHH:MM:SS.ffffff+00:00"; that shape is read
    without a datetime per event, anything else through ``fromisoformat``.
    Integer arithmetic throughout: a float timestamp loses ~100 ns here.
    """
    if not iso:
        return 0
    if len(iso) == 32 and iso[19] == "." and iso.endswith("+00:00"):
        prefix = iso[:19]
        seconds = _SECONDS.get(prefix)
        if seconds is None:
            if len(_SECONDS) >= 64:
                _SECONDS.clear()
            when = datetime.fromisoformat(prefix).replace(tzinfo=timezone.utc)
            seconds = _SECONDS[prefix] = int(when.timestamp())
        return (seconds * 1_000_000 + int(iso[20:26])) * 1000
    when = datetime.fromisoformat(iso)
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    delta = when - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 10**9 + delta.microseconds * 1000


def to_proto(ev: dict[str, Any]) -> pb.Event | None:
    """The wire form of one daemon event; None for kinds the collector does not keep.

    Runs for every event streamed: sub-messages are filled in place, and
    fields left at their defaults are not set at all.
    """
    out = pb.Event(time_ns=_ns(ev.get("time")))
    host = ev.get("host")
    if host:
        out.host = host
    identity = ev.get("identity")
    if identity:
        out.identity = identity
    serial = ev.get("svid_serial")
    if serial:
        out.credential_serial = serial
    version = ev.get("policy_version")
    if version:
        out.policy_version = version
    if "pid" in ev:
        out.process.pid = ev["pid"]
    instance = ev.get("instance_id")
    if instance:
        out.process.instance_id = instance
    kind = ev["type"]
    if kind == "exec":
        x = out.exec
        x.pid = ev["pid"]
        x.ppid = ev.get("ppid") or 0
        x.uid = ev["uid"]
        x.gid = ev["gid"]
        x.exe = ev.get("exe") or ""
        x.argv.extend(ev.get("argv") or ())
        x.cgroup = ev.get("cgroup") or ""
        x.verdict = _VERDICT.get(ev.get("verdict", ""), pb.VERDICT_UNSPECIFIED)
        rule = ev.get("rule")
        if rule:
            x.rule = rule
    elif kind == "fork":
        f = out.fork
        f.parent_pid = ev.get("ppid") or 0
        f.child_pid = ev["pid"]
    elif kind == "exit":
        out.exit.pid = ev["pid"]
    elif kind == "connect":
        c = out.connect
        c.pid = ev["pid"]
        c.family = _FAMILY.get(ev["family"], pb.ADDRESS_FAMILY_UNSPECIFIED)
        c.protocol = _PROTOCOL.get(ev["protocol"], pb.PROTOCOL_UNSPECIFIED)
        c.address = ev["daddr"]
        c.port = ev["dport"]
        c.verdict = _VERDICT.get(ev["verdict"], pb.VERDICT_UNSPECIFIED)
        rule = ev.get("rule")
        if rule:
            c.rule = rule
    elif kind == "socket":
        k = out.socket
        k.pid = ev["pid"]
        k.operation = ev["operation"]
        k.kind = ev.get("socket") or ev.get("option") or ev.get("address") or ""
        k.verdict = _VERDICT.get(ev["verdict"], pb.VERDICT_UNSPECIFIED)
        k.rule = ev.get("rule") or ""
    elif kind in ("credential_issued", "credential_revoked"):
        body = out.credential_issued if kind == "credential_issued" else out.credential_revoked
        body.serial = ev["svid_serial"]
        body.spiffe_id = ev["identity"]
        body.not_after_ns = _ns(ev.get("not_after"))
    elif kind == "policy_loaded":
        out.policy_loaded.version = ev["policy_version"]
    elif kind in ("policy_rejected", "entries_rejected"):
        out.policy_rejected.what = kind.split("_", 1)[0]
        out.policy_rejected.error = ev["error"]
    elif kind == "lost":
        for name, n in sorted(ev["counts"].items()):
            out.lost.counts.add(kind=name, reason=ev.get("reason", ""), count=n)
    else:
        return None
    return out
