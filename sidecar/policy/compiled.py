"""The compiled policy: exactly what the kernel maps are filled from.

The kernel makes ONE longest-prefix-match lookup per connect (identity +
destination address) and then scans at most :data:`MAX_RULES_PER_PREFIX`
port rules.  A single lookup only sees the most specific prefix, so the
compiler pushes every rule of a broader prefix down into each more specific
prefix it contains: a prefix entry holds ALL rules of the identity whose
CIDRs cover its addresses.  Because rules of one identity never overlap
(validated in :mod:`sidecar.policy.model`), at most one of them matches.

The version is the first 16 hex characters of the sha256 of this compiled
content in a canonical order (identities by id, rules by name, prefixes by
address and length).  So the same rules give the same version however the
YAML orders keys, identities, rules or CIDRs, and however it spells an IPv4
address (``10.0.0.0/8`` or ``::ffff:10.0.0.0/104``); renaming a rule changes
the version, because decisions report rule names.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from functools import cached_property

from sidecar.kernel.limits import MAX_PORT_RULES
from sidecar.policy.model import EgressRule, IdentitySpec, PolicySpec
from sidecar.policy.space import ADDRESS_BITS, Cidr

_logger = logging.getLogger(__name__)

MAX_RULES_PER_PREFIX = MAX_PORT_RULES  # the kernel's egress_rules array (dependency-free)
VERSION_HEX_CHARS = 16
_ALL_ONES = (1 << ADDRESS_BITS) - 1


@dataclass(frozen=True, order=True)
class PortRule:
    """One port range for the protocols in ``protocol_mask`` (model.PROTOCOL_BITS or'ed)."""

    protocol_mask: int
    port_lo: int
    port_hi: int
    rule_index: int  # index into CompiledIdentity.rule_names


@dataclass(frozen=True)
class PrefixEntry:
    """An LPM-trie entry: ``address`` is 16 bytes in the IPv6 space (IPv4 mapped)."""

    address: bytes
    prefix_len: int  # 0..128 in that space: an IPv4 /24 is 96 + 24
    rules: tuple[PortRule, ...]  # all rules that apply to addresses under this prefix

    @property
    def cidr(self) -> Cidr:
        return Cidr(int.from_bytes(self.address, "big"), self.prefix_len)


@dataclass(frozen=True)
class CompiledIdentity:
    spiffe_id: str
    mode: str
    prefixes: tuple[PrefixEntry, ...]  # sorted by (address, prefix_len)
    rule_names: tuple[str, ...]  # sorted, so rule indexes do not depend on YAML order
    exec_paths: frozenset[str] | None  # None = unrestricted
    # (family, type, protocol) of each socket kind other than TCP/UDP it may create
    sockets: frozenset[tuple[int, int, int]] = frozenset()
    # dangerous capabilities (sidecar.policy.caps) the identity may hold
    capabilities: frozenset[int] = frozenset()
    # unix socket addresses (sun_path bytes, is a prefix) it may use; None: any
    unix: frozenset[tuple[bytes, bool]] | None = None

    @cached_property
    def _lpm_index(self) -> tuple[tuple[int, int, dict[int, PrefixEntry]], ...]:
        by_len: dict[int, dict[int, PrefixEntry]] = {}
        for entry in self.prefixes:
            by_len.setdefault(entry.prefix_len, {})[int.from_bytes(entry.address, "big")] = entry
        return tuple(
            (length, (_ALL_ONES << (ADDRESS_BITS - length)) & _ALL_ONES, by_len[length])
            for length in sorted(by_len, reverse=True)
        )

    def lookup(self, address: int) -> PrefixEntry | None:
        """Longest-prefix match, as the kernel's LPM trie does it."""
        for _, mask, table in self._lpm_index:
            entry = table.get(address & mask)
            if entry is not None:
                return entry
        return None


@dataclass(frozen=True)
class CompiledPolicy:
    version: str
    unidentified: str  # allow | deny
    log_allowed: bool
    identities: dict[str, CompiledIdentity]
    source: str  # where the policy came from (a path or a name), not part of the version


def compile_policy(spec: PolicySpec) -> CompiledPolicy:
    """Compile a validated policy into map entries; PolicyError if it cannot fit."""
    identities = {ident.spiffe_id: _compile_identity(spec, ident) for ident in spec.identities}
    ordered = {k: identities[k] for k in sorted(identities)}
    version = policy_version(spec.unidentified, spec.log_allowed, ordered)
    _logger.debug("compiled %s: %d identities, version %s", spec.source, len(ordered), version)
    return CompiledPolicy(version, spec.unidentified, spec.log_allowed, ordered, spec.source)


def _port_rules(rule: EgressRule, index: int) -> tuple[PortRule, ...]:
    return tuple(PortRule(rule.protocol_mask, lo, hi, index) for lo, hi in rule.ports)


def _compile_identity(spec: PolicySpec, ident: IdentitySpec) -> CompiledIdentity:
    order = sorted(range(len(ident.egress)), key=lambda i: ident.egress[i].name)
    new_index = {old: new for new, old in enumerate(order)}
    rule_names = tuple(ident.egress[i].name for i in order)
    port_rules = [_port_rules(ident.egress[old], new_index[old]) for old in range(len(order))]

    own: dict[Cidr, set[int]] = {}
    for old, rule in enumerate(ident.egress):
        for cidr in rule.cidrs:
            own.setdefault(cidr, set()).add(old)

    # Sorted by (address, length), each prefix comes after every prefix that
    # contains it; the stack holds the chain of enclosing prefixes with the
    # rules accumulated down that chain.
    entries: list[PrefixEntry] = []
    stack: list[tuple[int, frozenset[int]]] = []  # (hi, rule set)
    flat_cache: dict[frozenset[int], tuple[PortRule, ...]] = {}
    for cidr in sorted(own):
        while stack and stack[-1][0] < cidr.address:
            stack.pop()
        rules = frozenset(own[cidr])
        if stack:
            rules |= stack[-1][1]
        stack.append((cidr.hi, rules))
        flat = flat_cache.get(rules)
        if flat is None:
            flat = tuple(sorted(pr for old in rules for pr in port_rules[old]))
            flat_cache[rules] = flat
        if len(flat) > MAX_RULES_PER_PREFIX:
            names = ", ".join(sorted(ident.egress[old].name for old in rules))
            raise spec.error(
                ident.line,
                ident.path,
                f"identity '{ident.spiffe_id}': prefix {cidr} would need {len(flat)} port "
                f"rules (rules {names}, each port range counts once), more than the "
                f"{MAX_RULES_PER_PREFIX} the kernel scans per prefix; merge port ranges "
                "or split the broader rules",
            )
        entries.append(PrefixEntry(cidr.packed(), cidr.length, flat))
    return CompiledIdentity(
        ident.spiffe_id,
        ident.mode,
        tuple(entries),
        rule_names,
        ident.exec_paths,
        ident.sockets,
        ident.capabilities,
        ident.unix,
    )


def policy_version(
    unidentified: str, log_allowed: bool, identities: dict[str, CompiledIdentity]
) -> str:
    """Content hash of the canonical compiled form (see the module docstring)."""
    h = hashlib.sha256()
    h.update(json.dumps(["sidecar/v1", unidentified, log_allowed]).encode())
    for spiffe_id in sorted(identities):
        ci = identities[spiffe_id]
        exec_part = None if ci.exec_paths is None else sorted(ci.exec_paths)
        h.update(b"\n")
        head: list[object] = [spiffe_id, ci.mode, list(ci.rule_names), exec_part, len(ci.prefixes)]
        if ci.sockets:  # only when listed: versions of policies without it stay as they were
            head.append(sorted(ci.sockets))
        if ci.capabilities:
            head.append(["capabilities", sorted(ci.capabilities)])
        if ci.unix is not None:
            head.append(["unix", sorted([raw.hex(), prefix] for raw, prefix in ci.unix)])
        h.update(json.dumps(head).encode())
        for e in ci.prefixes:
            h.update(e.address)
            h.update(bytes((e.prefix_len, len(e.rules))))
            for r in e.rules:
                h.update(
                    r.protocol_mask.to_bytes(1, "big")
                    + r.port_lo.to_bytes(2, "big")
                    + r.port_hi.to_bytes(2, "big")
                    + r.rule_index.to_bytes(2, "big")
                )
    return h.hexdigest()[:VERSION_HEX_CHARS]
