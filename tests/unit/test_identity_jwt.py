"""JWT-SVIDs follow the JWT-SVID spec; validation rejects what the spec says to reject."""

from __future__ import annotations

import base64
import json
import time
from datetime import timedelta
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from sidecar.identity.jwt import MAX_TTL, JwtAuthority
from sidecar.util.errors import CredentialError

TD = "example.org"
AGENT = "spiffe://example.org/agent/planner"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _decode(segment: str) -> dict[str, Any]:
    value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    assert isinstance(value, dict)
    return value


def _sign(key: ec.EllipticCurvePrivateKey, header: dict[str, Any], claims: dict[str, Any]) -> str:
    """A hand-made ES256 token, to present what JwtAuthority would never issue."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(hashes.SHA256())))
    return f"{signing_input}.{_b64(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_token_header_names_es256_its_key_id_and_jwt_type() -> None:
    authority = JwtAuthority(TD)
    header = _decode(authority.issue(AGENT, ["reports"]).split(".")[0])
    assert header == {"alg": "ES256", "kid": authority.key_id, "typ": "JWT"}


def test_token_claims_carry_subject_audience_and_expiry() -> None:
    authority = JwtAuthority(TD)
    before = int(time.time())
    claims = _decode(authority.issue(AGENT, ["reports"], ttl=timedelta(minutes=2)).split(".")[1])
    assert claims["sub"] == AGENT
    assert claims["aud"] == ["reports"]
    assert before <= claims["iat"] <= int(time.time())
    assert claims["exp"] == claims["iat"] + 120


def test_lifetime_longer_than_five_minutes_is_capped() -> None:
    authority = JwtAuthority(TD)
    claims = _decode(authority.issue(AGENT, ["reports"], ttl=timedelta(hours=1)).split(".")[1])
    assert claims["exp"] - claims["iat"] == int(MAX_TTL.total_seconds())


def test_validate_returns_the_claims_of_a_good_token() -> None:
    authority = JwtAuthority(TD)
    claims = authority.validate(authority.issue(AGENT, ["reports", "billing"]), "billing")
    assert claims["sub"] == AGENT


def test_validate_rejects_another_audience() -> None:
    authority = JwtAuthority(TD)
    with pytest.raises(CredentialError, match="audience"):
        authority.validate(authority.issue(AGENT, ["reports"]), "billing")


def test_validate_rejects_an_expired_token() -> None:
    now = [1_800_000_000.0]
    authority = JwtAuthority(TD, clock=lambda: now[0])
    token = authority.issue(AGENT, ["reports"], ttl=timedelta(seconds=1))
    exp = _decode(token.split(".")[1])["exp"]
    assert exp == 1_800_000_001
    now[0] = exp  # the last valid second
    assert authority.validate(token, "reports")["sub"] == AGENT
    now[0] = exp + 0.5
    with pytest.raises(CredentialError, match="expired"):
        authority.validate(token, "reports")


def test_validate_rejects_a_token_whose_claims_were_changed() -> None:
    authority = JwtAuthority(TD)
    header, _claims, sig = authority.issue(AGENT, ["reports"]).split(".")
    forged = _b64(json.dumps({"sub": AGENT, "aud": ["admin"], "exp": 2**40}).encode())
    with pytest.raises(CredentialError, match="signature"):
        authority.validate(f"{header}.{forged}.{sig}", "admin")


def test_validate_rejects_a_token_signed_by_another_key_under_a_known_kid() -> None:
    authority = JwtAuthority(TD)
    claims = {"sub": AGENT, "aud": ["reports"], "exp": int(time.time()) + 60}
    token = _sign(
        ec.generate_private_key(ec.SECP256R1()),
        {"alg": "ES256", "kid": authority.key_id, "typ": "JWT"},
        claims,
    )
    with pytest.raises(CredentialError, match="signature"):
        authority.validate(token, "reports")


def test_validate_rejects_an_unknown_key_id() -> None:
    authority = JwtAuthority(TD)
    other = JwtAuthority(TD)
    with pytest.raises(CredentialError, match="key id"):
        authority.validate(other.issue(AGENT, ["reports"]), "reports")


def test_validate_rejects_alg_none() -> None:
    authority = JwtAuthority(TD)
    header = _b64(json.dumps({"alg": "none", "kid": authority.key_id}).encode())
    claims = _b64(json.dumps({"sub": AGENT, "aud": ["r"], "exp": 2**40}).encode())
    with pytest.raises(CredentialError, match="algorithm"):
        authority.validate(f"{header}.{claims}.", "r")


def test_validate_rejects_a_token_without_exp() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    authority = JwtAuthority(TD, private_key=key, key_id="k1")
    token = _sign(key, {"alg": "ES256", "kid": "k1"}, {"sub": AGENT, "aud": ["r"]})
    with pytest.raises(CredentialError, match="'exp'"):
        authority.validate(token, "r")


def test_validate_rejects_a_token_without_aud() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    authority = JwtAuthority(TD, private_key=key, key_id="k1")
    claims = {"sub": AGENT, "exp": int(time.time()) + 60}
    with pytest.raises(CredentialError, match="'aud'"):
        authority.validate(_sign(key, {"alg": "ES256", "kid": "k1"}, claims), "r")


def test_validate_rejects_headers_the_spec_forbids() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    authority = JwtAuthority(TD, private_key=key, key_id="k1")
    claims = {"sub": AGENT, "aud": ["r"], "exp": int(time.time()) + 60}
    header = {"alg": "ES256", "kid": "k1", "jku": "https://evil.example/keys"}
    with pytest.raises(CredentialError, match="forbids"):
        authority.validate(_sign(key, header, claims), "r")


def test_validate_rejects_a_subject_of_another_trust_domain() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    authority = JwtAuthority(TD, private_key=key, key_id="k1")
    claims = {"sub": "spiffe://other.org/x", "aud": ["r"], "exp": int(time.time()) + 60}
    with pytest.raises(CredentialError, match="not in"):
        authority.validate(_sign(key, {"alg": "ES256", "kid": "k1"}, claims), "r")


def test_issue_refuses_a_subject_of_another_trust_domain() -> None:
    with pytest.raises(CredentialError, match="not in trust domain"):
        JwtAuthority(TD).issue("spiffe://other.org/x", ["r"])


def test_issue_requires_an_audience() -> None:
    with pytest.raises(CredentialError, match="audience"):
        JwtAuthority(TD).issue(AGENT, [])


def test_tokens_signed_before_a_rotation_still_validate() -> None:
    authority = JwtAuthority(TD)
    old = authority.issue(AGENT, ["r"])
    old_kid = authority.key_id
    new_kid = authority.rotate()
    assert new_kid != old_kid
    assert authority.validate(old, "r")["sub"] == AGENT
    authority.retire(old_kid)
    with pytest.raises(CredentialError, match="key id"):
        authority.validate(old, "r")


def test_jwks_publishes_each_key_for_jwt_svid_use() -> None:
    authority = JwtAuthority(TD)
    authority.rotate()
    keys = authority.jwks()["keys"]
    assert len(keys) == 2
    assert {k["kid"] for k in keys} >= {authority.key_id}
    for jwk in keys:
        assert jwk["kty"] == "EC" and jwk["crv"] == "P-256" and jwk["use"] == "jwt-svid"


def test_jwks_key_verifies_a_token_independently() -> None:
    authority = JwtAuthority(TD)
    token = authority.issue(AGENT, ["r"])
    (jwk,) = [k for k in authority.jwks()["keys"] if k["kid"] == authority.key_id]

    def coord(v: str) -> int:
        return int.from_bytes(base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)), "big")

    pub = ec.EllipticCurvePublicNumbers(coord(jwk["x"]), coord(jwk["y"]), ec.SECP256R1())
    h, c, s = token.split(".")
    raw = base64.urlsafe_b64decode(s + "=" * (-len(s) % 4))
    der = encode_dss_signature(int.from_bytes(raw[:32], "big"), int.from_bytes(raw[32:], "big"))
    pub.public_key().verify(der, f"{h}.{c}".encode(), ec.ECDSA(hashes.SHA256()))
