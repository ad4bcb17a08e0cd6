"""Append-only disk spool: events survive a collector outage and a daemon restart.

Layout of the spool directory:

* ``seg-<first sequence>.spool``: segments.  A segment starts with a header (magic,
  first sequence, chain hash before it) and holds records
  ``u32 length | u32 crc32 | u64 sequence | 32-byte chain hash | encoded Event``.
  Only the newest segment is ever appended to.
* ``state.json``: the ack cursor (highest sequence the collector stored) and its chain
  hash, replaced atomically.  Together with the last record it gives the next
  sequence after a restart, so sequences never repeat.

Why segments: acknowledged events and, when the size cap is reached, the oldest
unacknowledged ones are removed by deleting whole files, never by rewriting.  A torn
record at the end (a crash mid-write) is cut off when the spool is opened.

The spool assigns each event its sequence and chain hash, so the order on disk is the
order of the chain.  Only records that have been fsynced are handed to the sender: the
collector can never hold an event that a power loss could make us number again.
"""

from __future__ import annotations

import bisect
import json
import logging
import os
import re
import struct
import threading
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from google.protobuf.message import DecodeError

from sidecar.api.v1 import event_pb2
from sidecar.export.chain import CHAIN_SEED, chain_next
from sidecar.util.errors import TransportError
from sidecar.util.fsutil import write_atomic

_logger = logging.getLogger(__name__)

_MAGIC = b"SCSPOOL1"
_SEG_HEADER = struct.Struct(">8sQ32s")
_REC_HEADER = struct.Struct(">IIQ32s")
_SEG_RE = re.compile(r"^seg-(\d{20})\.spool$")
STATE_FILE = "state.json"
# The ack cursor is written to disk at most this often (and at close).  A host
# killed in between resends what the collector acknowledged since, and the
# collector stores nothing twice; writing it at every ack cost two fsyncs and
# a new file each time, the largest part of streaming's cost.
STATE_SAVE_SECONDS = 1.0
MAX_RECORD_BYTES = 1 << 20


@dataclass(frozen=True)
class Record:
    """One spooled event: its sequence, the chain hash after it and its bytes."""

    sequence: int
    chain: bytes
    payload: bytes


@dataclass
class Dropped:
    """Events lost to the spool's size cap, by (kind, reason).

    Mostly ("exec", "spool_full"); ("exec", "collector_ahead") for unsent
    events a collector that holds later sequences made obsolete (see
    :meth:`Spool.skip_to`); a lost-events report that the cap removed
    is not counted as one event of kind "lost": its own counts (with their
    reasons, "queue_full" say) are carried into this one, so no loss report
    is lost with it.
    """

    first_sequence: int = 0
    last_sequence: int = 0
    kinds: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def count(self) -> int:
        return sum(self.kinds.values())

    def add(self, sequence: int, counts: Counter[tuple[str, str]]) -> None:
        if not self.first_sequence or sequence < self.first_sequence:
            self.first_sequence = sequence
        self.last_sequence = max(self.last_sequence, sequence)
        self.kinds.update(counts)


@dataclass
class _Segment:
    first: int
    path: Path
    prev_chain: bytes
    size: int
    last: int  # last sequence in it, first - 1 when empty


class Spool:
    """Sequenced, hash-chained, fsynced event log with an ack cursor and a size cap."""

    def __init__(self, directory: Path, max_bytes: int, segment_bytes: int | None = None) -> None:
        if max_bytes < 4096:
            raise TransportError(f"spool size cap {max_bytes} is below the minimum of 4096 bytes")
        self.directory = directory
        self.max_bytes = max_bytes
        self.segment_bytes = segment_bytes or max(1024, max_bytes // 16)
        self._lock = threading.Lock()
        self._segments: list[_Segment] = []
        self._fh: BinaryIO | None = None
        self._dropped = Dropped()
        # Sent to the collector (this stream), and removed by the cap before its ack.
        self.sent_through = 0
        self._sent_chains: dict[int, bytes] = {}  # sequence -> chain, at sent batch ends
        self._in_doubt: list[tuple[int, Counter[tuple[str, str]]]] = []
        self._read_pos: tuple[int, int, int, bytes] | None = (
            None  # seg first, offset, next seq, prev
        )
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.acked, self.acked_chain = self._load_state()
            self._recover()
        except OSError as exc:
            raise TransportError(f"cannot open spool {directory}: {exc}") from exc
        last = self._segments[-1] if self._segments else None
        if last is not None and last.last >= last.first:
            self.last_sequence, self.last_chain = last.last, self._last_chain_of(last)
        else:
            self.last_sequence = last.first - 1 if last else 0
            self.last_chain = last.prev_chain if last else CHAIN_SEED
        if self.acked > self.last_sequence:
            self.last_sequence, self.last_chain = self.acked, self.acked_chain
        self.durable_sequence = self.last_sequence
        self._dirty = False
        self._first_unsynced = 0.0
        self._new_segment = False
        # What the state file says: segments are removed only once it covers them.
        self._saved_acked = self.acked
        self._saved_at = 0.0

    # ---- state -----------------------------------------------------------------------

    def _load_state(self) -> tuple[int, bytes]:
        path = self.directory / STATE_FILE
        try:
            raw = json.loads(path.read_text())
            return int(raw["acked_sequence"]), bytes.fromhex(raw["acked_chain"])
        except FileNotFoundError:
            return 0, CHAIN_SEED
        except (ValueError, KeyError, TypeError) as exc:
            raise TransportError(f"{path}: spool state is corrupt: {exc}") from exc

    def _save_state(self) -> None:
        data = json.dumps(
            {"acked_sequence": self.acked, "acked_chain": self.acked_chain.hex()}
        ).encode()
        write_atomic(self.directory / STATE_FILE, data, 0o600)
        self._fsync_dir()

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- recovery --------------------------------------------------------------------

    def _recover(self) -> None:
        names = sorted(p.name for p in self.directory.iterdir() if _SEG_RE.match(p.name))
        for name in names:
            seg = self._scan(self.directory / name)
            if seg is not None:
                self._segments.append(seg)

    def _scan(self, path: Path) -> _Segment | None:
        """Read a segment's header and records; cut off a torn or corrupt tail."""
        with path.open("r+b") as fh:
            head = fh.read(_SEG_HEADER.size)
            if len(head) < _SEG_HEADER.size or head[:8] != _MAGIC:
                _logger.warning("spool segment %s has no valid header; removing it", path)
                path.unlink()
                return None
            _, first, prev = _SEG_HEADER.unpack(head)
            seg = _Segment(first, path, prev, _SEG_HEADER.size, first - 1)
            offset = _SEG_HEADER.size
            while True:
                rec = _read_record(fh)
                if rec is None:
                    break
                if rec.sequence != seg.last + 1:
                    _logger.warning("spool %s: sequence %d out of order", path, rec.sequence)
                    break
                seg.last = rec.sequence
                offset = fh.tell()
            if offset < path.stat().st_size:
                _logger.warning("spool %s: cutting off a torn tail at byte %d", path, offset)
                fh.truncate(offset)
            seg.size = offset
        return seg

    def _last_chain_of(self, seg: _Segment) -> bytes:
        chain = seg.prev_chain
        with seg.path.open("rb") as fh:
            fh.seek(_SEG_HEADER.size)
            while (rec := _read_record(fh)) is not None:
                chain = rec.chain
        return chain

    # ---- writing ---------------------------------------------------------------------

    def append(self, event: event_pb2.Event) -> int:
        """Number ``event``, chain it and write it; returns its sequence.

        The record is durable only after :meth:`sync`.  When the spool is over its size
        cap, the oldest segments go first (see :meth:`take_dropped`).
        """
        with self._lock:
            seq = self.last_sequence + 1
            event.sequence = seq
            payload = event.SerializeToString()
            if len(payload) > MAX_RECORD_BYTES:
                raise TransportError(
                    f"event {seq} is {len(payload)} bytes, over the {MAX_RECORD_BYTES} limit"
                )
            chain = chain_next(self.last_chain, seq, payload)
            try:
                fh = self._writable(seq)
                data = _REC_HEADER.pack(
                    len(payload), zlib.crc32(payload, zlib.crc32(chain)), seq, chain
                )
                fh.write(data + payload)
            except OSError as exc:
                raise TransportError(f"cannot write spool {self.directory}: {exc}") from exc
            seg = self._segments[-1]
            seg.size += len(data) + len(payload)
            seg.last = seq
            self.last_sequence, self.last_chain = seq, chain
            if not self._dirty:
                self._dirty, self._first_unsynced = True, time.monotonic()
            self._enforce_cap()
            return seq

    def _writable(self, seq: int) -> BinaryIO:
        cur = self._segments[-1] if self._segments else None
        fresh, self._new_segment = self._new_segment, False
        if self._fh is not None and cur is not None and cur.size < self.segment_bytes and not fresh:
            return self._fh
        if self._fh is not None:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        if cur is not None and cur.size < self.segment_bytes and not fresh:
            self._fh = cur.path.open("ab")
            return self._fh
        path = self.directory / f"seg-{seq:020d}.spool"
        fh = path.open("wb")
        fh.write(_SEG_HEADER.pack(_MAGIC, seq, self.last_chain))
        self._segments.append(_Segment(seq, path, self.last_chain, _SEG_HEADER.size, seq - 1))
        self._fh = fh
        self._fsync_dir()
        return fh

    def unsynced_for(self) -> float:
        """Seconds since the oldest write that is not yet fsynced (0 when none)."""
        return time.monotonic() - self._first_unsynced if self._dirty else 0.0

    def flush(self) -> None:
        """Hand what was written to the kernel (not fsynced): it survives this process."""
        with self._lock:
            if self._fh is not None:
                try:
                    self._fh.flush()
                except OSError as exc:
                    raise TransportError(f"cannot write spool {self.directory}: {exc}") from exc

    def sync(self) -> int:
        """Fsync what was written; returns the highest durable sequence."""
        with self._lock:
            if self._dirty and self._fh is not None:
                try:
                    self._fh.flush()
                    os.fsync(self._fh.fileno())
                except OSError as exc:
                    raise TransportError(f"cannot sync spool {self.directory}: {exc}") from exc
            self._dirty = False
            self.durable_sequence = self.last_sequence
            return self.durable_sequence

    def _enforce_cap(self) -> None:
        while len(self._segments) > 1 and self._total() > self.max_bytes:
            seg = self._segments.pop(0)
            self._read_pos = None
            with seg.path.open("rb") as fh:
                fh.seek(_SEG_HEADER.size)
                while (rec := _read_record(fh)) is not None:
                    if rec.sequence <= self.acked:
                        continue
                    counts = _loss_counts(rec.payload)
                    if rec.sequence <= self.sent_through:
                        # Sent, not yet acknowledged: the collector may hold it.
                        # Which it does is known at the next ack (resolve).
                        self._in_doubt.append((rec.sequence, counts))
                    else:
                        self._dropped.add(rec.sequence, counts)
            seg.path.unlink()
            _logger.warning(
                "spool over its cap of %d bytes: dropped sequences %d..%d",
                self.max_bytes,
                seg.first,
                seg.last,
            )

    def _total(self) -> int:
        return sum(s.size for s in self._segments)

    def mark_sent(self, sequence: int, chain: bytes | None = None) -> None:
        """The sender wrote records up to ``sequence`` (whose chain hash is ``chain``)."""
        with self._lock:
            self._mark_sent_locked(sequence, chain)

    def _mark_sent_locked(self, sequence: int, chain: bytes | None) -> None:
        self.sent_through = max(self.sent_through, sequence)
        if chain is not None:
            # The collector acks at batch ends: knowing their hashes spares
            # ack() a read of the segment.
            self._sent_chains[sequence] = chain

    def resolve(self, stored_through: int) -> None:
        """The collector holds every sequence up to ``stored_through`` (its ack).

        Records the cap removed after they were sent are lost only if the
        collector never stored them; an ack at the start of a stream says which.
        """
        with self._lock:
            self._resolve_locked(stored_through)

    def _resolve_locked(self, stored_through: int) -> None:
        # At or below it, the collector has it; above it, still in doubt.
        self._in_doubt = [(q, c) for q, c in self._in_doubt if q > stored_through]

    def settle(self, stored_through: int) -> None:
        """A new stream opened with the collector holding up to ``stored_through``.

        Records the cap removed after an earlier stream sent them are now known:
        stored if at or below it, lost if above (they are no longer here to be
        sent again).  Sending starts over from there.
        """
        self.resolve(stored_through)
        with self._lock:
            for sequence, counts in self._in_doubt:
                self._dropped.add(sequence, counts)
            self._in_doubt = []
            self.sent_through = stored_through

    def take_dropped(self) -> Dropped | None:
        """What the size cap removed since the last call (for a lost-events report)."""
        with self._lock:
            if not self._dropped.count:
                return None
            out, self._dropped = self._dropped, Dropped()
            return out

    # ---- reading and acknowledging ----------------------------------------------------

    def read(
        self, after: int, max_events: int, max_bytes: int, *, sending: bool = False
    ) -> tuple[bytes, list[Record]]:
        """Durable records after sequence ``after``, and the chain hash before the first.

        At least one record when any is available, then as many as fit ``max_events``
        and ``max_bytes``.  Records the size cap removed are skipped: the batch then
        starts after the hole.  ``sending``: the caller sends them now; they are
        marked sent in the same step (see :meth:`mark_sent`), so that the cap
        never counts a record on its way to the collector as dropped.
        """
        with self._lock:
            prev, out = self._read_locked(after, max_events, max_bytes)
            if sending and out:
                self._mark_sent_locked(out[-1].sequence, out[-1].chain)
            return prev, out

    def _read_locked(
        self, after: int, max_events: int, max_bytes: int
    ) -> tuple[bytes, list[Record]]:
        if self._fh is not None:
            self._fh.flush()
        out: list[Record] = []
        budget = [max_events, max_bytes]
        firsts = [s.first for s in self._segments]
        i = max(0, bisect.bisect_right(firsts, after + 1) - 1)
        prev = b""
        for seg in self._segments[i:]:
            if seg.last <= after:
                continue
            if seg.first > self.durable_sequence or budget[0] <= 0 or budget[1] <= 0:
                break
            seg_prev, records = self._read_segment(seg, after, budget)
            if not out:
                prev = seg_prev
            out.extend(records)
            if records:
                after = records[-1].sequence
        return prev, out

    def _read_segment(
        self, seg: _Segment, after: int, budget: list[int]
    ) -> tuple[bytes, list[Record]]:
        """Records of ``seg`` after ``after`` within ``budget`` (events, bytes; updated)."""
        pos = self._read_pos
        if pos is not None and pos[0] == seg.first and pos[2] == after + 1:
            offset, prev = pos[1], pos[3]
        else:
            offset, prev = _SEG_HEADER.size, seg.prev_chain
        first_prev = prev
        out: list[Record] = []
        with seg.path.open("rb") as fh:
            fh.seek(offset)
            while budget[0] > 0 and budget[1] > 0:
                rec = _read_record(fh)
                if rec is None or rec.sequence > self.durable_sequence:
                    break
                if rec.sequence > after:
                    if not out:
                        first_prev = prev
                    out.append(rec)
                    budget[0] -= 1
                    budget[1] -= len(rec.payload)
                prev = rec.chain
                offset = fh.tell()
        if out:
            self._read_pos = (seg.first, offset, out[-1].sequence + 1, prev)
        return first_prev, out

    def ack(self, sequence: int, chain: bytes | None = None) -> None:
        """Record that the collector stored everything up to ``sequence``; free space."""
        with self._lock:
            self._resolve_locked(sequence)  # removed by the cap after they were sent
            if sequence <= self.acked:
                return
            sequence = min(sequence, self.durable_sequence)
            self.acked = sequence
            known = self._sent_chains.get(sequence)
            self._sent_chains = {q: c for q, c in self._sent_chains.items() if q > sequence}
            self.acked_chain = chain or known or self._chain_at(sequence)
            if time.monotonic() - self._saved_at >= STATE_SAVE_SECONDS:
                self._save_acked_locked()

    def save_state(self) -> None:
        """Write the ack cursor now (at close, and when the sender is idle)."""
        with self._lock:
            if self.acked != self._saved_acked:
                self._save_acked_locked()

    def _save_acked_locked(self) -> None:
        """Write the ack cursor, then free the segments it covers."""
        try:
            self._save_state()
            self._saved_acked, self._saved_at = self.acked, time.monotonic()
            while len(self._segments) > 1 and self._segments[0].last <= self._saved_acked:
                seg = self._segments.pop(0)
                seg.path.unlink()
                self._read_pos = None
        except OSError as exc:
            raise TransportError(f"cannot update spool {self.directory}: {exc}") from exc

    def _chain_at(self, sequence: int) -> bytes:
        for seg in self._segments:
            if seg.first <= sequence <= seg.last:
                with seg.path.open("rb") as fh:
                    fh.seek(_SEG_HEADER.size)
                    while (rec := _read_record(fh)) is not None:
                        if rec.sequence == sequence:
                            return rec.chain
        return self.acked_chain

    def skip_to(self, sequence: int) -> None:
        """Number the next event after ``sequence``.

        For a collector that already holds sequences we never wrote (the spool and its
        state were lost): reusing them would make the collector drop new events as
        duplicates.  The chain continues from our last hash, so the collector reports a
        chain break there, which is the truth.  What we wrote and the collector never
        acknowledged was numbered in its past: it is reported lost (``collector_ahead``).
        """
        with self._lock:
            if sequence <= self.last_sequence:
                return
            # What we hold unacknowledged was numbered in the collector's past:
            # it would be taken for duplicates, so it is lost, and counted so.
            discarded = 0
            for seg in self._segments:
                try:
                    with seg.path.open("rb") as fh:
                        fh.seek(_SEG_HEADER.size)
                        while (rec := _read_record(fh)) is not None:
                            if rec.sequence > self.acked:
                                self._dropped.add(
                                    rec.sequence, _loss_counts(rec.payload, "collector_ahead")
                                )
                                discarded += 1
                except OSError as exc:
                    raise TransportError(f"cannot read spool {self.directory}: {exc}") from exc
            self._in_doubt = []
            _logger.warning(
                "collector holds sequences up to %d, beyond our last %d (this host's spool"
                " was lost or replaced): skipping ahead, %d unsent events reported lost",
                sequence,
                self.last_sequence,
                discarded,
            )
            self.last_sequence = self.durable_sequence = self.acked = sequence
            self.acked_chain = self.last_chain
            self._new_segment = True
            self._read_pos = None
            try:
                self._save_state()
                self._saved_acked, self._saved_at = self.acked, time.monotonic()
                if self._fh is not None:
                    self._fh.close()
                    self._fh = None
                for seg in self._segments:
                    seg.path.unlink()
                self._segments.clear()
            except OSError as exc:
                raise TransportError(f"cannot update spool {self.directory}: {exc}") from exc

    def pending(self) -> int:
        """Events written but not yet acknowledged."""
        return self.last_sequence - self.acked

    def size_bytes(self) -> int:
        with self._lock:
            return self._total()

    def close(self) -> None:
        """Fsync and close; the spool can be opened again from the same directory."""
        self.sync()
        self.save_state()
        with self._lock:
            if self._fh is not None:
                self._fh.close()
                self._fh = None


def _read_record(fh: BinaryIO) -> Record | None:
    """The next record, or None at the end or at a torn or corrupt record."""
    head = fh.read(_REC_HEADER.size)
    if len(head) < _REC_HEADER.size:
        return None
    length, crc, seq, chain = _REC_HEADER.unpack(head)
    if length > MAX_RECORD_BYTES:
        return None
    payload = fh.read(length)
    if len(payload) < length or zlib.crc32(payload, zlib.crc32(chain)) != crc:
        return None
    return Record(seq, chain, payload)


def _loss_counts(payload: bytes, reason: str = "spool_full") -> Counter[tuple[str, str]]:
    """What removing this record loses: one event of its kind, or a loss report's counts."""
    try:
        event = event_pb2.Event.FromString(payload)
    except DecodeError:
        return Counter({("unknown", reason): 1})
    kind = event.WhichOneof("body") or "unknown"
    out: Counter[tuple[str, str]] = Counter()
    if kind == "lost" and event.lost.counts:
        for c in event.lost.counts:
            out[(c.kind, c.reason)] += c.count
    else:
        out[(kind, reason)] += 1
    return out
