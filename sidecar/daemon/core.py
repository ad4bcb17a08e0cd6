"""The host daemon's lifecycle: start the stages, run, reload, stop.

Kernel records flow one way through the stages, each a module with one job::

    reader (thread)      sidecar/daemon/reader.py    ring buffer -> decoded batch
      settle (thread)    sidecar/daemon/settle.py    attest new images, write identities
    describe (loop)      sidecar/daemon/describe.py  process table -> one typed event
                                                     (with nothing to settle, the loop
                                                     reads the ring itself, every 50 ms,
                                                     and decodes the batch first)
    outputs (loop)       sidecar/daemon/outputs.py   local sink, exporter, counts;
                                                     ring delivery (commit when written)

Around them: reload of the policy and entries (sidecar/daemon/reload.py),
the admin views (sidecar/daemon/views.py), and this module, which builds the
stages, starts the servers (Workload API, admin socket, metrics, exporter)
and runs the loop's periodic duties (heartbeat, loss reports, watchdog).

Which thread owns what: the reader thread owns its ring cursor (the event
loop does when it reads the ring itself) and the settle stage's state, and
alone writes identities into the kernel map after start-up.  The event
loop owns everything else: the process table, the instance registry, the
outputs, the enforcer's generation flips.  The spool writer thread only
runs the delivery callbacks (pin a position, commit the ring).  Decisions
are the kernel's: the daemon only fills the maps (identities, policy) the
programs judge from.  Decode errors and kernel losses are counted and
reported in-band (a ``lost`` event), in metrics and in the log, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from sidecar.daemon import sdnotify
from sidecar.daemon.config import DaemonConfig
from sidecar.daemon.describe import Describer
from sidecar.daemon.outputs import Delivery, EventSink, Outputs
from sidecar.daemon.reader import Batch, RingReader
from sidecar.daemon.reload import FileWatch, StillChanging, file_stamp
from sidecar.daemon.settle import Settler
from sidecar.daemon.table import Process, ProcessTable
from sidecar.enforce.enforcer import Enforcer, IdentityNumbers
from sidecar.events import model as m
from sidecar.health import Health, Heartbeat
from sidecar.kernel import abi
from sidecar.kernel.checks import Mounts, preflight
from sidecar.proc.cgroups import CgroupNames
from sidecar.proc.read import read_argv, read_cgroup, read_exe, read_status_ids
from sidecar.util.errors import (
    AttestationError,
    ConfigError,
    CredentialError,
    KernelError,
    PolicyError,
    SidecarError,
)
from sidecar.util.redact import Redactor

if TYPE_CHECKING:
    from sidecar.attest.attestor import Attestor
    from sidecar.export.enroll import Renewer
    from sidecar.export.exporter import Exporter, HostIdentity
    from sidecar.identity.instances import InstanceRegistry
    from sidecar.identity.manager import CredentialManager
    from sidecar.identity.spiffeid import SpiffeId
    from sidecar.kernel.maps import KernelMaps
    from sidecar.metrics import DaemonMetrics
    from sidecar.policy.compiled import CompiledPolicy

_logger = logging.getLogger(__name__)


class Stoppable(Protocol):
    """A server the daemon started (Workload API, admin socket, metrics, exporter)."""

    async def stop(self) -> None: ...


def _notify(send: Callable[..., bool], *args: str) -> None:
    """Tell systemd; a service manager that stopped listening never stops the daemon."""
    try:
        send(*args)
    except SidecarError as exc:
        _logger.warning("%s", exc)


class Daemon:
    """One run of the host daemon."""

    def __init__(
        self, config: DaemonConfig, sink: EventSink, metrics: DaemonMetrics | None = None
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.numbers = IdentityNumbers()
        self.attestor: Attestor | None = None
        self.manager: CredentialManager | None = None
        self.instances: InstanceRegistry | None = None
        self.enforcer: Enforcer | None = None
        self.exporter: Exporter | None = None
        self.renewer: Renewer | None = None
        self.kernel: KernelMaps | None = None
        self.outputs = Outputs(
            sink,
            exporting=bool(config.collector),
            counts=metrics.event_counts if metrics is not None else None,
            metrics=metrics,
        )
        redactor: Redactor | None = (
            Redactor.build()
            if config.redact_patterns is None
            else Redactor.build(config.redact_patterns, flag=None)
            if config.redact_patterns
            else None
        )
        self.describer = Describer(
            config.host,
            self.numbers,
            lambda: self.enforcer,
            CgroupNames(Path("/"), Path("/")),  # pointed at the scope at start
            redactor=redactor,
            metrics=metrics,
        )
        self.settler: Settler | None = None
        self.delivery: Delivery | None = None
        self.reader: RingReader | None = None
        self.files = FileWatch()
        self.decode_errors = 0
        self.lost_reported: dict[abi.EventType, int] = {}
        self._export_task: asyncio.Task[None] | None = None
        self._renew_task: asyncio.Task[None] | None = None
        self._export_drops_seen: dict[tuple[str, str], int] = {}
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._mounts: Mounts | None = None
        self.scope: Path = Path("/")
        self.scope_rel = "/"
        self.policy_error: str | None = None
        self.started_ns = 0
        self.attach_seconds = 0.0
        # Live while the event loop and the ring reader make progress; ready
        # once the programs are attached and the policy is in force.
        self.health = Health()
        self.health.require(self._readiness)
        self._serving = False
        self._loop_beat: Heartbeat | None = None
        self._watchdog_starved = False

    @property
    def sink(self) -> EventSink:
        return self.outputs.sink

    @property
    def table(self) -> ProcessTable:
        return self.describer.table

    @property
    def counts(self) -> dict[str, int]:
        return self.outputs.counts

    def _now(self) -> int:
        return time.time_ns()

    # -- start-up: what can fail before anything is attached ----------------------------

    def _load_entries(self) -> None:
        if self.config.entries is None:
            return
        from sidecar.attest import Attestor, load_entries

        entries = load_entries(self.config.entries)
        for sid in entries.spiffe_ids:
            self.numbers.number(sid)
        self.attestor = Attestor(entries)
        self.files.mark_loaded("entries", file_stamp(self.config.entries))

    def _read_policy(self) -> CompiledPolicy | None:
        if self.config.policy is None:
            return None
        from sidecar.policy import load_policy

        stamp = file_stamp(self.config.policy)
        policy = load_policy(self.config.policy)
        if file_stamp(self.config.policy) != stamp:
            raise StillChanging(
                f"{self.config.policy}: changed while it was read; write it atomically"
            )
        for sid in policy.identities:
            self.numbers.number(sid)
        self.files.mark_loaded("policy", stamp)
        return policy

    def _read_policy_when_quiet(self) -> CompiledPolicy | None:
        """At start-up: the policy file, once a read sees it unchanged from start to end."""
        for _ in range(50):
            try:
                return self._read_policy()
            except StillChanging:
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
        self.describer.cgroups = CgroupNames(root, scope)

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
        self.kernel = KernelMaps(options.pin_dir / options.abi_dir)
        self.kernel.unix_problem = done.unix_problem
        if self.metrics is not None:
            self.metrics.set_attached_programs(len(report.created) + len(report.adopted))
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
        self.describer.instances = self.instances
        self.describer.credentials = self.manager

    def rebuild_from_proc(self) -> int:
        """Fill the table with processes already running in scope (e.g. after a restart)."""
        assert self.kernel is not None
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
            state = self.kernel.proc_state(pid)
            number = state[0] if state else abi.IDENTITY_NONE
            proc = self.table.add(
                Process(
                    pid=pid,
                    start_ns=time.monotonic_ns(),
                    ppid=ids[0],
                    uid=ids[1],
                    gid=ids[2],
                    exe=read_exe(pid) or "",
                    argv=self.describer.mask(read_argv(pid) or ()),
                    cgroup=cg,
                    identity=self.numbers.name(number),
                )
            )
            if self.settler is not None:
                self._attest_now(proc, number)
            added += 1
        return added

    def _attest_now(self, proc: Process, kernel_identity: int) -> None:
        """Attest a process found running (start-up): kernel write and instance at once."""
        assert self.settler is not None
        parent = self.table.get(proc.ppid)
        answer = self.settler.attest_into_kernel(
            proc.pid, proc.ppid, parent.identity if parent else None, kernel_identity, create=True
        )
        if answer is not None:
            self.describer.finish_attestation(proc, answer[0], answer[1])

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
        kernel = self.kernel
        assert kernel is not None
        # Losses that a previous daemon already reported (the counters are pinned).
        self.lost_reported = kernel.lost_reported_counts()
        self.delivery = Delivery(
            self.outputs, kernel.ring, kernel.set_delivered, exporting=bool(self.config.collector)
        )
        self.delivery.adopt(kernel.delivered())
        servers: list[Stoppable] = []
        signals = threading.current_thread() is threading.main_thread()
        try:
            self.enforcer = Enforcer(kernel, self.numbers)
            self.enforcer.adopt()
            if policy is not None:
                self._apply_policy(policy)
            elif self.enforcer.active is not None:
                _logger.info("no policy configured: removing the one a previous run left")
                self.enforcer.unload()
            if self.attestor is not None:
                self.settler = Settler(
                    self.attestor, kernel, self.numbers, lambda: self.enforcer, self.metrics
                )
            self._start_credentials()
            rebuilt = self.rebuild_from_proc()
            _logger.info("process table rebuilt from /proc: %d processes in scope", rebuilt)
            kernel.retire_other_versions()  # an upgrade: only now is ours in force
            if signals:
                loop.add_signal_handler(signal.SIGTERM, self.stop)
                loop.add_signal_handler(signal.SIGINT, self.stop)
                loop.add_signal_handler(signal.SIGHUP, self._reload.set)
            self.reader = RingReader(
                kernel.ring, self.settler, self.delivery.replay_until, self.handle_batch
            )
            self._loop_beat = self.health.heartbeat("event loop")
            self.reader.heartbeat = self.health.heartbeat("ring buffer reader")
            if self.metrics is not None:
                self.metrics.watch_heartbeats(self.health.ages)
                self.metrics.watch_ring(kernel.ring.fill)
            self.reader.start(loop)
            servers = await self._start_servers()
            # Everything loaded so far lives as long as the daemon: keep it out of
            # the collector's scans, and let the young generation grow, since
            # each kernel record makes a few short-lived objects.
            gc.freeze()
            gc.set_threshold(10_000, 20, 20)
            _notify(sdnotify.ready, f"attached to {self.scope} in {self.attach_seconds:.2f}s")
            self._serving = True
            if on_ready is not None:
                on_ready()
            await self._main_loop()
        finally:
            _notify(sdnotify.stopping)
            self._serving = False
            self.health.forget("ring buffer reader")
            self.health.forget("event loop")
            if self.reader is not None:
                self.reader.stop()
                await loop.run_in_executor(None, self.reader.join, 5.0)
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
            kernel.close(detach=self.config.detach_on_exit)
            if not self.config.detach_on_exit:
                _logger.info(
                    "programs stay attached (fail-static); 'sidecar uninstall' removes them"
                )

    def handle_batch(self, batch: Batch) -> None:
        """Event loop: describe each record of a batch, emit its event, then deliver."""
        batch = batch.decoded()
        if batch.errors:
            self.decode_errors += batch.errors
            if self.metrics is not None:
                self.metrics.record_loss("decode_error", batch.errors)
        delivery = self.delivery
        assert delivery is not None
        events = self.describer.describe_all(batch.records, batch.settled)
        if batch.ends is None:
            self.outputs.emit_all([event for event in events if event is not None])
        else:
            # Records re-read after a restart: each goes only to the outputs that lack it.
            for event, end in zip(events, batch.ends, strict=True):
                if event is not None:
                    self.outputs.emit(event, *delivery.outputs_for(end))
        delivery.delivered(batch.cursor)

    async def _start_exporter(self) -> _ExporterStopper | None:
        if not self.config.collector:
            return None
        from sidecar.attest import boot_id
        from sidecar.export.enroll import Renewer, load_host_identity
        from sidecar.export.exporter import Exporter, ExporterConfig

        cred_dir = self.config.collector_credentials

        def identity() -> HostIdentity:
            return load_host_identity(cred_dir)

        enrolled = identity()  # not enrolled: fail now, with the error naming the folder
        if enrolled.host != self.config.host:
            # The collector refuses every event naming another host than the
            # certificate: say so now rather than fail each batch later.
            raise CredentialError(
                f"the credentials in {cred_dir} are for host '{enrolled.host}', but events"
                f" name host '{self.config.host}': set `host: {enrolled.host}` in"
                f" {self.config.source} (or SIDECAR_HOST)"
            )
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
        self.renewer = Renewer(
            self.config.collector,
            cred_dir,
            self.config.collector_server_name,
            self._host_renewed,
        )
        self._renew_task = asyncio.create_task(self.renewer.run(), name="host-renewal")
        self.outputs.start_exporting(exporter)  # policy_loaded and all else from start-up
        self._export_task = asyncio.create_task(self._export(exporter), name="exporter")
        _logger.info("streaming events to the collector at %s", ", ".join(self.config.collector))
        return _ExporterStopper(self)

    def _host_renewed(self, ident: HostIdentity) -> None:
        """New host credentials: sign workload SVIDs with the new intermediate from now on."""
        _logger.info("host credentials renewed: %s", ident.host)
        if self.manager is not None:
            from sidecar.export.enroll import load_intermediate

            self.manager.ca = load_intermediate(self.config.collector_credentials)

    async def _export(self, exporter: Exporter) -> None:
        try:
            await exporter.run()
        except SidecarError as exc:
            _logger.error("event export stopped: %s; events stay in the spool", exc)

    async def _start_servers(self) -> list[Stoppable]:
        servers: list[Stoppable] = []
        stopper = await self._start_exporter()
        if stopper is not None:
            servers.append(stopper)
        if (
            self.manager is not None
            and self.instances is not None
            and self.config.workload_socket is not None
        ):
            from sidecar.identity.workload_api import WorkloadApiServer

            wl = WorkloadApiServer(self.config.workload_socket, self.manager, self.instances)
            await wl.start()
            servers.append(wl)
            _logger.info("SPIFFE Workload API on %s", wl.endpoint)
        if self.config.admin_socket is not None:
            from sidecar.daemon import views
            from sidecar.daemon.admin import AdminServer

            admin = AdminServer(
                self.config.admin_socket,
                {
                    "status": lambda _req: views.status(self),
                    "identities": lambda _req: views.identities(self),
                },
            )
            await admin.start()
            servers.append(admin)
        if self.metrics is not None and self.config.metrics:
            from sidecar.metrics import serve

            host, _, port = self.config.metrics.rpartition(":")
            endpoint = serve(self.metrics.registry, host, int(port), self.health)
            servers.append(_SyncStopper(endpoint.stop))
            _logger.info("metrics on %s", endpoint.url)
        return servers

    async def _main_loop(self) -> None:
        assert self.kernel is not None and self.delivery is not None
        watchdog = sdnotify.watchdog_interval()
        tick = min(self.config.reload_interval, (watchdog or 2.0) / 2, 1.0)
        last_check = time.monotonic()
        while not self._stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):  # not TimeoutError before 3.11
                await asyncio.wait_for(self._stop.wait(), timeout=tick)
            if self._loop_beat is not None:
                self._loop_beat.beat()
            self.kernel.heartbeat()
            if self.exporter is not None and self.exporter.failed:
                self.delivery.release()  # the spool takes nothing more
            self._check_lost()
            self.export_metrics()
            self.sink.flush()
            if watchdog:
                self._feed_watchdog()
            now = time.monotonic()
            if self._reload.is_set() or now - last_check >= self.config.reload_interval:
                forced = self._reload.is_set()
                self._reload.clear()
                last_check = now
                self.reload(force=forced)

    def stop(self) -> None:
        self._stop.set()

    def _feed_watchdog(self) -> None:
        """Feed systemd's watchdog only while every heartbeat is recent (as /healthz)."""
        live = self.health.live()
        if live.ok:
            self._watchdog_starved = False
            _notify(sdnotify.watchdog)
        elif not self._watchdog_starved:
            self._watchdog_starved = True
            _logger.error("not feeding the watchdog: %s", "; ".join(live.reasons))

    def _readiness(self) -> str | None:
        """Ready: programs attached and, when a policy is configured, a policy in force.

        Runs on the HTTP server's thread: it reads flags the loop sets, nothing more.
        """
        if not self._serving or self.kernel is None:
            return "not ready: programs not attached yet (or shutting down)"
        enforcer = self.enforcer
        if self.config.policy is not None and (enforcer is None or enforcer.active is None):
            return f"not ready: no policy in force ({self.config.policy} configured)"
        return None

    # -- reloads -----------------------------------------------------------------------

    def reload(self, force: bool = False) -> None:
        """Re-read entries and policy when they changed (or when told to, on SIGHUP).

        A file that fails to load is reported and the running one keeps
        enforcing: nothing is ever left half-applied.
        """
        if force:
            _notify(sdnotify.reloading)
        if self.attestor is not None and self.files.changed_and_settled(
            "entries", self.config.entries, force
        ):
            assert self.config.entries is not None
            self.files.mark_loaded("entries", file_stamp(self.config.entries))
            try:
                entries = self.attestor.reload(self.config.entries)
                for sid in entries.spiffe_ids:
                    self.numbers.number(sid)
                self.outputs.emit(
                    m.EntriesLoaded(
                        time_ns=self._now(), host=self.config.host, digest=entries.digest
                    )
                )
            except (AttestationError, PolicyError) as exc:
                self._rejected("entries", str(exc))
        if self.files.changed_and_settled("policy", self.config.policy, force):
            try:
                policy = self._read_policy()
            except StillChanging as exc:
                _logger.info("%s: taken once it stops changing", exc)
                self.files.forget_change("policy")  # wait for a quiet interval again
            except (PolicyError, ConfigError) as exc:
                self.files.mark_loaded("policy", file_stamp(self.config.policy))
                self._rejected("policy", str(exc))
            else:
                try:
                    if policy is not None:
                        self._apply_policy(policy)
                except (KernelError, PolicyError) as exc:
                    # Nothing flipped: the generation in force keeps judging.
                    self._rejected("policy", f"{self.config.policy}: {exc}")
        if force:
            _notify(sdnotify.ready)

    def _apply_policy(self, policy: CompiledPolicy) -> None:
        assert self.enforcer is not None
        began = time.monotonic()
        gen = self.enforcer.load(policy)
        self.policy_error = None
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
            self.metrics.declare_verdicts(
                (sid, rule, ("allow", "would_deny") if ident.mode == "audit" else ("allow", "deny"))
                for sid, ident in policy.identities.items()
                for rule in (*ident.rule_names, "default")
            )
        self.outputs.emit(
            m.PolicyLoaded(
                time_ns=self._now(),
                host=self.config.host,
                policy_version=policy.version,
                source=str(policy.source),
                identities=tuple(sorted(policy.identities)),
            )
        )

    def _rejected(self, what: str, error: str) -> None:
        _logger.error("%s reload rejected, the running one stays in force: %s", what, error)
        self.policy_error = error
        if self.metrics is not None:
            self.metrics.record_policy_reload(False)
        kind = m.PolicyRejected if what == "policy" else m.EntriesRejected
        self.outputs.emit(kind(time_ns=self._now(), host=self.config.host, error=error))

    # -- credentials and losses ------------------------------------------------------

    def _on_jwt(self, instance_id: str, spiffe_id: SpiffeId) -> None:
        if self.metrics is not None:
            self.metrics.record_credential_issued(str(spiffe_id), "jwt")

    def _on_credential(
        self, kind: str, instance_id: str, spiffe_id: SpiffeId, serial: int, not_after: datetime
    ) -> None:
        issued = kind == "credential_issued"
        if self.metrics is not None:
            if issued:
                self.metrics.record_credential_issued(str(spiffe_id), "x509")
                self.metrics.set_svid_expiry(instance_id, not_after.timestamp())
            else:
                self.metrics.record_credential_revoked(str(spiffe_id))
                self.metrics.set_svid_expiry(instance_id, None)
        cls = m.CredentialIssued if issued else m.CredentialRevoked
        self.outputs.emit(
            cls(
                time_ns=self._now(),
                host=self.config.host,
                identity=str(spiffe_id),
                instance_id=instance_id,
                svid_serial=f"{serial:x}",
                not_after_ns=int(not_after.timestamp()) * 10**9 + not_after.microsecond * 1000,
                policy_version=self.describer.policy_version(),
            )
        )

    def _check_lost(self) -> None:
        kernel = self.kernel
        if kernel is None:
            return
        counts = kernel.lost_counts()
        delta = {t: n - self.lost_reported.get(t, 0) for t, n in counts.items()}
        if any(d > 0 for d in delta.values()):
            self.lost_reported = counts
            lost = {t.name.lower(): d for t, d in delta.items() if d > 0}
            _logger.warning("kernel ring buffer full: %s records lost", lost)
            if self.metrics is not None:
                self.metrics.record_loss("ringbuf_full", sum(lost.values()))
            self.outputs.emit(
                m.Lost(
                    time_ns=self._now(), host=self.config.host, reason="ringbuf_full", counts=lost
                )
            )
            # Kept pinned once the report is written out: a restarted daemon reports
            # only what no daemon has (a crash between the two reports a loss
            # twice, never none).  With a collector, that is once the spool has it.
            self.sink.flush()
            self.outputs.when_spooled(lambda: kernel.set_lost_reported(counts))

    def export_metrics(self) -> None:
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
        self.metrics.set_stream_state(self.stream_state())

    def stream_state(self) -> Literal["streaming", "backoff", "stopped"]:
        running = self._export_task is not None and not self._export_task.done()
        if self.exporter is None or not running:
            return "stopped"
        return "streaming" if self.exporter.connected else "backoff"


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
