"""A reload that the kernel maps refuse leaves the daemon running and the old policy in force."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from sidecar.daemon import config, views
from sidecar.daemon.core import Daemon
from sidecar.events.codec import to_json
from sidecar.events.model import Event
from sidecar.util.errors import KernelError

POLICY = """apiVersion: sidecar/v1
kind: Policy
identities:
  - id: spiffe://example.org/agent/a
"""


class ListSink:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def write(self, event: Event) -> None:
        self.events.append(to_json(event))

    def write_all(self, events: Sequence[Event]) -> None:
        self.events.extend(map(to_json, events))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class RefusingEnforcer:
    """Stands in for the kernel maps failing mid-write (full, or refused)."""

    active = None

    def __init__(self) -> None:
        self.calls = 0

    def load(self, policy: Any) -> Any:
        self.calls += 1
        raise KernelError("cannot write the egress map: No space left on device")


def test_a_reload_the_maps_refuse_is_reported_and_the_daemon_goes_on(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    sink = ListSink()
    d = Daemon(replace(config.load(None), policy=policy), sink)
    enforcer = RefusingEnforcer()
    d.enforcer = enforcer  # type: ignore[assignment]
    d.reload(force=True)  # must not raise: the daemon keeps running
    assert enforcer.calls == 1
    rejected = [e for e in sink.events if e["type"] == "policy_rejected"]
    assert len(rejected) == 1
    assert "No space left on device" in rejected[0]["error"]
    assert str(policy) in rejected[0]["error"]
    assert not [e for e in sink.events if e["type"] == "policy_loaded"]


def test_a_policy_file_is_taken_only_once_it_stops_changing(tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY)
    sink = ListSink()
    d = Daemon(replace(config.load(None), policy=policy), sink)
    d.files.loaded["policy"] = (0, 0, 0)  # as if an older file had been loaded
    assert not d.files.changed_and_settled("policy", policy, force=False)  # seen changed: wait
    assert d.files.changed_and_settled("policy", policy, force=False)  # quiet for a check: take it
    # A writer still at work: every check sees another stamp, so it is never taken.
    d.files.loaded["policy"] = (0, 0, 0)
    for n in range(3):
        with policy.open("a") as fh:
            fh.write(f"# {n}\n")
        assert not d.files.changed_and_settled("policy", policy, force=False)
    assert d.files.changed_and_settled("policy", policy, force=False)
    # SIGHUP: the operator says it is ready.
    d.files.loaded["policy"] = (0, 0, 0)
    assert d.files.changed_and_settled("policy", policy, force=True)
    # Unchanged since it was loaded: nothing to do.
    st = policy.stat()
    d.files.loaded["policy"] = (st.st_ino, st.st_mtime_ns, st.st_size)
    assert not d.files.changed_and_settled("policy", policy, force=False)


def test_what_the_exporter_drops_reaches_the_loss_metric_once(tmp_path: Path) -> None:
    from collections import Counter
    from types import SimpleNamespace

    from sidecar.metrics import DaemonMetrics

    metrics = DaemonMetrics()
    d = Daemon(config.load(None), ListSink(), metrics)
    spool = SimpleNamespace(pending=lambda: 0, size_bytes=lambda: 0)
    d.exporter = SimpleNamespace(dropped=Counter(), spool=spool, connected=True)
    d.exporter.dropped[("exec", "queue_full")] += 3
    d.export_metrics()
    d.exporter.dropped[("exec", "queue_full")] += 2
    d.exporter.dropped[("connect", "spool_full")] += 4
    d.export_metrics()
    d.export_metrics()  # nothing new: nothing counted twice
    sample = metrics.registry.get_sample_value
    assert sample("sidecar_events_lost_total", {"reason": "queue_full"}) == 5
    assert sample("sidecar_events_lost_total", {"reason": "spool_full"}) == 4


def test_an_identity_holding_accepted_dangerous_capabilities_is_shown_able_to_disable(
    tmp_path: Path,
) -> None:
    import os
    from types import SimpleNamespace

    import pytest

    from sidecar.policy import load_policy_text

    if os.geteuid() != 0:
        pytest.skip("the test process must hold the capabilities itself (as root)")
    sid = "spiffe://example.org/agent/a"
    d = Daemon(config.load(None), ListSink())
    accepting = load_policy_text(
        POLICY + "    capabilities: [CAP_SYS_ADMIN, CAP_BPF, CAP_SYS_PTRACE, CAP_SYS_MODULE]\n",
        "p.yaml",
    )
    d.enforcer = SimpleNamespace(active=SimpleNamespace(policy=accepting))  # type: ignore[assignment]
    shown = views.privilege_of(d, os.getpid(), sid)
    assert shown["can_disable_enforcement"] is True
    assert "CAP_SYS_ADMIN" in shown["capabilities"] and "CAP_NET_RAW" in shown["capabilities"]
    refusing = load_policy_text(POLICY, "p.yaml")
    d.enforcer = SimpleNamespace(active=SimpleNamespace(policy=refusing))  # type: ignore[assignment]
    assert views.privilege_of(d, os.getpid(), sid)["can_disable_enforcement"] is False
