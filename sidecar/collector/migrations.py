"""The PostgreSQL schema, as numbered migrations applied at start.

Each replica runs :func:`migrate` when it opens the store.  A session advisory
lock serialises them: the first replica applies what is missing, each in its own
transaction with its row in ``schema_version``; the others wait, then find
nothing to do.  Migrations are plain DDL (no ``IF NOT EXISTS``), so a step run
twice would fail loudly instead of hiding a broken lock.

Never edit a migration that was released: add the next one.
"""

from __future__ import annotations

import logging
from typing import Any

import psycopg

from sidecar.collector.store import StoreError

_logger = logging.getLogger(__name__)

#: pg_advisory_lock(class, object) keys: "sidecar" as class, one object per use.
LOCK_CLASS = 0x51DECA
MIGRATION_LOCK = 1
APPEND_LOCK = 2

MIGRATIONS: tuple[tuple[int, str, str], ...] = (
    (
        1,
        "events, host chains, quarantine, join tokens, trust root",
        """
CREATE TABLE events (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host TEXT NOT NULL,
    boot TEXT NOT NULL,
    seq BIGINT,
    time_ns BIGINT NOT NULL,
    identity TEXT NOT NULL,
    instance TEXT NOT NULL,
    kind TEXT NOT NULL,
    verdict INTEGER NOT NULL,
    verification SMALLINT NOT NULL,
    data BYTEA NOT NULL
);
-- Exactly once: a replayed event is a conflict, skipped.  Collector alerts have
-- no sequence (NULL), and NULLs never conflict.
CREATE UNIQUE INDEX events_host_boot_seq ON events (host, boot, seq);
-- Every query reads in cursor (id) order after a cursor: each filter column is
-- indexed together with id.
CREATE INDEX events_identity ON events (identity, id);
CREATE INDEX events_instance ON events (instance, id);
CREATE INDEX events_host ON events (host, id);
CREATE INDEX events_kind ON events (kind, id);
CREATE INDEX events_time ON events (time_ns);
CREATE TABLE hosts (
    host TEXT PRIMARY KEY,
    last_seq BIGINT NOT NULL,
    last_chain BYTEA NOT NULL
);
CREATE TABLE quarantine (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    host TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    received_ns BIGINT NOT NULL,
    reason TEXT NOT NULL,
    batch BYTEA NOT NULL
);
CREATE INDEX quarantine_host ON quarantine (host, id);
CREATE TABLE join_tokens (
    token_hash TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    expires_ns BIGINT NOT NULL,
    used_ns BIGINT
);
CREATE TABLE trust_root (
    id SMALLINT PRIMARY KEY CHECK (id = 1),
    trust_domain TEXT NOT NULL,
    certificate BYTEA NOT NULL
);
""",
    ),
    (
        2,
        "bootstrap tokens, and the host names enrollments took",
        """
-- A bootstrap token enrolls at most max_uses hosts until expires_ns.  The
-- CHECK holds the count even against a broken caller.
CREATE TABLE bootstrap_tokens (
    token_hash TEXT PRIMARY KEY,
    max_uses INTEGER NOT NULL CHECK (max_uses > 0),
    uses INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
    expires_ns BIGINT NOT NULL,
    created_ns BIGINT NOT NULL
);
-- One row per host name an enrollment took: a bootstrap token enrolls only a
-- name not in here (or one the operator released), so a node holding the
-- bootstrap token cannot take the name of a host already enrolled.  Unique on
-- the name alone, hence on (token, name) too.  Certificates of a host issued
-- before revoked_ns are refused.
CREATE TABLE host_enrollments (
    host TEXT PRIMARY KEY,
    via TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    enrolled_ns BIGINT NOT NULL,
    revoked_ns BIGINT
);
-- Hosts enrolled or streaming before this version keep their names.
INSERT INTO host_enrollments (host, via, token_hash, enrolled_ns)
SELECT DISTINCT ON (host) host, 'join', token_hash, used_ns
FROM join_tokens WHERE used_ns IS NOT NULL ORDER BY host, used_ns DESC;
INSERT INTO host_enrollments (host, via, token_hash, enrolled_ns)
SELECT host, 'seen', '', 0 FROM hosts ON CONFLICT (host) DO NOTHING;
""",
    ),
)

LATEST = MIGRATIONS[-1][0]


def migrate(conn: psycopg.Connection[Any]) -> list[int]:
    """Bring the schema to :data:`LATEST` on ``conn`` (autocommit); versions applied here."""
    applied_now: list[int] = []
    conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, MIGRATION_LOCK))
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY,"
            " description TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_version")}
        if done and max(done) > LATEST:
            raise StoreError(
                f"the database schema is at version {max(done)}, newer than this collector"
                f" knows ({LATEST}): upgrade this collector"
            )
        for version, description, ddl in MIGRATIONS:
            if version in done:
                continue
            with conn.transaction():
                conn.execute(ddl)
                conn.execute(
                    "INSERT INTO schema_version (version, description) VALUES (%s, %s)",
                    (version, description),
                )
            applied_now.append(version)
            _logger.info("store schema migrated to version %d: %s", version, description)
    finally:
        if not conn.broken:  # a lost session released its locks already
            conn.execute("SELECT pg_advisory_unlock(%s, %s)", (LOCK_CLASS, MIGRATION_LOCK))
    return applied_now
