"""Terminal renderings of the daemon's admin answers (``sidecar status``, ``identities``)."""

from __future__ import annotations

from typing import Any


def render_status(s: dict[str, Any]) -> str:
    lines = [
        f"host          {s['host']}   up {s['uptime_seconds']} s",
        f"scope         {s['scope']}   ({s['processes_in_scope']} processes)",
        f"pins          {s['pin_dir']}",
        "programs      " + ", ".join(s["programs"]["tracepoints"]),
        "cgroup hooks  "
        + ", ".join(s["programs"]["cgroup_hooks"])
        + f"   (attached in {s['programs']['attach_seconds']} s)",
    ]
    pol = s["policy"]
    lines.append(f"policy        {pol['version'] or 'none (observe only)'}   {pol['file'] or ''}")
    if pol.get("last_error"):
        lines.append(f"              last reload rejected: {pol['last_error']}")
    lines.append("identities")
    if not s["identities"]:
        lines.append("  (none)")
    for sid, info in s["identities"].items():
        lines.append(f"  {sid:50} {info['mode'] or '-':8} live {info['live_instances']}")
    losses = s["losses"]
    kernel = ", ".join(f"{k} {v}" for k, v in losses["kernel"].items()) or "none"
    lines.append(f"losses        kernel: {kernel}; decode errors: {losses['decode_errors']}")
    col = s["collector"]
    where = ""
    if col.get("address"):
        # Which replica it streams to, when several are configured.
        n = len(col.get("addresses") or [col["address"]])
        where = f" {col['address']}" + (f" (of {n} replicas)" if n > 1 else "")
    lines.append(f"collector     {col['state']}{where}   spool depth {col['spool_depth']}")
    events = ", ".join(f"{k} {v}" for k, v in sorted(s["events"].items())) or "none yet"
    lines.append(f"events        {events}")
    return "\n".join(lines)


def render_identities(answer: dict[str, Any]) -> str:
    rows = answer.get("instances", [])
    if not rows:
        return "no attested instances"
    out = []
    for r in rows:
        out.append(
            f"{r['spiffe_id']}  pid {r['pid']}  instance {r['instance_id']}\n"
            f"    exe {r['exe']}  entry {r['entry']}\n"
            f"    selectors {', '.join(r['selectors'])}\n"
            f"    svid {r['svid_serial']}  expires {r['svid_expires']}"
            + (
                f"\n    capabilities {', '.join(r['capabilities'])}"
                if r.get("capabilities")
                else ""
            )
            + (
                "\n    CAN DISABLE ENFORCEMENT: holds capabilities its policy does not refuse"
                if r.get("can_disable_enforcement")
                else ""
            )
        )
    return "\n".join(out)
