"""Address-space arithmetic behind diff, suggest and blast radius, against brute force."""

from __future__ import annotations

from itertools import pairwise

from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.policy.allowset import AllowSet, Box
from sidecar.policy.space import (
    Cidr,
    interval_to_cidrs,
    merge_intervals,
    parse_cidr,
    subtract_intervals,
)

SMALL = st.integers(0, 300)


@given(SMALL, SMALL)
def test_interval_to_cidrs_covers_exactly_the_interval_with_aligned_prefixes(
    a: int, b: int
) -> None:
    lo, hi = min(a, b), max(a, b)
    cidrs = interval_to_cidrs(lo, hi)
    covered = [x for c in cidrs for x in range(c.lo, c.hi + 1)]
    assert covered == list(range(lo, hi + 1))
    assert all(c.address % c.size == 0 for c in cidrs)


def test_interval_to_cidrs_of_the_whole_space_is_one_prefix() -> None:
    assert interval_to_cidrs(0, 2**128 - 1) == [Cidr(0, 0)]


intervals = st.lists(st.tuples(SMALL, st.integers(0, 20)).map(lambda t: (t[0], t[0] + t[1])))


def points(ivs: list[tuple[int, int]] | tuple[tuple[int, int], ...]) -> set[int]:
    return {x for lo, hi in ivs for x in range(lo, hi + 1)}


@given(intervals, intervals)
def test_interval_union_and_difference_match_sets(
    a: list[tuple[int, int]], b: list[tuple[int, int]]
) -> None:
    ma, mb = merge_intervals(a), merge_intervals(b)
    assert points(ma) == points(a)
    assert all(x[1] + 1 < y[0] for x, y in pairwise(ma))  # disjoint, not adjacent
    assert points(subtract_intervals(ma, mb)) == points(a) - points(b)


boxes = st.lists(
    st.tuples(
        st.sampled_from([1, 2, 3]),
        st.integers(1, 12),
        st.integers(0, 4),
        st.lists(st.tuples(st.integers(0, 40), st.integers(0, 6)), min_size=1, max_size=3),
    ).map(lambda t: (t[0], t[1], t[1] + t[2], [(lo, lo + n) for lo, n in t[3]])),
    max_size=5,
)


def brute(bs: list[Box]) -> set[tuple[str, int, int]]:
    out = set()
    for mask, plo, phi, ivs in bs:
        for proto, bit in (("tcp", 1), ("udp", 2)):
            if mask & bit:
                out |= {(proto, p, a) for p in range(plo, phi + 1) for a in points(list(ivs))}
    return out


@settings(max_examples=200)
@given(boxes, boxes)
def test_allow_set_operations_match_brute_force(a: list[Box], b: list[Box]) -> None:
    sa, sb = AllowSet.from_boxes(a), AllowSet.from_boxes(b)
    pa, pb = brute(a), brute(b)
    assert sa.count() == len(pa)
    assert sa.union(sb).count() == len(pa | pb)
    assert sa.difference(sb).count() == len(pa - pb)
    assert sa.intersection(sb).count() == len(pa & pb)
    for proto, port, addr in pa:
        assert sa.contains(proto, addr, port)
    # the readable form holds the same points
    described = {
        (proto, port, x)
        for d in sa.destinations()
        for proto in d.protocols
        for lo, hi in d.ports
        for port in range(lo, hi + 1)
        for c in d.cidrs
        for x in range(c.lo, c.hi + 1)
    }
    assert described == pa


def test_cidr_prints_ipv4_in_the_mapped_space_as_ipv4() -> None:
    assert str(parse_cidr("::ffff:10.0.0.0/104")) == "10.0.0.0/8"
    assert str(parse_cidr("10.0.0.0/8")) == "10.0.0.0/8"
    assert str(parse_cidr("::fffe:0:0/95")) == "::fffe:0:0/95"  # wider than the IPv4 space
    assert str(parse_cidr("2001:db8::/32")) == "2001:db8::/32"
    assert parse_cidr("10.0.0.1") == parse_cidr("10.0.0.1/32") == parse_cidr("::ffff:10.0.0.1")
