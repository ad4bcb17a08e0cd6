"""The collector's TLS server certificate and the SVID of a TLS peer.

Why a server certificate of our own making: gRPC clients check the server's DNS name
or IP address, and an X509-SVID carries only its SPIFFE ID.  So the collector's
certificate is an SVID (``spiffe://<td>/collector``) signed by the trust domain's root
that also names the collector's host names and addresses.
"""

from __future__ import annotations

import ipaddress
from datetime import datetime, timedelta, timezone

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from sidecar.identity.spiffeid import SpiffeId
from sidecar.identity.x509 import CertificateAuthority, new_key, new_serial, verify_svid
from sidecar.util.errors import CredentialError


def server_credentials(
    ca: CertificateAuthority, names: tuple[str, ...], ttl: timedelta
) -> tuple[bytes, bytes]:
    """(key PEM, certificate chain PEM) for the collector, signed by ``ca``."""
    if ca.private_key is None:
        raise CredentialError("the collector's CA has no private key")
    key = new_key()
    now = datetime.now(timezone.utc)
    sans: list[x509.GeneralName] = [
        x509.UniformResourceIdentifier(f"spiffe://{ca.trust_domain}/collector")
    ]
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([]))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(new_serial())
        .not_valid_before(max(now - timedelta(seconds=30), ca.certificate.not_valid_before_utc))
        .not_valid_after(min(now + ttl, ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        .sign(ca.private_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    chain = (cert, *ca.intermediates())
    return key_pem, b"".join(c.public_bytes(serialization.Encoding.PEM) for c in chain)


def roots_pem(ca: CertificateAuthority) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in ca.bundle())


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
