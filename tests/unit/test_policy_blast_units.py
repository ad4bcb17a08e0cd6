"""Blast radius in the units people read, ranked so that IPv6 does not bury IPv4."""

from __future__ import annotations

import json
import textwrap

from sidecar.policy import CompiledPolicy, load_policy_text
from sidecar.policy.blast import blast_radius, ipv6_amount, ports_text

WIDE_V4 = "spiffe://example.org/agent/wide-v4"
NET_V4 = "spiffe://example.org/agent/net-v4"
SITE_V6 = "spiffe://example.org/agent/site-v6"
ALL_V6 = "spiffe://example.org/agent/all-v6"


def load(body: str) -> CompiledPolicy:
    return load_policy_text(
        "apiVersion: sidecar/v1\nkind: Policy\n" + textwrap.dedent(body), "b.yaml"
    )


POLICY = f"""\
defaults: {{unidentified: deny}}
identities:
  - id: {WIDE_V4}
    egress:
      - {{name: anywhere, cidrs: [0.0.0.0/0]}}
  - id: {NET_V4}
    egress:
      - {{name: corp, cidrs: [10.0.0.0/8], ports: [443], protocols: [tcp]}}
  - id: {SITE_V6}
    egress:
      - {{name: site, cidrs: ["2001:db8::/48"], ports: [443], protocols: [tcp]}}
"""


def test_one_ipv6_site_does_not_outrank_all_of_ipv4() -> None:
    result = blast_radius(load(POLICY))
    by_id = {r.spiffe_id: r for r in result.identities}
    # The raw count the old ranking used: a /48 on one port is 2^80 points,
    # all of IPv4 on every port of both protocols only about 2^49.
    assert by_id[SITE_V6].reach_count == 2**80
    assert by_id[WIDE_V4].reach_count == 2**32 * 65535 * 2
    assert by_id[SITE_V6].reach_count > by_id[WIDE_V4].reach_count > by_id[NET_V4].reach_count
    # Ranked per family instead: all of IPv4, then a /8, then one IPv6 site.
    assert [r.spiffe_id for r in result.identities] == [WIDE_V4, NET_V4, SITE_V6]


def test_all_of_ipv6_ranks_with_all_of_ipv4_and_above_it_when_it_includes_it() -> None:
    policy = load(
        POLICY
        + f"""\
  - id: {ALL_V6}
    egress:
      - {{name: anywhere, cidrs: ["::/0"]}}
"""
    )
    ranked = [r.spiffe_id for r in blast_radius(policy).identities]
    assert ranked == [ALL_V6, WIDE_V4, NET_V4, SITE_V6]  # ::/0 covers IPv4 too


def test_reach_is_written_as_all_ipv4_a_prefix_and_any_port() -> None:
    policy = load(
        POLICY
        + f"""\
  - id: {ALL_V6}
    egress:
      - {{name: anywhere, cidrs: ["::/0"]}}
"""
    )
    text = blast_radius(policy).render_text()
    assert "IPv4: all IPv4 on any port (1-65535) over tcp/udp" in text
    assert "IPv6: a /48 on port 443 over tcp" in text
    assert "IPv6: all IPv6 on any port (1-65535) over tcp/udp" in text
    assert "0.0.0.0/0 (all IPv4)" in text
    assert "2001:db8::/48 (a /48)" in text
    assert "::/0 (all IPv6, IPv4 included)" in text
    assert "tcp/udp any port (1-65535) -> 0.0.0.0/0" in text
    assert "1,208,925,819,614,629,174,706,176" not in text  # 2^80 is not a number to read
    assert "about 2^80 destinations" in text
    rows = {
        r["identity"]: r
        for r in json.loads(json.dumps(blast_radius(policy).to_json()))["identities"]
    }
    assert rows[SITE_V6]["reach_ipv6"]["summary"] == "a /48 on port 443 over tcp"
    assert rows[SITE_V6]["reach_ipv4"]["destinations"] == 0
    assert rows[WIDE_V4]["reach_ipv4"]["addresses"] == 2**32


def test_ipv6_amounts_and_port_ranges_read_as_people_write_them() -> None:
    assert ipv6_amount(2**80) == "a /48"
    assert ipv6_amount(3 * 2**64) == "3 /64s"
    assert ipv6_amount(1) == "1 address"
    assert ipv6_amount(2**128 - 2**32) == "all IPv6"
    assert ipv6_amount(2**127 - 2**32) == "about a /1"
    assert ports_text(((1, 65535),)) == "any port (1-65535)"
    assert ports_text(((443, 443),)) == "port 443"
    assert ports_text(((80, 81), (443, 443))) == "ports 80-81, 443"
