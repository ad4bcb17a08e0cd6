"""The collector's shared store: one PostgreSQL database for any number of replicas.

How the store's promises (see :mod:`sidecar.collector.store`) hold across replicas:

- exactly once: whichever replica a replayed batch reaches, on whatever day, it
  inserts nothing twice.  ``events`` is partitioned by day and its unique index
  ``(host, boot, seq, day)`` only sees one day; under the host's row lock every
  stored sequence of the host is at or below its stored head, so the sequences
  at or below it are looked up in every partition before the insert;
- retention drops whole day partitions of ``events`` and ``batches`` (each
  batch's signed facts, kept as long as its events) with ``DROP TABLE``;
- one chain writer per host: a batch is stored only on the head it was verified
  against.  A replica that stored the host's previous batch remembers its head
  and stores the next one in one statement (``sidecar_append``, migration 4),
  whose conditional UPDATE of the host's row matches only while the head is
  still that one and holds the row lock to the commit; otherwise (unknown head,
  moved by another replica, a resend) :meth:`PostgresStore.ingest_checked`
  locks the row (``SELECT … FOR UPDATE``), reads the head, decides, and stores
  under that lock;
- the cursor is the global row id, and a reader that has seen id N has seen every
  id below N: writers hold the *append lock* shared from drawing ids to their
  commit, so they insert side by side; every read first waits for a *horizon*
  (``sidecar_horizon``: the lock taken exclusively for an instant, then the
  cursor sequence's value) and reads no further, so a row that commits late
  below it is never skipped;
- new rows are announced with ``NOTIFY`` on :data:`CHANNEL`, after the commit,
  at most every :data:`NOTIFY_GAP_S` per replica; each replica LISTENs and reads
  them back by cursor;
- a join token is spent by one ``UPDATE … WHERE used_ns IS NULL … RETURNING``.

Lock order is always host row, then append lock, so two transactions never wait
on each other in a cycle.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import queue
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import psycopg
import psycopg.adapt
import psycopg.sql

from sidecar.api.v1 import collector_pb2, event_pb2
from sidecar.collector.migrations import LOCK_CLASS, MAINTENANCE_LOCK, migrate
from sidecar.collector.store import (
    DAY_NS,
    STORED_BATCH_COLUMNS,
    BootstrapUse,
    HostState,
    NewEvent,
    Plan,
    StoredBatch,
    StoredRows,
    StoreError,
    day_name,
    day_of,
    differing,
    event_row,
    filter_columns,
)
from sidecar.export.chain import CHAIN_SEED

_logger = logging.getLogger(__name__)

Conn = psycopg.Connection[tuple[Any, ...]]

#: LISTEN/NOTIFY channel on which every insert of events is announced.
CHANNEL = "sidecar_events"
CONNECT_TIMEOUT_S = 10
#: How long a caller waits for a free connection before the store says it is stuck.
POOL_TIMEOUT_S = 30.0
#: Server-side limits set on every session (PostgreSQL enforces them even when
#: this replica is frozen): a transaction left open by a stopped replica ends,
#: and its host row locks with it, instead of blocking every other replica.
IDLE_IN_TRANSACTION_TIMEOUT_S = 30.0
STATEMENT_TIMEOUT_MS = 60_000
#: A call that has not returned after this long is cut off by this replica: its
#: connection's socket is shut, so a database that stopped answering at all (a
#: frozen server, a vanished host) fails the call instead of hanging it.
OPERATION_TIMEOUT_S = 90.0
#: Partitions exist this many days ahead, so that an insert never waits for one.
DAYS_AHEAD = 2
WATCHDOG_INTERVAL_S = 0.5
#: New rows are announced (NOTIFY) at once, then at most this often.
NOTIFY_GAP_S = 0.02
#: Heads of this many hosts are remembered (see PostgresStore._ingest_known).
HEADS_KEPT = 100_000
LISTEN_POLL_S = 0.2  # how soon the listener notices close()
LISTEN_BACKOFF_MAX_S = 5.0

# One call stores a batch (migration 4): the host's head is checked, the kept
# batch and the events inserted, in one statement.  The event columns travel as
# binary arrays, packed here (see _Array): psycopg's own list dumper, element by
# element in Python, cost more than half a millisecond a batch.
_APPEND = (
    "SELECT ids, seqs FROM sidecar_append(%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s,"
    " %s, %b, %b, %b, %b, %b, %b, %b, %b, %b, %b)"
)

_I32 = struct.Struct(">i")
_ARRAY_HEAD = struct.Struct(">iiiii")  # dimensions, has nulls, element type, length, lower bound


class _Array:
    """A one-dimensional PostgreSQL array in its binary wire format (array_send)."""

    __slots__ = ("data",)
    oid = 0  # of the array type

    def __init__(self, data: bytes) -> None:
        self.data = data


class _TextArray(_Array):
    oid = 1009


class _ByteaArray(_Array):
    oid = 1001


class _Int8Array(_Array):
    oid = 1016


class _Int4Array(_Array):
    oid = 1007


class _Int2Array(_Array):
    oid = 1005


class _ArrayDumper(psycopg.adapt.Dumper):
    format = psycopg.pq.Format.BINARY

    def dump(self, obj: Any) -> bytes:
        return bytes(obj.data)


def _array_dumper(cls: type[_Array]) -> type[_ArrayDumper]:
    return type(f"{cls.__name__}Dumper", (_ArrayDumper,), {"oid": cls.oid})


_DUMPERS = [(cls, _array_dumper(cls)) for cls in _Array.__subclasses__()]


def _pack_bytes(element_oid: int, items: Sequence[bytes]) -> bytes:
    if not items:
        return _ARRAY_HEAD.pack(0, 0, element_oid, 0, 0)[:12]
    parts = [_ARRAY_HEAD.pack(1, 0, element_oid, len(items), 1)]
    for b in items:
        parts.append(_I32.pack(len(b)))
        parts.append(b)
    return b"".join(parts)


def _pack_ints(element_oid: int, fmt: str, items: Sequence[int | None]) -> bytes:
    if not items:
        return _ARRAY_HEAD.pack(0, 0, element_oid, 0, 0)[:12]
    size = struct.calcsize(fmt)
    if None not in items:
        body = struct.pack(">" + ("i" + fmt) * len(items), *[x for v in items for x in (size, v)])
        return _ARRAY_HEAD.pack(1, 0, element_oid, len(items), 1) + body
    one = struct.Struct(">i" + fmt)
    parts = [_ARRAY_HEAD.pack(1, 1, element_oid, len(items), 1)]
    for v in items:
        parts.append(_I32.pack(-1) if v is None else one.pack(size, v))
    return b"".join(parts)


def _event_arrays(events: Sequence[NewEvent]) -> list[_Array]:
    """The ten event columns of :func:`event_row`, as binary arrays."""
    cols: list[list[Any]] = [[] for _ in range(10)]
    for ne in events:
        for col, value in zip(cols, event_row(ne), strict=True):
            col.append(value)
    hosts, boots, seqs, times, idents, instances, kinds, verdicts, verifs, data = cols
    return [
        _TextArray(_pack_bytes(25, [x.encode() for x in hosts])),
        _TextArray(_pack_bytes(25, [x.encode() for x in boots])),
        _Int8Array(_pack_ints(20, "q", seqs)),
        _Int8Array(_pack_ints(20, "q", times)),
        _TextArray(_pack_bytes(25, [x.encode() for x in idents])),
        _TextArray(_pack_bytes(25, [x.encode() for x in instances])),
        _TextArray(_pack_bytes(25, [x.encode() for x in kinds])),
        _Int4Array(_pack_ints(23, "i", verdicts)),
        _Int2Array(_pack_ints(21, "h", verifs)),
        _ByteaArray(_pack_bytes(17, data)),
    ]


def _fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()[:16]


def _after(state: HostState, plan: Plan) -> HostState:
    """The host's head once ``plan`` is stored on ``state`` (it only moves forward)."""
    return plan.state if plan.state.last_sequence > state.last_sequence else state


class PostgresStore:
    """Events, chain state, quarantine and join tokens in a shared PostgreSQL database."""

    def __init__(
        self,
        dsn: str,
        connections: int = 4,
        clock: Callable[[], int] = time.time_ns,
        pool_timeout_s: float = POOL_TIMEOUT_S,
        operation_timeout_s: float = OPERATION_TIMEOUT_S,
        idle_in_transaction_timeout_s: float = IDLE_IN_TRANSACTION_TIMEOUT_S,
    ) -> None:
        self._dsn = dsn
        self.threads = connections
        self._clock = clock  # the day a row is stored on comes from it
        self._pool_timeout_s = pool_timeout_s
        self._operation_timeout_s = operation_timeout_s
        # Connections in use and when each call on them must have returned.
        self._busy: dict[int, tuple[Conn, float]] = {}
        self._busy_lock = threading.Lock()
        self._watchdog: threading.Thread | None = None
        self._cut: set[int] = set()
        given = psycopg.conninfo.conninfo_to_dict(dsn)
        self._extra: dict[str, Any] = {}
        if "application_name" not in given:
            self._extra["application_name"] = "sidecar-collector"
        if "connect_timeout" not in given:
            self._extra["connect_timeout"] = CONNECT_TIMEOUT_S
        # TCP keepalives notice a database host that vanished (no effect on a unix
        # socket); the server-side timeouts go before the DSN's own options.
        if "keepalives_idle" not in given:
            self._extra.update(
                keepalives=1, keepalives_idle=10, keepalives_interval=5, keepalives_count=3
            )
        self._extra["options"] = (
            f"-c idle_in_transaction_session_timeout={int(idle_in_transaction_timeout_s * 1000)}"
            f" -c statement_timeout={STATEMENT_TIMEOUT_MS} {given.get('options', '')}"
        ).strip()  # the DSN's own options last: a setting given there wins
        self._where = f"{given.get('host', 'localhost')}/{given.get('dbname', '')}"
        self._free: queue.LifoQueue[Conn] = queue.LifoQueue()
        self._slots = threading.BoundedSemaphore(connections)
        self._closed = threading.Event()
        self._listener: threading.Thread | None = None
        self._heads: dict[str, HostState] = {}
        self._notify_wanted = threading.Event()
        self._notifier: threading.Thread | None = None
        with self._conn(timeout_s=None) as conn:
            try:
                conn.execute("SET statement_timeout = 0")  # a migration may rewrite a table
                migrate(conn)
                conn.execute("RESET statement_timeout")
            except psycopg.Error as exc:
                raise StoreError(f"cannot migrate store {self._where}: {exc}") from exc
        self.maintain(None)

    # ---- connections -----------------------------------------------------------------

    def _connect(self) -> Conn:
        try:
            conn = psycopg.connect(self._dsn, autocommit=True, **self._extra)
        except psycopg.Error as exc:
            raise StoreError(f"cannot connect to store {self._where}: {exc}") from exc
        for cls, dumper in _DUMPERS:
            conn.adapters.register_dumper(cls, dumper)
        return conn

    @contextlib.contextmanager
    def _conn(self, timeout_s: float | None = -1.0) -> Iterator[Conn]:
        """A pooled connection (autocommit; writers open ``conn.transaction()``).

        The caller must be done with it within ``timeout_s`` (default: the store's
        operation timeout; None: no limit, for migrations and long reads), or the
        watchdog cuts the connection and the call fails with a StoreError.
        """
        if timeout_s is not None and timeout_s < 0:
            timeout_s = self._operation_timeout_s
        if self._closed.is_set():
            raise StoreError(f"store {self._where} is closed")
        if not self._slots.acquire(timeout=self._pool_timeout_s):
            raise StoreError(
                f"store {self._where}: no database connection came free in"
                f" {self._pool_timeout_s:g} s (is the database stuck?)"
            )
        try:
            try:
                conn = self._free.get_nowait()
            except queue.Empty:
                conn = self._connect()
            if timeout_s is not None:
                self._watch(conn, timeout_s)
            try:
                yield conn
            except Exception as exc:  # psycopg's error, or the StoreError made of it
                if self._was_cut(conn):
                    raise StoreError(
                        f"store {self._where}: no answer in {timeout_s:g} s, connection cut"
                    ) from exc
                raise
            finally:
                with self._busy_lock:
                    self._busy.pop(id(conn), None)
                if (
                    conn.closed
                    or conn.broken
                    or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE
                    or self._closed.is_set()
                ):
                    conn.close()
                else:
                    self._free.put(conn)
        finally:
            self._slots.release()

    def _watch(self, conn: Conn, timeout_s: float) -> None:
        with self._busy_lock:
            self._busy[id(conn)] = (conn, time.monotonic() + timeout_s)
            if self._watchdog is None:
                self._watchdog = threading.Thread(
                    target=self._cut_overdue, name="collector-pg-watchdog", daemon=True
                )
                self._watchdog.start()

    def _cut_overdue(self) -> None:
        """Shut the socket of each connection whose call is overdue (libpq then fails it).

        Server-side timeouts cannot help when the server itself stopped answering;
        this works from this side whatever the server does.
        """
        while not self._closed.wait(WATCHDOG_INTERVAL_S):
            now = time.monotonic()
            with self._busy_lock:
                overdue = [c for c, deadline in self._busy.values() if deadline <= now]
                for c in overdue:
                    self._busy.pop(id(c), None)
                    self._cut.add(id(c))
            for c in overdue:
                _logger.warning("store %s: a call got no answer in time: cutting it", self._where)
                with contextlib.suppress(OSError, psycopg.Error):
                    fd = os.dup(c.pgconn.socket)
                    with socket.socket(fileno=fd) as sock:
                        sock.shutdown(socket.SHUT_RDWR)

    def _was_cut(self, conn: Conn) -> bool:
        with self._busy_lock:
            if id(conn) in self._cut:
                self._cut.discard(id(conn))
                return True
        return False

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
        if self._notifier is not None:
            self._notify_wanted.set()
            self._notifier.join(timeout=LISTEN_POLL_S * 10)
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

    def _announce(self) -> None:
        """Rows were stored: NOTIFY every replica's listener, at once when none was
        sent lately, else once at the end of :data:`NOTIFY_GAP_S` for all of them.

        Not from the storing transaction: a NOTIFY there takes a lock, at commit,
        that every notifying commit of the database waits for in turn, and wakes
        every listener for every batch.
        """
        self._notify_wanted.set()
        if self._notifier is None:
            with self._busy_lock:
                if self._notifier is None:
                    self._notifier = threading.Thread(
                        target=self._notify_loop, name="collector-pg-notify", daemon=True
                    )
                    self._notifier.start()

    def _notify_loop(self) -> None:
        while not self._closed.is_set():
            if not self._notify_wanted.wait(LISTEN_POLL_S):
                continue
            self._notify_wanted.clear()
            if self._closed.is_set():
                return
            try:
                self._rows("SELECT pg_notify(%s, '')", (CHANNEL,))
            except StoreError as exc:  # listeners read again each second anyway
                _logger.warning("store %s: announcing new events failed: %s", self._where, exc)
            self._closed.wait(NOTIFY_GAP_S)

    # ---- ingest ----------------------------------------------------------------------

    def host_state(self, host: str) -> HostState:
        rows = self._rows("SELECT last_seq, last_chain FROM hosts WHERE host = %s", (host,))
        return HostState(int(rows[0][0]), bytes(rows[0][1])) if rows else HostState()

    def ingest_checked(
        self, host: str, decide: Callable[[HostState], Plan], head_holds: bool = True
    ) -> Sequence[collector_pb2.StoredEvent]:
        """See :meth:`Store.ingest_checked`.  ``head_holds`` False: the caller stores
        events without moving the host's head past them, so none is taken as new
        for being above the head (every sequence is looked up)."""
        day = day_of(self._clock())
        for attempt in (1, 2):
            try:
                if head_holds:
                    stored = self._ingest_known(host, decide, day)
                    if stored is not None:
                        return stored
                return self._ingest_once(host, decide, day, head_holds)
            except psycopg.errors.CheckViolation as exc:
                # "no partition of relation ... found for row": the day's partition
                # is made ahead of need, so only a clock that jumped gets here.
                if attempt == 2 or "no partition" not in str(exc):
                    raise StoreError(f"cannot store events of {host}: {exc}") from exc
                self._ensure_days([day])
            except psycopg.Error as exc:
                raise StoreError(f"cannot store events of {host}: {exc}") from exc
        raise AssertionError("unreachable")

    def _remember(self, host: str, state: HostState | None) -> None:
        """The host's head as this replica last stored or read it (None: forget it)."""
        if state is None:
            self._heads.pop(host, None)
            return
        if len(self._heads) >= HEADS_KEPT and host not in self._heads:
            self._heads.clear()  # a cache: forgetting costs one locked round trip a host
        self._heads[host] = state

    def _ingest_known(
        self, host: str, decide: Callable[[HostState], Plan], day: int
    ) -> Sequence[collector_pb2.StoredEvent] | None:
        """One round trip, when this replica knows the host's head: decide on it, and
        store in one statement that first checks, under the host's row lock, that
        the head is still that one.  None (nothing stored) when it is not known,
        has moved, or the batch is not plainly new (a resend, a quarantine): the
        caller then takes the locked path."""
        known = self._heads.get(host)
        if known is None:
            return None
        plan = decide(known)
        rows = plan.rows
        if plan.quarantine is not None or any(
            0 < ne.event.sequence <= known.last_sequence for ne in rows
        ):
            return None
        try:
            with self._conn() as conn:
                got = conn.execute(_APPEND, self._append_args(host, known, plan, rows, day, True))
                ids, seqs = got.fetchone() or (None, None)
        except psycopg.errors.UniqueViolation:
            # Only a head that did not hold its promise gets here (a caller stored
            # events above it): the locked path looks every sequence up.
            self._remember(host, None)
            return None
        except BaseException:
            self._remember(host, None)
            raise
        if ids is None:  # another replica moved the head
            self._remember(host, None)
            return None
        self._remember(host, _after(known, plan))
        return self._inserted(ids, seqs, rows)

    def _ingest_once(
        self, host: str, decide: Callable[[HostState], Plan], day: int, head_holds: bool
    ) -> Sequence[collector_pb2.StoredEvent]:
        """One transaction, in three round trips at most (pipeline mode).

        1. lock the host's row and read its chain state;
        2. only for a resend overlapping what is stored: which of its sequences are;
        3. everything else, the commit included: sidecar_append holds the append
           lock for one multi-row INSERT, to the commit, with no client round trip.
        """
        self._remember(host, None)
        with self._conn() as conn:
            with conn.pipeline() as pipe, conn.transaction():
                state = self._lock_host(conn, host, pipe)
                plan = decide(state)
                head = state.last_sequence if head_holds else 1 << 62
                rows, changed = self._new_rows(conn, host, plan.rows, head, pipe)
                held = plan.quarantine
                if changed and plan.differs is not None:
                    alerts, held = plan.differs(changed)
                    rows = [*alerts, *rows]
                if held is not None:
                    self._quarantine(conn, host, *held, self._clock())
                cur = conn.execute(_APPEND, self._append_args(host, state, plan, rows, day, False))
            ids, seqs = cur.fetchone() or (None, None)
        if ids is None:  # the row was locked and read in this very transaction
            raise AssertionError(f"the head of {host} moved under its lock")
        if head_holds:  # else events above the head may be stored: none is plainly new
            self._remember(host, _after(state, plan))
        return self._inserted(ids, seqs, rows)

    @staticmethod
    def _append_args(
        host: str,
        state: HostState,
        plan: Plan,
        rows: Sequence[NewEvent],
        day: int,
        new_only: bool,
    ) -> tuple[object, ...]:
        """sidecar_append's arguments: expected and new head, kept batch, event columns."""
        new = plan.state if plan.state.last_sequence > state.last_sequence else state
        seqs = [ne.event.sequence for ne in rows if ne.event.sequence]
        signed = plan.signed if seqs else None
        batch: tuple[object, ...] = (None,) * 7
        if signed is not None:
            batch = signed.kept_from(min(seqs))
        head = (state.last_sequence, state.last_chain, new.last_sequence, new.last_chain)
        return (host, *head, day, new_only, *batch, *_event_arrays(rows))

    def ingest(
        self, host: str, events: Sequence[NewEvent], state: HostState | None
    ) -> Sequence[collector_pb2.StoredEvent]:
        return self.ingest_checked(
            host, lambda before: Plan(events, state or before), head_holds=state is not None
        )

    @staticmethod
    def _lock_host(conn: Conn, host: str, pipe: psycopg.Pipeline | None = None) -> HostState:
        """The host's chain state, its row locked until the transaction ends.

        In pipeline mode, a Sync (not only a flush) ends the round trip: only then
        is the session "idle in transaction" for the server, whose timeout ends the
        transaction of a replica that froze here, holding the host's lock.
        """
        conn.execute(
            "INSERT INTO hosts (host, last_seq, last_chain) VALUES (%s, 0, %s)"
            " ON CONFLICT (host) DO NOTHING",
            (host, CHAIN_SEED),
        )
        cur = conn.execute(
            "SELECT last_seq, last_chain FROM hosts WHERE host = %s FOR UPDATE", (host,)
        )
        if pipe is not None:
            pipe.sync()
        row = cur.fetchone()
        assert row is not None  # inserted above, and rows of hosts are never deleted
        return HostState(int(row[0]), bytes(row[1]))

    @staticmethod
    def _new_rows(
        conn: Conn,
        host: str,
        rows: Sequence[NewEvent],
        head: int,
        pipe: psycopg.Pipeline | None = None,
    ) -> tuple[Sequence[NewEvent], list[int]]:
        """``rows`` without the events already stored, whatever day they were stored on;
        and the sequences among those stored with other bytes than ``rows`` hold.

        Under the host's row lock every stored event of the host has a sequence
        at or below ``head``: those above it are new without asking.  Those at or
        below (a resend after a failover, a late batch) are looked up in every
        day's partition, as the unique index, which must hold the day, cannot.
        """
        old = [ne.event for ne in rows if 0 < ne.event.sequence <= head]
        if not old:
            return rows, []
        cur = conn.execute(
            "SELECT boot, seq, data FROM events WHERE host = %s AND boot = ANY(%s)"
            " AND seq BETWEEN %s AND %s",
            (
                host,
                sorted({e.boot_id for e in old}),
                min(e.sequence for e in old),
                max(e.sequence for e in old),
            ),
        )
        if pipe is not None:
            pipe.sync()  # as in _lock_host
        stored = {(str(b), int(q)): bytes(d) for b, q, d in cur.fetchall()}
        new = [
            ne
            for ne in rows
            if not ne.event.sequence or (ne.event.boot_id, ne.event.sequence) not in stored
        ]
        return new, differing(rows, stored)

    def _inserted(
        self, ids: Sequence[int], seqs: Sequence[int | None], events: Sequence[NewEvent]
    ) -> Sequence[collector_pb2.StoredEvent]:
        """What went in, with cursors, in insert order (a same-day duplicate is skipped)."""
        if not ids:
            return []
        self._announce()
        if len(ids) == len(events):
            return StoredRows(ids, events)
        kept: list[NewEvent] = []
        k = 0
        for ne in events:  # the returned rows are the inserted ones, in input order
            if k < len(ids) and (seqs[k] or 0) == ne.event.sequence:
                kept.append(ne)
                k += 1
        return StoredRows(ids, kept)

    def quarantine(self, host: str, batch: collector_pb2.Batch, reason: str) -> None:
        with self._conn() as conn:
            try:
                self._quarantine(conn, host, batch, reason, self._clock())
            except psycopg.Error as exc:
                raise StoreError(f"cannot quarantine a batch of {host}: {exc}") from exc

    @staticmethod
    def _quarantine(
        conn: Conn, host: str, batch: collector_pb2.Batch, reason: str, now_ns: int
    ) -> None:
        conn.execute(
            "INSERT INTO quarantine (host, first_seq, last_seq, received_ns, reason, batch)"
            " VALUES (%s, %s, %s, %s, %s, %s)",
            (
                host,
                batch.first_sequence,
                batch.last_sequence,
                now_ns,
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

    def horizon(self) -> int:
        """The highest cursor below which no row can appear any more.

        Writers insert side by side and may commit out of cursor order (see
        migration 4); sidecar_horizon waits for every writer that drew a cursor
        to end.  A read that starts after it sees every row up to it.
        """
        return int(self._rows("SELECT sidecar_horizon()")[0][0])

    def query(
        self, flt: collector_pb2.EventFilter, after_cursor: int, limit: int
    ) -> list[collector_pb2.StoredEvent]:
        where, args = filter_sql(flt)
        where.append("id > %s AND id <= %s")
        args.extend((after_cursor, self.horizon(), limit))
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
        # The subquery is a fence: without it the planner may answer min(id) by
        # walking the id index from the oldest row until one is recent enough,
        # which reads nearly the whole table when time_ns is recent.  This reads
        # the events at or after time_ns only, from the (time_ns) INCLUDE (id) index.
        # Rows above the horizon come later to whoever starts below it.
        settled = self.horizon()
        rows = self._rows(
            "SELECT min(id) FROM (SELECT id FROM events WHERE time_ns >= %s AND id <= %s"
            " OFFSET 0) AS since",
            (time_ns, settled),
        )
        if rows[0][0] is not None:
            return int(rows[0][0]) - 1
        return settled

    def last_cursor(self) -> int:
        """The horizon: every row up to it is there, and none will appear below it."""
        return self.horizon()

    def count(self, host: str | None = None) -> int:
        if host is None:
            return int(self._rows("SELECT count(*) FROM events")[0][0])
        return int(self._rows("SELECT count(*) FROM events WHERE host = %s", (host,))[0][0])

    # ---- kept batches and retention --------------------------------------------------

    def stored_batches(self, host: str) -> list[StoredBatch]:
        rows = self._rows(
            f"SELECT {STORED_BATCH_COLUMNS} FROM batches WHERE host = %s ORDER BY from_seq, id",
            (host,),
        )
        return [StoredBatch.of_row(host, r) for r in rows]

    def chain_events(self, host: str) -> Iterator[tuple[int, str, bytes]]:
        with self._conn(timeout_s=None) as conn:  # as long as the caller reads
            try:
                with conn.transaction(), conn.cursor(name="chain_events") as cur:
                    cur.itersize = 2000
                    cur.execute(
                        "SELECT seq, boot, data FROM events WHERE host = %s AND seq IS NOT NULL"
                        " ORDER BY seq, id",
                        (host,),
                    )
                    for seq, boot, data in cur:
                        yield int(seq), str(boot), bytes(data)
            except psycopg.Error as exc:
                raise StoreError(f"store {self._where}: {exc}") from exc

    def _partitions(self, conn: Conn) -> dict[str, list[int]]:
        """Days that have a partition, by table (events, batches)."""
        out: dict[str, list[int]] = {"events": [], "batches": []}
        for parent, bound in conn.execute(
            "SELECT p.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent"
            " WHERE p.relname IN ('events', 'batches')"
            " AND p.relnamespace = 'public'::regnamespace"
        ).fetchall():
            # "FOR VALUES FROM (20786) TO (20787)": one day each, as made below.
            # A partition another replica is dropping right now has no bound any more.
            if bound is None or "(" not in str(bound):
                continue
            low = str(bound).split("(", 1)[1].split(")", 1)[0]
            out[str(parent)].append(int(low))
        return out

    def _ensure_days(self, days: Sequence[int]) -> None:
        """Make the partitions of ``days`` that do not exist yet (any replica may, at once)."""
        with self._conn() as conn, conn.transaction():
            # Replicas doing this at once take turns; each makes only what is missing.
            conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, MAINTENANCE_LOCK))
            conn.execute("SET LOCAL lock_timeout = '10s'")
            have = self._partitions(conn)
            for table in ("events", "batches"):
                for day in sorted(set(days) - set(have[table])):
                    conn.execute(
                        psycopg.sql.SQL(
                            "CREATE TABLE {} PARTITION OF {} FOR VALUES FROM ({}) TO ({})"
                        ).format(
                            psycopg.sql.Identifier(f"{table}_{day_name(day)}"),
                            psycopg.sql.Identifier(table),
                            psycopg.sql.Literal(day),
                            psycopg.sql.Literal(day + 1),
                        )
                    )
                    _logger.info("store: made partition %s_%s", table, day_name(day))

    def maintain(self, keep_days: int | None) -> list[int]:
        """Make the partitions of today and the next days; drop days past ``keep_days``.

        Dropping takes the maintenance lock without waiting: when another
        replica holds it, it is doing this very work, and this one skips.  Each
        day goes in its own transaction, its events and batches together, as
        whole tables (DROP TABLE), never row by row.
        """
        today = day_of(self._clock())
        try:
            self._ensure_days(range(today, today + DAYS_AHEAD + 1))
            if keep_days is None:
                return []
            dropped: list[int] = []
            with self._conn() as conn:
                have = self._partitions(conn)
                expired = sorted(
                    {d for days in have.values() for d in days if d < today - keep_days}
                )
                for day in expired:
                    with conn.transaction():
                        got = conn.execute(
                            "SELECT pg_try_advisory_xact_lock(%s, %s)",
                            (LOCK_CLASS, MAINTENANCE_LOCK),
                        ).fetchone()
                        if not got or not got[0]:
                            return dropped  # another replica is at it
                        # DROP waits for running queries of the table; not for long
                        # (holding back every insert meanwhile): else the next round.
                        conn.execute("SET LOCAL lock_timeout = '2s'")
                        gone = 0
                        for table in ("events", "batches"):
                            name = f"{table}_{day_name(day)}"
                            # Another replica may have dropped it since the list was read.
                            there = conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()
                            if there is None or there[0] is None:
                                continue
                            conn.execute(
                                psycopg.sql.SQL("DROP TABLE {}").format(
                                    psycopg.sql.Identifier(name)
                                )
                            )
                            gone += 1
                    if not gone:
                        continue
                    dropped.append(day)
                    _logger.info("store: dropped the events of %s (retention)", day_name(day))
                # Batches kept aside as evidence follow the same days.  They are
                # few (each is an attack or a fault), so a DELETE is enough.
                conn.execute(
                    "DELETE FROM quarantine WHERE received_ns < %s",
                    ((today - keep_days) * DAY_NS,),
                )
            return dropped
        except psycopg.Error as exc:
            raise StoreError(f"store {self._where}: partition maintenance failed: {exc}") from exc

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
