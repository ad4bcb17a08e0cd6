"""``policy suggest``: both history shapes, unrecognised lines, and ``--into`` merging."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sidecar.cli import main
from sidecar.policy import decide, exec_allowed, load_policy_text
from sidecar.policy.allowset import AllowSet
from sidecar.policy.history import parse_events
from sidecar.util.errors import PolicyError

A = "spiffe://example.org/agent/a"
B = "spiffe://example.org/agent/b"
C = "spiffe://example.org/agent/c"


def daemon_connect(identity: str, daddr: str, dport: int, protocol: str = "tcp") -> dict[str, Any]:
    return {
        "type": "connect",
        "identity": identity,
        "family": "inet6" if ":" in daddr else "inet",
        "protocol": protocol,
        "daddr": daddr,
        "dport": dport,
        "verdict": "would_deny",
        "rule": "default",
    }


def tail_connect(identity: str, address: str, port: int, protocol: str = "tcp") -> dict[str, Any]:
    """A line as 'sidecar tail --json' prints it (protobuf JSON of a StoredEvent)."""
    return {
        "cursor": "4",
        "event": {
            "host": "web-1",
            "sequence": "4",
            "time_ns": "1700000000000000000",
            "identity": identity,
            "connect": {
                "pid": 7,
                "family": "ADDRESS_FAMILY_INET6" if ":" in address else "ADDRESS_FAMILY_INET",
                "protocol": f"PROTOCOL_{protocol.upper()}",
                "address": address,
                "port": port,
                "verdict": "VERDICT_WOULD_DENY",
                "rule": "default",
            },
        },
        "verification": "VERIFICATION_VERIFIED",
    }


def write_lines(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def suggest_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["policy", "suggest", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_tail_json_lines_teach_what_daemon_lines_teach(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    points = [(A, "192.0.2.1", 443, "tcp"), (A, "2001:db8::1", 53, "udp")]
    daemon = write_lines(tmp_path / "d.jsonl", [daemon_connect(*p) for p in points])
    tail = write_lines(tmp_path / "t.jsonl", [tail_connect(*p) for p in points])
    mixed = write_lines(
        tmp_path / "m.jsonl", [daemon_connect(*points[0]), tail_connect(*points[1])]
    )
    outputs = []
    for path in (daemon, tail, mixed):
        code, out, err = suggest_cli(capsys, "--history", str(path))
        assert (code, err) == (0, "")
        outputs.append(out)
    assert outputs[0] == outputs[1] == outputs[2]
    assert "from 2 connect/exec event(s)" in outputs[1]
    policy = load_policy_text(outputs[1], "s.yaml")
    assert decide(policy, A, "udp", "2001:db8::1", 53).verdict == "allow"


def test_tail_json_exec_and_unix_socket_lines_are_read() -> None:
    exec_line = {
        "cursor": "1",
        "event": {"identity": A, "exec": {"exe": "/usr/bin/curl", "verdict": "VERDICT_ALLOW"}},
    }
    unix_line = {
        "cursor": "2",
        "event": {
            "identity": A,
            "socket": {
                "operation": "connect",
                "kind": "/run/x.sock",
                "verdict": "VERDICT_WOULD_DENY",
            },
        },
    }
    raw_socket = {
        "cursor": "3",
        "event": {"socket": {"operation": "create", "kind": "inet/raw/icmp"}},
    }
    events = parse_events([exec_line, unix_line, raw_socket], "t.jsonl")
    assert [type(e).__name__ for e in events] == ["ExecEvent", "UnixEvent"]


def test_a_bad_field_in_a_tail_line_names_file_line_and_field() -> None:
    bad = tail_connect(A, "192.0.2.999", 443)
    bad["_line"] = 7
    with pytest.raises(PolicyError, match=r"t.jsonl:7: event.connect.address"):
        parse_events([bad], "t.jsonl")
    unknown_field = tail_connect(A, "192.0.2.1", 443)
    unknown_field["event"]["bogus"] = 1
    with pytest.raises(PolicyError, match=r"t.jsonl:1: not a stored event"):
        parse_events([unknown_field], "t.jsonl")


def test_lines_in_neither_shape_are_counted_on_stderr_with_the_first_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [daemon_connect(A, "192.0.2.1", 443), {"addr": "x"}, {"addr": "y"}, {"daddr": "z"}]
    history = write_lines(tmp_path / "h.jsonl", rows)
    code, out, err = suggest_cli(capsys, "--history", str(history))
    assert code == 0
    assert f"{history}:2: warning: 3 line(s) are neither daemon events nor" in err
    assert "from 1 connect/exec event(s)" in out
    clean = write_lines(tmp_path / "c.jsonl", rows[:1])
    assert suggest_cli(capsys, "--history", str(clean))[2] == ""


EXISTING = textwrap.dedent(
    f"""\
    apiVersion: sidecar/v1
    kind: Policy
    defaults: {{unidentified: deny, log_allowed: true}}
    identities:
      # the web agent
      - id: {A}
        mode: audit
        egress:
          - {{name: web, cidrs: [10.0.0.0/24], ports: [443], protocols: [tcp]}}
          - {{name: tcp-80, cidrs: [192.0.2.0/24], ports: [80], protocols: [tcp]}}
        exec: [/usr/bin/curl]
        unix: ["/run/agent/*"]
        sockets: [inet/raw/icmp]
      - id: {B}
        egress:
          - {{name: dns, cidrs: [10.0.0.53/32], ports: [53]}}
    """
)


def test_suggest_into_keeps_every_existing_rule_and_adds_what_they_miss(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "p.yaml"
    existing.write_text(EXISTING)
    rows = [
        daemon_connect(A, "10.0.0.7", 443),  # already allowed by 'web'
        daemon_connect(A, "10.0.0.7", 80),  # new
        tail_connect(A, "2001:db8::5", 443),  # new, from tail --json
        {"type": "exec", "identity": A, "exe": "/usr/bin/curl", "verdict": "allow"},
        {"type": "exec", "identity": A, "exe": "/bin/sh", "verdict": "would_deny"},
        {
            "type": "socket",
            "family": "unix",
            "identity": A,
            "operation": "connect",
            "address": "/run/agent/a.sock",
            "verdict": "allow",
        },
        {
            "type": "socket",
            "family": "unix",
            "identity": A,
            "operation": "connect",
            "address": "/run/db.sock",
            "verdict": "would_deny",
        },
        daemon_connect(C, "198.51.100.1", 22),  # an identity the policy does not list
    ]
    history = write_lines(tmp_path / "h.jsonl", rows)
    code, out, err = suggest_cli(capsys, "--history", str(history), "--into", str(existing))
    assert code == 0, err
    old = load_policy_text(EXISTING, "old.yaml")
    merged = load_policy_text(out, "merged.yaml")  # it validates
    assert (merged.unidentified, merged.log_allowed) == ("deny", True)
    for sid, ci in old.identities.items():
        mine = merged.identities[sid]
        assert mine.mode == ci.mode
        assert mine.sockets == ci.sockets
        assert set(ci.rule_names) <= set(mine.rule_names)
        before, after = AllowSet.from_identity(ci), AllowSet.from_identity(mine)
        assert before.union(after) == after  # nothing that was allowed is lost
    assert B in merged.identities and merged.identities[B] is not None
    assert decide(merged, A, "tcp", "10.0.0.7", 80).verdict == "allow"
    assert decide(merged, A, "tcp", "2001:db8::5", 443).verdict == "allow"
    assert decide(merged, A, "tcp", "10.0.0.8", 80).verdict != "allow"  # nothing widened
    assert exec_allowed(merged, A, "/bin/sh") and exec_allowed(merged, A, "/usr/bin/curl")
    assert merged.identities[A].unix is not None and len(merged.identities[A].unix) == 2
    assert decide(merged, C, "tcp", "198.51.100.1", 22).verdict == "allow"
    assert merged.identities[C].mode == "enforce"
    assert out.count("learnt by 'sidecar policy suggest'") == 2  # 10.0.0.7:80, 2001:db8::5


def test_suggest_into_from_standard_input_history(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io
    import sys

    existing = tmp_path / "p.yaml"
    existing.write_text(EXISTING)
    data = json.dumps(daemon_connect(B, "10.0.0.54", 53, "udp")) + "\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data.encode())))
    code, out, err = suggest_cli(capsys, "--history", "-", "--into", str(existing))
    assert code == 0, err
    merged = load_policy_text(out, "merged.yaml")
    assert decide(merged, B, "udp", "10.0.0.54", 53).verdict == "allow"
    assert decide(merged, B, "tcp", "10.0.0.53", 53).verdict == "allow"
