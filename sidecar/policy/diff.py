"""What a policy change grants and takes away, per identity.

The diff compares meaning, not text: a renamed rule, a reordered list or a
CIDR split in two halves shows no change.  An identity the policy does not
list is governed by ``defaults.unidentified`` (every destination, or none)
and its execs are not restricted, exactly as in the kernel; so adding an
identity under ``unidentified: allow`` takes destinations away, and
removing one grants them.  Executables: ``None`` means unrestricted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sidecar.policy import caps
from sidecar.policy.allowset import AllowSet, Destination
from sidecar.policy.compiled import CompiledIdentity, CompiledPolicy
from sidecar.policy.model import format_socket_kind, format_unix_address

ExecList = tuple[str, ...] | None  # None: any executable
MAX_TEXT_DESTINATIONS = 40


@dataclass(frozen=True)
class IdentityDiff:
    spiffe_id: str
    change: str  # added | removed | changed
    mode_before: str | None  # None: not in the policy
    mode_after: str | None
    gained: tuple[Destination, ...]
    lost: tuple[Destination, ...]
    exec_before: ExecList
    exec_after: ExecList
    # Other grants, by name (sockets, unix, capabilities): (before, after); None: any.
    grants: tuple[tuple[str, ExecList, ExecList], ...] = ()

    def grant_lines(self) -> list[str]:
        lines: list[str] = []
        for name, before, after in self.grants:
            if after is None:
                lines.append(f"+ {name}: any (unrestricted)")
            elif before is None:
                lines.append(f"- {name}: any; now only: {', '.join(after) or 'nothing'}")
            else:
                lines += [f"+ {name} {x}" for x in sorted(set(after) - set(before))]
                lines += [f"- {name} {x}" for x in sorted(set(before) - set(after))]
        return lines

    @property
    def exec_gained(self) -> tuple[str, ...]:
        if self.exec_after is None or self.exec_before is None:
            return ()
        return tuple(sorted(set(self.exec_after) - set(self.exec_before)))

    @property
    def exec_lost(self) -> tuple[str, ...]:
        if self.exec_after is None or self.exec_before is None:
            return ()
        return tuple(sorted(set(self.exec_before) - set(self.exec_after)))

    def exec_lines(self) -> list[str]:
        before, after = self.exec_before, self.exec_after
        if before == after:
            return []
        if after is None:
            return ["+ exec: any executable (unrestricted)"]
        if before is None:
            kept = ", ".join(after) if after else "nothing"
            return [f"- exec: any executable; now only: {kept}"]
        return [f"+ exec {p}" for p in self.exec_gained] + [f"- exec {p}" for p in self.exec_lost]

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.spiffe_id,
            "change": self.change,
            "mode": {"before": self.mode_before, "after": self.mode_after},
            "gained": [d.to_json() for d in self.gained],
            "lost": [d.to_json() for d in self.lost],
            "grants": {
                name: {
                    "before": None if before is None else list(before),
                    "after": None if after is None else list(after),
                }
                for name, before, after in self.grants
            },
            "exec": {
                "before": None if self.exec_before is None else list(self.exec_before),
                "after": None if self.exec_after is None else list(self.exec_after),
                "gained": list(self.exec_gained),
                "lost": list(self.exec_lost),
                "unrestricted_before": self.exec_before is None,
                "unrestricted_after": self.exec_after is None,
            },
        }


@dataclass(frozen=True)
class PolicyDiff:
    old_version: str
    new_version: str
    defaults: tuple[tuple[str, str, str], ...]  # (field, before, after)
    identities: tuple[IdentityDiff, ...]

    @property
    def empty(self) -> bool:
        return not self.defaults and not self.identities

    def render_text(self) -> str:
        lines = [f"policy {self.old_version} -> {self.new_version}"]
        if self.empty:
            lines.append("no change in what any identity may do")
        for name, before, after in self.defaults:
            lines.append(f"defaults.{name}: {before} -> {after}")
        for d in self.identities:
            lines.append(f"{d.spiffe_id} ({d.change})")
            if d.mode_before != d.mode_after:
                lines.append(
                    f"  mode: {d.mode_before or 'unlisted'} -> {d.mode_after or 'unlisted'}"
                )
            lines.extend(_limited("+", d.gained))
            lines.extend(_limited("-", d.lost))
            lines.extend(f"  {line}" for line in d.exec_lines())
            lines.extend(f"  {line}" for line in d.grant_lines())
        return "\n".join(lines) + "\n"

    def to_json(self) -> dict[str, Any]:
        return {
            "old_version": self.old_version,
            "new_version": self.new_version,
            "defaults": [{"field": f, "before": b, "after": a} for f, b, a in self.defaults],
            "identities": [d.to_json() for d in self.identities],
        }


def _limited(sign: str, dests: tuple[Destination, ...]) -> list[str]:
    out = [f"  {sign} {dest.describe()}" for dest in dests[:MAX_TEXT_DESTINATIONS]]
    if len(dests) > MAX_TEXT_DESTINATIONS:
        out.append(f"  {sign} ... {len(dests) - MAX_TEXT_DESTINATIONS} more (see --json)")
    return out


def _exec(ci: CompiledIdentity | None) -> ExecList:
    if ci is None or ci.exec_paths is None:
        return None  # unlisted identities' execs are not restricted
    return tuple(sorted(ci.exec_paths))


def _grants(policy: CompiledPolicy, ci: CompiledIdentity | None) -> dict[str, ExecList]:
    """What an identity may use besides destinations and executables; None: any."""
    unlisted_any = policy.unidentified == "allow"
    if ci is None:
        anything: ExecList = None if unlisted_any else ()
        return {"sockets": anything, "unix": None, "capabilities": None}
    return {
        "sockets": tuple(sorted(format_socket_kind(k) for k in ci.sockets)),
        "unix": None if ci.unix is None else tuple(sorted(format_unix_address(a) for a in ci.unix)),
        "capabilities": tuple(sorted(caps.label(n) for n in ci.capabilities)),
    }


def diff(old: CompiledPolicy, new: CompiledPolicy) -> PolicyDiff:
    """Per identity: destinations and executables gained and lost, and mode changes."""
    defaults: list[tuple[str, str, str]] = []
    if old.unidentified != new.unidentified:
        defaults.append(("unidentified", old.unidentified, new.unidentified))
    if old.log_allowed != new.log_allowed:
        defaults.append(("log_allowed", str(old.log_allowed).lower(), str(new.log_allowed).lower()))
    out: list[IdentityDiff] = []
    for sid in sorted(set(old.identities) | set(new.identities)):
        before, after = old.identities.get(sid), new.identities.get(sid)
        a, b = AllowSet.of(old, sid), AllowSet.of(new, sid)
        gained, lost = b.difference(a), a.difference(b)
        mode_before = before.mode if before else None
        mode_after = after.mode if after else None
        exec_before, exec_after = _exec(before), _exec(after)
        g_before, g_after = _grants(old, before), _grants(new, after)
        grants = tuple(
            (name, g_before[name], g_after[name])
            for name in g_before
            if g_before[name] != g_after[name]
        )
        if (
            not gained
            and not lost
            and mode_before == mode_after
            and exec_before == exec_after
            and not grants
        ):
            continue
        change = "added" if before is None else "removed" if after is None else "changed"
        out.append(
            IdentityDiff(
                sid,
                change,
                mode_before,
                mode_after,
                gained.destinations(),
                lost.destinations(),
                exec_before,
                exec_after,
                grants,
            )
        )
    return PolicyDiff(old.version, new.version, tuple(defaults), tuple(out))
