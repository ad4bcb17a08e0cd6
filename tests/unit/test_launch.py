"""Starting a tool in a cgroup or as another user without forking the caller with Python code."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.proc.cgroups import launch_argv

REPO = Path(__file__).resolve().parents[2]


def test_the_launched_tool_runs_with_its_own_argv_and_environment() -> None:
    out = subprocess.run(
        launch_argv(
            [
                sys.executable,
                "-c",
                "import os,sys; print(sys.argv[1:], os.environ['X'])",
                "a b",
                "c",
            ]
        ),
        env={**os.environ, "X": "kept"},
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "['a b', 'c'] kept"


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping to another uid needs root")
def test_the_launched_tool_runs_as_the_uid_with_no_extra_groups() -> None:
    out = subprocess.run(
        launch_argv(["/usr/bin/id"], uid=65534), capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == [
        "uid=65534(nobody)",
        "gid=65534(nogroup)",
        "groups=65534(nogroup)",
    ]


def test_a_missing_program_fails_the_launch() -> None:
    proc = subprocess.run(launch_argv(["/nonexistent/tool"]), capture_output=True)
    assert proc.returncode != 0
    assert b"nonexistent" in proc.stderr


def test_nothing_forks_with_a_preexec_fn() -> None:
    # A preexec_fn makes subprocess fork (not vfork) and run Python in the copy;
    # with gRPC threads alive in the parent that copy can print their errors
    # (the flake this guards against).  launch_argv is the way to do it.
    offenders = [
        f"{p.relative_to(REPO)}:{n}"
        for top in ("sidecar", "tests", "benchmarks")
        for p in (REPO / top).rglob("*.py")
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if "preexec_fn=" in line and p.name != "test_launch.py"
    ]
    assert offenders == []
