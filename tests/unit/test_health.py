"""Liveness and readiness: heartbeats, checks, the HTTP probes and the watchdog."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from sidecar.daemon import config, sdnotify
from sidecar.daemon.core import Daemon
from sidecar.daemon.reader import Batch, RingReader
from sidecar.daemon.settle import Settler
from sidecar.health import Health
from sidecar.kernel.ring import RingRead
from sidecar.metrics import DaemonMetrics, MetricsEndpoint, serve


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def probe(endpoint: MetricsEndpoint, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(endpoint.base + path, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_heartbeat_older_than_its_bound_makes_the_process_not_live() -> None:
    clock = Clock()
    health = Health(clock)
    loop = health.heartbeat("event loop", bound_s=10)
    reader = health.heartbeat("ring buffer reader", bound_s=10)
    assert health.live().ok
    clock.now += 9
    loop.beat()
    clock.now += 2  # reader: 11 s old, loop: 2 s old
    verdict = health.live()
    assert not verdict.ok
    assert len(verdict.reasons) == 1
    assert "ring buffer reader made no progress for 11.0 s" in verdict.reasons[0]
    reader.beat()
    assert health.live().ok
    assert health.ages() == {"event loop": 2.0, "ring buffer reader": 0.0}


def test_ready_needs_every_check_and_liveness() -> None:
    clock = Clock()
    health = Health(clock)
    health.heartbeat("event loop", bound_s=5)
    missing: list[str | None] = ["no policy in force"]
    health.require(lambda: missing[0])
    assert health.ready() == health.ready().__class__(False, ("no policy in force",))
    missing[0] = None
    assert health.ready().ok
    clock.now += 6
    assert not health.ready().ok  # a wedged process is not ready either


def test_a_forgotten_heartbeat_no_longer_counts() -> None:
    clock = Clock()
    health = Health(clock)
    health.heartbeat("reader", bound_s=1)
    clock.now += 5
    assert not health.live().ok
    health.forget("reader")
    assert health.live().ok


def test_a_heartbeat_is_registered_once() -> None:
    health = Health()
    health.heartbeat("x")
    with pytest.raises(ValueError, match="twice"):
        health.heartbeat("x")


class NoSettle:
    def attest_batch(self, events: Any) -> list[None]:
        return [None] * len(events)


class StallingRing:
    """A ring whose read blocks while ``stalled`` is set, like a wedged poll."""

    def __init__(self) -> None:
        self.running = threading.Event()
        self.running.set()
        self.consumer = 0
        self.producer = 0

    def read(self, timeout_ms: int) -> RingRead:
        self.running.wait()
        time.sleep(timeout_ms / 1000)
        return RingRead([], b"", 0)

    def commit(self, position: int) -> None:
        pass


@pytest.fixture
def endpoint_and_health() -> Iterator[tuple[MetricsEndpoint, Health]]:
    health = Health()
    endpoint = serve(DaemonMetrics().registry, "127.0.0.1", 0, health)
    yield endpoint, health
    endpoint.stop()


def test_a_stalled_reader_thread_makes_healthz_fail_until_it_moves_again(
    endpoint_and_health: tuple[MetricsEndpoint, Health],
) -> None:
    endpoint, health = endpoint_and_health
    ring = StallingRing()
    loop = asyncio.new_event_loop()
    handed: list[Batch] = []
    # With records to settle a thread reads; without, the event loop does, and
    # its own heartbeat then speaks for the reading too.
    reader = RingReader(ring, cast(Settler, NoSettle()), 0, handed.append)
    assert not reader.on_loop
    reader.heartbeat = health.heartbeat("ring buffer reader", bound_s=0.3)
    reader.start(loop)
    try:
        time.sleep(0.4)  # more than the bound: only beats keep it live
        assert probe(endpoint, "/healthz") == (200, "ok\n")
        ring.running.clear()
        time.sleep(0.5)
        status, body = probe(endpoint, "/healthz")
        assert status == 503
        assert "ring buffer reader made no progress" in body
        assert probe(endpoint, "/readyz")[0] == 503
        ring.running.set()
        time.sleep(0.2)
        assert probe(endpoint, "/healthz") == (200, "ok\n")
    finally:
        reader.stop()
        ring.running.set()
        reader.join(2)
        loop.close()


def test_readyz_answers_with_the_failing_check_and_metrics_still_serve(
    endpoint_and_health: tuple[MetricsEndpoint, Health],
) -> None:
    endpoint, health = endpoint_and_health
    state: list[str | None] = ["not ready: programs not attached yet"]
    health.require(lambda: state[0])
    assert probe(endpoint, "/readyz") == (503, "not ready: programs not attached yet\n")
    assert probe(endpoint, "/healthz") == (200, "ok\n")
    state[0] = None
    assert probe(endpoint, "/readyz") == (200, "ok\n")
    status, body = probe(endpoint, "/metrics")
    assert status == 200 and "sidecar_events_lost" in body


def test_serve_without_health_has_no_probe_paths() -> None:
    endpoint = serve(DaemonMetrics().registry, "127.0.0.1", 0)
    try:
        status, body = probe(endpoint, "/healthz")
        # prometheus_client serves the registry on every path: no probe answer.
        assert status == 200 and body != "ok\n"
    finally:
        endpoint.stop()


class _Sink:
    def write(self, event: Any) -> None:
        pass

    def write_all(self, events: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, str(path))
    yield sock
    sock.close()


def test_the_watchdog_is_fed_only_while_every_heartbeat_is_recent(
    notify_socket: socket.socket,
) -> None:
    d = Daemon(config.load(None), _Sink())
    clock = Clock()
    d.health = Health(clock)
    d.health.heartbeat("event loop", bound_s=5)
    reader = d.health.heartbeat("ring buffer reader", bound_s=5)
    d._feed_watchdog()
    assert notify_socket.recv(64) == b"WATCHDOG=1"
    clock.now += 6  # both stale: the reader is wedged (and the loop not beaten here)
    d._feed_watchdog()
    with pytest.raises(TimeoutError):
        notify_socket.recv(64)
    d.health.forget("event loop")
    reader.beat()
    d._feed_watchdog()
    assert notify_socket.recv(64) == b"WATCHDOG=1"


def test_the_daemon_is_ready_only_once_attached_with_its_policy_in_force(tmp_path: Path) -> None:
    from dataclasses import replace
    from types import SimpleNamespace

    d = Daemon(replace(config.load(None), policy=tmp_path / "policy.yaml"), _Sink())
    assert d.health.ready().reasons == ("not ready: programs not attached yet (or shutting down)",)
    d._serving = True
    d.kernel = object()  # type: ignore[assignment]
    d.enforcer = SimpleNamespace(active=None)  # type: ignore[assignment]
    assert "no policy in force" in d.health.ready().reasons[0]
    d.enforcer = SimpleNamespace(active=object())  # type: ignore[assignment]
    assert d.health.ready().ok


def test_a_policy_put_in_force_declares_its_verdicts_and_stamps_the_reload_time() -> None:
    from types import SimpleNamespace

    from sidecar.policy import load_policy_text

    metrics = DaemonMetrics()
    d = Daemon(config.load(None), _Sink(), metrics)
    d.enforcer = SimpleNamespace(load=lambda policy: SimpleNamespace(entries=1))  # type: ignore[assignment]
    policy = load_policy_text(
        """apiVersion: sidecar/v1
kind: Policy
identities:
  - id: spiffe://example.org/agent/a
    egress:
      - name: api
        cidrs: [10.0.0.0/8]
        ports: [443]
  - id: spiffe://example.org/agent/b
    mode: audit
""",
        "p.yaml",
    )
    before = time.time()
    d._apply_policy(policy)
    sample = metrics.registry.get_sample_value
    a, b = "spiffe://example.org/agent/a", "spiffe://example.org/agent/b"
    assert sample("sidecar_verdicts_total", {"identity": a, "rule": "api", "verdict": "deny"}) == 0
    assert (
        sample("sidecar_verdicts_total", {"identity": a, "rule": "default", "verdict": "deny"}) == 0
    )
    assert (
        sample(
            "sidecar_verdicts_total", {"identity": b, "rule": "default", "verdict": "would_deny"}
        )
        == 0
    )
    stamp = sample("sidecar_policy_last_reload_success_timestamp_seconds")
    assert stamp is not None and before <= stamp <= time.time()
