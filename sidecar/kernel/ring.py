"""The pinned ring buffer, read with a cursor and consumed only on commit.

The kernel keeps one consumer position per ring.  This reader moves it only
when the caller commits a position, after the events of every record before
it are written out.  The ring is pinned, so what a killed daemon had read but
not written is still there for the next daemon, which starts reading at the
consumer position.  See ``_ringbatch.c`` for the reading itself.
"""

from __future__ import annotations

import contextlib
import threading
from array import array
from dataclasses import dataclass

from sidecar.util.errors import KernelError


@dataclass(frozen=True, slots=True)
class RingRead:
    """Records taken by one read, oldest first."""

    records: list[bytes]
    #: Ring position just past each record, as native u64s (see :meth:`ends_list`).
    ends: bytes
    #: Position just past everything read so far (records and discarded space).
    cursor: int

    def ends_list(self) -> list[int]:
        out = array("Q")
        out.frombytes(self.ends)
        return out.tolist()


class Ring:
    """One thread reads (the reader's, or the event loop); commit and close may come
    from any thread."""

    def __init__(self, map_fd: int, size: int) -> None:
        try:
            from sidecar.kernel import _ringbatch
        except ImportError as exc:
            raise KernelError(
                f"the ring buffer reader is not built ({exc}); reinstall the package "
                "(make setup, or pip install .) on a host with gcc and the Python headers"
            ) from exc
        try:
            self._ring: _ringbatch.Ring | None = _ringbatch.Ring(map_fd, size)
        except OSError as exc:
            raise KernelError(f"cannot map the ring buffer: {exc}") from exc
        self._lock = threading.Lock()
        self.size = size  # bytes of data area: producer - consumer <= size

    def read(self, timeout_ms: int) -> RingRead:
        """Wait up to ``timeout_ms``, then take what is there; nothing is consumed."""
        with self._lock:
            if self._ring is None:
                raise KernelError("ring buffer is closed")
            records, ends, cursor = self._ring.read(timeout_ms)
        return RingRead(records, ends, cursor)

    def commit(self, position: int) -> None:
        """Records before ``position`` are written out: let the kernel reuse their space."""
        ring = self._ring
        if ring is not None:
            with contextlib.suppress(ValueError):  # closed meanwhile: nothing to free
                ring.commit(position)

    @property
    def consumer(self) -> int:
        ring = self._ring
        return ring.consumer if ring is not None else 0

    @property
    def producer(self) -> int:
        ring = self._ring
        return ring.producer if ring is not None else 0

    def fill(self) -> float:
        """Share of the ring written and not yet consumed (0-1); 0 once closed."""
        ring = self._ring
        if ring is None or self.size <= 0:
            return 0.0
        return min(1.0, max(0, ring.producer - ring.consumer) / self.size)

    def close(self) -> None:
        with self._lock:
            if self._ring is not None:
                self._ring.close()
                self._ring = None
