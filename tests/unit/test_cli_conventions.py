"""Operator-surface conventions of the ``sidecar`` command, run as a real process.

``-`` is standard input for every file an offline tool reads, a closed pipe
ends a command quietly, "no daemon running" has its own exit code, and the
offline tools keep quiet unless asked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
A = "spiffe://example.org/agent/a"
B = "spiffe://example.org/agent/b"

POLICY = textwrap.dedent(
    f"""\
    apiVersion: sidecar/v1
    kind: Policy
    defaults: {{unidentified: deny}}
    identities:
      - id: {A}
        egress:
          - {{name: web, cidrs: [10.0.0.0/24], ports: [443], protocols: [tcp]}}
      - id: {B}
        egress:
          - {{name: dns, cidrs: [10.0.0.53/32], ports: [53]}}
    """
)
BAD_POLICY = POLICY.replace("ports: [53]", "ports: [0]")


def sidecar(
    *args: str, stdin: str = "", env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", *args],
        input=stdin,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def connect_line(identity: str, daddr: str, dport: int, verdict: str = "allow") -> str:
    event = {
        "type": "connect",
        "identity": identity,
        "family": "inet",
        "protocol": "tcp",
        "daddr": daddr,
        "dport": dport,
        "verdict": verdict,
    }
    return json.dumps(event) + "\n"


# --- '-' is standard input ------------------------------------------------------


def test_policy_validate_dash_reads_the_policy_from_standard_input(tmp_path: Path) -> None:
    on_disk = tmp_path / "p.yaml"
    on_disk.write_text(POLICY)
    from_file = sidecar("policy", "validate", str(on_disk))
    from_stdin = sidecar("policy", "validate", "-", stdin=POLICY)
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert from_stdin.stdout == from_file.stdout
    assert len(from_stdin.stdout.strip()) == 16  # the version


def test_an_error_in_a_policy_on_standard_input_names_stdin_line_and_field() -> None:
    proc = sidecar("policy", "validate", "-", stdin=BAD_POLICY)
    assert proc.returncode == 2
    assert "<stdin>:10: identities[1].egress[0].ports[0]: port 0 is outside 1-65535" in (
        proc.stderr
    )
    assert "Traceback" not in proc.stderr


def test_suggest_reads_history_from_standard_input_and_names_its_bad_lines() -> None:
    good = sidecar("policy", "suggest", "--history", "-", stdin=connect_line(A, "10.0.0.7", 443))
    assert good.returncode == 0, good.stderr
    assert '"10.0.0.7/32"' in good.stdout
    history = connect_line(A, "10.0.0.7", 443) + connect_line(A, "10.0.0.999", 443)
    bad = sidecar("policy", "suggest", "--history", "-", stdin=history)
    assert bad.returncode == 2
    assert "<stdin>:2: daddr:" in bad.stderr
    not_json = sidecar("policy", "suggest", "--history", "-", stdin="\n{oops\n")
    assert not_json.returncode == 2
    assert "<stdin>:2: not a JSON event" in not_json.stderr


def test_blast_radius_reads_each_of_its_files_from_standard_input(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    from_stdin = sidecar("policy", "blast-radius", "-", "--json", stdin=POLICY)
    assert from_stdin.returncode == 0, from_stdin.stderr
    ids = [r["identity"] for r in json.loads(from_stdin.stdout)["identities"]]
    assert ids == [A, B]

    observed = sidecar(
        "policy",
        "blast-radius",
        str(policy),
        "--observed",
        "-",
        "--json",
        stdin=connect_line(A, "10.0.0.7", 443),
    )
    assert observed.returncode == 0, observed.stderr
    rows = {r["identity"]: r for r in json.loads(observed.stdout)["identities"]}
    assert rows[A]["tightening"]["unused_destinations"] == 255

    graph = sidecar(
        "policy",
        "blast-radius",
        str(policy),
        "--spawn-graph",
        "-",
        "--json",
        stdin=json.dumps({A: [B]}),
    )
    assert graph.returncode == 0, graph.stderr
    assert json.loads(graph.stdout)["identities"][0]["spawns_into"] == [B]
    bad_graph = sidecar(
        "policy", "blast-radius", str(policy), "--spawn-graph", "-", stdin='{"x": 1}'
    )
    assert bad_graph.returncode == 2
    assert "<stdin>: must map each parent SPIFFE ID" in bad_graph.stderr


def test_diff_takes_one_side_from_standard_input_but_not_both(tmp_path: Path) -> None:
    old = tmp_path / "old.yaml"
    old.write_text(POLICY)
    same = sidecar("policy", "diff", str(old), "-", stdin=POLICY)
    assert same.returncode == 0, same.stderr
    assert "no change" in same.stdout
    both = sidecar("policy", "diff", "-", "-", stdin=POLICY)
    assert both.returncode == 2
    assert "only one input can be '-'" in both.stderr


# --- offline tools are quiet unless asked -----------------------------------------


def test_offline_policy_tools_log_nothing_unless_verbose(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY)
    history = tmp_path / "h.jsonl"
    history.write_text(connect_line(A, "10.0.0.7", 443))
    for argv in (
        ["policy", "validate", str(policy)],
        ["policy", "diff", str(policy), str(policy)],
        ["policy", "suggest", "--history", str(history)],
        ["policy", "blast-radius", str(policy), "--observed", str(history)],
    ):
        quiet = sidecar(*argv)
        assert quiet.returncode == 0, quiet.stderr
        assert quiet.stderr == "", argv
    for argv in (
        ["-v", "policy", "validate", str(policy)],
        ["policy", "validate", "-v", str(policy)],
    ):
        loud = sidecar(*argv)
        assert loud.returncode == 0
        assert "INFO sidecar.policy.load: loaded policy" in loud.stderr, argv


def test_warnings_still_reach_a_quiet_offline_tool(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text(POLICY + f"    exec: [{tmp_path}/missing]\n")
    proc = sidecar("policy", "validate", str(policy))
    assert proc.returncode == 0
    assert f"{tmp_path}/missing cannot be read" in proc.stderr
    assert " INFO " not in proc.stderr
