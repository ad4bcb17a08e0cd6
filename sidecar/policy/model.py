"""The policy YAML, read strictly into a validated source model.

This is the operator's view: identities, their named egress rules and their
executables, each remembering the line it came from, so that the compiler
(which works on this model) can still name file and line in its errors.

Validation rejects everything that would make a decision ambiguous or
surprising: unknown keys, wrong types, prefixes with host bits, port 0,
duplicate identities, and two rules of one identity that both match some
(address, port, protocol), because each decision must name exactly one rule.

What the kernel can hold (port rules per prefix, rule numbers, protocol
bits, path lengths) comes from :mod:`sidecar.kernel.limits`, a module of
plain numbers that imports nothing: the policy stays kernel-neutral (no
BCC, libbpf or ctypes mirrors behind it) without keeping copies that could
drift from the kernel's.
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sidecar.identity.spiffeid import parse_spiffe_id
from sidecar.kernel.limits import (
    EXEC_PATH_MAX_BYTES,
    PROTO_TCP,
    PROTO_UDP,
    RULE_NUMBER_MAX,
    UNIX_PATH_LEN,
)
from sidecar.policy import caps
from sidecar.policy.space import Cidr, parse_cidr
from sidecar.util.errors import PolicyError
from sidecar.util.yamlsrc import Document, Fields, Path_, check_header, check_type, render_path

_logger = logging.getLogger(__name__)
T = TypeVar("T")

API_VERSION = "sidecar/v1"
KIND = "Policy"

MODES = ("enforce", "audit")
UNIDENTIFIED_VERDICTS = ("allow", "deny")
PENDING_VERDICTS = ("deny",)
PROTOCOL_BITS = {"tcp": PROTO_TCP, "udp": PROTO_UDP}  # the kernel's port_rule.protocols
ALL_PROTOCOLS = PROTO_TCP | PROTO_UDP
ALL_PORTS = (1, 65535)

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_CIDRS_TOTAL = 200_000
MAX_IDENTITIES = 10_000
MAX_RULES_PER_IDENTITY = RULE_NUMBER_MAX  # the kernel numbers rules 1.. in 16 bits
MAX_EXEC_PER_IDENTITY = 10_000
MAX_EXEC_TOTAL = 50_000  # executables over the whole policy

# Socket kinds an identity may create besides TCP and UDP over IPv4/IPv6
# (which its egress rules judge at connect): "family/type/protocol".
SOCKET_FAMILIES = {"inet": 2, "inet6": 10}
SOCKET_TYPES = {"stream": 1, "dgram": 2, "raw": 3, "seqpacket": 5}
SOCKET_PROTOCOLS = {
    "icmp": 1,
    "tcp": 6,
    "udp": 17,
    "icmpv6": 58,
    "sctp": 132,
    "udplite": 136,
    "raw": 255,
    "mptcp": 262,
}
# The kinds the kernel lets through at socket() and judges at connect/sendmsg
# by the egress rules (bpf/connect.bpf.c, sidecar_sock_create).
_JUDGED_AT_CONNECT = (
    (SOCKET_TYPES["stream"], SOCKET_PROTOCOLS["tcp"]),
    (SOCKET_TYPES["dgram"], SOCKET_PROTOCOLS["udp"]),
)
MAX_SOCKETS_PER_IDENTITY = 64
MAX_SOCKETS_TOTAL = 4_096  # socket kinds over the whole policy
MAX_UNIX_TOTAL = 4_096  # unix socket addresses over the whole policy
UnixAddress = tuple[bytes, bool]  # sun_path bytes (abstract: a leading NUL), is a prefix
SocketKind = tuple[int, int, int]  # family, type, protocol

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/\[\]-]{0,63}$")

PortRange = tuple[int, int]


@dataclass(frozen=True)
class EgressRule:
    """One allowlist rule: CIDRs x port ranges x protocols."""

    name: str
    cidrs: tuple[Cidr, ...]
    ports: tuple[PortRange, ...]  # sorted, disjoint, non-adjacent
    protocol_mask: int  # PROTOCOL_BITS or'ed
    line: int
    path: Path_

    @property
    def protocols(self) -> tuple[str, ...]:
        return protocols_of(self.protocol_mask)


@dataclass(frozen=True)
class IdentitySpec:
    spiffe_id: str
    mode: str
    egress: tuple[EgressRule, ...]
    exec_paths: frozenset[str] | None  # None: unrestricted
    line: int
    path: Path_
    sockets: frozenset[SocketKind] = frozenset()
    capabilities: frozenset[int] = frozenset()  # accepted, of caps.DANGEROUS
    unix: frozenset[UnixAddress] | None = None  # None: unrestricted


@dataclass(frozen=True)
class PolicySpec:
    """A validated policy, as written (before compilation)."""

    source: str
    unidentified: str
    log_allowed: bool
    identities: tuple[IdentitySpec, ...]

    def error(self, line: int, path: Path_, message: str) -> PolicyError:
        """An error in the file:line: field form that yamlsrc uses."""
        return PolicyError(f"{self.source}:{line}: {render_path(path)}: {message}")


def protocols_of(mask: int) -> tuple[str, ...]:
    return tuple(p for p, bit in PROTOCOL_BITS.items() if mask & bit)


def format_ports(ports: tuple[PortRange, ...]) -> str:
    if ports == (ALL_PORTS,):
        return "all ports"
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in ports)


def parse_policy(doc: Document) -> PolicySpec:
    """Validate a parsed YAML document into a :class:`PolicySpec`."""
    top = check_header(doc, API_VERSION, KIND)
    unidentified, log_allowed = _parse_defaults(doc, top)
    raw_identities = top.optional("identities", list, [])
    top.done()
    if len(raw_identities) > MAX_IDENTITIES:
        raise doc.error(
            ("identities",), f"{len(raw_identities)} identities, more than {MAX_IDENTITIES}"
        )
    identities: list[IdentitySpec] = []
    first_seen: dict[str, int] = {}
    budget = _CidrBudget()
    execs = sockets = unix = 0
    for i, raw in enumerate(raw_identities):
        ident = _parse_identity(doc, ("identities", i), raw, budget)
        execs += len(ident.exec_paths or ())
        sockets += len(ident.sockets)
        unix += len(ident.unix or ())
        if unix > MAX_UNIX_TOTAL:
            raise doc.error(
                ("identities", i, "unix"),
                f"the policy lists more than {MAX_UNIX_TOTAL} unix socket addresses in total",
            )
        if execs > MAX_EXEC_TOTAL:
            raise doc.error(
                ("identities", i, "exec"),
                f"the policy lists more than {MAX_EXEC_TOTAL} executables in total",
            )
        if sockets > MAX_SOCKETS_TOTAL:
            raise doc.error(
                ("identities", i, "sockets"),
                f"the policy lists more than {MAX_SOCKETS_TOTAL} socket kinds in total",
            )
        if ident.spiffe_id in first_seen:
            raise doc.error(
                ("identities", i, "id"),
                f"duplicate identity '{ident.spiffe_id}' (first at line "
                f"{first_seen[ident.spiffe_id]})",
            )
        first_seen[ident.spiffe_id] = ident.line
        identities.append(ident)
    return PolicySpec(doc.source, unidentified, log_allowed, tuple(identities))


def _parse_defaults(doc: Document, top: Fields) -> tuple[str, bool]:
    raw = top.optional("defaults", dict, {})
    f = Fields(doc, ("defaults",), raw)
    unidentified = f.optional("unidentified", str, "allow")
    if unidentified not in UNIDENTIFIED_VERDICTS:
        raise doc.error(f.at("unidentified"), f"must be one of {', '.join(UNIDENTIFIED_VERDICTS)}")
    pending = f.optional("pending", str, "deny")
    if pending not in PENDING_VERDICTS:
        raise doc.error(
            f.at("pending"),
            "only 'deny' is accepted: a process not yet attested may do nothing "
            "its eventual identity could not",
        )
    log_allowed = f.optional("log_allowed", bool, False)
    f.done()
    return unidentified, log_allowed


class _CidrBudget:
    """Counts CIDR entries over the whole file against MAX_CIDRS_TOTAL."""

    def __init__(self) -> None:
        self.used = 0

    def take(self, doc: Document, path: Path_, n: int) -> None:
        self.used += n
        if self.used > MAX_CIDRS_TOTAL:
            raise doc.error(
                path, f"the policy holds more than {MAX_CIDRS_TOTAL} CIDR entries in total"
            )


def _parse_identity(doc: Document, path: Path_, raw: Any, budget: _CidrBudget) -> IdentitySpec:
    f = Fields(doc, path, raw)
    spiffe_id = f.required("id", str)
    try:
        sid = parse_spiffe_id(spiffe_id)
    except ValueError as exc:
        raise doc.error(f.at("id"), str(exc)) from exc
    if not sid.path:
        raise doc.error(f.at("id"), f"'{spiffe_id}' names a trust domain, not a workload")
    mode = f.optional("mode", str, "enforce")
    if mode not in MODES:
        raise doc.error(f.at("mode"), f"must be one of {', '.join(MODES)}, not '{mode}'")
    raw_egress = f.optional("egress", list, [])
    if len(raw_egress) > MAX_RULES_PER_IDENTITY:
        raise doc.error(
            f.at("egress"), f"{len(raw_egress)} rules, more than {MAX_RULES_PER_IDENTITY}"
        )
    egress: list[EgressRule] = []
    names: dict[str, int] = {}
    for j, raw_rule in enumerate(raw_egress):
        rule = _parse_rule(doc, (*path, "egress", j), j, raw_rule, budget)
        if rule.name in names:
            raise doc.error(
                (*rule.path, "name"),
                f"duplicate rule name '{rule.name}' (also egress[{names[rule.name]}])",
            )
        names[rule.name] = j
        egress.append(rule)
    exec_paths = _parse_exec(doc, f.at("exec"), f.optional("exec", list, None))
    sockets = _parse_sockets(doc, f.at("sockets"), f.optional("sockets", list, []))
    capabilities = _parse_capabilities(
        doc, f.at("capabilities"), f.optional("capabilities", list, [])
    )
    unix = _parse_unix(doc, f.at("unix"), f.optional("unix", list, None))
    f.done()
    _check_overlaps(doc, egress)
    return IdentitySpec(
        str(sid),
        mode,
        tuple(egress),
        exec_paths,
        doc.line(path),
        path,
        sockets,
        capabilities,
        unix,
    )


def parse_unix_address(text: str) -> UnixAddress:
    """'/run/x.sock' (exact), '/run/app/*' (prefix), '@name' (abstract), '@name*'."""
    prefix = text.endswith("*")
    body = text[:-1] if prefix else text
    if body.startswith("@"):
        raw = b"\0" + body[1:].encode()
    elif body.startswith("/"):
        if "\0" in body:
            raise ValueError("a path must not contain a NUL byte")
        raw = body.encode()
    else:
        raise ValueError(
            f"'{text}' must be an absolute path (/run/x.sock), a prefix ending in * "
            "(/run/app/*) or an abstract name (@name)"
        )
    limit = UNIX_PATH_LEN if prefix else UNIX_PATH_LEN - 1  # room for the NUL
    if len(raw) > limit or (len(raw) < 2 and not prefix):
        raise ValueError(f"'{text}' does not fit a unix socket address (at most {limit} bytes)")
    return raw, prefix


def format_unix_address(addr: UnixAddress) -> str:
    raw, prefix = addr
    text = (
        "@" + raw[1:].decode(errors="replace") if raw[:1] == b"\0" else raw.decode(errors="replace")
    )
    return text + ("*" if prefix else "")


def _parse_unix(doc: Document, path: Path_, raw: list[Any] | None) -> frozenset[UnixAddress] | None:
    return None if raw is None else _parse_items(doc, path, raw, parse_unix_address)


def _capability(text: str) -> int:
    number = caps.parse(text)
    if caps.NAMES[number] not in caps.DANGEROUS:
        refused = ", ".join(caps.label(caps.NUMBERS[n]) for n in caps.DANGEROUS)
        raise ValueError(
            f"{caps.label(number)} is never refused: list only capabilities that are ({refused})"
        )
    return number


def _parse_capabilities(doc: Document, path: Path_, raw: list[Any]) -> frozenset[int]:
    return _parse_items(doc, path, raw, _capability, label=caps.label)


def _parse_items(
    doc: Document,
    path: Path_,
    raw: list[Any],
    parse: Callable[[str], T],
    limit: tuple[int, str] | None = None,
    label: Callable[[T], str] | None = None,
) -> frozenset[T]:
    """A list of strings, each parsed; errors name the item's line and index."""
    if limit is not None and len(raw) > limit[0]:
        raise doc.error(path, f"{len(raw)} {limit[1]}, more than {limit[0]}")
    out: set[T] = set()
    for k, item in enumerate(raw):
        item_path = (*path, k)
        check_type(doc, item_path, item, str)
        try:
            value = parse(item)
        except ValueError as exc:
            raise doc.error(item_path, str(exc)) from exc
        if value in out:
            shown = label(value) if label is not None else f"'{item}'"
            raise doc.error(item_path, f"{shown} is listed twice")
        out.add(value)
    return frozenset(out)


def parse_socket_kind(text: str) -> SocketKind:
    """'inet/raw/icmp' -> (AF_INET, SOCK_RAW, IPPROTO_ICMP); numbers are taken too."""
    parts = text.split("/")
    if len(parts) != 3:
        raise ValueError(f"'{text}' must be family/type/protocol, for example inet/raw/icmp")
    family, stype, proto = (p.strip().lower() for p in parts)
    if family not in SOCKET_FAMILIES:
        raise ValueError(f"family '{family}' must be one of {', '.join(SOCKET_FAMILIES)}")
    if stype not in SOCKET_TYPES:
        raise ValueError(f"type '{stype}' must be one of {', '.join(SOCKET_TYPES)}")
    if proto.isdigit() and int(proto) <= 65535:
        number = int(proto)
    elif proto in SOCKET_PROTOCOLS:
        number = SOCKET_PROTOCOLS[proto]
    else:
        raise ValueError(
            f"protocol '{proto}' must be a number 0-65535 or one of {', '.join(SOCKET_PROTOCOLS)}"
        )
    kind = (SOCKET_FAMILIES[family], SOCKET_TYPES[stype], number)
    if kind[1:] in _JUDGED_AT_CONNECT:
        raise ValueError(
            f"'{text}' is TCP or UDP, which every identity may create: its egress rules judge it"
        )
    return kind


def format_socket_kind(kind: SocketKind) -> str:
    family, stype, proto = kind
    names = {v: k for k, v in SOCKET_PROTOCOLS.items()}
    f = next((k for k, v in SOCKET_FAMILIES.items() if v == family), str(family))
    t = next((k for k, v in SOCKET_TYPES.items() if v == stype), str(stype))
    return f"{f}/{t}/{names.get(proto, str(proto))}"


def _parse_sockets(doc: Document, path: Path_, raw: list[Any]) -> frozenset[SocketKind]:
    limit = (MAX_SOCKETS_PER_IDENTITY, "socket kinds")
    return _parse_items(doc, path, raw, parse_socket_kind, limit)


def _parse_rule(
    doc: Document, path: Path_, index: int, raw: Any, budget: _CidrBudget
) -> EgressRule:
    f = Fields(doc, path, raw)
    name = f.optional("name", str, f"egress[{index}]")
    if not _NAME_RE.match(name):
        raise doc.error(
            f.at("name"),
            f"'{name}' must be 1-64 characters of letters, digits and . _ : / [ ] -, "
            "starting with a letter or digit",
        )
    raw_cidrs = f.required("cidrs", list)
    if not raw_cidrs:
        raise doc.error(f.at("cidrs"), "must list at least one CIDR (omit the rule instead)")
    budget.take(doc, f.at("cidrs"), len(raw_cidrs))
    cidrs: list[Cidr] = []
    seen: set[Cidr] = set()
    for k, item in enumerate(raw_cidrs):
        item_path = (*f.at("cidrs"), k)
        check_type(doc, item_path, item, str)
        try:
            cidr = parse_cidr(item)
        except ValueError as exc:
            raise doc.error(item_path, str(exc)) from exc
        if cidr in seen:
            raise doc.error(item_path, f"{cidr} is listed twice")
        seen.add(cidr)
        cidrs.append(cidr)
    ports = _parse_ports(doc, f.at("ports"), f.optional("ports", list, None))
    mask = _parse_protocols(doc, f.at("protocols"), f.optional("protocols", list, None))
    f.done()
    return EgressRule(name, tuple(cidrs), ports, mask, doc.line(path), path)


def _parse_port_item(item: Any) -> PortRange:
    if isinstance(item, int) and not isinstance(item, bool):
        lo = hi = item
    elif isinstance(item, str):
        text = item.strip()
        lo_s, dash, hi_s = text.partition("-")
        if not lo_s.strip().isdigit() or (dash and not hi_s.strip().isdigit()):
            raise ValueError(f"'{item}' is not a port or a 'lo-hi' port range")
        lo = int(lo_s)
        hi = int(hi_s) if dash else lo
    else:
        got = "nothing" if item is None else type(item).__name__
        raise ValueError(f"must be a port number or a 'lo-hi' string, not {got}")
    for p in (lo, hi):
        if not 1 <= p <= 65535:
            raise ValueError(f"port {p} is outside 1-65535")
    if lo > hi:
        raise ValueError(f"range '{item}' is backwards: {lo} is greater than {hi}")
    return lo, hi


def _parse_ports(doc: Document, path: Path_, raw: list[Any] | None) -> tuple[PortRange, ...]:
    if raw is None:
        return (ALL_PORTS,)
    if not raw:
        raise doc.error(path, "must list at least one port (omit 'ports' to allow all ports)")
    ranges: list[PortRange] = []
    for k, item in enumerate(raw):
        try:
            ranges.append(_parse_port_item(item))
        except ValueError as exc:
            raise doc.error((*path, k), str(exc)) from exc
    merged: list[list[int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    return tuple((lo, hi) for lo, hi in merged)


def _parse_protocols(doc: Document, path: Path_, raw: list[Any] | None) -> int:
    if raw is None:
        return ALL_PROTOCOLS
    if not raw:
        raise doc.error(path, "must list at least one protocol (omit it to allow tcp and udp)")
    mask = 0
    for k, item in enumerate(raw):
        check_type(doc, (*path, k), item, str)
        bit = PROTOCOL_BITS.get(item)
        if bit is None:
            raise doc.error((*path, k), f"must be tcp or udp, not '{item}'")
        if mask & bit:
            raise doc.error((*path, k), f"'{item}' is listed twice")
        mask |= bit
    return mask


def _parse_exec(doc: Document, path: Path_, raw: list[Any] | None) -> frozenset[str] | None:
    if raw is None:
        return None
    if len(raw) > MAX_EXEC_PER_IDENTITY:
        raise doc.error(path, f"{len(raw)} executables, more than {MAX_EXEC_PER_IDENTITY}")
    out: set[str] = set()
    for k, item in enumerate(raw):
        item_path = (*path, k)
        check_type(doc, item_path, item, str)
        problem = exec_path_problem(item)
        if problem is not None:
            raise doc.error(item_path, problem)
        if item in out:
            raise doc.error(item_path, f"'{item}' is listed twice")
        out.add(item)
    return frozenset(out)


def exec_path_problem(path: str) -> str | None:
    """Why ``path`` cannot be an exec allowlist entry, or None if it can.

    Entries are matched exactly against the resolved executable path, so
    they must be absolute and normal (no ``.``, ``..``, ``//`` or trailing ``/``),
    and short enough for the kernel's exec record to carry whole.
    """
    if "\0" in path:
        return "must not contain a NUL byte"
    size = len(path.encode(errors="surrogateescape"))
    if size > EXEC_PATH_MAX_BYTES:
        # The kernel judges the file, whatever its path's length, but reports
        # each exec with the path cut to this: the events, the audit verdicts
        # and the policy tools could never name an exec of this path.
        return (
            f"path is {size} bytes, longer than the {EXEC_PATH_MAX_BYTES} an exec record "
            "carries: its execs could not be reported by name"
        )
    if not path.startswith("/"):
        return f"'{path}' must be an absolute path"
    normal = posixpath.normpath(path)
    if normal.startswith("//"):
        normal = "/" + normal.lstrip("/")
    if normal != path:
        return f"'{path}' is not normalized: did you mean '{normal}'?"
    return None


def rules_overlap(a: EgressRule, b: EgressRule) -> PortRange | None:
    """The first port range both rules allow for a shared protocol, if any."""
    if not a.protocol_mask & b.protocol_mask:
        return None
    for alo, ahi in a.ports:
        for blo, bhi in b.ports:
            lo, hi = max(alo, blo), min(ahi, bhi)
            if lo <= hi:
                return lo, hi
    return None


def _check_overlaps(doc: Document, rules: list[EgressRule]) -> None:
    """Refuse two rules of one identity that match a common (address, port, protocol).

    Prefixes are either nested or disjoint, so a sweep over the prefixes
    sorted by (start, length) keeps on a stack exactly the prefixes that
    contain the current one: only those pairs need the port/protocol check.
    """
    items = sorted(
        (c.address, c.length, c.hi, r) for r, rule in enumerate(rules) for c in rule.cidrs
    )
    stack: list[tuple[int, int, int]] = []  # (hi, rule index, length)
    checked: dict[tuple[int, int], PortRange | None] = {}
    for address, length, hi, r in items:
        while stack and stack[-1][0] < address:
            stack.pop()
        for _, other, other_len in stack:
            if other == r:
                continue
            key = (min(other, r), max(other, r))
            if key not in checked:
                checked[key] = rules_overlap(rules[key[0]], rules[key[1]])
            common = checked[key]
            if common is not None:
                first, later = rules[key[0]], rules[key[1]]
                a_cidr = Cidr(address & _prefix_mask(other_len), other_len)
                b_cidr = Cidr(address, length)
                protos = "/".join(protocols_of(first.protocol_mask & later.protocol_mask))
                raise doc.error(
                    later.path,
                    f"rule '{later.name}' overlaps rule '{first.name}' (line {first.line}): "
                    f"{a_cidr} and {b_cidr} overlap and both allow {protos} "
                    f"port {_span(common)}; a connection must match one rule only",
                )
        stack.append((hi, r, length))


def _span(ports: PortRange) -> str:
    lo, hi = ports
    return str(lo) if lo == hi else f"{lo}-{hi}"


def _prefix_mask(length: int) -> int:
    return ((1 << 128) - 1) ^ ((1 << (128 - length)) - 1)
