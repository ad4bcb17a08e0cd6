"""The compiled form and the reference evaluator.

A naive evaluator over the SOURCE rules (ipaddress containment, every rule
tried) is the oracle: the compiled form (one longest-prefix match, then the
port rules of that one entry) must decide exactly as it does.
"""

from __future__ import annotations

import ipaddress
import textwrap
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.policy import (
    MAX_RULES_PER_PREFIX,
    CompiledPolicy,
    Decision,
    PortRule,
    decide,
    decide_exec,
    exec_allowed,
    load_policy_text,
)
from sidecar.util.errors import PolicyError

HEADER = "apiVersion: sidecar/v1\nkind: Policy\n"
A = "spiffe://example.org/agent/a"
B = "spiffe://example.org/agent/b"


def load(body: str) -> CompiledPolicy:
    return load_policy_text(HEADER + textwrap.dedent(body), "t.yaml")


# --- the naive oracle -------------------------------------------------------

Net = ipaddress.IPv6Network


def as_v6_net(text: str) -> Net:
    net = ipaddress.ip_network(text)
    if isinstance(net, ipaddress.IPv4Network):
        return ipaddress.IPv6Network(f"::ffff:{net.network_address}/{96 + net.prefixlen}")
    return net


def as_v6_addr(text: str) -> ipaddress.IPv6Address:
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv4Address):
        return ipaddress.IPv6Address(f"::ffff:{addr}")
    return addr


def port_ranges(items: list[Any] | None) -> list[tuple[int, int]]:
    if items is None:
        return [(1, 65535)]
    out = []
    for item in items:
        if isinstance(item, int):
            out.append((item, item))
        else:
            lo, _, hi = str(item).partition("-")
            out.append((int(lo), int(hi or lo)))
    return out


def naive_decide(
    doc: dict[str, Any], identity: str | None, protocol: str, address: str, port: int
) -> Decision:
    defaults = doc.get("defaults") or {}
    ident = next((i for i in doc.get("identities") or [] if i["id"] == identity), None)
    if ident is None:  # no identity, or one the policy does not list
        return Decision(defaults.get("unidentified", "allow"), "default")
    addr = as_v6_addr(address)
    matches = []
    for n, rule in enumerate(ident.get("egress") or []):
        in_cidr = any(addr in as_v6_net(c) for c in rule["cidrs"])
        in_port = any(lo <= port <= hi for lo, hi in port_ranges(rule.get("ports")))
        in_proto = protocol in (rule.get("protocols") or ["tcp", "udp"])
        if in_cidr and in_port and in_proto:
            matches.append(rule.get("name", f"egress[{n}]"))
    assert len(matches) <= 1, f"validation let overlapping rules through: {matches}"
    if matches:
        return Decision("allow", matches[0])
    return Decision("would_deny" if ident.get("mode") == "audit" else "deny", "default")


def naive_overlap(r1: dict[str, Any], r2: dict[str, Any]) -> bool:
    cidr = any(as_v6_net(a).overlaps(as_v6_net(b)) for a in r1["cidrs"] for b in r2["cidrs"])
    ports = any(
        max(a[0], b[0]) <= min(a[1], b[1])
        for a in port_ranges(r1.get("ports"))
        for b in port_ranges(r2.get("ports"))
    )
    protos = set(r1.get("protocols") or ["tcp", "udp"]) & set(r2.get("protocols") or ["tcp", "udp"])
    return cidr and ports and bool(protos)


# --- generated policies with a lot of nesting -----------------------------------

V4_LENGTHS = [0, 8, 9, 16, 24, 31, 32]


@st.composite
def cidrs(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 5)) == 0:
        return draw(st.sampled_from(["::/0", "2001:db8::/32", "2001:db8::/126", "2001:db8::3/128"]))
    # addresses from a few values per octet make nested and adjacent prefixes likely
    octets = [10, draw(st.sampled_from([0, 1, 255])), draw(st.sampled_from([0, 2, 255]))]
    octets.append(draw(st.sampled_from([0, 1, 2, 3, 255])))
    length = draw(st.sampled_from(V4_LENGTHS))
    net = ipaddress.ip_network(f"{'.'.join(map(str, octets))}/{length}", strict=False)
    if draw(st.booleans()) and length > 0:
        return f"::ffff:{net.network_address}/{96 + length}"  # the mapped spelling
    return str(net)


port_items = st.sampled_from([1, 53, 80, 443, 65535, "1-79", "80-443", "444-65535", "8000-8080"])


@st.composite
def rules(draw: st.DrawFn) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "cidrs": draw(st.lists(cidrs(), min_size=1, max_size=2, unique_by=as_v6_net))
    }
    if draw(st.booleans()):
        rule["ports"] = draw(st.lists(port_items, min_size=1, max_size=2, unique=True))
    if draw(st.booleans()):
        rule["protocols"] = draw(st.sampled_from([["tcp"], ["udp"], ["udp", "tcp"]]))
    return rule


def ports_fit(rule: dict[str, Any]) -> bool:
    """Two items can merge into one range; keep the 8-per-prefix cap out of this test."""
    return len(port_ranges(rule.get("ports"))) <= 2


@st.composite
def policies(draw: st.DrawFn) -> dict[str, Any]:
    identities = []
    for n, sid in enumerate([A, B][: draw(st.integers(1, 2))]):
        accepted: list[dict[str, Any]] = []
        for candidate in draw(st.lists(rules(), max_size=4)):
            if ports_fit(candidate) and not any(naive_overlap(candidate, r) for r in accepted):
                accepted.append(candidate)
        for k, rule in enumerate(accepted):
            if draw(st.booleans()):
                rule["name"] = f"rule-{n}-{k}"
        identities.append(
            {"id": sid, "mode": draw(st.sampled_from(["enforce", "audit"])), "egress": accepted}
        )
    return {
        "apiVersion": "sidecar/v1",
        "kind": "Policy",
        "defaults": {"unidentified": draw(st.sampled_from(["allow", "deny"]))},
        "identities": identities,
    }


def probe_addresses(doc: dict[str, Any]) -> set[str]:
    """First and last address of every CIDR and their outside neighbours, in both spellings."""
    out = {"10.0.0.1", "192.0.2.1", "2001:db8::1", "::1"}
    for ident in doc["identities"]:
        for rule in ident["egress"]:
            for c in rule["cidrs"]:
                net = as_v6_net(c)
                first, last = int(net.network_address), int(net.broadcast_address)
                for v in (first - 1, first, last, last + 1):
                    if 0 <= v < 2**128:
                        addr = ipaddress.IPv6Address(v)
                        out.add(str(addr))
                        if addr.ipv4_mapped is not None:
                            out.add(str(addr.ipv4_mapped))
    return out


def probe_ports(doc: dict[str, Any]) -> set[int]:
    out = {1, 65535}
    for ident in doc["identities"]:
        for rule in ident["egress"]:
            for lo, hi in port_ranges(rule.get("ports")):
                out |= {p for p in (lo - 1, lo, hi, hi + 1) if 0 <= p <= 65535}
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies())
def test_compiled_decisions_agree_with_naive_evaluation_of_source_rules(
    doc: dict[str, Any],
) -> None:
    policy = load_policy_text(yaml.safe_dump(doc), "gen.yaml")
    ports = probe_ports(doc)
    for address in probe_addresses(doc):
        for identity in (A, B, None, "spiffe://example.org/unlisted"):
            for protocol in ("tcp", "udp"):
                for port in ports:
                    got = decide(policy, identity, protocol, address, port)
                    want = naive_decide(doc, identity, protocol, address, port)
                    assert got == want, (identity, protocol, address, port)


@settings(max_examples=200, deadline=None)
@given(rules(), rules())
def test_two_rules_are_refused_exactly_when_they_overlap(
    r1: dict[str, Any], r2: dict[str, Any]
) -> None:
    doc = {
        "apiVersion": "sidecar/v1",
        "kind": "Policy",
        "identities": [{"id": A, "egress": [r1, r2]}],
    }
    text = yaml.safe_dump(doc)
    if naive_overlap(r1, r2):
        with pytest.raises(PolicyError, match="overlaps"):
            load_policy_text(text)
    elif ports_fit(r1) and ports_fit(r2):
        load_policy_text(text)


@settings(max_examples=100, deadline=None)
@given(policies())
def test_every_prefix_entry_holds_all_rules_covering_it(doc: dict[str, Any]) -> None:
    policy = load_policy_text(yaml.safe_dump(doc))
    for ident in doc["identities"]:
        ci = policy.identities[ident["id"]]
        for entry in ci.prefixes:
            assert len(entry.rules) <= MAX_RULES_PER_PREFIX
            net = ipaddress.IPv6Network((entry.address, entry.prefix_len))
            covering = {
                rule.get("name", f"egress[{n}]")
                for n, rule in enumerate(ident["egress"])
                if any(net.subnet_of(as_v6_net(c)) for c in rule["cidrs"])
            }
            assert {ci.rule_names[r.rule_index] for r in entry.rules} == covering


# --- hand examples ------------------------------------------------------------

BOUNDARY_POLICY = f"""\
identities:
  - id: {A}
    egress:
      - name: web
        cidrs: [10.1.2.0/24, "2001:db8::/32"]
        ports: ["8000-8080"]
        protocols: [tcp]
"""


@pytest.mark.parametrize(
    ("address", "port", "protocol", "allowed"),
    [
        ("10.1.2.0", 8000, "tcp", True),  # first address, first port
        ("10.1.2.255", 8080, "tcp", True),  # last address, last port
        ("10.1.1.255", 8000, "tcp", False),  # address before
        ("10.1.3.0", 8000, "tcp", False),  # address after
        ("10.1.2.7", 7999, "tcp", False),  # port before
        ("10.1.2.7", 8081, "tcp", False),  # port after
        ("10.1.2.7", 8040, "udp", False),  # other protocol
        ("2001:db8::", 8000, "tcp", True),
        ("2001:db8:ffff:ffff:ffff:ffff:ffff:ffff", 8080, "tcp", True),
        ("2001:db7:ffff:ffff:ffff:ffff:ffff:ffff", 8000, "tcp", False),
        ("2001:db9::", 8000, "tcp", False),
        ("::ffff:10.1.2.0", 8000, "tcp", True),  # IPv4-mapped spelling
        ("::ffff:10.1.3.0", 8000, "tcp", False),
        ("fe80::1%eth0", 8000, "tcp", False),
    ],
)
def test_cidr_and_port_range_boundaries_are_exact(
    address: str, port: int, protocol: str, allowed: bool
) -> None:
    policy = load(BOUNDARY_POLICY)
    expected = Decision("allow", "web") if allowed else Decision("deny", "default")
    assert decide(policy, A, protocol, address, port) == expected


def test_ipv4_and_ipv4_mapped_rules_are_the_same_policy() -> None:
    v4 = load(f"identities: [{{id: {A}, egress: [{{cidrs: [10.0.0.0/8], ports: [443]}}]}}]\n")
    mapped = load(
        f'identities: [{{id: {A}, egress: [{{cidrs: ["::ffff:10.0.0.0/104"], ports: [443]}}]}}]\n'
    )
    assert v4.version == mapped.version
    assert v4.identities == mapped.identities
    for policy in (v4, mapped):
        assert decide(policy, A, "tcp", "::ffff:10.1.2.3", 443).verdict == "allow"
        assert decide(policy, A, "tcp", "10.1.2.3", 443).verdict == "allow"
        assert decide(policy, A, "tcp", "11.1.2.3", 443).verdict == "deny"
    (entry,) = v4.identities[A].prefixes
    assert entry.address == bytes(10) + b"\xff\xff\x0a\x00\x00\x00"
    assert entry.prefix_len == 96 + 8


def test_ipv6_default_route_covers_ipv4_and_ipv4_default_does_not_cover_ipv6() -> None:
    policy = load(
        f"""\
        identities:
          - {{id: {A}, egress: [{{name: v4-any, cidrs: [0.0.0.0/0], ports: [80]}}]}}
          - {{id: {B}, egress: [{{name: any, cidrs: ["::/0"], ports: [80]}}]}}
        """
    )
    assert decide(policy, A, "tcp", "203.0.113.9", 80) == Decision("allow", "v4-any")
    assert decide(policy, A, "tcp", "2001:db8::1", 80) == Decision("deny", "default")
    assert decide(policy, B, "tcp", "203.0.113.9", 80) == Decision("allow", "any")


def test_rules_of_a_broader_prefix_are_pushed_into_the_narrower_one() -> None:
    policy = load(
        f"""\
        identities:
          - id: {A}
            egress:
              - {{name: wide, cidrs: [10.0.0.0/8], ports: [80], protocols: [tcp]}}
              - {{name: narrow, cidrs: [10.1.0.0/16], ports: [443], protocols: [udp]}}
        """
    )
    ci = policy.identities[A]
    assert ci.rule_names == ("narrow", "wide")
    wide, narrow = ci.prefixes
    assert (wide.prefix_len, narrow.prefix_len) == (104, 112)
    assert wide.rules == (PortRule(1, 80, 80, 1),)
    assert narrow.rules == (PortRule(1, 80, 80, 1), PortRule(2, 443, 443, 0))
    # a connect inside the narrow prefix still gets the wide rule after ONE lookup
    assert decide(policy, A, "tcp", "10.1.9.9", 80) == Decision("allow", "wide")
    assert decide(policy, A, "udp", "10.1.9.9", 443) == Decision("allow", "narrow")
    assert decide(policy, A, "udp", "10.2.9.9", 443) == Decision("deny", "default")


def test_omitted_ports_and_protocols_mean_all_of_them() -> None:
    policy = load(f"identities: [{{id: {A}, egress: [{{name: all, cidrs: [10.0.0.1/32]}}]}}]\n")
    (entry,) = policy.identities[A].prefixes
    assert entry.rules == (PortRule(3, 1, 65535, 0),)
    assert decide(policy, A, "udp", "10.0.0.1", 65535).verdict == "allow"
    assert decide(policy, A, "tcp", "10.0.0.1", 1).verdict == "allow"
    assert decide(policy, A, "tcp", "10.0.0.1", 0).verdict == "deny"


def test_audit_mode_reports_would_deny_and_unlisted_identities_follow_the_default() -> None:
    policy = load(
        f"""\
        defaults: {{unidentified: deny}}
        identities:
          - {{id: {A}, mode: audit, egress: [{{name: web, cidrs: [10.0.0.0/8], ports: [443]}}]}}
        """
    )
    assert decide(policy, A, "tcp", "10.0.0.1", 443) == Decision("allow", "web")
    assert decide(policy, A, "tcp", "10.0.0.1", 80) == Decision("would_deny", "default")
    assert decide(policy, None, "tcp", "10.0.0.1", 443) == Decision("deny", "default")
    assert decide(policy, B, "tcp", "10.0.0.1", 443) == Decision("deny", "default")  # unlisted
    allow_unidentified = load("defaults: {unidentified: allow}\n")
    assert decide(allow_unidentified, None, "udp", "::1", 53) == Decision("allow", "default")
    assert decide(allow_unidentified, B, "udp", "::1", 0) == Decision("allow", "default")


def test_exec_allowlist_semantics() -> None:
    policy = load(
        f"""\
        identities:
          - {{id: {A}, exec: [/usr/bin/curl]}}
          - {{id: {B}, mode: audit, exec: []}}
          - {{id: "spiffe://example.org/free"}}
        """
    )
    assert exec_allowed(policy, A, "/usr/bin/curl")
    assert not exec_allowed(policy, A, "/usr/bin/curl2")
    assert decide_exec(policy, A, "/bin/sh") == Decision("deny", "default")
    assert decide_exec(policy, B, "/usr/bin/curl") == Decision("would_deny", "default")
    assert not exec_allowed(policy, B, "/usr/bin/curl")
    assert exec_allowed(policy, "spiffe://example.org/free", "/anything")  # exec omitted
    # as in the kernel, execs of unlisted identities and of processes without one are free
    assert exec_allowed(policy, "spiffe://example.org/unlisted", "/usr/bin/curl")
    assert exec_allowed(policy, None, "/bin/sh")
    strict = load("defaults: {unidentified: deny}\n")
    assert decide_exec(strict, None, "/bin/sh") == Decision("allow", "default")


def test_decide_rejects_bad_arguments_with_value_error() -> None:
    policy = load("identities: []\n")
    with pytest.raises(ValueError, match="protocol"):
        decide(policy, A, "icmp", "10.0.0.1", 1)
    with pytest.raises(ValueError, match="port"):
        decide(policy, A, "tcp", "10.0.0.1", 70000)
    with pytest.raises(ValueError):
        decide(policy, A, "tcp", "not-an-address", 1)


SHUFFLE_A = f"""\
defaults: {{log_allowed: true, unidentified: deny}}
identities:
  - id: {A}
    egress:
      - {{name: dns, cidrs: [10.0.0.53/32, "2001:db8::53/128"], ports: [53], protocols: [udp]}}
      - {{name: web, cidrs: [10.0.0.0/8], ports: [443, 80]}}
    exec: [/usr/bin/curl, /bin/sh]
  - id: {B}
    mode: audit
"""
SHUFFLE_B = f"""\
identities:
  - mode: audit
    id: {B}
  - exec: [/bin/sh, /usr/bin/curl]
    egress:
      - {{ports: [80, 443], cidrs: ["::ffff:10.0.0.0/104"], name: web}}
      - {{protocols: [udp], ports: [53], cidrs: ["2001:db8::53", 10.0.0.53], name: dns}}
    id: {A}
defaults: {{unidentified: deny, log_allowed: true}}
"""


def test_version_is_stable_under_reordering_and_respelling() -> None:
    a, b = load(SHUFFLE_A), load(SHUFFLE_B)
    assert a.version == b.version
    assert a.identities == b.identities


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("name: web", "name: www"),  # rule names are reported in events
        ("ports: [443, 80]", "ports: [443, 81]"),
        ("mode: audit", "mode: enforce"),
        ("log_allowed: true", "log_allowed: false"),
        ("exec: [/usr/bin/curl, /bin/sh]", "exec: [/usr/bin/curl]"),
    ],
)
def test_version_changes_with_any_change_of_meaning(old: str, new: str) -> None:
    assert old in SHUFFLE_A
    assert load(SHUFFLE_A).version != load(SHUFFLE_A.replace(old, new)).version


def test_version_does_not_depend_on_the_source_name() -> None:
    text = HEADER + textwrap.dedent(SHUFFLE_A)
    assert load_policy_text(text, "one.yaml").version == load_policy_text(text, "two").version
    assert load_policy_text(text, "one.yaml").source == "one.yaml"
