"""Run only by test_cleanup.py, in a pytest of its own: kernel tests that fail on purpose."""

from __future__ import annotations

import os
from pathlib import Path

from conftest import InProcessDaemon, spawn


def test_fails_with_a_daemon_attached_and_a_process_left_running(
    daemon: InProcessDaemon, scratch_cgroup: Path, pin_dir: Path
) -> None:
    spawn(scratch_cgroup, ["/bin/sleep", "60"])
    (scratch_cgroup / "nested").mkdir()
    Path(os.environ["SIDECAR_PROBE_RECORD"]).write_text(f"{scratch_cgroup}\n{pin_dir}\n")
    raise AssertionError("failing on purpose")
