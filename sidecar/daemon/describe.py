"""The describe stage: one kernel record -> the process table updated -> one typed event.

Each record kind has a handler, registered in :attr:`Describer.handlers`
(as Tetragon's sensors register their decoders); a record of a kind with no
handler is counted in ``unhandled`` and dropped, never mistaken for another.
A handler keeps the table of live processes in scope, finishes what the
settle stage started for an attested exec (the instance, whose SVID is
issued when it first asks), and says who did what under which policy.

Thread: the event loop owns everything here: the process table, the
instance registry's changes, the caches.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from sidecar.daemon.table import Process, ProcessTable
from sidecar.enforce.enforcer import ExecFile
from sidecar.events import model as m
from sidecar.kernel import abi
from sidecar.kernel.limits import EXEC_PATH_MAX_BYTES
from sidecar.policy import caps
from sidecar.policy.model import format_socket_kind, format_unix_address
from sidecar.proc.pidfd import kill
from sidecar.proc.read import read_argv, read_cgroup, read_exe, read_status_ids
from sidecar.util.errors import SidecarError

if TYPE_CHECKING:
    from sidecar.attest.attestor import AttestationResult
    from sidecar.daemon.settle import Settled
    from sidecar.daemon.stages import Credentials, Instances, Policies, VerdictMetrics
    from sidecar.enforce.enforcer import IdentityNumbers
    from sidecar.proc.cgroups import CgroupNames
    from sidecar.util.redact import Redactor

_logger = logging.getLogger(__name__)

_FAMILY = {abi.AF_INET: "inet", abi.AF_INET6: "inet6"}
_PROTOCOL = {abi.IPPROTO_TCP: "tcp", abi.IPPROTO_UDP: "udp"}
_SOCKOPT = {(0, 4): "IP_OPTIONS", (41, 57): "IPV6_RTHDR", (41, 5): "IPV6_2292RTHDR"}
_VERDICT: dict[abi.Verdict, m.Verdict] = {
    abi.Verdict.ALLOW: "allow",
    abi.Verdict.DENY: "deny",
    abi.Verdict.WOULD_DENY: "would_deny",
}
_UNKNOWN = (abi.IDENTITY_NONE, abi.IDENTITY_PENDING)
# Process events are built positionally (see model.positional): the fields
# every process event has, in the order ``_head`` gives them, then the kind's.
_new_exec = m.positional(m.Exec)
_new_exit = m.positional(m.Exit)
_HEAD = tuple(f.name for f in fields(m.ProcessEvent))


class Describer:
    def __init__(
        self,
        host: str,
        numbers: IdentityNumbers,
        policies: Callable[[], Policies | None],
        cgroups: CgroupNames,
        *,
        redactor: Redactor | None = None,
        metrics: VerdictMetrics | None = None,
    ) -> None:
        self.host = host
        self.numbers = numbers
        self._policies = policies
        self.cgroups = cgroups
        self.redactor = redactor
        self.metrics = metrics
        # Set once credentials start (only with registration entries).
        self.instances: Instances | None = None
        self.credentials: Credentials | None = None
        self.table = ProcessTable()
        self.unhandled = 0
        self.clock_offset = time.time_ns() - time.monotonic_ns()
        self._realpaths: dict[str, str] = {}
        self._redacted: dict[tuple[str, ...], tuple[tuple[str, ...], bool]] = {}
        self._gauged: set[str] = set()  # identities whose live-instance gauge is set
        # Policy versions by generation while a batch is described: nothing can
        # load a policy meanwhile (both happen on the event loop), and every
        # record asks.
        self._batch_versions: dict[int | None, str | None] | None = None
        self.handlers: dict[type[abi.KernelEvent], Callable[[Any, Settled | None], m.Event]] = {
            abi.Exec: self.on_exec,
            abi.Fork: self.on_fork,
            abi.Exit: self.on_exit,
            abi.Connect: self.on_connect,
            abi.Socket: self.on_socket,
            abi.Unix: self.on_unix,
        }

    def describe(self, record: abi.KernelEvent, settled: Settled | None = None) -> m.Event | None:
        """Update the table from one record; its event, or None (see :meth:`describe_all`)."""
        return self.describe_all([record], [settled])[0]

    def describe_all(
        self, records: Sequence[abi.KernelEvent], settled: Sequence[Settled | None]
    ) -> list[m.Event | None]:
        """describe() each record of a batch: one slot per record, None for a record
        of a kind with no handler or one whose handler failed (logged)."""
        handlers = self.handlers
        out: list[m.Event | None] = []
        self._batch_versions = {}
        try:
            for record, done in zip(records, settled, strict=True):
                handler = handlers.get(type(record))
                if handler is None:
                    self.unhandled += 1
                    out.append(None)
                    continue
                try:
                    out.append(handler(record, done))
                except SidecarError as exc:
                    _logger.warning("event of pid %d not handled: %s", record.task.pid, exc)
                    out.append(None)
        finally:
            self._batch_versions = None
        return out

    # -- shared facts ---------------------------------------------------------------

    def identity_name(self, number: int) -> str | None:
        return None if number in _UNKNOWN else self.numbers.name(number)

    def policy_version(self, gen: int | None = None) -> str | None:
        """The version of policy generation ``gen`` (None: the one in force)."""
        versions = self._batch_versions
        if versions is None:
            return self._policy_version(gen)
        if gen not in versions:
            versions[gen] = self._policy_version(gen)
        return versions[gen]

    def _policy_version(self, gen: int | None) -> str | None:
        policies = self._policies()
        active = policies.active if policies is not None else None
        if policies is None or active is None:
            return None
        g = policies.generation(gen) if gen is not None else active
        return g.version if g else active.version

    def serial(self, proc: Process | None) -> str | None:
        if proc is None or proc.instance_id is None or self.credentials is None:
            return None
        svid = self.credentials.current(proc.instance_id)
        return f"{svid.serial:x}" if svid else None

    def _redact(self, argv: tuple[str, ...]) -> tuple[tuple[str, ...], bool]:
        """The redactor's answer, remembered: agents run the same tools with the same
        arguments over and over, and the patterns are the costliest part of an exec."""
        assert self.redactor is not None
        hit = self._redacted.get(argv)
        if hit is None:
            if len(self._redacted) > 4096:
                self._redacted.clear()
            hit = self._redacted[argv] = self.redactor.argv(argv)
        return hit

    def mask(self, argv: tuple[str, ...]) -> tuple[str, ...]:
        return self.redactor.argv(argv)[0] if self.redactor is not None else argv

    def _cgroup(self, pid: int, cgroup_id: int) -> str:
        return self.cgroups.name(cgroup_id) or read_cgroup(pid) or ""

    def _ppid(self, ev: abi.KernelEvent) -> int:
        if ev.task.ppid:
            return ev.task.ppid
        ids = read_status_ids(ev.task.pid)
        return ids[0] if ids else 0

    def _exe(self, pid: int, filename: str) -> str:
        """The executable's canonical path, without a /proc read when the name is absolute.

        An exec through a file descriptor (fexecve, execveat with an empty
        path) is named /dev/fd/N by the kernel: N is the process's descriptor,
        not ours, so only /proc/PID/exe tells which file it was.  So does a
        name as long as the record holds: it may have been cut.
        """
        if (
            not filename.startswith("/")
            or filename.startswith("/dev/fd/")
            or len(filename.encode("utf-8", "surrogateescape")) >= EXEC_PATH_MAX_BYTES
        ):
            return read_exe(pid) or filename
        exe = self._realpaths.get(filename)
        if exe is None:
            if len(self._realpaths) > 4096:
                self._realpaths.clear()
            exe = self._realpaths[filename] = os.path.realpath(filename)
        return exe

    def _identity(self, ev: abi.KernelEvent, proc: Process | None) -> str | None:
        """Who did it: the kernel's identity number, else what the table knows."""
        number = ev.task.identity
        identity = self.numbers.name(number) if number not in _UNKNOWN else None
        return identity or (proc.identity if proc is not None else None)

    def _process_fields(
        self, ev: abi.KernelEvent, proc: Process | None, gen: int | None = None
    ) -> dict[str, Any]:
        """The fields every process event has, by name."""
        pending = ev.task.identity == abi.IDENTITY_PENDING
        head = self._head(ev, proc, self._identity(ev, proc), gen, pending)
        return dict(zip(_HEAD, head, strict=True))

    def _head(
        self,
        ev: abi.KernelEvent,
        proc: Process | None,
        identity: str | None,
        gen: int | None,
        pending: bool,
    ) -> tuple[Any, ...]:
        """:meth:`_process_fields` in field order, for the positional constructors:
        time, host, identity, instance, serial, policy version, pid, ppid, uid, gid,
        comm, exe, argv, cgroup, pending."""
        task = ev.task
        if proc is None:
            return (
                self.clock_offset + ev.ts_ns,
                self.host,
                identity,
                None,
                None,
                self.policy_version(gen),
                task.pid,
                task.ppid,
                task.uid,
                task.gid,
                task.comm,
                "",
                (),
                "",
                pending,
            )
        return (
            self.clock_offset + ev.ts_ns,
            self.host,
            identity,
            proc.instance_id,
            None if proc.instance_id is None else self.serial(proc),
            self.policy_version(gen),
            task.pid,
            proc.ppid,
            task.uid,
            task.gid,
            task.comm,
            proc.exe,
            proc.argv,
            proc.cgroup,
            pending,
        )

    def _record_verdict(self, identity: str | None, rule: str, verdict: str) -> None:
        if self.metrics is not None:
            self.metrics.record_verdict(identity or "none", rule, verdict)

    def count_live(self) -> None:
        """Every known identity's live-instance gauge, 0 for those with none."""
        if self.metrics is None or self.instances is None:
            return
        counts = self.instances.live_counts()
        for sid in self.numbers.known():
            self.metrics.set_live_instances(sid, counts.get(sid, 0))
            self._gauged.add(sid)

    def _count_live_of(self, spiffe_id: object) -> None:
        """The gauge of the one identity whose instances just changed; all of them
        the first time an identity changes (so known ones show 0 rather than nothing)."""
        if self.metrics is None or self.instances is None:
            return
        sid = str(spiffe_id)
        if sid not in self._gauged:
            self.count_live()
        self.metrics.set_live_instances(sid, self.instances.live(sid))

    # -- handlers ------------------------------------------------------------------------

    def on_exec(self, ev: abi.Exec, settled: Settled | None) -> m.Exec:
        # Runs for every exec on the host: attribute lookups and calls kept few.
        task = ev.task
        pid = task.pid
        table = self.table
        proc = table.get(pid)
        exe = self._realpaths.get(ev.filename) or self._exe(pid, ev.filename)
        argv = ev.argv if not ev.args_missing else (read_argv(pid) or ())
        redacted = False
        if self.redactor is not None:
            argv, redacted = self._redact(argv)
        if proc is not None:
            # The same process (no exit seen since its fork), with a new image.
            proc.exe, proc.argv, proc.exec_count = exe, argv, proc.exec_count + 1
            if self.instances is not None and self.instances.get(pid) is not None:
                ended = self.instances.end(pid)  # credentials belonged to the old image
                proc.instance_id = None
                if ended is not None:
                    self._count_live_of(ended.spiffe_id)
        else:
            # A vfork child (its fork sends no record) or one whose fork record
            # was lost: it starts with what its parent had, as at fork.
            ppid = task.ppid or self._ppid(ev)
            parent = table.get(ppid)
            proc = table.add(
                Process(  # pid, start_ns, ppid, uid, gid, exe, argv, cgroup, identity, instance
                    pid,
                    ev.ts_ns,
                    ppid,
                    task.uid,
                    task.gid,
                    exe,
                    argv,
                    self._cgroup(pid, task.cgroup_id),
                    parent.identity if parent else None,
                    parent.instance_id if parent else None,
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
            self.finish_attestation(proc, settled.result, number)
            if settled.caps_refused:
                refused = settled.caps_refused
                mode = self._mode_of(proc.identity)
                verdict = abi.Verdict.DENY if mode == "enforce" else abi.Verdict.WOULD_DENY
        elif number not in _UNKNOWN:
            proc.identity = self.identity_name(number)
        rule = "file-changed" if ev.flags & abi.EXEC_FILE_CHANGED else None
        if ev.flags & abi.EXEC_UNTRACKED:
            rule = "untracked"  # the process map was full: it could not be judged
        if refused:
            rule = "capabilities"
        if verdict == abi.Verdict.ALLOW:
            verdict, rule = self._double_check_exec(pid, task.identity, verdict)
        out = _new_exec(
            *self._head(
                ev,
                proc,
                None if number in _UNKNOWN else self.numbers.name(number),
                ev.policy_gen,
                number == abi.IDENTITY_PENDING,  # settled while handling this record: not pending
            ),
            ev.filename,
            ev.args_truncated,
            _VERDICT[verdict],
            redacted,
            None,  # rule: set below when not allowed
            tuple(caps.labels(refused)) if refused else (),
        )
        if verdict != abi.Verdict.ALLOW:
            out.rule = rule or "default"
            self._record_verdict(proc.identity, out.rule, out.verdict)
        return out

    def _mode_of(self, spiffe_id: str | None) -> str | None:
        policies = self._policies()
        active = policies.active if policies is not None else None
        if spiffe_id is None or active is None or active.policy is None:
            return None
        ci = active.policy.identities.get(spiffe_id)
        return ci.mode if ci is not None else None

    def _double_check_exec(
        self, pid: int, number: int, verdict: abi.Verdict
    ) -> tuple[abi.Verdict, str | None]:
        """Defence in depth: is the file now running really one the identity may run?"""
        policies = self._policies()
        active = policies.active if policies is not None else None
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
        if not kill(pid):
            return verdict, None
        _logger.warning("pid %d runs a file its identity may not run: killed", pid)
        return abi.Verdict.DENY, "exec-file-check"

    def finish_attestation(self, proc: Process, result: AttestationResult, number: int) -> None:
        """After the kernel knows (``number``): the instance (its SVID comes when it asks)."""
        if result.match is not None and self.instances is not None:
            inst = self.instances.add(result, time.monotonic_ns())
            proc.identity = result.match.spiffe_id
            proc.instance_id = inst.instance_id
            self._count_live_of(inst.spiffe_id)
            return
        # Settled with its parent's answer, or inherited from an attested
        # ancestor: the ancestor's instance when the parent carries it.
        name = self.identity_name(number)
        proc.identity = name
        parent = self.table.get(proc.ppid)
        if name is not None and parent is not None and parent.identity == name:
            proc.instance_id = parent.instance_id

    def on_fork(self, ev: abi.Fork, _settled: Settled | None) -> m.Fork:
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
                argv=parent.argv if parent else self.mask(read_argv(child) or ()),
                cgroup=parent.cgroup if parent else self._cgroup(child, ev.task.cgroup_id),
                identity=parent.identity if parent else None,
                instance_id=parent.instance_id if parent else None,
            )
        )
        facts = self._process_fields(ev, proc)
        facts["pid"] = child
        facts["ppid"] = ev.task.pid
        return m.Fork(**facts)

    def on_exit(self, ev: abi.Exit, _settled: Settled | None) -> m.Exit:
        pid = ev.task.pid
        proc = self.table.remove(pid)
        # The serial is read before the instance ends.
        pending = ev.task.identity == abi.IDENTITY_PENDING
        out = _new_exit(*self._head(ev, proc, self._identity(ev, proc), None, pending))
        instances = self.instances
        if instances is not None and instances.get(pid) is not None:
            ended = instances.end(pid)
            if ended is not None:
                self._count_live_of(ended.spiffe_id)
        return out

    def on_connect(self, ev: abi.Connect, _settled: Settled | None) -> m.Connect:
        facts = self._process_fields(ev, self.table.get(ev.task.pid), ev.policy_gen)
        out = m.Connect(
            **facts,
            family=_FAMILY.get(ev.family, str(ev.family)),
            protocol=_PROTOCOL.get(ev.protocol, str(ev.protocol)),
            daddr=str(ev.address),
            dport=ev.port,
            hook=ev.hook.name.lower(),
            verdict=_VERDICT[ev.verdict],
            rule=self._rule_name(ev.policy_gen, ev.task.identity, ev.rule),
        )
        self._record_verdict(out.identity, out.rule, out.verdict)
        return out

    def on_socket(self, ev: abi.Socket, _settled: Settled | None) -> m.Socket:
        facts = self._process_fields(ev, self.table.get(ev.task.pid), ev.policy_gen)
        family = _FAMILY.get(ev.family, str(ev.family))
        verdict = _VERDICT[ev.verdict]
        if ev.hook == abi.Hook.SETSOCKOPT:
            out = m.Socket(
                **facts,
                family=family,
                operation="setsockopt",
                option=_SOCKOPT.get((ev.level, ev.optname), f"{ev.level}/{ev.optname}"),
                rule="source-route",
                verdict=verdict,
            )
        else:
            out = m.Socket(
                **facts,
                family=family,
                operation="create",
                socket=format_socket_kind((ev.family, ev.type, ev.protocol)),
                rule="default" if ev.verdict != abi.Verdict.ALLOW else "sockets",
                verdict=verdict,
            )
        self._record_verdict(out.identity, out.rule, out.verdict)
        return out

    def on_unix(self, ev: abi.Unix, _settled: Settled | None) -> m.Socket:
        facts = self._process_fields(ev, self.table.get(ev.task.pid), ev.policy_gen)
        out = m.Socket(
            **facts,
            family="unix",
            operation="connect" if ev.hook == abi.Hook.CONNECT_UNIX else "sendmsg",
            address=format_unix_address((ev.path, False)),
            verdict=_VERDICT[ev.verdict],
            rule="unix" if ev.verdict == abi.Verdict.ALLOW else "default",
        )
        self._record_verdict(out.identity, out.rule, out.verdict)
        return out

    def _rule_name(self, gen: int, number: int, rule: int) -> str:
        policies = self._policies()
        if rule == 0 or policies is None:
            return "default"
        g = policies.generation(gen)
        name = self.numbers.name(number)
        if g is None or g.policy is None or name not in g.policy.identities:
            return f"rule-{rule}"
        names = g.policy.identities[name].rule_names
        return names[rule - 1] if rule <= len(names) else f"rule-{rule}"
