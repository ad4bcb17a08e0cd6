"""The promise "nothing lost silently", tried end to end with real processes.

A collector and a daemon run as an operator runs them; an exec load goes
through attestation, an enforcing policy and the stream.  Meanwhile the
collector is frozen and thawed, killed and restarted, and the daemon is
killed and restarted.  Every exec must be in the collector's store exactly
once, or reported lost by the host (the 30-minute version of this run is
``benchmarks/bench_soak.py``).
"""

from __future__ import annotations

from pathlib import Path

from conftest import SCRATCH_PREFIX

from sidecar.testing import soak
from sidecar.testing.scratch import Scratch
from sidecar.testing.stack import Stack


def test_every_exec_is_stored_once_or_reported_lost_through_freezes_and_kills(
    tmp_path: Path,
) -> None:
    tmp_path.chmod(0o755)
    stack = Stack(Scratch.create(SCRATCH_PREFIX, tmp_path / "stack"), host="faults-host")
    try:
        result = soak.run(stack, seconds=40, rate=100, cycles=1, settle_timeout=60)
        done = [what for _, what in result.actions]
        assert done == [what for _, what in soak.CYCLE]
        assert result.started > 3000  # the load ran through every fault
        assert result.duplicates == 0, result
        assert result.stored + result.lost_execs == result.started, result
        # At this rate the spool and the pinned ring absorb every outage: nothing is lost.
        assert result.lost_execs == 0, result
        # The local output runs ahead of the spool, so a killed daemon's successor
        # re-reads records the output already has: it must not write them twice.
        assert result.sink_duplicates == 0, result
        assert result.sink_stored + result.sink_lost_execs == result.started, result
        assert stack.collector is not None and stack.collector.poll() is None
        assert stack.daemon is not None and stack.daemon.proc.poll() is None
    finally:
        stack.cleanup(keep_work=True)
