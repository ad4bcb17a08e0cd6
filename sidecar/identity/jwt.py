"""JWT-SVIDs: a minimal ES256 JWS signer and validator, as the SPIFFE JWT-SVID spec defines them.

Why our own and not a JWT library: the JWT-SVID profile is a small, strict subset of
JOSE (compact serialization, one algorithm here, ``sub``/``aud``/``exp`` required), and
the classic JWT bugs come from the parts we leave out (``alg: none``, key confusion,
JSON serialization).  ``cryptography`` does the ECDSA; this module only frames it.

Tokens live at most :data:`MAX_TTL` (5 minutes): a bearer token cannot be revoked, so
its lifetime is the exposure window.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import secrets
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from sidecar.identity.spiffeid import SpiffeId, parse_trust_domain
from sidecar.identity.x509 import as_spiffe_id, new_key
from sidecar.util.errors import CredentialError

_logger = logging.getLogger(__name__)

MAX_TTL = timedelta(minutes=5)
ALGORITHM = "ES256"
JWK_USE = "jwt-svid"
_COORD_BYTES = 32  # P-256
_ALLOWED_HEADERS = frozenset({"alg", "kid", "typ"})


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64url(text: str) -> bytes:
    if not text or any(c in text for c in "=+/"):
        raise CredentialError("JWT segment is not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise CredentialError(f"JWT segment is not base64url: {exc}") from exc


def _json_segment(text: str, what: str) -> dict[str, Any]:
    try:
        value = json.loads(_unb64url(text))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CredentialError(f"JWT {what} is not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise CredentialError(f"JWT {what} is not a JSON object")
    return value


class JwtAuthority:
    """Signs and validates JWT-SVIDs for one trust domain with an EC P-256 key.

    Keys are kept by key id so that tokens signed before a :meth:`rotate` still
    validate until they expire; :meth:`jwks` publishes all of them.
    """

    def __init__(
        self,
        trust_domain: str,
        private_key: ec.EllipticCurvePrivateKey | None = None,
        key_id: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock  # seconds since the epoch; tests pass their own
        try:
            self.trust_domain = parse_trust_domain(trust_domain)
        except ValueError as exc:
            raise CredentialError(str(exc)) from exc
        self._keys: dict[str, ec.EllipticCurvePublicKey] = {}
        self._signing_key: ec.EllipticCurvePrivateKey
        self.key_id: str
        self._install(private_key or new_key(), key_id)

    def rotate(self) -> str:
        """Start signing with a fresh key; the old public key stays valid. Returns the new kid."""
        self._install(new_key(), None)
        return self.key_id

    def retire(self, key_id: str) -> None:
        """Stop accepting tokens signed with ``key_id`` (never the current key)."""
        if key_id == self.key_id:
            raise CredentialError("cannot retire the key currently used for signing")
        self._keys.pop(key_id, None)

    def issue(
        self,
        spiffe_id: SpiffeId | str,
        audience: Sequence[str],
        ttl: timedelta = MAX_TTL,
    ) -> str:
        """A compact JWS for ``spiffe_id`` and ``audience``; ``ttl`` is capped at 5 minutes."""
        sid = as_spiffe_id(spiffe_id)
        if not sid.member_of(self.trust_domain):
            raise CredentialError(f"{sid} is not in trust domain '{self.trust_domain}'")
        auds = [audience] if isinstance(audience, str) else list(audience)
        if not auds or not all(auds):
            raise CredentialError("a JWT-SVID needs at least one non-empty audience")
        if ttl <= timedelta(0):
            raise CredentialError("JWT-SVID lifetime must be positive")
        if ttl > MAX_TTL:
            _logger.debug("JWT-SVID ttl %s capped at %s", ttl, MAX_TTL)
            ttl = MAX_TTL
        now = int(self._clock())
        header = {"alg": ALGORITHM, "kid": self.key_id, "typ": "JWT"}
        claims = {"sub": sid.uri, "aud": auds, "iat": now, "exp": now + int(ttl.total_seconds())}
        signing_input = ".".join(
            _b64url(json.dumps(part, separators=(",", ":")).encode()) for part in (header, claims)
        )
        der = self._signing_key.sign(signing_input.encode("ascii"), ec.ECDSA(hashes.SHA256()))
        r, s = decode_dss_signature(der)
        raw = r.to_bytes(_COORD_BYTES, "big") + s.to_bytes(_COORD_BYTES, "big")
        return f"{signing_input}.{_b64url(raw)}"

    def validate(self, token: str, audience: str, leeway: float = 0.0) -> dict[str, Any]:
        """Check a JWT-SVID's header, signature, ``sub``, ``aud`` and ``exp``; return its claims.

        ``leeway`` (seconds) tolerates a verifier clock that runs slightly ahead.
        """
        if not audience:
            raise CredentialError("an audience to validate against is required")
        parts = token.split(".")
        if len(parts) != 3:
            raise CredentialError("JWT-SVID must be a JWS in compact serialization")
        header = _json_segment(parts[0], "header")
        self._check_header(header)
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise CredentialError(f"JWT-SVID key id {kid!r} is not in the bundle")
        raw = _unb64url(parts[2])
        if len(raw) != 2 * _COORD_BYTES:
            raise CredentialError("JWT-SVID signature has the wrong length for ES256")
        der = encode_dss_signature(
            int.from_bytes(raw[:_COORD_BYTES], "big"), int.from_bytes(raw[_COORD_BYTES:], "big")
        )
        try:
            key.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), ec.ECDSA(hashes.SHA256()))
        except InvalidSignature as exc:
            raise CredentialError("JWT-SVID signature does not verify") from exc
        claims = _json_segment(parts[1], "claims")
        self._check_claims(claims, audience, leeway)
        return claims

    def jwks(self) -> dict[str, Any]:
        """The JWT bundle of this trust domain: an RFC 7517 JWK set, ``use: jwt-svid``."""
        return {"keys": [_jwk(kid, pub) for kid, pub in self._keys.items()]}

    def jwks_json(self) -> bytes:
        """:meth:`jwks` serialized, as the Workload API carries it."""
        return json.dumps(self.jwks(), separators=(",", ":")).encode()

    # ---- helpers ------------------------------------------------------------------

    def _install(self, key: ec.EllipticCurvePrivateKey, key_id: str | None) -> None:
        if not isinstance(key.curve, ec.SECP256R1):
            raise CredentialError("JWT signing key must be EC P-256 (ES256)")
        kid = key_id or secrets.token_urlsafe(16)
        self._signing_key = key
        self.key_id = kid
        self._keys[kid] = key.public_key()

    @staticmethod
    def _check_header(header: Mapping[str, Any]) -> None:
        alg = header.get("alg")
        if alg != ALGORITHM:
            raise CredentialError(f"JWT-SVID algorithm {alg!r} is not supported (only ES256)")
        typ = header.get("typ")
        if typ is not None and typ not in ("JWT", "JOSE"):
            raise CredentialError(f"JWT-SVID typ {typ!r} must be JWT or JOSE")
        extra = set(header) - _ALLOWED_HEADERS
        if extra:
            raise CredentialError(f"JWT-SVID header has fields the spec forbids: {sorted(extra)}")

    def _check_claims(self, claims: Mapping[str, Any], audience: str, leeway: float) -> None:
        sub = claims.get("sub")
        if not isinstance(sub, str):
            raise CredentialError("JWT-SVID has no 'sub' claim")
        sid = as_spiffe_id(sub)
        if not sid.member_of(self.trust_domain):
            raise CredentialError(f"JWT-SVID subject {sid} is not in '{self.trust_domain}'")
        aud = claims.get("aud")
        auds = [aud] if isinstance(aud, str) else aud
        if not isinstance(auds, list) or not auds:
            raise CredentialError("JWT-SVID has no 'aud' claim")
        if audience not in auds:
            raise CredentialError(f"JWT-SVID is not for audience {audience!r}")
        exp = claims.get("exp")
        if not isinstance(exp, int | float) or isinstance(exp, bool):
            raise CredentialError("JWT-SVID has no numeric 'exp' claim")
        if self._clock() > exp + leeway:
            raise CredentialError("JWT-SVID has expired")


def _jwk(kid: str, pub: ec.EllipticCurvePublicKey) -> dict[str, str]:
    nums = pub.public_numbers()
    return {
        "kty": "EC",
        "crv": "P-256",
        "x": _b64url(nums.x.to_bytes(_COORD_BYTES, "big")),
        "y": _b64url(nums.y.to_bytes(_COORD_BYTES, "big")),
        "kid": kid,
        "use": JWK_USE,
    }
