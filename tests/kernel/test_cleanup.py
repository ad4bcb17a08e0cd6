"""Kernel tests clean up after themselves, also when they fail."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import attached_program_ids

from sidecar.kernel.checks import cgroup2_root

HERE = Path(__file__).resolve().parent


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
    cgroup, pin_dir, *ids = record.read_text().split()
    assert len(ids) == 8, ids  # the probe's daemon had its eight cgroup hooks attached
    assert not Path(cgroup).exists(), "scratch cgroup left behind"
    assert not Path(pin_dir).exists(), "pinned links or maps left behind"
    still = {int(i) for i in ids} & set(attached_program_ids(cgroup2_root()))
    assert not still, f"programs {still} still attached at the cgroup2 root"


def test_remove_tree_kills_what_is_left_and_removes_nested_cgroups() -> None:
    import uuid

    from conftest import spawn

    from sidecar.kernel.checks import cgroup2_root
    from sidecar.proc.cgroups import remove_tree

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


def test_uninstall_refuses_a_bpffs_directory_that_holds_what_we_never_pin(pin_dir: Path) -> None:
    from sidecar.kernel.loader import uninstall
    from sidecar.util.errors import KernelError

    (pin_dir / "v2").mkdir(parents=True)
    (pin_dir / "someone-elses").mkdir()
    try:
        uninstall(pin_dir)
    except KernelError as exc:
        assert "does not look like a sidecar pin directory" in str(exc)
        assert "someone-elses" in str(exc)
    else:
        raise AssertionError("uninstall removed a directory that is not ours")
    assert (pin_dir / "someone-elses").is_dir()
    (pin_dir / "someone-elses").rmdir()
    assert uninstall(pin_dir) == [] and not pin_dir.exists()  # only empty dirs of ours: gone
