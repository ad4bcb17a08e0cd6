"""Collector probes: /healthz live while its loop ticks, /readyz while its store answers."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from sidecar.collector.config import CollectorConfig
from sidecar.collector.server import CollectorHealth, CollectorServer
from sidecar.daemon import sdnotify
from sidecar.identity.spiffeid import parse_spiffe_id
from sidecar.metrics import MetricsEndpoint, serve


def make_config(tmp_path: Path) -> CollectorConfig:
    return CollectorConfig(
        trust_domain="example.org",
        data_dir=tmp_path / "collector",
        listen="127.0.0.1:0",
        enrollment_listen="127.0.0.1:0",
        subscribers=frozenset({parse_spiffe_id("spiffe://example.org/ops/alice")}),
        grace_s=0.5,
    )


def probe(endpoint: MetricsEndpoint, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(endpoint.base + path, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_collector_is_ready_while_its_store_answers_and_not_once_it_does_not(
    tmp_path: Path,
) -> None:
    server = CollectorServer(make_config(tmp_path))
    health = CollectorHealth(server.core)
    endpoint = serve(server.core.metrics.registry, "127.0.0.1", 0, health.health)
    try:
        assert probe(endpoint, "/readyz")[0] == 503  # not asked yet
        asyncio.run(health.probe_store())
        assert probe(endpoint, "/readyz") == (200, "ok\n")
        assert probe(endpoint, "/healthz") == (200, "ok\n")
        sample = server.core.metrics.registry.get_sample_value
        assert sample("sidecar_collector_store_last_cursor") == 0
        size = sample("sidecar_collector_store_bytes")
        db = server.config.db_path
        wal = db.with_name(db.name + "-wal")
        assert wal.exists()  # SQLite in WAL mode: the log counts as store size too
        assert size == db.stat().st_size + wal.stat().st_size
        server.core.store.close()  # the store stops answering
        asyncio.run(health.probe_store())
        status, body = probe(endpoint, "/readyz")
        assert status == 503 and "the store does not answer" in body
        assert probe(endpoint, "/healthz") == (200, "ok\n")  # a restart would not help
    finally:
        endpoint.stop()
        server.core._db.shutdown(wait=True)


def test_collector_health_task_feeds_the_watchdog_while_live(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "n.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(path))
    listener.settimeout(5)
    monkeypatch.setenv(sdnotify.NOTIFY_SOCKET_ENV, str(path))
    monkeypatch.setenv(sdnotify.WATCHDOG_USEC_ENV, "400000")  # fed every 0.2 s
    monkeypatch.setenv(sdnotify.WATCHDOG_PID_ENV, str(os.getpid()))
    server = CollectorServer(make_config(tmp_path))
    health = CollectorHealth(server.core)

    async def body() -> None:
        task = asyncio.create_task(health.run())
        await asyncio.sleep(0.5)
        task.cancel()

    try:
        asyncio.run(body())
        assert listener.recv(64) == b"WATCHDOG=1"
        assert health.store_problem is None  # probed at once
    finally:
        listener.close()
        server.core.close()
