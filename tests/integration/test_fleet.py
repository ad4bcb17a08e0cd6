"""A fleet of 200 simulated hosts on three `sidecar collector` processes sharing PostgreSQL.

Everything is real: three collector processes (the CLI, as deployed) on one
throwaway PostgreSQL database, mTLS on loopback, 200 hosts each with its own
host SVID, boot, sequence and signed hash chain (sidecar.testing.fleet).  The
host SVIDs are issued from the collector's CA directly, not through join
tokens: enrolment is proven elsewhere (test_collector_postgres.py), and 200
enrolments would only slow this test down.  A replica is SIGKILLed mid-run and
started again; the hosts it served resend to another replica from its ack.
"""

from __future__ import annotations

import asyncio
from datetime import timedelta
from pathlib import Path

import psycopg
import pytest

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import collector_pb2_grpc as pbg
from sidecar.export.chain import CHAIN_SEED, chain_over
from sidecar.identity.x509 import CertificateAuthority
from sidecar.testing.fleet import CollectorProcess, Fleet, postgres_uri
from sidecar.testing.hosts import channel

pytestmark = pytest.mark.timeout(90)

TD = "fleet.test"
ALICE = "spiffe://fleet.test/ops/alice"
HOSTS, BATCHES, EVENTS = 200, 8, 25  # 40,000 events


def test_200_hosts_on_three_replicas_one_killed_and_restarted_store_every_event_once(
    tmp_path: Path, pg_dsn: str
) -> None:
    ca_dir = tmp_path / "ca"
    ca = CertificateAuthority.load_or_generate(ca_dir, TD)
    store = postgres_uri(pg_dsn)
    replicas = [
        CollectorProcess(
            tmp_path,
            f"r{i}",
            TD,
            ca_dir,
            store=store,
            subscribers=[ALICE],
            extra="subscriberBuffer: 200000\nstoreConnections: 3\n",
        )
        for i in range(3)
    ]
    fleet = Fleet(ca, HOSTS, BATCHES, EVENTS)
    total = fleet.total_events
    survivor, victim = replicas[0], replicas[1]
    try:
        for r in replicas:
            r.start()

        async def body() -> tuple[int, list[pb.StoredEvent]]:
            alice = ca.issue_x509_svid(ALICE, timedelta(hours=1))
            async with channel(survivor.port, ca, (alice.key_pem(), alice.cert_chain_pem())) as ch:
                live = pbg.CollectorStub(ch).Subscribe(pb.SubscribeRequest(after_cursor=0))
                seen: list[pb.StoredEvent] = []

                async def subscribe() -> None:
                    while len(seen) < total:
                        seen.append(await live.read())

                reader = asyncio.ensure_future(subscribe())
                await asyncio.sleep(0.3)  # subscribed before the first batch
                run = asyncio.ensure_future(fleet.run([r.port for r in replicas], 60))
                while fleet.acked < total // 3:  # a third in: kill a replica mid-stream
                    assert not run.done(), run
                    await asyncio.sleep(0.01)
                await asyncio.to_thread(victim.kill)
                killed_at = fleet.acked
                await asyncio.sleep(0.5)
                await asyncio.to_thread(victim.start)  # restarted on the same port and store
                result = await run
                await asyncio.wait_for(reader, 30)
                live.cancel()
                assert result.failovers > 0 and result.resent_batches > 0, result.failovers
                assert killed_at < total  # the kill came mid-run
                assert result.events == total
                assert set(result.per_host_acked.values()) == {BATCHES * EVENTS}
                return result.failovers, seen

        failovers, seen = asyncio.run(body())
        # Every event stored exactly once, verified, and every host's chain re-chains
        # from the stored bytes to the head the host signed.
        with psycopg.connect(pg_dsn) as conn:
            rows = conn.execute(
                "SELECT host, seq, verification, data FROM events ORDER BY host, seq"
            ).fetchall()
            quarantined = conn.execute("SELECT count(*) FROM quarantine").fetchone()
        assert len(rows) == total
        assert quarantined == (0,)
        assert {r[2] for r in rows} == {pb.VERIFICATION_VERIFIED}  # no integrity alert rows
        by_host: dict[str, list[tuple[int, bytes]]] = {}
        for host, seq, _, data in rows:
            by_host.setdefault(host, []).append((int(seq), bytes(data)))
        assert set(by_host) == {s.name for s in fleet.sims}
        for sim in fleet.sims:
            got = by_host[sim.name]
            assert [s for s, _ in got] == list(range(1, BATCHES * EVENTS + 1)), sim.name
            assert chain_over(CHAIN_SEED, 1, [d for _, d in got])[-1] == sim.head, sim.name
        # The subscriber of the surviving replica saw every event once, in cursor order.
        cursors = [se.cursor for se in seen]
        assert cursors == sorted(set(cursors))
        keys = [(se.event.host, se.event.sequence) for se in seen]
        assert len(keys) == len(set(keys)) == total
        assert set(keys) == {(h, s) for h, got in by_host.items() for s, _ in got}
        assert failovers > 0
    finally:
        codes = [r.stop() for r in replicas]
    assert codes == [0, 0, 0], [r.log.read_text()[-1500:] for r in replicas]
