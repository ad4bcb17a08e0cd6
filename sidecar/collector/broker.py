"""Fan-out of newly stored events to live subscribers, each with a bounded buffer.

Why bounded and then disconnect: one subscriber that reads slowly must not hold
events in the collector's memory without limit, nor slow down ingest.  When its
buffer is full it is marked overflowed and its stream ends with RESOURCE_EXHAUSTED,
naming the cursor to resume from; the events stay in the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from sidecar.api.v1 import collector_pb2
from sidecar.collector.store import matches


@dataclass(eq=False)
class Subscription:
    filter: collector_pb2.EventFilter
    queue: asyncio.Queue[collector_pb2.StoredEvent] = field(default_factory=lambda: asyncio.Queue())
    overflowed: bool = False


class Broker:
    """Hands each stored event to every matching subscription (event-loop thread only)."""

    def __init__(self, buffer: int) -> None:
        self.buffer = buffer
        self._subs: set[Subscription] = set()

    def add(self, flt: collector_pb2.EventFilter) -> Subscription:
        sub = Subscription(flt, asyncio.Queue(maxsize=self.buffer))
        self._subs.add(sub)
        return sub

    def remove(self, sub: Subscription) -> None:
        self._subs.discard(sub)

    def publish(self, events: Sequence[collector_pb2.StoredEvent]) -> None:
        """Called in cursor order (the store's single writer schedules it)."""
        for sub in list(self._subs):
            if sub.overflowed:
                continue
            for se in events:
                if not matches(sub.filter, se.event):
                    continue
                try:
                    sub.queue.put_nowait(se)
                except asyncio.QueueFull:
                    sub.overflowed = True  # the queue is full: its reader sees this next
                    break

    def __len__(self) -> int:
        return len(self._subs)
