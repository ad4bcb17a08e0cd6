"""The fleet on one machine: events/s stored by 1, 2 and 3 PostgreSQL replicas and by SQLite.

The same simulated load for every store, in the same run: ``--hosts`` hosts
(sidecar.testing.fleet; host SVIDs issued from the CA directly), each sending
``--batches`` signed, hash-chained batches of ``--events`` events, one batch in
flight per host, all hosts at once.  Every batch is signed before the clock
starts, and the same batches go to each store (each PostgreSQL run gets a fresh
database): the figure measures the collectors and the store, not the making and
signing of batches, which a real host spreads over its own CPU.  Collectors are
``sidecar collector`` processes, as deployed; hosts are spread over the replicas
round-robin.  Reported: events/s stored (acked),
submit-to-ack p50/p99 of a batch, and the CPU seconds of the collectors, of
PostgreSQL (the postmaster and all its backends) and of this load generator,
against the wall time x 2 cores of this machine, which says what limits the figure
(``--cpu-detail``: each replica's, and PostgreSQL's by process role).

Then Query by identity over ``--query-events`` stored events: those rows are
loaded with COPY straight into the events table (migrated by the collector; all
its indexes in place during the load), not through the collectors, which would
take hours at 10 million.  Their payloads are one valid event per identity (the
columns are what the query reads).  ``--queries`` Query RPCs to a replica over
mTLS, each for a random identity of ``--identities``, after a random cursor,
one page of ``--page`` rows: p50 and p99.

The throwaway cluster runs with fsync=off (sidecar.testing.postgres) unless
``--durable``, which keeps PostgreSQL's defaults (fsync and synchronous_commit
on, as operators run it); SQLite runs with synchronous=FULL, as the collector
always does.  Plain script: prints
figures, asserts nothing about time.

    python benchmarks/bench_fleet.py [--hosts 200] [--query-events 1000000]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import psycopg

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import collector_pb2_grpc as pbg
from sidecar.collector.postgres_store import PostgresStore
from sidecar.collector.store import day_of
from sidecar.identity.x509 import CertificateAuthority
from sidecar.testing.fleet import CollectorProcess, Fleet, fleet_event, postgres_uri
from sidecar.testing.hosts import channel
from sidecar.testing.postgres import Cluster, cluster, create_database

TD = "fleet.test"
ALICE = "spiffe://fleet.test/ops/alice"
CORES = psutil.cpu_count() or 2


def _cpu(p: psutil.Process, children: bool = False) -> float:
    t = p.cpu_times()
    total = t.user + t.system
    if children:  # reaped children (PostgreSQL backends that have exited)
        total += t.children_user + t.children_system
    return float(total)


def postgres_cpu(c: Cluster) -> float:
    """CPU seconds of the postmaster, its live backends, and the backends it reaped."""
    return sum(postgres_cpu_by_role(c).values())


def postgres_cpu_by_role(c: Cluster) -> dict[str, float]:
    """The same, by role: client backends (the collectors' connections) and each of
    PostgreSQL's own processes (WAL writer, checkpointer, autovacuum...)."""
    pid = int((c.root / "data" / "postmaster.pid").read_text().split()[0])
    post = psutil.Process(pid)
    out = {"postmaster and exited": _cpu(post, children=True)}
    for child in post.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # exited meanwhile: reaped above
            title = " ".join(child.cmdline()).strip()
            role = "client backends" if "[local]" in title else title.removeprefix("postgres: ")
            role = role.strip()
            out[role] = out.get(role, 0.0) + _cpu(child)
    return out


def run_store(
    folder: Path,
    ca_dir: Path,
    ca: CertificateAuthority,
    fleet: Fleet,
    label: str,
    replicas: int,
    pg: Cluster | None,
) -> dict[str, Any]:
    """One configuration: start its collectors, stream the fleet's load, stop them."""
    store = "sqlite"
    if pg is not None:
        store = postgres_uri(create_database(pg, f"bench_{label}"))
    procs = [
        CollectorProcess(folder, f"{label}-r{i}", TD, ca_dir, store=store) for i in range(replicas)
    ]
    try:
        for p in procs:
            p.start()
        fleet.rearm()
        me = psutil.Process()
        col0 = [p.cpu_seconds() for p in procs]
        pg0 = postgres_cpu_by_role(pg) if pg else {}
        me0 = _cpu(me)
        result = asyncio.run(fleet.run([p.port for p in procs], timeout_s=1800))
        per_replica = [p.cpu_seconds() - c for p, c in zip(procs, col0, strict=True)]
        col = sum(per_replica)
        pg1 = postgres_cpu_by_role(pg) if pg else {}
        pg_roles = {k: v - pg0.get(k, 0.0) for k, v in pg1.items()}
        pgc = sum(pg_roles.values())
        mine = _cpu(me) - me0
    finally:
        for p in procs:
            p.stop()
    wall = result.elapsed_s
    return {
        "store": label,
        "replicas": replicas,
        "events": result.events,
        "seconds": round(wall, 2),
        "events_per_s": round(result.rate),
        "ack_p50_ms": round(result.percentile(0.50) * 1000, 1),
        "ack_p99_ms": round(result.percentile(0.99) * 1000, 1),
        "cpu_collectors_s": round(col, 1),
        "cpu_postgres_s": round(pgc, 1),
        "cpu_load_generator_s": round(mine, 1),
        "cpu_available_s": round(wall * CORES, 1),
        "cpu_per_replica_s": [round(c, 2) for c in per_replica],
        "cpu_postgres_by_role_s": {k: round(v, 2) for k, v in pg_roles.items() if v >= 0.01},
    }


def load_rows(dsn: str, n: int, identities: int, hosts: int = 1000) -> float:
    """COPY ``n`` rows into events (indexes in place); seconds taken."""
    PostgresStore(dsn, connections=1).close()  # the collector's own migrations
    payloads = []
    for k in range(identities):
        e = fleet_event(k, 0, identities)
        e.identity = f"spiffe://fleet.test/agent/a{k}"
        payloads.append(e.SerializeToString())
    began = time.perf_counter()
    now = time.time_ns()
    today = day_of(now)  # today's partition, made by the collector at start
    with psycopg.connect(dsn) as conn, conn.cursor() as cur:
        cols = (
            "day, host, boot, seq, time_ns, identity, instance, kind, verdict, verification, data"
        )
        with cur.copy(f"COPY events ({cols}) FROM STDIN") as copy:
            for i in range(n):
                k = i % identities
                copy.write_row(
                    (
                        today,
                        f"h{i % hosts}",
                        "boot-1",
                        i // hosts + 1,
                        now + i,
                        f"spiffe://fleet.test/agent/a{k}",
                        f"i{i % 7}",
                        "connect",
                        1,
                        pb.VERIFICATION_VERIFIED,
                        payloads[k],
                    )
                )
        conn.commit()
        conn.execute("ANALYZE events")
    return time.perf_counter() - began


def query_bench(
    folder: Path, ca_dir: Path, ca: CertificateAuthority, dsn: str, args: argparse.Namespace
) -> dict[str, Any]:
    proc = CollectorProcess(
        folder, "query-r0", TD, ca_dir, store=postgres_uri(dsn), subscribers=[ALICE]
    )
    proc.start()
    rng = random.Random(13)
    n = args.query_events

    async def body() -> list[float]:
        alice = ca.issue_x509_svid(ALICE, timedelta(hours=1))
        times: list[float] = []
        async with channel(proc.port, ca, (alice.key_pem(), alice.cert_chain_pem())) as ch:
            stub = pbg.CollectorStub(ch)
            for q in range(args.queries + 10):
                ident = f"spiffe://fleet.test/agent/a{rng.randrange(args.identities)}"
                req = pb.QueryRequest(
                    filter=pb.EventFilter(identities=[ident]),
                    after_cursor=rng.randrange(n),
                    limit=args.page,
                )
                began = time.perf_counter()
                page = await stub.Query(req)
                if q >= 10:  # the first ten warm the connection and the cache
                    times.append(time.perf_counter() - began)
                assert all(se.event.identity == ident for se in page.events)
        return times

    try:
        times = sorted(asyncio.run(body()))
    finally:
        proc.stop()
    return {
        "stored_events": n,
        "identities": args.identities,
        "page": args.page,
        "queries": len(times),
        "query_p50_ms": round(statistics.median(times) * 1000, 2),
        "query_p99_ms": round(times[min(len(times) - 1, int(0.99 * len(times)))] * 1000, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hosts", type=int, default=200)
    ap.add_argument("--batches", type=int, default=10, help="batches per host")
    ap.add_argument("--events", type=int, default=100, help="events per batch")
    ap.add_argument("--query-events", type=int, default=1_000_000)
    ap.add_argument("--identities", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--page", type=int, default=100)
    ap.add_argument(
        "--stores", default="sqlite,pg1,pg2,pg3", help="which of sqlite,pg1,pg2,pg3 to run"
    )
    ap.add_argument(
        "--cpu-detail",
        action="store_true",
        help="also print each replica's CPU and PostgreSQL's by process role",
    )
    ap.add_argument(
        "--durable",
        action="store_true",
        help="PostgreSQL with fsync on (its defaults), as durable as SQLite's synchronous=FULL",
    )
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out: dict[str, Any] = {"args": vars(args) | {"json": None}, "ingest": []}
    with (
        tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp,
        cluster(durable=args.durable) as pg,
    ):
        folder = Path(tmp)
        ca_dir = folder / "ca"
        ca = CertificateAuthority.load_or_generate(ca_dir, TD)
        began = time.perf_counter()
        fleet = Fleet(ca, args.hosts, args.batches, args.events)
        print(
            f"{args.hosts} hosts x {args.batches} batches x {args.events} events ="
            f" {fleet.total_events} events, signed in {time.perf_counter() - began:.1f} s"
            " before any clock starts (the rates measure collectors and store, not hosts);"
            f" {CORES} cores; PostgreSQL with fsync {'on' if args.durable else 'off'},"
            " SQLite with synchronous=FULL",
            flush=True,
        )
        header = (
            f"{'store':<12}{'events/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'wall s':>8}"
            f"{'cpu: collectors':>17}{'postgres':>10}{'load gen':>10}{'of':>7}"
        )
        print(header, flush=True)
        stores = [("sqlite", 1, False), ("pg1", 1, True), ("pg2", 2, True), ("pg3", 3, True)]
        wanted = args.stores.split(",")
        for label, n, use_pg in [s for s in stores if s[0] in wanted]:
            row = run_store(folder, ca_dir, ca, fleet, label, n, pg if use_pg else None)
            out["ingest"].append(row)
            print(
                f"{label:<12}{row['events_per_s']:>10}{row['ack_p50_ms']:>9}"
                f"{row['ack_p99_ms']:>9}{row['seconds']:>8}{row['cpu_collectors_s']:>17}"
                f"{row['cpu_postgres_s']:>10}{row['cpu_load_generator_s']:>10}"
                f"{row['cpu_available_s']:>7}",
                flush=True,
            )
            if args.cpu_detail:
                roles = ", ".join(f"{k} {v}" for k, v in row["cpu_postgres_by_role_s"].items())
                print(
                    f"{'':<12}cpu s: replicas {row['cpu_per_replica_s']}"
                    + (f"; postgres: {roles}" if roles else ""),
                    flush=True,
                )
        if args.query_events:  # 0: ingest only
            dsn = create_database(pg, "bench_query")
            load_s = load_rows(dsn, args.query_events, args.identities)
            print(
                f"loaded {args.query_events} events with COPY in {load_s:.0f} s"
                f" ({args.query_events / load_s:,.0f} rows/s, indexes in place)",
                flush=True,
            )
            q = query_bench(folder, ca_dir, ca, dsn, args)
            q["load_s"] = round(load_s, 1)
            out["query"] = q
            print(
                f"Query by identity over {q['stored_events']} events ({q['identities']} identities,"
                f" pages of {q['page']}, {q['queries']} queries): p50 {q['query_p50_ms']} ms,"
                f" p99 {q['query_p99_ms']} ms",
                flush=True,
            )
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
