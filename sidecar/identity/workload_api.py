"""The SPIFFE Workload API server: SVIDs and bundles for attested callers on a unix socket.

Every request is authorised afresh: the ``workload.spiffe.io: true`` header must be
present (else INVALID_ARGUMENT, as the Workload Endpoint spec demands), and the
resolver must map the calling process (from :mod:`sidecar.identity.peercred`) to a
workload instance, else PERMISSION_DENIED and nothing else, not even bundles.  Streams
re-resolve before every message and every ``recheck_interval`` seconds, so a process
that execs into something else loses its stream soon, and they end with
PERMISSION_DENIED when the instance's credentials are revoked.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

import grpc
from cryptography.hazmat.primitives import serialization
from google.protobuf import struct_pb2
from grpc import aio

from sidecar.api.workload import workload_pb2 as pb
from sidecar.api.workload import workload_pb2_grpc as pb_grpc
from sidecar.identity.manager import CredentialManager
from sidecar.identity.peercred import Caller, PeerCredFront
from sidecar.identity.spiffeid import SpiffeId
from sidecar.identity.x509 import X509Svid
from sidecar.util.errors import SidecarError, TransportError

__all__ = ["Caller", "CallerResolver", "WorkloadApiServer", "WorkloadInstance"]

_logger = logging.getLogger(__name__)

HEADER_KEY = "workload.spiffe.io"
HEADER_VALUE = "true"
# How long a caller that resolves to no instance may wait for its attestation
# to reach the registry (the daemon hands attested records on in batches).
RESOLVE_GRACE_SECONDS = 0.1

Context = aio.ServicerContext[Any, Any]


@dataclass(frozen=True)
class WorkloadInstance:
    """What a caller was attested to be: one process instance and its SPIFFE ID."""

    instance_id: str
    spiffe_id: SpiffeId


class CallerResolver(Protocol):
    """Attests a caller; ``None`` means it has no identity here."""

    def resolve(self, caller: Caller) -> WorkloadInstance | None: ...


class _Servicer(pb_grpc.SpiffeWorkloadAPIServicer):
    def __init__(
        self,
        manager: CredentialManager,
        resolver: CallerResolver,
        front: PeerCredFront,
        recheck_interval: float,
    ) -> None:
        self._manager = manager
        self._resolver = resolver
        self._front = front
        self._recheck = recheck_interval

    # ---- X509-SVID profile --------------------------------------------------------

    async def FetchX509SVID(
        self, request: pb.X509SVIDRequest, context: Context
    ) -> AsyncIterator[pb.X509SVIDResponse]:
        instance = await self._authorize(context)
        await self._ensure_issued(instance, context)
        async for svid in self._authorized_watch(instance, context):
            yield self._x509_response(svid)

    async def FetchX509Bundles(
        self, request: pb.X509BundlesRequest, context: Context
    ) -> AsyncIterator[pb.X509BundlesResponse]:
        instance = await self._authorize(context)
        await self._ensure_issued(instance, context)
        yield pb.X509BundlesResponse(bundles={self._td_id(): self._bundle_der()})
        await self._until_revoked(instance, context)

    # ---- JWT-SVID profile ---------------------------------------------------------

    async def FetchJWTSVID(
        self, request: pb.JWTSVIDRequest, context: Context
    ) -> pb.JWTSVIDResponse:
        if not request.audience or not all(request.audience):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience is required")
        instance = await self._authorize(context)
        if request.spiffe_id and request.spiffe_id != instance.spiffe_id.uri:
            await _deny(context, f"caller is not entitled to {request.spiffe_id}")
        await self._ensure_issued(instance, context)
        try:
            token = self._manager.jwt_svid(instance.instance_id, list(request.audience))
        except SidecarError as exc:
            await _deny(context, str(exc))
        svid = pb.JWTSVID(spiffe_id=instance.spiffe_id.uri, svid=token)
        return pb.JWTSVIDResponse(svids=[svid])

    async def FetchJWTBundles(
        self, request: pb.JWTBundlesRequest, context: Context
    ) -> AsyncIterator[pb.JWTBundlesResponse]:
        instance = await self._authorize(context)
        await self._ensure_issued(instance, context)
        jwks = self._manager.jwt_authority.jwks_json()
        yield pb.JWTBundlesResponse(bundles={self._td_id(): jwks})
        await self._until_revoked(instance, context)

    async def ValidateJWTSVID(
        self, request: pb.ValidateJWTSVIDRequest, context: Context
    ) -> pb.ValidateJWTSVIDResponse:
        if not request.audience or not request.svid:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "audience and svid are required")
        await self._authorize(context)
        try:
            claims = self._manager.jwt_authority.validate(request.svid, request.audience)
        except SidecarError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"invalid JWT-SVID: {exc}")
        struct = struct_pb2.Struct()
        struct.update(claims)
        return pb.ValidateJWTSVIDResponse(spiffe_id=str(claims["sub"]), claims=struct)

    # ---- helpers ------------------------------------------------------------------

    async def _authorize(self, context: Context) -> WorkloadInstance:
        metadata = context.invocation_metadata() or ()
        if not any(k == HEADER_KEY and v == HEADER_VALUE for k, v in metadata):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"security header missing: {HEADER_KEY}: {HEADER_VALUE}",
            )
        caller = self._front.caller_for(context.peer())
        if caller is None:
            await _deny(context, "caller unknown (not connected through the workload socket)")
        instance = self._resolve(caller)
        # A process that has just exec'd may still be on its way from the
        # kernel through attestation to the registry: give it that long.
        waited = 0.0
        while instance is None and waited < RESOLVE_GRACE_SECONDS:
            await asyncio.sleep(0.01)
            waited += 0.01
            instance = self._resolve(caller)
        if instance is None:
            _logger.info("workload API denied pid %d uid %d", caller.pid, caller.uid)
            await _deny(context, "no identity for this caller")
        if not instance.spiffe_id.member_of(self._manager.trust_domain):
            await _deny(context, f"{instance.spiffe_id} is not in this trust domain")
        return instance

    def _resolve(self, caller: Caller) -> WorkloadInstance | None:
        try:
            return self._resolver.resolve(caller)
        except SidecarError as exc:
            _logger.warning("attesting caller pid %d failed: %s", caller.pid, exc)
            return None

    async def _ensure_issued(self, instance: WorkloadInstance, context: Context) -> X509Svid:
        try:
            return self._manager.issue(instance.instance_id, instance.spiffe_id)
        except SidecarError as exc:
            await _deny(context, str(exc))

    async def _until_revoked(self, instance: WorkloadInstance, context: Context) -> None:
        """Hold a bundle stream open; end it with PERMISSION_DENIED when the caller loses out."""
        async for _ in self._authorized_watch(instance, context):
            pass

    async def _authorized_watch(
        self, instance: WorkloadInstance, context: Context
    ) -> AsyncIterator[X509Svid]:
        """The instance's SVIDs while the caller still resolves to it.

        The caller is re-resolved before every SVID and every ``recheck_interval``
        seconds in between, so a process that exec'd into something else loses its
        stream soon, not only at the next rotation.
        """
        updates = self._manager.watch(instance.instance_id)
        pending: asyncio.Future[X509Svid | None] | None = None
        try:
            while True:
                if pending is None:
                    pending = asyncio.ensure_future(anext(updates))
                done, _ = await asyncio.wait({pending}, timeout=self._recheck)
                if await self._authorize(context) != instance:
                    await _deny(context, "caller is no longer this workload")
                if not done:
                    continue
                svid = pending.result()
                pending = None
                if svid is None:
                    await _deny(context, "credentials revoked")
                yield svid
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            await updates.aclose()

    def _td_id(self) -> str:
        return f"spiffe://{self._manager.trust_domain}"

    def _bundle_der(self) -> bytes:
        return b"".join(
            c.public_bytes(serialization.Encoding.DER) for c in self._manager.ca.bundle()
        )

    def _x509_response(self, svid: X509Svid) -> pb.X509SVIDResponse:
        entry = pb.X509SVID(
            spiffe_id=svid.spiffe_id.uri,
            x509_svid=svid.cert_chain_der(),
            x509_svid_key=svid.key_der(),
            bundle=self._bundle_der(),
        )
        return pb.X509SVIDResponse(svids=[entry])


async def _deny(context: Context, why: str) -> NoReturn:
    await context.abort(grpc.StatusCode.PERMISSION_DENIED, why)
    raise AssertionError("unreachable: abort raises")  # pragma: no cover


class WorkloadApiServer:
    """The Workload API on ``socket_path`` (mode 0666), served by ``grpc.aio``.

    gRPC itself listens on a socket in a private 0700 directory; only the
    :class:`PeerCredFront` reaches it, so every request has a known caller.
    """

    def __init__(
        self,
        socket_path: Path,
        manager: CredentialManager,
        resolver: CallerResolver,
        private_dir: Path | None = None,
        recheck_interval: float = 5.0,
    ) -> None:
        self.socket_path = socket_path
        self._recheck = recheck_interval
        self._manager = manager
        self._resolver = resolver
        self._private_parent = private_dir
        self._private_dir: Path | None = None
        self._front: PeerCredFront | None = None
        self._server: aio.Server | None = None

    @property
    def endpoint(self) -> str:
        """The address for ``SPIFFE_ENDPOINT_SOCKET``."""
        return f"unix://{self.socket_path}"

    async def start(self) -> None:
        # Beside the public socket (the daemon's runtime directory) unless told
        # otherwise, where a restarted daemon finds what a killed one left.
        parent = self._private_parent or self.socket_path.parent
        _remove_stale_private_dirs(parent)
        try:
            parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            self._private_dir = Path(tempfile.mkdtemp(prefix=_PRIVATE_PREFIX, dir=parent))
        except OSError as exc:
            raise TransportError(f"cannot make the workload API private directory: {exc}") from exc
        upstream = self._private_dir / "grpc.sock"
        self._front = PeerCredFront(self.socket_path, upstream)
        server = aio.server()
        pb_grpc.add_SpiffeWorkloadAPIServicer_to_server(
            _Servicer(self._manager, self._resolver, self._front, self._recheck), server
        )
        try:
            server.add_insecure_port(f"unix:{upstream}")
        except RuntimeError as exc:
            self._remove_private_dir()
            raise TransportError(f"cannot listen on {upstream}: {exc}") from exc
        await server.start()
        self._server = server
        try:
            await self._front.start()
        except TransportError:
            await self.stop(0)
            raise

    async def stop(self, grace: float | None = 1.0) -> None:
        """Refuse new callers, let RPCs finish for ``grace`` seconds, then cut and clean up."""
        if self._front is not None:
            self._front.stop_accepting()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._front is not None:
            await self._front.close()
            self._front = None
        self._remove_private_dir()

    def _remove_private_dir(self) -> None:
        if self._private_dir is not None:
            with contextlib.suppress(OSError):
                shutil.rmtree(self._private_dir)
            self._private_dir = None


_PRIVATE_PREFIX = "sidecar-wl-"


def _remove_stale_private_dirs(parent: Path) -> None:
    """Remove private directories whose server is gone (a daemon killed with SIGKILL).

    One whose socket still accepts belongs to a running server and is left alone.
    """
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(_PRIVATE_PREFIX)]
    except OSError:
        return
    for path in candidates:
        sock = path / "grpc.sock"
        if path.is_symlink() or not path.is_dir():
            continue
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(sock))
            continue  # a live server
        except OSError:
            pass
        finally:
            probe.close()
        with contextlib.suppress(OSError):
            shutil.rmtree(path)
