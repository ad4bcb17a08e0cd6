"""decide_batch: a batch's verdict is what could be checked against the stored chain."""

from __future__ import annotations

import pytest

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import event_pb2 as ev
from sidecar.collector.store import HostState
from sidecar.collector.verify import Checked, check_batch
from sidecar.export.chain import CHAIN_SEED
from sidecar.identity.x509 import CertificateAuthority
from sidecar.testing.hosts import SimulatedHost, host_identity

K = ev.IntegrityAlert


@pytest.fixture(scope="module")
def sim_ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_generate(tmp_path_factory.mktemp("ca"), "example.org")


def _events(n: int) -> list[ev.Event]:
    return [ev.Event(time_ns=i + 1, lost=ev.LostEvents()) for i in range(n)]


def _check(sim: SimulatedHost, batch: pb.Batch, state: HostState) -> Checked:
    key = sim.ident.private_key.public_key()
    return check_batch(batch, sim.name, key, state, 100)


def _verdicts(checked: Checked) -> set[int]:
    return {e.verification for e in checked.events}


def test_a_batch_that_arrives_after_later_ones_were_stored_is_not_called_verified(
    sim_ca: CertificateAuthority,
) -> None:
    """Replicas raced: 4..6 was stored (after a gap) before 1..3 arrived."""
    sim = SimulatedHost(host_identity(sim_ca, "h"))
    early, later = sim.batch(_events(3)), sim.batch(_events(3))
    head = _check(sim, later, HostState()).state
    assert head == HostState(6, sim.head)
    late = _check(sim, early, head)
    # Its events are new to the store, and nothing checked them against 4..6.
    assert _verdicts(late) == {pb.VERIFICATION_LATE}
    assert late.state == head  # the head does not move back
    # Nor is a batch the host signed over another history, arriving late.
    other = SimulatedHost(sim.ident)
    forked = other.batch([ev.Event(time_ns=99, lost=ev.LostEvents())] * 3)
    assert _verdicts(_check(sim, forked, head)) == {pb.VERIFICATION_LATE}


def test_a_resend_that_ends_at_the_head_is_checked_against_it(
    sim_ca: CertificateAuthority,
) -> None:
    sim = SimulatedHost(host_identity(sim_ca, "h"))
    first, second = sim.batch(_events(3)), sim.batch(_events(3))
    head = _check(sim, second, _check(sim, first, HostState()).state).state
    # The same batch again: it produces the stored head, so it is verified (and its
    # events are duplicates the store skips).
    again = _check(sim, second, head)
    assert (_verdicts(again), again.alerts, again.state) == ({pb.VERIFICATION_VERIFIED}, [], head)
    # A batch the host signed for the same sequences over other events: a break.
    fork = SimulatedHost(
        sim.ident, next_sequence=4, head=_check(sim, first, HostState()).state.last_chain
    )
    other = fork.batch([ev.Event(time_ns=77, lost=ev.LostEvents())] * 3)
    broken = _check(sim, other, head)
    assert _verdicts(broken) == {pb.VERIFICATION_CHAIN_BREAK}
    assert [(a.integrity.kind, a.integrity.first_sequence) for a in broken.alerts] == [
        (K.KIND_CHAIN_BREAK, 4)
    ]
    assert broken.state == head


def test_a_batch_partly_before_the_head_is_checked_through_the_head(
    sim_ca: CertificateAuthority,
) -> None:
    """1..4 arrives when 1..2 is stored: its chain at 2 must be the stored chain at 2."""
    sim = SimulatedHost(host_identity(sim_ca, "h"))
    stored = sim.batch(_events(2))
    head = _check(sim, stored, HostState()).state
    overlapping = SimulatedHost(sim.ident).batch(_events(4))
    assert _verdicts(_check(sim, overlapping, head)) == {pb.VERIFICATION_VERIFIED}
    elsewhere = SimulatedHost(sim.ident, head=bytes([1]) * 32).batch(_events(4))
    checked = _check(sim, elsewhere, head)
    assert _verdicts(checked) == {pb.VERIFICATION_CHAIN_BREAK}
    assert [a.integrity.kind for a in checked.alerts] == [K.KIND_CHAIN_BREAK]
    assert head.last_chain != CHAIN_SEED
