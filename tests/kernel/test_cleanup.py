"""Kernel tests clean up after themselves, also when they fail."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _attached_to(cgroup: Path) -> str:
    if shutil.which("bpftool") is None:
        return ""
    out = subprocess.run(["bpftool", "cgroup", "show", str(cgroup)], capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else ""


def test_a_failing_kernel_test_leaves_no_cgroup_link_or_pinned_map(tmp_path: Path) -> None:
    record = tmp_path / "record"
    env = {**os.environ, "SIDECAR_PROBE_RECORD": str(record)}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(HERE / "cleanup_probe.py"),
        ],
        env=env,
        cwd=HERE.parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr  # the probe failed, as it should
    assert "failing on purpose" in proc.stdout
    cgroup, pin_dir = (Path(x) for x in record.read_text().split())
    assert not cgroup.exists(), "scratch cgroup left behind"
    assert not pin_dir.exists(), "pinned links or maps left behind"
    assert _attached_to(cgroup) == ""


def test_remove_tree_kills_what_is_left_and_removes_nested_cgroups() -> None:
    import uuid

    from conftest import spawn

    from sidecar.cgroups import remove_tree
    from sidecar.kernel.checks import cgroup2_root

    top = cgroup2_root() / f"sidecar-test-{uuid.uuid4().hex[:10]}"
    nested = top / "tool"
    nested.mkdir(parents=True)
    procs = []
    try:
        procs = [spawn(cg, ["sleep", "60"]) for cg in (top, nested)]
        for cg in (top, nested):  # each holds a live process, so a plain rmdir would fail
            assert (cg / "cgroup.procs").read_text().strip()
        remove_tree(top)
        assert not top.exists()
        assert [p.wait(5) for p in procs] == [-9, -9]
    finally:
        for p in procs:
            p.kill()
            p.wait()
        if top.exists():
            remove_tree(top)
