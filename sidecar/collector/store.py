"""The collector's store: one interface, two engines behind it.

- :class:`~sidecar.collector.sqlite_store.SqliteStore` (the default): one file in
  the data folder, for one collector on one machine and for ``make demo``;
- :class:`~sidecar.collector.postgres_store.PostgresStore` (``store:
  postgresql://…``): one database that any number of collector replicas share.

What both promise, and the server relies on:

- exactly once: a replayed ``(host, boot, seq)`` is a no-op, on whatever day it
  comes (PostgreSQL's unique index holds the day partition, so there the host's
  stored head, read under its lock, says which sequences to look up first);
- each stored batch's signed facts are kept as long as the events it stored,
  and whole days are dropped together (:meth:`Store.maintain`);
- a host's chain is extended by one writer at a time: :meth:`Store.ingest_checked`
  reads the host's chain state, lets the caller decide what to store from it, and
  stores that, all under the host's lock in one transaction;
- the cursor is the global row id, and "after cursor N" never skips nor
  repeats a row, on any replica: SQLite commits rows in id order (one
  writer); PostgreSQL's replicas may commit out of id order, so its reads go
  up to a cursor below which no row can appear any more (its horizon);
- a join token is spent once (one atomic update); a bootstrap token is spent at
  most its number of uses, each for a host name no enrollment has taken yet
  (one atomic update and one insert, in one transaction).

All methods block; the server calls them from its database worker threads
(:attr:`Store.threads` of them).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol, overload

from sidecar.api.v1 import collector_pb2, event_pb2
from sidecar.export.chain import CHAIN_SEED
from sidecar.util.errors import SidecarError

if TYPE_CHECKING:
    from sidecar.collector.config import CollectorConfig


class StoreError(SidecarError):
    """The collector's database failed."""


@dataclass(frozen=True)
class HostState:
    """Highest stored sequence of a host and the chain hash after it."""

    last_sequence: int = 0
    last_chain: bytes = CHAIN_SEED


@dataclass(frozen=True)
class NewEvent:
    """An event to store: its exact bytes when a host sent it, for the hash chain."""

    event: event_pb2.Event
    payload: bytes
    verification: collector_pb2.Verification.ValueType


class StoredRows(Sequence[collector_pb2.StoredEvent]):
    """What one transaction inserted: each row's cursor and event, read as StoredEvents.

    A StoredEvent holds a copy of its event, which costs more than the row's
    insert; only live subscribers read them, and most batches have none, so
    the StoredEvents are made when first read (once, then kept).
    """

    __slots__ = ("_made", "cursors", "rows")

    def __init__(self, cursors: Sequence[int], rows: Sequence[NewEvent]) -> None:
        if len(cursors) != len(rows):
            raise ValueError(f"{len(cursors)} cursors for {len(rows)} rows")
        self.cursors = cursors
        self.rows = rows
        self._made: list[collector_pb2.StoredEvent] | None = None

    def _all(self) -> list[collector_pb2.StoredEvent]:
        if self._made is None:
            self._made = [
                collector_pb2.StoredEvent(
                    cursor=cursor, event=row.event, verification=row.verification
                )
                for cursor, row in zip(self.cursors, self.rows, strict=True)
            ]
        return self._made

    def __len__(self) -> int:
        return len(self.rows)

    def joined(self, more: StoredRows) -> StoredRows:
        """These rows, then ``more`` (inserted after them in the same transaction)."""
        if not more.rows:
            return self
        return StoredRows([*self.cursors, *more.cursors], [*self.rows, *more.rows])

    @overload
    def __getitem__(self, index: int) -> collector_pb2.StoredEvent: ...

    @overload
    def __getitem__(self, index: slice) -> list[collector_pb2.StoredEvent]: ...

    def __getitem__(
        self, index: int | slice
    ) -> collector_pb2.StoredEvent | list[collector_pb2.StoredEvent]:
        return self._all()[index]

    def __iter__(self) -> Iterator[collector_pb2.StoredEvent]:
        return iter(self._all())


@dataclass(frozen=True)
class SignedBatch:
    """What a host signed for one batch, kept as long as the events it stored.

    With the events' stored bytes this is enough to check the batch again
    later: re-chain the events from the hash before the first one this batch
    stored, and check the signature over the result (see
    :func:`sidecar.collector.verify.verify_stored_chain`).
    """

    host: str
    first_sequence: int
    last_sequence: int
    prev_chain: bytes
    #: The chain hash after each of the batch's events (computed when it arrived).
    chains: Sequence[bytes]
    signature: bytes
    #: The signing key (SubjectPublicKeyInfo, DER): host keys change at renewal.
    signer: bytes

    def chain_before(self, sequence: int) -> bytes:
        """The chain hash just before ``sequence`` (one of this batch's)."""
        if sequence == self.first_sequence:
            return self.prev_chain
        return self.chains[sequence - self.first_sequence - 1]

    def kept_from(self, from_seq: int) -> tuple[int, int, bytes, bytes, bytes, int, bytes]:
        """The ``batches`` row's first_seq .. from_chain, when the batch stored its
        events from ``from_seq`` on (both stores keep these columns in this order)."""
        return (
            self.first_sequence,
            self.last_sequence,
            self.prev_chain,
            self.signature,
            self.signer,
            from_seq,
            self.chain_before(from_seq),
        )


@dataclass(frozen=True)
class StoredBatch:
    """A batch as kept: its signed facts and where its own new events start."""

    host: str
    first_sequence: int
    last_sequence: int
    prev_chain: bytes
    signature: bytes
    signer: bytes
    #: The first sequence this batch stored (later than first_sequence when a
    #: resend overlapped what was stored), and the chain hash just before it.
    from_sequence: int
    from_chain: bytes
    day: int

    @classmethod
    def of_row(
        cls,
        host: str,
        row: Sequence[object],
        as_int: Callable[[object], int] = int,  # type: ignore[assignment]
        as_bytes: Callable[[object], bytes] = bytes,  # type: ignore[assignment]
    ) -> StoredBatch:
        """The batch a row of :data:`STORED_BATCH_COLUMNS` holds."""
        first, last, prev, signature, signer, from_seq, from_chain, day = row
        return cls(
            host=host,
            first_sequence=as_int(first),
            last_sequence=as_int(last),
            prev_chain=as_bytes(prev),
            signature=as_bytes(signature),
            signer=as_bytes(signer),
            from_sequence=as_int(from_seq),
            from_chain=as_bytes(from_chain),
            day=as_int(day),
        )


#: The columns of a kept batch, in the order :meth:`StoredBatch.of_row` reads them.
STORED_BATCH_COLUMNS = (
    "first_seq, last_seq, prev_chain, signature, signer, from_seq, from_chain, day"
)


@dataclass(frozen=True)
class Plan:
    """What to store for one batch, decided from the host's current chain state."""

    rows: Sequence[NewEvent]
    state: HostState
    # A batch kept aside whole (as evidence), and why; None for none.
    quarantine: tuple[collector_pb2.Batch, str] | None = None
    # The signed batch the rows come from, kept with them while any was new.
    signed: SignedBatch | None = None
    # Called, in the same transaction, with the sequences of ``rows`` that are
    # stored already with other bytes (the host sent two events for one
    # sequence): returns the alert rows to store and the batch to keep aside,
    # with why.  The stored events stay; None: not checked.
    differs: Callable[[list[int]], Differs] | None = None


#: What a batch resent with other bytes is stored as: alert rows, and the batch
#: kept aside (quarantine) with the reason.
Differs = tuple[Sequence[NewEvent], tuple[collector_pb2.Batch, str]]


def differing(rows: Sequence[NewEvent], stored: dict[tuple[str, int], bytes]) -> list[int]:
    """Sequences of ``rows`` that ``stored`` ((boot, seq) -> bytes) holds with other bytes."""
    out = []
    for ne in rows:
        seq = ne.event.sequence
        if seq:
            have = stored.get((ne.event.boot_id, seq))
            if have is not None and have != ne.payload:
                out.append(seq)
    return out


DAY_NS = 86_400 * 1_000_000_000


def day_of(time_ns: int) -> int:
    """Days since 1970-01-01 (UTC): the unit of retention."""
    return time_ns // DAY_NS


def day_name(day: int) -> str:
    """``20261129`` for the day ``day`` (partition and report names)."""
    import datetime

    return (datetime.date(1970, 1, 1) + datetime.timedelta(days=day)).strftime("%Y%m%d")


class BootstrapUse(Enum):
    """What spending a bootstrap token for a node name came to."""

    ENROLLED = "enrolled"  # one use counted, the name bound to this enrollment
    REFUSED_TOKEN = "token"  # unknown, every use spent, or expired: nothing changed
    REFUSED_NAME = "name"  # the token is good but the name is taken: no use counted


class Store(Protocol):
    """Events, per-host chain state, quarantined batches and join tokens."""

    #: How many threads may call this store at once (the server sizes its pool by it).
    threads: int

    def close(self) -> None: ...

    def check_root(self, trust_domain: str, certificate_der: bytes) -> None:
        """Refuse (StoreError) a root CA other than the one the store was first used with.

        Replicas sharing a database must share one CA; a replica that generated its
        own would issue credentials the others do not accept.
        """
        ...

    def notify_on_change(self, wake: Callable[[], None]) -> bool:
        """Call ``wake`` (from any thread) when a writer elsewhere may have stored events.

        False when no one else writes this store: the server then hands what it
        stores to its subscribers itself.  True when others may (other replicas):
        the server then reads every new row back by cursor, its own included.
        """
        ...

    def host_state(self, host: str) -> HostState: ...

    def ingest_checked(
        self, host: str, decide: Callable[[HostState], Plan]
    ) -> Sequence[collector_pb2.StoredEvent]:
        """Under ``host``'s lock, in one transaction: read its state, ``decide``, store.

        What ``decide`` raises rolls everything back and is raised again.  Returns
        what was inserted (duplicates are skipped), with cursors, in insert order.
        """
        ...

    def ingest(
        self, host: str, events: Sequence[NewEvent], state: HostState | None
    ) -> Sequence[collector_pb2.StoredEvent]:
        """Store ``events`` (duplicates ignored) and, unless None, ``state``, atomically."""
        ...

    def quarantine(self, host: str, batch: collector_pb2.Batch, reason: str) -> None: ...

    def quarantined(self, host: str) -> list[tuple[int, int, str, collector_pb2.Batch]]:
        """(first, last, reason, batch) of each batch of ``host`` kept aside, oldest first."""
        ...

    def query(
        self, flt: collector_pb2.EventFilter, after_cursor: int, limit: int
    ) -> list[collector_pb2.StoredEvent]:
        """Stored events matching ``flt`` after ``after_cursor``, in cursor order."""
        ...

    def first_cursor_since(self, time_ns: int) -> int:
        """The cursor just before the first event at or after ``time_ns``."""
        ...

    def last_cursor(self) -> int: ...

    def count(self, host: str | None = None) -> int: ...

    def stored_batches(self, host: str) -> list[StoredBatch]:
        """The signed batches kept for ``host``, in the order their events were stored."""
        ...

    def chain_events(self, host: str) -> Iterator[tuple[int, str, bytes]]:
        """(sequence, boot, stored bytes) of ``host``'s sequenced events, by sequence."""
        ...

    def maintain(self, keep_days: int | None) -> list[int]:
        """Prepare the coming days; drop every day older than the last ``keep_days``.

        Returns the days dropped (days since 1970-01-01, UTC).  Today counts as
        day 0: with ``keep_days`` 2 on day D, days D-2, D-1 and D stay and what
        was stored before D-2 goes, with the batches it came in.  None keeps all.
        """
        ...

    def add_join_token(self, token_hash: str, host: str, expires_ns: int) -> None: ...

    def use_join_token(self, token_hash: str, now_ns: int) -> str | None:
        """Spend a join token: the host it names, or None when unknown, used or expired.

        The host's name is recorded as enrolled, so no bootstrap token can take it.
        """
        ...

    def add_bootstrap_token(
        self, token_hash: str, max_uses: int, expires_ns: int, now_ns: int
    ) -> None: ...

    def use_bootstrap_token(self, token_hash: str, host: str, now_ns: int) -> BootstrapUse:
        """Spend one use of a bootstrap token on ``host``, atomically across replicas.

        In one transaction: count the use (only while uses are left and the token
        has not expired) and bind ``host`` to it (only when no enrollment took the
        name before, or the operator released it).  Either both happen or neither.
        """
        ...

    def expire_bootstrap_token(self, token_hash: str, now_ns: int) -> bool:
        """End a bootstrap token's life now; False when no such token is unexpired."""
        ...

    def revoke_host(self, host: str, now_ns: int, release: bool) -> None:
        """Refuse ``host``'s certificates issued until ``now_ns``; ``release`` also frees
        its name, so that a bootstrap token may enroll it again."""
        ...

    def host_revoked_ns(self, host: str) -> int | None:
        """When ``host`` was last revoked (its certificates issued before are refused)."""
        ...


def open_store(config: CollectorConfig) -> Store:
    """The store ``config`` names: PostgreSQL for a ``postgresql://`` DSN, else SQLite."""
    if config.store_dsn:
        from sidecar.collector.postgres_store import PostgresStore

        return PostgresStore(config.store_dsn, connections=config.store_connections)
    from sidecar.collector.sqlite_store import SqliteStore

    return SqliteStore(config.db_path)


def event_row(ne: NewEvent) -> tuple[object, ...]:
    """The column values of one event, in both stores' insert order.

    (host, boot, seq, time_ns, identity, instance, kind, verdict,
    verification, data); a collector alert has no sequence (None).
    """
    ev = ne.event
    return (
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


def verdict_of(event: event_pb2.Event) -> int:
    kind = event.WhichOneof("body")
    if kind == "exec":
        return int(event.exec.verdict)
    if kind == "connect":
        return int(event.connect.verdict)
    if kind == "socket":
        return int(event.socket.verdict)
    return 0


def matches(flt: collector_pb2.EventFilter, event: event_pb2.Event) -> bool:
    """Whether a live event passes ``flt`` (same meaning as each store's query)."""
    if flt.hosts and event.host not in flt.hosts:
        return False
    if flt.identities and event.identity not in flt.identities:
        return False
    if flt.instances and event.process.instance_id not in flt.instances:
        return False
    if flt.kinds and (event.WhichOneof("body") or "") not in flt.kinds:
        return False
    if flt.verdicts and verdict_of(event) not in flt.verdicts:
        return False
    if flt.start_time_ns and event.time_ns < flt.start_time_ns:
        return False
    return not (flt.end_time_ns and event.time_ns > flt.end_time_ns)


def filter_columns(flt: collector_pb2.EventFilter) -> list[tuple[str, list[object]]]:
    """(column, accepted values) of each list in ``flt`` that is not empty."""
    out: list[tuple[str, list[object]]] = []
    lists: tuple[tuple[str, list[object]], ...] = (
        ("host", list(flt.hosts)),
        ("identity", list(flt.identities)),
        ("instance", list(flt.instances)),
        ("kind", list(flt.kinds)),
        ("verdict", [int(v) for v in flt.verdicts]),
    )
    for column, values in lists:
        if values:
            out.append((column, values))
    return out
