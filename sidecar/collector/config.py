"""Collector configuration (``apiVersion: sidecar/v1``, ``kind: CollectorConfig``).

Example::

    apiVersion: sidecar/v1
    kind: CollectorConfig
    trustDomain: example.org
    listen: 127.0.0.1:7443            # mTLS: Publish, Subscribe, Query, Renew
    enrollmentListen: 127.0.0.1:7444  # server TLS only: Enroll, GetTrustBundle
    dataDir: /var/lib/sidecar-collector
    serverNames: [localhost, 127.0.0.1]
    subscribers: [spiffe://example.org/ops/alice]
    # store: postgresql://sidecar@db.example.org/sidecar?sslmode=verify-full
    # retention: 30d                  # drop events (and their batches) after 30 days

Relative paths are relative to the file's folder.  Without ``store`` the events go to
SQLite in ``dataDir``; with a ``postgresql://`` URI (any libpq connection parameter,
TLS ones included, is passed through) to a PostgreSQL database that several
collector replicas may share (docs/collector-postgresql.md).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.identity.spiffeid import SpiffeId, parse_spiffe_id, parse_trust_domain
from sidecar.util.errors import ConfigError
from sidecar.util.yamlsrc import Fields, check_header, load_file

API_VERSION = "sidecar/v1"
KIND = "CollectorConfig"


@dataclass(frozen=True)
class CollectorConfig:
    trust_domain: str
    data_dir: Path
    listen: str = "127.0.0.1:7443"
    enrollment_listen: str | None = "127.0.0.1:7444"
    metrics: str = "127.0.0.1:9465"  # Prometheus endpoint; "" turns it off
    server_names: tuple[str, ...] = ("localhost", "127.0.0.1")
    subscribers: frozenset[SpiffeId] = field(default_factory=frozenset)
    max_message_bytes: int = 4 * 1024 * 1024
    max_batch_events: int = 10_000
    subscriber_buffer: int = 1_000
    query_page_size: int = 1_000
    host_svid_ttl_s: int = 7 * 24 * 3600
    intermediate_ttl_s: int = 7 * 24 * 3600
    # The collector's own TLS certificate: re-made at half-life, without a restart.
    server_cert_ttl_s: int = 30 * 24 * 3600
    join_token_ttl_s: int = 3600
    grace_s: float = 5.0
    # libpq URI of a PostgreSQL database; "" keeps events in SQLite (db_path).
    store_dsn: str = ""
    store_connections: int = 4  # PostgreSQL connections (and database threads) per replica
    # Events (and the batches they came in) older than this many whole days are
    # dropped, a day at a time; None keeps everything.
    retention_days: int | None = None

    @property
    def db_path(self) -> Path:
        return self.data_dir / "events.db"

    @property
    def ca_dir(self) -> Path:
        return self.data_dir / "ca"


def _positive(f: Fields, key: str, default: int) -> int:
    value = f.optional(key, int, default)
    if value <= 0:
        raise f.doc.error(f.at(key), f"must be positive, not {value}")
    return value


def _address(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a host:port string")
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"'{value}' is not host:port")
    return value


POSTGRES_SCHEMES = ("postgresql://", "postgres://")
_RETENTION = re.compile(r"^([0-9]+)([dw])$")


def _retention(value: object) -> int:
    """``30d`` or ``4w`` -> whole days (the store drops a whole day at a time)."""
    m = _RETENTION.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(
            f"{value!r} is not a number of days or weeks such as 30d or 4w"
            " (events are kept and dropped by whole days)"
        )
    days = int(m.group(1)) * (7 if m.group(2) == "w" else 1)
    if days < 1:
        raise ValueError("must be at least 1d")
    return days


def _store(value: object) -> str:
    """``sqlite`` (the default) -> "", or a PostgreSQL URI checked by libpq's own parser."""
    if not isinstance(value, str):
        raise ValueError("must be 'sqlite' or a postgresql:// URI")
    if value == "sqlite":
        return ""
    if not value.startswith(POSTGRES_SCHEMES):
        raise ValueError(f"'{redact_dsn(value)}' is neither 'sqlite' nor a postgresql:// URI")
    try:
        import psycopg
    except ImportError as exc:  # a packaging error, named as such
        raise ValueError(
            "a PostgreSQL store needs the psycopg package (pip install psycopg)"
        ) from exc
    try:
        psycopg.conninfo.conninfo_to_dict(value)
    except psycopg.Error as exc:  # libpq's own parser said no
        said = str(exc)
        for secret in _passwords(value):
            said = said.replace(secret, "***")
        raise ValueError(f"not a valid libpq URI: {said}") from exc
    return value


def _passwords(dsn: str) -> list[str]:
    """Every string that may be a password in ``dsn``, however it is spelled."""
    out = []
    auth = dsn.partition("://")[2].rpartition("@")[0]
    if ":" in auth:
        out.append(auth.partition(":")[2])
    out += [
        p.partition("=")[2] for p in dsn.replace("?", "&").split("&") if p.startswith("password=")
    ]
    return [p for p in out if p]


def redact_dsn(dsn: str) -> str:
    """``dsn`` with any password replaced by ``***``, for logs and errors."""
    scheme, sep, rest = dsn.partition("://")
    if sep:
        auth, at, tail = rest.rpartition("@")
        user, colon, _ = auth.partition(":")
        if at and colon:
            rest = f"{user}:***@{tail}"
        dsn = f"{scheme}{sep}{rest}"
    out = []
    for part in dsn.split("&"):
        key, eq, _ = part.partition("=")
        out.append(f"{key}=***" if eq and key.rsplit("?", 1)[-1] == "password" else part)
    return "&".join(out)


def load_config(path: str | Path) -> CollectorConfig:
    """Read and validate a collector config file; errors name file, line and field."""
    doc = load_file(path, ConfigError)
    top = check_header(doc, API_VERSION, KIND)
    base = Path(path).resolve().parent
    td = top.parse("trustDomain", parse_trust_domain)
    if td is None:
        raise doc.error((), "missing required field 'trustDomain'")
    data_dir = base / top.required("dataDir", str)
    listen = top.parse("listen", _address, "127.0.0.1:7443")
    enroll = top.parse("enrollmentListen", _address, "127.0.0.1:7444")
    metrics = top.optional("metrics", str, "127.0.0.1:9465")
    if metrics:
        try:
            _address(metrics)
        except ValueError as exc:
            raise doc.error(top.at("metrics"), str(exc)) from exc
    names = top.optional("serverNames", list, ["localhost", "127.0.0.1"])
    for i, name in enumerate(names):
        if not isinstance(name, str) or not name:
            raise doc.error((*top.at("serverNames"), i), "must be a host name or IP address")
    subs: set[SpiffeId] = set()
    for i, raw in enumerate(top.optional("subscribers", list, [])):
        try:
            sid = parse_spiffe_id(raw)
        except ValueError as exc:
            raise doc.error((*top.at("subscribers"), i), str(exc)) from exc
        if not sid.member_of(td):
            raise doc.error((*top.at("subscribers"), i), f"{sid} is not in trust domain {td}")
        subs.add(sid)
    cfg = CollectorConfig(
        trust_domain=td,
        data_dir=data_dir,
        listen=listen or "127.0.0.1:7443",
        enrollment_listen=enroll,
        metrics=metrics,
        server_names=tuple(names),
        subscribers=frozenset(subs),
        max_message_bytes=_positive(top, "maxMessageBytes", 4 * 1024 * 1024),
        max_batch_events=_positive(top, "maxBatchEvents", 10_000),
        subscriber_buffer=_positive(top, "subscriberBuffer", 1_000),
        query_page_size=_positive(top, "queryPageSize", 1_000),
        host_svid_ttl_s=_positive(top, "hostSvidTtlSeconds", 7 * 24 * 3600),
        intermediate_ttl_s=_positive(top, "intermediateTtlSeconds", 7 * 24 * 3600),
        server_cert_ttl_s=_positive(top, "serverCertTtlSeconds", 30 * 24 * 3600),
        join_token_ttl_s=_positive(top, "joinTokenTtlSeconds", 3600),
        grace_s=float(top.optional("shutdownGraceSeconds", (int, float), 5.0)),
        store_dsn=top.parse("store", _store, "") or "",
        store_connections=_positive(top, "storeConnections", 4),
        retention_days=top.parse("retention", _retention, None),
    )
    top.done()
    return cfg
