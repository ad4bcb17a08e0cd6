"""Operator-surface conventions of the ``sidecar`` command, run as a real process.

``-`` is standard input for every file an offline tool reads, a closed pipe
ends a command quietly, "no daemon running" has its own exit code, and the
offline tools keep quiet unless asked.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

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


def sidecar_into_closed_pipe(*args: str, stdin: str = "") -> tuple[int, str]:
    """Run with stdout a pipe nobody reads any more (``| head -c 0``): exit code, stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # closed before the command writes a byte: EPIPE, every time
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", *args],
            input=stdin,
            stdout=write_end,
            stderr=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            text=True,
            timeout=60,
            cwd="/",
        )
    finally:
        os.close(write_end)
    return proc.returncode, proc.stderr


@contextlib.contextmanager
def fake_daemon(path: Path, answer: dict[str, Any]) -> Iterator[None]:
    """An admin socket that gives every request ``answer``, as the daemon's does."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(json.dumps(answer).encode() + b"\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        thread.join(5)


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


# --- a closed pipe ends a command quietly -------------------------------------------


def test_status_json_into_a_closed_pipe_exits_141_without_a_traceback(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    with fake_daemon(sock, {"host": "h", "events": {"exec": 1}}):
        code, err = sidecar_into_closed_pipe("status", "--json", "--socket", str(sock))
    assert code == 141
    assert err == ""


def test_offline_tools_into_a_closed_pipe_exit_141_without_a_traceback(tmp_path: Path) -> None:
    code, err = sidecar_into_closed_pipe("policy", "blast-radius", "-", stdin=POLICY)
    assert (code, err) == (141, "")
    history = connect_line(A, "10.0.0.7", 443)
    code, err = sidecar_into_closed_pipe("policy", "suggest", "--history", "-", stdin=history)
    assert (code, err) == (141, "")


def test_a_reader_that_stops_early_gets_what_it_read_and_no_traceback() -> None:
    big = POLICY + "".join(
        f"  - id: spiffe://example.org/agent/n{i}\n"
        f"    egress:\n      - {{name: w, cidrs: [10.1.{i // 250}.{i % 250}/32]}}\n"
        for i in range(2000)
    )
    proc = subprocess.run(
        f"{sys.executable} -m sidecar.cli policy blast-radius - | head -c 10",
        shell=True,
        input=big,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert proc.stdout == "blast radi"
    assert proc.stderr == ""


# --- no daemon running ----------------------------------------------------------


@pytest.mark.parametrize("command", ["status", "identities"])
def test_no_daemon_is_exit_3_and_a_json_error_object_under_json(
    tmp_path: Path, command: str
) -> None:
    absent = tmp_path / "absent.sock"
    proc = sidecar(command, "--socket", str(absent))
    assert proc.returncode == 3
    assert "no daemon is running" in proc.stderr
    assert "Traceback" not in proc.stderr

    proc = sidecar(command, "--json", "--socket", str(absent))
    assert proc.returncode == 3
    answer = json.loads(proc.stdout)
    assert answer["code"] == "no_daemon"
    assert str(absent) in answer["error"]


def test_a_socket_left_by_a_killed_daemon_is_no_daemon_too(tmp_path: Path) -> None:
    stale = tmp_path / "admin.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(stale))  # bound, never listening, closed: connect is refused
    proc = sidecar("status", "--json", "--socket", str(stale))
    assert proc.returncode == 3
    assert json.loads(proc.stdout)["code"] == "no_daemon"


def test_a_daemon_that_answers_with_an_error_is_still_exit_2(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    with fake_daemon(sock, {"error": "unknown command"}):
        proc = sidecar("status", "--json", "--socket", str(sock))
        plain = sidecar("identities", "--socket", str(sock))
    assert proc.returncode == 2
    assert json.loads(proc.stdout)["code"] == "error"
    assert plain.returncode == 2
    assert plain.stdout == ""
    assert "the daemon refused: unknown command" in plain.stderr


def test_status_of_a_running_daemon_is_exit_0(tmp_path: Path) -> None:
    sock = tmp_path / "admin.sock"
    with fake_daemon(sock, {"instances": []}):
        proc = sidecar("identities", "--json", "--socket", str(sock))
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"instances": []}


# --- entries validate and config validate -----------------------------------------

ENTRIES = textwrap.dedent(
    f"""\
    apiVersion: sidecar/v1
    kind: RegistrationEntries
    trustDomain: example.org
    entries:
      - spiffeId: {A}
        selectors: [unix:uid:1000]
      - spiffeId: {B}
        selectors: [unix:uid:1001, parent:id:{A}]
    """
)
CONFIG = textwrap.dedent(
    """\
    apiVersion: sidecar/v1
    kind: DaemonConfig
    host: web-1
    identity:
      entries: /etc/sidecar/entries.yaml
    policy:
      file: /etc/sidecar/policy.yaml
    """
)


def test_entries_validate_prints_one_ok_line_for_a_file_or_stdin(tmp_path: Path) -> None:
    path = tmp_path / "entries.yaml"
    path.write_text(ENTRIES)
    proc = sidecar("entries", "validate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{path}: OK: 2 registration entries for trust domain example.org\n"
    assert proc.stderr == ""
    piped = sidecar("entries", "validate", "-", stdin=ENTRIES)
    assert piped.returncode == 0
    assert piped.stdout.startswith("<stdin>: OK: 2 registration entries")


def test_entries_validate_names_file_line_and_field_and_exits_2(tmp_path: Path) -> None:
    bad = ENTRIES.replace("unix:uid:1001", "unix:uid:nobody-knows")
    path = tmp_path / "entries.yaml"
    path.write_text(bad)
    proc = sidecar("entries", "validate", str(path))
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert f"{path}:8: entries[1].selectors[0]:" in proc.stderr
    piped = sidecar("entries", "validate", "-", stdin=bad)
    assert piped.returncode == 2
    assert "<stdin>:8: entries[1].selectors[0]:" in piped.stderr
    missing = sidecar("entries", "validate", str(tmp_path / "none.yaml"))
    assert missing.returncode == 2
    assert "cannot read" in missing.stderr


def test_config_validate_prints_one_ok_line_for_a_file_or_stdin(tmp_path: Path) -> None:
    path = tmp_path / "daemon.yaml"
    path.write_text(CONFIG)
    proc = sidecar("config", "validate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{path}: OK: DaemonConfig for host web-1\n"
    assert proc.stderr == ""
    piped = sidecar("config", "validate", "-", stdin=CONFIG)
    assert (piped.returncode, piped.stdout) == (0, "<stdin>: OK: DaemonConfig for host web-1\n")


def test_config_validate_names_file_line_and_field_and_exits_2(tmp_path: Path) -> None:
    bad = CONFIG + "bpf:\n  procsMax: lots\n"
    proc = sidecar("config", "validate", "-", stdin=bad)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert "<stdin>:9: bpf.procsMax: must be an integer from 1024 to 4194304" in proc.stderr
    path = tmp_path / "daemon.yaml"
    path.write_text(CONFIG.replace("policy:", "polcy:"))
    proc = sidecar("config", "validate", str(path))
    assert proc.returncode == 2
    assert f"{path}:6: polcy: unknown field" in proc.stderr


def test_config_validate_checks_the_file_and_warns_of_what_this_host_lacks() -> None:
    cfg = CONFIG + "scope:\n  cgroup: /nonexistent/agents\n"
    proc = sidecar("config", "validate", "-", stdin=cfg)
    assert proc.returncode == 0
    assert "<stdin>: warning: scope.cgroup /nonexistent/agents does not exist" in proc.stderr
    env_ignored = sidecar("config", "validate", "-", stdin=CONFIG, env={"SIDECAR_CGROUP": "/x"})
    assert env_ignored.returncode == 0
    assert env_ignored.stderr == ""
