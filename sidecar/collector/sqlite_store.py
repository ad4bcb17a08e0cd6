"""The collector's embedded store (the default): SQLite in WAL mode.

Why SQLite: one file, transactions, and a unique index on (host, boot, sequence) that
makes a retried batch a no-op, so "stored exactly once" is the database's job, not
ours.  ``synchronous=FULL`` makes a committed batch durable before it is acknowledged.

The row id is the cursor that subscribers and queries resume from: it grows with
every insert, so "after cursor N" never skips or repeats a row.

All methods block; the server calls them from one worker thread.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from sidecar.api.v1 import collector_pb2, event_pb2
from sidecar.collector.store import (
    DAY_NS,
    STORED_BATCH_COLUMNS,
    BootstrapUse,
    HostState,
    NewEvent,
    Plan,
    SignedBatch,
    StoredBatch,
    StoredRows,
    StoreError,
    day_name,
    day_of,
    differing,
    event_row,
    filter_columns,
)

_logger = logging.getLogger(__name__)
T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    host TEXT NOT NULL,
    boot TEXT NOT NULL,
    seq INTEGER,
    time_ns INTEGER NOT NULL,
    identity TEXT NOT NULL,
    kind TEXT NOT NULL,
    verdict INTEGER NOT NULL,
    verification INTEGER NOT NULL,
    data BLOB NOT NULL,
    UNIQUE (host, boot, seq)
);
CREATE INDEX IF NOT EXISTS events_time ON events (time_ns);
CREATE INDEX IF NOT EXISTS events_host_seq ON events (host, seq);
CREATE TABLE IF NOT EXISTS hosts (
    host TEXT PRIMARY KEY,
    last_seq INTEGER NOT NULL,
    last_chain BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS quarantine (
    id INTEGER PRIMARY KEY,
    host TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    received_ns INTEGER NOT NULL,
    reason TEXT NOT NULL,
    batch BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS join_tokens (
    token_hash TEXT PRIMARY KEY,
    host TEXT NOT NULL,
    expires_ns INTEGER NOT NULL,
    used_ns INTEGER
);
"""

# Bootstrap tokens and the host names enrollments took (as PostgreSQL's
# migration 2, which says why).  Made once, with the names already known.
_ENROLLMENT_SCHEMA = """
CREATE TABLE bootstrap_tokens (
    token_hash TEXT PRIMARY KEY,
    max_uses INTEGER NOT NULL CHECK (max_uses > 0),
    uses INTEGER NOT NULL DEFAULT 0 CHECK (uses >= 0 AND uses <= max_uses),
    expires_ns INTEGER NOT NULL,
    created_ns INTEGER NOT NULL
);
CREATE TABLE host_enrollments (
    host TEXT PRIMARY KEY,
    via TEXT NOT NULL,
    token_hash TEXT NOT NULL,
    enrolled_ns INTEGER NOT NULL,
    revoked_ns INTEGER
);
INSERT OR IGNORE INTO host_enrollments (host, via, token_hash, enrolled_ns)
SELECT host, 'join', token_hash, MAX(used_ns) FROM join_tokens
WHERE used_ns IS NOT NULL GROUP BY host;
INSERT OR IGNORE INTO host_enrollments (host, via, token_hash, enrolled_ns)
SELECT host, 'seen', '', 0 FROM hosts;
"""

# Versions of the file's schema after _SCHEMA (PRAGMA user_version), each applied once.
_UPGRADES: tuple[tuple[int, str], ...] = (
    (
        1,
        """
ALTER TABLE events ADD COLUMN instance TEXT NOT NULL DEFAULT '';
CREATE INDEX events_instance ON events (instance);
-- Retention: the cursor range each day's events took (one writer, and a day that
-- never goes back, so the ranges follow each other).
CREATE TABLE days (
    day INTEGER PRIMARY KEY,
    first_id INTEGER NOT NULL,
    last_id INTEGER NOT NULL
);
CREATE TABLE batches (
    id INTEGER PRIMARY KEY,
    day INTEGER NOT NULL,
    host TEXT NOT NULL,
    first_seq INTEGER NOT NULL,
    last_seq INTEGER NOT NULL,
    prev_chain BLOB NOT NULL,
    signature BLOB NOT NULL,
    signer BLOB NOT NULL,
    from_seq INTEGER NOT NULL,
    from_chain BLOB NOT NULL
);
CREATE INDEX batches_host ON batches (host, from_seq);
CREATE INDEX batches_day ON batches (day);
""",
    ),
)


def _int(value: object) -> int:
    if not isinstance(value, int):
        raise StoreError(f"store: expected an integer, found {type(value).__name__}")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise StoreError(f"store: expected bytes, found {type(value).__name__}")
    return value


_INSERT = (
    "INSERT OR IGNORE INTO events (host, boot, seq, time_ns, identity, instance, kind,"
    " verdict, verification, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class SqliteStore:
    """Events, per-host chain state and join tokens in one SQLite database."""

    threads = 1  # one connection, one writer

    def __init__(self, path: Path, clock: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._clock = clock  # the day a row is stored on comes from it
        try:
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA busy_timeout=5000")
            self._db.executescript(_SCHEMA)
            self._create_enrollment_tables()
            self._upgrade()
        except sqlite3.Error as exc:
            raise StoreError(f"cannot open store {path}: {exc}") from exc
        row = self._db.execute("SELECT max(day) FROM days").fetchone()
        self._last_day = int(row[0]) if row and row[0] is not None else 0

    def _upgrade(self) -> None:
        """Apply the schema versions the file lacks, each in one transaction."""
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        for number, script in _UPGRADES:
            if number <= version:
                continue
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for statement in script.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                if number == 1:
                    self._backfill_v1()
                self._db.execute(f"PRAGMA user_version = {number}")
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            _logger.info("store %s: schema upgraded to version %d", self.path, number)

    def _backfill_v1(self) -> None:
        """Events stored before version 1: their instance, and today as their day."""
        rows = self._db.execute("SELECT id, data FROM events").fetchall()
        self._db.executemany(
            "UPDATE events SET instance = ? WHERE id = ?",
            [(event_pb2.Event.FromString(data).process.instance_id, i) for i, data in rows],
        )
        if rows:
            self._db.execute(
                "INSERT INTO days (day, first_id, last_id) SELECT ?, min(id), max(id) FROM events",
                (day_of(self._clock()),),
            )

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _create_enrollment_tables(self) -> None:
        """Once per file: a later open must not take back names the operator released."""
        found = self._db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'host_enrollments'"
        ).fetchone()
        if found is None:
            self._db.executescript(f"BEGIN IMMEDIATE; {_ENROLLMENT_SCHEMA} COMMIT;")

    def check_root(self, trust_domain: str, certificate_der: bytes) -> None:
        """Nothing to check: the CA and this file live in the same data folder."""

    def notify_on_change(self, wake: Callable[[], None]) -> bool:
        return False  # this process is the only writer: the server publishes itself

    # ---- ingest ----------------------------------------------------------------------

    def host_state(self, host: str) -> HostState:
        with self._lock:
            row = self._q("SELECT last_seq, last_chain FROM hosts WHERE host = ?", (host,))
        return HostState(_int(row[0][0]), _bytes(row[0][1])) if row else HostState()

    def quarantine(self, host: str, batch: collector_pb2.Batch, reason: str) -> None:
        """Keep a batch that failed verification aside, whole, as evidence.

        It never enters the event table nor moves the host's chain: the
        genuine batch of the same sequences is still stored when it comes.
        """
        with self._lock:
            try:
                self._quarantine(host, batch, reason)
            except sqlite3.Error as exc:
                raise StoreError(f"cannot quarantine a batch of {host}: {exc}") from exc

    def _quarantine(self, host: str, batch: collector_pb2.Batch, reason: str) -> None:
        self._db.execute(
            "INSERT INTO quarantine (host, first_seq, last_seq, received_ns, reason, batch)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                host,
                batch.first_sequence,
                batch.last_sequence,
                self._clock(),
                reason,
                batch.SerializeToString(),
            ),
        )

    def quarantined(self, host: str) -> list[tuple[int, int, str, collector_pb2.Batch]]:
        """(first, last, reason, batch) of each batch of ``host`` kept aside, oldest first."""
        with self._lock:
            rows = self._q(
                "SELECT first_seq, last_seq, reason, batch FROM quarantine WHERE host = ?"
                " ORDER BY id",
                (host,),
            )
        return [
            (_int(a), _int(b), str(r), collector_pb2.Batch.FromString(_bytes(raw)))
            for a, b, r, raw in rows
        ]

    def ingest(self, host: str, events: Sequence[NewEvent], state: HostState | None) -> StoredRows:
        """Store ``events`` (duplicates ignored) and the host's new chain state, atomically.

        Returns what was actually inserted, with cursors, in insert order.
        """
        with self._lock:
            return self._transaction(host, lambda: (events, state, None))

    def ingest_checked(self, host: str, decide: Callable[[HostState], Plan]) -> StoredRows:
        """Read the host's state, decide and store, in one write transaction.

        ``BEGIN IMMEDIATE`` takes SQLite's write lock first, so no other writer of
        the file can move the host's chain between the read and the write.
        """

        def planned() -> tuple[Sequence[NewEvent], HostState | None, Plan | None]:
            row = self._q("SELECT last_seq, last_chain FROM hosts WHERE host = ?", (host,))
            plan = decide(HostState(_int(row[0][0]), _bytes(row[0][1])) if row else HostState())
            return plan.rows, plan.state, plan

        with self._lock:
            return self._transaction(host, planned)

    def _transaction(
        self,
        host: str,
        planned: Callable[[], tuple[Sequence[NewEvent], HostState | None, Plan | None]],
    ) -> StoredRows:
        # A day never goes back here, so each day's cursors follow the last one's.
        day = max(day_of(self._clock()), self._last_day)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                events, state, plan = planned()
                held = plan.quarantine if plan is not None else None
                out = self._insert(events)
                if plan is not None and plan.differs is not None and len(out) < len(events):
                    changed = self._differing(host, events, out.rows)
                    if changed:
                        alerts, held = plan.differs(changed)
                        out = out.joined(self._insert(alerts))
                if held is not None:
                    self._quarantine(host, *held)
                if out:
                    self._db.execute(
                        "INSERT INTO days (day, first_id, last_id) VALUES (?, ?, ?)"
                        " ON CONFLICT (day) DO UPDATE SET last_id = excluded.last_id",
                        (day, out.cursors[0], out.cursors[-1]),
                    )
                seqs = [ne.event.sequence for ne in out.rows if ne.event.sequence]
                if plan is not None and plan.signed is not None and seqs:
                    self._keep_batch(plan.signed, min(seqs), day)
                if state is not None:
                    self._db.execute(
                        "INSERT INTO hosts (host, last_seq, last_chain) VALUES (?, ?, ?)"
                        " ON CONFLICT (host) DO UPDATE SET last_seq = excluded.last_seq,"
                        " last_chain = excluded.last_chain WHERE excluded.last_seq > last_seq",
                        (host, state.last_sequence, state.last_chain),
                    )
                self._db.execute("COMMIT")
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise StoreError(f"cannot store events of {host}: {exc}") from exc
        self._last_day = day
        return out

    def _differing(
        self, host: str, offered: Sequence[NewEvent], inserted: Sequence[NewEvent]
    ) -> list[int]:
        """Sequences of ``offered`` that were not inserted for being stored already,
        and are stored with other bytes."""
        went = {id(ne) for ne in inserted}
        skipped = [ne for ne in offered if ne.event.sequence and id(ne) not in went]
        if not skipped:
            return []
        seqs = [ne.event.sequence for ne in skipped]
        rows = self._db.execute(
            "SELECT boot, seq, data FROM events WHERE host = ? AND seq BETWEEN ? AND ?",
            (host, min(seqs), max(seqs)),
        ).fetchall()
        return differing(skipped, {(str(b), _int(q)): _bytes(d) for b, q, d in rows})

    def _keep_batch(self, signed: SignedBatch, from_seq: int, day: int) -> None:
        self._db.execute(
            "INSERT INTO batches (day, host, first_seq, last_seq, prev_chain, signature, signer,"
            " from_seq, from_chain) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (day, signed.host, *signed.kept_from(from_seq)),
        )

    def _insert(self, events: Sequence[NewEvent]) -> StoredRows:
        """Insert a batch's rows (duplicates ignored); what was inserted, with cursors.

        One executemany for the whole batch: within the write transaction the
        new rows take consecutive ids after the last one, so when every row
        went in, their cursors follow from the last id.  A batch with a
        duplicate (a replay) is inserted row by row instead, to tell which.
        """
        rows = [event_row(ne) for ne in events]
        if not rows:
            return StoredRows((), ())
        before = self._db.total_changes
        self._db.execute("SAVEPOINT batch")
        self._db.executemany(_INSERT, rows)
        if self._db.total_changes - before == len(rows):
            self._db.execute("RELEASE batch")
            last = _int(self._db.execute("SELECT last_insert_rowid()").fetchone()[0])
            return StoredRows(range(last - len(rows) + 1, last + 1), events)
        self._db.execute("ROLLBACK TO batch")
        self._db.execute("RELEASE batch")
        cursors: list[int] = []
        inserted: list[NewEvent] = []
        for ne, row in zip(events, rows, strict=True):
            cur = self._db.execute(_INSERT, row)
            if cur.rowcount == 1 and cur.lastrowid is not None:
                cursors.append(cur.lastrowid)
                inserted.append(ne)
        return StoredRows(cursors, inserted)

    # ---- reading ---------------------------------------------------------------------

    def query(
        self, flt: collector_pb2.EventFilter, after_cursor: int, limit: int
    ) -> list[collector_pb2.StoredEvent]:
        """Stored events matching ``flt`` after ``after_cursor``, in cursor order."""
        where, args = filter_sql(flt)
        where.append("id > ?")
        args.append(after_cursor)
        sql = (
            "SELECT id, verification, data FROM events WHERE "
            + " AND ".join(where)
            + " ORDER BY id LIMIT ?"
        )
        args.append(limit)
        with self._lock:
            rows = self._q(sql, tuple(args))
        return [
            collector_pb2.StoredEvent(
                cursor=_int(r[0]),
                verification=collector_pb2.Verification.ValueType(_int(r[1])),
                event=event_pb2.Event.FromString(_bytes(r[2])),
            )
            for r in rows
        ]

    def first_cursor_since(self, time_ns: int) -> int:
        """The cursor just before the first event at or after ``time_ns``."""
        with self._lock:
            row = self._q("SELECT MIN(id) FROM events WHERE time_ns >= ?", (time_ns,))
            if row and row[0][0] is not None:
                return _int(row[0][0]) - 1
            return self._last_cursor()

    def last_cursor(self) -> int:
        with self._lock:
            return self._last_cursor()

    def _last_cursor(self) -> int:
        row = self._q("SELECT MAX(id) FROM events", ())
        return _int(row[0][0]) if row and row[0][0] is not None else 0

    def count(self, host: str | None = None) -> int:
        with self._lock:
            if host is None:
                return _int(self._q("SELECT COUNT(*) FROM events", ())[0][0])
            return _int(self._q("SELECT COUNT(*) FROM events WHERE host = ?", (host,))[0][0])

    # ---- kept batches and retention --------------------------------------------------

    def stored_batches(self, host: str) -> list[StoredBatch]:
        with self._lock:
            rows = self._q(
                f"SELECT {STORED_BATCH_COLUMNS} FROM batches WHERE host = ? ORDER BY from_seq, id",
                (host,),
            )
        return [StoredBatch.of_row(host, r, _int, _bytes) for r in rows]

    def chain_events(self, host: str) -> Iterator[tuple[int, str, bytes]]:
        after = (0, 0)  # (seq, id): read in pages, not holding the lock between them
        while True:
            with self._lock:
                rows = self._q(
                    "SELECT seq, id, boot, data FROM events WHERE host = ? AND seq IS NOT NULL"
                    " AND (seq > ? OR (seq = ? AND id > ?)) ORDER BY seq, id LIMIT 2000",
                    (host, after[0], after[0], after[1]),
                )
            for seq, i, boot, data in rows:
                yield _int(seq), str(boot), _bytes(data)
                after = (_int(seq), _int(i))
            if len(rows) < 2000:
                return

    def maintain(self, keep_days: int | None) -> list[int]:
        """Drop each expired day: its events by their cursor range, its batches by day.

        SQLite has no partitions: a day goes as one ``DELETE`` of a range of
        row ids (the primary key), one transaction per day, never by scanning
        for old rows.  The file does not shrink; SQLite reuses the pages.
        """
        if keep_days is None:
            return []
        today = day_of(self._clock())
        dropped: list[int] = []
        with self._lock:
            expired = self._q(
                "SELECT day, first_id, last_id FROM days WHERE day < ? ORDER BY day",
                (today - keep_days,),
            )
            try:
                for day, first, last in expired:
                    self._db.execute("BEGIN IMMEDIATE")
                    try:
                        self._db.execute(
                            "DELETE FROM events WHERE id BETWEEN ? AND ?", (first, last)
                        )
                        self._db.execute("DELETE FROM batches WHERE day = ?", (day,))
                        self._db.execute("DELETE FROM days WHERE day = ?", (day,))
                        self._db.execute("COMMIT")
                    except BaseException:
                        if self._db.in_transaction:
                            self._db.execute("ROLLBACK")
                        raise
                    dropped.append(_int(day))
                    _logger.info("store: dropped the events of %s (retention)", day_name(_int(day)))
                # Batches kept aside as evidence follow the same days (few: a DELETE).
                self._db.execute(
                    "DELETE FROM quarantine WHERE received_ns < ?", ((today - keep_days) * DAY_NS,)
                )
            except sqlite3.Error as exc:
                raise StoreError(f"store {self.path}: retention failed: {exc}") from exc
        return dropped

    # ---- join tokens -----------------------------------------------------------------

    def add_join_token(self, token_hash: str, host: str, expires_ns: int) -> None:
        with self._lock:
            try:
                self._db.execute(
                    "INSERT INTO join_tokens (token_hash, host, expires_ns) VALUES (?, ?, ?)",
                    (token_hash, host, expires_ns),
                )
            except sqlite3.Error as exc:
                raise StoreError(f"cannot store join token: {exc}") from exc

    def use_join_token(self, token_hash: str, now_ns: int) -> str | None:
        """Spend a join token: the host it names, or None when unknown, used or expired.

        The host's name is recorded as enrolled in the same transaction.
        """

        def spend() -> str | None:
            rows = self._q(
                "UPDATE join_tokens SET used_ns = ? WHERE token_hash = ? AND used_ns IS NULL"
                " AND expires_ns > ? RETURNING host",
                (now_ns, token_hash, now_ns),
            )
            if not rows:
                return None
            host = str(rows[0][0])
            # An operator's join token is their word for this host: it takes the
            # name whoever held it (a released name included).
            self._q(
                "INSERT INTO host_enrollments (host, via, token_hash, enrolled_ns)"
                " VALUES (?, 'join', ?, ?) ON CONFLICT (host) DO UPDATE SET via = 'join',"
                " token_hash = excluded.token_hash, enrolled_ns = excluded.enrolled_ns",
                (host, token_hash, now_ns),
            )
            return host

        return self._write(spend)

    # ---- bootstrap tokens and host enrollments ---------------------------------------

    def add_bootstrap_token(
        self, token_hash: str, max_uses: int, expires_ns: int, now_ns: int
    ) -> None:
        with self._lock:
            self._q(
                "INSERT INTO bootstrap_tokens (token_hash, max_uses, expires_ns, created_ns)"
                " VALUES (?, ?, ?, ?)",
                (token_hash, max_uses, expires_ns, now_ns),
            )

    def use_bootstrap_token(self, token_hash: str, host: str, now_ns: int) -> BootstrapUse:
        """Count the use and bind the name in one write transaction (see the Store)."""

        def spend() -> BootstrapUse:
            counted = self._q(
                "UPDATE bootstrap_tokens SET uses = uses + 1 WHERE token_hash = ?"
                " AND uses < max_uses AND expires_ns > ? RETURNING uses",
                (token_hash, now_ns),
            )
            if not counted:
                return BootstrapUse.REFUSED_TOKEN
            bound = self._q(
                "INSERT INTO host_enrollments (host, via, token_hash, enrolled_ns)"
                " VALUES (?, 'bootstrap', ?, ?) ON CONFLICT (host) DO UPDATE SET"
                " via = 'bootstrap', token_hash = excluded.token_hash,"
                " enrolled_ns = excluded.enrolled_ns WHERE via = 'released' RETURNING host",
                (host, token_hash, now_ns),
            )
            if not bound:
                raise _NameTaken  # rolls the count back
            return BootstrapUse.ENROLLED

        try:
            return self._write(spend)
        except _NameTaken:
            return BootstrapUse.REFUSED_NAME

    def expire_bootstrap_token(self, token_hash: str, now_ns: int) -> bool:
        with self._lock:
            rows = self._q(
                "UPDATE bootstrap_tokens SET expires_ns = ? WHERE token_hash = ?"
                " AND expires_ns > ? RETURNING token_hash",
                (now_ns, token_hash, now_ns),
            )
        return bool(rows)

    def revoke_host(self, host: str, now_ns: int, release: bool) -> None:
        with self._lock:
            self._q(
                "INSERT INTO host_enrollments (host, via, token_hash, enrolled_ns, revoked_ns)"
                " VALUES (?, ?, '', 0, ?) ON CONFLICT (host) DO UPDATE SET"
                " revoked_ns = excluded.revoked_ns,"
                " via = CASE WHEN ? THEN 'released' ELSE via END",
                (host, "released" if release else "revoked", now_ns, release),
            )

    def host_revoked_ns(self, host: str) -> int | None:
        with self._lock:
            rows = self._q("SELECT revoked_ns FROM host_enrollments WHERE host = ?", (host,))
        return _int(rows[0][0]) if rows and rows[0][0] is not None else None

    def _write(self, fn: Callable[[], T]) -> T:
        """``fn`` in one write transaction (``BEGIN IMMEDIATE``), rolled back if it raises."""
        with self._lock:
            self._q("BEGIN IMMEDIATE", ())
            try:
                out = fn()
            except BaseException:
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise
            self._q("COMMIT", ())
            return out

    def _q(self, sql: str, args: tuple[object, ...]) -> list[tuple[object, ...]]:
        try:
            return list(self._db.execute(sql, args).fetchall())
        except sqlite3.Error as exc:
            raise StoreError(f"store {self.path}: {exc}") from exc


class _NameTaken(Exception):
    """A bootstrap use whose name is taken: raised to roll its count back."""


def filter_sql(flt: collector_pb2.EventFilter) -> tuple[list[str], list[object]]:
    """SQL conditions for an EventFilter (same meaning as :func:`matches`)."""
    where: list[str] = []
    args: list[object] = []
    for column, values in filter_columns(flt):
        where.append(f"{column} IN ({', '.join('?' * len(values))})")
        args.extend(values)
    if flt.start_time_ns:
        where.append("time_ns >= ?")
        args.append(flt.start_time_ns)
    if flt.end_time_ns:
        where.append("time_ns <= ?")
        args.append(flt.end_time_ns)
    return where or ["1"], args
