"""Registration entries: loading, validation errors with file:line: field, and matching."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from sidecar.attest.entries import Entries, load_entries, load_entries_text
from sidecar.attest.facts import ProcessFacts
from sidecar.util.errors import AttestationError

SHA = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
REPO = Path(__file__).resolve().parents[2]

HEADER = """\
apiVersion: sidecar/v1
kind: RegistrationEntries
trustDomain: example.org
entries:
"""

FACTS = ProcessFacts(
    pid=1,
    start_time=1,
    uid=1000,
    gid=1000,
    user="bot",
    exe_path="/usr/bin/python3.11",
    exe_deleted=False,
    exe_dev=1,
    exe_ino=1,
    exe_size=1,
    exe_mtime_ns=1,
    sha256=SHA,
    cgroup_path="/agents/research",
    parent_identity=None,
)


def write(tmp_path: Path, body: str) -> Path:
    p = tmp_path / "entries.yaml"
    p.write_text(HEADER + textwrap.dedent(body))
    return p


def load_error(tmp_path: Path, body: str) -> str:
    p = write(tmp_path, body)
    with pytest.raises(AttestationError) as info:
        load_entries(p)
    return str(info.value)


def test_example_file_loads_and_names_its_identities() -> None:
    entries = load_entries(REPO / "examples" / "entries.yaml")
    assert entries.trust_domain == "example.org"
    assert "spiffe://example.org/agent/research-bot" in entries.spiffe_ids
    assert len(entries) >= 3


def test_valid_file_keeps_entry_lines_and_normalised_selectors(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        f"""\
          - spiffeId: spiffe://example.org/agent/research-bot
            selectors:
              - unix:uid:1000
              - unix:sha256:{SHA}
              - cgroup:path:/agents/
        """,
    )
    entries = load_entries(p)
    (entry,) = entries
    assert entry.line == 5
    assert entry.source == str(p)
    assert [str(s) for s in entry.selectors] == [
        "unix:uid:1000",
        f"unix:sha256:{SHA}",
        "cgroup:path:/agents",
    ]
    assert entries.needs_sha256
    assert not entries.needs_user


@pytest.mark.parametrize(
    ("body", "where", "why"),
    [
        (
            """\
              - spiffeId: spiffe://example.org/a
                selectors: [unix:uid:1]
                ttl: 60
            """,
            ":7: entries[0].ttl:",
            "unknown field",
        ),
        (
            """\
              - spiffeId: spiffe://example.org/a/../b
                selectors: [unix:uid:1]
            """,
            ":5: entries[0].spiffeId:",
            "'.' or '..'",
        ),
        (
            """\
              - spiffeId: spiffe://other.org/a
                selectors: [unix:uid:1]
            """,
            ":5: entries[0].spiffeId:",
            "not in trust domain",
        ),
        (
            """\
              - spiffeId: spiffe://example.org
                selectors: [unix:uid:1]
            """,
            ":5: entries[0].spiffeId:",
            "no path",
        ),
        (
            """\
              - spiffeId: spiffe://example.org/a
                selectors:
                  - unix:uid:1
                  - unix:pid:4
            """,
            ":8: entries[0].selectors[1]:",
            "unknown selector type",
        ),
        (
            """\
              - spiffeId: spiffe://example.org/a
                selectors:
                  - unix:sha256:ABC
            """,
            ":7: entries[0].selectors[0]:",
            "64 lower-case hex",
        ),
        (
            """\
              - spiffeId: spiffe://example.org/a
                selectors:
                  - 1000
            """,
            ":7: entries[0].selectors[0]:",
            "must be a string",
        ),
        (
            """\
              - spiffeId: spiffe://example.org/a
                selectors: []
            """,
            ":6: entries[0].selectors:",
            "at least one selector",
        ),
        (
            """\
              - spiffeId: spiffe://example.org/a
            """,
            ":5: entries[0]:",
            "missing required field 'selectors'",
        ),
        (
            """\
              - spiffeId: spiffe://example.org/a
                selectors:
                  - unix:uid:1
                  - unix:uid:2
            """,
            ":8: entries[0].selectors[1]:",
            "could never match",
        ),
        (
            """\
              - spiffeId: spiffe://example.org/a
                selectors:
                  - unix:uid:1
                  - unix:uid:01
            """,
            ":8: entries[0].selectors[1]:",
            "duplicate selector",
        ),
        (
            """\
              - spiffeId: spiffe://example.org/a
                selectors:
                  - parent:id:spiffe://example.org/typo
            """,
            ":7: entries[0].selectors[0]:",
            "no entry defines",
        ),
    ],
)
def test_bad_entry_is_refused_naming_file_line_and_field(
    tmp_path: Path, body: str, where: str, why: str
) -> None:
    message = load_error(tmp_path, body)
    assert message.startswith(str(tmp_path / "entries.yaml") + where), message
    assert why in message


def test_unknown_top_level_key_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "e.yaml"
    p.write_text(HEADER + "  []\nselector: x\n")
    with pytest.raises(AttestationError, match=r"e\.yaml:6: selector: unknown field"):
        load_entries(p)


def test_wrong_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match=r"x\.yaml:2: kind: must be 'RegistrationEntries'"):
        load_entries_text(HEADER.replace("RegistrationEntries", "Policy") + "  []\n", "x.yaml")


def test_missing_file_is_an_attestation_error(tmp_path: Path) -> None:
    with pytest.raises(AttestationError, match="cannot read"):
        load_entries(tmp_path / "absent.yaml")


def test_equally_specific_overlapping_entries_conflict_and_both_are_named(
    tmp_path: Path,
) -> None:
    message = load_error(
        tmp_path,
        """\
          - spiffeId: spiffe://example.org/a
            selectors: [unix:uid:1000]
          - spiffeId: spiffe://example.org/b
            selectors: [cgroup:path:/agents]
        """,
    )
    src = str(tmp_path / "entries.yaml")
    assert message.startswith(f"{src}:7: entries[1]: conflicts with entries[0]")
    assert f"{src}:5" in message
    assert "spiffe://example.org/a" in message
    assert "spiffe://example.org/b" in message


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("[cgroup:path:/agents]", "[cgroup:path:/agents/research]"),  # nested prefixes
        ("[unix:uid:1000, unix:gid:5]", "[unix:uid:1000, unix:path:/bin/sh]"),
        ("[unix:uid:1000]", "[unix:user:bot]"),  # may be the same account
    ],
)
def test_entries_that_could_match_one_process_conflict(tmp_path: Path, a: str, b: str) -> None:
    message = load_error(
        tmp_path,
        f"""\
          - spiffeId: spiffe://example.org/a
            selectors: {a}
          - spiffeId: spiffe://example.org/b
            selectors: {b}
        """,
    )
    assert "conflicts with entries[0]" in message


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("[unix:uid:1000]", "[unix:uid:1001]"),
        ("[cgroup:path:/agents/a]", "[cgroup:path:/agents/b]"),
        ("[unix:uid:1000, unix:gid:5]", "[unix:gid:6, unix:path:/bin/sh]"),
        ("[unix:uid:1000]", "[unix:uid:1000, unix:path:/bin/sh]"),  # more specific wins
    ],
)
def test_entries_that_cannot_tie_are_accepted(tmp_path: Path, a: str, b: str) -> None:
    entries = load_entries(
        write(
            tmp_path,
            f"""\
              - spiffeId: spiffe://example.org/a
                selectors: {a}
              - spiffeId: spiffe://example.org/b
                selectors: {b}
            """,
        )
    )
    assert len(entries) == 2


def test_several_entries_may_share_one_spiffe_id(tmp_path: Path) -> None:
    entries = load_entries(
        write(
            tmp_path,
            """\
              - spiffeId: spiffe://example.org/a
                selectors: [unix:uid:1000]
              - spiffeId: spiffe://example.org/a
                selectors: [cgroup:path:/agents]
            """,
        )
    )
    match = entries.match(FACTS)
    assert match is not None
    assert match.spiffe_id == "spiffe://example.org/a"
    assert match.entry_index == 0  # file order decides among one identity's entries


def _entries(body: str) -> Entries:
    return load_entries_text(HEADER + textwrap.dedent(body), "mem.yaml")


def test_most_specific_matching_entry_wins_regardless_of_order() -> None:
    entries = _entries(
        """\
          - spiffeId: spiffe://example.org/generic
            selectors: [unix:uid:1000]
          - spiffeId: spiffe://example.org/research
            selectors: [cgroup:path:/agents/research, unix:path:/usr/bin/python3.11]
          - spiffeId: spiffe://example.org/other
            selectors: [cgroup:path:/agents/other, unix:path:/usr/bin/python3.11]
        """
    )
    match = entries.match(FACTS)
    assert match is not None
    assert match.spiffe_id == "spiffe://example.org/research"
    assert match.line == 7
    assert [str(s) for s in match.selectors] == [
        "cgroup:path:/agents/research",
        "unix:path:/usr/bin/python3.11",
    ]
    other = dataclasses.replace(FACTS, cgroup_path="/elsewhere")
    fallback = entries.match(other)
    assert fallback is not None and fallback.spiffe_id == "spiffe://example.org/generic"


def test_process_matching_no_entry_gets_no_identity() -> None:
    entries = _entries(
        """\
          - spiffeId: spiffe://example.org/a
            selectors: [unix:uid:1000, unix:sha256:%s]
        """
        % ("0" * 64)
    )
    assert entries.match(FACTS) is None


def test_spawn_graph_maps_each_parent_to_the_identities_it_may_start() -> None:
    entries = _entries(
        """\
          - spiffeId: spiffe://example.org/planner
            selectors: [unix:uid:1000]
          - spiffeId: spiffe://example.org/tool/search
            selectors: [parent:id:spiffe://example.org/planner, unix:path:/usr/bin/curl]
          - spiffeId: spiffe://example.org/tool/shell
            selectors: [parent:id:spiffe://example.org/planner, unix:path:/bin/sh]
          - spiffeId: spiffe://example.org/tool/grep
            selectors: [parent:id:spiffe://example.org/tool/shell, unix:path:/bin/grep]
        """
    )
    assert entries.spawn_graph() == {
        "spiffe://example.org/planner": {
            "spiffe://example.org/tool/search",
            "spiffe://example.org/tool/shell",
        },
        "spiffe://example.org/tool/shell": {"spiffe://example.org/tool/grep"},
    }


def test_parent_selector_matches_only_under_that_parent() -> None:
    entries = _entries(
        """\
          - spiffeId: spiffe://example.org/planner
            selectors: [unix:uid:0]
          - spiffeId: spiffe://example.org/tool
            selectors: [parent:id:spiffe://example.org/planner, unix:uid:1000]
        """
    )
    child = dataclasses.replace(FACTS, parent_identity="spiffe://example.org/planner")
    match = entries.match(child)
    assert match is not None and match.spiffe_id == "spiffe://example.org/tool"
    assert entries.match(FACTS) is None


def test_digest_changes_with_the_file_content() -> None:
    a = load_entries_text(HEADER + "  []\n", "a.yaml")
    b = load_entries_text(HEADER + "  [] # edited\n", "b.yaml")
    assert a.digest != b.digest
    assert len(a) == 0 and a.match(FACTS) is None
