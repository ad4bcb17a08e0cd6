"""Simulated hosts for collector tests and benchmarks: credentials, signed batches, streams.

A simulated host holds a real host SVID issued by the collector's CA and signs
real hash-chained batches, byte for byte what a daemon's exporter sends, so a
collector cannot tell it from a host; it only skips the daemon and the spool.
It lets a test choose which replica gets which batch, in which order, and
forge, replay or thin batches on purpose.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta

import grpc

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import collector_pb2_grpc as pbg
from sidecar.api.v1 import event_pb2 as ev
from sidecar.collector.tls import roots_pem
from sidecar.export.chain import CHAIN_SEED, batch_payload, chain_over, sign
from sidecar.export.exporter import HostIdentity
from sidecar.identity.x509 import CertificateAuthority


def host_identity(ca: CertificateAuthority, host: str, ttl_s: int = 3600) -> HostIdentity:
    """A host SVID (``spiffe://<td>/host/<host>``) signed by the collector's root."""
    svid = ca.issue_x509_svid(f"spiffe://{ca.trust_domain}/host/{host}", timedelta(seconds=ttl_s))
    return HostIdentity(host, svid.cert_chain_pem(), svid.private_key, roots_pem(ca))


def channel(
    port: int, ca: CertificateAuthority, client: tuple[bytes, bytes] | None
) -> grpc.aio.Channel:
    """An mTLS channel to ``127.0.0.1:port``; ``client`` is (key PEM, chain PEM) or None."""
    key, chain = client if client else (None, None)
    creds = grpc.ssl_channel_credentials(roots_pem(ca), key, chain)
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", creds)


def signed_batch(
    ident: HostIdentity, first: int, prev: bytes, events: Sequence[ev.Event]
) -> tuple[pb.Batch, bytes]:
    """Number ``events`` from ``first`` on, chain them after ``prev`` and sign: (batch, head)."""
    raws = []
    for i, e in enumerate(events):
        e.host, e.sequence = ident.host, first + i
        raws.append(e.SerializeToString())
    chains = chain_over(prev, first, raws)
    last = first + len(raws) - 1
    sig = sign(ident.private_key, batch_payload(ident.host, first, last, prev, chains[-1]))
    batch = pb.Batch(
        host=ident.host,
        first_sequence=first,
        last_sequence=last,
        prev_chain=prev,
        events=raws,
        signature=sig,
    )
    return batch, chains[-1]


@dataclass
class SimulatedHost:
    """One host's identity, boot, next sequence and chain head."""

    ident: HostIdentity
    boot_id: str = "boot-1"
    next_sequence: int = 1
    head: bytes = CHAIN_SEED
    sent: list[pb.Batch] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.ident.host

    def batch(self, events: Sequence[ev.Event]) -> pb.Batch:
        """The next batch of the chain, holding ``events`` (stamped with this boot)."""
        for e in events:
            e.boot_id = self.boot_id
        batch, self.head = signed_batch(self.ident, self.next_sequence, self.head, events)
        self.next_sequence += len(events)
        self.sent.append(batch)
        return batch


async def publish(
    port: int, ca: CertificateAuthority, ident: HostIdentity, batches: Sequence[pb.Batch]
) -> list[int]:
    """Send batches on one Publish stream; the acks (the first is the opening ack)."""
    async with channel(port, ca, (ident.key_pem(), ident.cert_chain_pem)) as ch:
        call = pbg.CollectorStub(ch).Publish()  # type: ignore[call-arg]
        acks = [_ack(await call.read())]
        for b in batches:
            await call.write(b)
            acks.append(_ack(await call.read()))
        await call.done_writing()
        return acks


def _ack(msg: object) -> int:
    if not isinstance(msg, pb.Ack):
        raise AssertionError(f"the Publish stream ended instead of acknowledging: {msg!r}")
    return msg.acked_sequence
