"""The listeners every event goes to: the local sink, the exporter, the event counts.

An event is one typed object (:mod:`sidecar.events.model`); the sink writes
its JSON line and the exporter takes its wire form.  Until the exporter has
started (it needs the host's credentials, about a second in), events and
spool marks wait here, in order.

Also here: ring delivery.  The kernel's ring consumer position moves only
once the events of every record before it are in the local output and, with
a collector, in the spool; the pinned ``delivered`` map remembers where each
output got to, so that a restarted daemon re-reads what the last one left
and sends each event only to the outputs that lack it.

Thread: the event loop, except the spool marks' callbacks, which the spool
writer thread runs (they only write pinned maps and commit the ring).
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import IO, TYPE_CHECKING, Protocol

from sidecar.events.codec import encode_json, to_proto, write_json_lines
from sidecar.util.errors import ConfigError

if TYPE_CHECKING:
    from sidecar.api.v1 import event_pb2
    from sidecar.daemon.stages import Exporting, RingBuffer, VerdictMetrics
    from sidecar.events.model import Event

_logger = logging.getLogger(__name__)

# Events kept for the exporter until it starts (start-up takes about a second).
BEFORE_EXPORT_MAX = 100_000


class EventSink(Protocol):
    def write(self, event: Event) -> None: ...
    def write_all(self, events: Sequence[Event]) -> None:
        """write() for each, in order."""
        ...

    def flush(self) -> None: ...
    def close(self) -> None: ...
    def end_offset(self) -> int | None:
        """The output's size once what was written is flushed; None if it cannot say."""
        ...


class JsonLinesSink:
    """One JSON object per line, to stdout or an append-only file.

    orjson, because at thousands of events a second the standard encoder was
    the daemon's largest single cost per event.
    """

    def __init__(self, target: str) -> None:
        self.target = target
        self._fh: IO[bytes]
        if target == "-":
            self._fh = sys.stdout.buffer
        else:
            try:
                # A large buffer: the loop flushes it every second anyway, and at
                # thousands of events a second an 8 KiB one meant a write() every
                # dozen events.
                self._fh = open(target, "ab", buffering=1 << 20)  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"output {target}: cannot open: {exc.strerror}") from exc

    def write(self, event: Event) -> None:
        self._fh.write(encode_json(event))

    def write_all(self, events: Sequence[Event]) -> None:
        write_json_lines(events, self._fh.write)

    def flush(self) -> None:
        self._fh.flush()

    def end_offset(self) -> int | None:
        """The file's size once flushed (opened for append: the size it had, plus
        what was written since); None for stdout, whose size says nothing."""
        if self._fh is sys.stdout.buffer:
            return None
        return self._fh.tell()

    def close(self) -> None:
        self.flush()
        if self._fh is not sys.stdout.buffer:
            self._fh.close()


class NullSink:
    """No local copy: events go only to the collector."""

    def write(self, event: Event) -> None:
        pass

    def write_all(self, events: Sequence[Event]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def end_offset(self) -> int | None:
        return None


class Outputs:
    """Hands each event to the sink and the exporter, and counts it."""

    def __init__(
        self,
        sink: EventSink,
        *,
        exporting: bool,
        counts: dict[str, int] | None = None,
        metrics: VerdictMetrics | None = None,
    ) -> None:
        self.sink = sink
        self.metrics = metrics
        #: Events emitted, by kind (the metrics endpoint reads the same dict).
        self.counts: dict[str, int] = counts if counts is not None else {}
        self.exporter: Exporting | None = None
        # Wire events and spool-mark callbacks made before the exporter starts;
        # None once it has, or with no collector.
        self._early: list[event_pb2.Event | Callable[[], None]] | None = [] if exporting else None
        self.early_dropped = 0

    def emit(self, event: Event, to_sink: bool = True, to_export: bool = True) -> None:
        kind = event.KIND
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if to_sink:
            self.sink.write(event)
        if to_export:
            self._export(event)

    def emit_all(self, events: Sequence[Event]) -> None:
        """emit() each event, in order, to every output: the sink writes them at once."""
        counts = self.counts
        for event in events:
            kind = event.KIND
            counts[kind] = counts.get(kind, 0) + 1
        self.sink.write_all(events)
        if self.exporter is not None or self._early is not None:
            for event in events:
                self._export(event)

    def _export(self, event: Event) -> None:
        if self.exporter is not None:
            self.exporter.submit(to_proto(event))
        elif self._early is not None:
            if len(self._early) < BEFORE_EXPORT_MAX:
                self._early.append(to_proto(event))
            else:
                self.early_dropped += 1
                if self.metrics is not None:
                    self.metrics.record_loss("before_export", 1)

    def when_spooled(self, then: Callable[[], None]) -> None:
        """Call ``then`` once the events emitted so far are in the spool (at once without one)."""
        if self.exporter is not None:
            self.exporter.submit_mark(then)
        elif self._early is not None:
            self._early.append(then)  # handed to the exporter, in order, when it starts
        else:
            then()

    def start_exporting(self, exporter: Exporting) -> None:
        """The exporter runs: hand it what start-up made, in order, then everything new."""
        early, self._early = self._early or [], None
        for item in early:
            if callable(item):
                exporter.submit_mark(item)
            else:
                exporter.submit(item)
        self.exporter = exporter


class Delivery:
    """Ring positions: what each output has written, and when the kernel may reuse it."""

    def __init__(
        self,
        outputs: Outputs,
        ring: RingBuffer,
        pin: Callable[[str, int], None],
        *,
        exporting: bool,
    ) -> None:
        self.outputs = outputs
        self.ring = ring
        self._pin = pin  # KernelMaps.set_delivered
        self.exporting = exporting
        # Ring positions each output had written through when this daemon started:
        # records before them, left unconsumed by a killed daemon, are re-read
        # and go only to the outputs that lack them.
        self.replay_sink = 0
        self.replay_export = 0
        self.replay_until = 0
        self.sink_through = 0

    def adopt(self, done: dict[str, int]) -> None:
        """Take over the pinned ring where the last daemon's outputs stopped."""
        producer, consumer = self.ring.producer, self.ring.consumer
        positions = ("sink", "export", "sink_intent")  # sink_intent_end is a file size
        if any(done[name] > producer for name in positions):
            done = dict.fromkeys(done, 0)  # positions of a ring since made anew
        self.replay_sink = done["sink"]
        end = self.outputs.sink.end_offset()
        # Killed after a batch's flush and before its position was pinned: if
        # the file holds the whole batch, it must not be written again.
        if (
            done["sink_intent"] > done["sink"]
            and end is not None
            and end >= done["sink_intent_end"]
        ):
            self.replay_sink = done["sink_intent"]
        self.replay_export = done["export"] if self.exporting else 0
        self.replay_until = max(self.replay_sink, self.replay_export)
        self.sink_through = consumer
        if producer > consumer:
            _logger.info(
                "ring buffer holds %d bytes of records a previous daemon left unconsumed: "
                "reading them (%d bytes of them already in the local output, %d in the spool)",
                producer - consumer,
                max(0, self.replay_sink - consumer),
                max(0, self.replay_export - consumer),
            )

    def outputs_for(self, end: int | None) -> tuple[bool, bool]:
        """(to the sink, to the exporter) for a record ending at ``end`` (None: not re-read)."""
        if end is None:
            return True, True
        return end > self.replay_sink, end > self.replay_export

    def delivered(self, cursor: int) -> None:
        """The events of every record before ``cursor`` are handed to the outputs.

        The sink is flushed and its position pinned; the ring consumes the
        records once the spool has them too (at once with no collector).  A
        daemon killed before that leaves them in the ring for the next one.
        Before the flush, the position and the size the file will have are
        pinned as an intent: a daemon killed between the flush and the pin
        leaves its successor able to tell the batch reached the file.
        """
        sink = self.outputs.sink
        end = sink.end_offset()
        if end is not None:
            self._pin("sink_intent_end", end)  # first: an intent always has its end
            self._pin("sink_intent", cursor)
        sink.flush()
        self._pin("sink", cursor)
        self.sink_through = cursor
        if self.exporting:
            self.outputs.when_spooled(lambda: self._export_written(cursor))
        else:
            self.ring.commit(cursor)

    def _export_written(self, cursor: int) -> None:
        """Spool-writer thread: the spool holds the events of the records before ``cursor``."""
        self._pin("export", cursor)
        self.ring.commit(cursor)

    def release(self) -> None:
        """The spool takes nothing more: do not hold the ring for it."""
        self.ring.commit(self.sink_through)
