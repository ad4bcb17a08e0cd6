"""Certificate authority and X509-SVIDs, as the SPIFFE X509-SVID specification defines them.

Why our own small CA: each host daemon signs short-lived SVIDs for the workloads it
attests, so it must hold a signing key (a root for a lone host, or an intermediate
that a central CA signed).  Every certificate it makes follows the X509-SVID rules:

* a leaf has exactly one URI SAN (its SPIFFE ID), ``CA:false``, a critical key usage
  with ``digitalSignature`` and neither ``keyCertSign`` nor ``cRLSign``;
* a signing certificate has ``CA:true`` and ``keyCertSign``; its URI SAN, when present,
  is the bare trust domain ``spiffe://<td>``;
* intermediates we issue are name-constrained to URIs of their own trust domain, so a
  stolen host key cannot mint identities for another trust domain.

Keys are EC P-256.  Foreign errors (``cryptography``, ``OSError``) leave this module as
:class:`~sidecar.util.errors.CredentialError`.

This is the one place that builds keys, certificates and certificate requests and
encodes them: the collector's TLS certificate (:meth:`CertificateAuthority.sign_tls_server`),
a host's enrollment requests (:func:`new_csr`) and every PEM the product writes
(:func:`key_pem`, :func:`certs_pem`) come from here, so each is made one way.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity.spiffeid import SpiffeId, parse_spiffe_id, parse_trust_domain
from sidecar.util.errors import CredentialError
from sidecar.util.fsutil import write_atomic

_logger = logging.getLogger(__name__)

CERT_FILE = "ca.pem"
KEY_FILE = "ca.key"
CHAIN_FILE = "chain.pem"

# Certificates are backdated a little so that a verifier whose clock lags ours by a few
# seconds does not reject a credential it has just received.
_BACKDATE = timedelta(seconds=30)
BACKDATE = _BACKDATE  # for verifiers that recover the time of issue


def _now() -> datetime:
    return datetime.now(timezone.utc)


def new_key() -> ec.EllipticCurvePrivateKey:
    """A fresh EC P-256 private key (the only key type we issue)."""
    return ec.generate_private_key(ec.SECP256R1())


def new_serial() -> int:
    """A random, positive, 128-bit serial number (never 0)."""
    while True:
        serial = secrets.randbits(128)
        if serial:
            return serial


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def certs_pem(certs: Iterable[x509.Certificate]) -> bytes:
    """Certificates as concatenated PEM, in the order given."""
    return b"".join(_pem(c) for c in certs)


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A private key as unencrypted PKCS#8 PEM (files are protected by their mode)."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def new_csr(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A certificate request (DER) for ``key``, with an empty subject.

    Whoever signs it takes only the key from it (see
    :meth:`CertificateAuthority.sign_x509_svid_csr`), so it asks for nothing else.
    """
    csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    return csr.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def uri_sans(cert: x509.Certificate) -> list[str]:
    """The URI SANs of ``cert`` (empty when it has no SAN extension)."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return list(ext.value.get_values_for_type(x509.UniformResourceIdentifier))


@dataclass(frozen=True)
class X509Svid:
    """A leaf (or host) X509-SVID with its private key and intermediates."""

    spiffe_id: SpiffeId
    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    chain: tuple[x509.Certificate, ...]  # intermediates up to (not including) the root
    serial: int
    not_after: datetime

    def cert_chain_pem(self) -> bytes:
        """Leaf followed by its intermediates, PEM: what a TLS peer is sent."""
        return certs_pem(self.chain_all())

    def cert_chain_der(self) -> bytes:
        """Leaf followed by its intermediates as concatenated DER (the Workload API form)."""
        return b"".join(c.public_bytes(serialization.Encoding.DER) for c in self.chain_all())

    def chain_all(self) -> tuple[x509.Certificate, ...]:
        """Leaf followed by its intermediates."""
        return (self.certificate, *self.chain)

    def key_pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM."""
        return key_pem(self.private_key)

    def key_der(self) -> bytes:
        """The private key as unencrypted PKCS#8 DER (the Workload API form)."""
        return self.private_key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )


class CertificateAuthority:
    """A signing certificate of one trust domain and, usually, its private key.

    ``chain`` holds the issuer certificates above this CA, nearest first, ending with
    the trust domain's root; it is empty when this CA is itself the root.  A CA made by
    :meth:`issue_intermediate` for somebody else's public key has no private key and
    can only be inspected, not used to sign.
    """

    def __init__(
        self,
        trust_domain: str,
        certificate: x509.Certificate,
        private_key: ec.EllipticCurvePrivateKey | None,
        chain: Sequence[x509.Certificate] = (),
    ) -> None:
        try:
            self.trust_domain = parse_trust_domain(trust_domain)
        except ValueError as exc:
            raise CredentialError(str(exc)) from exc
        self.certificate = certificate
        self.private_key = private_key
        self.chain = tuple(chain)
        if private_key is not None and not _same_public_key(certificate, private_key):
            raise CredentialError("CA private key does not match its certificate")

    # ---- construction -------------------------------------------------------------

    @classmethod
    def generate_root(
        cls, trust_domain: str, ttl: timedelta = timedelta(days=365)
    ) -> CertificateAuthority:
        """A new self-signed root for ``trust_domain``."""
        try:
            td = parse_trust_domain(trust_domain)
        except ValueError as exc:
            raise CredentialError(str(exc)) from exc
        key = new_key()
        now = _now()
        name = _ca_name(td, "root")
        builder = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(new_serial())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + ttl)
        )
        builder = _ca_extensions(builder, td, key.public_key(), key.public_key(), None)
        cert = builder.sign(key, hashes.SHA256())
        _logger.info("generated root CA for trust domain %s", td)
        return cls(td, cert, key)

    @classmethod
    def load(
        cls, cert_path: Path, key_path: Path, chain_path: Path | None = None
    ) -> CertificateAuthority:
        """Load a CA from PEM files; the trust domain comes from its URI SAN."""
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            chain = x509.load_pem_x509_certificates(chain_path.read_bytes()) if chain_path else []
        except (OSError, ValueError, TypeError) as exc:
            raise CredentialError(f"cannot load CA from {cert_path}, {key_path}: {exc}") from exc
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CredentialError(f"{key_path}: CA key must be an EC key")
        td = trust_domain_of_ca(cert)
        if td is None:
            raise CredentialError(f"{cert_path}: CA certificate has no spiffe://<td> URI SAN")
        return cls(td, cert, key, chain)

    @classmethod
    def load_or_generate(cls, directory: Path, trust_domain: str) -> CertificateAuthority:
        """Load the CA kept in ``directory``, or make a root there on first start."""
        cert_path, key_path = directory / CERT_FILE, directory / KEY_FILE
        chain_path = directory / CHAIN_FILE
        if cert_path.exists() or key_path.exists():
            ca = cls.load(cert_path, key_path, chain_path if chain_path.exists() else None)
            if ca.trust_domain != trust_domain:
                raise CredentialError(
                    f"{cert_path}: CA is for trust domain '{ca.trust_domain}', not '{trust_domain}'"
                )
            return ca
        ca = cls.generate_root(trust_domain)
        ca.save(directory)
        return ca

    def save(self, directory: Path) -> None:
        """Write certificate, key (mode 0600) and chain into ``directory`` (mode 0700)."""
        if self.private_key is None:
            raise CredentialError("cannot save a CA without its private key")
        try:
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(directory, 0o700)
            write_atomic(directory / KEY_FILE, key_pem(self.private_key), 0o600)
            write_atomic(directory / CERT_FILE, _pem(self.certificate), 0o644)
            if self.chain:
                write_atomic(directory / CHAIN_FILE, certs_pem(self.chain), 0o644)
            else:
                (directory / CHAIN_FILE).unlink(missing_ok=True)
        except OSError as exc:
            raise CredentialError(f"cannot save CA into {directory}: {exc}") from exc

    # ---- issuing ------------------------------------------------------------------

    def issue_intermediate(
        self, ttl: timedelta, public_key: ec.EllipticCurvePublicKey | None = None
    ) -> CertificateAuthority:
        """An intermediate CA of this trust domain (pathlen 0, name-constrained).

        Without ``public_key`` a new key pair is made and the result can sign; with it
        (somebody else's key) the result holds only the certificate.
        """
        key = new_key() if public_key is None else None
        pub = key.public_key() if key is not None else public_key
        assert pub is not None
        cert = self._sign_intermediate(pub, ttl)
        return CertificateAuthority(self.trust_domain, cert, key, (self.certificate, *self.chain))

    def sign_intermediate_csr(
        self, csr: x509.CertificateSigningRequest, ttl: timedelta
    ) -> x509.Certificate:
        """Sign an intermediate for the key in ``csr`` (a host enrolling with us).

        Only the CSR's key is used: its subject and extensions are ignored, so a
        requester cannot ask for more than an intermediate of our trust domain.
        """
        if not csr.is_signature_valid:
            raise CredentialError("CSR signature is invalid")
        pub = csr.public_key()
        if not isinstance(pub, ec.EllipticCurvePublicKey):
            raise CredentialError("CSR key must be an EC key")
        return self._sign_intermediate(pub, ttl)

    def issue_x509_svid(self, spiffe_id: SpiffeId | str, ttl: timedelta) -> X509Svid:
        """A leaf X509-SVID for ``spiffe_id``, valid for ``ttl`` (capped by this CA)."""
        key = new_key()
        cert = self.sign_x509_svid(spiffe_id, ttl, key.public_key())
        sid = as_spiffe_id(spiffe_id)
        return X509Svid(
            spiffe_id=sid,
            certificate=cert,
            private_key=key,
            chain=self.intermediates(),
            serial=cert.serial_number,
            not_after=cert.not_valid_after_utc,  # second precision, as encoded
        )

    def sign_x509_svid_csr(
        self, spiffe_id: SpiffeId | str, ttl: timedelta, csr: x509.CertificateSigningRequest
    ) -> x509.Certificate:
        """An X509-SVID for the key in ``csr`` (the key never leaves its owner).

        Only the CSR's key is used, after checking its self-signature; its
        subject and extensions are ignored.
        """
        if not csr.is_signature_valid:
            raise CredentialError("the certificate request's signature does not verify")
        public = csr.public_key()
        if not isinstance(public, ec.EllipticCurvePublicKey):
            raise CredentialError("the certificate request must carry an EC key")
        return self.sign_x509_svid(spiffe_id, ttl, public)

    def sign_x509_svid(
        self, spiffe_id: SpiffeId | str, ttl: timedelta, public_key: ec.EllipticCurvePublicKey
    ) -> x509.Certificate:
        """The certificate of an X509-SVID for ``public_key``."""
        sid = as_spiffe_id(spiffe_id)
        if not sid.member_of(self.trust_domain):
            raise CredentialError(f"{sid} is not in trust domain '{self.trust_domain}'")
        if not sid.path:
            raise CredentialError(f"{sid}: an X509-SVID needs a SPIFFE ID with a path")
        signer = self._signer()
        serial = new_serial()
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(serial)
            .not_valid_before(max(now - _BACKDATE, self.certificate.not_valid_before_utc))
            .not_valid_after(self._cap(now + ttl))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, cert_sign=False), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(sid.uri)]),
                critical=False,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
            .add_extension(_aki(self.certificate), critical=False)
        )
        try:
            return builder.sign(signer, hashes.SHA256())
        except (ValueError, TypeError) as exc:
            raise CredentialError(f"cannot sign X509-SVID for {sid}: {exc}") from exc

    def sign_tls_server(
        self,
        spiffe_id: SpiffeId | str,
        names: Sequence[str],
        ttl: timedelta,
        public_key: ec.EllipticCurvePublicKey,
    ) -> x509.Certificate:
        """A TLS server certificate: an SVID that also names the server's hosts.

        gRPC clients check the server's DNS name or IP address, which an
        X509-SVID does not carry; this certificate has the SPIFFE ID and each of
        ``names`` (an IP address or a DNS name) as SANs, and only serverAuth.
        """
        sid = as_spiffe_id(spiffe_id)
        signer = self._signer()
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(sid.uri)]
        for name in names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.certificate.subject)
            .public_key(public_key)
            .serial_number(new_serial())
            .not_valid_before(max(now - _BACKDATE, self.certificate.not_valid_before_utc))
            .not_valid_after(self._cap(now + ttl))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(digital_signature=True, cert_sign=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
        )
        try:
            return builder.sign(signer, hashes.SHA256())
        except (ValueError, TypeError) as exc:
            raise CredentialError(f"cannot sign TLS server certificate for {sid}: {exc}") from exc

    # ---- trust --------------------------------------------------------------------

    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """Certificates a leaf we sign must carry: this CA and those above, minus the root."""
        if not self.chain:
            return ()
        return (self.certificate, *self.chain[:-1])

    def bundle(self) -> list[x509.Certificate]:
        """The trust anchors (root) of this trust domain."""
        return [self.chain[-1]] if self.chain else [self.certificate]

    # ---- helpers ------------------------------------------------------------------

    def _signer(self) -> ec.EllipticCurvePrivateKey:
        if self.private_key is None:
            raise CredentialError("this CA has no private key and cannot sign")
        return self.private_key

    def _cap(self, not_after: datetime) -> datetime:
        """No certificate outlives its issuer: a verifier would reject it after that."""
        return min(not_after, self.certificate.not_valid_after_utc)

    def _sign_intermediate(
        self, pub: ec.EllipticCurvePublicKey, ttl: timedelta
    ) -> x509.Certificate:
        signer = self._signer()
        now = _now()
        builder = (
            x509.CertificateBuilder()
            .subject_name(_ca_name(self.trust_domain, "intermediate"))
            .issuer_name(self.certificate.subject)
            .public_key(pub)
            .serial_number(new_serial())
            .not_valid_before(max(now - _BACKDATE, self.certificate.not_valid_before_utc))
            .not_valid_after(self._cap(now + ttl))
        )
        builder = _ca_extensions(builder, self.trust_domain, pub, self.certificate, 0)
        builder = builder.add_extension(
            x509.NameConstraints(
                permitted_subtrees=[x509.UniformResourceIdentifier(self.trust_domain)],
                excluded_subtrees=None,
            ),
            critical=True,
        )
        try:
            return builder.sign(signer, hashes.SHA256())
        except (ValueError, TypeError) as exc:
            raise CredentialError(f"cannot sign intermediate CA: {exc}") from exc


def trust_domain_of_ca(cert: x509.Certificate) -> str | None:
    """The trust domain a signing certificate names in its ``spiffe://<td>`` URI SAN."""
    for uri in uri_sans(cert):
        try:
            sid = parse_spiffe_id(uri)
        except ValueError:
            continue
        if not sid.path:
            return sid.trust_domain
    return None


def verify_svid(
    leaf: x509.Certificate,
    chain: Sequence[x509.Certificate],
    roots: Sequence[x509.Certificate],
    at: datetime | None = None,
) -> SpiffeId:
    """Verify an X509-SVID up to one of ``roots`` and return its SPIFFE ID.

    Checks the leaf against the X509-SVID rules, then each link: the issuer's name and
    signature, validity at ``at`` (default now), ``CA:true`` with ``keyCertSign``, path
    length limits, URI name constraints, and that a root naming a trust domain names
    the leaf's.  Raises :class:`CredentialError` saying what failed.
    """
    when = at or _now()
    sid = _check_leaf(leaf)
    path = [leaf]
    remaining = list(chain)
    anchor: x509.Certificate | None = None
    while anchor is None:
        child = path[-1]
        root = _find_issuer(child, roots)
        if root is not None:
            anchor = root
            break
        if not remaining:
            raise CredentialError(f"{sid}: no path from the SVID to a trusted root")
        issuer = remaining.pop(0)
        _check_signed_by(child, issuer, sid)
        path.append(issuer)
    full = [*path, anchor]
    for depth, cert in enumerate(full):
        _check_validity(cert, when, sid)
        if depth == 0:
            continue
        _check_signing_cert(cert, depth - 1, sid)
        _check_name_constraints(cert, sid)
    anchor_td = trust_domain_of_ca(anchor)
    if anchor_td is not None and anchor_td != sid.trust_domain:
        raise CredentialError(f"{sid}: trusted root is for trust domain '{anchor_td}'")
    return sid


# ---- module helpers --------------------------------------------------------------------


def as_spiffe_id(value: SpiffeId | str) -> SpiffeId:
    """A SpiffeId from either form; a malformed one is a CredentialError."""
    if isinstance(value, SpiffeId):
        return value
    try:
        return parse_spiffe_id(value)
    except ValueError as exc:
        raise CredentialError(str(exc)) from exc


def _same_public_key(cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)


def _ca_name(trust_domain: str, role: str) -> x509.Name:
    # CN is limited to 64 characters, a trust domain is not: keep it out of the subject.
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"sidecar {role} CA"),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, secrets.token_hex(8)),
        ]
    )


def _key_usage(*, digital_signature: bool, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _aki(issuer: x509.Certificate | ec.EllipticCurvePublicKey) -> x509.AuthorityKeyIdentifier:
    if isinstance(issuer, x509.Certificate):
        try:
            ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
        except x509.ExtensionNotFound:
            pub = issuer.public_key()
            assert isinstance(pub, ec.EllipticCurvePublicKey)
            return x509.AuthorityKeyIdentifier.from_issuer_public_key(pub)
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer)


def _ca_extensions(
    builder: x509.CertificateBuilder,
    trust_domain: str,
    public_key: ec.EllipticCurvePublicKey,
    issuer: x509.Certificate | ec.EllipticCurvePublicKey,
    path_length: int | None,
) -> x509.CertificateBuilder:
    return (
        builder.add_extension(x509.BasicConstraints(ca=True, path_length=path_length), True)
        .add_extension(_key_usage(digital_signature=False, cert_sign=True), critical=True)
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")]
            ),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(issuer), critical=False)
    )


def _check_leaf(leaf: x509.Certificate) -> SpiffeId:
    uris = uri_sans(leaf)
    if len(uris) != 1:
        raise CredentialError(f"an X509-SVID must have exactly one URI SAN, found {len(uris)}")
    try:
        sid = parse_spiffe_id(uris[0])
    except ValueError as exc:
        raise CredentialError(f"X509-SVID URI SAN: {exc}") from exc
    if not sid.path:
        raise CredentialError(f"{sid}: a leaf X509-SVID must have a path")
    bc = _basic_constraints(leaf)
    if bc is not None and bc.ca:
        raise CredentialError(f"{sid}: a leaf X509-SVID must not be a CA")
    ku = _key_usage_of(leaf)
    if ku is None or not ku.digital_signature:
        raise CredentialError(f"{sid}: a leaf X509-SVID needs key usage digitalSignature")
    if ku.key_cert_sign or ku.crl_sign:
        raise CredentialError(f"{sid}: a leaf X509-SVID must not have keyCertSign or cRLSign")
    return sid


def _basic_constraints(cert: x509.Certificate) -> x509.BasicConstraints | None:
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        return None


def _key_usage_of(cert: x509.Certificate) -> x509.KeyUsage | None:
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return None


def _find_issuer(
    child: x509.Certificate, candidates: Sequence[x509.Certificate]
) -> x509.Certificate | None:
    for cand in candidates:
        if cand.subject != child.issuer:
            continue
        try:
            child.verify_directly_issued_by(cand)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return cand
    return None


def _check_signed_by(child: x509.Certificate, issuer: x509.Certificate, sid: SpiffeId) -> None:
    try:
        child.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise CredentialError(
            f"{sid}: certificate serial {child.serial_number:x} is not signed by the next "
            f"certificate in the chain: {exc or type(exc).__name__}"
        ) from exc


def _check_validity(cert: x509.Certificate, when: datetime, sid: SpiffeId) -> None:
    if when < cert.not_valid_before_utc:
        raise CredentialError(
            f"{sid}: certificate serial {cert.serial_number:x} is not valid before "
            f"{cert.not_valid_before_utc.isoformat()}"
        )
    if when > cert.not_valid_after_utc:
        raise CredentialError(
            f"{sid}: certificate serial {cert.serial_number:x} expired at "
            f"{cert.not_valid_after_utc.isoformat()}"
        )


def _check_signing_cert(cert: x509.Certificate, cas_below: int, sid: SpiffeId) -> None:
    bc = _basic_constraints(cert)
    if bc is None or not bc.ca:
        raise CredentialError(
            f"{sid}: issuer serial {cert.serial_number:x} is not a CA (basicConstraints)"
        )
    ku = _key_usage_of(cert)
    if ku is not None and not ku.key_cert_sign:
        raise CredentialError(f"{sid}: issuer serial {cert.serial_number:x} lacks keyCertSign")
    if bc.path_length is not None and cas_below > bc.path_length:
        raise CredentialError(
            f"{sid}: issuer serial {cert.serial_number:x} allows {bc.path_length} CAs "
            f"below it, the chain has {cas_below}"
        )


def _check_name_constraints(cert: x509.Certificate, sid: SpiffeId) -> None:
    try:
        nc = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return
    host = sid.trust_domain
    if nc.permitted_subtrees is not None:
        permitted = [
            n.value for n in nc.permitted_subtrees if isinstance(n, x509.UniformResourceIdentifier)
        ]
        if permitted and not any(_host_matches(host, p) for p in permitted):
            raise CredentialError(
                f"{sid}: outside the URI name constraints of issuer serial {cert.serial_number:x}"
            )
    if nc.excluded_subtrees is not None:
        for n in nc.excluded_subtrees:
            if isinstance(n, x509.UniformResourceIdentifier) and _host_matches(host, n.value):
                raise CredentialError(
                    f"{sid}: excluded by the name constraints of issuer "
                    f"serial {cert.serial_number:x}"
                )


def _host_matches(host: str, constraint: str) -> bool:
    """RFC 5280 URI constraint: ``td`` matches that host, ``.td`` its sub-domains."""
    if constraint.startswith("."):
        return host.endswith(constraint)
    return host == constraint
