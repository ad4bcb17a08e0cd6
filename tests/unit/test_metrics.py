"""Metrics, read back by scraping the real HTTP endpoint on loopback."""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client.parser import text_string_to_metric_families

from sidecar import __version__
from sidecar.metrics import (
    LOSS_REASONS,
    CollectorMetrics,
    DaemonMetrics,
    MetricsEndpoint,
    serve,
)
from sidecar.util.errors import ConfigError

AGENT = "spiffe://example.org/agent/summarizer"
TOOL = "spiffe://example.org/tool/search"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture
def daemon() -> DaemonMetrics:
    return DaemonMetrics()


@pytest.fixture
def daemon_endpoint(daemon: DaemonMetrics) -> Iterator[MetricsEndpoint]:
    endpoint = serve(daemon.registry, "127.0.0.1", 0)
    yield endpoint
    endpoint.stop()


def scrape(endpoint: MetricsEndpoint) -> Samples:
    """Fetch /metrics over HTTP and index every sample by name and labels."""
    with urllib.request.urlopen(endpoint.url, timeout=5) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


def test_daemon_metrics_reflect_a_known_sequence_exactly(
    daemon: DaemonMetrics, daemon_endpoint: MetricsEndpoint
) -> None:
    # The daemon counts events in this dict as it emits them (Daemon._emit).
    daemon.event_counts.update(Counter(["exec", "exec", "connect", "exec", "exit"]))
    daemon.record_verdict(AGENT, "allow-search", "allow")
    daemon.record_verdict(AGENT, "allow-search", "allow")
    daemon.record_verdict(AGENT, "default-deny", "deny")
    daemon.record_verdict(TOOL, "default-deny", "audit")
    daemon.record_loss("ringbuf_full", 5)
    daemon.record_loss("spool_full", 2)
    daemon.record_loss("ringbuf_full")
    daemon.observe_attestation(0.002)
    daemon.observe_attestation(0.3)
    daemon.set_live_instances(AGENT, 3)
    daemon.set_live_instances(AGENT, 1)
    daemon.set_live_instances(TOOL, 2)
    daemon.set_policy_version("v1")
    daemon.set_policy_version("v2")
    daemon.record_policy_reload(ok=True)
    daemon.record_policy_reload(ok=False)
    daemon.set_spool_depth(events=7, size_bytes=4096)
    daemon.set_stream_state("connecting")
    daemon.set_stream_state("streaming")
    daemon.record_credential_issued(AGENT, "x509")
    daemon.record_credential_issued(AGENT, "x509")
    daemon.record_credential_issued(AGENT, "jwt")
    daemon.record_credential_revoked(AGENT)

    s = scrape(daemon_endpoint)

    assert value(s, "sidecar_events_total", type="exec") == 3
    assert value(s, "sidecar_events_total", type="connect") == 1
    assert value(s, "sidecar_events_total", type="exit") == 1
    allow = {"identity": AGENT, "rule": "allow-search", "verdict": "allow"}
    assert value(s, "sidecar_verdicts_total", **allow) == 2
    deny = {"identity": AGENT, "rule": "default-deny", "verdict": "deny"}
    assert value(s, "sidecar_verdicts_total", **deny) == 1
    audit = {"identity": TOOL, "rule": "default-deny", "verdict": "audit"}
    assert value(s, "sidecar_verdicts_total", **audit) == 1
    assert value(s, "sidecar_events_lost_total", reason="ringbuf_full") == 6
    assert value(s, "sidecar_events_lost_total", reason="spool_full") == 2
    assert value(s, "sidecar_attestation_seconds_count") == 2
    assert value(s, "sidecar_attestation_seconds_sum") == pytest.approx(0.302)
    assert value(s, "sidecar_attestation_seconds_bucket", le="0.001") == 0
    assert value(s, "sidecar_attestation_seconds_bucket", le="0.0025") == 1
    assert value(s, "sidecar_attestation_seconds_bucket", le="0.25") == 1
    assert value(s, "sidecar_attestation_seconds_bucket", le="0.5") == 2
    assert value(s, "sidecar_live_instances", identity=AGENT) == 1
    assert value(s, "sidecar_live_instances", identity=TOOL) == 2
    policy = [key for key in s if key[0] == "sidecar_policy_info"]
    assert policy == [("sidecar_policy_info", frozenset({("version", "v2")}))]
    assert value(s, "sidecar_policy_reloads_total", result="ok") == 1
    assert value(s, "sidecar_policy_reloads_total", result="rejected") == 1
    assert value(s, "sidecar_spool_events") == 7
    assert value(s, "sidecar_spool_bytes") == 4096
    assert value(s, "sidecar_stream_state", sidecar_stream_state="streaming") == 1
    assert value(s, "sidecar_stream_state", sidecar_stream_state="connecting") == 0
    x509 = {"identity": AGENT, "kind": "x509"}
    assert value(s, "sidecar_credentials_issued_total", **x509) == 2
    assert value(s, "sidecar_credentials_issued_total", identity=AGENT, kind="jwt") == 1
    assert value(s, "sidecar_credentials_revoked_total", identity=AGENT) == 1


def test_daemon_registry_holds_only_its_own_metrics(
    daemon: DaemonMetrics, daemon_endpoint: MetricsEndpoint
) -> None:
    # Series in the global registry (python_gc_*, or this test's own) must not
    # show: the daemon's registry has sidecar_*, and the process and platform
    # collectors registered on it alone.
    leftover = PromCounter("leftover_from_elsewhere", "A series of the global registry.")
    try:
        leftover.inc()
        daemon.event_counts["exec"] = 1
        got = names(scrape(daemon_endpoint))
    finally:
        REGISTRY.unregister(leftover)
    assert all(
        name.startswith(("sidecar_", "process_")) or name == "python_info" for name in got
    ), sorted(got)
    assert "leftover_from_elsewhere_total" not in got
    assert not any(name.startswith("python_gc") for name in got)


def test_build_info_and_process_metrics_are_served_by_both_sides() -> None:
    for registry, role in (
        (DaemonMetrics().registry, "daemon"),
        (CollectorMetrics().registry, "collector"),
    ):
        endpoint = serve(registry, "127.0.0.1", 0)
        try:
            s = scrape(endpoint)
        finally:
            endpoint.stop()
        build = [labels for name, labels in s if name == "sidecar_build_info"]
        assert len(build) == 1
        assert ("version", __version__) in build[0] and ("role", role) in build[0]
        assert value(s, "process_resident_memory_bytes") > 0
        assert value(s, "process_open_fds") > 0
        assert ("process_cpu_seconds_total", frozenset()) in s
        assert "python_info" in names(s)


def test_loss_and_reload_counters_exist_at_zero_from_the_start(
    daemon: DaemonMetrics, daemon_endpoint: MetricsEndpoint
) -> None:
    s = scrape(daemon_endpoint)
    for reason in LOSS_REASONS:
        assert value(s, "sidecar_events_lost_total", reason=reason) == 0
    assert value(s, "sidecar_policy_reloads_total", result="ok") == 0
    assert value(s, "sidecar_policy_reloads_total", result="rejected") == 0
    assert value(s, "sidecar_policy_last_reload_success_timestamp_seconds") == 0


def test_declared_verdicts_exist_at_zero_and_count_from_there(
    daemon: DaemonMetrics, daemon_endpoint: MetricsEndpoint
) -> None:
    daemon.declare_verdicts(
        [(AGENT, "allow-search", ("allow", "deny")), (AGENT, "default", ("deny",))]
    )
    s = scrape(daemon_endpoint)
    assert (
        value(s, "sidecar_verdicts_total", identity=AGENT, rule="allow-search", verdict="allow")
        == 0
    )
    assert value(s, "sidecar_verdicts_total", identity=AGENT, rule="default", verdict="deny") == 0
    daemon.record_verdict(AGENT, "default", "deny")
    daemon.declare_verdicts([(AGENT, "default", ("deny",))])  # again, after a reload: kept
    s = scrape(daemon_endpoint)
    assert value(s, "sidecar_verdicts_total", identity=AGENT, rule="default", verdict="deny") == 1


def test_last_successful_reload_time_moves_only_on_success(
    daemon: DaemonMetrics, daemon_endpoint: MetricsEndpoint
) -> None:
    before = time.time()
    daemon.record_policy_reload(ok=True)
    first = value(scrape(daemon_endpoint), "sidecar_policy_last_reload_success_timestamp_seconds")
    assert before <= first <= time.time()
    time.sleep(0.01)
    daemon.record_policy_reload(ok=False)
    assert (
        value(scrape(daemon_endpoint), "sidecar_policy_last_reload_success_timestamp_seconds")
        == first
    )


def test_heartbeat_ages_ring_fill_programs_and_nearest_svid_expiry(
    daemon: DaemonMetrics, daemon_endpoint: MetricsEndpoint
) -> None:
    s = scrape(daemon_endpoint)
    assert "sidecar_heartbeat_age_seconds" not in names(s)  # not running yet
    assert "sidecar_svid_nearest_expiry_timestamp_seconds" not in names(s)  # no SVID yet
    ages = {"event loop": 0.5, "ring buffer reader": 2.0}
    daemon.watch_heartbeats(lambda: dict(ages))
    fill = [0.25]
    daemon.watch_ring(lambda: fill[0])
    daemon.set_attached_programs(9)
    daemon.set_svid_expiry("i-1", 2000.0)
    daemon.set_svid_expiry("i-2", 1500.0)
    daemon.set_svid_expiry("i-3", 1800.0)
    s = scrape(daemon_endpoint)
    assert value(s, "sidecar_heartbeat_age_seconds", thread="event loop") == 0.5
    assert value(s, "sidecar_heartbeat_age_seconds", thread="ring buffer reader") == 2.0
    assert value(s, "sidecar_ringbuf_fill_ratio") == 0.25
    assert value(s, "sidecar_attached_programs") == 9
    assert value(s, "sidecar_svid_nearest_expiry_timestamp_seconds") == 1500.0
    ages["ring buffer reader"] = 7.0
    fill[0] = 0.75
    daemon.set_svid_expiry("i-2", None)  # revoked: the next one is the nearest
    s = scrape(daemon_endpoint)
    assert value(s, "sidecar_heartbeat_age_seconds", thread="ring buffer reader") == 7.0
    assert value(s, "sidecar_ringbuf_fill_ratio") == 0.75
    assert value(s, "sidecar_svid_nearest_expiry_timestamp_seconds") == 1800.0


def test_collector_last_seen_ingest_latency_and_store_size() -> None:
    collector = CollectorMetrics()
    endpoint = serve(collector.registry, "127.0.0.1", 0)
    try:
        collector.record_ingest("host-a", 0.003, at=1000.0)
        collector.record_ingest("host-b", 0.2, at=1001.0)
        collector.record_ingest("host-a", 0.004, at=1002.0)
        collector.set_store_size(42, 8192)
        collector.set_store_size(43, None)  # PostgreSQL: no size on disk to read
        s = scrape(endpoint)
    finally:
        endpoint.stop()
    last_seen = "sidecar_collector_host_last_seen_timestamp_seconds"
    assert value(s, last_seen, host="host-a") == 1002.0
    assert value(s, last_seen, host="host-b") == 1001.0
    assert value(s, "sidecar_collector_ingest_seconds_count") == 3
    assert value(s, "sidecar_collector_ingest_seconds_bucket", le="0.005") == 2
    assert value(s, "sidecar_collector_store_last_cursor") == 43
    assert value(s, "sidecar_collector_store_bytes") == 8192


def test_forgetting_an_identity_removes_its_live_instance_series(
    daemon: DaemonMetrics, daemon_endpoint: MetricsEndpoint
) -> None:
    daemon.set_live_instances(AGENT, 4)
    daemon.set_live_instances(TOOL, 1)
    daemon.forget_identity(AGENT)
    daemon.forget_identity("spiffe://example.org/never-seen")
    s = scrape(daemon_endpoint)
    assert ("sidecar_live_instances", frozenset({("identity", AGENT)})) not in s
    assert value(s, "sidecar_live_instances", identity=TOOL) == 1


def test_two_daemon_metrics_do_not_share_series() -> None:
    first, second = DaemonMetrics(), DaemonMetrics()
    first.event_counts["exec"] = 1
    assert first.registry.get_sample_value("sidecar_events_total", {"type": "exec"}) == 1
    assert second.registry.get_sample_value("sidecar_events_total", {"type": "exec"}) is None


@pytest.mark.parametrize(
    "call",
    [
        lambda m: m.record_loss("ringbuf_full", -1),
        lambda m: m.observe_attestation(-0.1),
        lambda m: m.set_live_instances(AGENT, -1),
    ],
)
def test_negative_daemon_values_are_refused(call: Callable[[DaemonMetrics], None]) -> None:
    metrics = DaemonMetrics()
    with pytest.raises(ValueError):
        call(metrics)


def test_unknown_stream_state_is_refused() -> None:
    with pytest.raises(ValueError):
        DaemonMetrics().set_stream_state("dancing")  # type: ignore[arg-type]


def test_collector_metrics_reflect_a_known_sequence_exactly() -> None:
    collector = CollectorMetrics()
    endpoint = serve(collector.registry, "127.0.0.1", 0)
    try:
        collector.record_stored("host-a", 10)
        collector.record_stored("host-b")
        collector.record_stored("host-a", 5)
        collector.record_duplicates("host-a", 3)
        collector.record_verification_failure("untrusted_ca")
        collector.record_verification_failure("untrusted_ca")
        collector.record_verification_failure("host_id_mismatch")
        collector.set_subscribers(4)
        collector.set_subscribers(2)
        s = scrape(endpoint)
    finally:
        endpoint.stop()
    assert value(s, "sidecar_collector_events_stored_total", host="host-a") == 15
    assert value(s, "sidecar_collector_events_stored_total", host="host-b") == 1
    assert value(s, "sidecar_collector_events_duplicate_total", host="host-a") == 3
    failures = "sidecar_collector_verification_failures_total"
    assert value(s, failures, reason="untrusted_ca") == 2
    assert value(s, failures, reason="host_id_mismatch") == 1
    assert value(s, "sidecar_collector_subscribers") == 2
    assert not any(name.startswith("sidecar_events") for name in names(s))


def test_stopped_endpoint_frees_its_port(daemon: DaemonMetrics) -> None:
    endpoint = serve(daemon.registry, "127.0.0.1", 0)
    assert scrape(endpoint) is not None
    endpoint.stop()
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(endpoint.url, timeout=5)
    # The port can be bound again at once: the listening socket is closed.
    again = serve(daemon.registry, "127.0.0.1", endpoint.port)
    again.stop()


def test_port_in_use_raises_config_error_naming_the_address() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        with pytest.raises(ConfigError, match=f"127.0.0.1:{port}"):
            serve(CollectorRegistry(), "127.0.0.1", port)
