"""The daemon's exporter: ``submit`` -> bounded queue -> disk spool -> signed gRPC batches.

Why three stages: producers (the ring-buffer reader) must never block, so ``submit``
only puts into a bounded queue and counts what a full queue drops.  A writer thread
numbers events, chains them and appends them to the spool, fsyncing as soon as the
queue is drained, as soon as a full batch is written (so a burst streams while it
is still being written) and at least every ``fsync_interval``.  The sender streams durable
records to the collector and frees the spool as acks come back; on any failure it
reconnects with capped exponential backoff and resumes after the last ack, so a
collector outage, a network cut or a daemon restart loses nothing and the collector's
deduplication absorbs what is sent twice.

Failover: ``target`` may name several collector replicas (one database behind them).
After a failure the sender moves to the next address, round-robin, with the same
backoff.  It resumes from what the database holds: each replica's first ack on a
new stream is the host's stored head, and the spool resends from there.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.api.v1 import collector_pb2, collector_pb2_grpc, event_pb2
from sidecar.export.chain import batch_payload, sign
from sidecar.export.spool import Dropped, Spool
from sidecar.identity.x509 import key_pem
from sidecar.util.errors import TransportError

_logger = logging.getLogger(__name__)

#: Codes that retrying cannot fix: the exporter stops and reports instead.
NON_RETRYABLE = frozenset(
    {
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


@dataclass(frozen=True)
class HostIdentity:
    """What the exporter connects and signs with: the host SVID and the trust bundle."""

    host: str
    cert_chain_pem: bytes
    private_key: ec.EllipticCurvePrivateKey
    roots_pem: bytes

    def key_pem(self) -> bytes:
        return key_pem(self.private_key)

    def problem(self, now: datetime | None = None) -> str | None:
        """Why a collector would refuse this host's certificate, if it can be told here.

        A TLS handshake the server refuses reaches the client as a closed
        socket; the common causes are visible on this side.
        """
        now = now or datetime.now(timezone.utc)
        try:
            leaf = x509.load_pem_x509_certificates(self.cert_chain_pem)[0]
        except (ValueError, IndexError) as exc:
            return f"the host certificate cannot be read: {exc}"
        if leaf.not_valid_after_utc <= now:
            return (
                f"the host certificate expired at {leaf.not_valid_after_utc.isoformat()}: "
                "enroll the host again (sidecar enroll) or let it renew"
            )
        if leaf.not_valid_before_utc > now:
            return (
                f"the host certificate is valid only from "
                f"{leaf.not_valid_before_utc.isoformat()}: check this host's clock"
            )
        try:
            roots = x509.load_pem_x509_certificates(self.roots_pem)
        except ValueError:
            roots = []
        issuers = {r.subject for r in roots} | {
            c.subject for c in x509.load_pem_x509_certificates(self.cert_chain_pem)[1:]
        }
        if leaf.issuer not in issuers:
            return (
                "the host certificate was not issued under the trust bundle this host holds: "
                "the collector's CA may have changed; enroll the host again"
            )
        return None


@dataclass(frozen=True)
class ExporterConfig:
    #: host:port of the collector, or of each replica in the order to try them.
    target: str | tuple[str, ...]
    spool_dir: Path
    spool_max_bytes: int = 256 * 1024 * 1024
    queue_size: int = 10_000
    batch_max_events: int = 2000
    batch_max_bytes: int = 1024 * 1024
    max_in_flight_batches: int = 8
    fsync_interval: float = 0.5
    backoff_initial: float = 0.1
    backoff_max: float = 10.0
    #: The longest a collector may leave us without an answer: its first ack on
    #: a new stream, an ack while batches are in flight, taking a batch.  A
    #: replica that is frozen (not dead: its socket stays open) is then left
    #: for the next one, as a dead one is.
    ack_timeout: float = 15.0
    #: TLS name to check in the collector's certificate, when not the target's host.
    server_name: str | None = None
    non_retryable: frozenset[grpc.StatusCode] = field(default=NON_RETRYABLE)

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("an exporter needs at least one collector address")

    @property
    def targets(self) -> tuple[str, ...]:
        """Every collector address, in the order they are tried."""
        return (self.target,) if isinstance(self.target, str) else tuple(self.target)


_STOP = object()


class _WriterQueue(queue.Queue[object]):
    """The bounded queue from producers to the spool writer.

    The writer takes up to a batch of items per lock round: one ``get`` per
    event, contended by the producers, was a tenth of the host's CPU in a burst.
    """

    def take(self, n: int, timeout: float) -> list[object]:
        """Up to ``n`` items, oldest first, waiting up to ``timeout`` s for the first."""
        with self.not_empty:
            if not self._qsize() and timeout > 0:
                self.not_empty.wait(timeout)
            q = self.queue
            items = [q.popleft() for _ in range(min(n, len(q)))]
            if items:
                self.not_full.notify_all()
            return items


@dataclass(frozen=True, slots=True)
class _Mark:
    """Call ``then`` once everything submitted before this is in the spool."""

    then: Callable[[], None]


class _StreamEnded(Exception):
    """The collector ended the Publish stream without an error status (retryable)."""


class Exporter:
    """Sequenced, spooled, resumable event export to a collector, failing over between
    its replicas."""

    def __init__(
        self,
        config: ExporterConfig,
        identity: Callable[[], HostIdentity],
        boot_id: str = "",
    ) -> None:
        self.config = config
        self._identity = identity
        self._boot_id = boot_id
        self._queue = _WriterQueue(maxsize=config.queue_size)
        # Taken from the queue but never written (submitted after close's stop).
        self._unwritten = 0
        self.spool = Spool(config.spool_dir, config.spool_max_bytes)
        self._drop_lock = threading.Lock()
        self._queue_drops: Counter[str] = Counter()
        #: Everything ever dropped, by (kind, reason): for metrics.
        self.dropped: Counter[tuple[str, str]] = Counter()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self._stopping = False
        self._stream_acked = False
        self.connected = False
        # Why the collector last refused this host, when it can be told here (status)
        self.last_error: str | None = None
        self._late_marks: deque[_Mark] = deque()
        # Which of config.targets the sender uses now (event loop only).
        self._target_index = 0
        #: How many times the sender moved to another replica.
        self.failovers = 0

    @property
    def address(self) -> str:
        """The collector address streamed to now (or tried next, while reconnecting)."""
        return self.config.targets[self._target_index]

    def _next_address(self) -> None:
        """After a failure: the next replica, round-robin (a lone address stays)."""
        targets = self.config.targets
        if len(targets) < 2:
            return
        before = self.address
        self._target_index = (self._target_index + 1) % len(targets)
        self.failovers += 1
        _logger.warning("collector %s failed: failing over to %s", before, self.address)

    # ---- producers ----------------------------------------------------------------------

    def submit(self, event: event_pb2.Event) -> bool:
        """Hand ``event`` over without blocking; False (and counted) when the queue is full.

        Thread-safe.  The exporter owns ``event`` afterwards: it fills in the host,
        boot id and sequence.
        """
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            kind = event.WhichOneof("body") or "unknown"
            with self._drop_lock:
                self._queue_drops[kind] += 1
                self.dropped[(kind, "queue_full")] += 1
            return False
        return True

    def submit_mark(self, then: Callable[[], None]) -> None:
        """Call ``then()`` (on the writer thread) once the events submitted so far are
        in the spool file.

        Never dropped: when the queue is full the mark waits aside, and is
        taken once the writer has emptied the queue (and so written all that
        came before it).
        """
        mark = _Mark(then)
        try:
            self._queue.put_nowait(mark)
        except queue.Full:
            self._late_marks.append(mark)

    @property
    def failed(self) -> bool:
        """The spool writer has stopped on an error: nothing more reaches the spool."""
        return self._writer_error is not None

    # ---- lifecycle ----------------------------------------------------------------------

    async def run(self) -> None:
        """Export until :meth:`close`; raises TransportError on a non-retryable refusal."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._writer = threading.Thread(target=self._write_loop, name="spool-writer", daemon=True)
        self._writer.start()
        try:
            await self._send_loop()
        finally:
            self._stop_writer()

    async def close(self, timeout: float = 5.0) -> bool:
        """Flush: spool what is queued, wait up to ``timeout`` for acks, then stop.

        Returns True when everything was acknowledged.  Unacknowledged events stay in
        the spool and are sent after the next start.
        """
        deadline = time.monotonic() + timeout
        while self._writer is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)  # run() has not started its writer yet
        self._queue.put(_STOP)
        writer = self._writer
        if writer is not None:
            await asyncio.to_thread(writer.join, max(0.0, deadline - time.monotonic()))
        while self.spool.acked < self.spool.last_sequence and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        self._stopping = True
        self._poke()
        return (
            self._queue.empty()
            and not self._unwritten
            and self.spool.acked >= self.spool.last_sequence
        )

    def _stop_writer(self) -> None:
        if self._writer is not None and self._writer.is_alive():
            with contextlib.suppress(queue.Full):
                self._queue.put_nowait(_STOP)
            self._writer.join(timeout=5)
        self.spool.close()

    def _poke(self) -> None:
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(wake.set)

    # ---- writer thread -------------------------------------------------------------------

    def _write_loop(self) -> None:
        """Queue -> spool, fsync when drained, every ``fsync_interval`` and every
        ``batch_max_events`` events (thread)."""
        interval = self.config.fsync_interval
        # A full batch written is made durable at once: the sender ships it
        # while the rest of a burst is still being written.
        batch = self.config.batch_max_events
        stop = False
        pending: deque[object] = deque()
        try:
            while not stop:
                if not pending:
                    unsynced = self.spool.unsynced_for()
                    pending.extend(self._queue.take(batch, max(0.001, interval - unsynced)))
                while pending:
                    item = pending.popleft()
                    if item is _STOP:
                        stop = True
                        break
                    if isinstance(item, _Mark):
                        self._written(item)
                    else:
                        assert isinstance(item, event_pb2.Event)
                        self._append(item)
                    if self.spool.unsynced_for() >= interval or (
                        self.spool.last_sequence - self.spool.durable_sequence >= batch
                    ):
                        break
                    if not pending:
                        pending.extend(self._queue.take(batch, 0))
                # Only this thread takes from the queue: empty now (and nothing
                # taken left) means every event submitted before a mark set
                # aside is written.
                while self._late_marks and not pending and self._queue.empty():
                    self._written(self._late_marks.popleft())
                self._report_losses()
                if self.spool.unsynced_for() > 0:
                    self.spool.sync()
                    self._poke()
        except TransportError as exc:
            _logger.error("spool writer stopped: %s", exc)
            self._writer_error = exc
            self._poke()
        finally:
            self._unwritten = len(pending)

    def _written(self, mark: _Mark) -> None:
        self.spool.flush()  # in the file (page cache): a killed daemon's writes stay
        mark.then()

    def _append(self, event: event_pb2.Event) -> None:
        if not event.host:
            event.host = self._identity().host
        if not event.boot_id:
            event.boot_id = self._boot_id
        self.spool.append(event)

    def _report_losses(self) -> None:
        """Turn queue and spool drops into one in-band lost-events report."""
        with self._drop_lock:
            queue_drops, self._queue_drops = self._queue_drops, Counter()
        spooled: Dropped | None = self.spool.take_dropped()
        if not queue_drops and spooled is None:
            return
        lost = event_pb2.LostEvents()
        for kind, n in sorted(queue_drops.items()):
            lost.counts.add(kind=kind, reason="queue_full", count=n)
        if spooled is not None:
            for (kind, reason), n in sorted(spooled.kinds.items()):
                lost.counts.add(kind=kind, reason=reason, count=n)
                # Carried-over reports were counted when made.
                if reason in ("spool_full", "collector_ahead"):
                    with self._drop_lock:
                        self.dropped[(kind, reason)] += n
            lost.first_sequence = spooled.first_sequence
            lost.last_sequence = spooled.last_sequence
        self._append(event_pb2.Event(time_ns=time.time_ns(), lost=lost))

    # ---- sender --------------------------------------------------------------------------

    async def _send_loop(self) -> None:
        backoff = self.config.backoff_initial
        while not self._stopping:
            self._stream_acked = False
            address = self.address
            try:
                await self._stream_once(address)
            except grpc.aio.AioRpcError as exc:
                self.connected = False
                if not self._stream_acked and exc.code() == grpc.StatusCode.UNAVAILABLE:
                    # A refused handshake looks like a closed socket: say why, if we can.
                    problem = self._identity().problem()
                    if problem is not None:
                        self.last_error = problem
                        _logger.error("collector %s refuses this host: %s", address, problem)
                if exc.code() in self.config.non_retryable:
                    raise TransportError(
                        f"collector {address} refused the stream: "
                        f"{exc.code().name}: {exc.details()}"
                    ) from exc
                _logger.warning(
                    "collector %s: %s: %s; retrying in %.1fs",
                    address,
                    exc.code().name,
                    exc.details(),
                    backoff,
                )
            except _StreamEnded as exc:
                self.connected = False
                _logger.warning("collector %s: %s", address, exc)
            if self._writer_error is not None:
                raise TransportError(f"spool writer failed: {self._writer_error}")
            if self._stopping:
                break
            self._next_address()
            if self._stream_acked:
                backoff = self.config.backoff_initial
            await self._sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, self.config.backoff_max)

    async def _sleep(self, seconds: float) -> None:
        """Back off, but not past :meth:`close`."""
        end = time.monotonic() + seconds
        while not self._stopping and time.monotonic() < end:
            await asyncio.sleep(min(0.05, end - time.monotonic()))

    def _channel(self, ident: HostIdentity, address: str) -> grpc.aio.Channel:
        creds = grpc.ssl_channel_credentials(ident.roots_pem, ident.key_pem(), ident.cert_chain_pem)
        options: list[tuple[str, str | int]] = [
            ("grpc.max_send_message_length", self.config.batch_max_bytes + 64 * 1024),
        ]
        if self.config.server_name:
            options.append(("grpc.ssl_target_name_override", self.config.server_name))
        return grpc.aio.secure_channel(address, creds, options=options)

    async def _stream_once(self, address: str) -> None:
        """One Publish stream to ``address`` until it fails or we stop."""
        ident = self._identity()
        async with self._channel(ident, address) as channel:
            # grpc.aio allows a stream without a request iterator (written with write());
            # grpc-stubs does not know that.
            call = collector_pb2_grpc.CollectorStub(channel).Publish()  # type: ignore[call-arg]
            try:
                first = await asyncio.wait_for(call.read(), self.config.ack_timeout)
            except asyncio.TimeoutError:  # not TimeoutError before 3.11
                call.cancel()
                raise _StreamEnded(
                    f"no answer from the collector in {self.config.ack_timeout:g} s"
                ) from None
            if not isinstance(first, collector_pb2.Ack):
                raise _StreamEnded("collector closed the stream before its first ack")
            self.connected = self._stream_acked = True
            self.last_error = None
            await self._on_ack(first.acked_sequence)
            # What the cap removed after an earlier stream sent it is now known.
            await asyncio.to_thread(self.spool.settle, first.acked_sequence)
            _logger.info(
                "streaming to %s from sequence %d (the collector holds up to %d)",
                address,
                self.spool.acked + 1,
                first.acked_sequence,
            )
            reader = asyncio.create_task(self._read_acks(call))
            try:
                await self._write_batches(call, ident, reader)
                await call.done_writing()
            finally:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader

    async def _write_batches(
        self,
        call: grpc.aio.StreamStreamCall[collector_pb2.Batch, collector_pb2.Ack],
        ident: HostIdentity,
        reader: asyncio.Task[None],
    ) -> None:
        assert self._wake is not None
        cfg = self.config
        sent = self.spool.acked
        window = cfg.batch_max_events * cfg.max_in_flight_batches
        # When the collector last showed it is working: an ack, or nothing owed.
        answered = time.monotonic()
        acked = self.spool.acked
        while not self._stopping and self._writer_error is None:
            if reader.done():
                reader.result()  # re-raise the stream's error
                raise _StreamEnded("collector closed the stream")
            now = time.monotonic()
            if self.spool.acked != acked or sent <= self.spool.acked:
                answered, acked = now, self.spool.acked
            elif now - answered > cfg.ack_timeout:
                call.cancel()
                raise _StreamEnded(
                    f"the collector acknowledged nothing for {cfg.ack_timeout:g} s"
                    f" ({sent - self.spool.acked} events in flight)"
                )
            sent = max(sent, self.spool.acked)
            records: list[object] = []
            if sent - self.spool.acked < window:
                # Marked sent as they are read: the cap, removing them meanwhile,
                # holds them in doubt until the collector's ack says.
                prev, recs = await asyncio.to_thread(
                    functools.partial(
                        self.spool.read,
                        sent,
                        cfg.batch_max_events,
                        cfg.batch_max_bytes,
                        sending=True,
                    )
                )
                if recs:
                    batch = collector_pb2.Batch(
                        host=ident.host,
                        first_sequence=recs[0].sequence,
                        last_sequence=recs[-1].sequence,
                        prev_chain=prev,
                        events=[r.payload for r in recs],
                    )
                    payload = batch_payload(
                        ident.host, batch.first_sequence, batch.last_sequence, prev, recs[-1].chain
                    )
                    batch.signature = sign(ident.private_key, payload)
                    try:
                        await asyncio.wait_for(call.write(batch), cfg.ack_timeout)
                    except asyncio.TimeoutError:  # not TimeoutError before 3.11
                        call.cancel()
                        raise _StreamEnded(
                            f"the collector took no batch for {cfg.ack_timeout:g} s"
                        ) from None
                    sent = recs[-1].sequence
                    records = list(recs)
            if not records:
                self._wake.clear()
                if self.spool.durable_sequence > sent and sent - self.spool.acked < window:
                    continue
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except asyncio.TimeoutError:  # not TimeoutError before 3.11
                    # Idle for a second: the ack cursor the spool keeps in memory to disk.
                    await asyncio.to_thread(self.spool.save_state)

    async def _read_acks(
        self, call: grpc.aio.StreamStreamCall[collector_pb2.Batch, collector_pb2.Ack]
    ) -> None:
        try:
            while isinstance(ack := await call.read(), collector_pb2.Ack):
                await self._on_ack(ack.acked_sequence)
                self._poke()
        finally:
            self._poke()  # let the batch writer see the stream is gone

    async def _on_ack(self, sequence: int) -> None:
        if sequence > self.spool.last_sequence:
            await asyncio.to_thread(self.spool.skip_to, sequence)
        elif sequence > self.spool.acked:
            await asyncio.to_thread(self.spool.ack, sequence)
