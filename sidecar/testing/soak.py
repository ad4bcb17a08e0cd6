"""Exec load through the whole product while its parts are frozen and killed.

A driver in the stack's cgroup starts ``/usr/bin/true soak-N`` at a steady
rate; every process there is attested and held to an enforcing policy, and
every event streams to the collector.  On a schedule the collector is frozen
(SIGSTOP) and thawed, killed (SIGKILL) and restarted, and the daemon killed
and restarted.  At the end the collector's store is compared with what the
driver started: each exec stored once, or reported lost by the host.

Used by ``tests/kernel/test_faults_end_to_end.py`` (one short cycle) and
``benchmarks/bench_soak.py`` (the 30-minute soak).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from sidecar.kernel.checks import cgroup2_root
from sidecar.proc.cgroups import DANGEROUS_CAPS, launch_argv
from sidecar.testing.stack import Stack

AGENT = "spiffe://example.org/agent/soak"
TRUE = os.path.realpath("/usr/bin/true")
MARK = "soak-"

DRIVER = r"""
import os, sys, time
rate, seconds, out, true = float(sys.argv[1]), float(sys.argv[2]), sys.argv[3], sys.argv[4]
start, i = time.monotonic(), 0
while time.monotonic() - start < seconds:
    i += 1
    pid = os.posix_spawn(true, [true, f"soak-{i}"], {})
    os.waitpid(pid, 0)
    delay = start + i / rate - time.monotonic()
    if delay > 0:
        time.sleep(delay)
with open(out + ".tmp", "w") as fh:
    fh.write(str(i))
os.replace(out + ".tmp", out)
"""

#: One fault cycle, as (fraction of the cycle, action).
CYCLE = (
    (0.10, "freeze collector"),
    (0.25, "thaw collector"),
    (0.35, "kill collector"),
    (0.42, "start collector"),
    (0.55, "kill daemon"),
    (0.60, "start daemon"),
)


@dataclass
class SoakResult:
    started: int = 0  # execs the driver made
    stored: int = 0  # distinct ones in the collector's store
    duplicates: int = 0  # stored more than once
    lost: Counter[tuple[str, str]] = field(default_factory=Counter)  # reported, all kinds
    #: (seconds since start, daemon RSS in KiB, daemon open descriptors)
    samples: list[tuple[float, int, int]] = field(default_factory=list)
    actions: list[tuple[float, str]] = field(default_factory=list)
    settle_seconds: float = 0.0
    #: The same three figures for the daemon's local output (the JSON lines file)
    sink_stored: int = 0
    sink_duplicates: int = 0
    sink_lost_execs: int = 0

    @property
    def lost_execs(self) -> int:
        return sum(n for (kind, _), n in self.lost.items() if kind == "exec")


def _proc_figures(pid: int) -> tuple[int, int] | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None
    rss = next(
        (int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:")), 0
    )
    return rss, fds


def config(stack: Stack) -> tuple[str, str]:
    """Registration entries and an enforcing policy for everything in the stack's cgroup."""
    rel = "/" + str(stack.cgroup.relative_to(cgroup2_root()))
    python = os.path.realpath(sys.executable)
    entries = f"""apiVersion: sidecar/v1
kind: RegistrationEntries
trustDomain: example.org
entries:
  - spiffeId: {AGENT}
    selectors: [unix:uid:{os.getuid()}, "cgroup:path:{rel}"]
"""
    policy = f"""apiVersion: sidecar/v1
kind: Policy
defaults:
  unidentified: allow
identities:
  - id: {AGENT}
    mode: enforce
    egress:
      - name: loopback-echo
        cidrs: [127.0.0.1/32]
        ports: [7]
        protocols: [tcp]
    exec: [{python}, {TRUE}]
"""
    return entries, policy


def run(
    stack: Stack,
    *,
    seconds: float,
    rate: float,
    cycles: int = 1,
    settle_timeout: float = 120.0,
    ring_pages: int = 256,
    log: Callable[[str], None] = lambda _msg: None,
) -> SoakResult:
    """Run the load with ``cycles`` fault cycles spread over ``seconds``.

    ``ring_pages``: the daemon's ring buffer, which holds what the kernel
    records while the daemon is down (about 0.5 KiB per exec here).
    """
    result = SoakResult()
    stack.start_collector()
    stack.enroll()
    entries, policy = config(stack)
    stack.write_daemon_config(entries, policy, ring_pages=ring_pages)
    stack.start_daemon()
    count_file = stack.work / "driver.count"
    driver = subprocess.Popen(
        launch_argv(
            [sys.executable, "-c", DRIVER, str(rate), str(seconds), str(count_file), TRUE],
            cgroup=stack.cgroup,
            drop_caps=DANGEROUS_CAPS,
        ),
        env=stack.env,
    )
    stack.procs.append(driver)
    period = seconds / cycles
    schedule = sorted((c * period + f * period, what) for c in range(cycles) for f, what in CYCLE)
    t0 = time.monotonic()
    next_sample = 0.0
    try:
        for at, what in schedule:
            while (now := time.monotonic() - t0) < at:
                if now >= next_sample:
                    if stack.daemon is not None and (got := _proc_figures(stack.daemon.pid)):
                        result.samples.append((round(now, 1), *got))
                    next_sample = now + max(1.0, seconds / 180)
                time.sleep(min(0.2, at - now))
            log(f"{now:7.1f}s  {what}")
            result.actions.append((round(now, 1), what))
            _act(stack, what)
        if driver.wait(seconds + 60) != 0:
            raise RuntimeError(f"the load driver failed (exit {driver.returncode})")
        result.started = int(count_file.read_text())
        settle_start = time.monotonic()
        deadline = settle_start + settle_timeout
        while True:
            _tally(stack, result)
            if result.stored + result.lost_execs >= result.started:
                time.sleep(2.0)  # anything stored twice would show by now
                _tally(stack, result)
                break
            if time.monotonic() > deadline:
                break
            time.sleep(1.0)
        result.settle_seconds = time.monotonic() - settle_start
        _tally_sink(stack, result)
    finally:
        if driver.poll() is None:
            driver.kill()
            driver.wait()
    return result


def _act(stack: Stack, what: str) -> None:
    if what == "freeze collector" and stack.collector is not None:
        stack.collector.send_signal(signal.SIGSTOP)
    elif what == "thaw collector" and stack.collector is not None:
        stack.collector.send_signal(signal.SIGCONT)
    elif what == "kill collector":
        stack.stop(stack.collector, signal.SIGKILL)
    elif what == "start collector":
        stack.start_collector()
    elif what == "kill daemon" and stack.daemon is not None:
        stack.daemon.kill()
    elif what == "start daemon":
        stack.start_daemon()


def _tally(stack: Stack, result: SoakResult) -> None:
    seen: Counter[str] = Counter()
    for ev in stack.stored("exec"):
        argv = list(ev.exec.argv)  # type: ignore[attr-defined]
        if len(argv) > 1 and argv[1].startswith(MARK):
            seen[argv[1]] += 1
    result.stored = len(seen)
    result.duplicates = sum(n - 1 for n in seen.values())
    result.lost = stack.stored_losses()


def _tally_sink(stack: Stack, result: SoakResult) -> None:
    """The local output, written ahead of the spool: each exec once there too, or lost."""
    seen: Counter[str] = Counter()
    lost = 0
    with (stack.work / "events.jsonl").open("rb") as fh:
        for line in fh:
            ev = json.loads(line)
            if ev["type"] == "exec":
                argv = ev.get("argv") or []
                if len(argv) > 1 and argv[1].startswith(MARK):
                    seen[argv[1]] += 1
            elif ev["type"] == "lost":
                lost += ev["counts"].get("exec", 0)
    result.sink_stored = len(seen)
    result.sink_duplicates = sum(n - 1 for n in seen.values())
    result.sink_lost_execs = lost
