"""The one address space every policy decision happens in.

The kernel hooks see IPv4 (connect4/sendmsg4) and IPv6 (connect6/sendmsg6)
destinations, and an IPv6 socket may connect to ``::ffff:a.b.c.d``, which is
an IPv4 peer.  So that a rule for ``10.0.0.0/8`` also covers
``::ffff:10.1.2.3``, every address is represented as a 128-bit integer in the
IPv6 space with IPv4 mapped to ``::ffff:0:0/96``; an IPv4 ``/24`` is a
``/120`` there.  This module holds that representation, CIDR parsing and
printing, and the interval arithmetic the operator tools build on.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import NamedTuple

ADDRESS_BITS = 128
V4_MAPPED_BASE = 0xFFFF << 32  # ::ffff:0.0.0.0
V4_MAPPED_LENGTH = 96
_ALL_ONES = (1 << ADDRESS_BITS) - 1

Interval = tuple[int, int]  # inclusive [lo, hi]


def _mask(length: int) -> int:
    return (_ALL_ONES << (ADDRESS_BITS - length)) & _ALL_ONES


class Cidr(NamedTuple):
    """A prefix in the 128-bit space: network ``address`` and ``length`` (0..128).

    A named tuple rather than a dataclass: policies hold up to 200,000 of
    them, and tuples hash and sort several times faster.
    """

    address: int
    length: int

    @property
    def lo(self) -> int:
        return self.address

    @property
    def hi(self) -> int:
        return self.address | (_ALL_ONES >> self.length)

    @property
    def size(self) -> int:
        """How many addresses the prefix holds."""
        return 1 << (ADDRESS_BITS - self.length)

    @property
    def is_ipv4(self) -> bool:
        return self.length >= V4_MAPPED_LENGTH and (self.address >> 32) == 0xFFFF

    def contains(self, address: int) -> bool:
        return (address & _mask(self.length)) == self.address

    def overlaps(self, other: Cidr) -> bool:
        """Two prefixes overlap exactly when one contains the other."""
        shorter = min(self.length, other.length)
        m = _mask(shorter)
        return (self.address & m) == (other.address & m)

    def packed(self) -> bytes:
        """The 16-byte network address, as the kernel LPM key holds it."""
        return self.address.to_bytes(16, "big")

    def __str__(self) -> str:
        if self.is_ipv4:
            v4 = ipaddress.IPv4Address(self.address & 0xFFFFFFFF)
            return f"{v4}/{self.length - V4_MAPPED_LENGTH}"
        return f"{ipaddress.IPv6Address(self.address)}/{self.length}"


def _to_space(net: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Cidr:
    if isinstance(net, ipaddress.IPv4Network):
        return Cidr(V4_MAPPED_BASE | int(net.network_address), V4_MAPPED_LENGTH + net.prefixlen)
    return Cidr(int(net.network_address), net.prefixlen)


def parse_cidr(text: str) -> Cidr:
    """Parse ``10.0.0.0/8``, ``2001:db8::/32`` or a bare address (a /32 or /128).

    Host bits set is an error, because ``10.0.0.1/8`` is ambiguous: the
    message names the prefix that was probably meant.
    """
    if not isinstance(text, str):
        raise ValueError(f"must be a CIDR string, not {type(text).__name__}")
    fast = _parse_ipv4_cidr_fast(text)
    if fast is not None:
        return fast
    if "%" in text:
        raise ValueError(f"'{text}': scoped addresses are not allowed in a CIDR")
    try:
        net = ipaddress.ip_network(text.strip(), strict=True)
    except ValueError as exc:
        try:
            loose = ipaddress.ip_network(text.strip(), strict=False)
        except ValueError:
            raise ValueError(f"'{text}' is not a valid CIDR: {exc}") from None
        host = text.strip().split("/", 1)[0]
        full = 32 if loose.version == 4 else 128
        raise ValueError(
            f"'{text}' has host bits set: did you mean {loose} (the network) "
            f"or {host}/{full} (the single address)?"
        ) from None
    return _to_space(net)


_V4_CIDR_RE = re.compile(
    r"^(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})\.(0|[1-9][0-9]{0,2})"
    r"(?:/(0|[1-9][0-9]?))?$"
)


def _parse_ipv4_cidr_fast(text: str) -> Cidr | None:
    """Plain dotted-quad CIDRs without ipaddress' overhead (large policies are
    mostly these); None sends anything unusual, and every error, to the full parser."""
    m = _V4_CIDR_RE.match(text)
    if m is None:
        return None
    a, b, c, d, length = m.groups()
    octets = (int(a), int(b), int(c), int(d))
    plen = 32 if length is None else int(length)
    if max(octets) > 255 or plen > 32:
        return None
    value = (octets[0] << 24) | (octets[1] << 16) | (octets[2] << 8) | octets[3]
    if value & ((1 << (32 - plen)) - 1):
        return None
    return Cidr(V4_MAPPED_BASE | value, V4_MAPPED_LENGTH + plen)


def parse_address(text: str) -> int:
    """An address (IPv4, IPv6, IPv4-mapped IPv6, with or without ``%scope``) in the space."""
    addr = ipaddress.ip_address(text.split("%", 1)[0].strip())
    if isinstance(addr, ipaddress.IPv4Address):
        return V4_MAPPED_BASE | int(addr)
    return int(addr)


def format_address(value: int) -> str:
    """``::ffff:10.0.0.1`` prints as ``10.0.0.1``; other addresses as IPv6."""
    if (value >> 32) == 0xFFFF:
        return str(ipaddress.IPv4Address(value & 0xFFFFFFFF))
    return str(ipaddress.IPv6Address(value))


def host_cidr(value: int) -> Cidr:
    """The single-address prefix of ``value`` (a /32 for IPv4, a /128 otherwise)."""
    return Cidr(value, ADDRESS_BITS)


def interval_to_cidrs(lo: int, hi: int) -> list[Cidr]:
    """The fewest prefixes that cover exactly ``[lo, hi]``."""
    out: list[Cidr] = []
    while lo <= hi:
        # The largest aligned block starting at lo that does not pass hi.
        size = (lo & -lo) if lo else 1 << ADDRESS_BITS
        while size > hi - lo + 1:
            size >>= 1
        out.append(Cidr(lo, ADDRESS_BITS - (size.bit_length() - 1)))
        lo += size
    return out


def intervals_to_cidrs(intervals: Iterable[Interval]) -> list[Cidr]:
    out: list[Cidr] = []
    for lo, hi in intervals:
        out.extend(interval_to_cidrs(lo, hi))
    return out


def merge_intervals(intervals: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sorted, disjoint, non-adjacent union of inclusive intervals."""
    out: list[list[int]] = []
    for lo, hi in sorted(intervals):
        if out and lo <= out[-1][1] + 1:
            if hi > out[-1][1]:
                out[-1][1] = hi
        else:
            out.append([lo, hi])
    return tuple((a, b) for a, b in out)


def subtract_intervals(a: tuple[Interval, ...], b: tuple[Interval, ...]) -> tuple[Interval, ...]:
    """``a`` minus ``b``; both sorted and disjoint (as :func:`merge_intervals` makes them)."""
    out: list[Interval] = []
    j = 0
    for lo, hi in a:
        cur = lo
        while j < len(b) and b[j][1] < cur:
            j += 1
        k = j
        while k < len(b) and b[k][0] <= hi:
            if b[k][0] > cur:
                out.append((cur, b[k][0] - 1))
            cur = max(cur, b[k][1] + 1)
            k += 1
        if cur <= hi:
            out.append((cur, hi))
    return tuple(out)


def interval_count(intervals: Iterable[Interval]) -> int:
    return sum(hi - lo + 1 for lo, hi in intervals)
