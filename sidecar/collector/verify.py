"""Check a host's batch: well-formed, signed by the host key, continuing its hash chain.

The collector is the evidence locker, and nothing that arrives is silently
discarded.  A batch whose signature fails was not made by the host's key: it
is quarantined whole (its own table) with an integrity alert, and never enters
the event table nor moves the host's chain, so it cannot take the place of the
genuine batch of the same sequences, which is stored when it comes.  A batch
the host signed that does not continue its chain (or follows a gap) is stored
with that verdict next to every event, with an alert: it is the host's word,
and an operator sees both what arrived and that the record has a break.

A batch that arrives after later sequences of its host were stored (replicas
raced its batches) is chain-checked when it ends at the stored head, and when
it runs past it (its chain at the head must be the stored one).  Ending before
the head, nothing stored tells what its chain should be there: the events the
store lacks are stored as ``VERIFICATION_LATE``, never as verified.

A malformed batch (wrong counts, undecodable events, events of another host) is not
evidence of anything; it is refused as a protocol error.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    PublicFormat,
    load_der_public_key,
)
from google.protobuf.message import DecodeError

from sidecar.api.v1 import collector_pb2, event_pb2
from sidecar.collector.store import HostState, NewEvent, Store, StoredBatch, day_name
from sidecar.export.chain import CHAIN_SEED, batch_payload, chain_over, verify
from sidecar.util.errors import SidecarError

V = collector_pb2.Verification
Alert = event_pb2.IntegrityAlert

#: Body kinds only the collector may produce.
COLLECTOR_KINDS = frozenset({"integrity"})


class BatchError(SidecarError):
    """A batch is malformed; the Publish stream is ended with INVALID_ARGUMENT."""


@dataclass
class Checked:
    """A verified batch: what to store and the host's chain state afterwards."""

    events: list[NewEvent] = field(default_factory=list)
    alerts: list[event_pb2.Event] = field(default_factory=list)
    state: HostState = field(default_factory=HostState)
    # Why the whole batch is kept aside instead of stored (bad signature), or "".
    quarantine: str = ""


@dataclass
class Verified:
    """What a batch says and whether its host signed it: all that needs no stored state.

    Made before the batch's transaction (and while the one before it is
    stored); :func:`decide_batch` then holds it against the host's chain.
    """

    batch: collector_pb2.Batch
    host: str
    events: list[event_pb2.Event]
    chains: list[bytes]
    signed: bool
    #: The key that signed it (SubjectPublicKeyInfo, DER), kept with the batch.
    signer: bytes = b""


def verify_batch(
    batch: collector_pb2.Batch, host: str, key: ec.EllipticCurvePublicKey, max_events: int
) -> Verified:
    """Decode and check ``batch`` from ``host`` (its mTLS identity); BatchError if malformed."""
    if batch.host != host:
        raise BatchError(f"batch names host '{batch.host}' but the client is host '{host}'")
    n = len(batch.events)
    if n == 0 or n > max_events:
        raise BatchError(f"a batch must hold 1 to {max_events} events, not {n}")
    if batch.first_sequence < 1 or batch.last_sequence - batch.first_sequence + 1 != n:
        raise BatchError(
            f"batch sequences {batch.first_sequence}..{batch.last_sequence} do not match"
            f" its {n} events"
        )
    if len(batch.prev_chain) != 32:
        raise BatchError("prev_chain must be a 32-byte hash")
    events = [_decode(raw, batch.first_sequence + i, host) for i, raw in enumerate(batch.events)]
    chains = chain_over(batch.prev_chain, batch.first_sequence, batch.events)
    payload = batch_payload(
        host, batch.first_sequence, batch.last_sequence, batch.prev_chain, chains[-1]
    )
    signer = key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return Verified(batch, host, events, chains, verify(key, payload, batch.signature), signer)


def check_batch(
    batch: collector_pb2.Batch,
    host: str,
    key: ec.EllipticCurvePublicKey,
    state: HostState,
    max_events: int,
) -> Checked:
    """Verify ``batch`` from ``host`` (its mTLS identity) against the stored ``state``."""
    return decide_batch(verify_batch(batch, host, key, max_events), state)


def decide_batch(verified: Verified, state: HostState) -> Checked:
    """A verified batch held against the host's stored chain: what to store, and alerts."""
    batch, host, events, chains = verified.batch, verified.host, verified.events, verified.chains
    out = Checked()
    first, last = batch.first_sequence, batch.last_sequence
    new_from = max(first, state.last_sequence + 1)
    if not verified.signed:
        # Not the host's: it must not take the place of the genuine batch, so
        # it is kept aside whole, with the alert, and the chain stays put.
        out.alerts.append(
            _alert(
                host,
                Alert.KIND_BAD_SIGNATURE,
                first,
                last,
                "batch signature does not match: quarantined, not stored",
            )
        )
        out.state = state
        out.quarantine = "bad_signature"
        return out
    if new_from > last:
        # Nothing past the head.  Ending at the head, it must produce the stored
        # head.  Ending before it, it arrived after later sequences were stored
        # (replicas raced the host's batches): its events the store lacks cannot
        # be checked against the head, and are stored saying so.
        if last < state.last_sequence:
            verdict = V.VERIFICATION_LATE
        elif chains[-1] == state.last_chain:
            verdict = V.VERIFICATION_VERIFIED  # a resend of what is stored
        else:
            verdict = V.VERIFICATION_CHAIN_BREAK
            out.alerts.append(
                _alert(
                    host,
                    Alert.KIND_CHAIN_BREAK,
                    first,
                    last,
                    f"sequences {first}..{last} do not chain to the head stored at {last}",
                )
            )
    elif first > state.last_sequence + 1:
        verdict = V.VERIFICATION_AFTER_GAP
        out.alerts.append(
            _alert(
                host,
                Alert.KIND_GAP,
                state.last_sequence + 1,
                first - 1,
                f"sequences {state.last_sequence + 1}..{first - 1} never arrived",
            )
        )
    else:
        before = batch.prev_chain if new_from == first else chains[new_from - first - 1]
        if before == state.last_chain:
            verdict = V.VERIFICATION_VERIFIED
        else:
            verdict = V.VERIFICATION_CHAIN_BREAK
            out.alerts.append(
                _alert(
                    host,
                    Alert.KIND_CHAIN_BREAK,
                    new_from,
                    last,
                    f"sequence {new_from} does not continue the chain stored up to"
                    f" {state.last_sequence}",
                )
            )
    out.events = [NewEvent(ev, raw, verdict) for ev, raw in zip(events, batch.events, strict=True)]
    if last > state.last_sequence:
        out.state = HostState(last, chains[-1])
    else:
        out.state = state
    return out


def resent_differs(host: str, sequences: list[int]) -> event_pb2.Event:
    """The alert for a batch whose events at stored sequences differ from the stored ones.

    The host signed two different events for one sequence: its record has two
    histories there.  The stored events stay (the first word is kept); the batch
    that differs is kept aside as evidence.
    """
    first, last = min(sequences), max(sequences)
    return _alert(
        host,
        Alert.KIND_CHAIN_BREAK,
        first,
        last,
        f"{len(sequences)} event(s) in {first}..{last} were sent again with other bytes than"
        " stored: the stored ones are kept, the batch is quarantined",
    )


def _decode(raw: bytes, sequence: int, host: str) -> event_pb2.Event:
    try:
        ev = event_pb2.Event.FromString(raw)
    except DecodeError as exc:
        raise BatchError(f"event {sequence} cannot be decoded: {exc}") from exc
    if ev.sequence != sequence:
        raise BatchError(f"event at position of sequence {sequence} says {ev.sequence}")
    if ev.host != host:
        raise BatchError(f"event {sequence} names host '{ev.host}', not '{host}'")
    kind = ev.WhichOneof("body")
    if kind is None:
        raise BatchError(f"event {sequence} has no body (or one this collector does not know)")
    if kind in COLLECTOR_KINDS:
        raise BatchError(f"event {sequence}: a host may not send '{kind}' events")
    return ev


def _alert(
    host: str, kind: Alert.Kind.ValueType, first: int, last: int, detail: str
) -> event_pb2.Event:
    return event_pb2.Event(
        host=host,
        time_ns=time.time_ns(),
        integrity=Alert(kind=kind, first_sequence=first, last_sequence=last, detail=detail),
    )


# ---- re-verifying what is stored -------------------------------------------------------


@dataclass
class ChainReport:
    """What re-verifying a host's stored chain found (see :func:`verify_stored_chain`)."""

    host: str
    batches: int = 0  # kept batches whose events re-chained to their signature
    events: int = 0  # stored events those batches cover
    first_sequence: int = 0  # first and last sequence so covered (0: none)
    last_sequence: int = 0
    unsigned: int = 0  # stored events no kept batch covers (stored before batches were kept)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        span = f"{self.first_sequence}..{self.last_sequence}" if self.batches else "none"
        head = (
            f"host {self.host}: {self.batches} batches, {self.events} events"
            f" (sequences {span}) re-verified"
        )
        if self.unsigned:
            head += f"; {self.unsigned} events without a kept batch"
        return "\n".join([head, *(f"  problem: {p}" for p in self.problems)])


def verify_stored_chain(store: Store, host: str) -> ChainReport:
    """Check ``host``'s stored events against the batches kept with them, again.

    For each kept batch: its events are all stored, re-chained from the hash
    before the first one it stored they give the chain hash its signature
    covers, and the signature is the host key's.  Between batches: each one
    starts from the hash the previous one ended with (a break or a gap is a
    problem).  The earliest kept batch may start anywhere: retention dropped
    what came before it.  At the end, the last batch must end at the host's
    stored head.  Memory holds the kept batches and a window of events, not
    the host's whole history.
    """
    report = ChainReport(host)
    batches = sorted(store.stored_batches(host), key=lambda b: (b.from_sequence, b.last_sequence))
    events = store.chain_events(host)
    window: dict[int, list[bytes]] = {}
    pending = next(events, None)
    ends: dict[int, bytes] = {}  # chain hash at the last sequence of each verified batch
    last_end = 0
    used: set[int] = set()
    total = 0
    for b in batches:
        while pending is not None and pending[0] <= b.last_sequence:
            window.setdefault(pending[0], []).append(pending[2])
            total += 1
            pending = next(events, None)
        for seq in [s for s in window if s < b.from_sequence]:
            del window[seq]
        span = range(b.from_sequence, b.last_sequence + 1)
        # Checked or not, the sequences up to here are accounted for: a batch after
        # one that failed is not also blamed for a gap.
        reached, last_end = last_end, max(last_end, b.last_sequence)
        where = f"batch {b.first_sequence}..{b.last_sequence} (stored {day_name(b.day)})"
        missing = [s for s in span if s not in window]
        if missing:
            report.problems.append(
                f"{where}: sequences {missing[0]}..{missing[-1]} are not stored"
                f" ({len(missing)} missing)"
            )
            continue
        if any(len(window[s]) > 1 for s in span):
            report.problems.append(f"{where}: a sequence is stored more than once (two boots)")
            continue
        chains = chain_over(b.from_chain, b.from_sequence, [window[s][0] for s in span])
        if not _signed(b, chains[-1]):
            report.problems.append(f"{where}: the stored events do not match the batch signature")
            continue
        before = b.from_sequence - 1
        if before in ends:
            if ends[before] != b.from_chain:
                report.problems.append(f"{where}: does not continue the chain at {before}")
        elif before == 0:
            if b.from_chain != CHAIN_SEED:
                report.problems.append(f"{where}: sequence 1 does not start from the seed")
        elif reached and before > reached:
            report.problems.append(f"{where}: sequences {reached + 1}..{before} are not stored")
        ends.setdefault(b.last_sequence, chains[-1])
        used.update(span)
        report.batches += 1
        report.events += len(span)
        if not report.first_sequence:
            report.first_sequence = b.from_sequence
        report.last_sequence = max(report.last_sequence, b.last_sequence)
    total += sum(1 for _ in events) + (pending is not None)  # after the last kept batch
    report.unsigned = total - len(used)
    head = store.host_state(host)
    at_head = ends.get(head.last_sequence)
    if report.batches and at_head is not None and at_head != head.last_chain:
        report.problems.append(f"the chain at {head.last_sequence} is not the host's stored head")
    elif report.batches and head.last_sequence > last_end:
        report.problems.append(
            f"the host's stored head is at {head.last_sequence}, the kept batches end at {last_end}"
        )
    return report


def _signed(b: StoredBatch, last_chain: bytes) -> bool:
    try:
        key = load_der_public_key(b.signer)
    except ValueError:
        return False
    if not isinstance(key, ec.EllipticCurvePublicKey):
        return False
    payload = batch_payload(b.host, b.first_sequence, b.last_sequence, b.prev_chain, last_chain)
    return verify(key, payload, b.signature)
