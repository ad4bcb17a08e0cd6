"""Liveness and readiness of the host daemon and of the collector.

Liveness means "every thread that must make progress did so lately": each
such thread owns a :class:`Heartbeat` and beats it once per turn of its loop
(the daemon's event loop and its ring-buffer reader; the collector's
event loop).  A heartbeat older than its bound makes the process not live:
the systemd watchdog is then no longer fed and ``/healthz`` answers 503, so
systemd or the kubelet restarts a wedged process.

Readiness means "serving what it promises": the daemon is ready once its
programs are attached and the configured policy is in force; the collector
once its store answers.  Each condition is a check that returns ``None`` when
met or a sentence saying what is missing.

Thread: heartbeats are beaten by their own thread and read by any (a float
store and load, atomic under the GIL); checks run on the HTTP server's
thread, so they must read only state that is safe to read from there.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

_logger = logging.getLogger(__name__)

# The reader turns at least every 50 ms when idle (a thread with records to
# settle, else a tick of the event loop); only a settle step (hashing a large
# binary on a cold disk: up to seconds) or a wedge holds it longer.  The
# event loop ticks at least once a second.  Under systemd (WatchdogSec=30s) a
# stale heartbeat stops the feeding, and systemd restarts the daemon up to
# 30 s after that.
DEFAULT_BOUND_S: Final = 15.0


@dataclass
class Heartbeat:
    """The last time one thread made progress (monotonic seconds)."""

    name: str
    bound_s: float
    clock: Callable[[], float] = time.monotonic
    last: float = field(default=0.0)

    def __post_init__(self) -> None:
        if self.bound_s <= 0:
            raise ValueError(f"heartbeat bound of {self.name} must be positive, got {self.bound_s}")
        self.last = self.clock()

    def beat(self) -> None:
        """This thread made progress now."""
        self.last = self.clock()

    def age(self) -> float:
        """Seconds since the last beat."""
        return max(0.0, self.clock() - self.last)

    def stale(self) -> bool:
        return self.age() > self.bound_s


Check = Callable[[], "str | None"]


@dataclass(frozen=True)
class Verdict:
    """The answer of a probe: ok, or the reasons it is not."""

    ok: bool
    reasons: tuple[str, ...]

    def text(self) -> str:
        return "ok\n" if self.ok else "".join(f"{r}\n" for r in self.reasons)


class Health:
    """Heartbeats and readiness checks of one process."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._beats: dict[str, Heartbeat] = {}
        self._checks: list[Check] = []

    def heartbeat(self, name: str, bound_s: float = DEFAULT_BOUND_S) -> Heartbeat:
        """A new heartbeat that liveness depends on from now on, beaten once already."""
        if name in self._beats:
            raise ValueError(f"heartbeat {name} registered twice")
        beat = Heartbeat(name, bound_s, self._clock)
        self._beats[name] = beat
        return beat

    def forget(self, name: str) -> None:
        """Liveness no longer depends on ``name`` (its thread stopped on purpose)."""
        self._beats.pop(name, None)

    def require(self, check: Check) -> None:
        """Readiness depends on ``check`` from now on."""
        self._checks.append(check)

    def ages(self) -> dict[str, float]:
        """Seconds since each heartbeat's last beat."""
        return {name: beat.age() for name, beat in list(self._beats.items())}

    def live(self) -> Verdict:
        reasons = tuple(
            f"{b.name} made no progress for {b.age():.1f} s (bound {b.bound_s:.0f} s)"
            for b in list(self._beats.values())
            if b.stale()
        )
        return Verdict(not reasons, reasons)

    def ready(self) -> Verdict:
        """Ready: live, and every readiness check met."""
        reasons = list(self.live().reasons)
        for check in list(self._checks):
            problem = check()
            if problem is not None:
                reasons.append(problem)
        return Verdict(not reasons, tuple(reasons))
