"""The admin views: what ``sidecar status`` and ``sidecar identities`` show of a running daemon.

Thread: the event loop (the admin socket's handlers run there).
"""

from __future__ import annotations

import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from sidecar.policy import caps
from sidecar.proc.read import read_host_caps

if TYPE_CHECKING:
    from sidecar.daemon.core import Daemon


def status(d: Daemon) -> dict[str, Any]:
    from sidecar.kernel.loader import CGROUP_HOOKS, TRACEPOINTS

    active = d.enforcer.active if d.enforcer else None
    modes = {}
    if active is not None and active.policy is not None:
        modes = {sid: i.mode for sid, i in active.policy.identities.items()}
    live: Counter[str] = Counter()
    if d.instances is not None:
        live.update(str(i.spiffe_id) for i in d.instances.all())
    identities = {
        sid: {"live_instances": live.get(sid, 0), "mode": modes.get(sid)}
        for sid in sorted(set(live) | set(modes))
    }
    unix_problem = d.kernel.unix_problem if d.kernel is not None else "not loaded"
    return {
        "host": d.config.host,
        "uptime_seconds": round((time.monotonic_ns() - d.started_ns) / 1e9, 1),
        "scope": str(d.scope),
        "pin_dir": str(d.config.pin_dir),
        "programs": {
            "tracepoints": [f"{c}:{e}" for _p, _f, c, e in TRACEPOINTS],
            "cgroup_hooks": [p for p, *_ in CGROUP_HOOKS],
            "unix_sockets": "judged" if unix_problem is None else f"not judged: {unix_problem}",
            "attach_seconds": round(d.attach_seconds, 2),
        },
        "processes_in_scope": len(d.table),
        "identities": identities,
        "policy": {
            "version": active.version if active else None,
            "file": str(d.config.policy) if d.config.policy else None,
            "last_error": d.policy_error,
        },
        "events": dict(d.counts),
        "losses": {
            "kernel": {t.name.lower(): n for t, n in d.lost_reported.items() if n},
            "decode_errors": d.decode_errors,
        },
        "collector": _collector_status(d),
    }


def _collector_status(d: Daemon) -> dict[str, Any]:
    if d.exporter is None:
        return {"state": "not configured", "spool_depth": 0}
    spool = d.exporter.spool
    state = {"streaming": "connected", "backoff": "reconnecting"}.get(d.stream_state(), "stopped")
    return {
        "state": state,
        # The replica streamed to now (or tried next), of all those configured.
        "address": d.exporter.address,
        "addresses": list(d.config.collector),
        "failovers": d.exporter.failovers,
        "spool_depth": spool.pending(),
        "acked_sequence": spool.acked,
        "dropped": sum(d.exporter.dropped.values()),
        "last_error": d.exporter.last_error,
        **_credential_status(d),
    }


def _credential_status(d: Daemon) -> dict[str, Any]:
    from sidecar.export.enroll import credential_expiry

    expiry = credential_expiry(d.config.collector_credentials)
    return {
        "host_svid_expires": (e.isoformat() if (e := expiry["host_svid"]) else None),
        "intermediate_expires": (e.isoformat() if (e := expiry["intermediate"]) else None),
        "renewals": d.renewer.renewals if d.renewer is not None else 0,
        "renewal_error": d.renewer.last_error if d.renewer is not None else None,
    }


def identities(d: Daemon) -> dict[str, Any]:
    if d.instances is None:
        return {"instances": []}
    out = []
    for inst in d.instances.all():
        row = inst.describe(d.manager)
        row.update(privilege_of(d, inst.pid, str(inst.spiffe_id)))
        out.append(row)
    return {"instances": out}


def privilege_of(d: Daemon, pid: int, spiffe_id: str) -> dict[str, Any]:
    """Capabilities that matter, held now, and whether they could switch enforcement off."""
    held = read_host_caps(pid) or 0
    active = d.enforcer.active if d.enforcer is not None else None
    ci = active.policy.identities.get(spiffe_id) if active and active.policy else None
    dangerous = caps.mask({caps.NUMBERS[n] for n in caps.DANGEROUS})
    notable = caps.mask({caps.NUMBERS[n] for n in caps.NOTABLE})
    return {
        "capabilities": caps.labels(held & (dangerous | notable)),
        # Held, and not refused: its policy accepts them, or no policy lists it.
        "can_disable_enforcement": bool(
            held & dangerous & ~(caps.refused_mask(ci.capabilities) if ci else 0)
        ),
    }
