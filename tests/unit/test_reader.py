"""The reader stage read on the event loop: with nothing to settle, no thread reads.

The loop is a recording stand-in here, so that each tick runs when the test
says and the delay it asks for is seen exactly; tests/kernel runs the same
reader against the real ring in a real daemon.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any, cast

import pytest

from sidecar.daemon import reader as reader_mod
from sidecar.daemon.reader import Batch, RingReader
from sidecar.daemon.settle import Settler
from sidecar.health import Health
from sidecar.kernel.ring import RingRead
from sidecar.util.errors import KernelError


class ScriptedRing:
    """A ring whose reads return what the test queued, each a list of (record, size)."""

    size = 1 << 20

    def __init__(self, start: int = 0) -> None:
        self.consumer = start
        self.producer = start
        self.cursor = start
        self.queued: list[list[tuple[bytes, int]]] = []
        self.fail_next = False
        self.reads = 0

    def read(self, timeout_ms: int) -> RingRead:
        assert timeout_ms == 0, "read on the loop, the reader must never wait"
        self.reads += 1
        if self.fail_next:
            self.fail_next = False
            raise KernelError("poll failed")
        records: list[bytes] = []
        ends: list[int] = []
        for rec, size in self.queued.pop(0) if self.queued else []:
            self.cursor += size
            records.append(rec)
            ends.append(self.cursor)
        return RingRead(records, b"".join(e.to_bytes(8, "little") for e in ends), self.cursor)

    def commit(self, position: int) -> None:
        self.consumer = max(self.consumer, position)


class Handle:
    def __init__(self, loop: RecordingLoop, delay: float | None, callback: Callable[[], None]):
        self.loop, self.delay, self.callback = loop, delay, callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class RecordingLoop:
    """call_soon/call_later recorded, run one at a time by :meth:`run_next`."""

    def __init__(self) -> None:
        self.scheduled: list[Handle] = []

    def call_soon(self, callback: Callable[[], None]) -> Handle:
        self.scheduled.append(Handle(self, None, callback))
        return self.scheduled[-1]

    def call_later(self, delay: float, callback: Callable[[], None]) -> Handle:
        self.scheduled.append(Handle(self, delay, callback))
        return self.scheduled[-1]

    def run_next(self) -> Handle:
        handle = self.scheduled.pop(0)
        assert not self.scheduled, "one tick at a time"
        if not handle.cancelled:
            handle.callback()
        return handle

    def run_soon(self) -> int:
        """Run the call_soon callbacks, in order, as the loop would before a timer."""
        ran = 0
        while any(h.delay is None for h in self.scheduled):
            handle = next(h for h in self.scheduled if h.delay is None)
            self.scheduled.remove(handle)
            if not handle.cancelled:
                handle.callback()
                ran += 1
        return ran


def started(
    ring: ScriptedRing, handoff: Callable[[Batch], None], replay_until: int = 0
) -> tuple[RingReader, RecordingLoop]:
    reader = RingReader(ring, None, replay_until, handoff)
    loop = RecordingLoop()
    reader.start(cast(asyncio.AbstractEventLoop, loop))
    return reader, loop


def test_with_nothing_to_settle_the_loop_reads_every_tick_and_no_thread_is_started() -> None:
    ring = ScriptedRing()
    handed: list[Batch] = []
    before = {t.name for t in threading.enumerate()}
    reader, loop = started(ring, handed.append)
    health = Health()
    reader.heartbeat = health.heartbeat("ring buffer reader")
    assert reader.on_loop
    assert "ringbuf-reader" not in {t.name for t in threading.enumerate()} - before
    ring.queued = [[(b"a", 16), (b"b", 24)], [], [(b"c", 8)]]
    first = loop.run_next()
    assert first.delay is None  # the first read comes at once
    assert [(b.raw, b.cursor, b.ends) for b in handed] == [([b"a", b"b"], 40, None)]
    assert health.ages()["ring buffer reader"] < 1.0  # beaten by the tick
    assert loop.run_next().delay == reader_mod.TICK_MS / 1000
    assert len(handed) == 1  # nothing new: nothing handed over
    assert loop.run_next().delay == reader_mod.TICK_MS / 1000
    assert [(b.raw, b.cursor) for b in handed[1:]] == [([b"c"], 48)]
    # Handed over undecoded: the loop decodes where it uses them.
    assert handed[1].records == [] and len(handed[1]) == 1


def test_records_a_previous_daemon_left_carry_their_positions() -> None:
    ring = ScriptedRing(start=100)
    handed: list[Batch] = []
    _reader, loop = started(ring, handed.append, replay_until=130)
    ring.queued = [[(b"old", 16), (b"older", 16)], [(b"new", 8)]]
    loop.run_next()
    loop.run_next()
    assert [(b.raw, b.ends) for b in handed] == [([b"old", b"older"], [116, 132]), ([b"new"], None)]


def test_a_tick_that_reads_a_quarter_of_the_ring_or_more_reads_again_soon() -> None:
    ring = ScriptedRing()
    handed: list[Batch] = []
    _reader, loop = started(ring, handed.append)
    quarter = int(ScriptedRing.size * reader_mod.TICK_FILL)
    ring.queued = [[(b"x", 64)], [(b"burst", quarter)], [(b"y", quarter - 8)], []]
    loop.run_next()
    assert loop.run_next().delay == reader_mod.TICK_MS / 1000  # after a small read
    assert loop.run_next().delay == reader_mod.SOON_MS / 1000  # after a quarter
    assert loop.run_next().delay == reader_mod.TICK_MS / 1000  # just under a quarter
    assert loop.scheduled[0].delay == reader_mod.TICK_MS / 1000
    assert len(handed) == 3


def test_a_failed_read_or_hand_over_does_not_stop_the_reading() -> None:
    ring = ScriptedRing()
    handed: list[Batch] = []

    def handoff(batch: Batch) -> None:
        if batch.raw == [b"bad"]:
            raise RuntimeError("handler failed")
        handed.append(batch)

    _reader, loop = started(ring, handoff)
    ring.fail_next = True
    loop.run_next()  # the read fails: logged, read again later
    assert loop.scheduled and loop.scheduled[0].delay is not None
    ring.queued = [[(b"bad", 8)], [(b"good", 8)]]
    with pytest.raises(RuntimeError):
        loop.run_next()  # the event loop logs a callback's error; the next tick is set
    assert loop.scheduled, "a failed hand-over stopped the reading"
    loop.run_next()
    assert [b.raw for b in handed] == [[b"good"]]


def test_stop_reads_what_is_left_once_and_schedules_nothing_more() -> None:
    ring = ScriptedRing()
    handed: list[Batch] = []
    reader, loop = started(ring, handed.append)
    loop.run_next()
    ring.queued = [[(b"last", 8)]]
    pending = loop.scheduled[0]
    reader.stop()
    assert pending.cancelled
    assert [b.raw for b in handed] == [[b"last"]]
    reader.stop()  # twice is harmless
    reader.join(1)
    assert [b.raw for b in handed] == [[b"last"]]
    assert not [h for h in loop.scheduled if not h.cancelled]


def test_with_records_to_settle_a_thread_reads() -> None:
    ring = ScriptedRing()

    class NoSettle:
        def attest_batch(self, events: Any) -> list[None]:
            return [None] * len(events)

    reader = RingReader(ring, cast(Settler, NoSettle()), 0, lambda batch: None)
    assert not reader.on_loop


def test_a_large_read_goes_over_in_batches_in_ring_order_each_in_a_callback_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reader_mod, "HANDOFF_RECORDS", 2)
    ring = ScriptedRing()
    handed: list[Batch] = []
    _reader, loop = started(ring, handed.append)
    ring.queued = [[(b"%d" % i, 8) for i in range(5)], [(b"next", 8)]]
    loop.scheduled.pop(0).callback()  # the first tick
    # One batch now; the loop's other work may run before the next.
    assert [(b.raw, b.cursor) for b in handed] == [([b"0", b"1"], 16)]
    assert loop.run_soon() == 2
    assert [(b.raw, b.cursor) for b in handed] == [
        ([b"0", b"1"], 16),
        ([b"2", b"3"], 32),
        ([b"4"], 40),  # the last ends where the read did
    ]
    loop.run_next()
    assert [b.raw for b in handed][-1] == [b"next"]


def test_stop_hands_over_every_queued_batch_at_once_and_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(reader_mod, "HANDOFF_RECORDS", 2)
    ring = ScriptedRing(start=0)
    handed: list[Batch] = []
    reader, loop = started(ring, handed.append, replay_until=24)
    ring.queued = [[(b"%d" % i, 8) for i in range(5)], [(b"a", 8), (b"b", 8), (b"c", 8)]]
    loop.scheduled.pop(0).callback()
    assert len(handed) == 1
    reader.stop()  # the queued rest, then a last read, all before stop returns
    assert [(b.raw, b.cursor, b.ends) for b in handed] == [
        ([b"0", b"1"], 16, [8, 16]),
        ([b"2", b"3"], 32, [24, 32]),
        ([b"4"], 40, [40]),
        ([b"a", b"b"], 56, None),
        ([b"c"], 64, None),
    ]
    loop.run_soon()  # the callback left finds nothing to hand over
    assert len(handed) == 5
