"""Attest and settle: the reader thread's stage, between decoding and the event loop.

For each new image in a batch of records, attest the process and write its
identity into the kernel's process map at once, before the records go on to
the event loop: a pending process may not connect until this is done.  A
child forked (or exec'd without a match) while its parent was pending takes
the parent's answer once the parent is settled.

Thread: the reader thread alone calls into this stage after start-up (at
start-up, the loop does, before the reader starts), and alone writes
identities into the kernel map, in the order the kernel recorded them: a
newer answer is never overwritten by an older one.  ``settled`` and
``waiting`` are its state.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sidecar.attest.facts import ExecSeen
from sidecar.kernel import abi
from sidecar.policy import caps
from sidecar.proc.pidfd import kill
from sidecar.proc.read import host_caps
from sidecar.util.errors import AttestationError

if TYPE_CHECKING:
    from sidecar.attest.attestor import AttestationResult
    from sidecar.daemon.stages import Attesting, IdentityMap, Policies, VerdictMetrics
    from sidecar.enforce.enforcer import IdentityNumbers

_logger = logging.getLogger(__name__)

# Identities written by the reader that stay known after their process exits.
SETTLED_REMEMBERED = 4096


@dataclass(frozen=True, slots=True)
class Settled:
    """What the reader thread's attestation of one exec record found and wrote."""

    result: AttestationResult
    number: int  # the identity number the process holds after it
    # capabilities it held that its policy refuses (it was killed in enforce mode)
    caps_refused: int = 0


class Settler:
    def __init__(
        self,
        attestor: Attesting,
        kernel: IdentityMap,
        numbers: IdentityNumbers,
        policies: Callable[[], Policies | None],
        metrics: VerdictMetrics | None = None,
    ) -> None:
        self.attestor = attestor
        self.kernel = kernel
        self.numbers = numbers
        self._policies = policies
        self.metrics = metrics
        self.latency_ns: deque[int] = deque(maxlen=100_000)
        # pid -> identity number last written for it, newest last: a parent
        # that exits before its pending child is attested has left the kernel
        # map, and its child still takes its answer from here.
        self.settled: dict[int, int] = {}
        # pending parent pid -> children waiting for its answer
        self.waiting: dict[int, list[int]] = {}

    def attest_batch(self, events: Sequence[abi.KernelEvent]) -> list[Settled | None]:
        """Attest every new image of a batch; one slot per record, for the event loop."""
        out: list[Settled | None] = [None] * len(events)
        needs_parent = self.attestor.entries.needs_parent
        for i, ev in enumerate(events):
            if isinstance(ev, abi.Fork):
                if ev.task.identity == abi.IDENTITY_PENDING:
                    self.settle_forked(ev.child_pid, ev.task.pid)
                continue
            if not isinstance(ev, abi.Exec) or ev.verdict == abi.Verdict.DENY:
                continue
            pid, kernel_identity = ev.task.pid, ev.task.identity
            parent_identity = None
            if needs_parent and ev.task.ppid:  # a map lookup only when a selector asks
                parent = self.kernel.proc_state(ev.task.ppid)
                parent_identity = self._name(parent[0]) if parent else None
            task = ev.task
            seen = ExecSeen(ev.start_ns, task.uid, task.gid, ev.caps_host, ev.exe_dev, ev.exe_ino)
            answer = self.attest_into_kernel(
                pid, task.ppid, parent_identity, kernel_identity, seen=seen
            )
            if answer is None:
                continue
            result, number = answer
            refused = 0
            if result.match is not None:
                now = time.monotonic_ns()
                self.latency_ns.append(now - ev.ts_ns)
                if self.metrics is not None:
                    self.metrics.observe_attestation((now - ev.ts_ns) / 1e9)
                facts = result.facts
                refused = self.refuse_privileged(
                    pid, result.match.spiffe_id, facts.cap_eff, facts.cap_host
                )
            out[i] = Settled(result, number, refused)
        return out

    def _name(self, number: int) -> str | None:
        if number in (abi.IDENTITY_NONE, abi.IDENTITY_PENDING):
            return None
        return self.numbers.name(number)

    def refuse_privileged(
        self, pid: int, spiffe_id: str, cap_eff: int, cap_host: int | None = None
    ) -> int:
        """An agent attested while it holds capabilities its policy refuses: kill it (enforce).

        The kernel refuses such a process at each later exec; this covers the
        exec that made it the agent, which the kernel saw while it was still
        pending (and so could not connect anywhere).  ``cap_eff`` is what
        attestation found, ``cap_host`` what they count for on the host when
        the kernel said so at exec.  Returns the refused capabilities it
        held.
        """
        policies = self._policies()
        active = policies.active if policies is not None else None  # read once
        ci = active.policy.identities.get(spiffe_id) if active and active.policy else None
        if ci is None:
            return 0
        mask = caps.refused_mask(ci.capabilities)
        held = cap_host if cap_host is not None else host_caps(pid, mask & cap_eff)
        refused = mask & (held or 0)
        if refused and ci.mode == "enforce":
            kill(pid)
            _logger.warning(
                "pid %d attested as %s holds %s: killed",
                pid,
                spiffe_id,
                ", ".join(caps.labels(refused)),
            )
        return refused

    def attest_into_kernel(
        self,
        pid: int,
        ppid: int,
        parent_identity: str | None,
        kernel_identity: int,
        create: bool = False,
        seen: ExecSeen | None = None,
    ) -> tuple[AttestationResult, int] | None:
        """Attest ``pid`` and write the answer into the kernel map.

        Returns the attestation and the identity number the process holds
        after it, or None if the process is gone.  A match writes its
        identity.  No match settles a pending image with what its parent has
        now: a child forked while its parent was pending inherits the
        parent's answer, as it would have at fork.  An identity inherited
        from an attested ancestor is left alone.
        """
        still_running = None
        if seen is not None:
            start_ns, kernel = seen.start_ns, self.kernel

            def still_running() -> bool:
                return kernel.holds_process(pid, start_ns)

        try:
            result = self.attestor.attest(pid, parent_identity, seen, still_running)
        except AttestationError as exc:
            _logger.debug("pid %d not attested: %s", pid, exc)
            return None
        number = kernel_identity
        if result.match is not None:
            number = self.numbers.number(result.match.spiffe_id)
            # The record's ppid is what the kernel's entry holds, and so is
            # its start time; a process found at start-up keeps whatever
            # entry the kernel has.
            start_ns = seen.start_ns if seen is not None else 0
            self.settle(pid, number, create, 0 if create else ppid, start_ns)
        elif kernel_identity == abi.IDENTITY_PENDING:
            number = self.parent_answer(ppid)
            if number == abi.IDENTITY_PENDING:
                self.wait_for_parent(ppid, pid)  # settled with the parent's answer
                number = abi.IDENTITY_NONE
            else:
                self.settle(pid, number)
        return result, number

    def settle(
        self, pid: int, number: int, create: bool = False, ppid: int = 0, start_ns: int = 0
    ) -> None:
        """Write ``pid``'s identity, then that of its children waiting on it.

        A process that has exited meanwhile has no entry, and gets none: the
        kernel removed it at exit, and the pid may be reused.  ``ppid`` and
        ``start_ns``, when the caller knows what the kernel's entry holds,
        save a map lookup.
        """
        self.kernel.set_identity(pid, number, ppid, create=create, start_ns=start_ns)
        settled = self.settled
        settled.pop(pid, None)  # a reused pid moves to the newest end
        settled[pid] = number
        if len(settled) > SETTLED_REMEMBERED:
            del settled[next(iter(settled))]
        for child in self.waiting.pop(pid, ()):
            state = self.kernel.proc_state(child)
            # Only a child still pending: one attested meanwhile keeps its own answer.
            if state is not None and state.identity == abi.IDENTITY_PENDING:
                self.settle(child, number, ppid=state.ppid, start_ns=state.start_ns)

    def settle_forked(self, child: int, parent: int) -> None:
        """A child forked while its parent was pending takes the parent's answer, once known."""
        answer = self.parent_answer(parent)
        if answer == abi.IDENTITY_PENDING:
            self.wait_for_parent(parent, child)
            return
        state = self.kernel.proc_state(child)
        if state is not None and state.identity == abi.IDENTITY_PENDING:
            self.settle(child, answer, ppid=state.ppid, start_ns=state.start_ns)

    def wait_for_parent(self, parent: int, child: int) -> None:
        waiting = self.waiting
        if len(waiting) > SETTLED_REMEMBERED:  # parents that never settle (gone unattested)
            waiting.clear()
        waiting.setdefault(parent, []).append(child)

    def parent_answer(self, ppid: int) -> int:
        """The identity a pending child takes from its parent: the kernel's, or
        the last one written for the parent if it has exited since.  PENDING
        while the parent itself is not yet settled."""
        if not ppid:
            return abi.IDENTITY_NONE
        state = self.kernel.proc_state(ppid)
        if state is not None:
            return int(state[0])
        return self.settled.get(ppid, abi.IDENTITY_NONE)
