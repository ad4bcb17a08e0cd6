"""The daemon's events (plain dicts, as written to JSON lines) as wire ``Event`` messages.

One mapping, used by the exporter's caller: every field the JSON line has
that the wire format carries lands in the same place, so a collector's
record and a host's local log tell the same story.  The exporter fills in
host, boot id and sequence.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sidecar.api.v1 import event_pb2 as pb

_VERDICT = {
    "allow": pb.VERDICT_ALLOW,
    "deny": pb.VERDICT_DENY,
    "would_deny": pb.VERDICT_WOULD_DENY,
}
_FAMILY = {"inet": pb.ADDRESS_FAMILY_INET, "inet6": pb.ADDRESS_FAMILY_INET6}
_PROTOCOL = {"tcp": pb.PROTOCOL_TCP, "udp": pb.PROTOCOL_UDP}


def _ns(iso: str | None) -> int:
    if not iso:
        return 0
    return int(datetime.fromisoformat(iso).timestamp() * 1e9)


def to_proto(ev: dict[str, Any]) -> pb.Event | None:
    """The wire form of one daemon event; None for kinds the collector does not keep."""
    out = pb.Event(
        host=ev.get("host") or "",
        time_ns=_ns(ev.get("time")),
        identity=ev.get("identity") or "",
        credential_serial=ev.get("svid_serial") or "",
        policy_version=ev.get("policy_version") or "",
    )
    if "pid" in ev:
        out.process.pid = ev["pid"]
    if ev.get("instance_id"):
        out.process.instance_id = ev["instance_id"]
    kind = ev["type"]
    if kind == "exec":
        out.exec.CopyFrom(
            pb.Exec(
                pid=ev["pid"],
                ppid=ev.get("ppid") or 0,
                uid=ev["uid"],
                gid=ev["gid"],
                exe=ev.get("exe") or "",
                argv=ev.get("argv") or [],
                cgroup=ev.get("cgroup") or "",
                verdict=_VERDICT.get(ev.get("verdict", ""), pb.VERDICT_UNSPECIFIED),
                rule=ev.get("rule") or "",
            )
        )
    elif kind == "fork":
        out.fork.CopyFrom(pb.Fork(parent_pid=ev.get("ppid") or 0, child_pid=ev["pid"]))
    elif kind == "exit":
        out.exit.CopyFrom(pb.Exit(pid=ev["pid"]))
    elif kind == "connect":
        out.connect.CopyFrom(
            pb.Connect(
                pid=ev["pid"],
                family=_FAMILY.get(ev["family"], pb.ADDRESS_FAMILY_UNSPECIFIED),
                protocol=_PROTOCOL.get(ev["protocol"], pb.PROTOCOL_UNSPECIFIED),
                address=ev["daddr"],
                port=ev["dport"],
                verdict=_VERDICT.get(ev["verdict"], pb.VERDICT_UNSPECIFIED),
                rule=ev.get("rule") or "",
            )
        )
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
