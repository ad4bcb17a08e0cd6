"""The SPIFFE Workload API over a real unix socket, with real gRPC, real X.509 and real callers.

Standard-client checks run py-spiffe in a subprocess: its generated ``workload_pb2``
registers the same unqualified message names as ours (the standard proto has no
package), so the two cannot share one process.  That subprocess is also a second,
distinct caller pid for the permission tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc import aio

from sidecar.api.workload import workload_pb2 as pb
from sidecar.api.workload import workload_pb2_grpc as pb_grpc
from sidecar.identity.jwt import JwtAuthority
from sidecar.identity.manager import CREDENTIAL_REVOKED, CredentialManager
from sidecar.identity.spiffeid import SpiffeId, parse_spiffe_id
from sidecar.identity.workload_api import (
    Caller,
    WorkloadApiServer,
    WorkloadInstance,
)
from sidecar.identity.x509 import CertificateAuthority, uri_sans, verify_svid

TD = "example.org"
AGENT = parse_spiffe_id("spiffe://example.org/agent/planner")
HEADER = (("workload.spiffe.io", "true"),)
GUARD = 30.0  # seconds: only to fail instead of hanging, never asserted

# A py-spiffe client.  It waits for "go" on stdin so the test can register its pid first.
CLIENT = r"""
import json, os, sys
try:
    import OpenSSL  # noqa: F401  (pem imports it; an old system pyOpenSSL breaks on import)
except (ImportError, AttributeError):
    sys.modules["OpenSSL"] = None
import grpc
from cryptography.hazmat.primitives import serialization
from spiffe import JwtSvid, TrustDomain, WorkloadApiClient
from spiffe._proto import workload_pb2 as pb, workload_pb2_grpc as pb_grpc

sys.stdin.readline()
action, td = sys.argv[1], sys.argv[2]
der = lambda c: c.public_bytes(serialization.Encoding.DER).hex()
out = {}
if action == "x509":
    with WorkloadApiClient() as client:
        ctx = client.fetch_x509_context()
        svid = ctx.default_svid
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(TrustDomain(td))
        pub = lambda k: k.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        out = {
            "spiffe_id": str(svid.spiffe_id),
            "chain": [der(c) for c in svid.cert_chain],
            "bundle": [der(c) for c in bundle.x509_authorities],
            "key_matches": pub(svid.private_key.public_key()) == pub(svid.leaf.public_key()),
        }
elif action == "jwt":
    audience = sys.argv[3]
    with WorkloadApiClient() as client:
        svid = client.fetch_jwt_svid({audience})
        bundle = client.fetch_jwt_bundles().get_bundle_for_trust_domain(TrustDomain(td))
        checked = JwtSvid.parse_and_validate(svid.token, bundle, {audience})
        served = client.validate_jwt_svid(svid.token, audience)
        out = {"token": svid.token, "validated": str(checked.spiffe_id),
               "served": str(served.spiffe_id)}
elif action == "raw":
    channel = grpc.insecure_channel("unix:" + os.environ["SPIFFE_ENDPOINT_SOCKET"][7:])
    stub = pb_grpc.SpiffeWorkloadAPIStub(channel)
    md = (("workload.spiffe.io", "true"),)
    calls = {
        "FetchX509SVID": lambda: next(iter(stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=md))),
        "FetchX509Bundles": lambda: next(
            iter(stub.FetchX509Bundles(pb.X509BundlesRequest(), metadata=md))),
        "FetchJWTSVID": lambda: stub.FetchJWTSVID(
            pb.JWTSVIDRequest(audience=["reports"]), metadata=md),
        "FetchJWTBundles": lambda: next(
            iter(stub.FetchJWTBundles(pb.JWTBundlesRequest(), metadata=md))),
        "ValidateJWTSVID": lambda: stub.ValidateJWTSVID(
            pb.ValidateJWTSVIDRequest(audience="reports", svid=sys.argv[3]), metadata=md),
    }
    for name, call in calls.items():
        try:
            call()
            out[name] = "OK"
        except grpc.RpcError as exc:
            out[name] = exc.code().name
    channel.close()
print(json.dumps(out), flush=True)
"""


@dataclass
class Resolver:
    """Accepts exactly the pids it was told about; remembers what the kernel said."""

    allowed: dict[int, WorkloadInstance] = field(default_factory=dict)
    seen: list[tuple[Caller, str]] = field(default_factory=list)

    def resolve(self, caller: Caller) -> WorkloadInstance | None:
        with open(f"/proc/self/fdinfo/{caller.pidfd}") as fh:
            pid_line = next((ln for ln in fh if ln.startswith("Pid:")), "")
        self.seen.append((caller, pid_line.split()[-1] if pid_line else ""))
        return self.allowed.get(caller.pid)


@dataclass
class Harness:
    server: WorkloadApiServer
    manager: CredentialManager
    ca: CertificateAuthority
    resolver: Resolver
    events: list[tuple[str, str, SpiffeId, int, datetime]]
    stub: pb_grpc.SpiffeWorkloadAPIAsyncStub  # annotation only: the class exists in the stubs

    def allow_me(self, instance_id: str = "self-1") -> WorkloadInstance:
        instance = WorkloadInstance(instance_id, AGENT)
        self.resolver.allowed[os.getpid()] = instance
        return instance


@pytest.fixture(scope="module")
def root_ca() -> CertificateAuthority:
    return CertificateAuthority.generate_root(TD)


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """pytest's tmp_path can exceed the 108-byte unix socket path limit; this cannot."""
    path = Path(tempfile.mkdtemp(prefix="wl-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@asynccontextmanager
async def harness(
    directory: Path, ca: CertificateAuthority, ttl: float = 60.0, recheck: float = 60.0
) -> AsyncIterator[Harness]:
    events: list[tuple[str, str, SpiffeId, int, datetime]] = []

    def record(kind: str, iid: str, sid: SpiffeId, serial: int, not_after: datetime) -> None:
        events.append((kind, iid, sid, serial, not_after))

    manager = CredentialManager(ca, JwtAuthority(TD), ttl=timedelta(seconds=ttl), on_event=record)
    resolver = Resolver()
    server = WorkloadApiServer(
        directory / "api" / "public.sock", manager, resolver, directory, recheck_interval=recheck
    )
    await server.start()
    channel = aio.insecure_channel(f"unix:{server.socket_path}")
    try:
        yield Harness(server, manager, ca, resolver, events, pb_grpc.SpiffeWorkloadAPIStub(channel))
    finally:
        await channel.close(None)
        await server.stop(0)
        await manager.close()


async def run_client(h: Harness, instance: WorkloadInstance | None, *args: str) -> dict[str, Any]:
    """Run the py-spiffe client in a subprocess (allowed as ``instance`` if given)."""
    env = dict(os.environ, SPIFFE_ENDPOINT_SOCKET=h.server.endpoint)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CLIENT,
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    if instance is not None:
        h.resolver.allowed[proc.pid] = instance
    out, err = await asyncio.wait_for(proc.communicate(b"go\n"), GUARD)
    assert proc.returncode == 0, err.decode()
    result = json.loads(out)
    assert isinstance(result, dict)
    return result


def _certs(hex_ders: list[str]) -> list[x509.Certificate]:
    return [x509.load_der_x509_certificate(bytes.fromhex(h)) for h in hex_ders]


def _split_der(data: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates (the Workload API form), one by one."""
    certs = []
    while data:
        assert data[0] == 0x30  # SEQUENCE
        length, offset = data[1], 2
        if length & 0x80:
            size = length & 0x7F
            length, offset = int.from_bytes(data[2 : 2 + size], "big"), 2 + size
        certs.append(x509.load_der_x509_certificate(data[: offset + length]))
        data = data[offset + length :]
    return certs


async def _next_svid(
    stream: aio.UnaryStreamCall[pb.X509SVIDRequest, pb.X509SVIDResponse],
) -> pb.X509SVIDResponse:
    """The next message of an X509-SVID stream (the guard only stops a hang)."""
    message = await asyncio.wait_for(stream.read(), GUARD)
    assert isinstance(message, pb.X509SVIDResponse), message
    return message


def _serial(response: pb.X509SVIDResponse) -> int:
    return _split_der(response.svids[0].x509_svid)[0].serial_number


# ---- standard client ----------------------------------------------------------------


def test_py_spiffe_client_gets_an_x509_svid_that_verifies_against_the_served_bundle(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    ca = root_ca.issue_intermediate(timedelta(hours=1))

    async def scenario() -> dict[str, Any]:
        async with harness(short_dir, ca) as h:
            return await run_client(h, WorkloadInstance("agent-1", AGENT), "x509", TD)

    result = asyncio.run(scenario())
    chain = _certs(result["chain"])
    bundle = _certs(result["bundle"])
    assert result["spiffe_id"] == AGENT.uri
    assert result["key_matches"] is True
    assert bundle == [root_ca.certificate]
    assert chain[1:] == [ca.certificate]
    assert verify_svid(chain[0], chain[1:], bundle) == AGENT
    assert uri_sans(chain[0]) == [AGENT.uri]
    bc = chain[0].extensions.get_extension_for_class(x509.BasicConstraints).value
    assert bc.ca is False


def test_py_spiffe_client_gets_a_jwt_svid_that_validates_with_the_served_jwks(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> tuple[dict[str, Any], JwtAuthority]:
        async with harness(short_dir, root_ca) as h:
            instance = WorkloadInstance("agent-1", AGENT)
            return await run_client(h, instance, "jwt", TD, "reports"), h.manager.jwt_authority

    result, authority = asyncio.run(scenario())
    assert result["validated"] == AGENT.uri
    assert result["served"] == AGENT.uri
    assert authority.validate(result["token"], "reports")["sub"] == AGENT.uri


# ---- who may call -------------------------------------------------------------------


def test_a_process_the_resolver_does_not_know_is_denied_every_rpc(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> tuple[dict[str, Any], pb.JWTSVIDResponse]:
        async with harness(short_dir, root_ca) as h:
            h.allow_me()
            mine = await h.stub.FetchJWTSVID(
                pb.JWTSVIDRequest(audience=["reports"]), metadata=HEADER
            )
            token = mine.svids[0].svid
            return await run_client(h, None, "raw", TD, token), mine

    theirs, mine = asyncio.run(scenario())
    assert mine.svids[0].spiffe_id == AGENT.uri  # the allowed process is served ...
    assert theirs == {  # ... another process gets nothing at all
        "FetchX509SVID": "PERMISSION_DENIED",
        "FetchX509Bundles": "PERMISSION_DENIED",
        "FetchJWTSVID": "PERMISSION_DENIED",
        "FetchJWTBundles": "PERMISSION_DENIED",
        "ValidateJWTSVID": "PERMISSION_DENIED",
    }


def test_resolver_gets_the_callers_kernel_credentials_and_a_pidfd_of_it(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> Resolver:
        async with harness(short_dir, root_ca) as h:
            h.allow_me()
            await h.stub.FetchJWTBundles(pb.JWTBundlesRequest(), metadata=HEADER).read()
            return h.resolver

    resolver = asyncio.run(scenario())
    caller, pidfd_pid = resolver.seen[0]
    assert (caller.pid, caller.uid, caller.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert pidfd_pid == str(os.getpid())


def test_a_request_without_the_security_header_is_invalid_argument(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> list[grpc.StatusCode]:
        async with harness(short_dir, root_ca) as h:
            h.allow_me()
            codes = []
            for call in (
                lambda: h.stub.FetchX509SVID(pb.X509SVIDRequest()).read(),
                lambda: h.stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["r"])),
                lambda: h.stub.FetchX509Bundles(
                    pb.X509BundlesRequest(), metadata=(("workload.spiffe.io", "false"),)
                ).read(),
            ):
                with pytest.raises(aio.AioRpcError) as info:
                    await call()
                codes.append(info.value.code())
            return codes

    assert asyncio.run(scenario()) == [grpc.StatusCode.INVALID_ARGUMENT] * 3


def test_a_jwt_svid_for_another_spiffe_id_is_denied(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> grpc.StatusCode:
        async with harness(short_dir, root_ca) as h:
            h.allow_me()
            request = pb.JWTSVIDRequest(audience=["r"], spiffe_id="spiffe://example.org/admin")
            with pytest.raises(aio.AioRpcError) as info:
                await h.stub.FetchJWTSVID(request, metadata=HEADER)
            return info.value.code()

    assert asyncio.run(scenario()) == grpc.StatusCode.PERMISSION_DENIED


# ---- rotation and revocation --------------------------------------------------------


def test_the_x509_stream_pushes_a_new_serial_before_the_old_svid_expires(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> tuple[pb.X509SVIDResponse, pb.X509SVIDResponse, datetime]:
        async with harness(short_dir, root_ca, ttl=4) as h:
            h.allow_me()
            stream = h.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)
            first = await _next_svid(stream)
            second = await _next_svid(stream)
            received = datetime.now(UTC)
            stream.cancel()
            return first, second, received

    first, second, received = asyncio.run(scenario())
    old = _split_der(first.svids[0].x509_svid)[0]
    assert _serial(second) != _serial(first)
    assert received < old.not_valid_after_utc
    assert second.svids[0].spiffe_id == AGENT.uri


def test_revocation_ends_the_stream_denies_fetches_and_emits_a_revoked_event(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> tuple[int, grpc.StatusCode, grpc.StatusCode, Harness, int]:
        async with harness(short_dir, root_ca) as h:
            instance = h.allow_me("agent-1")
            stream = h.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)
            serial = _serial(await _next_svid(stream))
            h.manager.revoke(instance.instance_id)
            with pytest.raises(aio.AioRpcError) as ended:
                await _next_svid(stream)
            with pytest.raises(aio.AioRpcError) as denied:
                await h.stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["r"]), metadata=HEADER)
            # The same process attested anew (a new instance) gets a fresh serial.
            h.allow_me("agent-2")
            again = h.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)
            new_serial = _serial(await _next_svid(again))
            again.cancel()
            return serial, ended.value.code(), denied.value.code(), h, new_serial

    serial, ended, denied, h, new_serial = asyncio.run(scenario())
    assert ended == grpc.StatusCode.PERMISSION_DENIED
    assert denied == grpc.StatusCode.PERMISSION_DENIED
    revoked = [e for e in h.events if e[0] == CREDENTIAL_REVOKED]
    assert [(e[1], e[2], e[3]) for e in revoked] == [("agent-1", AGENT, serial)]
    assert h.manager.is_revoked(serial)
    assert new_serial != serial


def test_a_stream_ends_when_the_resolver_stops_recognising_the_caller(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> grpc.StatusCode:
        async with harness(short_dir, root_ca, ttl=2) as h:
            h.allow_me()
            stream = h.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)
            await _next_svid(stream)
            h.resolver.allowed.clear()  # e.g. the process exec'd into another binary
            with pytest.raises(aio.AioRpcError) as info:
                await _next_svid(stream)
            return info.value.code()

    assert asyncio.run(scenario()) == grpc.StatusCode.PERMISSION_DENIED


def test_a_bundle_stream_ends_between_rotations_when_the_caller_loses_its_identity(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> grpc.StatusCode:
        async with harness(short_dir, root_ca, ttl=600, recheck=0.2) as h:
            h.allow_me()
            stream = h.stub.FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER)
            first = await asyncio.wait_for(stream.read(), GUARD)
            assert isinstance(first, pb.X509BundlesResponse)
            h.resolver.allowed.clear()  # no rotation is due for minutes
            with pytest.raises(aio.AioRpcError) as info:
                await asyncio.wait_for(stream.read(), GUARD)
            return info.value.code()

    assert asyncio.run(scenario()) == grpc.StatusCode.PERMISSION_DENIED


# ---- JWT ----------------------------------------------------------------------------


def test_validate_jwt_svid_accepts_the_right_audience_only_and_rejects_tampering(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> tuple[pb.ValidateJWTSVIDResponse, grpc.StatusCode, grpc.StatusCode]:
        async with harness(short_dir, root_ca) as h:
            h.allow_me()
            fetched = await h.stub.FetchJWTSVID(
                pb.JWTSVIDRequest(audience=["reports"]), metadata=HEADER
            )
            token = fetched.svids[0].svid
            good = await h.stub.ValidateJWTSVID(
                pb.ValidateJWTSVIDRequest(audience="reports", svid=token), metadata=HEADER
            )
            with pytest.raises(aio.AioRpcError) as other:
                await h.stub.ValidateJWTSVID(
                    pb.ValidateJWTSVIDRequest(audience="billing", svid=token), metadata=HEADER
                )
            head, _claims, sig = token.split(".")
            forged = _b64json({"sub": AGENT.uri, "aud": ["billing"], "exp": 2**40})
            with pytest.raises(aio.AioRpcError) as tampered:
                await h.stub.ValidateJWTSVID(
                    pb.ValidateJWTSVIDRequest(audience="billing", svid=f"{head}.{forged}.{sig}"),
                    metadata=HEADER,
                )
            return good, other.value.code(), tampered.value.code()

    good, other, tampered = asyncio.run(scenario())
    assert good.spiffe_id == AGENT.uri
    assert good.claims["aud"] == ["reports"]
    assert other == grpc.StatusCode.INVALID_ARGUMENT
    assert tampered == grpc.StatusCode.INVALID_ARGUMENT


def test_jwt_svids_expire_within_five_minutes_and_are_refused_after_expiry(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> tuple[dict[str, Any], grpc.StatusCode]:
        async with harness(short_dir, root_ca) as h:
            h.allow_me()
            fetched = await h.stub.FetchJWTSVID(
                pb.JWTSVIDRequest(audience=["reports"]), metadata=HEADER
            )
            claims = _claims(fetched.svids[0].svid)
            short = h.manager.jwt_authority.issue(AGENT, ["reports"], timedelta(seconds=1))
            exp = _claims(short)["exp"]
            while datetime.now(UTC).timestamp() <= exp:
                await asyncio.sleep(0.1)
            with pytest.raises(aio.AioRpcError) as expired:
                await h.stub.ValidateJWTSVID(
                    pb.ValidateJWTSVIDRequest(audience="reports", svid=short), metadata=HEADER
                )
            return claims, expired.value.code()

    claims, expired = asyncio.run(scenario())
    assert 0 < claims["exp"] - claims["iat"] <= 300
    assert claims["aud"] == ["reports"]
    assert expired == grpc.StatusCode.INVALID_ARGUMENT


# ---- socket lifecycle ---------------------------------------------------------------


def test_socket_is_world_connectable_and_removed_with_the_private_dir_on_stop(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    async def scenario() -> tuple[int, Path, list[Path]]:
        async with harness(short_dir, root_ca) as h:
            mode = stat.S_IMODE(h.server.socket_path.stat().st_mode)
            private = [p for p in short_dir.iterdir() if p.name.startswith("sidecar-wl-")]
            assert len(private) == 1
            assert stat.S_IMODE(private[0].stat().st_mode) == 0o700
            path = h.server.socket_path
        return mode, path, [p for p in short_dir.iterdir() if p.name.startswith("sidecar-wl-")]

    mode, path, left = asyncio.run(scenario())
    assert mode == 0o666
    assert not path.exists()
    assert left == []


def _b64json(value: dict[str, Any]) -> str:
    import base64

    return base64.urlsafe_b64encode(json.dumps(value).encode()).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    import base64

    segment = token.split(".")[1]
    value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


def test_a_private_dir_left_by_a_killed_server_is_removed_and_a_live_one_kept(
    short_dir: Path, root_ca: CertificateAuthority
) -> None:
    """A daemon killed with SIGKILL cannot clean up; the next one does, beside its socket."""
    import socket as socket_mod

    stale = short_dir / "sidecar-wl-stale"
    stale.mkdir(mode=0o700)
    dead = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    dead.bind(str(stale / "grpc.sock"))
    dead.close()  # the file stays, nobody listens: connect is refused
    live_dir = short_dir / "sidecar-wl-live"
    live_dir.mkdir(mode=0o700)
    live = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    live.bind(str(live_dir / "grpc.sock"))
    live.listen()
    try:

        async def scenario() -> list[str]:
            async with harness(short_dir, root_ca):
                return sorted(
                    p.name for p in short_dir.iterdir() if p.name.startswith("sidecar-wl-")
                )

        names = asyncio.run(scenario())
    finally:
        live.close()
    assert not stale.exists()
    assert live_dir.exists()  # another server's, still listening
    assert "sidecar-wl-live" in names and len(names) == 2  # it, and the new server's own
