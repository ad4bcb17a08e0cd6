"""Prometheus metrics of the host daemon and of the collector.

Each side owns its own ``CollectorRegistry`` instead of prometheus_client's
global one, so a test (or a process that runs both sides) gets exactly the
series it recorded and nothing left over from elsewhere.  The daemon and the
collector call the typed methods below rather than touching metric objects,
which keeps metric names and label sets in this one file.  One exception:
events by type, which the daemon counts in ``DaemonMetrics.event_counts``
itself, once per event, and which are read from there at scrape time.

Label values are bounded by configuration: identities are the SPIFFE IDs of
registration entries, rules are policy rule names, hosts are enrolled hosts.
Never pass per-process or per-connection values as labels.
"""

from __future__ import annotations

import logging
import math
import platform
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Literal
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Enum,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    make_wsgi_app,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import ThreadingWSGIServer

from sidecar import __version__
from sidecar.health import Health
from sidecar.util.errors import ConfigError

_logger = logging.getLogger(__name__)

DAEMON_METRICS_HOST: Final = "127.0.0.1"
DAEMON_METRICS_PORT: Final = 9464
COLLECTOR_METRICS_HOST: Final = "127.0.0.1"
COLLECTOR_METRICS_PORT: Final = 9465

StreamState = Literal["idle", "connecting", "streaming", "backoff", "stopped"]
STREAM_STATES: Final[tuple[StreamState, ...]] = (
    "idle",
    "connecting",
    "streaming",
    "backoff",
    "stopped",
)

# Attestation reads /proc and may hash a binary: from sub-millisecond (cached)
# to seconds (a large binary on a cold disk).
_ATTESTATION_BUCKETS: Final = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


# Every reason the daemon counts a loss under: each series exists at 0 from
# the start, so the first loss shows in increase() and rate().
LOSS_REASONS: Final = (
    "ringbuf_full",
    "decode_error",
    "before_export",
    "queue_full",
    "spool_full",
    "collector_ahead",
)

# Ingest (verify + store one batch): a few milliseconds on SQLite, more for a
# large batch or a remote PostgreSQL.
_INGEST_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

_EVENTS_HELP: Final = "Events read from the kernel, by type."


def _process_collectors(registry: CollectorRegistry, role: str) -> None:
    """``sidecar_build_info`` and the process (RSS, CPU, fds) and platform collectors."""
    Info("sidecar_build", "Version of the running sidecar.", registry=registry).info(
        {"version": __version__, "role": role, "python": platform.python_version()}
    )
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


class _Observed:
    """Gauges read at scrape time from callables the daemon hands over once it runs.

    Each callable is read on the HTTP server's thread: it must read only state
    that is safe to read from there (a float, a dict copied in one step).
    """

    def __init__(self) -> None:
        self.ages: Callable[[], dict[str, float]] | None = None
        self.ring_fill: Callable[[], float] | None = None
        #: Not-after (Unix seconds) of each instance's current X.509 SVID.
        self.svids: dict[str, float] = {}

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> list[Metric]:
        out: list[Metric] = []
        ages = self.ages
        if ages is not None:
            fam = GaugeMetricFamily(
                "sidecar_heartbeat_age_seconds",
                "Seconds since each thread that liveness depends on last made progress.",
                labels=["thread"],
            )
            for name, age in sorted(ages().items()):
                fam.add_metric([name], age)
            out.append(fam)
        fill = self.ring_fill
        if fill is not None:
            out.append(
                GaugeMetricFamily(
                    "sidecar_ringbuf_fill_ratio",
                    "Share of the kernel ring buffer written and not yet consumed (0-1).",
                    value=fill(),
                )
            )
        expiries = list(dict(self.svids).values())
        if expiries:
            out.append(
                GaugeMetricFamily(
                    "sidecar_svid_nearest_expiry_timestamp_seconds",
                    "Not-after time of the X.509 SVID that expires first (Unix seconds).",
                    value=min(expiries),
                )
            )
        return out


class _EventCounts:
    """``sidecar_events_total`` by type, read from a dict of counts at each scrape."""

    def __init__(self, counts: dict[str, int]) -> None:
        self._counts = counts

    def describe(self) -> list[Metric]:
        return [CounterMetricFamily("sidecar_events", _EVENTS_HELP, labels=["type"])]

    def collect(self) -> list[Metric]:
        family = CounterMetricFamily("sidecar_events", _EVENTS_HELP, labels=["type"])
        # A copy made in one step: the daemon's thread may add a type meanwhile.
        for kind, n in sorted(dict(self._counts).items()):
            family.add_metric([kind], n)
        return [family]


class DaemonMetrics:
    """Metrics of ``sidecar run``: what the kernel saw, decided and lost, and how export goes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        # Events are counted by the daemon in a plain dict as it emits them; the
        # series is read from it at scrape time, which keeps a Prometheus
        # increment (and its lock) off the per-event path.
        self.event_counts: dict[str, int] = {}
        r.register(_EventCounts(self.event_counts))
        self._verdict_children: dict[tuple[str, str, str], Any] = {}
        _process_collectors(r, "daemon")
        self._observed = _Observed()
        r.register(self._observed)
        self._verdicts = Counter(
            "sidecar_verdicts",
            "Enforcement decisions, by identity, policy rule and verdict.",
            ["identity", "rule", "verdict"],
            registry=r,
        )
        self._losses = Counter(
            "sidecar_events_lost",
            "Events dropped anywhere between kernel and collector, by reason.",
            ["reason"],
            registry=r,
        )
        for reason in LOSS_REASONS:
            self._losses.labels(reason=reason)
        self._attestation = Histogram(
            "sidecar_attestation_seconds",
            "Time to attest a process to an identity.",
            buckets=_ATTESTATION_BUCKETS,
            registry=r,
        )
        self._live = Gauge(
            "sidecar_live_instances",
            "Running processes attested to each identity.",
            ["identity"],
            registry=r,
        )
        self._policy = Info("sidecar_policy", "The policy version being enforced.", registry=r)
        self._policy_reloads = Counter(
            "sidecar_policy_reloads",
            "Policy and entries reloads, by result; a failed reload keeps the old policy.",
            ["result"],
            registry=r,
        )
        for result in ("ok", "rejected"):
            self._policy_reloads.labels(result=result)
        self._last_reload = Gauge(
            "sidecar_policy_last_reload_success_timestamp_seconds",
            "When a policy was last put in force (Unix seconds).",
            registry=r,
        )
        self._attached = Gauge(
            "sidecar_attached_programs",
            "BPF program links this daemon holds in force.",
            registry=r,
        )
        self._spool_events = Gauge(
            "sidecar_spool_events",
            "Events waiting in the disk spool for the collector.",
            registry=r,
        )
        self._spool_bytes = Gauge("sidecar_spool_bytes", "Bytes the disk spool holds.", registry=r)
        self._stream = Enum(
            "sidecar_stream_state",
            "State of the gRPC stream to the collector.",
            states=list(STREAM_STATES),
            registry=r,
        )
        self._issued = Counter(
            "sidecar_credentials_issued",
            "SVIDs issued, by identity and kind (x509, jwt).",
            ["identity", "kind"],
            registry=r,
        )
        self._revoked = Counter(
            "sidecar_credentials_revoked",
            "Credentials revoked, by identity.",
            ["identity"],
            registry=r,
        )

    def record_verdict(self, identity: str, rule: str, verdict: str) -> None:
        """Count one decision (``allow``, ``deny`` or ``audit``) made under ``rule``."""
        key = (identity, rule, verdict)
        child = self._verdict_children.get(key)
        if child is None:
            child = self._verdicts.labels(identity=identity, rule=rule, verdict=verdict)
            self._verdict_children[key] = child
        child.inc()

    def declare_verdicts(self, rules: Iterable[tuple[str, str, tuple[str, ...]]]) -> None:
        """Make each (identity, rule, verdicts) series exist at 0 before its first decision."""
        for identity, rule, verdicts in rules:
            for verdict in verdicts:
                key = (identity, rule, verdict)
                if key not in self._verdict_children:
                    self._verdict_children[key] = self._verdicts.labels(
                        identity=identity, rule=rule, verdict=verdict
                    )

    def watch_heartbeats(self, ages: Callable[[], dict[str, float]]) -> None:
        """Publish ``sidecar_heartbeat_age_seconds`` from ``ages()`` at each scrape."""
        self._observed.ages = ages

    def watch_ring(self, fill: Callable[[], float]) -> None:
        """Publish ``sidecar_ringbuf_fill_ratio`` from ``fill()`` at each scrape."""
        self._observed.ring_fill = fill

    def set_attached_programs(self, n: int) -> None:
        if n < 0:
            raise ValueError(f"program count must not be negative, got {n}")
        self._attached.set(n)

    def set_svid_expiry(self, instance_id: str, not_after: float | None) -> None:
        """The current X.509 SVID of ``instance_id`` expires at ``not_after``; None: it has none."""
        if not_after is None or math.isnan(not_after):
            self._observed.svids.pop(instance_id, None)
        else:
            self._observed.svids[instance_id] = not_after

    def record_loss(self, reason: str, n: int = 1) -> None:
        """Count ``n`` events dropped for ``reason`` (e.g. ``ringbuf_full``, ``spool_full``)."""
        if n < 0:
            raise ValueError(f"lost event count must not be negative, got {n}")
        self._losses.labels(reason=reason).inc(n)

    def observe_attestation(self, seconds: float) -> None:
        """Record how long one attestation took."""
        if seconds < 0:
            raise ValueError(f"attestation time must not be negative, got {seconds}")
        self._attestation.observe(seconds)

    def set_live_instances(self, identity: str, n: int) -> None:
        """Set how many running processes currently hold ``identity``."""
        if n < 0:
            raise ValueError(f"instance count must not be negative, got {n}")
        self._live.labels(identity=identity).set(n)

    def forget_identity(self, identity: str) -> None:
        """Drop the live-instance series of an identity whose registration entry was removed."""
        try:
            self._live.remove(identity)
        except KeyError:
            _logger.debug("no live-instance series for %s", identity)

    def set_policy_version(self, version: str) -> None:
        """Publish the policy version now enforcing (replaces the previous one)."""
        self._policy.info({"version": version})

    def record_policy_reload(self, ok: bool) -> None:
        """Count a reload attempt as ``ok`` or ``rejected``."""
        self._policy_reloads.labels(result="ok" if ok else "rejected").inc()
        if ok:
            self._last_reload.set_to_current_time()

    def set_spool_depth(self, events: int, size_bytes: int) -> None:
        """Publish how much the disk spool holds for the collector."""
        self._spool_events.set(events)
        self._spool_bytes.set(size_bytes)

    def set_stream_state(self, state: StreamState) -> None:
        """Publish the state of the stream to the collector."""
        self._stream.state(state)

    def record_credential_issued(self, identity: str, kind: Literal["x509", "jwt"]) -> None:
        """Count one SVID issued to ``identity``."""
        self._issued.labels(identity=identity, kind=kind).inc()

    def record_credential_revoked(self, identity: str) -> None:
        """Count one credential of ``identity`` revoked."""
        self._revoked.labels(identity=identity).inc()


class CollectorMetrics:
    """Metrics of ``sidecar collector``: what it stored, rejected and serves."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        _process_collectors(r, "collector")
        self._stored = Counter(
            "sidecar_collector_events_stored",
            "Events written to the store, by sending host.",
            ["host"],
            registry=r,
        )
        self._duplicates = Counter(
            "sidecar_collector_events_duplicate",
            "Events received again after a resend and not stored twice, by host.",
            ["host"],
            registry=r,
        )
        self._verification = Counter(
            "sidecar_collector_verification_failures",
            "Peers or batches rejected by verification, by reason.",
            ["reason"],
            registry=r,
        )
        self._subscribers = Gauge(
            "sidecar_collector_subscribers", "Subscribers currently streaming events.", registry=r
        )
        self._last_seen = Gauge(
            "sidecar_collector_host_last_seen_timestamp_seconds",
            "When each host last delivered a batch (Unix seconds): a host gone silent stops.",
            ["host"],
            registry=r,
        )
        self._ingest = Histogram(
            "sidecar_collector_ingest_seconds",
            "Time to verify and store one batch.",
            buckets=_INGEST_BUCKETS,
            registry=r,
        )
        self._store_last = Gauge(
            "sidecar_collector_store_last_cursor",
            "Cursor of the newest stored event (events stored since the store was made).",
            registry=r,
        )
        self._store_bytes = Gauge(
            "sidecar_collector_store_bytes",
            "Bytes the SQLite store's files take (absent for PostgreSQL).",
            registry=r,
        )

    def record_stored(self, host: str, n: int = 1) -> None:
        """Count ``n`` events from ``host`` written to the store."""
        if n < 0:
            raise ValueError(f"stored event count must not be negative, got {n}")
        self._stored.labels(host=host).inc(n)

    def record_ingest(self, host: str, seconds: float, at: float) -> None:
        """One batch from ``host`` verified and stored in ``seconds``, finished at ``at`` (Unix)."""
        if seconds < 0:
            raise ValueError(f"ingest time must not be negative, got {seconds}")
        self._ingest.observe(seconds)
        self._last_seen.labels(host=host).set(at)

    def set_store_size(self, last_cursor: int, size_bytes: int | None) -> None:
        """Publish how far the store's cursor is and, for SQLite, its size on disk."""
        self._store_last.set(last_cursor)
        if size_bytes is not None:
            self._store_bytes.set(size_bytes)

    def record_duplicates(self, host: str, n: int = 1) -> None:
        """Count ``n`` events from ``host`` dropped as already stored."""
        if n < 0:
            raise ValueError(f"duplicate count must not be negative, got {n}")
        self._duplicates.labels(host=host).inc(n)

    def record_verification_failure(self, reason: str) -> None:
        """Count one peer certificate or batch that failed verification."""
        self._verification.labels(reason=reason).inc()

    def set_subscribers(self, n: int) -> None:
        """Publish how many subscribers are connected."""
        if n < 0:
            raise ValueError(f"subscriber count must not be negative, got {n}")
        self._subscribers.set(n)


class _Server(ThreadingWSGIServer):
    """One per endpoint: its address family is set to the host's."""


class _QuietHandler(WSGIRequestHandler):
    """Probes and scrapes arrive every few seconds: no access log line for each."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


def _app(registry: CollectorRegistry, health: Health | None) -> Any:
    """``/metrics`` (and any other path, as prometheus_client does), ``/healthz``, ``/readyz``."""
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if health is not None and path in ("/healthz", "/readyz"):
            verdict = health.live() if path == "/healthz" else health.ready()
            body = verdict.text().encode()
            status = "200 OK" if verdict.ok else "503 Service Unavailable"
            start_response(
                status,
                [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))],
            )
            return [body]
        return metrics_app(environ, start_response)

    return app


@dataclass(frozen=True)
class MetricsEndpoint:
    """A running ``/metrics``, ``/healthz``, ``/readyz`` endpoint; ``stop()`` frees its port."""

    host: str
    port: int
    _server: WSGIServer
    _thread: threading.Thread

    @property
    def base(self) -> str:
        """``http://host:port``, with IPv6 hosts bracketed."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The scrape URL."""
        return f"{self.base}/metrics"

    def stop(self, timeout: float = 5.0) -> None:
        """Stop serving, close the socket and wait for the serving thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout)
        _logger.info("metrics endpoint %s stopped", self.url)


def serve(
    registry: CollectorRegistry, host: str, port: int, health: Health | None = None
) -> MetricsEndpoint:
    """Serve ``registry`` at ``http://host:port/metrics`` from a daemon thread.

    With ``health``, the same endpoint answers ``/healthz`` (liveness) and
    ``/readyz`` (readiness): 200 and ``ok``, or 503 and one reason a line.
    Use ``DAEMON_METRICS_*`` or ``COLLECTOR_METRICS_*`` as defaults; loopback
    keeps metrics off the network unless the operator says otherwise.  Port 0
    picks a free port (see ``MetricsEndpoint.port``).  A host or port that
    cannot be bound raises ``ConfigError``: the operator has to pick another.
    """

    class Server(_Server):
        pass

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, _, _, _, sockaddr = infos[0]
        Server.address_family = family
        server = make_server(
            str(sockaddr[0]), port, _app(registry, health), Server, handler_class=_QuietHandler
        )
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {host}:{port}: {exc}") from exc
    thread = threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True)
    thread.start()
    bound_port = int(server.server_address[1])
    endpoint = MetricsEndpoint(host=host, port=bound_port, _server=server, _thread=thread)
    _logger.info("serving metrics at %s", endpoint.url)
    return endpoint
