"""Learning an allowlist from audit-mode history.

The suggestion allows exactly what was observed and nothing more: each
observed destination address is a /32 (IPv4) or /128 (IPv6) entry, with the
exact ports and protocols it was seen on; consecutive ports are written as
one range (the same set, fewer entries).  Addresses seen on the same ports
and protocols share one rule.  Widening is opt-in:

- ``merge_cidrs=N`` merges observed addresses that differ only in their last
  ``32 - N`` bits (a /N for IPv4, the same number of host bits for IPv6)
  into that prefix, when at least two observed addresses share it; the
  prefix gets the union of their ports and protocols.
- ``merge_ports=True`` widens each prefix's ports to one range per protocol,
  from the lowest to the highest observed port.

One limit forces widening on its own: the kernel scans at most
:data:`MAX_RULES_PER_PREFIX` port rules per prefix, so an address seen on
more separate port ranges than that has its closest ranges joined, and the
output says so in a comment.

:func:`suggest_into` merges what was observed into an existing policy instead:
its rules, executables and settings are kept as they are, and only what
they do not allow yet is added (as above); the result is validated.

Only ``allow`` and ``would_deny`` events are learnt from (what the workload
did, or would have done, in audit mode); ``deny`` events were blocked
attempts and are left out unless ``include_denied`` is set, and events of
processes without identity are skipped.  Both are counted in the header.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from sidecar.identity.spiffeid import parse_spiffe_id
from sidecar.policy import caps
from sidecar.policy.compiled import MAX_RULES_PER_PREFIX, CompiledPolicy, compile_policy
from sidecar.policy.evaluate import decide_value
from sidecar.policy.history import ConnectEvent, ExecEvent, HistoryEvent, UnixEvent, parse_events
from sidecar.policy.load import parse_policy_text
from sidecar.policy.model import (
    PROTOCOL_BITS,
    EgressRule,
    IdentitySpec,
    PolicySpec,
    PortRange,
    UnixAddress,
    exec_path_problem,
    format_socket_kind,
    format_unix_address,
    parse_unix_address,
)
from sidecar.policy.space import ADDRESS_BITS, Cidr, format_address
from sidecar.util.errors import PolicyError

_logger = logging.getLogger(__name__)

MAX_COMMENT_LINES_PER_RULE = 20
_PROTOS = tuple(PROTOCOL_BITS)

Point = tuple[str, int, int]  # protocol, address, port


@dataclass
class _Observed:
    points: Counter[Point] = field(default_factory=Counter)
    execs: Counter[str] = field(default_factory=Counter)
    unix: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True)
class _Rule:
    protocols: tuple[str, ...]
    ports: tuple[PortRange, ...]
    blocks: tuple[Cidr, ...]
    widened: bool


def _ranges(ports: Iterable[int]) -> list[PortRange]:
    out: list[list[int]] = []
    for p in sorted(set(ports)):
        if out and p == out[-1][1] + 1:
            out[-1][1] = p
        else:
            out.append([p, p])
    return [(a, b) for a, b in out]


def _port_rule_count(by_proto: dict[str, list[PortRange]]) -> int:
    if len(by_proto) == 2 and by_proto["tcp"] == by_proto["udp"]:
        return len(by_proto["tcp"])
    return sum(len(r) for r in by_proto.values())


def _fit(by_proto: dict[str, list[PortRange]]) -> bool:
    """Join the closest port ranges until the prefix fits the kernel; True if widened."""
    widened = False
    while _port_rule_count(by_proto) > MAX_RULES_PER_PREFIX:
        folded = len(by_proto) == 2 and by_proto["tcp"] == by_proto["udp"]
        best: tuple[int, str, int] | None = None
        for proto, rs in by_proto.items():
            for i in range(len(rs) - 1):
                gap = rs[i + 1][0] - rs[i][1]
                if best is None or gap < best[0]:
                    best = (gap, proto, i)
        assert best is not None  # more than MAX ranges means some proto has two
        _, proto, i = best
        for p in ("tcp", "udp") if folded else (proto,):
            rs = by_proto[p]
            rs[i : i + 2] = [(rs[i][0], rs[i + 1][1])]
        widened = True
    return widened


def _blocks(addresses: Iterable[int], merge_cidrs: int | None) -> dict[int, Cidr]:
    """Each observed address -> the prefix it is written under."""
    addrs = set(addresses)
    if merge_cidrs is None:
        return {a: Cidr(a, ADDRESS_BITS) for a in addrs}
    host_bits = 32 - merge_cidrs
    members = Counter(a >> host_bits for a in addrs)
    out: dict[int, Cidr] = {}
    for a in addrs:
        key = a >> host_bits
        if members[key] >= 2:
            out[a] = Cidr(key << host_bits, ADDRESS_BITS - host_bits)
        else:
            out[a] = Cidr(a, ADDRESS_BITS)
    return out


def _rules(obs: _Observed, block_of: dict[int, Cidr], merge_ports: bool) -> list[_Rule]:
    ports: dict[Cidr, dict[str, set[int]]] = {}
    for proto, address, port in obs.points:
        ports.setdefault(block_of[address], {}).setdefault(proto, set()).add(port)
    grouped: dict[tuple[tuple[str, ...], tuple[PortRange, ...], bool], list[Cidr]] = {}
    for block, by_proto_set in ports.items():
        by_proto = {p: _ranges(by_proto_set[p]) for p in _PROTOS if p in by_proto_set}
        if merge_ports:
            by_proto = {p: [(rs[0][0], rs[-1][1])] for p, rs in by_proto.items()}
        widened = _fit(by_proto)
        components: list[tuple[tuple[str, ...], tuple[PortRange, ...]]]
        if len(by_proto) == 2 and by_proto["tcp"] == by_proto["udp"]:
            components = [(("tcp", "udp"), tuple(by_proto["tcp"]))]
        else:
            components = [((p,), tuple(rs)) for p, rs in by_proto.items()]
        for protos, ranges in components:
            grouped.setdefault((protos, ranges, widened), []).append(block)
    rules = [
        _Rule(protos, ranges, tuple(sorted(blocks)), widened)
        for (protos, ranges, widened), blocks in grouped.items()
    ]
    return sorted(rules, key=lambda r: (r.protocols, r.ports, r.blocks))


def _rule_name(rule: _Rule, taken: set[str]) -> str:
    lo, hi = rule.ports[0]
    base = "-".join(rule.protocols) + "-" + (str(lo) if lo == hi else f"{lo}-{hi}")
    if len(rule.ports) > 1:
        base += "-more"
    name, n = base, 2
    while name in taken:
        name = f"{base}-{n}"
        n += 1
    taken.add(name)
    return name


def _valid_identity(value: str) -> bool:
    try:
        return bool(parse_spiffe_id(value).path)
    except ValueError:
        return False


def _q(text: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(text)


def _port_text(ports: tuple[PortRange, ...]) -> str:
    return ", ".join(str(lo) if lo == hi else _q(f"{lo}-{hi}") for lo, hi in ports)


def _render_rule(
    rule: _Rule, name: str, by_block: dict[Cidr, list[tuple[int, Point]]]
) -> list[str]:
    mine = sorted(
        (
            (count, point)
            for block in rule.blocks
            for count, point in by_block[block]
            if point[0] in rule.protocols and any(lo <= point[2] <= hi for lo, hi in rule.ports)
        ),
        key=lambda cp: (-cp[0], cp[1]),
    )
    total = sum(c for c, _ in mine)
    lines = [f"      # {total} connection(s) observed"]
    for count, (proto, address, port) in mine[:MAX_COMMENT_LINES_PER_RULE]:
        lines.append(f"      #   {format_address(address)} {proto}/{port}: {count}")
    if len(mine) > MAX_COMMENT_LINES_PER_RULE:
        lines.append(f"      #   ... and {len(mine) - MAX_COMMENT_LINES_PER_RULE} more")
    if rule.widened:
        lines.append(
            f"      # ports widened: the kernel scans at most {MAX_RULES_PER_PREFIX} "
            "port rules per prefix"
        )
    lines.append(f"      - name: {_q(name)}")
    lines.append(f"        cidrs: [{', '.join(_q(str(b)) for b in rule.blocks)}]")
    lines.append(f"        ports: [{_port_text(rule.ports)}]")
    lines.append(f"        protocols: [{', '.join(rule.protocols)}]")
    return lines


def _render_identity(
    sid: str, obs: _Observed, merge_cidrs: int | None, merge_ports: bool
) -> list[str]:
    out = [f"  - id: {_q(sid)}", "    mode: enforce"]
    block_of = _blocks((a for _, a, _ in obs.points), merge_cidrs)
    by_block: dict[Cidr, list[tuple[int, Point]]] = {}
    for point, count in obs.points.items():
        by_block.setdefault(block_of[point[1]], []).append((count, point))
    rules = _rules(obs, block_of, merge_ports)
    if not rules:
        out.append("    egress: []  # no connection observed")
    else:
        out.append("    egress:")
        taken: set[str] = set()
        for rule in rules:
            out.extend(_render_rule(rule, _rule_name(rule, taken), by_block))
    if not obs.execs:
        out.append("    exec: []  # no exec observed")
    else:
        out.append("    exec:")
        for exe, count in sorted(obs.execs.items()):
            out.append(f"      - {_q(exe)}  # {count} exec(s) observed")
    if obs.unix:
        out.append("    unix:")
        for addr, count in sorted(obs.unix.items()):
            out.append(f"      - {_q(addr)}  # {count} use(s) observed")
    return out


def _observe(
    history_events: Iterable[HistoryEvent], include_denied: bool, source: str
) -> tuple[dict[str, _Observed], Counter[str], int]:
    """What each identity was seen doing, what was skipped and why, and how many
    connect/exec events there were."""
    learnt = ("allow", "would_deny", "deny") if include_denied else ("allow", "would_deny")
    observed: dict[str, _Observed] = {}
    skipped: Counter[str] = Counter()
    events = parse_events(history_events, source)
    for ev in events:
        if ev.identity is None:
            skipped["events of processes without identity"] += 1
        elif not _valid_identity(ev.identity):
            skipped["events with an identity that is not a workload SPIFFE ID"] += 1
        elif ev.verdict not in learnt:
            skipped["denied (blocked) attempts"] += 1
        elif isinstance(ev, ConnectEvent):
            if ev.port == 0:
                skipped["connections to port 0"] += 1
            else:
                obs = observed.setdefault(ev.identity, _Observed())
                obs.points[(ev.protocol, ev.address, ev.port)] += 1
        elif isinstance(ev, UnixEvent):
            try:
                parse_unix_address(ev.address)
            except ValueError:
                skipped["unix socket addresses a policy cannot name (relative paths)"] += 1
                continue
            observed.setdefault(ev.identity, _Observed()).unix[ev.address] += 1
        elif isinstance(ev, ExecEvent):
            if exec_path_problem(ev.exe) is not None:
                skipped[
                    "execs of paths a policy cannot name (not absolute and normal, or too long)"
                ] += 1
                continue
            observed.setdefault(ev.identity, _Observed()).execs[ev.exe] += 1
    return observed, skipped, len(events)


def _check_merge(merge_cidrs: int | None) -> None:
    if merge_cidrs is not None and not 0 <= merge_cidrs <= 32:
        raise ValueError(f"merge_cidrs must be an IPv4 prefix length 0-32, not {merge_cidrs}")


def suggest(
    history_events: Iterable[HistoryEvent],
    merge_cidrs: int | None = None,
    merge_ports: bool = False,
    *,
    include_denied: bool = False,
    source: str = "<history>",
) -> str:
    """A policy YAML that allows what the history shows each identity doing."""
    _check_merge(merge_cidrs)
    observed, skipped, n_events = _observe(history_events, include_denied, source)
    out = [
        f"# Suggested by 'sidecar policy suggest' from {n_events} connect/exec event(s).",
        "# It allows exactly what was observed"
        + (" (widened where asked)." if merge_cidrs is not None or merge_ports else "."),
        "# Review it before applying: its identities are in enforce mode.",
    ]
    out.extend(f"# skipped {n} {why}" for why, n in sorted(skipped.items()))
    out += [
        "apiVersion: sidecar/v1",
        "kind: Policy",
        "defaults:",
        "  unidentified: allow",
        "  pending: deny",
        "  log_allowed: false",
    ]
    out.append("identities:" if observed else "identities: []")
    for sid in sorted(observed):
        out.extend(_render_identity(sid, observed[sid], merge_cidrs, merge_ports))
    _logger.debug("suggested rules for %d identities", len(observed))
    return "\n".join(out) + "\n"


# --- merging into an existing policy ------------------------------------------------


def _unix_allowed(entries: frozenset[UnixAddress], address: str) -> bool:
    raw, _ = parse_unix_address(address)
    return any(raw.startswith(e) if prefix else raw == e for e, prefix in entries)


def _unseen(policy: CompiledPolicy, ident: IdentitySpec, obs: _Observed) -> _Observed:
    """What ``obs`` holds that the identity's existing rules do not allow already."""
    out = _Observed()
    for point, count in obs.points.items():
        proto, address, port = point
        if decide_value(policy, ident.spiffe_id, proto, address, port).verdict != "allow":
            out.points[point] = count
    if ident.exec_paths is not None:
        out.execs.update({e: n for e, n in obs.execs.items() if e not in ident.exec_paths})
    if ident.unix is not None:
        unix = ident.unix
        out.unix.update({a: n for a, n in obs.unix.items() if not _unix_allowed(unix, a)})
    return out


def _render_existing_rule(rule: EgressRule) -> list[str]:
    return [
        f"      - name: {_q(rule.name)}",
        f"        cidrs: [{', '.join(_q(str(c)) for c in rule.cidrs)}]",
        f"        ports: [{_port_text(rule.ports)}]",
        f"        protocols: [{', '.join(rule.protocols)}]",
    ]


def _render_merged_identity(
    ident: IdentitySpec, new: _Observed, merge_cidrs: int | None, merge_ports: bool
) -> tuple[list[str], int]:
    """An existing identity with its rules as they were and the learnt ones after
    them; and how many rules, executables and addresses were added."""
    out = [f"  - id: {_q(ident.spiffe_id)}", f"    mode: {ident.mode}"]
    block_of = _blocks((a for _, a, _ in new.points), merge_cidrs)
    by_block: dict[Cidr, list[tuple[int, Point]]] = {}
    for point, count in new.points.items():
        by_block.setdefault(block_of[point[1]], []).append((count, point))
    rules = _rules(new, block_of, merge_ports)
    if not ident.egress and not rules:
        out.append("    egress: []")
    else:
        out.append("    egress:")
        for rule in ident.egress:
            out.extend(_render_existing_rule(rule))
        taken = {r.name for r in ident.egress}
        for learnt in rules:
            out.append("      # learnt by 'sidecar policy suggest'")
            out.extend(_render_rule(learnt, _rule_name(learnt, taken), by_block))
    if ident.exec_paths is not None:
        if not ident.exec_paths and not new.execs:
            out.append("    exec: []")
        else:
            out.append("    exec:")
            out.extend(f"      - {_q(e)}" for e in sorted(ident.exec_paths))
            for exe, count in sorted(new.execs.items()):
                out.append(f"      - {_q(exe)}  # learnt: {count} exec(s) observed")
    if ident.unix is not None:
        if not ident.unix and not new.unix:
            out.append("    unix: []")
        else:
            out.append("    unix:")
            out.extend(f"      - {_q(a)}" for a in sorted(map(format_unix_address, ident.unix)))
            for addr, count in sorted(new.unix.items()):
                out.append(f"      - {_q(addr)}  # learnt: {count} use(s) observed")
    if ident.sockets:
        kinds = ", ".join(sorted(format_socket_kind(k) for k in ident.sockets))
        out.append(f"    sockets: [{kinds}]")
    if ident.capabilities:
        out.append(f"    capabilities: [{', '.join(sorted(map(caps.label, ident.capabilities)))}]")
    return out, len(rules) + len(new.execs) + len(new.unix)


def suggest_into(
    existing: PolicySpec,
    history_events: Iterable[HistoryEvent],
    merge_cidrs: int | None = None,
    merge_ports: bool = False,
    *,
    include_denied: bool = False,
    source: str = "<history>",
) -> str:
    """``existing`` with what the history shows added to it: every rule, executable
    and setting it has is kept; what it does not allow yet is added (identities it
    does not list are added in enforce mode).  The result is validated."""
    _check_merge(merge_cidrs)
    observed, skipped, n_events = _observe(history_events, include_denied, source)
    policy = compile_policy(existing)
    listed = {ident.spiffe_id for ident in existing.identities}
    body: list[str] = []
    added = 0
    for ident in existing.identities:
        new = _unseen(policy, ident, observed.get(ident.spiffe_id, _Observed()))
        lines, n = _render_merged_identity(ident, new, merge_cidrs, merge_ports)
        body.extend(lines)
        added += n
    new_ids = sorted(set(observed) - listed)
    for sid in new_ids:
        body.extend(_render_identity(sid, observed[sid], merge_cidrs, merge_ports))
    out = [
        f"# {existing.source} with what 'sidecar policy suggest' learnt from "
        f"{n_events} connect/exec event(s):",
        f"# added: {added} rule(s), executable(s) or unix address(es) to listed identities, "
        f"{len(new_ids)} identity(ies) in enforce mode; nothing removed.",
        "# Comments of the original file are not carried over. Review before applying.",
    ]
    out.extend(f"# skipped {n} {why}" for why, n in sorted(skipped.items()))
    out += [
        "apiVersion: sidecar/v1",
        "kind: Policy",
        "defaults:",
        f"  unidentified: {existing.unidentified}",
        "  pending: deny",
        f"  log_allowed: {'true' if existing.log_allowed else 'false'}",
    ]
    out.append("identities:" if body else "identities: []")
    text = "\n".join(out + body) + "\n"
    try:
        compile_policy(parse_policy_text(text, "<merged>"))
    except PolicyError as exc:
        widened = merge_cidrs is not None or merge_ports
        hint = " (drop --merge-cidrs/--merge-ports: a widened rule meets an existing one)"
        raise PolicyError(
            f"{existing.source}: the merged policy would not validate"
            f"{hint if widened else ''}: {exc}"
        ) from exc
    return text
