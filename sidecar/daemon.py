"""The host daemon: kernel records in, attributed events out.

A reader thread drains the ring buffer and hands decoded records to the
asyncio loop (``call_soon_threadsafe``); the loop keeps the process table
and writes each event to the sink.  Decode errors and kernel losses are
counted and reported in-band (a ``lost`` event) and in the log, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from sidecar import sdnotify
from sidecar.config import DaemonConfig
from sidecar.errors import ConfigError, KernelError
from sidecar.kernel import abi
from sidecar.kernel.checks import Mounts, preflight
from sidecar.proctable import (
    Process,
    ProcessTable,
    read_argv,
    read_cgroup,
    read_exe,
    read_status_ids,
)

_logger = logging.getLogger(__name__)

_FAMILY = {abi.AF_INET: "inet", abi.AF_INET6: "inet6"}
_PROTOCOL = {abi.IPPROTO_TCP: "tcp", abi.IPPROTO_UDP: "udp"}
_VERDICT = {
    abi.Verdict.ALLOW: "allow",
    abi.Verdict.DENY: "deny",
    abi.Verdict.WOULD_DENY: "would_deny",
}


class JsonLinesSink:
    """One JSON object per line, to stdout or an append-only file."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._fh: IO[str]
        if target == "-":
            self._fh = sys.stdout
        else:
            try:
                self._fh = open(target, "a", encoding="utf-8")  # noqa: SIM115
            except OSError as exc:
                raise ConfigError(f"output {target}: cannot open: {exc.strerror}") from exc

    def write(self, event: dict[str, Any]) -> None:
        self._fh.write(json.dumps(event, separators=(",", ":")) + "\n")

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self.flush()
        if self._fh is not sys.stdout:
            self._fh.close()


class CgroupNames:
    """cgroup id (the directory's inode number) -> path, for records of gone processes."""

    def __init__(self, root: Path, scope: Path) -> None:
        self.root = root
        self.scope = scope
        self._cache: dict[int, str] = {}

    def name(self, cgroup_id: int) -> str:
        if cgroup_id not in self._cache:
            self._rescan()
            # cgroup ids are never reused, so an unknown one stays unknown.
            self._cache.setdefault(cgroup_id, "")
        return self._cache[cgroup_id]

    def _rescan(self) -> None:
        for dirpath, _dirs, _files in os.walk(self.scope):
            with contextlib.suppress(OSError):
                ino = os.stat(dirpath).st_ino
                rel = "/" + os.path.relpath(dirpath, self.root)
                self._cache[ino] = "/" if rel == "/." else rel


class Daemon:
    """One run of the host daemon."""

    def __init__(self, config: DaemonConfig, sink: JsonLinesSink) -> None:
        self.config = config
        self.sink = sink
        self.table = ProcessTable()
        self.counts: Counter[str] = Counter()
        self.decode_errors = 0
        self.lost_reported: dict[abi.EventType, int] = {}
        self._stop = asyncio.Event()
        self._reader_stop = threading.Event()
        self._clock_offset = time.time_ns() - time.monotonic_ns()
        self._programs: Any = None
        self._mounts: Mounts | None = None
        self.scope: Path = Path("/")
        self.scope_rel = "/"
        self._cgroups: CgroupNames | None = None
        self.started_ns = 0
        self._realpaths: dict[str, str] = {}

    # -- start-up ------------------------------------------------------------------

    def _resolve_scope(self, mounts: Mounts) -> None:
        scope = (self.config.scope_cgroup or mounts.cgroup2).resolve()
        root = mounts.cgroup2.resolve()
        if scope != root and root not in scope.parents:
            raise ConfigError(
                f"scope cgroup {scope} is not inside the cgroup2 mount {root}: "
                "point scope.cgroup / --cgroup at a directory under it"
            )
        self.scope = scope
        rel = "/" + os.path.relpath(scope, root)
        self.scope_rel = "/" if rel == "/." else rel
        self._cgroups = CgroupNames(root, scope)

    def start_kernel(self) -> float:
        """Check the host, load and attach the programs; returns seconds it took."""
        from sidecar.kernel.loader import KernelPrograms, LoadOptions

        began = time.monotonic()
        self._mounts = preflight()
        self._resolve_scope(self._mounts)
        self._programs = KernelPrograms(
            LoadOptions(
                pin_dir=self.config.pin_dir,
                scope=self.scope,
                tracefs=self._mounts.tracefs,
                procs_max=self.config.procs_max,
                ringbuf_pages=self.config.ringbuf_pages,
            )
        )
        self._programs.load()
        report = self._programs.attach()
        took = time.monotonic() - began
        _logger.info(
            "programs attached to %s in %.2f s (compile %.2f s); links created %s, taken over %s",
            self.scope,
            took,
            report.compile_seconds,
            ",".join(report.created) or "none",
            ",".join(report.adopted) or "none",
        )
        return took

    def rebuild_from_proc(self) -> int:
        """Fill the table with processes already running in scope (e.g. after a restart)."""
        added = 0
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            pid = int(entry)
            cg = read_cgroup(pid)
            if cg is None or not self._in_scope_path(cg):
                continue
            ids = read_status_ids(pid)
            if ids is None:
                continue
            self.table.add(
                Process(
                    pid=pid,
                    start_ns=time.monotonic_ns(),
                    ppid=ids[0],
                    uid=ids[1],
                    gid=ids[2],
                    exe=read_exe(pid) or "",
                    argv=read_argv(pid) or (),
                    cgroup=cg,
                )
            )
            added += 1
        return added

    def _in_scope_path(self, cg: str) -> bool:
        return self.scope_rel == "/" or cg == self.scope_rel or cg.startswith(self.scope_rel + "/")

    # -- running ---------------------------------------------------------------------

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM/SIGINT or :meth:`stop`."""
        loop = asyncio.get_running_loop()
        self.started_ns = time.monotonic_ns()
        took = self.start_kernel()
        try:
            rebuilt = self.rebuild_from_proc()
            _logger.info("process table rebuilt from /proc: %d processes in scope", rebuilt)
            signals = threading.current_thread() is threading.main_thread()
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.add_signal_handler(sig, self.stop)
            reader = threading.Thread(
                target=self._read_ring, args=(loop,), name="ringbuf-reader", daemon=True
            )
            reader.start()
            sdnotify.ready(f"attached to {self.scope} in {took:.2f}s")
            if on_ready is not None:
                on_ready()
            watchdog = sdnotify.watchdog_interval()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=min(1.0, watchdog or 1.0))
                self._check_lost()
                self.sink.flush()
                if watchdog:
                    sdnotify.watchdog()
            sdnotify.stopping()
            self._reader_stop.set()
            await loop.run_in_executor(None, reader.join, 5.0)
            # Records the reader handed over just before it stopped.
            await asyncio.sleep(0)
            self._check_lost()
        finally:
            if threading.current_thread() is threading.main_thread():
                for sig in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(sig)
            self.sink.flush()
            self._programs.close(detach=self.config.detach_on_exit)
            if not self.config.detach_on_exit:
                _logger.info(
                    "programs stay attached (fail-static); 'sidecar uninstall' removes them"
                )

    def stop(self) -> None:
        self._stop.set()

    def _read_ring(self, loop: asyncio.AbstractEventLoop) -> None:
        programs = self._programs
        while not self._reader_stop.is_set():
            try:
                records = programs.poll(100)
            except KernelError:
                _logger.exception("ring buffer poll failed")
                time.sleep(0.1)
                continue
            if not records:
                continue
            events: list[abi.KernelEvent] = []
            errors = 0
            for raw in records:
                try:
                    events.append(abi.decode(raw))
                except abi.DecodeError as exc:
                    errors += 1
                    _logger.debug("undecodable record: %s", exc)
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(self._handle_batch, events, errors)

    def _handle_batch(self, events: list[abi.KernelEvent], errors: int) -> None:
        self.decode_errors += errors
        for ev in events:
            self.handle(ev)

    # -- events --------------------------------------------------------------------

    def _time(self, ts_ns: int) -> str:
        wall = (self._clock_offset + ts_ns) / 1e9
        return datetime.fromtimestamp(wall, UTC).isoformat(timespec="microseconds")

    def _cgroup(self, pid: int, cgroup_id: int) -> str:
        cg = read_cgroup(pid)
        if cg is not None:
            return cg
        assert self._cgroups is not None
        return self._cgroups.name(cgroup_id)

    def _base(self, kind: str, ev: abi.KernelEvent, proc: Process | None) -> dict[str, Any]:
        task = ev.task
        return {
            "type": kind,
            "time": self._time(ev.ts_ns),
            "host": self.config.host,
            "pid": task.pid,
            "ppid": proc.ppid if proc else task.ppid,
            "uid": task.uid,
            "gid": task.gid,
            "comm": task.comm,
            "exe": proc.exe if proc else "",
            "argv": list(proc.argv) if proc else [],
            "cgroup": proc.cgroup if proc else "",
            "identity": proc.identity if proc else None,
            "instance_id": proc.instance_id if proc else None,
            "svid_serial": proc.svid_serial if proc else None,
        }

    def handle(self, ev: abi.KernelEvent) -> None:
        """Update the table from one kernel record and emit its event."""
        if isinstance(ev, abi.Exec):
            out = self._on_exec(ev)
        elif isinstance(ev, abi.Fork):
            out = self._on_fork(ev)
        elif isinstance(ev, abi.Exit):
            out = self._on_exit(ev)
        else:
            out = self._on_connect(ev)
        self.counts[out["type"]] += 1
        self.sink.write(out)

    def _ppid(self, ev: abi.KernelEvent) -> int:
        if ev.task.ppid:
            return ev.task.ppid
        ids = read_status_ids(ev.task.pid)
        return ids[0] if ids else 0

    def _exe(self, pid: int, filename: str) -> str:
        """The executable's canonical path, without a /proc read when the name is absolute."""
        if not filename.startswith("/"):
            return read_exe(pid) or filename
        exe = self._realpaths.get(filename)
        if exe is None:
            if len(self._realpaths) > 4096:
                self._realpaths.clear()
            exe = self._realpaths[filename] = os.path.realpath(filename)
        return exe

    def _on_exec(self, ev: abi.Exec) -> dict[str, Any]:
        pid = ev.task.pid
        proc = self.table.get(pid)
        exe = self._exe(pid, ev.filename)
        argv = ev.argv if not ev.args_missing else (read_argv(pid) or ())
        if proc is not None:
            # The same process (no exit seen since its fork), with a new image.
            proc.exe, proc.argv, proc.exec_count = exe, argv, proc.exec_count + 1
        else:
            assert self._cgroups is not None
            proc = self.table.add(
                Process(
                    pid=pid,
                    start_ns=ev.ts_ns,
                    ppid=self._ppid(ev),
                    uid=ev.task.uid,
                    gid=ev.task.gid,
                    exe=exe,
                    argv=argv,
                    cgroup=self._cgroups.name(ev.task.cgroup_id) or self._cgroup(pid, 0),
                    exec_count=1,
                )
            )
        out = self._base("exec", ev, proc)
        out["filename"] = ev.filename
        out["args_truncated"] = ev.args_truncated
        out["verdict"] = _VERDICT[ev.verdict]
        return out

    def _on_fork(self, ev: abi.Fork) -> dict[str, Any]:
        parent = self.table.get(ev.task.pid)
        child = ev.child_pid
        assert self._cgroups is not None
        proc = self.table.add(
            Process(
                pid=child,
                start_ns=ev.ts_ns,
                ppid=ev.task.pid,
                uid=ev.task.uid,
                gid=ev.task.gid,
                exe=parent.exe if parent else (read_exe(child) or ""),
                argv=parent.argv if parent else (read_argv(child) or ()),
                cgroup=parent.cgroup if parent else self._cgroups.name(ev.task.cgroup_id),
                identity=parent.identity if parent else None,
            )
        )
        out = self._base("fork", ev, proc)
        out["pid"] = child
        out["ppid"] = ev.task.pid
        return out

    def _on_exit(self, ev: abi.Exit) -> dict[str, Any]:
        proc = self.table.remove(ev.task.pid)
        return self._base("exit", ev, proc)

    def _on_connect(self, ev: abi.Connect) -> dict[str, Any]:
        proc = self.table.get(ev.task.pid)
        out = self._base("connect", ev, proc)
        out["family"] = _FAMILY.get(ev.family, str(ev.family))
        out["protocol"] = _PROTOCOL.get(ev.protocol, str(ev.protocol))
        out["daddr"] = str(ev.address)
        out["dport"] = ev.port
        out["hook"] = ev.hook.name.lower()
        out["verdict"] = _VERDICT[ev.verdict]
        return out

    def _check_lost(self) -> None:
        if self._programs is None:
            return
        counts = self._programs.lost_counts()
        delta = {t: n - self.lost_reported.get(t, 0) for t, n in counts.items()}
        if any(d > 0 for d in delta.values()):
            self.lost_reported = counts
            lost = {t.name.lower(): d for t, d in delta.items() if d > 0}
            _logger.warning("kernel ring buffer full: %s records lost", lost)
            self.counts["lost"] += 1
            self.sink.write(
                {
                    "type": "lost",
                    "time": datetime.now(UTC).isoformat(timespec="microseconds"),
                    "host": self.config.host,
                    "reason": "ringbuf_full",
                    "counts": lost,
                }
            )
