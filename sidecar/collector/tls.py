"""The collector's TLS server certificate and the SVID of a TLS peer.

Why a server certificate of our own making: gRPC clients check the server's DNS name
or IP address, and an X509-SVID carries only its SPIFFE ID.  So the collector's
certificate is an SVID (``spiffe://<td>/collector``) signed by the trust domain's root
that also names the collector's host names and addresses.  It is built, like every
certificate, by :mod:`sidecar.identity.x509`.
"""

from __future__ import annotations

from datetime import timedelta

import grpc
from cryptography import x509

from sidecar.identity.spiffeid import SpiffeId
from sidecar.identity.x509 import CertificateAuthority, certs_pem, key_pem, new_key, verify_svid
from sidecar.util.errors import CredentialError


def server_credentials(
    ca: CertificateAuthority, names: tuple[str, ...], ttl: timedelta
) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM) for the collector, signed by ``ca``."""
    if ca.private_key is None:
        raise CredentialError("the collector's CA has no private key")
    key = new_key()
    sid = f"spiffe://{ca.trust_domain}/collector"
    cert = ca.sign_tls_server(sid, names, ttl, key.public_key())
    return key_pem(key), certs_pem((cert, *ca.intermediates()))


def roots_pem(ca: CertificateAuthority) -> bytes:
    return certs_pem(ca.bundle())


def peer_svid(
    context: grpc.aio.ServicerContext[object, object], ca: CertificateAuthority
) -> tuple[SpiffeId, x509.Certificate]:
    """The caller's SPIFFE ID and leaf certificate, issued directly by our root.

    TLS has already checked the chain; we check again with the SVID rules, and insist
    the leaf is signed by the root itself: certificates that host intermediates sign
    (workload SVIDs) may not act as a host or a subscriber, so a stolen host key cannot
    impersonate another host.
    """
    auth = context.auth_context()
    pems = list(auth.get("x509_pem_cert") or [])
    if not pems:
        raise CredentialError("the client presented no certificate")
    try:
        leaf = x509.load_pem_x509_certificate(pems[0])
    except ValueError as exc:
        raise CredentialError(f"the client certificate cannot be read: {exc}") from exc
    return verify_svid(leaf, (), ca.bundle()), leaf
