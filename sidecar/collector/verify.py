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
from google.protobuf.message import DecodeError

from sidecar.api.v1 import collector_pb2, event_pb2
from sidecar.collector.store import HostState, NewEvent
from sidecar.export.chain import batch_payload, chain_over, verify
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
    return Verified(batch, host, events, chains, verify(key, payload, batch.signature))


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
