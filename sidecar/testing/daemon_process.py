"""``sidecar run`` as its own process, as an operator runs it: the one launcher.

:class:`DaemonConfigFile` writes the daemon's config for a scratch cgroup
and pin directory; :func:`launch_daemon` starts the daemon on it, with its
events in a JSON-lines file and its stderr in a log, and returns when the
daemon says ``READY=1`` on a ``NOTIFY_SOCKET`` of its own (its programs
attached and its policy in force); :class:`DaemonProcess` stops or kills it
and reads its events back.  Used by the kernel tests, the benchmarks and
:class:`sidecar.testing.stack.Stack`.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sidecar.testing.scratch import repo_env, wait_until
from sidecar.util.errors import SidecarError


@dataclass(frozen=True)
class DaemonConfigFile:
    """A ``DaemonConfig`` for a daemon confined to a scratch cgroup and pin directory.

    With ``work``, the daemon's state, admin and Workload API sockets live in
    that folder and its metrics endpoint is off (unless ``metrics`` names
    one); without it, those keep the daemon's defaults.  Where the events
    go is :func:`launch_daemon`'s choice.
    """

    pin_dir: Path
    cgroup: Path | None = None
    work: Path | None = None
    host: str | None = None
    detach_on_exit: bool = True
    ring_pages: int | None = None
    entries: Path | None = None
    policy: Path | None = None
    reload_interval: int | None = None  # seconds
    collector: str | None = None  # host:port of the collector's mTLS port
    credentials: Path | None = None  # from ``sidecar enroll``
    spool_dir: Path | None = None
    #: host:port of the metrics and health endpoint; None: the daemon's
    #: default, or off with ``work``.
    metrics: str | None = None

    def document(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"apiVersion": "sidecar/v1", "kind": "DaemonConfig"}
        if self.host is not None:
            doc["host"] = self.host
        if self.cgroup is not None:
            doc["scope"] = {"cgroup": str(self.cgroup)}
        bpf: dict[str, Any] = {"pinDir": str(self.pin_dir), "detachOnExit": self.detach_on_exit}
        if self.ring_pages is not None:
            bpf["ringbufPages"] = self.ring_pages
        doc["bpf"] = bpf
        w = self.work
        if self.entries is not None or w is not None:
            identity: dict[str, Any] = {}
            if self.entries is not None:
                identity["entries"] = str(self.entries)
            if w is not None:
                identity["stateDir"] = str(w / "state")
                identity["workloadSocket"] = str(w / "workload.sock")
            doc["identity"] = identity
        if self.policy is not None:
            doc["policy"] = {"file": str(self.policy)}
            if self.reload_interval is not None:
                doc["policy"]["reloadIntervalSeconds"] = self.reload_interval
        if self.collector is not None:
            doc["collector"] = {"address": self.collector}
            if self.credentials is not None:
                doc["collector"]["credentials"] = str(self.credentials)
            if self.spool_dir is not None:
                doc["collector"]["spoolDir"] = str(self.spool_dir)
        if w is not None:
            doc["adminSocket"] = str(w / "admin.sock")
            doc["metrics"] = ""
        if self.metrics is not None:
            doc["metrics"] = self.metrics
        return doc

    def text(self) -> str:
        return yaml.safe_dump(self.document(), sort_keys=False)

    def write(self, path: Path) -> Path:
        path.write_text(self.text())
        return path


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events in a JSON-lines file so far; a line still being written is left out."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


@dataclass
class DaemonProcess:
    """A running ``sidecar run``: its process, its events file and its stderr log."""

    proc: subprocess.Popen[bytes]
    output: Path
    log: Path
    ready_seconds: float  # from launch to READY=1

    @property
    def pid(self) -> int:
        return self.proc.pid

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.output)

    def wait_for(self, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        """The first event whose fields equal ``match``, once it is there."""

        def find() -> list[dict[str, Any]]:
            return [e for e in self.events() if all(e.get(k) == v for k, v in match.items())]

        return wait_until(find, timeout, f"event {match}")[0]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` (thawing it first, unless SIGKILL) and reap it; its exit status.

        A daemon that has not exited ``timeout`` seconds later is killed.
        """
        return stop_process(self.proc, sig, timeout)

    def kill(self) -> int:
        return self.stop(signal.SIGKILL)


def stop_process(
    proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 30.0
) -> int:
    """Send ``sig`` to ``proc`` if it still runs and reap it; SIGKILL after ``timeout``."""
    if proc.poll() is None:
        if sig != signal.SIGKILL:
            proc.send_signal(signal.SIGCONT)  # a frozen process cannot act on SIGTERM
        proc.send_signal(sig)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def launch_daemon(
    config: Path,
    work: Path,
    *args: str,
    output: Path | None = None,
    log: Path | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
) -> DaemonProcess:
    """Start ``sidecar run --config CONFIG --output OUTPUT ARGS...`` and wait until it is ready.

    Its events go to ``output`` (``work/events.jsonl``), appended across
    restarts; its stderr to ``log`` (``work/daemon.log``), appended too.
    Should it exit or not be ready within ``timeout`` seconds, it is killed
    and the error carries the end of its log.
    """
    output = output or work / "events.jsonl"
    log = log or work / "daemon.log"
    notify_path = work / "notify.sock"
    notify_path.unlink(missing_ok=True)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    proc: subprocess.Popen[bytes] | None = None
    try:
        notify.bind(str(notify_path))
        notify.settimeout(1.0)
        argv = [sys.executable, "-m", "sidecar.cli", "run", "--config", str(config)]
        began = time.monotonic()
        with log.open("ab") as err:
            proc = subprocess.Popen(
                [*argv, "--output", str(output), *args],
                env={**(env or repo_env()), "NOTIFY_SOCKET": str(notify_path)},
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        deadline = began + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise SidecarError(f"the daemon exited early:\n{log.read_text()[-4000:]}")
            with contextlib.suppress(TimeoutError):
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    return DaemonProcess(proc, output, log, time.monotonic() - began)
        raise SidecarError(
            f"the daemon was not ready within {timeout}s:\n{log.read_text()[-4000:]}"
        )
    except BaseException:
        if proc is not None:
            stop_process(proc, signal.SIGKILL)
        raise
    finally:
        notify.close()
        notify_path.unlink(missing_ok=True)
