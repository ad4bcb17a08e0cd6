"""Fan-out of newly stored events to live subscribers, each with a bounded buffer.

Why bounded and then disconnect: one subscriber that reads slowly must not hold
events in the collector's memory without limit, nor slow down ingest.  When its
buffer is full it is marked overflowed and its stream ends with RESOURCE_EXHAUSTED,
naming the cursor to resume from; the events stay in the store.

Where events come from: with a store only this process writes (SQLite), the
server publishes what it stored itself.  With a shared store (PostgreSQL,
several replicas) a :class:`StoreFeed` reads every new row back by cursor,
woken by the store's change notifications, so a subscriber of any replica sees
the rows of every replica, in cursor order.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

from sidecar.api.v1 import collector_pb2
from sidecar.collector.store import StoreError, matches

_logger = logging.getLogger(__name__)

#: A shared store is read again this often even without a notification.
FEED_POLL_S = 1.0
#: And at most this often: each read first waits, for an instant, for every
#: replica's writes in progress to end (the store's horizon), which holds back
#: the writers meanwhile; under load notifications come all the time.
FEED_MIN_GAP_S = 0.05


@dataclass(eq=False)
class Subscription:
    filter: collector_pb2.EventFilter
    queue: asyncio.Queue[collector_pb2.StoredEvent] = field(default_factory=lambda: asyncio.Queue())
    overflowed: bool = False
    # The subscriber's cursor when it was added: a feed starting for it reads from here.
    after: int = 0


class Broker:
    """Hands each stored event to every matching subscription (event-loop thread only)."""

    def __init__(self, buffer: int) -> None:
        self.buffer = buffer
        self._subs: set[Subscription] = set()

    def add(self, flt: collector_pb2.EventFilter, after: int = 0) -> Subscription:
        sub = Subscription(flt, asyncio.Queue(maxsize=self.buffer), after=after)
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

    def first_after(self) -> int:
        """The lowest cursor any subscription was added at (0 without subscriptions)."""
        return min((s.after for s in self._subs), default=0)


Read = Callable[[int, int], Awaitable[Sequence[collector_pb2.StoredEvent]]]


class StoreFeed:
    """Feeds a broker from a shared store: after each wake-up, every row past the last one.

    It reads only while someone subscribes.  When the first subscription of a
    quiet spell arrives, it starts at that subscription's cursor; the subscriber
    itself replays up to there and drops what it already has, so nothing is
    skipped or repeated.  The store reads only up to a cursor below which no row
    can appear any more (its horizon), so reading "after the last cursor" misses none.
    """

    def __init__(self, broker: Broker, read: Read, page: int) -> None:
        self.broker = broker
        self._read = read
        self._page = page
        self._wake = asyncio.Event()
        self._last: int | None = None

    def wake(self) -> None:
        """Something may have been stored (event-loop thread)."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._wake.wait(), FEED_POLL_S)
            self._wake.clear()
            try:
                await self._drain()
            except StoreError as exc:  # the database is away: try again on the next wake
                _logger.warning("reading new events for subscribers failed: %s", exc)
            if self.broker:
                await asyncio.sleep(FEED_MIN_GAP_S)

    async def _drain(self) -> None:
        while True:
            if not self.broker:
                self._last = None
                return
            if self._last is None:
                self._last = self.broker.first_after()
            rows = await self._read(self._last, self._page)
            if rows:
                self.broker.publish(rows)
                self._last = rows[-1].cursor
            if len(rows) < self._page:
                return
