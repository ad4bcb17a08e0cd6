"""Credentials are issued per instance, renewed at half-life, and revoked for good at exit."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from sidecar.identity.jwt import JwtAuthority
from sidecar.identity.manager import CREDENTIAL_ISSUED, CREDENTIAL_REVOKED, CredentialManager
from sidecar.identity.spiffeid import SpiffeId, parse_spiffe_id
from sidecar.identity.x509 import CertificateAuthority, X509Svid, verify_svid
from sidecar.util.errors import CredentialError

TD = "example.org"
AGENT = parse_spiffe_id("spiffe://example.org/agent/planner")

Event = tuple[str, str, SpiffeId, int, datetime]


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.generate_root(TD)


def _manager(ca: CertificateAuthority, ttl: float, events: list[Event]) -> CredentialManager:
    def record(kind: str, iid: str, sid: SpiffeId, serial: int, not_after: datetime) -> None:
        events.append((kind, iid, sid, serial, not_after))

    return CredentialManager(ca, JwtAuthority(TD), ttl=timedelta(seconds=ttl), on_event=record)


def test_issue_returns_a_verifiable_svid_and_emits_an_issued_event(
    ca: CertificateAuthority,
) -> None:
    events: list[Event] = []

    async def scenario() -> X509Svid:
        manager = _manager(ca, 60, events)
        svid = manager.issue("i-1", AGENT)
        assert manager.current("i-1") is svid
        await manager.close()
        return svid

    svid = asyncio.run(scenario())
    assert verify_svid(svid.certificate, svid.chain, ca.bundle()) == AGENT
    assert events == [(CREDENTIAL_ISSUED, "i-1", AGENT, svid.serial, svid.not_after)]


def test_issue_twice_for_a_live_instance_returns_the_same_svid(ca: CertificateAuthority) -> None:
    async def scenario() -> None:
        manager = _manager(ca, 60, [])
        assert manager.issue("i-1", AGENT) is manager.issue("i-1", AGENT)
        with pytest.raises(CredentialError, match="already holds"):
            manager.issue("i-1", "spiffe://example.org/other")
        await manager.close()

    asyncio.run(scenario())


def test_each_instance_gets_its_own_serial(ca: CertificateAuthority) -> None:
    async def scenario() -> None:
        manager = _manager(ca, 60, [])
        assert manager.issue("i-1", AGENT).serial != manager.issue("i-2", AGENT).serial
        await manager.close()

    asyncio.run(scenario())


def test_issue_outside_an_event_loop_is_a_credential_error(ca: CertificateAuthority) -> None:
    with pytest.raises(CredentialError, match="event loop"):
        _manager(ca, 60, []).issue("i-1", AGENT)


def test_watchers_receive_a_renewed_svid_while_the_old_one_is_still_valid(
    ca: CertificateAuthority,
) -> None:
    events: list[Event] = []

    async def scenario() -> tuple[X509Svid, X509Svid, datetime]:
        manager = _manager(ca, 3, events)
        manager.issue("i-1", AGENT)
        stream = manager.watch("i-1")
        first = await anext(stream)
        second = await anext(stream)
        received = datetime.now(UTC)
        await stream.aclose()
        await manager.close()
        assert first is not None and second is not None
        return first, second, received

    first, second, received = asyncio.run(scenario())
    assert second.serial != first.serial
    assert received < first.not_after
    assert [e[3] for e in events if e[0] == CREDENTIAL_ISSUED] == [first.serial, second.serial]


def test_revoke_ends_watch_revokes_serial_and_emits_revoked_event(
    ca: CertificateAuthority,
) -> None:
    events: list[Event] = []

    async def scenario() -> tuple[X509Svid, list[X509Svid | None], CredentialManager]:
        manager = _manager(ca, 60, events)
        svid = manager.issue("i-1", AGENT)
        seen: list[X509Svid | None] = []

        async def follow() -> None:
            async for item in manager.watch("i-1"):
                seen.append(item)

        follower = asyncio.create_task(follow())
        while not seen:
            await asyncio.sleep(0.01)
        manager.revoke("i-1")
        await follower
        await manager.close()
        return svid, seen, manager

    svid, seen, manager = asyncio.run(scenario())
    assert seen == [svid, None]
    assert manager.current("i-1") is None
    assert manager.is_revoked(svid.serial)
    assert svid.serial in manager.revoked_serials()
    assert events[-1] == (CREDENTIAL_REVOKED, "i-1", AGENT, svid.serial, svid.not_after)


def test_revoked_instance_is_never_renewed_nor_reissued(ca: CertificateAuthority) -> None:
    events: list[Event] = []

    async def scenario() -> CredentialManager:
        waited: list[float] = []
        due = asyncio.Event()

        async def until_due(seconds: float) -> None:  # the test says when renewal is due
            waited.append(seconds)
            await due.wait()

        def record(kind: str, iid: str, sid: SpiffeId, serial: int, not_after: datetime) -> None:
            events.append((kind, iid, sid, serial, not_after))

        manager = CredentialManager(
            ca, JwtAuthority(TD), ttl=timedelta(seconds=1), on_event=record, sleep=until_due
        )
        manager.issue("i-1", AGENT)
        await asyncio.sleep(0)  # the renewal task waits for half-life
        assert waited and 0 < waited[0] <= 0.5
        manager.revoke("i-1")
        due.set()  # the renewal falls due after the revocation
        for _ in range(5):
            await asyncio.sleep(0)
        with pytest.raises(CredentialError, match="never reissued"):
            manager.issue("i-1", AGENT)
        await manager.close()
        return manager

    asyncio.run(scenario())
    assert [e[0] for e in events] == [CREDENTIAL_ISSUED, CREDENTIAL_REVOKED]


def test_watching_a_revoked_instance_yields_only_none(ca: CertificateAuthority) -> None:
    async def scenario() -> list[X509Svid | None]:
        manager = _manager(ca, 60, [])
        manager.issue("i-1", AGENT)
        manager.revoke("i-1")
        return [item async for item in manager.watch("i-1")]

    assert asyncio.run(scenario()) == [None]


class _RepeatingCA(CertificateAuthority):
    """A CA whose next certificates repeat a given SVID: a serial clash made on purpose."""

    def __init__(self, base: CertificateAuthority) -> None:
        super().__init__(base.trust_domain, base.certificate, base.private_key, base.chain)
        self.repeat: list[X509Svid] = []

    def issue_x509_svid(self, spiffe_id: SpiffeId | str, ttl: timedelta) -> X509Svid:
        if self.repeat:
            return self.repeat.pop()
        return super().issue_x509_svid(spiffe_id, ttl)


def test_a_revoked_serial_is_never_handed_out_again(ca: CertificateAuthority) -> None:
    repeating = _RepeatingCA(ca)

    async def scenario() -> tuple[X509Svid, X509Svid]:
        manager = CredentialManager(repeating, JwtAuthority(TD), ttl=timedelta(minutes=1))
        old = manager.issue("i-1", AGENT)
        manager.revoke("i-1")
        repeating.repeat = [old]
        new = manager.issue("i-2", AGENT)
        await manager.close()
        return old, new

    old, new = asyncio.run(scenario())
    assert repeating.repeat == []  # the clashing SVID was drawn ...
    assert new.serial != old.serial  # ... and refused


def test_jwt_svid_is_issued_for_live_instances_only(ca: CertificateAuthority) -> None:
    async def scenario() -> None:
        manager = _manager(ca, 60, [])
        manager.issue("i-1", AGENT)
        token = manager.jwt_svid("i-1", ["reports"])
        assert manager.jwt_authority.validate(token, "reports")["sub"] == AGENT.uri
        manager.revoke("i-1")
        with pytest.raises(CredentialError, match="no credentials"):
            manager.jwt_svid("i-1", ["reports"])
        await manager.close()

    asyncio.run(scenario())


def test_manager_refuses_a_jwt_authority_of_another_trust_domain(
    ca: CertificateAuthority,
) -> None:
    with pytest.raises(CredentialError, match="JWT authority"):
        CredentialManager(ca, JwtAuthority("other.org"))
