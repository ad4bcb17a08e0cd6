"""Host side of enrollment: a token -> host SVID + intermediate CA, and renewal.

Two tokens enroll: a join token, minted for one host and spent once, and a
bootstrap token, shared by the nodes of a cluster, that enrolls a node under
its node name (see :func:`enroll_bootstrap` and :func:`existing_credentials`).

Files written into the host's credential folder (keys mode 0600):

* ``host.pem`` / ``host.key``: host SVID (mTLS client certificate; signs batches),
* ``intermediate.pem`` / ``intermediate.key``: the host's CA for workload SVIDs,
  signed by the trust domain's root and name-constrained to the trust domain,
* ``bundle.pem``: the trust domain's root(s).

The intermediate's key is made here and never leaves the host; the collector signs
its CSR.  Renewal is done over mTLS with the current host SVID, before it expires.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sidecar.api.v1 import collector_pb2, collector_pb2_grpc
from sidecar.export.exporter import HostIdentity
from sidecar.identity.x509 import (
    CertificateAuthority,
    certs_pem,
    key_pem,
    new_csr,
    new_key,
    verify_svid,
)
from sidecar.util.errors import CredentialError, TransportError
from sidecar.util.fsutil import write_atomic

_logger = logging.getLogger(__name__)

HOST_CERT = "host.pem"
HOST_KEY = "host.key"
INTER_CERT = "intermediate.pem"
INTER_KEY = "intermediate.key"
BUNDLE = "bundle.pem"


def save_credentials(
    out_dir: Path,
    creds: collector_pb2.HostCredentials,
    inter_key: ec.EllipticCurvePrivateKey,
    host_key: ec.EllipticCurvePrivateKey,
) -> None:
    """Check what the collector sent and write it, with our own keys, into ``out_dir``."""
    try:
        host_cert = x509.load_der_x509_certificate(creds.host_svid)
        inter = x509.load_der_x509_certificate(creds.intermediate_ca)
        roots = [x509.load_der_x509_certificate(c) for c in creds.trust_bundle]
    except ValueError as exc:
        raise CredentialError(f"the collector sent unreadable credentials: {exc}") from exc
    if inter.public_key() != inter_key.public_key():
        raise CredentialError("the collector's intermediate CA is not for our key")
    if host_cert.public_key() != host_key.public_key():
        raise CredentialError("the collector's host SVID is not for our key")
    try:
        out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(out_dir / BUNDLE, certs_pem(roots), 0o644)
        write_atomic(out_dir / INTER_KEY, key_pem(inter_key), 0o600)
        write_atomic(out_dir / INTER_CERT, certs_pem([inter]), 0o644)
        write_atomic(out_dir / HOST_KEY, key_pem(host_key), 0o600)
        write_atomic(out_dir / HOST_CERT, certs_pem([host_cert]), 0o644)
    except OSError as exc:
        raise CredentialError(f"cannot write credentials into {out_dir}: {exc}") from exc


def load_host_identity(cred_dir: Path) -> HostIdentity:
    """The host SVID, its key and the bundle, for the exporter."""
    try:
        chain = (cred_dir / HOST_CERT).read_bytes()
        key = serialization.load_pem_private_key((cred_dir / HOST_KEY).read_bytes(), None)
        roots = (cred_dir / BUNDLE).read_bytes()
        cert = x509.load_pem_x509_certificate(chain)
    except (OSError, ValueError) as exc:
        raise CredentialError(f"cannot load host credentials from {cred_dir}: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CredentialError(f"{cred_dir / HOST_KEY}: not an EC key")
    uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    sid = next(iter(uris.get_values_for_type(x509.UniformResourceIdentifier)), "")
    host = sid.rsplit("/host/", 1)[-1] if "/host/" in sid else ""
    if not host:
        raise CredentialError(f"{cred_dir / HOST_CERT}: not a host SVID ({sid})")
    return HostIdentity(host=host, cert_chain_pem=chain, private_key=key, roots_pem=roots)


def load_intermediate(cred_dir: Path) -> CertificateAuthority:
    """The host's intermediate CA, ready to sign workload SVIDs."""
    return CertificateAuthority.load(cred_dir / INTER_CERT, cred_dir / INTER_KEY, cred_dir / BUNDLE)


def renewal_due(cred_dir: Path, fraction: float = 0.5) -> bool:
    """True once ``fraction`` of the host SVID's lifetime has passed."""
    try:
        cert = x509.load_pem_x509_certificate((cred_dir / HOST_CERT).read_bytes())
    except (OSError, ValueError):
        return True
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return datetime.now(timezone.utc) >= start + (end - start) * fraction


def _options(server_name: str | None) -> list[tuple[str, str]]:
    return [("grpc.ssl_target_name_override", server_name)] if server_name else []


async def enroll(
    target: str, token: str, bundle_pem: bytes, out_dir: Path, server_name: str | None = None
) -> HostIdentity:
    """Enroll once with a join token; ``bundle_pem`` is the root, obtained out of band."""
    return await _enroll(target, bundle_pem, out_dir, server_name, join_token=token)


async def enroll_bootstrap(
    target: str,
    token: str,
    node_name: str,
    bundle_pem: bytes,
    out_dir: Path,
    server_name: str | None = None,
) -> HostIdentity:
    """Enroll as ``node_name`` with a bootstrap token shared by many nodes."""
    ident = await _enroll(
        target, bundle_pem, out_dir, server_name, bootstrap_token=token, node_name=node_name
    )
    if ident.host != node_name:
        raise CredentialError(f"the collector enrolled host '{ident.host}', not node '{node_name}'")
    return ident


async def _enroll(
    target: str, bundle_pem: bytes, out_dir: Path, server_name: str | None, **request: str
) -> HostIdentity:
    inter_key, host_key = new_key(), new_key()
    creds = grpc.ssl_channel_credentials(bundle_pem)
    async with grpc.aio.secure_channel(target, creds, options=_options(server_name)) as ch:
        try:
            reply = await collector_pb2_grpc.EnrollmentStub(ch).Enroll(
                collector_pb2.EnrollRequest(
                    intermediate_csr=new_csr(inter_key),
                    host_csr=new_csr(host_key),
                    **request,
                ),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            raise TransportError(
                f"enrollment at {target} failed: {exc.code().name}: {exc.details()}"
            ) from exc
    save_credentials(out_dir, reply, inter_key, host_key)
    _logger.info("enrolled as %s", reply.spiffe_id)
    return load_host_identity(out_dir)


def read_token_file(path: Path) -> str:
    """The token in ``path`` (a mounted Secret's key), surrounding white space removed.

    Errors name the file, never its content.
    """
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read the bootstrap token file {path}: {exc}") from exc
    try:
        token = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise CredentialError(f"{path}: the bootstrap token is not ASCII text") from None
    if not token:
        raise CredentialError(f"{path}: the bootstrap token file is empty")
    if any(c.isspace() for c in token):
        raise CredentialError(
            f"{path}: the bootstrap token holds white space (one token, one line)"
        )
    return token


def existing_credentials(
    out_dir: Path, node_name: str, bundle_pem: bytes, now: datetime | None = None
) -> HostIdentity | None:
    """The valid credentials of ``node_name`` already in ``out_dir``; None when there are none.

    What makes an init step safe to run at every pod start: credentials from
    an earlier start are kept (the daemon renews them), never replaced by a
    second enrollment, which the collector would refuse anyway.  Credentials
    that are there but cannot serve (expired, another host's, another CA's)
    raise CredentialError saying how to recover.
    """
    if not (out_dir / HOST_CERT).exists():
        return None
    when = now or datetime.now(timezone.utc)
    recover = (
        f"to enroll again, remove {out_dir}/* on this node and have the operator release"
        f" the name (sidecar collector --config FILE --release-host {node_name})"
    )
    try:
        ident = load_host_identity(out_dir)
    except CredentialError as exc:
        raise CredentialError(f"{exc}; {recover}") from exc
    if ident.host != node_name:
        raise CredentialError(
            f"{out_dir / HOST_CERT} is the certificate of host '{ident.host}', not of node"
            f" '{node_name}': {recover}"
        )
    try:
        roots = x509.load_pem_x509_certificates(bundle_pem)
        leaf = x509.load_pem_x509_certificate(ident.cert_chain_pem)
        inter = x509.load_pem_x509_certificate((out_dir / INTER_CERT).read_bytes())
    except (OSError, ValueError) as exc:
        raise CredentialError(
            f"cannot read the credentials in {out_dir}: {exc}; {recover}"
        ) from exc
    for what, cert in (("host certificate", leaf), ("intermediate CA", inter)):
        if when >= cert.not_valid_after_utc:
            raise CredentialError(
                f"the {what} in {out_dir} expired at {cert.not_valid_after_utc.isoformat()}:"
                f" the daemon renews before expiry, and after it only a new enrollment"
                f" helps; {recover}"
            )
    try:
        verify_svid(leaf, [], roots, at=when)
    except CredentialError as exc:
        raise CredentialError(
            f"the credentials in {out_dir} do not verify against the collector's bundle"
            f" ({exc}); {recover}"
        ) from exc
    return ident


async def renew(target: str, cred_dir: Path, server_name: str | None = None) -> HostIdentity:
    """Replace the host SVID and intermediate with fresh ones, over mTLS."""
    ident = load_host_identity(cred_dir)
    inter_key, host_key = new_key(), new_key()
    creds = grpc.ssl_channel_credentials(ident.roots_pem, ident.key_pem(), ident.cert_chain_pem)
    async with grpc.aio.secure_channel(target, creds, options=_options(server_name)) as ch:
        try:
            reply = await collector_pb2_grpc.CollectorStub(ch).Renew(
                collector_pb2.RenewRequest(
                    intermediate_csr=new_csr(inter_key), host_csr=new_csr(host_key)
                ),
                timeout=30,
            )
        except grpc.aio.AioRpcError as exc:
            raise TransportError(
                f"renewal at {target} failed: {exc.code().name}: {exc.details()}"
            ) from exc
    save_credentials(cred_dir, reply, inter_key, host_key)
    _logger.info("renewed %s", reply.spiffe_id)
    return load_host_identity(cred_dir)


def credential_expiry(cred_dir: Path) -> dict[str, datetime | None]:
    """When the host SVID and the intermediate CA expire (None when unreadable)."""
    out: dict[str, datetime | None] = {}
    for name, file in (("host_svid", HOST_CERT), ("intermediate", INTER_CERT)):
        try:
            cert = x509.load_pem_x509_certificate((cred_dir / file).read_bytes())
            out[name] = cert.not_valid_after_utc
        except (OSError, ValueError):
            out[name] = None
    return out


class Renewer:
    """Keeps a host's credentials renewed at half-life, with capped backoff on failure.

    ``target`` is one collector address or each replica's: a failed try moves
    to the next address at once, and backs off only once every one has failed.
    ``on_renewed`` is told of each renewal (the daemon then signs workload
    SVIDs with the new intermediate); ``last_error`` says why the last try
    failed, for ``sidecar status``.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        cred_dir: Path,
        server_name: str | None,
        on_renewed: Callable[[HostIdentity], None],
        backoff_max: float = 60.0,
    ) -> None:
        self.targets = (target,) if isinstance(target, str) else tuple(target)
        if not self.targets:
            raise ValueError("renewal needs at least one collector address")
        self._index = 0
        self.cred_dir, self.server_name = cred_dir, server_name
        self.on_renewed = on_renewed
        self.backoff_max = backoff_max
        self.renewals = 0
        self.last_error: str | None = None

    def _seconds_until_due(self) -> float:
        try:
            cert = x509.load_pem_x509_certificate((self.cred_dir / HOST_CERT).read_bytes())
        except (OSError, ValueError):
            return 0.0
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
        due = start + (end - start) / 2
        return max(0.0, (due - datetime.now(timezone.utc)).total_seconds())

    @property
    def target(self) -> str:
        """The collector address the next renewal is asked of."""
        return self.targets[self._index]

    async def run(self) -> None:
        backoff = 0.5
        failed_in_round = 0
        while True:
            wait = self._seconds_until_due()
            if wait > 0:
                await asyncio.sleep(min(wait, 60.0))
                continue
            target = self.target
            try:
                ident = await renew(target, self.cred_dir, self.server_name)
            except (TransportError, CredentialError, OSError, ValueError) as exc:
                self.last_error = str(exc)
                self._index = (self._index + 1) % len(self.targets)
                failed_in_round += 1
                if failed_in_round < len(self.targets):
                    _logger.warning(
                        "host credentials not renewed at %s, trying %s: %s",
                        target,
                        self.target,
                        exc,
                    )
                    continue
                failed_in_round = 0
                _logger.warning("host credentials not renewed (retry in %.1fs): %s", backoff, exc)
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, self.backoff_max)
                continue
            failed_in_round = 0
            self.renewals += 1
            self.last_error = None
            backoff = 0.5
            self.on_renewed(ident)
