"""The reader stage: ring buffer -> decoded records -> (attested) batch -> event loop.

Nothing is consumed from the pinned ring until the outputs have the events
(see :class:`sidecar.daemon.outputs.Delivery`): the reader keeps its own
cursor.  It runs in one of two ways, chosen at start:

- **With registration entries**, a thread reads: it decodes each record and
  lets the settle stage attest new images and write their identities into
  the kernel at once, since a pending process waits for that.  The event
  loop gets what was read in one hand-over at most every HANDOFF_MS: one
  loop wake-up, one sink flush and one ring commit for a whole batch instead
  of for each exec.
- **With nothing to settle**, nobody waits on a record, and the event loop
  itself reads the ring every TICK_MS and decodes what it reads where it
  uses it (:meth:`Batch.decoded`).  There is no thread to wake, no lock to
  hand over, and the batches are larger: the daemon's code and data stay in
  the CPU caches from one record to the next.  In an exec storm this cut the
  daemon's CPU per exec by about a quarter (benchmarks/bench_pipeline.py).

Thread: the reader thread owns the cursor and calls the settle stage; it
touches nothing the event loop owns.  Read on the loop, the loop owns the
cursor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.kernel import abi
from sidecar.util.errors import KernelError

if TYPE_CHECKING:
    from sidecar.daemon.settle import Settled, Settler
    from sidecar.daemon.stages import RingBuffer
    from sidecar.health import Heartbeat

_logger = logging.getLogger(__name__)

# Records that nobody waits on do not wake the reader (bpf/maps.h): it picks
# them up on this period.  Larger batches are cheaper per record, because the
# daemon's code and data stay in the CPU caches from one record to the next:
# under a paced exec load of 2,000/s, 50 ms instead of 10 ms cut the daemon's
# CPU per exec from about 41 to 25 us.  Nothing waits on these records (an
# exec pending attestation wakes the reader at once), and the ring buffer's
# default 1 MiB holds 50 ms of the fastest storm this machine makes more than
# ten times over.
POLL_MS = 50
# Records read are handed to the event loop at most this long after the first
# of them.  At 1,000 attested execs a second, handing over each exec's records
# as read cost a loop wake-up, a flush, a commit and several GIL hand-offs
# each: most of the daemon's CPU.
HANDOFF_MS = 20
# ... or at once when this many are waiting.
HANDOFF_RECORDS = 4096
# With nothing to settle, the event loop reads the ring this often.  Events
# reach the outputs at most this long after they happen; under load, 50 ms
# batches instead of 20 ms cut the daemon's CPU per exec in an exec storm
# from about 13 to 10 us on a 2-core VM.
TICK_MS = 50
# ... and sooner after a tick that read this share of the ring or more, so
# that a burst is read (and consumed) before the kernel runs out of room.
TICK_FILL = 0.25
SOON_MS = 5


@dataclass(slots=True)
class Batch:
    """Records of one read, decoded, with what the settle stage did for each."""

    records: list[abi.KernelEvent]
    settled: list[Settled | None]
    #: Ring position just past each record, only while re-reading what a
    #: previous daemon left (they decide which outputs get the events again).
    ends: list[int] | None
    #: Position just past the whole read.
    cursor: int
    #: Records that did not decode (counted, never fatal).
    errors: int
    #: Records read and not decoded yet (then ``records`` and ``settled`` are
    #: empty and ``ends`` are theirs); see :meth:`decoded`.
    raw: list[bytes] | None = None

    def __len__(self) -> int:
        """Records in the batch, decoded or not."""
        return len(self.raw) if self.raw is not None else len(self.records)

    def decoded(self) -> Batch:
        """The batch with its records decoded: itself if they are."""
        if self.raw is None:
            return self
        out = decode(self.raw, self.ends, self.cursor)
        out.errors += self.errors
        return out


class RingReader:
    def __init__(
        self,
        ring: RingBuffer,
        settler: Settler | None,
        replay_until: int,
        handoff: Callable[[Batch], None],
    ) -> None:
        self.ring = ring
        self.settler = settler
        self.replay_until = replay_until
        self.handoff = handoff
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tick: asyncio.TimerHandle | asyncio.Handle | None = None
        self._cursor = 0
        #: Read on the loop: batches of a large read not handed over yet.
        self._queued: deque[Batch] = deque()
        #: Beaten once per turn (at least every POLL_MS when idle): the
        #: daemon is live only while it is recent (sidecar/health.py).
        self.heartbeat: Heartbeat | None = None

    @property
    def on_loop(self) -> bool:
        """True when the event loop reads the ring (nothing to settle), not a thread."""
        return self.settler is None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.on_loop:
            self._loop = loop
            self._cursor = self.ring.consumer
            self._tick = loop.call_soon(self._read_on_loop)
            return
        self._thread = threading.Thread(
            target=self._run, args=(loop,), name="ringbuf-reader", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop reading.  Read on the loop, this must be called on the loop, and what
        is in the ring is read and handed over one last time."""
        self._stop.set()
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None
            self._read_on_loop()

    def _read_on_loop(self) -> None:
        """Event loop, every TICK_MS: hand over what the ring holds past the cursor.

        A read of more than HANDOFF_RECORDS (the ring after a stall) is handed
        over in batches of at most that many, each in a loop callback of its
        own, so that the loop's other work (the Workload API, the admin
        socket) runs between them.  Batches always go in ring order.
        """
        delay = TICK_MS
        stopping = self._stop.is_set()
        try:
            if self.heartbeat is not None:
                self.heartbeat.beat()
            self._hand_over_queued(everything=True)  # a burst's rest comes first
            got = self.ring.read(0)
            before = self._cursor
            if got.cursor != before:
                ends = got.ends_list() if before < self.replay_until else None
                self._cursor = got.cursor
                if got.cursor - before >= TICK_FILL * self.ring.size:
                    delay = SOON_MS
                batch = Batch([], [], ends, got.cursor, 0, got.records)
                if len(got.records) <= HANDOFF_RECORDS:
                    self.handoff(batch)
                else:
                    positions = ends if ends is not None else got.ends_list()
                    self._queued.extend(split(batch, HANDOFF_RECORDS, positions))
                    self._hand_over_queued(everything=stopping)
        except KernelError:
            _logger.exception("ring buffer read failed")
            delay = 100
        finally:
            # Whatever failed, the next read comes: a lost tick would stop the reading.
            if not self._stop.is_set() and self._loop is not None:
                self._tick = self._loop.call_later(delay / 1000, self._read_on_loop)

    def _hand_over_queued(self, everything: bool = False) -> None:
        """Hand over the next queued batch (every one with ``everything``); a
        callback of its own hands over the one after."""
        queued = self._queued
        while queued:
            batch = queued.popleft()
            if queued and not everything and self._loop is not None:
                self._loop.call_soon(self._hand_over_queued)
            self.handoff(batch)
            if not everything:
                return

    def join(self, timeout: float) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self, loop: asyncio.AbstractEventLoop) -> None:
        ring = self.ring
        cursor = ring.consumer
        held: list[Batch] = []
        held_records = 0
        due = 0.0
        beat = self.heartbeat
        while not self._stop.is_set():
            if beat is not None:
                beat.beat()
            timeout = POLL_MS
            if held:
                # Rounded up: a wait rounded down to 0 ms returns at once, and
                # the loop would spin through the last millisecond before ``due``.
                timeout = max(0, math.ceil((due - time.monotonic()) * 1000))
            try:
                got = ring.read(timeout)
            except KernelError:
                _logger.exception("ring buffer poll failed")
                time.sleep(0.1)
                continue
            if got.cursor != cursor:
                ends = got.ends_list() if cursor < self.replay_until else None
                cursor = got.cursor
                if self.settler is not None:
                    batch = decode(got.records, ends, cursor)
                    batch.settled = self.settler.attest_batch(batch.records)
                else:  # nothing to settle: decoded where used, by the event loop
                    batch = Batch([], [], ends, cursor, 0, got.records)
                if not held:
                    due = time.monotonic() + HANDOFF_MS / 1000
                held.append(batch)
                held_records += len(batch)
            if held and (time.monotonic() >= due or held_records >= HANDOFF_RECORDS):
                self._hand_over(loop, held)
                held, held_records = [], 0
        if held:
            self._hand_over(loop, held)

    def _hand_over(self, loop: asyncio.AbstractEventLoop, held: list[Batch]) -> None:
        with contextlib.suppress(RuntimeError):  # loop closed during shutdown
            loop.call_soon_threadsafe(self.handoff, merge(held))


def merge(batches: list[Batch]) -> Batch:
    """One batch of several reads, in order (all decoded, or none: one reader makes them)."""
    if len(batches) == 1:
        return batches[0]
    first = batches[0]
    raw: list[bytes] | None = [] if first.raw is not None else None
    out = Batch([], [], [] if first.ends is not None else None, batches[-1].cursor, 0, raw)
    for b in batches:
        if raw is not None and b.raw is not None:
            raw.extend(b.raw)
        elif raw is None and b.raw is None:
            out.records.extend(b.records)
            out.settled.extend(b.settled)
        else:
            raise ValueError("decoded and undecoded reads in one batch")
        out.errors += b.errors
        if out.ends is not None:
            # A read that re-reads what a previous daemon left always comes
            # first; later ones have no ends, and their records go everywhere.
            out.ends.extend(b.ends if b.ends is not None else [1 << 64] * len(b))
    return out


def split(batch: Batch, most: int, positions: list[int]) -> list[Batch]:
    """An undecoded batch as batches of at most ``most`` records, in order;
    ``positions`` are the ring positions just past each record."""
    assert batch.raw is not None and len(positions) == len(batch.raw)
    out = []
    for i in range(0, len(batch.raw), most):
        j = min(i + most, len(batch.raw))
        out.append(
            Batch(
                [],
                [],
                batch.ends[i:j] if batch.ends is not None else None,
                # The last one ends where the read did (past any discarded space).
                batch.cursor if j == len(batch.raw) else positions[j - 1],
                0,
                batch.raw[i:j],
            )
        )
    return out


def decode(raw: list[bytes], ends: list[int] | None, cursor: int) -> Batch:
    """The decode stage: records that decode, and a count of those that do not."""
    records, refused = abi.decode_all(raw)
    if not refused:
        return Batch(records, [None] * len(records), ends, cursor, 0)
    # A record the C decoder refused: the whole read again, one by one, so that
    # the Python decoder says why and the positions stay with their records.
    records = []
    record_ends: list[int] | None = [] if ends is not None else None
    errors = 0
    for i, one in enumerate(raw):
        try:
            records.append(abi.decode(one))
        except abi.DecodeError as exc:
            errors += 1
            _logger.debug("undecodable record: %s", exc)
            continue
        if record_ends is not None and ends is not None:
            record_ends.append(ends[i])
    return Batch(records, [None] * len(records), record_ends, cursor, errors)
