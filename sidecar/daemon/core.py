"""The host daemon: kernel records in, attested identities and attributed events out.

A reader thread drains the ring buffer and hands decoded records to the
asyncio loop (``call_soon_threadsafe``); the loop keeps the process table,
attests new images, issues and revokes credentials, and writes each event
to the sink.  Decisions are the kernel's: the daemon only fills the maps
(identities, policy) the programs judge from.  Decode errors and kernel
losses are counted and reported in-band (a ``lost`` event), in metrics and
in the log, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import IO, Any, Protocol

import orjson

from sidecar.daemon import sdnotify
from sidecar.daemon.config import DaemonConfig
from sidecar.daemon.table import Process, ProcessTable
from sidecar.enforce.enforcer import Enforcer, ExecFile, IdentityNumbers
from sidecar.kernel import abi
from sidecar.kernel.checks import Mounts, preflight
from sidecar.policy import caps
from sidecar.policy.model import format_socket_kind, format_unix_address
from sidecar.proc.cgroups import CgroupNames
from sidecar.proc.read import (
    read_argv,
    read_cgroup,
    read_exe,
    read_host_caps,
    read_status_ids,
)
from sidecar.util.errors import (
    AttestationError,
    ConfigError,
    KernelError,
    PolicyError,
    SidecarError,
)
from sidecar.util.redact import Redactor

_logger = logging.getLogger(__name__)

# Records that nobody waits on do not wake the reader (bpf/maps.h): it picks
# them up on this period.  Larger batches are cheaper per record, because the
# daemon's code and data stay in the CPU caches from one record to the next:
# under a paced exec load of 2,000/s, 50 ms instead of 10 ms cut the daemon's
# CPU per exec from about 41 to 25 us.  Nothing waits on these records (an
# exec pending attestation wakes the reader at once), and the ring buffer's
# default 1 MiB holds 50 ms of the fastest storm this machine makes more than
# ten times over.
POLL_MS = 50
# Identities written by the reader that stay known after their process exits.
SETTLED_REMEMBERED = 4096
# Events kept for the exporter until it starts (start-up takes about a second).
BEFORE_EXPORT_MAX = 100_000

_FAMILY = {abi.AF_INET: "inet", abi.AF_INET6: "inet6"}
_PROTOCOL = {abi.IPPROTO_TCP: "tcp", abi.IPPROTO_UDP: "udp"}
_SOCKOPT = {(0, 4): "IP_OPTIONS", (41, 57): "IPV6_RTHDR", (41, 5): "IPV6_2292RTHDR"}
_VERDICT = {
    abi.Verdict.ALLOW: "allow",
    abi.Verdict.DENY: "deny",
    abi.Verdict.WOULD_DENY: "would_deny",
}


class EventSink(Protocol):
    def write(self, event: dict[str, Any]) -> None: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...


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

    def write(self, event: dict[str, Any]) -> None:
        self._fh.write(orjson.dumps(event, option=orjson.OPT_APPEND_NEWLINE))

    def flush(self) -> None:
        self._fh.flush()

    def close(self) -> None:
        self.flush()
        if self._fh is not sys.stdout.buffer:
            self._fh.close()


class NullSink:
    """No local copy: events go only to the collector."""

    def write(self, event: dict[str, Any]) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _file_stamp(path: Path | None) -> tuple[int, int, int] | None:
    """What changes when a file is edited or swapped (also through a symlink, as kubelet does)."""
    if path is None:
        return None
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


def _notify(send: Callable[..., bool], *args: str) -> None:
    """Tell systemd; a service manager that stopped listening never stops the daemon."""
    try:
        send(*args)
    except SidecarError as exc:
        _logger.warning("%s", exc)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


def _kill(pid: int) -> bool:
    """SIGKILL a process through a pidfd (never a reused pid); False if it is gone."""
    try:
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


class _StillChanging(Exception):
    """The policy file changed while it was read: try again once it is quiet."""


@dataclass(frozen=True, slots=True)
class Settled:
    """What the reader thread's attestation of one exec record found and wrote."""

    result: Any  # the attestor's answer
    number: int  # the identity number the process holds after it
    # capabilities it held that its policy refuses (it was killed in enforce mode)
    caps_refused: int = 0


class Daemon:
    """One run of the host daemon."""

    def __init__(self, config: DaemonConfig, sink: EventSink, metrics: Any = None) -> None:
        self.config = config
        self.sink = sink
        self.metrics = metrics
        self.table = ProcessTable()
        # Events emitted, by type; the metrics endpoint reads the same dict.
        self.counts: dict[str, int] = metrics.event_counts if metrics is not None else {}
        self.decode_errors = 0
        self.lost_reported: dict[abi.EventType, int] = {}
        self.numbers = IdentityNumbers()
        self.attestor: Any = None
        self.manager: Any = None
        self.instances: Any = None
        self.enforcer: Enforcer | None = None
        self.exporter: Any = None
        self._export_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self.renewer: Any = None
        self.attest_latency_ns: deque[int] = deque(maxlen=100_000)
        # Owned by the reader thread (after start-up): it alone writes
        # identities into the kernel map.
        # pid -> identity number the reader last wrote for it, newest last: a
        # parent that exits before its pending child is attested has left the
        # kernel map, and its child still takes its answer from here.
        self._settled: dict[int, int] = {}
        # pending parent pid -> children waiting for its answer
        self._waiting: dict[int, list[int]] = {}
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        # Events made before the exporter starts (the first policy_loaded among
        # them), and callbacks to run once the spool holds them (_when_spooled),
        # handed to it in order when it does; None once it has, or with no collector.
        self._before_export: list[Any] | None = [] if config.collector else None
        self.before_export_dropped = 0
        self._export_drops_seen: dict[tuple[str, str], int] = {}
        self._redactor: Redactor | None = (
            Redactor.build()
            if config.redact_patterns is None
            else Redactor.build(config.redact_patterns, flag=None)
            if config.redact_patterns
            else None
        )
        # file -> stamp seen changed at the last check, not yet loaded (reload)
        self._unsettled: dict[str, tuple[int, int, int] | None] = {}
        self._reader_stop = threading.Event()
        self._clock_offset = time.time_ns() - time.monotonic_ns()
        self._programs: Any = None
        self._mounts: Mounts | None = None
        self.scope: Path = Path("/")
        self.scope_rel = "/"
        self._cgroups: CgroupNames | None = None
        self._realpaths: dict[str, str] = {}
        self._time_second = -1
        self._time_prefix = ""
        self._stamps: dict[str, tuple[int, int, int] | None] = {}
        self._policy_error: str | None = None
        self.started_ns = 0
        self.attach_seconds = 0.0
        # Ring positions each output had written through when this daemon started:
        # records before them, left unconsumed by a killed daemon, are re-read
        # and go only to the outputs that lack them.
        self._replay_sink = 0
        self._replay_export = 0
        self._replay_until = 0
        self._sink_through = 0

    # -- start-up: what can fail before anything is attached ----------------------------

    def _load_entries(self) -> None:
        if self.config.entries is None:
            return
        from sidecar.attest import Attestor, load_entries

        entries = load_entries(self.config.entries)
        for sid in entries.spiffe_ids:
            self.numbers.number(sid)
        self.attestor = Attestor(entries)
        self._stamps["entries"] = _file_stamp(self.config.entries)

    def _read_policy(self) -> Any:
        if self.config.policy is None:
            return None
        from sidecar.policy import load_policy

        stamp = _file_stamp(self.config.policy)
        policy = load_policy(self.config.policy)
        if _file_stamp(self.config.policy) != stamp:
            raise PolicyError(
                f"{self.config.policy}: changed while it was read; write it atomically"
            )
        for sid in policy.identities:
            self.numbers.number(sid)
        self._stamps["policy"] = stamp
        return policy

    def _read_policy_when_quiet(self) -> Any:
        """At start-up: the policy file, once a read sees it unchanged from start to end."""
        for _ in range(50):
            try:
                return self._read_policy()
            except _StillChanging:
                time.sleep(0.1)
        raise ConfigError(f"{self.config.policy} kept changing for 5 s: write it atomically")

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
        """Check the host, load and attach the programs; returns seconds it took.

        Compiling and loading happen in a child process (the prepare step),
        so the compiler's memory leaves with it; this process opens the pins.
        """
        from sidecar.kernel.loader import LoadOptions
        from sidecar.kernel.maps import KernelMaps
        from sidecar.kernel.prepare import prepare

        began = time.monotonic()
        self._mounts = preflight()
        self._resolve_scope(self._mounts)
        options = LoadOptions(
            pin_dir=self.config.pin_dir,
            scope=self.scope,
            tracefs=self._mounts.tracefs,
            procs_max=self.config.procs_max,
            ringbuf_pages=self.config.ringbuf_pages,
            attest=self.attestor is not None,
            hook_root=self._mounts.cgroup2.resolve(),
        )
        options.validate()
        done = prepare(options)
        report = done.report
        self._programs = KernelMaps(options.pin_dir / options.abi_dir)
        self._programs.unix_problem = done.unix_problem
        took = time.monotonic() - began
        _logger.info(
            "programs attached to %s in %.2f s (compile %.2f s); links created %s, taken over %s,"
            " retired %s",
            self.scope,
            took,
            report.compile_seconds,
            ",".join(report.created) or "none",
            ",".join(report.adopted) or "none",
            ",".join(report.retired) or "none",
        )
        return took

    def _adopt_ring(self) -> None:
        """Take over the pinned ring where the last daemon's outputs stopped."""
        ring = self._programs.ring
        done = self._programs.delivered()
        producer, consumer = ring.producer, ring.consumer
        if any(pos > producer for pos in done.values()):
            done = dict.fromkeys(done, 0)  # positions of a ring since made anew
        self._replay_sink = done["sink"]
        self._replay_export = done["export"] if self.config.collector else 0
        self._replay_until = max(self._replay_sink, self._replay_export)
        self._sink_through = consumer
        if producer > consumer:
            _logger.info(
                "ring buffer holds %d bytes of records a previous daemon left unconsumed: "
                "reading them (%d bytes of them already in the local output, %d in the spool)",
                producer - consumer,
                max(0, self._replay_sink - consumer),
                max(0, self._replay_export - consumer),
            )

    def _start_credentials(self) -> None:
        if self.attestor is None:
            return
        from sidecar.identity.instances import InstanceRegistry
        from sidecar.identity.jwt import JwtAuthority
        from sidecar.identity.manager import CredentialManager
        from sidecar.identity.x509 import CertificateAuthority

        td = self.attestor.entries.trust_domain
        if self.config.collector:
            # Enrolled: sign with the intermediate the collector's root issued us.
            from sidecar.export.enroll import load_intermediate

            ca = load_intermediate(self.config.collector_credentials)
        elif self.config.ca_cert is not None and self.config.ca_key is not None:
            ca = CertificateAuthority.load(
                self.config.ca_cert, self.config.ca_key, self.config.ca_chain
            )
        else:
            ca = CertificateAuthority.load_or_generate(self.config.state_dir / "ca", td)
        if ca.trust_domain != td:
            raise ConfigError(
                f"{self.config.entries}: trust domain {td} is not the signing CA's "
                f"({ca.trust_domain})"
            )
        self.manager = CredentialManager(
            ca,
            JwtAuthority(td),
            ttl=timedelta(seconds=self.config.svid_ttl),
            on_event=self._on_credential,
            on_jwt=self._on_jwt,
        )
        self.instances = InstanceRegistry(self.manager)

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
            state = self._programs.proc_state(pid) if self._programs else None
            number = state[0] if state else abi.IDENTITY_NONE
            proc = self.table.add(
                Process(
                    pid=pid,
                    start_ns=time.monotonic_ns(),
                    ppid=ids[0],
                    uid=ids[1],
                    gid=ids[2],
                    exe=read_exe(pid) or "",
                    argv=self._masked(read_argv(pid) or ()),
                    cgroup=cg,
                    identity=self.numbers.name(number),
                )
            )
            if self.attestor is not None:
                self._attest_now(proc, number)
            added += 1
        return added

    def _in_scope_path(self, cg: str) -> bool:
        return self.scope_rel == "/" or cg == self.scope_rel or cg.startswith(self.scope_rel + "/")

    # -- running ---------------------------------------------------------------------

    async def run(self, on_ready: Callable[[], None] | None = None) -> None:
        """Run until SIGTERM/SIGINT or :meth:`stop`."""
        loop = asyncio.get_running_loop()
        self.started_ns = time.monotonic_ns()
        self._load_entries()
        policy = self._read_policy_when_quiet()
        self.attach_seconds = self.start_kernel()
        # Losses that a previous daemon already reported (the counters are pinned).
        self.lost_reported = self._programs.lost_reported_counts()
        self._adopt_ring()
        servers: list[Any] = []
        reader: threading.Thread | None = None
        signals = threading.current_thread() is threading.main_thread()
        try:
            self.enforcer = Enforcer(self._programs, self.numbers)
            self.enforcer.adopt()
            if policy is not None:
                self._apply_policy(policy)
            elif self.enforcer.active is not None:
                _logger.info("no policy configured: removing the one a previous run left")
                self.enforcer.unload()
            self._start_credentials()
            rebuilt = self.rebuild_from_proc()
            _logger.info("process table rebuilt from /proc: %d processes in scope", rebuilt)
            self._programs.retire_other_versions()  # an upgrade: only now is ours in force
            if signals:
                loop.add_signal_handler(signal.SIGTERM, self.stop)
                loop.add_signal_handler(signal.SIGINT, self.stop)
                loop.add_signal_handler(signal.SIGHUP, self._reload.set)
            reader = threading.Thread(
                target=self._read_ring, args=(loop,), name="ringbuf-reader", daemon=True
            )
            reader.start()
            servers = await self._start_servers()
            # Everything loaded so far lives as long as the daemon: keep it out of
            # the collector's scans, and let the young generation grow, since
            # each kernel record makes a few short-lived objects.
            gc.freeze()
            gc.set_threshold(10_000, 20, 20)
            _notify(sdnotify.ready, f"attached to {self.scope} in {self.attach_seconds:.2f}s")
            if on_ready is not None:
                on_ready()
            await self._main_loop()
        finally:
            _notify(sdnotify.stopping)
            self._reader_stop.set()
            if reader is not None:
                await loop.run_in_executor(None, reader.join, 5.0)
            await asyncio.sleep(0)  # records the reader handed over just before it stopped
            for server in reversed(servers):
                await server.stop()
            if self.manager is not None:
                await self.manager.close()
            if signals:
                for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                    loop.remove_signal_handler(sig)
            self._check_lost()
            self.sink.flush()
            self._programs.close(detach=self.config.detach_on_exit)
            if not self.config.detach_on_exit:
                _logger.info(
                    "programs stay attached (fail-static); 'sidecar uninstall' removes them"
                )

    async def _start_exporter(self) -> Any:
        if not self.config.collector:
            return None
        from sidecar.attest import boot_id
        from sidecar.export.enroll import load_host_identity
        from sidecar.export.exporter import Exporter, ExporterConfig

        cred_dir = self.config.collector_credentials

        def identity() -> Any:
            return load_host_identity(cred_dir)

        identity()  # not enrolled: fail now, with the error naming the folder
        exporter = Exporter(
            ExporterConfig(
                target=self.config.collector,
                spool_dir=self.config.spool_dir,
                spool_max_bytes=self.config.spool_max_bytes,
                server_name=self.config.collector_server_name,
            ),
            identity,
            boot_id(),
        )
        self.exporter = exporter
        from sidecar.export.enroll import Renewer

        self.renewer = Renewer(
            self.config.collector,
            cred_dir,
            self.config.collector_server_name,
            self._host_renewed,
        )
        self._renew_task = asyncio.create_task(self.renewer.run(), name="host-renewal")
        early, self._before_export = self._before_export or [], None
        for item in early:  # policy_loaded and all else from start-up, in order
            if callable(item):
                exporter.submit_mark(item)
            else:
                exporter.submit(item)
        self._export_task = asyncio.create_task(self._export(exporter), name="exporter")
        _logger.info("streaming events to the collector at %s", self.config.collector)
        return _ExporterStopper(self)

    def _host_renewed(self, ident: Any) -> None:
        """New host credentials: sign workload SVIDs with the new intermediate from now on."""
        _logger.info("host credentials renewed: %s", ident.host)
        if self.manager is not None:
            from sidecar.export.enroll import load_intermediate

            self.manager.ca = load_intermediate(self.config.collector_credentials)

    async def _export(self, exporter: Any) -> None:
        try:
            await exporter.run()
        except SidecarError as exc:
            _logger.error("event export stopped: %s; events stay in the spool", exc)

    async def _start_servers(self) -> list[Any]:
        servers: list[Any] = []
        stopper = await self._start_exporter()
        if stopper is not None:
            servers.append(stopper)
        if self.manager is not None and self.config.workload_socket is not None:
            from sidecar.identity.workload_api import WorkloadApiServer

            wl = WorkloadApiServer(self.config.workload_socket, self.manager, self.instances)
            await wl.start()
            servers.append(wl)
            _logger.info("SPIFFE Workload API on %s", wl.endpoint)
        if self.config.admin_socket is not None:
            from sidecar.daemon.admin import AdminServer

            admin = AdminServer(
                self.config.admin_socket,
                {
                    "status": lambda _req: self.status(),
                    "identities": lambda _req: self.identities(),
                },
            )
            await admin.start()
            servers.append(admin)
        if self.metrics is not None and self.config.metrics:
            from sidecar.metrics import serve

            host, _, port = self.config.metrics.rpartition(":")
            endpoint = serve(self.metrics.registry, host, int(port))
            servers.append(_SyncStopper(endpoint.stop))
            _logger.info("metrics on %s", endpoint.url)
        return servers

    async def _main_loop(self) -> None:
        watchdog = sdnotify.watchdog_interval()
        tick = min(self.config.reload_interval, (watchdog or 2.0) / 2, 1.0)
        last_check = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError before 3.11
                await asyncio.wait_for(self._stop.wait(), timeout=tick)
            self._programs.heartbeat()
            if self.exporter is not None and self.exporter.failed:
                # The spool takes nothing more: do not hold the ring for it.
                self._programs.ring.commit(self._sink_through)
            self._check_lost()
            self._export_metrics()
            self.sink.flush()
            if watchdog:
                _notify(sdnotify.watchdog)
            now = time.monotonic()
            if self._reload.is_set() or now - last_check >= self.config.reload_interval:
                forced = self._reload.is_set()
                self._reload.clear()
                last_check = now
                self.reload(force=forced)

    def stop(self) -> None:
        self._stop.set()

    # -- reloads -----------------------------------------------------------------------

    def reload(self, force: bool = False) -> None:
        """Re-read entries and policy when they changed (or when told to, on SIGHUP).

        A file that fails to load is reported and the running one keeps
        enforcing: nothing is ever left half-applied.
        """
        if force:
            _notify(sdnotify.reloading)
        if self._changed_and_settled("entries", self.config.entries, force):
            self._stamps["entries"] = _file_stamp(self.config.entries)
            try:
                entries = self.attestor.reload(self.config.entries)
                for sid in entries.spiffe_ids:
                    self.numbers.number(sid)
                self._emit({"type": "entries_loaded", "time": _now(), "digest": entries.digest})
            except (AttestationError, PolicyError) as exc:
                self._rejected("entries", str(exc))
        if self._changed_and_settled("policy", self.config.policy, force):
            try:
                policy = self._read_policy()
            except _StillChanging as exc:
                _logger.info("%s: taken once it stops changing", exc)
                self._unsettled.pop("policy", None)  # wait for a quiet interval again
            except (PolicyError, ConfigError) as exc:
                self._stamps["policy"] = _file_stamp(self.config.policy)
                self._rejected("policy", str(exc))
            else:
                try:
                    self._apply_policy(policy)
                except (KernelError, PolicyError) as exc:
                    # Nothing flipped: the generation in force keeps judging.
                    self._rejected("policy", f"{self.config.policy}: {exc}")
        if force:
            _notify(sdnotify.ready)

    def _changed_and_settled(self, what: str, path: Path | None, force: bool) -> bool:
        """Has the file changed since it was loaded, and stayed unchanged for a whole check?

        A file written in place is taken only once the writer is done: the
        same stamp (inode, mtime, size) at two checks a reload interval apart.
        A half-written policy can be valid YAML that allows nothing (or more).
        SIGHUP (``force``) takes it at once: the operator says it is ready.
        """
        if path is None:
            return False
        stamp = _file_stamp(path)
        if force:
            return True
        if stamp == self._stamps.get(what):
            self._unsettled.pop(what, None)
            return False
        if self._unsettled.get(what) != stamp:
            self._unsettled[what] = stamp  # seen changing: look again next check
            return False
        del self._unsettled[what]
        return True

    def _apply_policy(self, policy: Any) -> None:
        assert self.enforcer is not None
        began = time.monotonic()
        gen = self.enforcer.load(policy)
        self._policy_error = None
        took = time.monotonic() - began
        _logger.info(
            "policy %s version %s in force (%d map entries, %.2f s)",
            policy.source,
            policy.version,
            gen.entries,
            took,
        )
        if self.metrics is not None:
            self.metrics.set_policy_version(policy.version)
            self.metrics.record_policy_reload(True)
        self._emit(
            {
                "type": "policy_loaded",
                "time": _now(),
                "host": self.config.host,
                "policy_version": policy.version,
                "source": policy.source,
                "identities": sorted(policy.identities),
            }
        )

    def _rejected(self, what: str, error: str) -> None:
        _logger.error("%s reload rejected, the running one stays in force: %s", what, error)
        self._policy_error = error
        if self.metrics is not None:
            self.metrics.record_policy_reload(False)
        self._emit(
            {"type": f"{what}_rejected", "time": _now(), "host": self.config.host, "error": error}
        )

    # -- the ring buffer ---------------------------------------------------------------------

    def _read_ring(self, loop: asyncio.AbstractEventLoop) -> None:
        ring = self._programs.ring
        cursor = ring.consumer
        while not self._reader_stop.is_set():
            try:
                got = ring.read(POLL_MS)
            except KernelError:
                _logger.exception("ring buffer poll failed")
                time.sleep(0.1)
                continue
            if got.cursor == cursor:
                continue
            # Records a previous daemon wrote to some output: their positions
            # decide which outputs get their events again (_handle_batch).
            ends = got.ends_list() if cursor < self._replay_until else None
            cursor = got.cursor
            events: list[abi.KernelEvent] = []
            event_ends: list[int] = []  # the ends of the records that decoded
            errors = 0
            for i, raw in enumerate(got.records):
                try:
                    events.append(abi.decode(raw))
                except abi.DecodeError as exc:
                    errors += 1
                    _logger.debug("undecodable record: %s", exc)
                    continue
                if ends is not None:
                    event_ends.append(ends[i])
            attested: list[Settled | None] = (
                self._attest_batch(events) if self.attestor is not None else [None] * len(events)
            )
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                loop.call_soon_threadsafe(
                    self._handle_batch,
                    events,
                    errors,
                    attested,
                    event_ends if ends is not None else None,
                    cursor,
                )

    def _attest_batch(self, events: list[abi.KernelEvent]) -> list[Settled | None]:
        """Attest every new image of a batch and write identities into the kernel map.

        Runs on the reader thread, which alone writes identities into the
        kernel map, in the order the kernel recorded them: a newer answer is
        never overwritten by an older one.  The identity is in the kernel
        before the records go to the event loop, without waiting behind
        credential issuance or event output.  The loop then finishes each
        attestation (instance, SVID) from the returned list, one slot per record.
        """
        out: list[Settled | None] = [None] * len(events)
        needs_parent = self.attestor.entries.needs_parent
        for i, ev in enumerate(events):
            if isinstance(ev, abi.Fork):
                if ev.task.identity == abi.IDENTITY_PENDING:
                    self._settle_forked(ev.child_pid, ev.task.pid)
                continue
            if not isinstance(ev, abi.Exec) or ev.verdict == abi.Verdict.DENY:
                continue
            pid, kernel_identity = ev.task.pid, ev.task.identity
            parent_identity = None
            if needs_parent and ev.task.ppid:  # a map lookup only when a selector asks
                parent = self._programs.proc_state(ev.task.ppid)
                parent_identity = self._identity_name(parent[0]) if parent else None
            result = self._attest_into_kernel(pid, ev.task.ppid, parent_identity, kernel_identity)
            if result is None:
                continue
            settled = result[1]
            refused = 0
            if result[0].match is not None:
                now = time.monotonic_ns()
                self.attest_latency_ns.append(now - ev.ts_ns)
                if self.metrics is not None:
                    self.metrics.observe_attestation((now - ev.ts_ns) / 1e9)
                refused = self._refuse_privileged(pid, result[0].match.spiffe_id)
            out[i] = Settled(result[0], settled, refused)
        return out

    def _refuse_privileged(self, pid: int, spiffe_id: str) -> int:
        """An agent attested while it holds capabilities its policy refuses: kill it (enforce).

        The kernel refuses such a process at each later exec; this covers the
        exec that made it the agent, which the kernel saw while it was still
        pending (and so could not connect anywhere).  Returns the refused
        capabilities it held.
        """
        active = self.enforcer.active if self.enforcer is not None else None  # read once
        ci = active.policy.identities.get(spiffe_id) if active and active.policy else None
        if ci is None:
            return 0
        refused = caps.refused_mask(ci.capabilities) & (read_host_caps(pid) or 0)
        if refused and ci.mode == "enforce":
            _kill(pid)
            _logger.warning(
                "pid %d attested as %s holds %s: killed",
                pid,
                spiffe_id,
                ", ".join(caps.labels(refused)),
            )
        return refused

    def _attest_into_kernel(
        self,
        pid: int,
        ppid: int,
        parent_identity: str | None,
        kernel_identity: int,
        create: bool = False,
    ) -> tuple[Any, int] | None:
        """Attest ``pid`` and write the answer into the kernel map.

        Returns the attestation and the identity number the process holds
        after it, or None if the process is gone.  A match writes its
        identity.  No match settles a pending image with what its parent has
        now: a child forked while its parent was pending inherits the
        parent's answer, as it would have at fork.  An identity inherited
        from an attested ancestor is left alone.
        """
        try:
            result = self.attestor.attest(pid, parent_identity)
        except AttestationError as exc:
            _logger.debug("pid %d not attested: %s", pid, exc)
            return None
        number = kernel_identity
        if result.match is not None:
            number = self.numbers.number(result.match.spiffe_id)
            self._settle(pid, number, create)
        elif kernel_identity == abi.IDENTITY_PENDING:
            number = self._parent_answer(ppid)
            if number == abi.IDENTITY_PENDING:
                self._wait_for_parent(ppid, pid)  # settled with the parent's answer
                number = abi.IDENTITY_NONE
            else:
                self._settle(pid, number)
        return result, number

    def _settle(self, pid: int, number: int, create: bool = False) -> None:
        """Write ``pid``'s identity, then that of its children waiting on it (reader thread).

        A process that has exited meanwhile has no entry, and gets none: the
        kernel removed it at exit, and the pid may be reused.
        """
        self._programs.set_identity(pid, number, create=create)
        settled = self._settled
        settled.pop(pid, None)  # a reused pid moves to the newest end
        settled[pid] = number
        if len(settled) > SETTLED_REMEMBERED:
            del settled[next(iter(settled))]
        for child in self._waiting.pop(pid, ()):
            state = self._programs.proc_state(child)
            # Only a child still pending: one attested meanwhile keeps its own answer.
            if state is not None and state[0] == abi.IDENTITY_PENDING:
                self._settle(child, number)

    def _settle_forked(self, child: int, parent: int) -> None:
        """A child forked while its parent was pending takes the parent's answer, once known."""
        answer = self._parent_answer(parent)
        if answer == abi.IDENTITY_PENDING:
            self._wait_for_parent(parent, child)
            return
        state = self._programs.proc_state(child)
        if state is not None and state[0] == abi.IDENTITY_PENDING:
            self._settle(child, answer)

    def _wait_for_parent(self, parent: int, child: int) -> None:
        waiting = self._waiting
        if len(waiting) > SETTLED_REMEMBERED:  # parents that never settle (gone unattested)
            waiting.clear()
        waiting.setdefault(parent, []).append(child)

    def _parent_answer(self, ppid: int) -> int:
        """The identity a pending child takes from its parent: the kernel's, or
        the last one written for the parent if it has exited since.  PENDING
        while the parent itself is not yet settled."""
        if not ppid:
            return abi.IDENTITY_NONE
        state = self._programs.proc_state(ppid)
        if state is not None:
            return int(state[0])
        return self._settled.get(ppid, abi.IDENTITY_NONE)

    def _handle_batch(
        self,
        events: list[abi.KernelEvent],
        errors: int,
        attested: list[Settled | None],
        ends: list[int] | None,
        cursor: int,
    ) -> None:
        if errors:
            self.decode_errors += errors
            if self.metrics is not None:
                self.metrics.record_loss("decode_error", errors)
        for i, (ev, settled) in enumerate(zip(events, attested, strict=True)):
            # A record re-read after a restart goes only to the outputs that lack it.
            to_sink = ends is None or ends[i] > self._replay_sink
            to_export = ends is None or ends[i] > self._replay_export
            try:
                self.handle(ev, settled, to_sink=to_sink, to_export=to_export)
            except SidecarError as exc:
                _logger.warning("event of pid %d not handled: %s", ev.task.pid, exc)
        self._delivered(cursor)

    def _delivered(self, cursor: int) -> None:
        """The events of every record before ``cursor`` are handed to the outputs.

        The sink is flushed and its position pinned; the ring consumes the
        records once the spool has them too (at once with no collector).  A
        daemon killed before that leaves them in the ring for the next one.
        """
        self.sink.flush()
        self._programs.set_delivered("sink", cursor)
        self._sink_through = cursor
        if self.config.collector:
            self._when_spooled(lambda: self._export_written(cursor))
        else:
            self._programs.ring.commit(cursor)

    def _export_written(self, cursor: int) -> None:
        """Spool-writer thread: the spool holds the events of the records before ``cursor``."""
        self._programs.set_delivered("export", cursor)
        self._programs.ring.commit(cursor)

    def _when_spooled(self, then: Callable[[], None]) -> None:
        """Call ``then`` once the events emitted so far are in the spool (at once without one)."""
        if self.exporter is not None:
            self.exporter.submit_mark(then)
        elif self._before_export is not None:
            self._before_export.append(then)  # handed to the exporter, in order, when it starts
        else:
            then()

    # -- events --------------------------------------------------------------------

    def _emit(self, event: dict[str, Any], to_sink: bool = True, to_export: bool = True) -> None:
        kind = event["type"]
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if to_sink:
            self.sink.write(event)
        if to_export and (self.exporter is not None or self._before_export is not None):
            from sidecar.export.convert import to_proto

            wire = to_proto(event)
            if wire is None:
                return
            if self.exporter is not None:
                self.exporter.submit(wire)
            elif len(self._before_export) < BEFORE_EXPORT_MAX:  # type: ignore[arg-type]
                self._before_export.append(wire)  # type: ignore[union-attr]
            else:
                self.before_export_dropped += 1
                if self.metrics is not None:
                    self.metrics.record_loss("before_export", 1)

    def _time(self, ts_ns: int) -> str:
        """RFC 3339 UTC time of a kernel timestamp (the second's text is cached)."""
        wall_ns = self._clock_offset + ts_ns
        second, rest = divmod(wall_ns, 1_000_000_000)
        if second != self._time_second:
            self._time_second = second
            self._time_prefix = datetime.fromtimestamp(second, timezone.utc).strftime(
                "%Y-%m-%dT%H:%M:%S"
            )
        return f"{self._time_prefix}.{rest // 1000:06d}+00:00"

    def _cgroup(self, pid: int, cgroup_id: int) -> str:
        assert self._cgroups is not None
        return self._cgroups.name(cgroup_id) or read_cgroup(pid) or ""

    def _identity_name(self, number: int) -> str | None:
        if number in (abi.IDENTITY_NONE, abi.IDENTITY_PENDING):
            return None
        return self.numbers.name(number)

    def _policy_version(self, gen: int | None = None) -> str | None:
        if self.enforcer is None or self.enforcer.active is None:
            return None
        g = self.enforcer.generation(gen) if gen is not None else self.enforcer.active
        return g.version if g else self.enforcer.active.version

    def _base(
        self, kind: str, ev: abi.KernelEvent, proc: Process | None, gen: int | None = None
    ) -> dict[str, Any]:
        """The fields every process event has.  Runs for every record: kept lean.

        ``gen``: the policy generation that judged the record, for its version.
        """
        task = ev.task
        number = task.identity
        identity = (
            self.numbers.name(number)
            if number != abi.IDENTITY_NONE and number != abi.IDENTITY_PENDING
            else None
        )
        argv: tuple[str, ...] = ()
        if proc is None:
            ppid, exe, cgroup, instance_id, serial = task.ppid, "", "", None, None
        else:
            ppid, exe, argv, cgroup = proc.ppid, proc.exe, proc.argv, proc.cgroup
            instance_id, serial = proc.instance_id, self._serial(proc)
            identity = identity or proc.identity
        out = {
            "type": kind,
            "time": self._time(ev.ts_ns),
            "host": self.config.host,
            "pid": task.pid,
            "ppid": ppid,
            "uid": task.uid,
            "gid": task.gid,
            "comm": task.comm,
            "exe": exe,
            "argv": argv,  # a tuple: orjson writes it as an array
            "cgroup": cgroup,
            "identity": identity,
            "instance_id": instance_id,
            "svid_serial": serial,
            "policy_version": self._policy_version(gen),
        }
        if number == abi.IDENTITY_PENDING:
            out["attestation"] = "pending"
        return out

    def _serial(self, proc: Process | None) -> str | None:
        if proc is None or proc.instance_id is None or self.manager is None:
            return None
        svid = self.manager.current(proc.instance_id)
        return f"{svid.serial:x}" if svid else None

    def handle(
        self,
        ev: abi.KernelEvent,
        settled: Settled | None = None,
        *,
        to_sink: bool = True,
        to_export: bool = True,
    ) -> None:
        """Update the table from one kernel record and emit its event.

        ``settled``: what the reader thread's attestation of this exec record
        found and wrote into the kernel, if it attested it.  ``to_sink`` and
        ``to_export``: whether the event goes to each output (False for one
        that a previous daemon already wrote it to).
        """
        if isinstance(ev, abi.Exec):
            out = self._on_exec(ev, settled)
        elif isinstance(ev, abi.Fork):
            out = self._on_fork(ev)
        elif isinstance(ev, abi.Exit):
            out = self._on_exit(ev)
        elif isinstance(ev, abi.Socket):
            out = self._on_socket(ev)
        elif isinstance(ev, abi.Unix):
            out = self._on_unix(ev)
        else:
            out = self._on_connect(ev)
        if out is not None:
            self._emit(out, to_sink, to_export)

    def _ppid(self, ev: abi.KernelEvent) -> int:
        if ev.task.ppid:
            return ev.task.ppid
        ids = read_status_ids(ev.task.pid)
        return ids[0] if ids else 0

    def _exe(self, pid: int, filename: str) -> str:
        """The executable's canonical path, without a /proc read when the name is absolute.

        An exec through a file descriptor (fexecve, execveat with an empty
        path) is named /dev/fd/N by the kernel: N is the process's descriptor,
        not ours, so only /proc/PID/exe tells which file it was.
        """
        if not filename.startswith("/") or filename.startswith("/dev/fd/"):
            return read_exe(pid) or filename
        exe = self._realpaths.get(filename)
        if exe is None:
            if len(self._realpaths) > 4096:
                self._realpaths.clear()
            exe = self._realpaths[filename] = os.path.realpath(filename)
        return exe

    def _on_exec(self, ev: abi.Exec, settled: Settled | None) -> dict[str, Any]:
        pid = ev.task.pid
        proc = self.table.get(pid)
        exe = self._exe(pid, ev.filename)
        argv = ev.argv if not ev.args_missing else (read_argv(pid) or ())
        redacted = False
        if self._redactor is not None:
            argv, redacted = self._redactor.argv(argv)
        if proc is not None:
            # The same process (no exit seen since its fork), with a new image.
            proc.exe, proc.argv, proc.exec_count = exe, argv, proc.exec_count + 1
            if self.instances is not None and self.instances.get(pid) is not None:
                self.instances.end(pid)  # credentials belonged to the old image
                proc.instance_id = None
                self._count_live()
        else:
            # A vfork child (its fork sends no record) or one whose fork record
            # was lost: it starts with what its parent had, as at fork.
            ppid = self._ppid(ev)
            parent = self.table.get(ppid)
            proc = self.table.add(
                Process(
                    pid=pid,
                    start_ns=ev.ts_ns,
                    ppid=ppid,
                    uid=ev.task.uid,
                    gid=ev.task.gid,
                    exe=exe,
                    argv=argv,
                    cgroup=self._cgroup(pid, ev.task.cgroup_id),
                    identity=parent.identity if parent else None,
                    instance_id=parent.instance_id if parent else None,
                    exec_count=1,
                )
            )
        verdict = ev.verdict
        # The identity this exec left the process with: the one the reader
        # wrote when it attested this very record, else the kernel's.
        number = ev.task.identity
        refused = ev.caps_refused if ev.flags & abi.EXEC_PRIVILEGED else 0
        if settled is not None:
            number = settled.number
            self._finish_attestation(proc, settled.result, number)
            if settled.caps_refused:
                refused = settled.caps_refused
                mode = self._mode_of(proc.identity)
                verdict = abi.Verdict.DENY if mode == "enforce" else abi.Verdict.WOULD_DENY
        elif number not in (abi.IDENTITY_NONE, abi.IDENTITY_PENDING):
            proc.identity = self._identity_name(number)
        rule = "file-changed" if ev.flags & abi.EXEC_FILE_CHANGED else None
        if ev.flags & abi.EXEC_UNTRACKED:
            rule = "untracked"  # the process map was full: it could not be judged
        if refused:
            rule = "capabilities"
        if verdict == abi.Verdict.ALLOW:
            verdict, rule = self._double_check_exec(pid, ev.task.identity, verdict)
        out = self._base("exec", ev, proc, ev.policy_gen)
        out["identity"] = self._identity_name(number)
        if number != abi.IDENTITY_PENDING:
            out.pop("attestation", None)  # settled while handling this record
        out["filename"] = ev.filename
        out["args_truncated"] = ev.args_truncated
        if redacted:
            out["args_redacted"] = True
        out["verdict"] = _VERDICT[verdict]
        if refused:
            out["capabilities"] = caps.labels(refused)
        if verdict != abi.Verdict.ALLOW:
            out["rule"] = rule or "default"
            self._record_verdict(proc.identity, out["rule"], out["verdict"])
        return out

    def _masked(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        return self._redactor.argv(argv)[0] if self._redactor is not None else argv

    def _mode_of(self, spiffe_id: str | None) -> str | None:
        active = self.enforcer.active if self.enforcer is not None else None
        if spiffe_id is None or active is None or active.policy is None:
            return None
        ci = active.policy.identities.get(spiffe_id)
        return ci.mode if ci is not None else None

    def _double_check_exec(
        self, pid: int, number: int, verdict: abi.Verdict
    ) -> tuple[abi.Verdict, str | None]:
        """Defence in depth: is the file now running really one the identity may run?"""
        active = self.enforcer.active if self.enforcer else None
        if active is None or number not in active.exec_files:
            return verdict, None
        try:
            running = ExecFile.of(f"/proc/{pid}/exe")
        except OSError:
            return verdict, None  # already gone
        if running in active.exec_files[number]:
            return verdict, None
        name = self.numbers.name(number)
        mode = active.policy.identities[name].mode if active.policy and name else "enforce"
        if mode != "enforce":
            return abi.Verdict.WOULD_DENY, "exec-file-check"
        if not _kill(pid):
            return verdict, None
        _logger.warning("pid %d runs a file its identity may not run: killed", pid)
        return abi.Verdict.DENY, "exec-file-check"

    def _attest_now(self, proc: Process, kernel_identity: int) -> None:
        """Attest a process found running (start-up): kernel write and instance at once."""
        parent = self.table.get(proc.ppid)
        result = self._attest_into_kernel(
            proc.pid, proc.ppid, parent.identity if parent else None, kernel_identity, create=True
        )
        if result is not None:
            self._finish_attestation(proc, result[0], result[1])

    def _finish_attestation(self, proc: Process, result: Any, number: int) -> None:
        """After the kernel knows (``number``): the instance and its SVID (event loop)."""
        if result.match is not None:
            inst = self.instances.add(result, time.monotonic_ns())
            proc.identity = result.match.spiffe_id
            proc.instance_id = inst.instance_id
            self._count_live()
            return
        # Settled with its parent's answer, or inherited from an attested
        # ancestor: the ancestor's instance when the parent carries it.
        name = self._identity_name(number)
        proc.identity = name
        parent = self.table.get(proc.ppid)
        if name is not None and parent is not None and parent.identity == name:
            proc.instance_id = parent.instance_id

    def _on_fork(self, ev: abi.Fork) -> dict[str, Any]:
        parent = self.table.get(ev.task.pid)
        child = ev.child_pid
        # A child forked while its parent was pending was settled by the reader.
        proc = self.table.add(
            Process(
                pid=child,
                start_ns=ev.ts_ns,
                ppid=ev.task.pid,
                uid=ev.task.uid,
                gid=ev.task.gid,
                exe=parent.exe if parent else (read_exe(child) or ""),
                argv=parent.argv if parent else self._masked(read_argv(child) or ()),
                cgroup=parent.cgroup if parent else self._cgroup(child, ev.task.cgroup_id),
                identity=parent.identity if parent else None,
                instance_id=parent.instance_id if parent else None,
            )
        )
        out = self._base("fork", ev, proc)
        out["pid"] = child
        out["ppid"] = ev.task.pid
        return out

    def _on_exit(self, ev: abi.Exit) -> dict[str, Any]:
        proc = self.table.remove(ev.task.pid)
        out = self._base("exit", ev, proc)
        if self.instances is not None and self.instances.get(ev.task.pid) is not None:
            out["svid_serial"] = self._serial(proc)
            self.instances.end(ev.task.pid)
            self._count_live()
        return out

    def _on_connect(self, ev: abi.Connect) -> dict[str, Any]:
        proc = self.table.get(ev.task.pid)
        out = self._base("connect", ev, proc, ev.policy_gen)
        out["family"] = _FAMILY.get(ev.family, str(ev.family))
        out["protocol"] = _PROTOCOL.get(ev.protocol, str(ev.protocol))
        out["daddr"] = str(ev.address)
        out["dport"] = ev.port
        out["hook"] = ev.hook.name.lower()
        out["verdict"] = _VERDICT[ev.verdict]
        out["rule"] = self._rule_name(ev.policy_gen, ev.task.identity, ev.rule)
        self._record_verdict(out["identity"], out["rule"], out["verdict"])
        return out

    def _on_socket(self, ev: abi.Socket) -> dict[str, Any]:
        proc = self.table.get(ev.task.pid)
        out = self._base("socket", ev, proc, ev.policy_gen)
        out["family"] = _FAMILY.get(ev.family, str(ev.family))
        if ev.hook == abi.Hook.SETSOCKOPT:
            out["operation"] = "setsockopt"
            out["option"] = _SOCKOPT.get((ev.level, ev.optname), f"{ev.level}/{ev.optname}")
            out["rule"] = "source-route"
        else:
            out["operation"] = "create"
            out["socket"] = format_socket_kind((ev.family, ev.type, ev.protocol))
            out["rule"] = "default" if ev.verdict != abi.Verdict.ALLOW else "sockets"
        out["verdict"] = _VERDICT[ev.verdict]
        self._record_verdict(out["identity"], out["rule"], out["verdict"])
        return out

    def _on_unix(self, ev: abi.Unix) -> dict[str, Any]:
        proc = self.table.get(ev.task.pid)
        out = self._base("socket", ev, proc, ev.policy_gen)
        out["family"] = "unix"
        out["operation"] = "connect" if ev.hook == abi.Hook.CONNECT_UNIX else "sendmsg"
        out["address"] = format_unix_address((ev.path, False))
        out["verdict"] = _VERDICT[ev.verdict]
        out["rule"] = "unix" if ev.verdict == abi.Verdict.ALLOW else "default"
        self._record_verdict(out["identity"], out["rule"], out["verdict"])
        return out

    def _rule_name(self, gen: int, number: int, rule: int) -> str:
        if rule == 0 or self.enforcer is None:
            return "default"
        g = self.enforcer.generation(gen)
        name = self.numbers.name(number)
        if g is None or g.policy is None or name not in g.policy.identities:
            return f"rule-{rule}"
        names = g.policy.identities[name].rule_names
        return names[rule - 1] if rule <= len(names) else f"rule-{rule}"

    def _record_verdict(self, identity: str | None, rule: str, verdict: str) -> None:
        if self.metrics is not None:
            self.metrics.record_verdict(identity or "none", rule, verdict)

    def _on_jwt(self, instance_id: str, spiffe_id: Any) -> None:
        if self.metrics is not None:
            self.metrics.record_credential_issued(str(spiffe_id), "jwt")

    def _on_credential(
        self, kind: str, instance_id: str, spiffe_id: Any, serial: int, not_after: datetime
    ) -> None:
        if self.metrics is not None:
            if kind == "credential_issued":
                self.metrics.record_credential_issued(str(spiffe_id), "x509")
            else:
                self.metrics.record_credential_revoked(str(spiffe_id))
        self._emit(
            {
                "type": kind,
                "time": _now(),
                "host": self.config.host,
                "identity": str(spiffe_id),
                "instance_id": instance_id,
                "svid_serial": f"{serial:x}",
                "not_after": not_after.isoformat(),
                "policy_version": self._policy_version(),
            }
        )

    def _count_live(self) -> None:
        if self.metrics is None or self.instances is None:
            return
        counts = Counter(str(i.spiffe_id) for i in self.instances.all())
        for sid in self.numbers.known():
            self.metrics.set_live_instances(sid, counts.get(sid, 0))

    def _check_lost(self) -> None:
        if self._programs is None:
            return
        counts = self._programs.lost_counts()
        delta = {t: n - self.lost_reported.get(t, 0) for t, n in counts.items()}
        if any(d > 0 for d in delta.values()):
            self.lost_reported = counts
            lost = {t.name.lower(): d for t, d in delta.items() if d > 0}
            _logger.warning("kernel ring buffer full: %s records lost", lost)
            if self.metrics is not None:
                self.metrics.record_loss("ringbuf_full", sum(lost.values()))
            self._emit(
                {
                    "type": "lost",
                    "time": _now(),
                    "host": self.config.host,
                    "reason": "ringbuf_full",
                    "counts": lost,
                }
            )
            # Kept pinned once the report is written out: a restarted daemon reports
            # only what no daemon has (a crash between the two reports a loss
            # twice, never none).  With a collector, that is once the spool has it.
            self.sink.flush()
            programs = self._programs
            self._when_spooled(lambda: programs.set_lost_reported(counts))

    # -- admin -----------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        from sidecar.kernel.loader import CGROUP_HOOKS, TRACEPOINTS

        active = self.enforcer.active if self.enforcer else None
        modes = {}
        if active is not None and active.policy is not None:
            modes = {sid: i.mode for sid, i in active.policy.identities.items()}
        live: Counter[str] = Counter()
        if self.instances is not None:
            live.update(str(i.spiffe_id) for i in self.instances.all())
        identities = {
            sid: {"live_instances": live.get(sid, 0), "mode": modes.get(sid)}
            for sid in sorted(set(live) | set(modes))
        }
        return {
            "host": self.config.host,
            "uptime_seconds": round((time.monotonic_ns() - self.started_ns) / 1e9, 1),
            "scope": str(self.scope),
            "pin_dir": str(self.config.pin_dir),
            "programs": {
                "tracepoints": [f"{c}:{e}" for _p, _f, c, e in TRACEPOINTS],
                "cgroup_hooks": [p for p, *_ in CGROUP_HOOKS],
                "unix_sockets": (
                    "judged"
                    if self._programs is not None and self._programs.unix_problem is None
                    else f"not judged: {getattr(self._programs, 'unix_problem', 'not loaded')}"
                ),
                "attach_seconds": round(self.attach_seconds, 2),
            },
            "processes_in_scope": len(self.table),
            "identities": identities,
            "policy": {
                "version": active.version if active else None,
                "file": str(self.config.policy) if self.config.policy else None,
                "last_error": self._policy_error,
            },
            "events": dict(self.counts),
            "losses": {
                "kernel": {t.name.lower(): n for t, n in self.lost_reported.items() if n},
                "decode_errors": self.decode_errors,
            },
            "collector": self._collector_status(),
        }

    def _export_metrics(self) -> None:
        if self.metrics is None or self.exporter is None:
            return
        # What the exporter dropped (queue full, spool full) since the last look.
        for (kind, reason), n in list(self.exporter.dropped.items()):
            seen = self._export_drops_seen.get((kind, reason), 0)
            if n > seen:
                self.metrics.record_loss(reason, n - seen)
                self._export_drops_seen[(kind, reason)] = n
        spool = self.exporter.spool
        self.metrics.set_spool_depth(spool.pending(), spool.size_bytes())
        running = self._export_task is not None and not self._export_task.done()
        self.metrics.set_stream_state(
            ("streaming" if self.exporter.connected else "backoff") if running else "stopped"
        )

    def _collector_status(self) -> dict[str, Any]:
        if self.exporter is None:
            return {"state": "not configured", "spool_depth": 0}
        spool = self.exporter.spool
        running = self._export_task is not None and not self._export_task.done()
        state = (
            ("connected" if self.exporter.connected else "reconnecting") if running else "stopped"
        )
        return {
            "state": state,
            "address": self.config.collector,
            "spool_depth": spool.pending(),
            "acked_sequence": spool.acked,
            "dropped": sum(self.exporter.dropped.values()),
            "last_error": self.exporter.last_error,
            **self._credential_status(),
        }

    def _credential_status(self) -> dict[str, Any]:
        from sidecar.export.enroll import credential_expiry

        expiry = credential_expiry(self.config.collector_credentials)
        return {
            "host_svid_expires": (e.isoformat() if (e := expiry["host_svid"]) else None),
            "intermediate_expires": (e.isoformat() if (e := expiry["intermediate"]) else None),
            "renewals": self.renewer.renewals if self.renewer is not None else 0,
            "renewal_error": self.renewer.last_error if self.renewer is not None else None,
        }

    def identities(self) -> dict[str, Any]:
        if self.instances is None:
            return {"instances": []}
        out = []
        for inst in self.instances.all():
            row = inst.describe(self.manager)
            row.update(self._privilege_of(inst.pid, str(inst.spiffe_id)))
            out.append(row)
        return {"instances": out}

    def _privilege_of(self, pid: int, spiffe_id: str) -> dict[str, Any]:
        """Capabilities that matter, held now, and whether they could switch enforcement off."""
        held = read_host_caps(pid) or 0
        active = self.enforcer.active if self.enforcer is not None else None
        ci = active.policy.identities.get(spiffe_id) if active and active.policy else None
        dangerous = caps.mask({caps.NUMBERS[n] for n in caps.DANGEROUS})
        notable = caps.mask({caps.NUMBERS[n] for n in caps.NOTABLE})
        return {
            "capabilities": caps.labels(held & (dangerous | notable)),
            # Held, and not refused: its policy accepts them, or no policy lists it.
            "can_disable_enforcement": bool(
                held & dangerous & ~(caps.refused_mask(ci.capabilities) if ci else 0)
            ),
        }


class _ExporterStopper:
    """Flushes the exporter at shutdown: what is not acknowledged stays in the spool."""

    def __init__(self, daemon: Daemon) -> None:
        self._daemon = daemon

    async def stop(self) -> None:
        d = self._daemon
        if d.exporter is None:
            return
        if d._renew_task is not None:
            d._renew_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await d._renew_task
        if not await d.exporter.close(timeout=5.0):
            _logger.info("unacknowledged events stay in the spool for the next run")
        if d._export_task is not None:
            d._export_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await d._export_task


class _SyncStopper:
    """Adapts a synchronous stop() to the servers list."""

    def __init__(self, stop: Callable[[], None]) -> None:
        self._stop = stop

    async def stop(self) -> None:
        self._stop()
