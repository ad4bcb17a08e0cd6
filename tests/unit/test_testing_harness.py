"""The shared harness (sidecar.testing) writes configs the daemon accepts and reports failures."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.daemon import config
from sidecar.testing.daemon_process import DaemonConfigFile, launch_daemon, read_events
from sidecar.util.errors import SidecarError


def test_a_full_config_file_loads_as_the_daemon_reads_it(tmp_path: Path) -> None:
    path = DaemonConfigFile(
        pin_dir=Path("/sys/fs/bpf/sidecar-test-x"),
        cgroup=tmp_path,
        work=tmp_path,
        host="h",
        detach_on_exit=False,
        ring_pages=1024,
        entries=tmp_path / "entries.yaml",
        policy=tmp_path / "policy.yaml",
        reload_interval=3600,
        collector="127.0.0.1:4433",
        credentials=tmp_path / "host",
        spool_dir=tmp_path / "spool",
    ).write(tmp_path / "daemon.yaml")
    cfg = config.load(path)
    assert (cfg.host, cfg.scope_cgroup, cfg.pin_dir) == (
        "h",
        tmp_path,
        Path("/sys/fs/bpf/sidecar-test-x"),
    )
    assert (cfg.detach_on_exit, cfg.ringbuf_pages) == (False, 1024)
    assert (cfg.entries, cfg.policy, cfg.reload_interval) == (
        tmp_path / "entries.yaml",
        tmp_path / "policy.yaml",
        3600.0,
    )
    assert (cfg.state_dir, cfg.workload_socket, cfg.admin_socket, cfg.metrics) == (
        tmp_path / "state",
        tmp_path / "workload.sock",
        tmp_path / "admin.sock",
        "",
    )
    assert (cfg.collector, cfg.collector_credentials, cfg.spool_dir) == (
        ("127.0.0.1:4433",),
        tmp_path / "host",
        tmp_path / "spool",
    )


def test_a_minimal_config_file_keeps_the_daemon_defaults(tmp_path: Path) -> None:
    path = DaemonConfigFile(pin_dir=Path("/sys/fs/bpf/sidecar-test-y")).write(tmp_path / "d.yaml")
    cfg = config.load(path)
    default = config.defaults()
    assert cfg.pin_dir == Path("/sys/fs/bpf/sidecar-test-y") and cfg.detach_on_exit
    assert (cfg.ringbuf_pages, cfg.workload_socket, cfg.admin_socket, cfg.metrics) == (
        default.ringbuf_pages,
        default.workload_socket,
        default.admin_socket,
        default.metrics,
    )
    assert cfg.entries is None and cfg.policy is None and cfg.collector == ()


def test_a_daemon_that_exits_early_is_reported_with_its_log(tmp_path: Path) -> None:
    bad = tmp_path / "daemon.yaml"
    bad.write_text("apiVersion: sidecar/v1\nkind: DaemonConfig\nnoSuchField: 1\n")
    with pytest.raises(SidecarError, match="exited early") as err:
        launch_daemon(bad, tmp_path, timeout=30)
    assert "noSuchField" in str(err.value)
    assert not (tmp_path / "notify.sock").exists()


def test_events_are_read_back_without_a_line_still_being_written(tmp_path: Path) -> None:
    out = tmp_path / "events.jsonl"
    assert read_events(out) == []
    out.write_text('{"type": "exec", "pid": 1}\n{"type": "ex')
    assert read_events(out) == [{"type": "exec", "pid": 1}]
