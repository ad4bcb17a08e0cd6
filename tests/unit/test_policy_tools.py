"""Operator tools: diff, suggest, blast radius, and the ``policy`` CLI commands."""

from __future__ import annotations

import argparse
import ipaddress
import json
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.policy import CompiledPolicy, decide, exec_allowed, load_policy_text
from sidecar.policy.allowset import AllowSet
from sidecar.policy.blast import blast_radius
from sidecar.policy.cli import register_cli
from sidecar.policy.diff import diff
from sidecar.policy.history import read_history
from sidecar.policy.suggest import suggest
from sidecar.util.errors import PolicyError

HEADER = "apiVersion: sidecar/v1\nkind: Policy\n"
A = "spiffe://example.org/agent/a"
B = "spiffe://example.org/agent/b"
C = "spiffe://example.org/agent/c"
D = "spiffe://example.org/agent/d"


def load(body: str) -> CompiledPolicy:
    return load_policy_text(HEADER + textwrap.dedent(body), "t.yaml")


def connect(
    identity: str | None,
    daddr: str,
    dport: int,
    protocol: str = "tcp",
    verdict: str = "would_deny",
) -> dict[str, Any]:
    family = "inet6" if ":" in daddr else "inet"
    return {
        "type": "connect",
        "identity": identity,
        "family": family,
        "protocol": protocol,
        "daddr": daddr,
        "dport": dport,
        "verdict": verdict,
        "rule": "default",
        "policy_version": "0" * 16,
    }


def execed(identity: str | None, exe: str, verdict: str = "would_deny") -> dict[str, Any]:
    return {"type": "exec", "identity": identity, "exe": exe, "verdict": verdict}


# --- diff -------------------------------------------------------------------

OLD = f"""\
defaults: {{unidentified: deny}}
identities:
  - id: {A}
    mode: audit
    egress:
      - {{name: web, cidrs: [10.0.0.0/8], ports: [443], protocols: [tcp]}}
      - {{name: dns, cidrs: [10.0.0.53/32], ports: [53], protocols: [udp]}}
    exec: [/usr/bin/curl, /bin/sh]
  - id: {B}
    egress:
      - {{name: any-https, cidrs: ["::/0"], ports: [443], protocols: [tcp]}}
"""
NEW = f"""\
defaults: {{unidentified: deny}}
identities:
  - id: {A}
    egress:
      - {{name: web, cidrs: [10.0.0.0/9], ports: [443], protocols: [tcp]}}
      - {{name: resolver, cidrs: ["::ffff:10.0.0.53/128"], ports: [53], protocols: [udp]}}
      - {{name: api, cidrs: [192.0.2.10/32], ports: [8443], protocols: [tcp]}}
    exec: [/usr/bin/curl, /usr/bin/git]
  - id: {C}
"""


def test_diff_reports_gained_and_lost_destinations_executables_and_modes() -> None:
    result = diff(load(OLD), load(NEW))
    by_id = {d.spiffe_id: d for d in result.identities}
    assert set(by_id) == {A, B, C}

    a = by_id[A]
    assert a.change == "changed"
    assert (a.mode_before, a.mode_after) == ("audit", "enforce")
    assert [d.describe() for d in a.gained] == ["tcp 8443 -> 192.0.2.10/32"]
    assert [d.describe() for d in a.lost] == ["tcp 443 -> 10.128.0.0/9"]  # renamed dns: no change
    assert a.exec_gained == ("/usr/bin/git",)
    assert a.exec_lost == ("/bin/sh",)

    b = by_id[B]
    assert b.change == "removed"
    assert [d.describe() for d in b.lost] == ["tcp 443 -> ::/0"]
    assert b.gained == ()

    c = by_id[C]  # unlisted under 'deny' had nothing; listed without rules still has nothing
    assert (c.change, c.mode_before, c.mode_after) == ("added", None, "enforce")
    assert (c.gained, c.lost, c.exec_after) == ((), (), None)

    text = result.render_text()
    assert f"{A} (changed)" in text
    assert "  mode: audit -> enforce" in text
    assert "  + tcp 8443 -> 192.0.2.10/32" in text
    assert "  - tcp 443 -> 10.128.0.0/9" in text
    assert "  + exec /usr/bin/git" in text
    assert "  - exec /bin/sh" in text

    data = json.loads(json.dumps(result.to_json()))
    a_json = next(d for d in data["identities"] if d["identity"] == A)
    assert a_json["lost"][0]["cidrs"] == [{"cidr": "10.128.0.0/9", "size": 2**23}]
    assert a_json["exec"]["gained"] == ["/usr/bin/git"]


def test_diff_of_a_respelled_policy_is_empty() -> None:
    respelled = OLD.replace("10.0.0.0/8", '"::ffff:10.0.0.0/104"').replace("name: web", "name: w")
    result = diff(load(OLD), load(respelled))
    assert result.empty
    assert result.old_version != result.new_version  # the rule name is part of the version
    assert "no change in what any identity may do" in result.render_text()


def test_diff_reports_changed_defaults() -> None:
    result = diff(load(OLD), load(OLD.replace("unidentified: deny", "unidentified: allow")))
    assert result.defaults == (("unidentified", "deny", "allow"),)
    assert result.identities == ()  # both identities are listed: the default does not reach them


def test_removing_an_identity_under_unidentified_allow_grants_everything() -> None:
    allow_old = OLD.replace("unidentified: deny", "unidentified: allow")
    allow_new = allow_old[: allow_old.index(f"  - id: {B}")]
    (b,) = diff(load(allow_old), load(allow_new)).identities
    assert (b.spiffe_id, b.change, b.lost) == (B, "removed", ())
    gained = AllowSet.from_boxes(
        (
            1 if d.protocols == ("tcp",) else 2 if d.protocols == ("udp",) else 3,
            lo,
            hi,
            [(c.lo, c.hi)],
        )
        for d in b.gained
        for lo, hi in d.ports
        for c in d.cidrs
    )
    # everything (both protocols, ports 0-65535, all addresses) except what B had
    assert gained.count() == 2 * 65536 * 2**128 - 2**128
    assert not gained.contains("tcp", 1, 443)
    assert gained.contains("udp", 1, 443)


# --- suggest ----------------------------------------------------------------

HISTORY = [
    connect(A, "93.184.216.34", 443),
    connect(A, "93.184.216.34", 443),
    connect(A, "93.184.216.35", 443, verdict="allow"),
    connect(A, "::ffff:10.0.0.53", 53, "udp"),
    connect(A, "10.0.0.53", 53, "tcp"),
    connect(A, "2001:db8::1", 8080),
    connect(A, "2001:db8::1", 8081),
    connect(A, "198.51.100.1", 22, verdict="deny"),  # a blocked attempt: not learnt
    connect(None, "1.1.1.1", 443),  # no identity: not learnt
    {"type": "process_exit", "identity": A, "pid": 7},  # other event types are ignored
    execed(A, "/usr/bin/curl"),
    execed(A, "/usr/bin/curl"),
    execed(B, "/bin/sh", verdict="deny"),
]


def test_suggest_groups_destinations_and_comments_the_counts() -> None:
    text = suggest(HISTORY)
    policy = load_policy_text(text, "suggested.yaml")
    assert list(policy.identities) == [A]  # B only had a denied exec
    ci = policy.identities[A]
    assert ci.rule_names == ("tcp-443", "tcp-8080-8081", "tcp-udp-53")
    assert ci.exec_paths == frozenset({"/usr/bin/curl"})
    assert '        cidrs: ["93.184.216.34/32", "93.184.216.35/32"]' in text
    assert '        ports: ["8080-8081"]' in text
    assert "#   93.184.216.34 tcp/443: 2" in text
    assert '- "/usr/bin/curl"  # 2 exec(s) observed' in text
    assert "# skipped 2 denied (blocked) attempts" in text  # a connect and an exec
    assert "# skipped 1 events of processes without identity" in text
    assert decide(policy, A, "tcp", "198.51.100.1", 22).verdict == "deny"
    # exactly what was observed: 2 + 2 + 2 (tcp/udp 53) points
    assert AllowSet.from_identity(ci).count() == 6


def test_suggest_includes_denied_attempts_only_when_asked() -> None:
    policy = load_policy_text(suggest(HISTORY, include_denied=True))
    assert decide(policy, A, "tcp", "198.51.100.1", 22).verdict == "allow"
    assert not exec_allowed(policy, B, "/bin/bash")
    assert exec_allowed(policy, B, "/bin/sh")


def test_suggest_merges_cidrs_and_ports_only_when_asked() -> None:
    history = [connect(A, f"10.1.2.{i}", p) for i in (5, 9) for p in (8000, 8010)]
    history.append(connect(A, "10.9.9.9", 443))
    exact = load_policy_text(suggest(history))
    assert decide(exact, A, "tcp", "10.1.2.6", 8000).verdict == "deny"
    assert decide(exact, A, "tcp", "10.1.2.5", 8005).verdict == "deny"

    merged = load_policy_text(suggest(history, merge_cidrs=24, merge_ports=True))
    assert decide(merged, A, "tcp", "10.1.2.6", 8005).verdict == "allow"
    assert decide(merged, A, "tcp", "10.1.2.6", 8011).verdict == "deny"
    assert decide(merged, A, "tcp", "10.1.3.6", 8005).verdict == "deny"
    # a lone address in its /24 stays a /32
    assert decide(merged, A, "tcp", "10.9.9.10", 443).verdict == "deny"
    assert AllowSet.from_identity(merged.identities[A]).count() == 256 * 11 + 1


def test_suggest_joins_the_closest_ports_when_an_address_exceeds_the_kernel_limit() -> None:
    ports = [100, 102, 104, 106, 108, 110, 112, 114, 116, 200]
    history = [connect(A, "10.0.0.1", p) for p in ports]
    text = suggest(history)
    policy = load_policy_text(text)
    assert "# ports widened: the kernel scans at most 8 port rules per prefix" in text
    for p in ports:
        assert decide(policy, A, "tcp", "10.0.0.1", p).verdict == "allow"
    (entry,) = policy.identities[A].prefixes
    assert len(entry.rules) == 8
    # two gaps of 1 port closed, nothing else widened
    assert AllowSet.from_identity(policy.identities[A]).count() == len(ports) + 2


def test_suggest_of_an_empty_history_is_a_valid_empty_policy() -> None:
    policy = load_policy_text(suggest([]))
    assert policy.identities == {}


ADDRESSES = [
    "10.0.0.1",
    "10.0.0.2",
    "10.0.1.1",
    "::ffff:10.0.0.1",
    "192.0.2.255",
    "2001:db8::1",
    "2001:db8::2",
    "::1",
]
events = st.one_of(
    st.builds(
        connect,
        st.sampled_from([A, B, None]),
        st.sampled_from(ADDRESSES),
        st.sampled_from([1, 53, 54, 443, 444, 8000, 9000, 65535, 0]),
        st.sampled_from(["tcp", "udp"]),
        st.sampled_from(["allow", "would_deny", "deny"]),
    ),
    st.builds(
        execed,
        st.sampled_from([A, B]),
        st.sampled_from(["/usr/bin/curl", "/bin/sh", "relative/tool"]),
        st.sampled_from(["allow", "would_deny"]),
    ),
)


def learnt_points(history: list[dict[str, Any]]) -> dict[str, set[tuple[str, int, int]]]:
    out: dict[str, set[tuple[str, int, int]]] = {}
    for ev in history:
        if ev["type"] != "connect" or ev["identity"] is None or ev["verdict"] == "deny":
            continue
        if ev["dport"] == 0:
            continue
        addr = ipaddress.ip_address(ev["daddr"])
        key = int(addr) | (0xFFFF << 32) if addr.version == 4 else int(addr)
        out.setdefault(ev["identity"], set()).add((ev["protocol"], key, ev["dport"]))
    return out


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(events, max_size=40),
    st.one_of(st.none(), st.sampled_from([16, 24, 30, 32])),
    st.booleans(),
)
def test_suggested_policy_loads_and_allows_the_whole_history(
    history: list[dict[str, Any]], merge_cidrs: int | None, merge_ports: bool
) -> None:
    policy = load_policy_text(suggest(history, merge_cidrs, merge_ports), "suggested.yaml")
    for ev in history:
        if ev["identity"] is None or ev["verdict"] == "deny":
            continue
        if ev["type"] == "connect" and ev["dport"] != 0:
            d = decide(policy, ev["identity"], ev["protocol"], ev["daddr"], ev["dport"])
            assert d.verdict == "allow"
        elif ev["type"] == "exec" and ev["exe"].startswith("/"):
            assert exec_allowed(policy, ev["identity"], ev["exe"])
    if merge_cidrs is None and not merge_ports:
        # minimal: nothing that was not observed is allowed
        points = learnt_points(history)
        for sid, ci in policy.identities.items():
            assert AllowSet.from_identity(ci).count() == len(points.get(sid, ()))
            execs = {
                e["exe"]
                for e in history
                if e["type"] == "exec" and e["identity"] == sid and e["exe"].startswith("/")
            }
            assert ci.exec_paths == frozenset(execs)


# --- blast radius ---------------------------------------------------------------

BLAST_POLICY = f"""\
defaults: {{unidentified: deny}}
identities:
  - id: {A}
    egress:
      - {{name: web, cidrs: [10.0.0.0/24], ports: [443], protocols: [tcp]}}
    exec: [/usr/bin/curl]
  - id: {B}
    egress:
      - {{name: dns, cidrs: [10.0.0.53/32], ports: [53]}}
  - id: {C}
    egress:
      - {{name: http, cidrs: [192.0.2.0/28], ports: ["80-81"], protocols: [tcp]}}
      - {{name: half, cidrs: [10.0.0.0/25], ports: [443], protocols: [tcp]}}
    exec: [/bin/sh]
"""
SPAWN_GRAPH = {A: {C}, C: {D}}


def test_blast_radius_ranks_a_hand_computed_example() -> None:
    result = blast_radius(load(BLAST_POLICY), SPAWN_GRAPH)
    assert [r.spiffe_id for r in result.identities] == [A, C, B, D]
    a, c, b, d = result.identities
    # A: its /24 on 443 (256) united with C's 10.0.0.0/25 (inside it) and 16 x 2 ports
    assert (a.own_count, a.reach_count) == (256, 256 + 32)
    assert a.spawns_into == (C, D)
    assert a.executables is None  # D is not in the policy: its execs are not restricted
    assert len(a.credentials) == 6
    assert {(cr.kind, cr.spiffe_id) for cr in a.credentials} >= {("jwt-svid", D)}
    assert (c.own_count, c.reach_count) == (32 + 128, 160)
    assert (b.own_count, b.reach_count) == (2, 2)  # tcp and udp
    assert b.executables is None  # exec omitted: unrestricted
    assert (d.in_policy, d.reach_count, d.executables) == (False, 0, None)
    (dest,) = b.destinations
    assert dest.describe() == "tcp/udp 53 -> 10.0.0.53/32"

    text = result.render_text()
    assert text.index(f"#1 {A}") < text.index(f"#2 {C}") < text.index(f"#3 {B}")
    assert "reach: 288 destinations" in text
    assert "10.0.0.0/24 (256)" in text
    assert f"#4 {D} (not in the policy: the unidentified default applies)" in text
    data = json.loads(json.dumps(result.to_json()))
    assert [r["identity"] for r in data["identities"]] == [A, C, B, D]
    assert data["identities"][0]["reach_destination_count"] == 288


def test_spawning_into_an_unlisted_identity_under_unidentified_allow_reaches_everything() -> None:
    policy = load(BLAST_POLICY.replace("unidentified: deny", "unidentified: allow"))
    result = blast_radius(policy, SPAWN_GRAPH)
    assert [r.spiffe_id for r in result.identities] == [A, C, D, B]
    everything = 2 * 65536 * 2**128
    assert [r.reach_count for r in result.identities] == [everything] * 3 + [2]
    assert result.identities[0].own_count == 256


def test_blast_radius_with_history_suggests_what_to_tighten() -> None:
    observed = [
        connect(A, "10.0.0.7", 443, verdict="allow"),
        connect(A, "10.0.0.7", 443, verdict="allow"),
        execed(A, "/usr/bin/curl", verdict="allow"),
        execed(B, "/usr/bin/dig", verdict="allow"),
        connect(B, "10.0.0.53", 53, "udp", verdict="allow"),
        connect(B, "10.0.0.53", 53, "tcp", verdict="allow"),
    ]
    result = blast_radius(load(BLAST_POLICY), SPAWN_GRAPH, observed)
    by_id = {r.spiffe_id: r for r in result.identities}
    ta = by_id[A].tightening
    assert ta is not None
    assert ta.unused_rules == ()
    (web,) = ta.partly_used_rules
    assert (web.rule, web.allowed, web.used) == ("web", 256, ("10.0.0.7 tcp/443",))
    assert ta.unused_destinations == 255
    assert ta.unused_executables == ()
    tc = by_id[C].tightening
    assert tc is not None
    assert [u.rule for u in tc.unused_rules] == ["half", "http"]
    assert tc.unused_destinations == 160
    assert tc.unused_executables == ("/bin/sh",)
    tb = by_id[B].tightening
    assert tb is not None
    assert tb.unused_destinations == 0
    assert tb.observed_executables == ("/usr/bin/dig",)
    assert by_id[D].tightening is None  # not in the policy
    text = result.render_text()
    assert "rule 'web': 1 of 256 used: 10.0.0.7 tcp/443" in text
    assert "rule 'http': never matched (32 destinations)" in text


# --- history files and the CLI --------------------------------------------------


def write_history(path: Path, history: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in history))
    return path


def test_read_history_names_the_bad_line(tmp_path: Path) -> None:
    path = tmp_path / "h.jsonl"
    path.write_text(json.dumps(connect(A, "10.0.0.1", 1)) + "\n\n{not json\n")
    with pytest.raises(PolicyError, match=r"h.jsonl:3: not a JSON event"):
        read_history(path)
    path.write_text(json.dumps(connect(A, "10.0.0.999", 1)) + "\n")
    with pytest.raises(PolicyError, match=r"h.jsonl:1: daddr"):
        suggest(read_history(path), source=str(path))


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sidecar")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    result: int = args.handler(args)
    return result


def test_cli_validate_prints_the_version_or_the_error_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(HEADER + OLD)
    assert run_cli("policy", "validate", str(good)) == 0
    assert capsys.readouterr().out.strip() == load(OLD).version

    bad = tmp_path / "bad.yaml"
    bad.write_text(HEADER + OLD.replace("ports: [53]", "ports: [0]"))
    assert run_cli("policy", "validate", str(bad)) == 2
    err = capsys.readouterr().err
    assert f"{bad}:9: identities[0].egress[1].ports[0]: port 0 is outside 1-65535" in err


def test_cli_diff_exits_1_on_change_and_0_without(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = tmp_path / "old.yaml", tmp_path / "new.yaml"
    old.write_text(HEADER + OLD)
    new.write_text(HEADER + NEW)
    assert run_cli("policy", "diff", str(old), str(new), "--json") == 1
    data = json.loads(capsys.readouterr().out)
    assert {d["identity"] for d in data["identities"]} == {A, B, C}
    assert run_cli("policy", "diff", str(old), str(old)) == 0
    assert "no change" in capsys.readouterr().out
    assert run_cli("policy", "diff", str(old), str(tmp_path / "missing.yaml")) == 2


def test_cli_suggest_output_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    history = write_history(tmp_path / "h.jsonl", HISTORY)
    assert run_cli("policy", "suggest", "--history", str(history), "--merge-cidrs", "24") == 0
    suggested = tmp_path / "suggested.yaml"
    suggested.write_text(capsys.readouterr().out)
    assert run_cli("policy", "validate", str(suggested)) == 0
    with pytest.raises(SystemExit):
        run_cli("policy", "suggest", "--history", str(history), "--merge-cidrs", "33")


def test_cli_blast_radius_json_with_observed_history_and_spawn_graph(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(HEADER + BLAST_POLICY)
    graph = tmp_path / "graph.json"
    graph.write_text(json.dumps({k: sorted(v) for k, v in SPAWN_GRAPH.items()}))
    history = write_history(tmp_path / "h.jsonl", [connect(A, "10.0.0.7", 443, verdict="allow")])
    argv = ["policy", "blast-radius", str(policy), "--json"]
    assert run_cli(*argv, "--observed", str(history), "--spawn-graph", str(graph)) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["identity"] for r in data["identities"]] == [A, C, B, D]
    assert data["identities"][0]["tightening"]["unused_destinations"] == 255
    graph.write_text(json.dumps({A: "not a list"}))
    assert run_cli(*argv, "--spawn-graph", str(graph)) == 2
    assert "must map each parent SPIFFE ID" in capsys.readouterr().err


def test_cli_validate_warns_of_allowed_executables_others_could_change(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mine = tmp_path / "writable-tool"
    mine.write_text("#!/bin/sh\n")
    mine.chmod(0o777)
    policy = tmp_path / "p.yaml"
    policy.write_text(
        HEADER
        + "identities:\n  - id: spiffe://example.org/a\n"
        + f"    exec: [/usr/bin/true, {mine}, {tmp_path}/missing]\n"
    )
    assert run_cli("policy", "validate", str(policy)) == 0
    err = capsys.readouterr().err
    assert f"{mine} is writable by others" in err or f"{mine} is owned by uid" in err
    assert f"{tmp_path}/missing cannot be read" in err
    assert "/usr/bin/true " not in err  # root's, in a root-owned directory: no warning


def test_blast_radius_lists_socket_kinds_of_the_identity_and_what_it_spawns_into() -> None:
    text = """defaults:
  unidentified: deny
identities:
  - id: spiffe://example.org/parent
    sockets: [inet/raw/icmp]
  - id: spiffe://example.org/child
    sockets: [inet6/raw/icmpv6]
  - id: spiffe://example.org/plain
"""
    graph = {"spiffe://example.org/parent": {"spiffe://example.org/child"}}
    rows = {r.spiffe_id: r for r in blast_radius(load(text), graph).identities}
    parent = rows["spiffe://example.org/parent"]
    assert parent.sockets == ("inet/raw/icmp", "inet6/raw/icmpv6")
    assert rows["spiffe://example.org/plain"].sockets == ()
    rendered = blast_radius(load(text), graph).render_text()
    assert "other sockets: inet/raw/icmp, inet6/raw/icmpv6" in rendered
    # Spawning into an unlisted identity under unidentified: allow makes any socket.
    allow = text.replace("unidentified: deny", "unidentified: allow")
    graph2 = {"spiffe://example.org/plain": {"spiffe://example.org/unlisted"}}
    rows2 = {r.spiffe_id: r for r in blast_radius(load(allow), graph2).identities}
    assert rows2["spiffe://example.org/plain"].sockets is None


def test_blast_radius_flags_identities_that_can_disable_enforcement() -> None:
    text = """defaults:
  unidentified: deny
identities:
  - id: spiffe://example.org/root-agent
    capabilities: [CAP_SYS_ADMIN, bpf]
  - id: spiffe://example.org/plain
"""
    rows = {r.spiffe_id: r for r in blast_radius(load(text)).identities}
    root = rows["spiffe://example.org/root-agent"]
    assert root.capabilities == ("CAP_BPF", "CAP_SYS_ADMIN")
    assert root.can_disable_enforcement
    assert not rows["spiffe://example.org/plain"].can_disable_enforcement
    rendered = blast_radius(load(text)).render_text()
    assert "CAN DISABLE ENFORCEMENT: accepts CAP_BPF, CAP_SYS_ADMIN" in rendered
    # Spawning into an identity the policy does not list: its capabilities are not refused.
    spawned = blast_radius(
        load(text), {"spiffe://example.org/plain": {"spiffe://example.org/unlisted"}}
    )
    plain = {r.spiffe_id: r for r in spawned.identities}["spiffe://example.org/plain"]
    assert plain.capabilities is None and plain.can_disable_enforcement


def test_suggest_learns_unix_addresses_and_blast_radius_lists_them() -> None:
    sid = "spiffe://example.org/agent/a"
    history = [
        {
            "type": "socket",
            "family": "unix",
            "operation": "connect",
            "identity": sid,
            "address": "/run/docker.sock",
            "verdict": "would_deny",
        },
        {
            "type": "socket",
            "family": "unix",
            "operation": "sendmsg",
            "identity": sid,
            "address": "@bus",
            "verdict": "would_deny",
        },
        {
            "type": "socket",
            "family": "unix",
            "operation": "connect",
            "identity": sid,
            "address": "relative.sock",
            "verdict": "would_deny",
        },
    ]
    text = suggest(history)
    learnt = load_policy_text(text, "s.yaml")
    assert learnt.identities[sid].unix == frozenset(
        {(b"/run/docker.sock", False), (b"\0bus", False)}
    )
    assert "relative paths" in text  # what could not be learnt is said
    rows = {r.spiffe_id: r for r in blast_radius(learnt).identities}
    assert rows[sid].unix == ("/run/docker.sock", "@bus")
    assert "unix sockets: /run/docker.sock, @bus" in blast_radius(learnt).render_text()


def test_diff_shows_socket_unix_and_capability_grants() -> None:
    base = """identities:
  - id: spiffe://example.org/a
    unix: [/run/a.sock]
"""
    wider = """identities:
  - id: spiffe://example.org/a
    unix: [/run/a.sock, /run/docker.sock]
    sockets: [inet/raw/icmp]
    capabilities: [CAP_BPF]
"""
    d = diff(load(base), load(wider))
    assert not d.empty
    text = d.render_text()
    assert "+ unix /run/docker.sock" in text
    assert "+ sockets inet/raw/icmp" in text
    assert "+ capabilities CAP_BPF" in text
    back = diff(load(wider), load(base)).render_text()
    assert "- unix /run/docker.sock" in back and "- capabilities CAP_BPF" in back
    unrestricted = diff(load(base), load("identities:\n  - id: spiffe://example.org/a\n"))
    assert "+ unix: any (unrestricted)" in unrestricted.render_text()
    assert diff(load(base), load(base)).empty
