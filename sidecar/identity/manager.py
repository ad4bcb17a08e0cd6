"""Credential lifecycle per process instance: issue, rotate at half-life, revoke at exit.

Why per *instance* and not per SPIFFE ID: the sidecar stamps every event with the
credential serial of the process instance that caused it, and a process that exits
must lose its credentials at once, while another process with the same identity keeps
its own.  So each attested instance gets its own X509-SVID, renewed by an asyncio task
at half its lifetime, and every change is pushed to the instance's watchers (the
Workload API streams).  Revocation is final: the instance is never renewed again, its
serials join the revoked set and watchers receive ``None``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone

from sidecar.identity.jwt import JwtAuthority
from sidecar.identity.spiffeid import SpiffeId
from sidecar.identity.x509 import CertificateAuthority, X509Svid, as_spiffe_id
from sidecar.util.errors import CredentialError

_logger = logging.getLogger(__name__)

CREDENTIAL_ISSUED = "credential_issued"
CREDENTIAL_REVOKED = "credential_revoked"

EventCallback = Callable[[str, str, SpiffeId, int, datetime], None]
"""``on_event(kind, instance_id, spiffe_id, serial, not_after)``."""

# After a failed renewal, try again this soon (or at expiry, whichever is first).
_RETRY_DELAY = 1.0
# Attempts to draw a serial never used before; a clash of random 128-bit serials is
# already astronomically unlikely, so this only guards against a broken RNG.
_SERIAL_ATTEMPTS = 4


class _Watch:
    """Latest-wins mailbox: each message is the full state, so a slow reader loses nothing."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[X509Svid | None] = asyncio.Queue(maxsize=1)

    def push(self, item: X509Svid | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
        self._queue.put_nowait(item)

    async def get(self) -> X509Svid | None:
        return await self._queue.get()


@dataclass
class _Instance:
    spiffe_id: SpiffeId
    svid: X509Svid
    live_serials: dict[int, datetime] = field(default_factory=dict)
    watchers: set[_Watch] = field(default_factory=set)
    task: asyncio.Task[None] | None = None


class CredentialManager:
    """Issues, rotates and revokes the X509-SVIDs (and JWT-SVIDs) of process instances.

    Must be used from one asyncio event loop: rotation runs as tasks on it.
    """

    def __init__(
        self,
        ca: CertificateAuthority,
        jwt_authority: JwtAuthority,
        ttl: timedelta = timedelta(minutes=10),
        on_event: EventCallback | None = None,
        on_jwt: Callable[[str, SpiffeId], None] | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if ttl <= timedelta(0):
            raise CredentialError("credential ttl must be positive")
        if jwt_authority.trust_domain != ca.trust_domain:
            raise CredentialError(
                f"JWT authority is for '{jwt_authority.trust_domain}', CA for '{ca.trust_domain}'"
            )
        self.ca = ca
        self.jwt_authority = jwt_authority
        self.ttl = ttl
        self._on_event = on_event
        self._on_jwt = on_jwt  # (instance_id, spiffe_id) of each JWT-SVID issued
        self._sleep = sleep  # until a renewal is due; tests pass their own
        self._instances: dict[str, _Instance] = {}
        self._revoked_instances: set[str] = set()
        self._revoked_serials: dict[int, datetime] = {}
        self._closed = False

    @property
    def trust_domain(self) -> str:
        return self.ca.trust_domain

    # ---- issue / query ------------------------------------------------------------

    def issue(self, instance_id: str, spiffe_id: SpiffeId | str) -> X509Svid:
        """Issue the first SVID of an instance and start renewing it at half-life.

        Calling it again for a live instance returns its current SVID when the SPIFFE
        ID matches; a revoked instance id is refused for good.
        """
        sid = as_spiffe_id(spiffe_id)
        if self._closed:
            raise CredentialError("credential manager is closed")
        if instance_id in self._revoked_instances:
            raise CredentialError(f"instance {instance_id} was revoked and is never reissued")
        existing = self._instances.get(instance_id)
        if existing is not None:
            if existing.spiffe_id != sid:
                raise CredentialError(
                    f"instance {instance_id} already holds {existing.spiffe_id}, not {sid}"
                )
            return existing.svid
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError as exc:
            raise CredentialError("credentials are issued from the event loop") from exc
        svid = self._new_svid(sid)
        state = _Instance(spiffe_id=sid, svid=svid)
        state.live_serials[svid.serial] = svid.not_after
        self._instances[instance_id] = state
        state.task = loop.create_task(
            self._rotate_forever(instance_id, state), name=f"rotate-{instance_id}"
        )
        state.task.add_done_callback(_log_task_failure)
        self._emit(CREDENTIAL_ISSUED, instance_id, svid)
        return svid

    def current(self, instance_id: str) -> X509Svid | None:
        """The instance's newest SVID, or ``None`` when unknown or revoked."""
        state = self._instances.get(instance_id)
        return state.svid if state is not None else None

    def is_revoked(self, serial: int) -> bool:
        return serial in self._revoked_serials

    def revoked_serials(self) -> frozenset[int]:
        """Serials revoked and not yet expired."""
        self._prune_revoked()
        return frozenset(self._revoked_serials)

    def jwt_svid(
        self, instance_id: str, audience: Sequence[str], ttl: timedelta | None = None
    ) -> str:
        """A JWT-SVID for a live instance's SPIFFE ID (at most 5 minutes)."""
        state = self._instances.get(instance_id)
        if state is None:
            raise CredentialError(f"instance {instance_id} holds no credentials")
        if ttl is None:
            token = self.jwt_authority.issue(state.spiffe_id, audience)
        else:
            token = self.jwt_authority.issue(state.spiffe_id, audience, ttl)
        if self._on_jwt is not None:
            self._on_jwt(instance_id, state.spiffe_id)
        return token

    async def watch(self, instance_id: str) -> AsyncGenerator[X509Svid | None, None]:
        """The current SVID, then each renewal; ``None`` (and the end) once revoked."""
        state = self._instances.get(instance_id)
        if state is None:
            yield None
            return
        mailbox = _Watch()
        state.watchers.add(mailbox)
        try:
            yield state.svid
            while True:
                item = await mailbox.get()
                yield item
                if item is None:
                    return
        finally:
            state.watchers.discard(mailbox)

    # ---- revoke / close -----------------------------------------------------------

    def revoke(self, instance_id: str) -> None:
        """End an instance's credentials: no renewal, serials revoked, watchers told."""
        state = self._instances.pop(instance_id, None)
        self._revoked_instances.add(instance_id)
        if state is None:
            return
        if state.task is not None:
            state.task.cancel()
        for mailbox in state.watchers:
            mailbox.push(None)
        now = datetime.now(timezone.utc)
        live = {s: t for s, t in state.live_serials.items() if t > now}
        self._revoked_serials.update(live)
        for serial, not_after in live.items():
            self._on(CREDENTIAL_REVOKED, instance_id, state.spiffe_id, serial, not_after)
        _logger.info("revoked credentials of instance %s (%s)", instance_id, state.spiffe_id)

    async def close(self) -> None:
        """Stop renewing (credentials already issued stay valid until they expire)."""
        self._closed = True
        tasks = [s.task for s in self._instances.values() if s.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ---- internals ----------------------------------------------------------------

    async def _rotate_forever(self, instance_id: str, state: _Instance) -> None:
        delay = _half_life(state.svid)
        while True:
            await self._sleep(delay)
            if self._instances.get(instance_id) is not state:
                return
            try:
                svid = self._new_svid(state.spiffe_id)
            except CredentialError as exc:
                remaining = (state.svid.not_after - datetime.now(timezone.utc)).total_seconds()
                delay = max(0.0, min(_RETRY_DELAY, remaining))
                _logger.warning("renewing %s for %s failed: %s", state.spiffe_id, instance_id, exc)
                continue
            state.svid = svid
            now = datetime.now(timezone.utc)
            state.live_serials = {s: t for s, t in state.live_serials.items() if t > now}
            state.live_serials[svid.serial] = svid.not_after
            self._emit(CREDENTIAL_ISSUED, instance_id, svid)
            for mailbox in state.watchers:
                mailbox.push(svid)
            delay = _half_life(svid)

    def _new_svid(self, sid: SpiffeId) -> X509Svid:
        for _ in range(_SERIAL_ATTEMPTS):
            svid = self.ca.issue_x509_svid(sid, self.ttl)
            if not self._serial_in_use(svid.serial):
                return svid
        raise CredentialError("could not draw an unused certificate serial")

    def _serial_in_use(self, serial: int) -> bool:
        if serial in self._revoked_serials:
            return True
        return any(serial in s.live_serials for s in self._instances.values())

    def _prune_revoked(self) -> None:
        now = datetime.now(timezone.utc)
        expired = [s for s, t in self._revoked_serials.items() if t <= now]
        for serial in expired:
            del self._revoked_serials[serial]

    def _emit(self, kind: str, instance_id: str, svid: X509Svid) -> None:
        self._on(kind, instance_id, svid.spiffe_id, svid.serial, svid.not_after)

    def _on(
        self, kind: str, instance_id: str, sid: SpiffeId, serial: int, not_after: datetime
    ) -> None:
        _logger.debug("%s %s %s serial %x", kind, instance_id, sid, serial)
        if self._on_event is not None:
            self._on_event(kind, instance_id, sid, serial, not_after)


def _half_life(svid: X509Svid) -> float:
    """Seconds until half of the SVID's remaining lifetime has passed.

    Measured from now rather than from not_before, which is backdated a little.
    """
    remaining = (svid.not_after - datetime.now(timezone.utc)).total_seconds()
    return max(0.0, remaining / 2)


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        _logger.error("credential rotation task %s failed", task.get_name(), exc_info=exc)
