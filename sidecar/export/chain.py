"""The hash chain and batch signature that make a host's event stream tamper-evident.

Why a chain over the sequence and not per-batch signatures alone: a signature proves a
batch came from the host unaltered, but not that nothing was left out between batches
or that the batches were not reordered.  Each event's chain hash covers the previous
one, so the collector can check that a batch continues exactly what it stored before.

Both sides hash the exact encoded bytes of each event (the batch carries them as
bytes), so nothing depends on protobuf re-encoding being identical.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

CHAIN_SEED = bytes(32)
_CHAIN_TAG = b"sidecar-chain-v1"
_BATCH_TAG = b"sidecar-batch-v1"
_U64 = struct.Struct(">Q")


def chain_next(prev: bytes, sequence: int, event: bytes) -> bytes:
    """chain(n) = SHA-256(tag || chain(n-1) || u64be(n) || event bytes).

    hashlib, not cryptography's Hash: both hosts and collectors run this for
    every event, and hashlib's costs less than half as much per call.
    """
    h = hashlib.sha256(_CHAIN_TAG)
    h.update(prev)
    h.update(_U64.pack(sequence))
    h.update(event)
    return h.digest()


def chain_over(prev: bytes, first_sequence: int, events: Iterable[bytes]) -> list[bytes]:
    """Chain hashes after each of ``events``, numbered from ``first_sequence``."""
    out: list[bytes] = []
    h = prev
    for i, ev in enumerate(events):
        h = chain_next(h, first_sequence + i, ev)
        out.append(h)
    return out


def batch_payload(host: str, first: int, last: int, prev_chain: bytes, last_chain: bytes) -> bytes:
    """The bytes a batch signature covers (see Batch in collector.proto)."""
    name = host.encode()
    return b"".join(
        (
            _BATCH_TAG,
            _U64.pack(len(name)),
            name,
            _U64.pack(first),
            _U64.pack(last),
            prev_chain,
            last_chain,
        )
    )


def sign(key: ec.EllipticCurvePrivateKey, payload: bytes) -> bytes:
    """ECDSA-SHA256 signature with the host SVID key."""
    return key.sign(payload, ec.ECDSA(hashes.SHA256()))


def verify(public_key: ec.EllipticCurvePublicKey, payload: bytes, signature: bytes) -> bool:
    """True when ``signature`` is the host key's signature over ``payload``."""
    try:
        public_key.verify(signature, payload, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        return False
    return True
