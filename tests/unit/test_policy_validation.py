"""Policy validation: every bad input is a PolicyError naming file, line and field."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.kernel.limits import FILENAME_LEN
from sidecar.policy import load_policy, load_policy_text
from sidecar.policy.model import MAX_CIDRS_TOTAL, MAX_FILE_BYTES
from sidecar.util.errors import PolicyError

HEADER = "apiVersion: sidecar/v1\nkind: Policy\n"


def policy_text(body: str) -> str:
    return HEADER + textwrap.dedent(body)


def error_of(text: str, source: str = "p.yaml") -> str:
    with pytest.raises(PolicyError) as info:
        load_policy_text(text, source)
    return str(info.value)


GOOD_IDENTITY = """\
identities:
  - id: spiffe://example.org/agent/a
    egress:
      - name: web
        cidrs: [10.0.0.0/8]
        ports: [443]
"""


def test_valid_policy_loads_and_reports_a_16_hex_version() -> None:
    policy = load_policy_text(policy_text(GOOD_IDENTITY))
    assert len(policy.version) == 16
    int(policy.version, 16)
    assert list(policy.identities) == ["spiffe://example.org/agent/a"]


def test_example_policy_file_is_valid() -> None:
    example = Path(__file__).resolve().parents[2] / "examples" / "policy.yaml"
    policy = load_policy(example)
    assert "spiffe://example.org/agent/research-bot" in policy.identities


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        # unknown keys, at each level
        ("colour: blue\n", "p.yaml:3: colour: unknown field"),
        ("defaults:\n  unidentifed: deny\n", "p.yaml:4: defaults.unidentifed: unknown field"),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egres: []\n",
            "p.yaml:5: identities[0].egres: unknown field",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - cidrs: [10.0.0.0/8]\n        port: [1]\n",
            "p.yaml:7: identities[0].egress[0].port: unknown field",
        ),
        # wrong types
        ("identities: {}\n", "p.yaml:3: identities: must be a list, not a mapping"),
        ("defaults:\n  log_allowed: 'yes'\n", "p.yaml:4: defaults.log_allowed: must be true"),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n      - cidrs: 10.0.0.0/8\n",
            "p.yaml:6: identities[0].egress[0].cidrs: must be a list, not a string",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - cidrs: [10.0.0.0/8]\n        ports: [true]\n",
            "p.yaml:7: identities[0].egress[0].ports[0]: must be a port number",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    exec: /usr/bin/curl\n",
            "p.yaml:5: identities[0].exec: must be a list, not a string",
        ),
        # enumerations
        ("defaults:\n  unidentified: maybe\n", "p.yaml:4: defaults.unidentified: must be one of"),
        ("defaults:\n  pending: allow\n", "p.yaml:4: defaults.pending: only 'deny' is accepted"),
        (
            "identities:\n  - id: spiffe://e.org/a\n    mode: learn\n",
            "p.yaml:5: identities[0].mode: must be one of enforce, audit",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - cidrs: [10.0.0.0/8]\n        protocols: [icmp]\n",
            "p.yaml:7: identities[0].egress[0].protocols[0]: must be tcp or udp",
        ),
        # CIDRs
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - cidrs: [10.0.0.0/8, 10.1.2.3/16]\n",
            "p.yaml:6: identities[0].egress[0].cidrs[1]: '10.1.2.3/16' has host bits set: "
            "did you mean 10.1.0.0/16",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - cidrs: ['2001:db8::1/32']\n",
            "did you mean 2001:db8::/32",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n      - cidrs: [10.0.0.0/33]\n",
            "p.yaml:6: identities[0].egress[0].cidrs[0]: '10.0.0.0/33' is not a valid CIDR",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n      - cidrs: [example.org]\n",
            "is not a valid CIDR",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n      - cidrs: []\n",
            "p.yaml:6: identities[0].egress[0].cidrs: must list at least one CIDR",
        ),
        # ports
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - cidrs: [10.0.0.0/8]\n        ports: [0]\n",
            "p.yaml:7: identities[0].egress[0].ports[0]: port 0 is outside 1-65535",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - cidrs: [10.0.0.0/8]\n        ports: [80, 65536]\n",
            "identities[0].egress[0].ports[1]: port 65536 is outside 1-65535",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - cidrs: [10.0.0.0/8]\n        ports: ['9000-8000']\n",
            "identities[0].egress[0].ports[0]: range '9000-8000' is backwards",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - cidrs: [10.0.0.0/8]\n        ports: ['80-']\n",
            "is not a port or a 'lo-hi' port range",
        ),
        # identities
        (
            "identities:\n  - id: spiffe://e.org/a\n  - id: spiffe://e.org/a\n",
            "p.yaml:5: identities[1].id: duplicate identity 'spiffe://e.org/a' (first at line 4)",
        ),
        (
            "identities:\n  - id: https://e.org/a\n",
            "p.yaml:4: identities[0].id: SPIFFE ID 'https://e.org/a' must start with 'spiffe://'",
        ),
        ("identities:\n  - id: spiffe://E.org/a\n", "identities[0].id: SPIFFE ID"),
        ("identities:\n  - id: spiffe://e.org\n", "names a trust domain, not a workload"),
        ("identities:\n  - mode: audit\n", "p.yaml:4: identities[0]: missing required field 'id'"),
        # rule names
        (
            "identities:\n  - id: spiffe://e.org/a\n    egress:\n"
            "      - {name: web, cidrs: [10.0.0.0/8], ports: [80]}\n"
            "      - {name: web, cidrs: [10.0.0.0/8], ports: [443]}\n",
            "p.yaml:7: identities[0].egress[1].name: duplicate rule name 'web'",
        ),
        # exec
        (
            "identities:\n  - id: spiffe://e.org/a\n    exec: [bin/curl]\n",
            "identities[0].exec[0]: 'bin/curl' must be an absolute path",
        ),
        (
            "identities:\n  - id: spiffe://e.org/a\n    exec: [/usr/bin/../bin/curl]\n",
            "did you mean '/usr/bin/curl'",
        ),
    ],
)
def test_bad_input_names_file_line_and_field(body: str, expected: str) -> None:
    message = error_of(policy_text(body))
    assert expected in message, message


def test_wrong_api_version_and_kind_are_named() -> None:
    assert "p.yaml:1: apiVersion: must be 'sidecar/v1'" in error_of(
        "apiVersion: sidecar/v2\nkind: Policy\n"
    )
    assert "p.yaml:2: kind: must be 'Policy'" in error_of("apiVersion: sidecar/v1\nkind: Config\n")


def test_overlapping_rules_are_refused_naming_both_rules_and_the_overlap() -> None:
    text = policy_text(
        """\
        identities:
          - id: spiffe://e.org/a
            egress:
              - name: wide
                cidrs: [10.0.0.0/8]
                ports: ["400-500"]
              - name: narrow
                cidrs: [10.1.0.0/16]
                ports: [443]
                protocols: [tcp]
        """
    )
    message = error_of(text)
    assert message.startswith("p.yaml:9: identities[0].egress[1]: ")
    assert "'narrow' overlaps rule 'wide' (line 6)" in message
    assert "10.0.0.0/8 and 10.1.0.0/16 overlap" in message
    assert "tcp port 443" in message


def test_overlap_is_found_across_ipv4_and_ipv4_mapped_spellings() -> None:
    text = policy_text(
        """\
        identities:
          - id: spiffe://e.org/a
            egress:
              - {name: v4, cidrs: [10.0.0.0/8], ports: [443]}
              - {name: mapped, cidrs: ["::ffff:10.2.0.0/112"], ports: [443]}
        """
    )
    assert "'mapped' overlaps rule 'v4'" in error_of(text)


@pytest.mark.parametrize(
    "second",
    [
        "{name: b, cidrs: [10.0.0.0/8], ports: [443], protocols: [udp]}",  # other protocol
        "{name: b, cidrs: [10.0.0.0/8], ports: [444]}",  # other port
        "{name: b, cidrs: [11.0.0.0/8], ports: [443]}",  # other addresses
    ],
)
def test_rules_that_differ_in_one_dimension_do_not_overlap(second: str) -> None:
    text = policy_text(
        f"""\
        identities:
          - id: spiffe://e.org/a
            egress:
              - {{name: a, cidrs: [10.0.0.0/8], ports: [443], protocols: [tcp]}}
              - {second}
        """
    )
    assert load_policy_text(text).identities["spiffe://e.org/a"].rule_names == ("a", "b")


def test_same_rules_in_two_identities_are_not_an_overlap() -> None:
    text = policy_text(
        """\
        identities:
          - {id: spiffe://e.org/a, egress: [{cidrs: [0.0.0.0/0]}]}
          - {id: spiffe://e.org/b, egress: [{cidrs: [0.0.0.0/0]}]}
        """
    )
    assert len(load_policy_text(text).identities) == 2


def test_too_many_port_rules_for_one_prefix_names_identity_and_prefix() -> None:
    ports = ", ".join(str(1000 + 2 * i) for i in range(7))
    text = policy_text(
        f"""\
        identities:
          - id: spiffe://e.org/a
            egress:
              - {{name: wide, cidrs: [10.0.0.0/8], ports: [{ports}], protocols: [tcp]}}
              - {{name: a, cidrs: [10.1.0.0/16], ports: [443, 8443], protocols: [tcp]}}
        """
    )
    message = error_of(text)
    assert message.startswith("p.yaml:4: identities[0]: ")
    assert "identity 'spiffe://e.org/a': prefix 10.1.0.0/16 would need 9 port rules" in message
    assert "more than the 8" in message


def test_eight_port_rules_for_one_prefix_are_accepted() -> None:
    ports = ", ".join(str(1000 + 2 * i) for i in range(8))
    text = policy_text(
        f"""\
        identities:
          - id: spiffe://e.org/a
            egress: [{{cidrs: [10.0.0.0/8], ports: [{ports}]}}]
        """
    )
    (entry,) = load_policy_text(text).identities["spiffe://e.org/a"].prefixes
    assert len(entry.rules) == 8


def test_file_larger_than_the_cap_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    path.write_text(HEADER + "# " + "x" * MAX_FILE_BYTES + "\n")
    with pytest.raises(PolicyError, match=r"huge.yaml: file is \d+ bytes, larger than"):
        load_policy(path)


def test_more_cidrs_than_the_cap_are_refused() -> None:
    # Flow style keeps the file under the byte cap while passing the CIDR cap.
    n = MAX_CIDRS_TOTAL // 2 + 1
    cidrs = ",".join(f"{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}.0/24" for i in range(n))
    text = HEADER + (
        "identities:\n"
        f"  - {{id: 'spiffe://e.org/a', egress: [{{name: a, ports: [1], cidrs: [{cidrs}]}}]}}\n"
        f"  - {{id: 'spiffe://e.org/b', egress: [{{name: a, ports: [1], cidrs: [{cidrs}]}}]}}\n"
    )
    assert len(text) < MAX_FILE_BYTES
    assert f"more than {MAX_CIDRS_TOTAL} CIDR entries in total" in error_of(text)


def _long_path(length: int) -> str:
    """An absolute, normal path of ``length`` bytes."""
    head = "/opt/" + "d" * 100 + "/"
    return head + "x" * (length - len(head))


def test_an_exec_path_longer_than_the_exec_record_holds_is_refused_with_its_line() -> None:
    # The kernel reports an exec's path in a fixed field (events.h
    # SIDECAR_FILENAME_LEN, NUL included): a longer allowed path could not be
    # told from its cut name in events, audit and the policy tools.
    too_long = _long_path(FILENAME_LEN)
    assert len(too_long) == FILENAME_LEN
    body = (
        f"identities:\n  - id: spiffe://e.org/a\n    exec:\n      - /bin/sh\n      - {too_long}\n"
    )
    message = error_of(policy_text(body))
    assert message.startswith("p.yaml:7: identities[0].exec[1]: "), message
    assert f"{FILENAME_LEN} bytes" in message and f"{FILENAME_LEN - 1}" in message, message


def test_an_exec_path_the_exec_record_holds_whole_is_accepted() -> None:
    longest = _long_path(FILENAME_LEN - 1)
    body = f"identities:\n  - id: spiffe://e.org/a\n    exec: [{longest}]\n"
    policy = load_policy_text(policy_text(body))
    assert policy.identities["spiffe://e.org/a"].exec_paths == frozenset({longest})


def test_an_exec_path_is_measured_in_bytes_not_characters() -> None:
    wide = _long_path(FILENAME_LEN - 1 - 100) + "\u00e9" * 100  # 100 more characters, 200 bytes
    assert len(wide) < FILENAME_LEN <= len(wide.encode())
    body = f"identities:\n  - id: spiffe://e.org/a\n    exec: ['{wide}']\n"
    assert "p.yaml:5: identities[0].exec[0]: " in error_of(policy_text(body))


def test_missing_file_is_a_policy_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.yaml")


HAND_WRITTEN_CORPUS = [
    "",
    "---\n...\n",
    "[]\n",
    "just a string\n",
    "apiVersion: sidecar/v1\nkind: Policy\nidentities: [[[]]]\n",
    HEADER + "identities:\n  - 42\n",
    HEADER + "identities:\n  - id: 42\n",
    HEADER + "identities:\n  - id: spiffe://e.org/a\n    egress: [7]\n",
    HEADER + "identities:\n  - id: spiffe://e.org/a\n    egress: [{cidrs: [7]}]\n",
    HEADER + "identities:\n  - id: spiffe://e.org/a\n    egress: [{cidrs: [null]}]\n",
    HEADER + "identities:\n  - id: spiffe://e.org/a\n    egress: [{cidrs: ['10.0.0.0/8%eth0']}]\n",
    HEADER
    + "identities:\n  - id: spiffe://e.org/a\n    egress: [{cidrs: [1.2.3.4], ports: [1.5]}]\n",
    HEADER + "identities:\n  - id: spiffe://e.org/a\n    egress: [{cidrs: [1.2.3.4], ports: []}]\n",
    HEADER
    + "identities:\n  - id: spiffe://e.org/a\n    egress: [{cidrs: [1.2.3.4], ports: [-1]}]\n",
    HEADER + "identities:\n  - id: spiffe://e.org/a\n    egress: [{cidrs: [1.2.3.4], name: ''}]\n",
    HEADER + "identities:\n  - id: spiffe://e.org/a\n    exec: [null]\n",
    HEADER + "identities:\n  - id: spiffe://e.org/a\n    exec: ['/bin/sh', '/bin/sh']\n",
    HEADER + 'identities:\n  - id: spiffe://e.org/a\n    exec: ["/bin/\\0sh"]\n',
    HEADER + "defaults: []\n",
    HEADER + "defaults:\n  log_allowed: 1\n",
    HEADER + "1: 2\n",
    HEADER + "identities:\n  - {id: spiffe://e.org/a, id: spiffe://e.org/b}\n",
    HEADER + "identities: !!python/object:os.system {}\n",
    "\t- bad indentation\n:",
    "a: &x [1]\nb: *x\n",
    # the billion laughs: aliases are refused before anything is expanded
    'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    "b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\n"
    "c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
    "d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\n",
    "[" * 100_000 + "]" * 100_000,
    "{a: " * 50_000 + "1" + "}" * 50_000,
    b"\xff\xfe\x00binary",
]


@pytest.mark.parametrize("text", HAND_WRITTEN_CORPUS)
def test_malformed_policy_corpus_raises_only_policy_error(text: str | bytes) -> None:
    with pytest.raises(PolicyError):
        load_policy_text(text, "corpus.yaml")


def test_alias_bomb_is_refused_with_a_line() -> None:
    bomb = 'a: &a ["lol"]\nb: &b [*a,*a]\n'
    assert "corpus.yaml:2: b[0]: anchors and aliases are not allowed" in error_of(
        bomb, "corpus.yaml"
    )


# --- generated malformed input ------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=12),
    st.sampled_from(
        ["10.0.0.0/8", "::/0", "443", "1-2", "tcp", "udp", "enforce", "spiffe://e.org/a", "/bin/x"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(
            st.sampled_from(
                ["id", "mode", "egress", "exec", "cidrs", "ports", "protocols", "name", "x"]
            ),
            inner,
            max_size=4,
        ),
    ),
    max_leaves=12,
)
rule = st.fixed_dictionaries(
    {"cidrs": st.one_of(values, st.lists(values, max_size=3))},
    optional={"ports": values, "protocols": values, "name": values, "extra": values},
)
identity = st.fixed_dictionaries(
    {"id": st.one_of(values, st.sampled_from(["spiffe://e.org/a", "spiffe://e.org/b"]))},
    optional={
        "mode": values,
        "egress": st.one_of(values, st.lists(rule, max_size=3)),
        "exec": values,
    },
)
documents: st.SearchStrategy[Any] = st.fixed_dictionaries(
    {"apiVersion": st.sampled_from(["sidecar/v1", "v1"]), "kind": st.just("Policy")},
    optional={
        "identities": st.one_of(values, st.lists(identity, max_size=3)),
        "defaults": st.one_of(
            values,
            st.fixed_dictionaries(
                {}, optional={"unidentified": values, "pending": values, "log_allowed": values}
            ),
        ),
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_generated_documents_either_load_or_raise_policy_error(doc: Any) -> None:
    text = yaml.safe_dump(doc)
    try:
        policy = load_policy_text(text, "gen.yaml")
    except PolicyError as exc:
        assert str(exc).startswith("gen.yaml")
    else:
        assert len(policy.version) == 16


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_arbitrary_bytes_either_load_or_raise_policy_error(data: bytes | str) -> None:
    raw = HEADER.encode() + (data.encode() if isinstance(data, str) else data)
    try:
        policy = load_policy_text(raw, "fuzz.yaml")
    except PolicyError as exc:
        assert str(exc).startswith("fuzz.yaml")
    else:
        assert len(policy.version) == 16


def test_socket_kinds_are_read_by_name_or_number_and_change_the_version() -> None:
    base = policy_text(
        """
        identities:
          - id: spiffe://example.org/a
        """
    )
    listed = policy_text(
        """
        identities:
          - id: spiffe://example.org/a
            sockets: [inet/raw/icmp, inet6/raw/58, INET/dgram/udplite]
        """
    )
    p = load_policy_text(listed, "p.yaml")
    assert p.identities["spiffe://example.org/a"].sockets == frozenset(
        {(2, 3, 1), (10, 3, 58), (2, 2, 136)}
    )
    assert p.version != load_policy_text(base, "p.yaml").version


@pytest.mark.parametrize(
    "item, words",
    [
        ("inet/stream/tcp", "which every identity may create"),
        ("unix/stream/0", "family 'unix'"),
        ("inet/raw", "family/type/protocol"),
        ("inet/raw/bogus", "protocol 'bogus'"),
        ("inet/packet/1", "type 'packet'"),
    ],
)
def test_bad_socket_kinds_name_the_line_and_field(item: str, words: str) -> None:
    text = policy_text(
        f"""
        identities:
          - id: spiffe://example.org/a
            sockets: [inet/raw/icmp, "{item}"]
        """
    )
    msg = error_of(text)
    assert "identities[0].sockets[1]" in msg and words in msg
    assert msg.startswith("p.yaml:")


def test_a_socket_kind_listed_twice_is_an_error() -> None:
    text = policy_text(
        """
        identities:
          - id: spiffe://example.org/a
            sockets: [inet/raw/icmp, inet/raw/1]
        """
    )
    assert "listed twice" in error_of(text)


def test_accepted_capabilities_are_read_by_any_spelling_and_change_the_version() -> None:
    base = policy_text("identities:\n  - id: spiffe://example.org/a\n")
    text = policy_text(
        "identities:\n  - id: spiffe://example.org/a\n"
        "    capabilities: [CAP_SYS_ADMIN, cap_bpf, sys_ptrace]\n"
    )
    p = load_policy_text(text, "p.yaml")
    assert p.identities["spiffe://example.org/a"].capabilities == frozenset({21, 39, 19})
    assert p.version != load_policy_text(base, "p.yaml").version


@pytest.mark.parametrize(
    "item, words",
    [
        ("CAP_NET_RAW", "is never refused"),
        ("CAP_FLY", "is not a Linux capability"),
    ],
)
def test_bad_capabilities_name_the_line_and_field(item: str, words: str) -> None:
    text = policy_text(
        f"identities:\n  - id: spiffe://example.org/a\n    capabilities: [CAP_BPF, {item}]\n"
    )
    msg = error_of(text)
    assert "p.yaml:5: identities[0].capabilities[1]" in msg and words in msg


def test_unix_addresses_exact_prefix_and_abstract() -> None:
    from sidecar.policy.model import format_unix_address

    text = policy_text(
        "identities:\n  - id: spiffe://example.org/a\n"
        '    unix: [/run/docker.sock, "/run/agent/*", "@bus", "@tmp-*"]\n'
    )
    ci = load_policy_text(text, "p.yaml").identities["spiffe://example.org/a"]
    assert ci.unix == frozenset(
        {
            (b"/run/docker.sock", False),
            (b"/run/agent/", True),
            (b"\0bus", False),
            (b"\0tmp-", True),
        }
    )
    assert sorted(format_unix_address(a) for a in ci.unix) == [
        "/run/agent/*",
        "/run/docker.sock",
        "@bus",
        "@tmp-*",
    ]
    omitted = policy_text("identities:\n  - id: spiffe://example.org/a\n")
    assert load_policy_text(omitted, "p.yaml").identities["spiffe://example.org/a"].unix is None
    empty = policy_text("identities:\n  - id: spiffe://example.org/a\n    unix: []\n")
    ci_empty = load_policy_text(empty, "p.yaml").identities["spiffe://example.org/a"]
    assert ci_empty.unix == frozenset()  # may use none
    assert load_policy_text(empty, "p.yaml").version != load_policy_text(omitted, "p.yaml").version


@pytest.mark.parametrize(
    "item, words",
    [
        ("run/x.sock", "must be an absolute path"),
        ("/" + "x" * 107, "does not fit a unix socket address"),
    ],
)
def test_bad_unix_addresses_name_the_line_and_field(item: str, words: str) -> None:
    text = policy_text(
        f"identities:\n  - id: spiffe://example.org/a\n    unix: [/ok.sock, {item}]\n"
    )
    msg = error_of(text)
    assert "p.yaml:5: identities[0].unix[1]" in msg and words in msg


def test_the_policy_package_loads_no_kernel_code_but_its_limits() -> None:
    """Kernel-neutral: validating a policy needs neither BCC, libbpf nor the ctypes mirrors."""
    import subprocess
    import sys

    probe = (
        "import sys, sidecar.policy, sidecar.policy.cli\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('sidecar.kernel'))))\n"
        "print('bcc' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split("\n")
    assert out[0].split() == ["sidecar.kernel", "sidecar.kernel.limits"]
    assert out[1] == "False"
