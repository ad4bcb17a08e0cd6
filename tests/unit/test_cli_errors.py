"""Bad input to ``sidecar run``: one line naming problem and fix, exit code 2, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar import cli
from sidecar.kernel import checks
from sidecar.proc.cgroups import launch_argv

REPO = Path(__file__).resolve().parents[2]


def _run(
    args: list[str], env: dict[str, str] | None = None, uid: int | None = None
) -> tuple[int, list[str]]:
    # No preexec_fn: the uid is dropped by a launcher that vfork starts, so this
    # process (which may hold gRPC threads from other tests) is never forked.
    proc = subprocess.run(
        launch_argv([sys.executable, "-m", "sidecar.cli", *args], uid=uid),
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return proc.returncode, lines


def _assert_one_clear_line(rc: int, lines: list[str], *words: str) -> None:
    assert rc == 2, lines
    assert len(lines) == 1, lines
    assert lines[0].startswith("sidecar: error: ")
    assert "Traceback" not in lines[0]
    for w in words:
        assert w in lines[0], lines[0]


def test_non_root_is_told_to_run_as_root(tmp_path: Path) -> None:
    uid = 65534 if os.geteuid() == 0 else None
    rc, lines = _run(["run", "--cgroup", "/"], uid=uid)
    _assert_one_clear_line(rc, lines, "root")


def test_a_config_naming_a_missing_cgroup_says_to_create_it(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "apiVersion: sidecar/v1\nkind: DaemonConfig\nscope:\n  cgroup: /nonexistent/cg\n"
    )
    rc, lines = _run(["run", "--config", str(cfg)])
    _assert_one_clear_line(rc, lines, "/nonexistent/cg", "does not exist", "mkdir")


@pytest.mark.parametrize(
    "body, words",
    [
        (
            "apiVersion: sidecar/v1\nkind: DaemonConfig\nbogus: 1\n",
            ["c.yaml:3", "bogus", "unknown field"],
        ),
        (
            "apiVersion: sidecar/v1\nkind: DaemonConfig\nbpf:\n  procsMax: lots\n",
            ["c.yaml:4", "bpf.procsMax"],
        ),
        ("apiVersion: sidecar/v1\nkind: Policy\n", ["c.yaml:2", "kind", "DaemonConfig"]),
        ("apiVersion: sidecar/v1\nkind: [unclosed\n", ["c.yaml", "invalid YAML"]),
        (
            "apiVersion: sidecar/v1\nkind: DaemonConfig\nbpf:\n  ringbufPages: 3\n",
            ["ringbufPages", "power of two"],
        ),
        (
            "apiVersion: sidecar/v1\nkind: DaemonConfig\nredaction:\n  patterns: ['(x']\n",
            ["c.yaml:4", "redaction.patterns[0]", "not a valid regular expression"],
        ),
    ],
)
def test_a_malformed_config_names_file_line_and_field(
    tmp_path: Path, body: str, words: list[str]
) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(body)
    rc, lines = _run(["run", "--config", str(cfg)])
    _assert_one_clear_line(rc, lines, *words)


def test_a_missing_config_file_is_named(tmp_path: Path) -> None:
    rc, lines = _run(["run", "--config", str(tmp_path / "nope.yaml")])
    _assert_one_clear_line(rc, lines, "nope.yaml", "cannot read")


def test_missing_btf_names_the_kernel_option(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(checks, "BTF_PATH", tmp_path / "no-btf")
    rc = cli.main(["run", "--cgroup", str(tmp_path)])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("sidecar:")]
    _assert_one_clear_line(rc, lines, "BTF", "CONFIG_DEBUG_INFO_BTF")


def test_missing_kernel_headers_name_the_package_and_the_fallback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(checks, "BTF_PATH", Path("/"))  # present
    monkeypatch.setattr(checks, "find_mount", lambda fstype, *_: Path("/"))
    monkeypatch.setenv("BCC_KERNEL_SOURCE", str(tmp_path / "no-headers"))
    rc = cli.main(["run", "--cgroup", str(tmp_path)])
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("sidecar:")]
    _assert_one_clear_line(rc, lines, "kernel headers", "linux-headers-", "make setup")


def test_uninstall_refuses_a_directory_that_is_not_on_bpffs(tmp_path: Path) -> None:
    victim = tmp_path / "precious"
    victim.mkdir()
    (victim / "data.txt").write_text("keep me")
    rc, lines = _run(["uninstall", "--pin-dir", str(victim)])
    _assert_one_clear_line(rc, lines, str(victim), "not on a BPF file system", "refusing")
    assert (victim / "data.txt").read_text() == "keep me"


def test_uninstall_of_nothing_says_so(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "uninstall", "--pin-dir", str(tmp_path / "none")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "nothing was pinned under" in proc.stdout
    assert "detached" not in proc.stdout


def test_redaction_rules_come_from_the_config_or_are_turned_off(tmp_path: Path) -> None:
    from sidecar.daemon import config

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "apiVersion: sidecar/v1\nkind: DaemonConfig\n"
        "redaction:\n  patterns: ['(?P<secret>customer-[0-9]+)']\n"
    )
    assert config.load(cfg).redact_patterns == ("(?P<secret>customer-[0-9]+)",)
    cfg.write_text("apiVersion: sidecar/v1\nkind: DaemonConfig\nredaction:\n  enabled: false\n")
    assert config.load(cfg).redact_patterns == ()
    assert config.load(None).redact_patterns is None  # the built-in rules


@pytest.mark.parametrize(
    "args",
    [
        ["policy", "validate"],
        ["entries", "validate"],
        ["config", "validate"],
        ["policy", "blast-radius"],
    ],
)
def test_every_command_family_words_its_errors_alike(tmp_path: Path, args: list[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: sidecar/v1\nkind: Nonsense\n")
    rc, lines = _run([*args, str(bad)])
    _assert_one_clear_line(rc, lines, str(bad))
