"""The real daemon (real BPF) on its own event loop in a thread of this process.

For tests that look into the daemon's state, and for benchmarks that read
its own figures: :func:`inprocess_config` points the embedded default at a
scratch cgroup, pin directory and folder; :func:`run_daemon` runs it until
the ``with`` block ends, and stops it (detaching what it attached) also
when the block fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import orjson

from sidecar.testing.scratch import wait_until

if TYPE_CHECKING:
    from sidecar.daemon.config import DaemonConfig
    from sidecar.daemon.core import Daemon
    from sidecar.daemon.outputs import EventSink
    from sidecar.events.model import Event

S = TypeVar("S", bound="EventSink")


class MemorySink:
    """Event sink that keeps events in memory for assertions (thread-safe).

    Each event is kept as its JSON line reads back, so tests see exactly what
    the JSON-lines sink writes (argv is a list there, for example).  Each is
    also decoded back from its JSON line and its wire form, and must come
    back equal: every real event the kernel tests see goes through both
    encodings (tests/unit/test_events.py does it for one of each kind).
    """

    def __init__(self) -> None:
        self.target = "<memory>"
        self.events: list[dict[str, Any]] = []
        # JSON lines of events that did not decode back equal (run_daemon fails on any)
        self.changed_by_encoding: list[bytes] = []
        self._lock = threading.Lock()

    def write(self, event: Event) -> None:
        from sidecar.events.codec import encode_json, from_json, from_proto, printable, to_proto

        encoded = encode_json(event)
        shown = printable(event)  # what both encodings carry of text that is not UTF-8
        with self._lock:
            if from_json(orjson.loads(encoded)) != shown or from_proto(to_proto(event)) != shown:
                self.changed_by_encoding.append(encoded)
            self.events.append(orjson.loads(encoded))

    def write_all(self, events: Sequence[Event]) -> None:
        from sidecar.events.codec import encode_json, write_json_lines

        for event in events:
            self.write(event)
        # The daemon's sink writes a batch this way: it must say what write() says.
        lines: list[bytes] = []
        write_json_lines(events, lines.append)
        with self._lock:
            if lines != [encode_json(event) for event in events]:
                self.changed_by_encoding.extend(lines)

    def flush(self) -> None:
        pass

    def end_offset(self) -> int | None:
        return None

    def close(self) -> None:
        pass

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def find(self, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.snapshot() if all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        found = wait_until(lambda: self.find(**match), timeout, f"event {match}")
        return found[0]


@dataclass
class InProcessDaemon(Generic[S]):
    """The running daemon, the sink it writes to, and the loop and thread it runs on."""

    daemon: Daemon
    sink: S
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def table(self) -> Any:
        return self.daemon.table

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the daemon's loop (where its state lives) and return its result."""

        async def _run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(_run(), self.loop).result(10)


def inprocess_config(cgroup: Path, pin_dir: Path, work: Path, **over: Any) -> DaemonConfig:
    """The embedded default, pointed at a run's own cgroup, pins, sockets and state."""
    from sidecar.daemon import config

    base = replace(
        config.load(None, cgroup=cgroup, output="-"),
        pin_dir=pin_dir,
        detach_on_exit=True,
        host="test-host",
        admin_socket=work / "admin.sock",
        workload_socket=work / "workload.sock",
        state_dir=work / "state",
        metrics="",
    )
    return replace(base, **over)


def run_daemon(
    cfg: DaemonConfig, metrics: Any = None
) -> contextlib.AbstractContextManager[InProcessDaemon[MemorySink]]:
    """The real daemon on its own loop in a thread, its events in a :class:`MemorySink`."""
    return run_daemon_with(cfg, MemorySink(), metrics)


@contextlib.contextmanager
def run_daemon_with(
    cfg: DaemonConfig, sink: S, metrics: Any = None
) -> Iterator[InProcessDaemon[S]]:
    """The real daemon on its own loop in a thread, writing its events to ``sink``.

    Returns once it is ready; stopped (and what it attached detached) on exit.
    """
    from sidecar.daemon.core import Daemon

    d = Daemon(cfg, sink, metrics)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    errors: list[BaseException] = []

    def _main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(d.run(on_ready=ready.set))
        except BaseException as exc:  # reported to the caller below
            errors.append(exc)
            ready.set()

    t = threading.Thread(target=_main, name="daemon", daemon=True)
    t.start()
    if not ready.wait(60):
        raise AssertionError("daemon did not become ready")
    if errors:
        raise errors[0]
    try:
        yield InProcessDaemon(d, sink, loop, t)
    finally:
        loop.call_soon_threadsafe(d.stop)
        t.join(30)
        loop.close()
        if errors:
            raise errors[0]
    changed = getattr(sink, "changed_by_encoding", None)
    if changed:
        raise AssertionError(f"{len(changed)} events changed through an encoding: {changed[:3]}")
