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
MAINTENANCE_LOCK = 3  # creating and dropping day partitions

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
    (
        3,
        "events and the signed batches partitioned by day, for retention",
        # The events of version 1 move into the partition of the day of this
        # migration: they count as stored today.  They have no kept batch (the
        # signatures were not kept before this version).
        """
ALTER TABLE events RENAME TO events_v1;
CREATE SEQUENCE events_cursor AS BIGINT;
SELECT setval('events_cursor', coalesce((SELECT max(id) FROM events_v1), 0) + 1, false);
-- day: days since 1970-01-01 (UTC) on which the collector stored the row; a
-- batch and the events it stored share it, so they expire together.
CREATE TABLE events (
    id BIGINT NOT NULL DEFAULT nextval('events_cursor'),
    day INTEGER NOT NULL,
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
) PARTITION BY RANGE (day);
ALTER SEQUENCE events_cursor OWNED BY events.id;
CREATE SEQUENCE batches_id AS BIGINT;
CREATE TABLE batches (
    id BIGINT NOT NULL DEFAULT nextval('batches_id'),
    day INTEGER NOT NULL,
    host TEXT NOT NULL,
    first_seq BIGINT NOT NULL,
    last_seq BIGINT NOT NULL,
    prev_chain BYTEA NOT NULL,
    signature BYTEA NOT NULL,
    signer BYTEA NOT NULL,
    from_seq BIGINT NOT NULL,
    from_chain BYTEA NOT NULL
) PARTITION BY RANGE (day);
DO $$
DECLARE
    d INTEGER := floor(extract(epoch FROM now()) / 86400);
    name TEXT := to_char(date '1970-01-01' + d, 'YYYYMMDD');
BEGIN
    EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%s) TO (%s)',
                   'events_' || name, d, d + 1);
    EXECUTE format('CREATE TABLE %I PARTITION OF batches FOR VALUES FROM (%s) TO (%s)',
                   'batches_' || name, d, d + 1);
    EXECUTE format('INSERT INTO events (id, day, host, boot, seq, time_ns, identity, instance,'
                   ' kind, verdict, verification, data) SELECT id, %s, host, boot, seq, time_ns,'
                   ' identity, instance, kind, verdict, verification, data FROM events_v1', d);
END $$;
DROP TABLE events_v1;
-- Exactly once: a unique index of a partitioned table must hold the partition
-- key, so this one only catches a replay within one day.  What makes it hold
-- across days is the host's chain state, read under its row lock: the store
-- looks up the sequences at or below the host's head before it inserts.
CREATE UNIQUE INDEX events_host_boot_seq ON events (host, boot, seq, day);
CREATE INDEX events_id ON events (id);
CREATE INDEX events_identity ON events (identity, id);
CREATE INDEX events_instance ON events (instance, id);
CREATE INDEX events_host ON events (host, id);
CREATE INDEX events_kind ON events (kind, id);
CREATE INDEX events_time ON events (time_ns) INCLUDE (id);
CREATE INDEX batches_host ON batches (host, from_seq);
ALTER SEQUENCE batches_id OWNED BY batches.id;
""",
    ),
    (
        4,
        "one call stores a batch (sidecar_append); readers wait for a settled cursor"
        " (sidecar_horizon)",
        # A replica that knows a host's head (it stored the host's last batch)
        # stores the next batch in one statement, one round trip: the UPDATE of
        # the host's row matches only while the head is still the one the batch
        # was verified against, and holds the row's lock to the commit.  When it
        # does not match (another replica moved the head) nothing is stored
        # (ids NULL) and the replica takes the locked path, reading the head first.
        # Lock order as everywhere: the host's row, then the append lock.
        #
        # Cursor order: writers hold the append lock SHARED from drawing their
        # ids to their commit, so they insert side by side and may commit out of
        # id order.  A reader first calls sidecar_horizon, which takes the lock
        # EXCLUSIVE for an instant: every writer that drew an id by then has
        # ended, so every id up to the sequence's value is committed or never
        # will be.  Readers read up to that horizon only, and never skip a row.
        """
CREATE FUNCTION sidecar_append(
    p_host TEXT, p_expect_seq BIGINT, p_expect_chain BYTEA,
    p_new_seq BIGINT, p_new_chain BYTEA, p_day INTEGER, p_new_only BOOLEAN,
    p_b_first BIGINT, p_b_last BIGINT, p_b_prev BYTEA, p_b_signature BYTEA,
    p_b_signer BYTEA, p_b_from BIGINT, p_b_from_chain BYTEA,
    p_hosts TEXT[], p_boots TEXT[], p_seqs BIGINT[], p_times BIGINT[],
    p_identities TEXT[], p_instances TEXT[], p_kinds TEXT[], p_verdicts INTEGER[],
    p_verifications SMALLINT[], p_data BYTEA[],
    OUT ids BIGINT[], OUT seqs BIGINT[]
) LANGUAGE plpgsql AS $fn$
BEGIN
    IF p_new_seq > p_expect_seq THEN
        UPDATE hosts SET last_seq = p_new_seq, last_chain = p_new_chain
        WHERE host = p_host AND last_seq = p_expect_seq AND last_chain = p_expect_chain;
    ELSE
        PERFORM FROM hosts
        WHERE host = p_host AND last_seq = p_expect_seq AND last_chain = p_expect_chain
        FOR UPDATE;
    END IF;
    IF NOT FOUND THEN
        RETURN;  -- the head moved: nothing stored, ids NULL
    END IF;
    ids := '{}';
    seqs := '{}';
    IF p_b_first IS NOT NULL THEN
        INSERT INTO batches (day, host, first_seq, last_seq, prev_chain, signature, signer,
                             from_seq, from_chain)
        VALUES (p_day, p_host, p_b_first, p_b_last, p_b_prev, p_b_signature, p_b_signer,
                p_b_from, p_b_from_chain);
    END IF;
    IF cardinality(p_data) > 0 THEN
        -- Ids are drawn in the rows' order, under the append lock (shared) held to
        -- the commit.
        PERFORM pg_advisory_xact_lock_shared("""
        f"{LOCK_CLASS}, {APPEND_LOCK}"
        """);
        IF p_new_only THEN
            -- Every row is above the head just matched: none can be stored yet.
            WITH ins AS (
                INSERT INTO events (day, host, boot, seq, time_ns, identity, instance, kind,
                                    verdict, verification, data)
                SELECT p_day, u.h, u.b, u.s, u.t, u.i, u.n, u.k, u.v, u.x, u.d
                FROM unnest(p_hosts, p_boots, p_seqs, p_times, p_identities, p_instances,
                            p_kinds, p_verdicts, p_verifications, p_data)
                     WITH ORDINALITY AS u(h, b, s, t, i, n, k, v, x, d, o)
                ORDER BY u.o
                RETURNING id, seq)
            SELECT array_agg(id ORDER BY id), array_agg(seq ORDER BY id) INTO ids, seqs
            FROM ins;
        ELSE
            -- A same-day replay is skipped (the caller took out what any day holds).
            WITH ins AS (
                INSERT INTO events (day, host, boot, seq, time_ns, identity, instance, kind,
                                    verdict, verification, data)
                SELECT p_day, u.h, u.b, u.s, u.t, u.i, u.n, u.k, u.v, u.x, u.d
                FROM unnest(p_hosts, p_boots, p_seqs, p_times, p_identities, p_instances,
                            p_kinds, p_verdicts, p_verifications, p_data)
                     WITH ORDINALITY AS u(h, b, s, t, i, n, k, v, x, d, o)
                ORDER BY u.o
                ON CONFLICT (host, boot, seq, day) DO NOTHING
                RETURNING id, seq)
            SELECT coalesce(array_agg(id ORDER BY id), '{}'),
                   coalesce(array_agg(seq ORDER BY id), '{}') INTO ids, seqs
            FROM ins;
        END IF;
    END IF;
END
$fn$;
-- The highest cursor below which no row can still appear (see above); call it
-- as a statement of its own, before the read, which then sees every row up to it.
CREATE FUNCTION sidecar_horizon() RETURNS BIGINT LANGUAGE plpgsql AS $fn$
DECLARE
    v BIGINT;
    called BOOLEAN;
BEGIN
    PERFORM pg_advisory_xact_lock("""
        f"{LOCK_CLASS}, {APPEND_LOCK}"
        """);
    SELECT last_value, is_called INTO v, called FROM events_cursor;
    RETURN CASE WHEN called THEN v ELSE v - 1 END;
END
$fn$;
""",
    ),
)

LATEST = max(version for version, _, _ in MIGRATIONS)


def migrate(
    conn: psycopg.Connection[Any], steps: tuple[tuple[int, str, str], ...] = MIGRATIONS
) -> list[int]:
    """Bring the schema to :data:`LATEST` on ``conn`` (autocommit); versions applied here.

    Versions need not be consecutive (branches of work take numbers apart); each
    missing one is applied, in increasing order.  A version in the database that
    this collector does not know is refused, as a newer schema is.
    """
    applied_now: list[int] = []
    known = {version for version, _, _ in steps}
    latest = max(known)
    conn.execute("SELECT pg_advisory_lock(%s, %s)", (LOCK_CLASS, MIGRATION_LOCK))
    try:
        conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_version ("
            " version INTEGER PRIMARY KEY,"
            " description TEXT NOT NULL,"
            " applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        done = {int(r[0]) for r in conn.execute("SELECT version FROM schema_version")}
        if done and max(done) > latest:
            raise StoreError(
                f"the database schema is at version {max(done)}, newer than this collector"
                f" knows ({latest}): upgrade this collector"
            )
        if done - known:
            raise StoreError(
                f"the database schema has version(s) {sorted(done - known)} that this collector"
                " does not know: upgrade this collector"
            )
        for version, description, ddl in sorted(steps):
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
