"""The collector's shared store: one PostgreSQL database for any number of replicas.

How the store's promises (see :mod:`sidecar.collector.store`) hold across replicas:

- exactly once: the unique index on ``(host, boot, seq)`` and ``ON CONFLICT DO
  NOTHING``; whichever replica a replayed batch reaches, it inserts nothing twice;
- one chain writer per host: :meth:`PostgresStore.ingest_checked` locks the
  host's row in ``hosts`` (``SELECT … FOR UPDATE``) before it reads the chain
  state, and holds it until commit, so a second replica with a batch of the same
  host waits and then verifies against what the first one stored;
- the cursor is the global row id, and a reader that has seen id N has seen every
  id below N: ids are drawn and committed under one transaction-scoped advisory
  lock (the *append lock*, taken by the insert and released by the commit), so
  rows become visible in id order.  Verification, TLS and decoding, the bulk of a
  replica's work, stay outside it; only the insert and the commit are serialised;
- new rows are announced with ``NOTIFY`` (delivered at commit) on
  :data:`CHANNEL`; each replica LISTENs and reads them back by cursor;
- a join token is spent by one ``UPDATE … WHERE used_ns IS NULL … RETURNING``.

Lock order is always host row, then append lock, so two transactions never wait
on each other in a cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg

from sidecar.api.v1 import collector_pb2, event_pb2
from sidecar.collector.migrations import APPEND_LOCK, LOCK_CLASS, migrate
from sidecar.collector.store import (
    BootstrapUse,
    HostState,
    NewEvent,
    Plan,
    StoreError,
    filter_columns,
    verdict_of,
)
from sidecar.export.chain import CHAIN_SEED

_logger = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[Any, ...]]

#: LISTEN/NOTIFY channel on which every insert of events is announced.
CHANNEL = "sidecar_events"
CONNECT_TIMEOUT_S = 10
LISTEN_POLL_S = 0.2  # how soon the listener notices close()
LISTEN_BACKOFF_MAX_S = 5.0

_INSERT = (
    "INSERT INTO events (host, boot, seq, time_ns, identity, instance, kind, verdict,"
    " verification, data) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (host, boot, seq) DO NOTHING RETURNING id"
)


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()[:16]


class PostgresStore:
    """Events, chain state, quarantine and join tokens in a shared PostgreSQL database."""

    def __init__(self, dsn: str, connections: int = 4) -> None:
        self._dsn = dsn
        self.threads = connections
        given = psycopg.conninfo.conninfo_to_dict(dsn)
        self._extra: dict[str, Any] = {}
        if "application_name" not in given:
            self._extra["application_name"] = "sidecar-collector"
        if "connect_timeout" not in given:
            self._extra["connect_timeout"] = CONNECT_TIMEOUT_S
        self._where = f"{given.get('host', 'localhost')}/{given.get('dbname', '')}"
        self._free: queue.LifoQueue[Conn] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(connections)
        self._closed = threading.Event()
        self._listener: threading.Thread | None = None
        with self._conn() as conn:
            try:
                migrate(conn)
            except psycopg.Error as exc:
                raise StoreError(f"cannot migrate store {self._where}: {exc}") from exc

    # ---- connections -----------------------------------------------------------------

    def _connect(self) -> Conn:
        try:
            return psycopg.connect(self._dsn, autocommit=True, **self._extra)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to store {self._where}: {exc}") from exc

    @contextlib.contextmanager
    def _conn(self) -> Iterator[Conn]:
        """A pooled connection (autocommit; writers open ``conn.transaction()``)."""
        if self._closed.is_set():
            raise StoreError(f"store {self._where} is closed")
        with self._slots:
            try:
                conn = self._free.get_nowait()
            except queue.Empty:
                conn = self._connect()
            try:
                yield conn
            finally:
                if (
                    conn.closed
                    or conn.broken
                    or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
                    or self._closed.is_set()
                ):
                    conn.close()
                else:
                    self._free.put(conn)

    def _rows(self, sql: str, args: Sequence[object] = ()) -> list[tuple[Any, ...]]:
        with self._conn() as conn:
            try:
                return conn.execute(sql, args).fetchall()
            except psycopg.Error as exc:
                raise StoreError(f"store {self._where}: {exc}") from exc

    def close(self) -> None:
        self._closed.set()
        if self._listener is not None:
            self._listener.join(timeout=LISTEN_POLL_S * 10)
        while True:
            try:
                self._free.get_nowait().close()
            except queue.Empty:
                break

    def check_root(self, trust_domain: str, certificate_der: bytes) -> None:
        # Two statements: the SELECT's snapshot sees a row another replica just committed.
        self._rows(
            "INSERT INTO trust_root (id, trust_domain, certificate) VALUES (1, %s, %s)"
            " ON CONFLICT (id) DO NOTHING RETURNING id",
            (trust_domain, certificate_der),
        )
        td, der = self._rows("SELECT trust_domain, certificate FROM trust_root WHERE id = 1")[0]
        if td != trust_domain or bytes(der) != certificate_der:
            raise StoreError(
                f"store {self._where} belongs to the root CA {_fingerprint(bytes(der))} of"
                f" '{td}', not to this collector's {_fingerprint(certificate_der)} of"
                f" '{trust_domain}': every replica must use the same CA folder"
                " (copy it from the first replica)"
            )

    # ---- change notification --------------------------------------------------------

    def notify_on_change(self, wake: Callable[[], None]) -> bool:
        if self._listener is None:
            self._listener = threading.Thread(
                target=self._listen, args=(wake,), name="collector-pg-listen", daemon=True
            )
            self._listener.start()
        return True

    def _listen(self, wake: Callable[[], None]) -> None:
        """LISTEN on its own connection until close(); reconnect with backoff."""
        backoff = 0.1
        while not self._closed.is_set():
            try:
                with self._connect() as conn:
                    conn.execute(f"LISTEN {CHANNEL}")
                    wake()  # rows stored while no one listened are read back now
                    backoff = 0.1
                    while not self._closed.is_set():
                        for _ in conn.notifies(timeout=LISTEN_POLL_S):
                            wake()
            except (psycopg.Error, StoreError) as exc:
                if self._closed.is_set():
                    return
                _logger.warning("store %s: listening for new events failed: %s", self._where, exc)
                self._closed.wait(backoff)
                backoff = min(backoff * 2, LISTEN_BACKOFF_MAX_S)

    # ---- ingest ----------------------------------------------------------------------

    def host_state(self, host: str) -> HostState:
        rows = self._rows("SELECT last_seq, last_chain FROM hosts WHERE host = %s", (host,))
        return HostState(int(rows[0][0]), bytes(rows[0][1])) if rows else HostState()

    def ingest_checked(
        self, host: str, decide: Callable[[HostState], Plan]
    ) -> list[collector_pb2.StoredEvent]:
        with self._conn() as conn:
            try:
                with conn.transaction():
                    state = self._lock_host(conn, host)
                    plan = decide(state)
                    if plan.quarantine is not None:
                        self._quarantine(conn, host, *plan.quarantine)
                    out = self._insert(conn, plan.rows)
                    if plan.state.last_sequence > state.last_sequence:
                        self._save_state(conn, host, plan.state)
                    return out
            except psycopg.Error as exc:
                raise StoreError(f"cannot store events of {host}: {exc}") from exc

    def ingest(
        self, host: str, events: Sequence[NewEvent], state: HostState | None
    ) -> list[collector_pb2.StoredEvent]:
        with self._conn() as conn:
            try:
                with conn.transaction():
                    before = self._lock_host(conn, host) if state is not None else None
                    out = self._insert(conn, events)
                    if state and before and state.last_sequence > before.last_sequence:
                        self._save_state(conn, host, state)
                    return out
            except psycopg.Error as exc:
                raise StoreError(f"cannot store events of {host}: {exc}") from exc

    @staticmethod
    def _lock_host(conn: Conn, host: str) -> HostState:
        """The host's chain state, its row locked until the transaction ends."""
        conn.execute(
            "INSERT INTO hosts (host, last_seq, last_chain) VALUES (%s, 0, %s)"
            " ON CONFLICT (host) DO NOTHING",
            (host, CHAIN_SEED),
        )
        row = conn.execute(
            "SELECT last_seq, last_chain FROM hosts WHERE host = %s FOR UPDATE", (host,)
        ).fetchone()
        assert row is not None  # inserted above, and rows of hosts are never deleted
        return HostState(int(row[0]), bytes(row[1]))

    @staticmethod
    def _save_state(conn: Conn, host: str, state: HostState) -> None:
        conn.execute(
            "UPDATE hosts SET last_seq = %s, last_chain = %s WHERE host = %s",
            (state.last_sequence, state.last_chain, host),
        )

    @staticmethod
    def _insert(conn: Conn, events: Sequence[NewEvent]) -> list[collector_pb2.StoredEvent]:
        """Insert under the append lock (held to commit: ids become visible in order)."""
        if not events:
            return []
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, APPEND_LOCK))
        params = []
        for ne in events:
            ev = ne.event
            params.append(
                (
                    ev.host,
                    ev.boot_id,
                    ev.sequence or None,
                    ev.time_ns,
                    ev.identity,
                    ev.process.instance_id,
                    ev.WhichOneof("body") or "",
                    verdict_of(ev),
                    int(ne.verification),
                    ne.payload,
                )
            )
        out: list[collector_pb2.StoredEvent] = []
        with conn.cursor() as cur:
            cur.executemany(_INSERT, params, returning=True)
            for ne in events:  # one result per row: its id, or nothing for a duplicate
                row = cur.fetchone()
                if row is not None:
                    out.append(
                        collector_pb2.StoredEvent(
                            cursor=int(row[0]), event=ne.event, verification=ne.verification
                        )
                    )
                cur.nextset()
        if out:
            conn.execute("SELECT pg_notify(%s, '')", (CHANNEL,))
        return out

    def quarantine(self, host: str, batch: collector_pb2.Batch, reason: str) -> None:
        with self._conn() as conn:
            try:
                self._quarantine(conn, host, batch, reason)
            except psycopg.Error as exc:
                raise StoreError(f"cannot quarantine a batch of {host}: {exc}") from exc

    @staticmethod
    def _quarantine(conn: Conn, host: str, batch: collector_pb2.Batch, reason: str) -> None:
        conn.execute(
            "INSERT INTO quarantine (host, first_seq, last_seq, received_ns, reason, batch)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (
                host,
                batch.first_sequence,
                batch.last_sequence,
                time.time_ns(),
                reason,
                batch.SerializeToString(),
            ),
        )

    def quarantined(self, host: str) -> list[tuple[int, int, str, collector_pb2.Batch]]:
        rows = self._rows(
            "SELECT first_seq, last_seq, reason, batch FROM quarantine WHERE host = %s ORDER BY id",
            (host,),
        )
        return [
            (int(a), int(b), str(r), collector_pb2.Batch.FromString(bytes(raw)))
            for a, b, r, raw in rows
        ]

    # ---- reading ---------------------------------------------------------------------

    def query(
        self, flt: collector_pb2.EventFilter, after_cursor: int, limit: int
    ) -> list[collector_pb2.StoredEvent]:
        where, args = filter_sql(flt)
        where.append("id > %s")
        args.append(after_cursor)
        args.append(limit)
        rows = self._rows(
            "SELECT id, verification, data FROM events WHERE "
            + " AND ".join(where)
            + " ORDER BY id LIMIT %s",
            args,
        )
        return [
            collector_pb2.StoredEvent(
                cursor=int(r[0]),
                verification=collector_pb2.Verification.ValueType(int(r[1])),
                event=event_pb2.Event.FromString(bytes(r[2])),
            )
            for r in rows
        ]

    def first_cursor_since(self, time_ns: int) -> int:
        rows = self._rows("SELECT min(id) FROM events WHERE time_ns >= %s", (time_ns,))
        if rows[0][0] is not None:
            return int(rows[0][0]) - 1
        return self.last_cursor()

    def last_cursor(self) -> int:
        rows = self._rows("SELECT max(id) FROM events")
        return int(rows[0][0]) if rows[0][0] is not None else 0

    def count(self, host: str | None = None) -> int:
        if host is None:
            return int(self._rows("SELECT count(*) FROM events")[0][0])
        return int(self._rows("SELECT count(*) FROM events WHERE host = %s", (host,))[0][0])

    # ---- join tokens -----------------------------------------------------------------

    def add_join_token(self, token_hash: str, host: str, expires_ns: int) -> None:
        with self._conn() as conn:
            try:
                conn.execute(
                    "INSERT INTO join_tokens (token_hash, host, expires_ns) VALUES (%s, %s, %s)",
                    (token_hash, host, expires_ns),
                )
            except psycopg.Error as exc:
                raise StoreError(f"cannot store join token: {exc}") from exc

    def use_join_token(self, token_hash: str, now_ns: int) -> str | None:
        """One UPDATE: of two replicas spending the same token at once, one gets the row.

        The host's name is recorded as enrolled in the same transaction.
        """
        with self._conn() as conn:
            try:
                with conn.transaction():
                    row = conn.execute(
                        "UPDATE join_tokens SET used_ns = %s WHERE token_hash = %s"
                        " AND used_ns IS NULL AND expires_ns > %s RETURNING host",
                        (now_ns, token_hash, now_ns),
                    ).fetchone()
                    if row is None:
                        return None
                    host = str(row[0])
                    # An operator's join token is their word for this host: it
                    # takes the name whoever held it (a released name included).
                    conn.execute(
                        "INSERT INTO host_enrollments (host, via, token_hash, enrolled_ns)"
                        " VALUES (%s, 'join', %s, %s) ON CONFLICT (host) DO UPDATE SET"
                        " via = 'join', token_hash = excluded.token_hash,"
                        " enrolled_ns = excluded.enrolled_ns",
                        (host, token_hash, now_ns),
                    )
                    return host
            except psycopg.Error as exc:
                raise StoreError(f"cannot spend join token: {exc}") from exc

    # ---- bootstrap tokens and host enrollments ---------------------------------------

    def add_bootstrap_token(
        self, token_hash: str, max_uses: int, expires_ns: int, now_ns: int
    ) -> None:
        with self._conn() as conn:
            try:
                conn.execute(
                    "INSERT INTO bootstrap_tokens (token_hash, max_uses, expires_ns, created_ns)"
                    " VALUES (%s, %s, %s, %s)",
                    (token_hash, max_uses, expires_ns, now_ns),
                )
            except psycopg.Error as exc:
                raise StoreError(f"cannot store bootstrap token: {exc}") from exc

    def use_bootstrap_token(self, token_hash: str, host: str, now_ns: int) -> BootstrapUse:
        """One transaction: count the use, then bind the name; a taken name undoes the count.

        Replicas racing for a token's last use: the UPDATE of the second waits on
        the first's row lock, then re-reads ``uses`` and matches nothing.  Two
        racing for one name: the second INSERT waits on the first's key, then
        conflicts.
        """
        with self._conn() as conn:
            try:
                with conn.transaction():
                    counted = conn.execute(
                        "UPDATE bootstrap_tokens SET uses = uses + 1 WHERE token_hash = %s"
                        " AND uses < max_uses AND expires_ns > %s RETURNING uses",
                        (token_hash, now_ns),
                    ).fetchone()
                    if counted is None:
                        return BootstrapUse.REFUSED_TOKEN
                    bound = conn.execute(
                        "INSERT INTO host_enrollments (host, via, token_hash, enrolled_ns)"
                        " VALUES (%s, 'bootstrap', %s, %s) ON CONFLICT (host) DO UPDATE SET"
                        " via = 'bootstrap', token_hash = excluded.token_hash,"
                        " enrolled_ns = excluded.enrolled_ns"
                        " WHERE host_enrollments.via = 'released' RETURNING host",
                        (host, token_hash, now_ns),
                    ).fetchone()
                    if bound is not None:
                        return BootstrapUse.ENROLLED
                    raise psycopg.Rollback()  # the use is not counted
                return BootstrapUse.REFUSED_NAME
            except psycopg.Error as exc:
                raise StoreError(f"cannot spend bootstrap token: {exc}") from exc

    def expire_bootstrap_token(self, token_hash: str, now_ns: int) -> bool:
        rows = self._rows(
            "UPDATE bootstrap_tokens SET expires_ns = %s WHERE token_hash = %s"
            " AND expires_ns > %s RETURNING token_hash",
            (now_ns, token_hash, now_ns),
        )
        return bool(rows)

    def revoke_host(self, host: str, now_ns: int, release: bool) -> None:
        with self._conn() as conn:
            try:
                conn.execute(
                    "INSERT INTO host_enrollments (host, via, token_hash, enrolled_ns, revoked_ns)"
                    " VALUES (%s, %s, '', 0, %s) ON CONFLICT (host) DO UPDATE SET"
                    " revoked_ns = excluded.revoked_ns, via = CASE WHEN %s THEN 'released'"
                    " ELSE host_enrollments.via END",
                    (host, "released" if release else "revoked", now_ns, release),
                )
            except psycopg.Error as exc:
                raise StoreError(f"cannot revoke host {host}: {exc}") from exc

    def host_revoked_ns(self, host: str) -> int | None:
        rows = self._rows("SELECT revoked_ns FROM host_enrollments WHERE host = %s", (host,))
        return int(rows[0][0]) if rows and rows[0][0] is not None else None


def filter_sql(flt: collector_pb2.EventFilter) -> tuple[list[str], list[object]]:
    """Conditions for an EventFilter (same meaning as :func:`~.store.matches`).

    One value is compared with ``=`` so that the (column, id) index yields rows
    already in cursor order; several use ``= ANY``.
    """
    where: list[str] = []
    args: list[object] = []
    for column, values in filter_columns(flt):
        if len(values) == 1:
            where.append(f"{column} = %s")
            args.append(values[0])
        else:
            where.append(f"{column} = ANY(%s)")
            args.append(values)
    if flt.start_time_ns:
        where.append("time_ns >= %s")
        args.append(flt.start_time_ns)
    if flt.end_time_ns:
        where.append("time_ns <= %s")
        args.append(flt.end_time_ns)
    return where or ["TRUE"], args
