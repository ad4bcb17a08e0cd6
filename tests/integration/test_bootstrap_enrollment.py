"""Bootstrap tokens: nodes of a cluster enroll themselves, each node name once.

Real collectors (gRPC, server TLS for enrollment, mTLS after), real X.509, real
SQLite and real PostgreSQL (the throwaway cluster of tests/conftest.py); the
init step is the ``sidecar enroll`` command itself.  Each refusal is attacked
with the variants an attacker would try, next to the use that succeeds.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import grpc
import psycopg
import pytest
from cryptography import x509

from sidecar.api.v1 import collector_pb2 as pb
from sidecar.api.v1 import collector_pb2_grpc as pbg
from sidecar.api.v1 import event_pb2 as ev
from sidecar.collector.cli import register_cli
from sidecar.collector.config import CollectorConfig
from sidecar.collector.server import (
    CollectorServer,
    create_bootstrap_token,
    create_join_token,
    token_hash,
)
from sidecar.collector.tls import roots_pem
from sidecar.export.enroll import HOST_CERT, enroll, enroll_bootstrap, renew
from sidecar.export.exporter import HostIdentity
from sidecar.identity.spiffeid import parse_spiffe_id
from sidecar.identity.x509 import CertificateAuthority, new_csr, new_key
from sidecar.testing.hosts import SimulatedHost, publish
from sidecar.util.errors import CredentialError, TransportError

pytestmark = pytest.mark.timeout(90)

TD = "example.org"
ALICE = "spiffe://example.org/ops/alice"


def _config(tmp_path: Path, name: str, dsn: str | None) -> CollectorConfig:
    data = tmp_path / name
    shared_ca = tmp_path / "shared-ca"
    if not shared_ca.exists():
        CertificateAuthority.load_or_generate(shared_ca, TD)
    if not data.exists():
        data.mkdir(mode=0o700)
        shutil.copytree(shared_ca, data / "ca")
    cfg = CollectorConfig(
        trust_domain=TD,
        data_dir=data,
        listen="127.0.0.1:0",
        enrollment_listen="127.0.0.1:0",
        subscribers=frozenset({parse_spiffe_id(ALICE)}),
        grace_s=0.5,
    )
    if dsn:
        cfg = replace(cfg, store_dsn=dsn, store_connections=3)
    return cfg


@asynccontextmanager
async def collectors(
    tmp_path: Path, dsn: str | None, n: int = 1
) -> AsyncIterator[list[CollectorServer]]:
    """``n`` collectors sharing one CA (and, with ``dsn``, one database)."""
    async with AsyncExitStack() as stack:
        servers = [CollectorServer(_config(tmp_path, f"r{i}", dsn)) for i in range(n)]
        for s in servers:
            stack.push_async_callback(s.stop, 0.2)
        await asyncio.gather(*(s.start() for s in servers))
        yield servers


@pytest.fixture(params=["sqlite", "postgresql"])
def store_dsn(request: pytest.FixtureRequest) -> str | None:
    """Each test runs on both stores: None for SQLite, else a fresh database's DSN."""
    if request.param == "sqlite":
        return None
    return str(request.getfixturevalue("pg_dsn"))


async def _enroll_raw(port: int, bundle: bytes, **fields: str) -> tuple[grpc.StatusCode, str]:
    """One Enroll call with any fields: (status, details); OK with the issued SPIFFE ID."""
    async with grpc.aio.secure_channel(
        f"127.0.0.1:{port}", grpc.ssl_channel_credentials(bundle)
    ) as ch:
        try:
            reply = await pbg.EnrollmentStub(ch).Enroll(
                pb.EnrollRequest(
                    intermediate_csr=new_csr(new_key()), host_csr=new_csr(new_key()), **fields
                ),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, reply.spiffe_id


def _uses(server: CollectorServer, token: str) -> int:
    """The use count the store holds for ``token`` (read straight from the database)."""
    h = token_hash(token)
    if server.config.store_dsn:
        with psycopg.connect(server.config.store_dsn) as conn:
            row = conn.execute(
                "SELECT uses FROM bootstrap_tokens WHERE token_hash = %s", (h,)
            ).fetchone()
    else:
        with sqlite3.connect(server.config.db_path) as conn:
            row = conn.execute(
                "SELECT uses FROM bootstrap_tokens WHERE token_hash = ?", (h,)
            ).fetchone()
    assert row is not None
    return int(row[0])


def _cert_uri(ident: HostIdentity) -> str:
    cert = x509.load_pem_x509_certificate(ident.cert_chain_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return str(san.get_values_for_type(x509.UniformResourceIdentifier)[0])


def _event(i: int) -> ev.Event:
    return ev.Event(
        time_ns=1_000_000 + i,
        identity="spiffe://example.org/agent/a",
        connect=ev.Connect(pid=100 + i, address="192.0.2.1", port=443, rule="default"),
    )


def test_a_bootstrap_token_enrolls_each_node_name_once_up_to_its_count(
    tmp_path: Path, store_dsn: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        async with collectors(tmp_path, store_dsn) as (server,):
            bundle = roots_pem(server.ca)
            target = f"127.0.0.1:{server.enrollment_port}"
            token = create_bootstrap_token(server.store, 2, 3600)
            a = await enroll_bootstrap(target, token, "node-a", bundle, tmp_path / "a")
            # The certificate names the node: that is the host name it streams as.
            assert a.host == "node-a"
            assert _cert_uri(a) == "spiffe://example.org/host/node-a"
            assert _uses(server, token) == 1
            # The same node name again, with the same token: refused, and not counted.
            with pytest.raises(TransportError, match="ALREADY_EXISTS: node name node-a"):
                await enroll_bootstrap(target, token, "node-a", bundle, tmp_path / "a2")
            assert _uses(server, token) == 1
            assert not (tmp_path / "a2" / HOST_CERT).exists()
            b = await enroll_bootstrap(target, token, "node-b", bundle, tmp_path / "b")
            assert _cert_uri(b) == "spiffe://example.org/host/node-b"
            assert _uses(server, token) == 2
            # Past the count: refused, for a name never seen.
            with pytest.raises(TransportError, match="PERMISSION_DENIED: bootstrap token"):
                await enroll_bootstrap(target, token, "node-c", bundle, tmp_path / "c")
            assert _uses(server, token) == 2
            # A second token cannot take a name the first one enrolled either.
            other = create_bootstrap_token(server.store, 5, 3600)
            code, _ = await _enroll_raw(
                server.enrollment_port, bundle, bootstrap_token=other, node_name="node-a"
            )
            assert code == grpc.StatusCode.ALREADY_EXISTS
            code, sid = await _enroll_raw(
                server.enrollment_port, bundle, bootstrap_token=other, node_name="node-c"
            )
            assert (code, sid) == (grpc.StatusCode.OK, "spiffe://example.org/host/node-c")
            # The enrolled node streams events under its node name, and renews.
            host = SimulatedHost(a)
            acks = await publish(server.port, server.ca, a, [host.batch([_event(1), _event(2)])])
            assert acks == [0, 2]
            assert server.store.count("node-a") == 2
            renewed = await renew(f"127.0.0.1:{server.port}", tmp_path / "a")
            assert renewed.host == "node-a"
            assert renewed.cert_chain_pem != a.cert_chain_pem
            for t in (token, other):
                assert t not in caplog.text

    asyncio.run(body())
    # The log says what happened (a positive control for the check above)...
    assert "node node-a enrolled with a bootstrap token" in caplog.text
    assert "refused enrolling node node-a: the name is enrolled already" in caplog.text
    assert "refused enrolling node node-c: bootstrap token unknown" in caplog.text


def test_a_bootstrap_token_is_refused_after_its_lifetime(
    tmp_path: Path, store_dsn: str | None
) -> None:
    async def body() -> None:
        async with collectors(tmp_path, store_dsn) as (server,):
            bundle = roots_pem(server.ca)
            port = server.enrollment_port
            short = create_bootstrap_token(server.store, 10, 1)
            long = create_bootstrap_token(server.store, 10, 3600)
            # Within its lifetime it enrolls.
            code, _ = await _enroll_raw(port, bundle, bootstrap_token=short, node_name="n1")
            assert code == grpc.StatusCode.OK
            await asyncio.sleep(1.2)
            code, details = await _enroll_raw(port, bundle, bootstrap_token=short, node_name="n2")
            assert code == grpc.StatusCode.PERMISSION_DENIED
            assert "unknown, used up or expired" in details
            assert _uses(server, short) == 1
            # A token still alive enrolls that very name at the same moment.
            code, _ = await _enroll_raw(port, bundle, bootstrap_token=long, node_name="n2")
            assert code == grpc.StatusCode.OK

    asyncio.run(body())


def test_unknown_forged_and_misused_tokens_are_refused(
    tmp_path: Path, store_dsn: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)

    async def body() -> None:
        async with collectors(tmp_path, store_dsn) as (server,):
            bundle = roots_pem(server.ca)
            port = server.enrollment_port
            token = create_bootstrap_token(server.store, 3, 3600)
            join = create_join_token(server.store, TD, "web-1", 3600)
            refused_tokens = [
                "",  # with a node name, no token at all
                "00" * 24,  # well-formed, never minted
                token[:-1],
                token + "0",
                token.upper(),
                " " + token,
                token_hash(token),  # what a stolen copy of the database holds
                join,  # a join token is no bootstrap token
            ]
            for bad in refused_tokens:
                code, details = await _enroll_raw(port, bundle, bootstrap_token=bad, node_name="x")
                assert code in (
                    grpc.StatusCode.PERMISSION_DENIED,
                    grpc.StatusCode.INVALID_ARGUMENT,
                ), (bad, code, details)
            # ...and the bootstrap token is no join token (it names no host).
            code, _ = await _enroll_raw(port, bundle, join_token=token)
            assert code == grpc.StatusCode.PERMISSION_DENIED
            # Both tokens at once, or a node name without a bootstrap token: refused.
            code, _ = await _enroll_raw(
                port, bundle, join_token=join, bootstrap_token=token, node_name="x"
            )
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            code, _ = await _enroll_raw(port, bundle, join_token=join, node_name="x")
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            # Names that are no node name: refused before the token is looked at.
            for name in [
                "",
                "../web-1",
                "a/b",
                "Node-A",
                "node a",
                "-x",
                "x" * 254,
                "é",
                "x\n",
                "x.",
            ]:
                code, details = await _enroll_raw(
                    port, bundle, bootstrap_token=token, node_name=name
                )
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, code, details)
            assert _uses(server, token) == 0  # none of the above spent a use
            # A host enrolled with a join token keeps its name.
            ident = await enroll(f"127.0.0.1:{port}", join, bundle, tmp_path / "web")
            assert ident.host == "web-1"
            code, _ = await _enroll_raw(port, bundle, bootstrap_token=token, node_name="web-1")
            assert code == grpc.StatusCode.ALREADY_EXISTS
            # Positive control: the genuine token, a fresh name.
            code, sid = await _enroll_raw(port, bundle, bootstrap_token=token, node_name="x")
            assert (code, sid) == (grpc.StatusCode.OK, "spiffe://example.org/host/x")
            assert _uses(server, token) == 1
            assert token not in caplog.text and join not in caplog.text

    asyncio.run(body())


def test_a_revoked_node_is_refused_and_a_released_name_enrolls_again(
    tmp_path: Path, store_dsn: str | None
) -> None:
    async def body() -> None:
        async with collectors(tmp_path, store_dsn) as (server,):
            bundle = roots_pem(server.ca)
            target = f"127.0.0.1:{server.enrollment_port}"
            mtls = f"127.0.0.1:{server.port}"
            token = create_bootstrap_token(server.store, 5, 3600)
            a = await enroll_bootstrap(target, token, "node-a", bundle, tmp_path / "a")
            b = await enroll_bootstrap(target, token, "node-b", bundle, tmp_path / "b")
            ha, hb = SimulatedHost(a), SimulatedHost(b)
            assert await publish(server.port, server.ca, a, [ha.batch([_event(1)])]) == [0, 1]
            server.store.revoke_host("node-a", time.time_ns(), release=False)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await publish(server.port, server.ca, a, [ha.batch([_event(2)])])
            assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
            with pytest.raises(TransportError, match=r"PERMISSION_DENIED.*revoked"):
                await renew(mtls, tmp_path / "a")
            # Revoked, the name stays bound: the bootstrap token cannot take it back.
            with pytest.raises(TransportError, match="ALREADY_EXISTS"):
                await enroll_bootstrap(target, token, "node-a", bundle, tmp_path / "a2")
            # Another node is untouched.
            assert await publish(server.port, server.ca, b, [hb.batch([_event(1)])]) == [0, 1]
            # Released (the node was rebuilt): the name enrolls again, once; the old
            # certificate stays refused, the new one streams.
            # At once: a certificate issued within the revocation's second would count
            # as revoked, so the collector holds the enrollment until the next one.
            server.store.revoke_host("node-a", time.time_ns(), release=True)
            a2 = await enroll_bootstrap(target, token, "node-a", bundle, tmp_path / "a2")
            with pytest.raises(TransportError, match="ALREADY_EXISTS"):
                await enroll_bootstrap(target, token, "node-a", bundle, tmp_path / "a3")
            with pytest.raises(grpc.aio.AioRpcError):
                await publish(server.port, server.ca, a, [ha.batch([_event(3)])])
            fresh = SimulatedHost(a2, boot_id="boot-2")
            acks = await publish(server.port, server.ca, a2, [fresh.batch([_event(9)])])
            assert acks[1] >= 1

    asyncio.run(body())


def test_two_replicas_racing_for_the_last_use_enroll_exactly_one_node(
    tmp_path: Path, pg_dsn: str
) -> None:
    async def body() -> None:
        async with collectors(tmp_path, pg_dsn, n=2) as servers:
            bundle = roots_pem(servers[0].ca)
            token = create_bootstrap_token(servers[0].store, 3, 3600)
            for i, name in enumerate(["n1", "n2"]):  # two uses spent, one left
                code, _ = await _enroll_raw(
                    servers[i].enrollment_port, bundle, bootstrap_token=token, node_name=name
                )
                assert code == grpc.StatusCode.OK
            results = await asyncio.gather(
                *(
                    _enroll_raw(
                        servers[i % 2].enrollment_port,
                        bundle,
                        bootstrap_token=token,
                        node_name=f"race-{i}",
                    )
                    for i in range(10)
                )
            )
            codes = [c for c, _ in results]
            assert codes.count(grpc.StatusCode.OK) == 1, results
            assert codes.count(grpc.StatusCode.PERMISSION_DENIED) == 9, results
            assert _uses(servers[1], token) == 3
            with psycopg.connect(pg_dsn) as conn:
                bound = conn.execute(
                    "SELECT count(*) FROM host_enrollments WHERE token_hash = %s",
                    (token_hash(token),),
                ).fetchone()
            assert bound == (3,)
            # One node name raced at both replicas with a token of many uses: one wins,
            # and the losers spend nothing.
            many = create_bootstrap_token(servers[1].store, 50, 3600)
            results = await asyncio.gather(
                *(
                    _enroll_raw(
                        servers[i % 2].enrollment_port,
                        bundle,
                        bootstrap_token=many,
                        node_name="same-node",
                    )
                    for i in range(8)
                )
            )
            codes = [c for c, _ in results]
            assert codes.count(grpc.StatusCode.OK) == 1, results
            assert codes.count(grpc.StatusCode.ALREADY_EXISTS) == 7, results
            assert _uses(servers[0], many) == 1

    asyncio.run(body())


def test_migration_2_keeps_the_names_of_hosts_enrolled_before_it(pg_dsn: str) -> None:
    """A database at version 1 with enrolled and streaming hosts, then migrated."""
    from sidecar.collector.migrations import MIGRATIONS, migrate
    from sidecar.collector.postgres_store import PostgresStore
    from sidecar.collector.store import BootstrapUse

    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE schema_version (version INTEGER PRIMARY KEY,"
            " description TEXT NOT NULL, applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
        )
        version, description, ddl = MIGRATIONS[0]
        conn.execute(ddl)
        conn.execute("INSERT INTO schema_version VALUES (%s, %s)", (version, description))
        conn.execute(
            "INSERT INTO join_tokens VALUES ('h1', 'joined', 9, 5), ('h2', 'unused', 9, NULL)"
        )
        conn.execute("INSERT INTO hosts VALUES ('streamed', 3, '\\x00')")
        assert 2 in migrate(conn)
    store = PostgresStore(pg_dsn, connections=1)
    try:
        now = time.time_ns()
        store.add_bootstrap_token("t", 10, now + 10**12, now)
        for taken in ("joined", "streamed"):
            assert store.use_bootstrap_token("t", taken, now) is BootstrapUse.REFUSED_NAME
        # A join token minted but never used took no name.
        assert store.use_bootstrap_token("t", "unused", now) is BootstrapUse.ENROLLED
    finally:
        store.close()


# ---- the init step: `sidecar enroll --bootstrap-token-file` ---------------------------


def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="sidecar")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args))


class _Background:
    """A collector on its own event loop in a thread, for the command line to talk to."""

    def __init__(self, config_path: Path) -> None:
        import threading

        from sidecar.collector.config import load_config

        self.loop = asyncio.new_event_loop()
        self.server = CollectorServer(load_config(config_path))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0.2), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def background(tmp_path: Path) -> Iterator[tuple[_Background, Path]]:
    cfg = tmp_path / "collector.yaml"
    cfg.write_text(
        "apiVersion: sidecar/v1\nkind: CollectorConfig\ntrustDomain: example.org\n"
        f"dataDir: {tmp_path}/data\nlisten: 127.0.0.1:0\nenrollmentListen: 127.0.0.1:0\n"
    )
    bg = _Background(cfg)
    try:
        yield bg, cfg
    finally:
        bg.stop()


def test_the_init_step_enrolls_once_and_does_nothing_on_every_later_start(
    background: tuple[_Background, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    bg, cfg = background
    assert _cli("collector", "--config", str(cfg), "--bundle") == 0
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(capsys.readouterr().out)
    assert _cli("collector", "--config", str(cfg), "--bootstrap-token", "--uses", "3") == 0
    token = capsys.readouterr().out.strip()
    secret = tmp_path / "secret" / "token"
    secret.parent.mkdir()
    secret.write_text(token + "\n")  # as `kubectl create secret --from-file` may leave it
    out = tmp_path / "host"

    def init(node: str, folder: Path = out) -> int:
        return _cli(
            "enroll",
            "--collector",
            f"127.0.0.1:{bg.server.enrollment_port}",
            "--bootstrap-token-file",
            str(secret),
            "--node-name",
            node,
            "--bundle",
            str(bundle),
            "--out",
            str(folder),
        )

    assert init("node-1") == 0
    first = capsys.readouterr()
    assert "host node-1: enrolled" in first.out
    held = {f.name: f.read_bytes() for f in out.iterdir()}
    assert _uses(bg.server, token) == 1
    # Every later pod start: nothing is asked of the collector, nothing changes,
    # even with the Secret gone.
    secret.rename(secret.with_name("moved"))
    for _ in range(2):
        assert init("node-1") == 0
        again = capsys.readouterr()
        assert "host node-1: already enrolled" in again.out
    assert {f.name: f.read_bytes() for f in out.iterdir()} == held
    assert _uses(bg.server, token) == 1
    secret.with_name("moved").rename(secret)
    # Credentials of another node in the folder: refused, with the way out.
    with pytest.raises(CredentialError, match=r"not of node 'node-2'.*--release-host node-2"):
        init("node-2")
    # Expired credentials: the daemon can no longer renew them; say how to recover.
    stale = tmp_path / "stale"
    ca = bg.server.ca
    svid = ca.issue_x509_svid("spiffe://example.org/host/node-3", timedelta(seconds=1))
    stale.mkdir()
    (stale / "host.pem").write_bytes(svid.cert_chain_pem())
    (stale / "host.key").write_bytes(svid.key_pem())
    (stale / "bundle.pem").write_bytes(roots_pem(ca))
    (stale / "intermediate.pem").write_bytes(svid.cert_chain_pem())
    time.sleep(1.2)
    with pytest.raises(CredentialError, match=r"expired at .*--release-host node-3"):
        init("node-3", stale)
    # Credentials from another CA (the collector was rebuilt): refused, not kept.
    other = CertificateAuthority.load_or_generate(tmp_path / "other-ca", TD)
    alien = tmp_path / "alien"
    alien.mkdir()
    svid = other.issue_x509_svid("spiffe://example.org/host/node-4", timedelta(hours=1))
    for name, data in (
        ("host.pem", svid.cert_chain_pem()),
        ("host.key", svid.key_pem()),
        ("bundle.pem", roots_pem(other)),
        ("intermediate.pem", svid.cert_chain_pem()),
    ):
        (alien / name).write_bytes(data)
    with pytest.raises(CredentialError, match="do not verify against the collector's bundle"):
        init("node-4", alien)
    # Half a folder (a key lost): refused, not overwritten.
    (alien / "host.key").unlink()
    with pytest.raises(CredentialError, match=r"cannot load host credentials.*--release-host"):
        init("node-4", alien)
    assert (alien / "host.pem").read_bytes() == svid.cert_chain_pem()
    # Positive control: a fresh folder for node-4 enrolls.
    assert init("node-4", tmp_path / "node-4") == 0
    assert _uses(bg.server, token) == 2
    final = capsys.readouterr()
    assert token not in caplog.text + first.out + first.err + final.out + final.err


def test_the_init_step_refuses_a_missing_token_file_or_node_name_without_leaking(
    background: tuple[_Background, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.util.errors import ConfigError

    bg, cfg = background
    assert _cli("collector", "--config", str(cfg), "--bundle") == 0
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(capsys.readouterr().out)
    base = [
        "enroll",
        "--collector",
        f"127.0.0.1:{bg.server.enrollment_port}",
        "--bundle",
        str(bundle),
        "--out",
        str(tmp_path / "out"),
    ]
    with pytest.raises(CredentialError, match="cannot read the bootstrap token file"):
        _cli(*base, "--bootstrap-token-file", str(tmp_path / "absent"), "--node-name", "n")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(CredentialError, match="empty"):
        _cli(*base, "--bootstrap-token-file", str(empty), "--node-name", "n")
    with pytest.raises(ConfigError, match="needs --node-name"):
        _cli(*base, "--bootstrap-token-file", str(empty))
    wrong = tmp_path / "wrong"
    wrong.write_text("deadbeef" * 6)
    with pytest.raises(TransportError, match="PERMISSION_DENIED") as exc:
        _cli(*base, "--bootstrap-token-file", str(wrong), "--node-name", "n")
    assert "deadbeef" not in str(exc.value)
    assert not (tmp_path / "out" / HOST_CERT).exists()


def test_rotation_expires_the_old_token_and_leaves_enrolled_nodes_alone(
    background: tuple[_Background, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.export.enroll import load_host_identity

    bg, cfg = background
    assert _cli("collector", "--config", str(cfg), "--bundle") == 0
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(capsys.readouterr().out)

    def mint() -> Path:
        capsys.readouterr()
        assert _cli("collector", "--config", str(cfg), "--bootstrap-token", "--uses", "5") == 0
        path = tmp_path / f"token-{len(list(tmp_path.glob('token-*')))}"
        path.write_text(capsys.readouterr().out)
        return path

    def init(node: str, token: Path) -> int:
        return _cli(
            "enroll",
            "--collector",
            f"127.0.0.1:{bg.server.enrollment_port}",
            "--bootstrap-token-file",
            str(token),
            "--node-name",
            node,
            "--bundle",
            str(bundle),
            "--out",
            str(tmp_path / node),
        )

    old = mint()
    assert init("node-1", old) == 0
    new = mint()  # the Secret is updated with this one
    assert _cli("collector", "--config", str(cfg), "--expire-bootstrap-token", str(old)) == 0
    assert "enrolls no more" in capsys.readouterr().out
    with pytest.raises(TransportError, match="PERMISSION_DENIED: bootstrap token"):
        init("node-2", old)
    with pytest.raises(CredentialError, match="no unexpired bootstrap token"):
        _cli("collector", "--config", str(cfg), "--expire-bootstrap-token", str(old))
    assert init("node-2", new) == 0
    # node-1 restarts with the new Secret: its credentials stand, nothing is spent.
    assert init("node-1", new) == 0
    assert "already enrolled" in capsys.readouterr().out
    assert _uses(bg.server, new.read_text().strip()) == 1
    ident = load_host_identity(tmp_path / "node-1")
    host = SimulatedHost(ident)
    ca = bg.server.ca
    run = asyncio.run_coroutine_threadsafe
    acks = run(publish(bg.server.port, ca, ident, [host.batch([_event(1)])]), bg.loop).result(30)
    assert acks == [0, 1]
    # Revoked from the command line: that node's next stream is refused.
    assert _cli("collector", "--config", str(cfg), "--revoke-host", "node-1") == 0
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        run(publish(bg.server.port, ca, ident, [host.batch([_event(2)])]), bg.loop).result(30)
    assert refused.value.code() == grpc.StatusCode.PERMISSION_DENIED
