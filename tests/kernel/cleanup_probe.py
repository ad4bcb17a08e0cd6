"""Run only by test_cleanup.py, in a pytest of its own: kernel tests that fail on purpose."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import attached_program_ids, hook_program_ids, spawn

from sidecar.kernel.checks import cgroup2_root
from sidecar.testing.inprocess import InProcessDaemon


def test_fails_with_a_daemon_attached_and_a_process_left_running(
    daemon: InProcessDaemon, scratch_cgroup: Path, pin_dir: Path
) -> None:
    spawn(scratch_cgroup, ["/bin/sleep", "60"])
    (scratch_cgroup / "nested").mkdir()
    ids = hook_program_ids(pin_dir)
    assert ids <= set(attached_program_ids(cgroup2_root()))
    Path(os.environ["SIDECAR_PROBE_RECORD"]).write_text(
        f"{scratch_cgroup}\n{pin_dir}\n" + "\n".join(map(str, sorted(ids))) + "\n"
    )
    raise AssertionError("failing on purpose")
