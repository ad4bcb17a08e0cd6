"""Blast radius: what a compromise of each identity could reach.

A compromised workload can use everything its allowlist names, and also
everything of each identity it can spawn into: a registration entry whose
``parent:id`` is the workload's identity means the workload can start a
process that is attested as that child identity (transitively).  It can also
obtain credentials: its own X.509-SVID and JWT-SVIDs for any audience, and
those of every identity it can spawn into.

Identities are ranked by reach: the (address, port, protocol) destinations
of the union over the identity and its spawn closure, then unrestricted
executables, then the number of executables, identities it can spawn into
and credentials.  Reach is measured on a scale normalised per address family
(IPv4 destinations over 2^32, IPv6 ones over the rest of the 128-bit space),
because a raw count lets one IPv6 /48 (2^80 addresses, one site) outweigh
all of IPv4 on every port; and it is printed in the units people read:
"all IPv4", "a /48", "any port".  An identity the policy does not list is
governed by ``defaults.unidentified`` and its execs are not restricted (see
:mod:`sidecar.policy.evaluate`): under ``unidentified: allow``, being able
to spawn into an unlisted identity means reaching everything.

With an observed history, the part of each allowlist that was never used is
reported as a suggested tightening: rules never matched, rules of which
only a few destinations were used, executables never run.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from sidecar.policy import caps
from sidecar.policy.allowset import PROTOCOLS, AllowSet, Box, Destination
from sidecar.policy.compiled import CompiledIdentity, CompiledPolicy
from sidecar.policy.evaluate import decide_value
from sidecar.policy.history import ConnectEvent, Event, ExecEvent, HistoryEvent, parse_events
from sidecar.policy.model import PortRange, format_socket_kind, format_unix_address
from sidecar.policy.space import (
    ADDRESS_BITS,
    V4_MAPPED_BASE,
    Cidr,
    Interval,
    format_address,
    interval_count,
    merge_intervals,
)

_logger = logging.getLogger(__name__)

MAX_TEXT_DESTINATIONS = 50
MAX_TEXT_CIDRS = 20
MAX_TEXT_OBSERVED = 10

SpawnGraph = Mapping[str, Iterable[str]]


@dataclass(frozen=True)
class Credential:
    kind: str  # x509-svid | jwt-svid
    spiffe_id: str
    audience: str | None  # jwt-svid: '*' (any audience)

    def describe(self) -> str:
        if self.kind == "jwt-svid":
            return f"JWT-SVID {self.spiffe_id} (any audience)"
        return f"X.509-SVID {self.spiffe_id}"

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, "spiffe_id": self.spiffe_id, "audience": self.audience}


IPV4_SPACE = 1 << 32
IPV6_SPACE = (1 << ADDRESS_BITS) - IPV4_SPACE  # the 128-bit space less the IPv4-mapped block
_V4: Interval = (V4_MAPPED_BASE, V4_MAPPED_BASE + IPV4_SPACE - 1)
_ANY_PORT = (1, 65535)
MAX_TEXT_PORT_RANGES = 5


@dataclass(frozen=True)
class FamilyReach:
    """What an allow set holds in one address family, summed up for people."""

    destinations: int = 0  # (address, port, protocol) points
    addresses: int = 0  # distinct addresses, on any of the ports
    ports: tuple[PortRange, ...] = ()
    protocols: tuple[str, ...] = ()

    def to_json(self, family: str) -> dict[str, Any]:
        return {
            "destinations": self.destinations,
            "addresses": self.addresses,
            "ports": [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports],
            "protocols": list(self.protocols),
            "summary": self.describe(family),
        }

    def describe(self, family: str) -> str:
        if not self.destinations:
            return "nothing"
        amount = ipv4_amount(self.addresses) if family == "ipv4" else ipv6_amount(self.addresses)
        return f"{amount} on {ports_text(self.ports)} over {'/'.join(self.protocols)}"


def ipv4_amount(n: int) -> str:
    if n >= IPV4_SPACE:
        return "all IPv4"
    return "1 address" if n == 1 else f"{n:,} addresses"


def ipv6_amount(n: int) -> str:
    """An amount of IPv6 addresses as a prefix size: "a /48", "3 /64s", "all IPv6"."""
    if n >= IPV6_SPACE:
        return "all IPv6"
    if n <= 65536:
        return "1 address" if n == 1 else f"{n:,} addresses"
    zeros = (n & -n).bit_length() - 1
    count, length = n >> zeros, ADDRESS_BITS - zeros
    if count == 1:
        return f"a /{length}"
    if count < 1000:
        return f"{count} /{length}s"
    return f"about a /{ADDRESS_BITS - round(math.log2(n))}"


def ports_text(ports: tuple[PortRange, ...]) -> str:
    """``any port (1-65535)``, ``port 443``, ``ports 80-81, 443``."""
    if any(lo <= _ANY_PORT[0] and hi >= _ANY_PORT[1] for lo, hi in ports):
        return "any port (1-65535)"
    shown = [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports[:MAX_TEXT_PORT_RANGES]]
    more = len(ports) - MAX_TEXT_PORT_RANGES
    text = ", ".join(shown) + (f" and {more} more ranges" if more > 0 else "")
    return f"port {text}" if len(ports) == 1 and ports[0][0] == ports[0][1] else f"ports {text}"


def cidr_text(c: Cidr) -> str:
    """A prefix with its size in readable units: ``10.0.0.0/24 (256)``, ``::/0 (all IPv6 ...)``."""
    if c.is_ipv4:
        return f"{c} (all IPv4)" if c.size == IPV4_SPACE else f"{c} ({c.size:,})"
    if c.length == 0:
        return f"{c} (all IPv6, IPv4 included)"
    return f"{c} (1 address)" if c.length == ADDRESS_BITS else f"{c} (a /{c.length})"


def _split(intervals: Iterable[Interval]) -> tuple[list[Interval], list[Interval]]:
    """Intervals of the 128-bit space -> (the IPv4-mapped parts, the rest)."""
    v4: list[Interval] = []
    v6: list[Interval] = []
    for lo, hi in intervals:
        if hi < _V4[0] or lo > _V4[1]:
            v6.append((lo, hi))
            continue
        v4.append((max(lo, _V4[0]), min(hi, _V4[1])))
        if lo < _V4[0]:
            v6.append((lo, _V4[0] - 1))
        if hi > _V4[1]:
            v6.append((_V4[1] + 1, hi))
    return v4, v6


def family_reach(aset: AllowSet) -> tuple[FamilyReach, FamilyReach]:
    """(IPv4, IPv6) summaries of an allow set."""
    points = [0, 0]
    addresses: list[list[Interval]] = [[], []]
    ports: list[list[PortRange]] = [[], []]
    protocols: list[list[str]] = [[], []]
    for proto in PROTOCOLS:
        for lo, hi, ivs in aset.segments(proto):
            for k, part in enumerate(_split(ivs)):
                if not part:
                    continue
                points[k] += (hi - lo + 1) * interval_count(part)
                addresses[k].extend(part)
                ports[k].append((lo, hi))
                if proto not in protocols[k]:
                    protocols[k].append(proto)
    v4, v6 = (
        FamilyReach(
            points[k],
            interval_count(merge_intervals(addresses[k])),
            merge_intervals(ports[k]),
            tuple(protocols[k]),
        )
        for k in (0, 1)
    )
    return v4, v6


@dataclass(frozen=True)
class RuleUse:
    rule: str
    allowed: int  # destinations the rule allows
    used: tuple[str, ...]  # distinct observed destinations it matched, "addr proto/port"


@dataclass(frozen=True)
class Tightening:
    """The part of one identity's allowlist that the history never used."""

    unused_rules: tuple[RuleUse, ...]
    partly_used_rules: tuple[RuleUse, ...]
    unused_destinations: int  # allowed (address, port, protocol) points never used
    unused_executables: tuple[str, ...]
    observed_executables: tuple[str, ...] | None  # when exec is unrestricted: what ran

    def to_json(self) -> dict[str, Any]:
        def use(u: RuleUse) -> dict[str, Any]:
            return {"rule": u.rule, "allowed": u.allowed, "used": list(u.used)}

        return {
            "unused_rules": [use(u) for u in self.unused_rules],
            "partly_used_rules": [use(u) for u in self.partly_used_rules],
            "unused_destinations": self.unused_destinations,
            "unused_executables": list(self.unused_executables),
            "observed_executables": None
            if self.observed_executables is None
            else list(self.observed_executables),
        }


@dataclass(frozen=True)
class IdentityReach:
    spiffe_id: str
    in_policy: bool
    mode: str | None
    destinations: tuple[Destination, ...]  # its own allowlist
    own_count: int
    spawns_into: tuple[str, ...]  # transitive
    reach_count: int  # destinations of itself and every identity it can spawn into
    executables: tuple[str, ...] | None  # likewise; None: any executable
    credentials: tuple[Credential, ...]
    tightening: Tightening | None
    # socket kinds besides TCP/UDP it and its spawn closure may make; None: any
    # (an identity not in the policy under unidentified: allow)
    sockets: tuple[str, ...] | None = ()
    # dangerous capabilities (CAP_SYS_ADMIN, CAP_BPF, ...) it or its spawn
    # closure may hold: with any, it can switch enforcement off. None: any
    # (an identity the policy does not list is not refused them)
    capabilities: tuple[str, ...] | None = ()
    # unix socket addresses it and its spawn closure may use; None: any
    unix: tuple[str, ...] | None = None
    # reach_count split by address family, for ranking and for people
    reach_ipv4: FamilyReach = field(default_factory=FamilyReach)
    reach_ipv6: FamilyReach = field(default_factory=FamilyReach)

    @property
    def can_disable_enforcement(self) -> bool:
        return self.capabilities is None or bool(self.capabilities)

    @property
    def reach_share(self) -> Fraction:
        """Reach on a scale normalised per family: all IPv4 on one port and protocol
        is 1, and so is all IPv6 on one port and protocol."""
        return Fraction(self.reach_ipv4.destinations, IPV4_SPACE) + Fraction(
            self.reach_ipv6.destinations, IPV6_SPACE
        )

    def rank_key(self) -> tuple[Fraction, int, int, int, int]:
        exec_any = self.executables is None
        n_exec = 0 if self.executables is None else len(self.executables)
        return (
            self.reach_share,
            int(exec_any),
            n_exec,
            len(self.spawns_into),
            len(self.credentials),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "identity": self.spiffe_id,
            "in_policy": self.in_policy,
            "mode": self.mode,
            "destinations": [d.to_json() for d in self.destinations],
            "own_destination_count": self.own_count,
            "spawns_into": list(self.spawns_into),
            "reach_destination_count": self.reach_count,
            "reach_ipv4": self.reach_ipv4.to_json("ipv4"),
            "reach_ipv6": self.reach_ipv6.to_json("ipv6"),
            "reach_share": float(self.reach_share),
            "executables": None if self.executables is None else list(self.executables),
            "executables_unrestricted": self.executables is None,
            "credentials": [c.to_json() for c in self.credentials],
            "tightening": None if self.tightening is None else self.tightening.to_json(),
            "sockets": None if self.sockets is None else list(self.sockets),
            "capabilities": None if self.capabilities is None else list(self.capabilities),
            "can_disable_enforcement": self.can_disable_enforcement,
            "unix": None if self.unix is None else list(self.unix),
        }


@dataclass(frozen=True)
class BlastRadius:
    policy_version: str
    identities: tuple[IdentityReach, ...]  # largest reach first

    def to_json(self) -> dict[str, Any]:
        return {
            "policy_version": self.policy_version,
            "identities": [r.to_json() for r in self.identities],
        }

    def render_text(self) -> str:
        lines = [f"blast radius of policy {self.policy_version}, largest reach first"]
        for rank, r in enumerate(self.identities, 1):
            lines.append("")
            lines.extend(_render_identity(rank, r))
        return "\n".join(lines) + "\n"


def _render_identity(rank: int, r: IdentityReach) -> list[str]:
    mode = r.mode if r.in_policy else "not in the policy: the unidentified default applies"
    lines = [
        f"#{rank} {r.spiffe_id} ({mode})",
        f"  reach: {_count_text(r.reach_count)} destinations (address x port x protocol), "
        f"{_count_text(r.own_count)} of its own",
        f"    IPv4: {r.reach_ipv4.describe('ipv4')}",
        f"    IPv6: {r.reach_ipv6.describe('ipv6')}",
    ]
    if r.destinations:
        lines.append("  destinations:")
    for d in r.destinations[:MAX_TEXT_DESTINATIONS]:
        cidrs = ", ".join(cidr_text(c) for c in d.cidrs[:MAX_TEXT_CIDRS])
        if len(d.cidrs) > MAX_TEXT_CIDRS:
            cidrs += f", ... {len(d.cidrs) - MAX_TEXT_CIDRS} more"
        lines.append(
            f"    {'/'.join(d.protocols)} {ports_text(d.ports)} -> {cidrs}  "
            f"[{_count_text(d.count)}]"
        )
    if len(r.destinations) > MAX_TEXT_DESTINATIONS:
        lines.append(f"    ... {len(r.destinations) - MAX_TEXT_DESTINATIONS} more")
    if r.executables is None:
        lines.append("  executables: any (unrestricted)")
    else:
        lines.append(f"  executables: {', '.join(r.executables) or 'none'}")
    if r.capabilities is None:
        lines.append(
            "  CAN DISABLE ENFORCEMENT: not in the policy, its capabilities are not refused"
        )
    elif r.capabilities:
        lines.append(f"  CAN DISABLE ENFORCEMENT: accepts {', '.join(r.capabilities)}")
    if r.unix is None:
        lines.append("  unix sockets: any")
    else:
        lines.append(f"  unix sockets: {', '.join(r.unix) or 'none'}")
    if r.sockets is None:
        lines.append("  other sockets: any (raw, ICMP, ...)")
    elif r.sockets:
        lines.append(f"  other sockets: {', '.join(r.sockets)}")
    lines.append(f"  can spawn into: {', '.join(r.spawns_into) or 'nothing'}")
    lines.append("  credentials: " + "; ".join(c.describe() for c in r.credentials))
    t = r.tightening
    if t is not None:
        lines.append(f"  never used (suggested tightening): {t.unused_destinations:,} destinations")
        for u in t.unused_rules:
            lines.append(f"    rule '{u.rule}': never matched ({u.allowed:,} destinations)")
        for u in t.partly_used_rules:
            shown = ", ".join(u.used[:MAX_TEXT_OBSERVED])
            more = (
                f", ... {len(u.used) - MAX_TEXT_OBSERVED} more"
                if len(u.used) > MAX_TEXT_OBSERVED
                else ""
            )
            lines.append(
                f"    rule '{u.rule}': {len(u.used):,} of {u.allowed:,} used: {shown}{more}"
            )
        for exe in t.unused_executables:
            lines.append(f"    executable {exe}: never run")
        if t.observed_executables is not None:
            ran = ", ".join(t.observed_executables) or "nothing"
            lines.append(f"    exec is unrestricted; only these ran: {ran}")
    return lines


def _count_text(n: int) -> str:
    """Exact with separators while a person can read it; a power of two beyond."""
    return f"{n:,}" if n < 10**15 else f"about 2^{round(math.log2(n))}"


def _closure(start: str, graph: Mapping[str, frozenset[str]]) -> tuple[str, ...]:
    seen: set[str] = set()
    todo = list(graph.get(start, ()))
    while todo:
        node = todo.pop()
        if node in seen or node == start:
            continue
        seen.add(node)
        todo.extend(graph.get(node, ()))
    return tuple(sorted(seen))


def _exec_of(ci: CompiledIdentity | None) -> frozenset[str] | None:
    if ci is None:
        return None  # unlisted: execs are not restricted
    return ci.exec_paths


def _sockets_of(policy: CompiledPolicy, ci: CompiledIdentity | None) -> frozenset[str] | None:
    if ci is None:  # governed by the unidentified default
        return None if policy.unidentified == "allow" else frozenset()
    return frozenset(format_socket_kind(k) for k in ci.sockets)


def _union(grants: Iterable[frozenset[str] | None]) -> tuple[str, ...] | None:
    """What an identity and its spawn closure may use together; None (any) wins."""
    out: set[str] = set()
    for g in grants:
        if g is None:
            return None
        out |= g
    return tuple(sorted(out))


def _unix_of(ci: CompiledIdentity | None) -> frozenset[str] | None:
    if ci is None or ci.unix is None:
        return None
    return frozenset(format_unix_address(a) for a in ci.unix)


def _caps_of(ci: CompiledIdentity | None) -> frozenset[str] | None:
    if ci is None:
        return None
    return frozenset(caps.label(n) for n in ci.capabilities)


def _rule_sets(ci: CompiledIdentity) -> list[AllowSet]:
    boxes: list[list[Box]] = [[] for _ in ci.rule_names]
    for entry in ci.prefixes:
        cidr = entry.cidr
        for pr in entry.rules:
            boxes[pr.rule_index].append(
                (pr.protocol_mask, pr.port_lo, pr.port_hi, ((cidr.lo, cidr.hi),))
            )
    return [AllowSet.from_boxes(b) for b in boxes]


def _tightening(
    policy: CompiledPolicy, ci: CompiledIdentity, own: AllowSet, events: list[Event]
) -> Tightening:
    used: dict[str, set[tuple[str, int, int]]] = {name: set() for name in ci.rule_names}
    ran: set[str] = set()
    for ev in events:
        if ev.identity != ci.spiffe_id:
            continue
        if isinstance(ev, ConnectEvent):
            d = decide_value(policy, ci.spiffe_id, ev.protocol, ev.address, ev.port)
            if d.verdict == "allow":
                used[d.rule].add((ev.protocol, ev.address, ev.port))
        elif isinstance(ev, ExecEvent) and ev.verdict != "deny":
            ran.add(ev.exe)
    unused: list[RuleUse] = []
    partly: list[RuleUse] = []
    used_total = 0
    for name, rule_set in zip(ci.rule_names, _rule_sets(ci), strict=True):
        points = used[name]
        used_total += len(points)
        shown = tuple(
            f"{format_address(a)} {proto}/{port}"
            for proto, a, port in sorted(points, key=lambda p: (p[1], p[2], p[0]))
        )
        allowed = rule_set.count()
        if not points:
            unused.append(RuleUse(name, allowed, ()))
        elif len(points) < allowed:
            partly.append(RuleUse(name, allowed, shown))
    if ci.exec_paths is None:
        unused_exec: tuple[str, ...] = ()
        observed_exec: tuple[str, ...] | None = tuple(sorted(ran))
    else:
        unused_exec = tuple(sorted(ci.exec_paths - ran))
        observed_exec = None
    return Tightening(
        tuple(unused), tuple(partly), own.count() - used_total, unused_exec, observed_exec
    )


def blast_radius(
    policy: CompiledPolicy,
    spawn_graph: SpawnGraph | None = None,
    observed: Iterable[HistoryEvent] | None = None,
    *,
    source: str = "<history>",
) -> BlastRadius:
    """Reach of each identity (of the policy and of the spawn graph), largest first."""
    graph = {parent: frozenset(children) for parent, children in (spawn_graph or {}).items()}
    names = set(policy.identities) | set(graph)
    for children in graph.values():
        names |= children
    events = parse_events(observed, source) if observed is not None else None
    own_sets = {n: AllowSet.of(policy, n) for n in names}
    rows: list[IdentityReach] = []
    for name in sorted(names):
        ci = policy.identities.get(name)
        spawns = _closure(name, graph)
        reach = own_sets[name]
        members = [ci, *(policy.identities.get(child) for child in spawns)]
        for child in spawns:
            reach = reach.union(own_sets[child])
        executables = _union(_exec_of(m) for m in members)
        sockets = _union(_sockets_of(policy, m) for m in members)
        held = _union(_caps_of(m) for m in members)
        unix = _union(_unix_of(m) for m in members)
        credentials = tuple(
            Credential(kind, sid, "*" if kind == "jwt-svid" else None)
            for sid in (name, *spawns)
            for kind in ("x509-svid", "jwt-svid")
        )
        tightening = None
        if events is not None and ci is not None:
            tightening = _tightening(policy, ci, own_sets[name], events)
        reach_v4, reach_v6 = family_reach(reach)
        rows.append(
            IdentityReach(
                spiffe_id=name,
                in_policy=ci is not None,
                mode=ci.mode if ci else None,
                destinations=own_sets[name].destinations(),
                own_count=own_sets[name].count(),
                spawns_into=spawns,
                reach_count=reach.count(),
                executables=executables,
                credentials=credentials,
                tightening=tightening,
                sockets=sockets,
                capabilities=held,
                unix=unix,
                reach_ipv4=reach_v4,
                reach_ipv6=reach_v6,
            )
        )
    rows.sort(key=lambda r: r.spiffe_id)
    rows.sort(key=IdentityReach.rank_key, reverse=True)
    _logger.debug("blast radius over %d identities", len(rows))
    return BlastRadius(policy.version, tuple(rows))
