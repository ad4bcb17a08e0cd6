"""A collector, an enrolled host and a daemon, as separate processes, on loopback.

The one harness behind ``make demo``, the end-to-end fault tests and the
soak benchmark.  Everything lives in a :class:`~sidecar.testing.scratch.Scratch`
of its own (work folder, scratch cgroup, pin directory); :meth:`Stack.cleanup`
stops every process it started and removes all three.  Processes can be
frozen, killed and restarted, as an operator's bad day would go, and the
collector's store is read back to compare with what happened.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from sidecar.testing.daemon_process import (
    DaemonConfigFile,
    DaemonProcess,
    launch_daemon,
    stop_process,
)
from sidecar.testing.scratch import Scratch, free_port, repo_env
from sidecar.util.errors import SidecarError


def wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SidecarError(f"{log.stem} exited early:\n{log.read_text()[-4000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise SidecarError(f"{log.stem} did not listen on port {port} within {timeout}s")


class Stack:
    """One host and its collector.  Call :meth:`cleanup` in a ``finally``."""

    def __init__(
        self, scratch: Scratch, *, host: str = "stack-host", trust_domain: str = "example.org"
    ) -> None:
        self.scratch = scratch
        self.work = scratch.work
        self.cgroup = scratch.cgroup
        self.pin_dir = scratch.pin_dir
        self.host = host
        self.trust_domain = trust_domain
        self.env = repo_env()
        self.procs: list[subprocess.Popen[bytes]] = []
        self.collector: subprocess.Popen[bytes] | None = None
        self.daemon: DaemonProcess | None = None
        self.mtls_port = free_port()
        self.enroll_port = free_port()
        self.collector_yaml = self.work / "collector.yaml"
        self.daemon_yaml = self.work / "daemon.yaml"

    # -- processes -----------------------------------------------------------------

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise SidecarError(f"sidecar {' '.join(args[:2])} failed: {out.stderr.strip()}")
        return out.stdout

    def start(
        self,
        *args: str,
        log: str,
        env: dict[str, str] | None = None,
        stdout: int | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        """``sidecar ARGS...``, its stderr in ``work/LOG``; ``stdout=None`` shares ours."""
        with (self.work / log).open("ab") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.cli", *args],
                env=env or self.env,
                stdout=stdout,
                stderr=fh,
            )
        self.procs.append(proc)
        return proc

    @staticmethod
    def stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
        if proc is not None:
            stop_process(proc, sig)

    # -- the collector -------------------------------------------------------------

    def start_collector(self, subscribers: tuple[str, ...] = ()) -> subprocess.Popen[bytes]:
        """Start (or restart, on the same ports and data) the collector."""
        if not self.collector_yaml.exists():
            self.collector_yaml.write_text(
                f"""apiVersion: sidecar/v1
kind: CollectorConfig
trustDomain: {self.trust_domain}
dataDir: {self.work}/collector
listen: 127.0.0.1:{self.mtls_port}
enrollmentListen: 127.0.0.1:{self.enroll_port}
subscribers: [{", ".join(subscribers)}]
metrics: ""
"""
            )
        self.collector = self.start(
            "collector", "--config", str(self.collector_yaml), log="collector.log"
        )
        wait_port(self.mtls_port, self.collector, self.work / "collector.log")
        return self.collector

    def enroll(self) -> str:
        """Enroll this host with a single-use join token; returns what ``enroll`` printed."""
        cfg = str(self.collector_yaml)
        (self.work / "bundle.pem").write_text(self.cli("collector", "--config", cfg, "--bundle"))
        token = self.cli("collector", "--config", cfg, "--join-token", self.host).strip()
        return self.cli(
            "enroll",
            "--collector",
            f"127.0.0.1:{self.enroll_port}",
            "--token",
            token,
            "--bundle",
            str(self.work / "bundle.pem"),
            "--out",
            str(self.work / "host"),
        ).strip()

    def issue_svid(self, spiffe_id: str, out: str) -> Path:
        folder = self.work / out
        self.cli(
            "collector",
            "--config",
            str(self.collector_yaml),
            "--issue-svid",
            spiffe_id,
            "--out",
            str(folder),
        )
        return folder

    def stored(self, kind: str | None = None) -> list[object]:
        """Events in the collector's store (``event_pb2.Event``), oldest first."""
        from sidecar.api.v1 import event_pb2

        db_path = self.work / "collector" / "events.db"
        if not db_path.exists():
            return []
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
        try:
            sql, args = "SELECT data FROM events", tuple[str, ...]()
            if kind is not None:
                sql, args = sql + " WHERE kind = ?", (kind,)
            rows = db.execute(sql + " ORDER BY id", args).fetchall()
        finally:
            db.close()
        return [event_pb2.Event.FromString(row[0]) for row in rows]

    def stored_losses(self) -> Counter[tuple[str, str]]:
        """Every loss the host reported to the collector, by (kind, reason)."""
        out: Counter[tuple[str, str]] = Counter()
        for ev in self.stored("lost"):
            for c in ev.lost.counts:  # type: ignore[attr-defined]
                out[(c.kind, c.reason)] += c.count
        return out

    # -- the daemon ----------------------------------------------------------------

    def write_daemon_config(self, entries: str, policy: str, ring_pages: int = 256) -> None:
        w = self.work
        (w / "entries.yaml").write_text(entries)
        (w / "policy.yaml").write_text(policy)
        DaemonConfigFile(
            pin_dir=self.pin_dir,
            cgroup=self.cgroup,
            work=w,
            host=self.host,
            ring_pages=ring_pages,
            entries=w / "entries.yaml",
            policy=w / "policy.yaml",
            collector=f"127.0.0.1:{self.mtls_port}",
            credentials=w / "host",
            spool_dir=w / "spool",
        ).write(self.daemon_yaml)

    def start_daemon(self, timeout: float = 60) -> DaemonProcess:
        """Start (or restart) the daemon and wait until it says it is ready."""
        self.daemon = launch_daemon(self.daemon_yaml, self.work, env=self.env, timeout=timeout)
        self.procs.append(self.daemon.proc)
        return self.daemon

    # -- teardown ------------------------------------------------------------------

    def cleanup(self, keep_work: bool = False) -> None:
        for p in self.procs:
            self.stop(p)
        try:
            self.scratch.remove(keep_work=keep_work)
        except OSError as exc:
            print(
                f"scratch cgroup {self.cgroup} or pins {self.pin_dir} not removed: {exc.strerror}",
                file=sys.stderr,
            )
