"""What the daemon's stages need of the objects they are handed: typed, so that
mypy checks the wiring, and small, so that a test can hand in its own.

The concrete classes are :class:`sidecar.kernel.maps.KernelMaps`,
:class:`sidecar.attest.Attestor`, :class:`sidecar.enforce.enforcer.Enforcer`,
:class:`sidecar.identity.instances.InstanceRegistry`,
:class:`sidecar.identity.manager.CredentialManager` and
:class:`sidecar.export.exporter.Exporter`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from sidecar.api.v1 import event_pb2
    from sidecar.attest.attestor import AttestationResult
    from sidecar.attest.entries import Entries
    from sidecar.attest.facts import ExecSeen
    from sidecar.enforce.enforcer import Generation
    from sidecar.identity.instances import Instance
    from sidecar.identity.x509 import X509Svid
    from sidecar.kernel.maps import ProcEntry
    from sidecar.kernel.ring import RingRead


class IdentityMap(Protocol):
    """The kernel's process map, as the reader thread writes identities into it."""

    def proc_state(self, pid: int) -> ProcEntry | None: ...
    def holds_process(self, pid: int, start_ns: int) -> bool: ...
    def set_identity(
        self, pid: int, identity: int, ppid: int = 0, *, create: bool = False, start_ns: int = 0
    ) -> bool: ...


class RingBuffer(Protocol):
    @property
    def consumer(self) -> int: ...
    @property
    def producer(self) -> int: ...
    def read(self, timeout_ms: int) -> RingRead: ...
    def commit(self, position: int) -> None: ...

    #: Bytes of data area: the kernel drops records once this much is unconsumed.
    size: int


class Attesting(Protocol):
    @property
    def entries(self) -> Entries: ...
    def attest(
        self,
        pid: int,
        parent_identity: str | None,
        seen: ExecSeen | None = None,
        still_running: Callable[[], bool] | None = None,
    ) -> AttestationResult: ...


class Policies(Protocol):
    """The policy generations the kernel judges from."""

    @property
    def active(self) -> Generation | None: ...
    def generation(self, gen: int) -> Generation | None: ...


class Instances(Protocol):
    def get(self, pid: int) -> Instance | None: ...
    def add(self, result: AttestationResult, now_ns: int) -> Instance: ...
    def end(self, pid: int) -> Instance | None: ...
    def all(self) -> list[Instance]: ...
    def live(self, spiffe_id: str) -> int: ...
    def live_counts(self) -> dict[str, int]: ...


class Credentials(Protocol):
    def current(self, instance_id: str) -> X509Svid | None: ...


class Exporting(Protocol):
    """The exporter, as the daemon's outputs hand it events."""

    def submit(self, event: event_pb2.Event) -> bool: ...
    def submit_mark(self, then: Callable[[], None]) -> None: ...


class VerdictMetrics(Protocol):
    def record_verdict(self, identity: str, rule: str, verdict: str) -> None: ...
    def observe_attestation(self, seconds: float) -> None: ...
    def set_live_instances(self, spiffe_id: str, n: int) -> None: ...
    def record_loss(self, reason: str, n: int) -> None: ...


KnownIdentities = Callable[[], Sequence[str]]
