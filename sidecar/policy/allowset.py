"""What an identity may reach, as a set that can be compared, combined and counted.

Diff, suggest and blast radius all ask set questions (what was gained, what
is the union over identities, what was never used) that a list of rules
cannot answer directly: rules can be spelled many ways for the same
meaning.  An :class:`AllowSet` is the meaning: for each protocol, disjoint
port segments, each with the sorted disjoint address intervals (in the
128-bit space of :mod:`sidecar.policy.space`) allowed on those ports.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from itertools import pairwise
from typing import Any

from sidecar.policy.compiled import CompiledIdentity, CompiledPolicy
from sidecar.policy.model import ALL_PROTOCOLS as ALL_PROTOCOL_BITS
from sidecar.policy.model import PROTOCOL_BITS, PortRange, format_ports
from sidecar.policy.space import (
    ADDRESS_BITS,
    Cidr,
    Interval,
    interval_count,
    intervals_to_cidrs,
    merge_intervals,
    subtract_intervals,
)

PROTOCOLS = tuple(PROTOCOL_BITS)
Intervals = tuple[Interval, ...]
Segment = tuple[int, int, Intervals]  # port lo, port hi, addresses
Box = tuple[int, int, int, Iterable[Interval]]  # protocol mask, port lo, port hi, addresses


@dataclass(frozen=True)
class Destination:
    """A readable block of an allow set: protocols x port ranges x CIDRs."""

    protocols: tuple[str, ...]
    ports: tuple[PortRange, ...]
    cidrs: tuple[Cidr, ...]

    @property
    def addresses(self) -> int:
        return sum(c.size for c in self.cidrs)

    @property
    def port_count(self) -> int:
        return sum(hi - lo + 1 for lo, hi in self.ports)

    @property
    def count(self) -> int:
        """Addresses x ports x protocols."""
        return self.addresses * self.port_count * len(self.protocols)

    def describe(self) -> str:
        cidrs = ", ".join(str(c) for c in self.cidrs)
        return f"{'/'.join(self.protocols)} {format_ports(self.ports)} -> {cidrs}"

    def to_json(self) -> dict[str, Any]:
        return {
            "protocols": list(self.protocols),
            "ports": [str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in self.ports],
            "cidrs": [{"cidr": str(c), "size": c.size} for c in self.cidrs],
            "count": self.count,
        }


def _segments_from_ranges(ranges: Mapping[PortRange, list[Interval]]) -> tuple[Segment, ...]:
    """Disjoint port segments from possibly overlapping (port range -> addresses)."""
    starts: dict[int, list[PortRange]] = {}
    ends: dict[int, list[PortRange]] = {}
    for lo, hi in ranges:
        starts.setdefault(lo, []).append((lo, hi))
        ends.setdefault(hi + 1, []).append((lo, hi))
    merged = {key: merge_intervals(ivs) for key, ivs in ranges.items()}
    points = sorted(set(starts) | set(ends))
    active: set[PortRange] = set()
    out: list[Segment] = []
    for p, q in pairwise(points):
        active.difference_update(ends.get(p, ()))
        active.update(starts.get(p, ()))
        if active:
            ivs = merge_intervals(iv for key in active for iv in merged[key])
            _append(out, (p, q - 1, ivs))
    return tuple(out)


def _append(out: list[Segment], seg: Segment) -> None:
    """Append, joining with the previous segment when contiguous and equal."""
    if not seg[2]:
        return
    if out and out[-1][1] + 1 == seg[0] and out[-1][2] == seg[2]:
        out[-1] = (out[-1][0], seg[1], seg[2])
    else:
        out.append(seg)


def _combine(
    a: tuple[Segment, ...],
    b: tuple[Segment, ...],
    op: Callable[[Intervals, Intervals], Intervals],
) -> tuple[Segment, ...]:
    points = sorted({s[0] for s in a + b} | {s[1] + 1 for s in a + b})
    out: list[Segment] = []
    i = j = 0
    for p, q in pairwise(points):
        while i < len(a) and a[i][1] < p:
            i += 1
        while j < len(b) and b[j][1] < p:
            j += 1
        ai = a[i][2] if i < len(a) and a[i][0] <= p else ()
        bj = b[j][2] if j < len(b) and b[j][0] <= p else ()
        _append(out, (p, q - 1, op(ai, bj)))
    return tuple(out)


def _union(x: Intervals, y: Intervals) -> Intervals:
    return merge_intervals(x + y) if x and y else x or y


def _difference(x: Intervals, y: Intervals) -> Intervals:
    return subtract_intervals(x, y) if x and y else x


def _intersection(x: Intervals, y: Intervals) -> Intervals:
    return subtract_intervals(x, subtract_intervals(x, y)) if x and y else ()


class AllowSet:
    """An immutable set of (protocol, port, address) points."""

    __slots__ = ("_by_protocol",)

    def __init__(self, by_protocol: Mapping[str, tuple[Segment, ...]] | None = None) -> None:
        src = by_protocol or {}
        self._by_protocol: dict[str, tuple[Segment, ...]] = {
            p: src[p] for p in PROTOCOLS if src.get(p)
        }

    @classmethod
    def from_boxes(cls, boxes: Iterable[Box]) -> AllowSet:
        per: dict[str, dict[PortRange, list[Interval]]] = {p: {} for p in PROTOCOLS}
        for mask, lo, hi, intervals in boxes:
            ivs = list(intervals)
            for proto, bit in PROTOCOL_BITS.items():
                if mask & bit:
                    per[proto].setdefault((lo, hi), []).extend(ivs)
        return cls({p: _segments_from_ranges(r) for p, r in per.items()})

    @classmethod
    def everything(cls) -> AllowSet:
        """Every destination: what ``defaults.unidentified: allow`` lets through
        (the kernel then skips the port check, so port 0 is included)."""
        return cls.from_boxes([(ALL_PROTOCOL_BITS, 0, 65535, ((0, (1 << ADDRESS_BITS) - 1),))])

    @classmethod
    def of(cls, policy: CompiledPolicy, identity: str | None) -> AllowSet:
        """What ``identity`` may reach under ``policy``: its allowlist if listed,
        else the ``defaults.unidentified`` verdict (see sidecar.policy.evaluate)."""
        ci = None if identity is None else policy.identities.get(identity)
        if ci is not None:
            return cls.from_identity(ci)
        return cls.everything() if policy.unidentified == "allow" else cls()

    @classmethod
    def from_identity(cls, ci: CompiledIdentity | None) -> AllowSet:
        """What a compiled identity's allowlist holds (None: nothing)."""
        if ci is None:
            return cls()
        boxes: list[Box] = []
        for entry in ci.prefixes:
            cidr = entry.cidr
            for pr in entry.rules:
                boxes.append((pr.protocol_mask, pr.port_lo, pr.port_hi, ((cidr.lo, cidr.hi),)))
        return cls.from_boxes(boxes)

    def _op(self, other: AllowSet, op: Callable[[Intervals, Intervals], Intervals]) -> AllowSet:
        return AllowSet(
            {
                p: _combine(self._by_protocol.get(p, ()), other._by_protocol.get(p, ()), op)
                for p in PROTOCOLS
            }
        )

    def union(self, other: AllowSet) -> AllowSet:
        return self._op(other, _union)

    def difference(self, other: AllowSet) -> AllowSet:
        return self._op(other, _difference)

    def intersection(self, other: AllowSet) -> AllowSet:
        return self._op(other, _intersection)

    def __bool__(self) -> bool:
        return bool(self._by_protocol)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AllowSet) and self._by_protocol == other._by_protocol

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._by_protocol.items())))

    def __repr__(self) -> str:
        return f"AllowSet({[d.describe() for d in self.destinations()]})"

    def count(self) -> int:
        """How many (protocol, port, address) points the set holds."""
        return sum(
            (hi - lo + 1) * interval_count(ivs)
            for segs in self._by_protocol.values()
            for lo, hi, ivs in segs
        )

    def contains(self, protocol: str, address: int, port: int) -> bool:
        for lo, hi, ivs in self._by_protocol.get(protocol, ()):
            if lo <= port <= hi:
                return any(a <= address <= b for a, b in ivs)
        return False

    def segments(self, protocol: str) -> tuple[Segment, ...]:
        return self._by_protocol.get(protocol, ())

    def destinations(self) -> tuple[Destination, ...]:
        """The set as readable blocks: each address set with all its port ranges,
        and tcp and udp folded together where they allow the same."""
        grouped: dict[tuple[Intervals, tuple[PortRange, ...]], list[str]] = {}
        for proto in PROTOCOLS:
            ports_by_addr: dict[Intervals, list[PortRange]] = {}
            for lo, hi, ivs in self._by_protocol.get(proto, ()):
                ports_by_addr.setdefault(ivs, []).append((lo, hi))
            for ivs, ports in ports_by_addr.items():
                grouped.setdefault((ivs, tuple(ports)), []).append(proto)
        out = [
            Destination(tuple(protos), ports, tuple(intervals_to_cidrs(ivs)))
            for (ivs, ports), protos in grouped.items()
        ]
        return tuple(sorted(out, key=lambda d: (d.cidrs, d.ports, d.protocols)))
