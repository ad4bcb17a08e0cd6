"""The CA and X509-SVIDs follow the SPIFFE X509-SVID rules, and verification holds them to it."""

from __future__ import annotations

import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.identity.spiffeid import parse_spiffe_id
from sidecar.identity.x509 import (
    CertificateAuthority,
    certs_pem,
    key_pem,
    new_csr,
    new_key,
    uri_sans,
    verify_svid,
)
from sidecar.util.errors import CredentialError

TD = "example.org"
AGENT = "spiffe://example.org/agent/planner"


@pytest.fixture(scope="module")
def root() -> CertificateAuthority:
    return CertificateAuthority.generate_root(TD, ttl=timedelta(days=2))


@pytest.fixture(scope="module")
def intermediate(root: CertificateAuthority) -> CertificateAuthority:
    return root.issue_intermediate(timedelta(days=1))


def _ext(
    cert: x509.Certificate, cls: type[x509.ExtensionType]
) -> x509.Extension[x509.ExtensionType]:
    return cert.extensions.get_extension_for_class(cls)


def test_leaf_svid_has_exactly_one_uri_san_equal_to_its_spiffe_id(
    intermediate: CertificateAuthority,
) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    assert uri_sans(svid.certificate) == [AGENT]
    assert str(svid.spiffe_id) == AGENT


def test_leaf_svid_is_not_a_ca(intermediate: CertificateAuthority) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    bc = _ext(svid.certificate, x509.BasicConstraints)
    assert isinstance(bc.value, x509.BasicConstraints)
    assert bc.value.ca is False


def test_leaf_svid_key_usage_is_critical_digital_signature_only(
    intermediate: CertificateAuthority,
) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    ku = _ext(svid.certificate, x509.KeyUsage)
    assert ku.critical is True
    assert isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature is True
    assert ku.value.key_cert_sign is False
    assert ku.value.crl_sign is False


def test_leaf_svid_extended_key_usage_allows_server_and_client_auth(
    intermediate: CertificateAuthority,
) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    eku = _ext(svid.certificate, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}


def test_leaf_svid_serial_is_positive_random_and_at_most_128_bits(
    intermediate: CertificateAuthority,
) -> None:
    serials = {intermediate.issue_x509_svid(AGENT, timedelta(minutes=5)).serial for _ in range(8)}
    assert len(serials) == 8
    assert all(0 < s < 2**128 for s in serials)


def test_leaf_svid_serial_field_matches_the_certificate(intermediate: CertificateAuthority) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    assert svid.serial == svid.certificate.serial_number
    assert svid.not_after == svid.certificate.not_valid_after_utc


def test_leaf_svid_key_is_p256_and_matches_the_certificate(
    intermediate: CertificateAuthority,
) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    pub = svid.certificate.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert isinstance(pub.curve, ec.SECP256R1)
    assert pub.public_numbers() == svid.private_key.public_key().public_numbers()


def test_leaf_svid_ttl_is_the_requested_one(intermediate: CertificateAuthority) -> None:
    before = datetime.now(UTC)
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    assert (
        before + timedelta(minutes=4) < svid.not_after <= datetime.now(UTC) + timedelta(minutes=5)
    )


def test_leaf_svid_never_outlives_its_issuer(intermediate: CertificateAuthority) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(days=30))
    assert svid.not_after == intermediate.certificate.not_valid_after_utc


def test_intermediate_is_a_pathlen_zero_ca_named_by_its_trust_domain(
    intermediate: CertificateAuthority,
) -> None:
    cert = intermediate.certificate
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical is True
    assert isinstance(bc.value, x509.BasicConstraints)
    assert bc.value.ca is True and bc.value.path_length == 0
    ku = _ext(cert, x509.KeyUsage).value
    assert isinstance(ku, x509.KeyUsage)
    assert ku.key_cert_sign is True and ku.digital_signature is False
    assert uri_sans(cert) == [f"spiffe://{TD}"]


def test_intermediate_is_name_constrained_to_its_trust_domain(
    intermediate: CertificateAuthority,
) -> None:
    nc = _ext(intermediate.certificate, x509.NameConstraints)
    assert nc.critical is True
    assert isinstance(nc.value, x509.NameConstraints)
    assert nc.value.permitted_subtrees == [x509.UniformResourceIdentifier(TD)]


def test_svid_chain_carries_the_intermediate_but_not_the_root(
    root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    assert svid.chain == (intermediate.certificate,)
    assert intermediate.bundle() == [root.certificate]
    pems = x509.load_pem_x509_certificates(svid.cert_chain_pem())
    assert pems == [svid.certificate, intermediate.certificate]


def test_svid_from_root_has_an_empty_chain(root: CertificateAuthority) -> None:
    svid = root.issue_x509_svid(AGENT, timedelta(minutes=5))
    assert svid.chain == ()
    assert verify_svid(svid.certificate, svid.chain, root.bundle()) == parse_spiffe_id(AGENT)


def test_key_pem_loads_back_to_the_same_key(intermediate: CertificateAuthority) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    key = serialization.load_pem_private_key(svid.key_pem(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.private_numbers() == svid.private_key.private_numbers()


def test_chain_through_an_intermediate_verifies_against_the_root(
    root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    assert verify_svid(svid.certificate, svid.chain, root.bundle()) == parse_spiffe_id(AGENT)


def test_verification_fails_without_the_intermediate(
    root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    with pytest.raises(CredentialError, match="no path"):
        verify_svid(svid.certificate, [], root.bundle())


def test_verification_rejects_roots_of_another_trust_domain(
    intermediate: CertificateAuthority,
) -> None:
    other = CertificateAuthority.generate_root("other.org")
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    with pytest.raises(CredentialError):
        verify_svid(svid.certificate, svid.chain, other.bundle())


def test_ca_refuses_to_issue_for_another_trust_domain(intermediate: CertificateAuthority) -> None:
    with pytest.raises(CredentialError, match="not in trust domain"):
        intermediate.issue_x509_svid("spiffe://other.org/agent", timedelta(minutes=5))


def test_verification_rejects_a_leaf_outside_the_intermediates_name_constraint(
    root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    # Forge what a stolen intermediate key could sign: a leaf for another trust domain.
    assert intermediate.private_key is not None
    leaf = _leaf(intermediate.certificate, intermediate.private_key, "spiffe://other.org/x")
    with pytest.raises(CredentialError, match="name constraints"):
        verify_svid(leaf, [intermediate.certificate], root.bundle())


def test_verification_rejects_a_root_naming_another_trust_domain() -> None:
    other = CertificateAuthority.generate_root("other.org")
    assert other.private_key is not None
    leaf = _leaf(other.certificate, other.private_key, AGENT)
    with pytest.raises(CredentialError, match=r"trust domain 'other\.org'"):
        verify_svid(leaf, [], other.bundle())


def test_verification_rejects_an_expired_svid(
    root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    svid = intermediate.issue_x509_svid(AGENT, timedelta(minutes=5))
    later = svid.not_after + timedelta(seconds=1)
    with pytest.raises(CredentialError, match="expired"):
        verify_svid(svid.certificate, svid.chain, root.bundle(), at=later)


def test_verification_rejects_an_expired_intermediate(root: CertificateAuthority) -> None:
    short = root.issue_intermediate(timedelta(hours=1))
    svid = short.issue_x509_svid(AGENT, timedelta(minutes=5))
    at = short.certificate.not_valid_after_utc + timedelta(seconds=1)
    with pytest.raises(CredentialError, match="expired"):
        verify_svid(svid.certificate, svid.chain, root.bundle(), at=at)


def test_verification_rejects_an_issuer_that_is_not_a_ca(root: CertificateAuthority) -> None:
    # A leaf SVID's key signing another leaf must not be accepted as an issuer.
    parent = root.issue_x509_svid("spiffe://example.org/parent", timedelta(minutes=5))
    leaf = _leaf(parent.certificate, parent.private_key, AGENT)
    with pytest.raises(CredentialError, match="not a CA"):
        verify_svid(leaf, [parent.certificate], root.bundle())


def test_verification_rejects_a_tampered_signature(
    root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    imposter = CertificateAuthority(
        TD,
        intermediate.certificate,
        None,
        intermediate.chain,
    )
    # Same issuer name and intermediates, but signed by a key the intermediate does not hold.
    leaf = _leaf(imposter.certificate, new_key(), AGENT)
    with pytest.raises(CredentialError, match="not signed"):
        verify_svid(leaf, [intermediate.certificate], root.bundle())


def test_verification_rejects_a_leaf_with_two_uri_sans(root: CertificateAuthority) -> None:
    assert root.private_key is not None
    leaf = _leaf(root.certificate, root.private_key, AGENT, extra_uri="spiffe://example.org/b")
    with pytest.raises(CredentialError, match="exactly one URI SAN"):
        verify_svid(leaf, [], root.bundle())


def test_verification_rejects_a_leaf_that_is_a_ca(root: CertificateAuthority) -> None:
    assert root.private_key is not None
    leaf = _leaf(root.certificate, root.private_key, AGENT, ca=True)
    with pytest.raises(CredentialError, match="must not be a CA"):
        verify_svid(leaf, [], root.bundle())


def test_intermediate_for_a_foreign_key_holds_no_private_key_and_cannot_sign(
    root: CertificateAuthority,
) -> None:
    host_key = new_key()
    ca = root.issue_intermediate(timedelta(hours=1), public_key=host_key.public_key())
    assert ca.private_key is None
    pub = ca.certificate.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert pub.public_numbers() == host_key.public_key().public_numbers()
    with pytest.raises(CredentialError, match="cannot sign"):
        ca.issue_x509_svid(AGENT, timedelta(minutes=1))


def test_intermediate_signed_from_a_csr_issues_svids_that_verify(
    root: CertificateAuthority,
) -> None:
    host_key = new_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "host-1")]))
        .sign(host_key, hashes.SHA256())
    )
    cert = root.sign_intermediate_csr(csr, timedelta(hours=1))
    host_ca = CertificateAuthority(TD, cert, host_key, (root.certificate,))
    svid = host_ca.issue_x509_svid(AGENT, timedelta(minutes=1))
    assert verify_svid(svid.certificate, svid.chain, host_ca.bundle()) == parse_spiffe_id(AGENT)
    bc = _ext(cert, x509.BasicConstraints).value
    assert isinstance(bc, x509.BasicConstraints)
    assert bc.ca is True and bc.path_length == 0


def test_load_or_generate_keeps_the_key_private_and_returns_the_same_ca(tmp_path: Path) -> None:
    directory = tmp_path / "ca"
    first = CertificateAuthority.load_or_generate(directory, TD)
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "ca.key").stat().st_mode) == 0o600
    second = CertificateAuthority.load_or_generate(directory, TD)
    assert second.certificate == first.certificate
    assert second.trust_domain == TD
    svid = second.issue_x509_svid(AGENT, timedelta(minutes=1))
    assert verify_svid(svid.certificate, svid.chain, first.bundle()) == parse_spiffe_id(AGENT)


def test_load_or_generate_refuses_a_ca_of_another_trust_domain(tmp_path: Path) -> None:
    CertificateAuthority.load_or_generate(tmp_path / "ca", TD)
    with pytest.raises(CredentialError, match=r"not 'other\.org'"):
        CertificateAuthority.load_or_generate(tmp_path / "ca", "other.org")


def test_saved_intermediate_loads_with_its_chain(
    tmp_path: Path, root: CertificateAuthority, intermediate: CertificateAuthority
) -> None:
    intermediate.save(tmp_path)
    loaded = CertificateAuthority.load(
        tmp_path / "ca.pem", tmp_path / "ca.key", tmp_path / "chain.pem"
    )
    assert loaded.chain == (root.certificate,)
    assert loaded.bundle() == [root.certificate]


def test_load_of_a_missing_file_is_a_credential_error(tmp_path: Path) -> None:
    with pytest.raises(CredentialError, match="cannot load CA"):
        CertificateAuthority.load(tmp_path / "nope.pem", tmp_path / "nope.key")


def test_load_refuses_a_key_that_does_not_match_the_certificate(
    tmp_path: Path, root: CertificateAuthority
) -> None:
    root.save(tmp_path)
    other = CertificateAuthority.generate_root(TD)
    assert other.private_key is not None
    (tmp_path / "ca.key").write_bytes(
        other.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    with pytest.raises(CredentialError, match="does not match"):
        CertificateAuthority.load(tmp_path / "ca.pem", tmp_path / "ca.key")


def _leaf(
    issuer: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    uri: str,
    *,
    extra_uri: str | None = None,
    ca: bool = False,
) -> x509.Certificate:
    """A hand-made leaf, to present what our CA would never issue."""
    leaf_key = new_key()
    now = datetime.now(UTC)
    uris = [x509.UniformResourceIdentifier(uri)]
    if extra_uri:
        uris.append(x509.UniformResourceIdentifier(extra_uri))
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "SPIFFE")]))
        .issuer_name(issuer.subject)
        .public_key(leaf_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=1))
        .not_valid_after(now + timedelta(minutes=5))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
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
        .add_extension(x509.SubjectAlternativeName(uris), critical=False)
        .sign(key, hashes.SHA256())
    )


# ---- the one home of certificate, request and key building ---------------------------


def test_tls_server_certificate_carries_the_spiffe_id_and_each_host_name(
    root: CertificateAuthority,
) -> None:
    key = new_key()
    names = ("127.0.0.1", "::1", "collector.example.org")
    cert = root.sign_tls_server(
        "spiffe://example.org/collector", names, timedelta(days=30), key.public_key()
    )
    san = _ext(cert, x509.SubjectAlternativeName)
    assert san.critical is True  # the subject is empty: the SANs are the whole name
    assert isinstance(san.value, x509.SubjectAlternativeName)
    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [
        "spiffe://example.org/collector"
    ]
    assert [str(a) for a in san.value.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert san.value.get_values_for_type(x509.DNSName) == ["collector.example.org"]
    assert cert.subject == x509.Name([])
    assert cert.issuer == root.certificate.subject
    eku = _ext(cert, x509.ExtendedKeyUsage).value
    assert isinstance(eku, x509.ExtendedKeyUsage)
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    bc = _ext(cert, x509.BasicConstraints)
    assert bc.critical is True and isinstance(bc.value, x509.BasicConstraints)
    assert bc.value.ca is False
    ku = _ext(cert, x509.KeyUsage)
    assert ku.critical is True and isinstance(ku.value, x509.KeyUsage)
    assert ku.value.digital_signature and not ku.value.key_cert_sign and not ku.value.crl_sign
    # Never outlives its issuer (the root lives two days; thirty were asked).
    assert cert.not_valid_after_utc == root.certificate.not_valid_after_utc
    cert.verify_directly_issued_by(root.certificate)


def test_tls_server_certificate_needs_a_ca_that_can_sign(root: CertificateAuthority) -> None:
    ca = root.issue_intermediate(timedelta(hours=1), public_key=new_key().public_key())
    with pytest.raises(CredentialError, match="cannot sign"):
        ca.sign_tls_server(
            "spiffe://example.org/collector", (), timedelta(hours=1), new_key().public_key()
        )


def test_collector_server_credentials_are_its_key_and_its_chain_up_to_the_root(
    intermediate: CertificateAuthority,
) -> None:
    from sidecar.collector.tls import roots_pem, server_credentials

    key_pem_, chain_pem = server_credentials(intermediate, ("localhost",), timedelta(hours=1))
    key = serialization.load_pem_private_key(key_pem_, None)
    chain = x509.load_pem_x509_certificates(chain_pem)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert chain[0].public_key() == key.public_key()
    assert chain[1:] == list(intermediate.intermediates())
    assert uri_sans(chain[0]) == ["spiffe://example.org/collector"]
    assert x509.load_pem_x509_certificates(roots_pem(intermediate)) == intermediate.bundle()


def test_a_new_csr_asks_for_its_key_only_and_is_signed_for_that_key(
    root: CertificateAuthority,
) -> None:
    key = new_key()
    csr = x509.load_der_x509_csr(new_csr(key))
    assert csr.is_signature_valid
    assert csr.subject == x509.Name([])
    assert len(csr.extensions) == 0
    assert csr.public_key() == key.public_key()
    cert = root.sign_x509_svid_csr("spiffe://example.org/host/h1", timedelta(minutes=5), csr)
    assert cert.public_key() == key.public_key()


def test_pem_encodings_round_trip(root: CertificateAuthority) -> None:
    key = new_key()
    loaded = serialization.load_pem_private_key(key_pem(key), None)
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == key.private_numbers()
    assert key_pem(key).startswith(b"-----BEGIN PRIVATE KEY-----")  # PKCS#8, unencrypted
    other = CertificateAuthority.generate_root(TD).certificate
    certs = [root.certificate, other]
    assert x509.load_pem_x509_certificates(certs_pem(certs)) == certs
