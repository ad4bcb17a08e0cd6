"""Under SIDECAR_REQUIRE_KERNEL=1 (set by .ci/run) no test may skip, however it skips."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

PROBE = """
import pytest

@pytest.mark.skipif(True, reason="a skipif evaluated before any setup hook")
def test_marked() -> None:
    pass

def test_called() -> None:
    pytest.skip("a skip from inside a test")

def test_runs() -> None:
    assert True
"""


def _run(tmp_path: Path, require: bool) -> subprocess.CompletedProcess[str]:
    (tmp_path / "test_probe.py").write_text(PROBE)
    env = {**os.environ, "PYTHONPATH": str(TESTS)}
    env.pop("SIDECAR_REQUIRE_KERNEL", None)
    if require:
        env["SIDECAR_REQUIRE_KERNEL"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "conftest",
            "-p",
            "no:cacheprovider",
            "-c",
            os.devnull,
            str(tmp_path / "test_probe.py"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )


def test_every_kind_of_skip_fails_the_run_when_kernel_tests_are_required(tmp_path: Path) -> None:
    out = _run(tmp_path, require=True)
    assert out.returncode != 0, out.stdout
    last = out.stdout.strip().splitlines()[-1]
    assert "1 failed" in last and "1 error" in last and "1 passed" in last, last
    assert "skipped" not in last
    assert "skipped under SIDECAR_REQUIRE_KERNEL=1" in out.stdout


def test_without_the_requirement_skips_stay_skips(tmp_path: Path) -> None:
    out = _run(tmp_path, require=False)
    assert out.returncode == 0, out.stdout
    assert "2 skipped" in out.stdout and "1 passed" in out.stdout
