"""Attested process instances: who each agent process is, and its credentials.

An instance is one process image that attestation matched to a registration
entry: ``(boot id, pid, start time)`` plus the executable it was attested
with.  Its first X.509-SVID is issued when it first asks the Workload API
(a short-lived tool that never asks costs no signature); from then on it is
renewed while the process lives and revoked when the process exits or execs
another image.  The Workload API asks this registry
who a caller is, and the answer is re-checked against the live process
(start time and executable through /proc), so a recycled pid or a new image
under an attested pid never inherits credentials.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

from sidecar.attest import AttestationResult, boot_id, read_start_time
from sidecar.identity.manager import CredentialManager
from sidecar.identity.spiffeid import SpiffeId, parse_spiffe_id
from sidecar.identity.workload_api import Caller, WorkloadInstance

_logger = logging.getLogger(__name__)


@dataclass
class Instance:
    instance_id: str
    pid: int
    start_time: int
    spiffe_id: SpiffeId
    exe: str
    exe_dev: int
    exe_ino: int
    selectors: tuple[str, ...]
    entry: str  # file:line of the registration entry that matched
    attested_ns: int  # monotonic time of attestation

    def describe(self, manager: CredentialManager | None) -> dict[str, object]:
        svid = manager.current(self.instance_id) if manager else None
        return {
            "instance_id": self.instance_id,
            "pid": self.pid,
            "spiffe_id": str(self.spiffe_id),
            "exe": self.exe,
            "selectors": list(self.selectors),
            "entry": self.entry,
            "svid_serial": f"{svid.serial:x}" if svid else None,
            "svid_expires": svid.not_after.isoformat() if svid else None,
        }


# Registration entries name a handful of identities, attested over and over.
_spiffe_id = functools.lru_cache(maxsize=1024)(parse_spiffe_id)


def instance_id(boot: str, pid: int, start_time: int) -> str:
    """Stable id of a process instance: the same process always gets the same id."""
    return hashlib.sha256(f"{boot}:{pid}:{start_time}".encode()).hexdigest()[:24]


class InstanceRegistry:
    """Live attested instances by pid; the Workload API's caller resolver."""

    def __init__(self, manager: CredentialManager | None) -> None:
        self.manager = manager
        self.boot = boot_id()
        self._by_pid: dict[int, Instance] = {}
        # live instances by SPIFFE ID, kept as they come and go: counting them
        # from _by_pid at each exec would cost as much as there are agents
        self._live: dict[str, int] = {}

    def __len__(self) -> int:
        return len(self._by_pid)

    def all(self) -> list[Instance]:
        return list(self._by_pid.values())

    def get(self, pid: int) -> Instance | None:
        return self._by_pid.get(pid)

    def live(self, spiffe_id: str) -> int:
        """How many live instances hold ``spiffe_id``."""
        return self._live.get(spiffe_id, 0)

    def live_counts(self) -> dict[str, int]:
        """Live instances by SPIFFE ID (identities with none are left out)."""
        return {sid: n for sid, n in self._live.items() if n}

    def _count(self, inst: Instance, delta: int) -> None:
        sid = str(inst.spiffe_id)
        self._live[sid] = self._live.get(sid, 0) + delta

    def add(self, result: AttestationResult, now_ns: int) -> Instance:
        """Record a matched attestation (credentials come when it first asks)."""
        assert result.match is not None
        f = result.facts
        inst = Instance(
            instance_id=instance_id(self.boot, f.pid, f.start_time),
            pid=f.pid,
            start_time=f.start_time,
            spiffe_id=_spiffe_id(result.match.spiffe_id),
            exe=f.exe_path,
            exe_dev=f.exe_dev,
            exe_ino=f.exe_ino,
            selectors=tuple(str(s) for s in result.match.selectors),
            entry=f"{result.match.source}:{result.match.line}",
            attested_ns=now_ns,
        )
        old = self._by_pid.get(f.pid)
        if old is not None and old.instance_id != inst.instance_id:
            self.end(f.pid)
        elif old is not None:
            self._count(old, -1)  # the same instance attested again: replaced below
        self._by_pid[f.pid] = inst
        self._count(inst, 1)
        return inst

    def end(self, pid: int) -> Instance | None:
        """The instance's process exited or exec'd: revoke its credentials for good."""
        inst = self._by_pid.pop(pid, None)
        if inst is None:
            return None
        self._count(inst, -1)
        if self.manager is not None:
            self.manager.revoke(inst.instance_id)
        return inst

    # -- CallerResolver ------------------------------------------------------------------

    def resolve(self, caller: Caller) -> WorkloadInstance | None:
        """The caller's instance, if it is still the very process that was attested."""
        inst = self._by_pid.get(caller.pid)
        if inst is None:
            return None
        if read_start_time(caller.pid) != inst.start_time:
            return None  # a recycled pid
        try:
            st = os.stat(Path("/proc") / str(caller.pid) / "exe")
        except OSError:
            return None
        if (st.st_dev, st.st_ino) != (inst.exe_dev, inst.exe_ino):
            return None  # a new image under the attested pid, before its exec record
        try:
            signal.pidfd_send_signal(caller.pidfd, 0)  # the pidfd still names a live process
        except OSError:
            return None
        return WorkloadInstance(inst.instance_id, inst.spiffe_id)
