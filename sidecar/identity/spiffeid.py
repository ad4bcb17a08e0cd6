"""SPIFFE IDs, as the SPIFFE ID specification defines them.

``spiffe://<trust domain>/<path>``: the trust domain is lower-case letters,
digits, ``.``, ``-`` and ``_``; the path is made of non-empty segments of
letters, digits, ``.``, ``-`` and ``_``, none of them ``.`` or ``..``; no
query, fragment, port or user info; at most 2048 bytes.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_LENGTH = 2048
_TD_RE = re.compile(r"^[a-z0-9._-]+$")
_SEGMENT_RE = re.compile(r"^[A-Za-z0-9._-]+$")


@dataclass(frozen=True, order=True)
class SpiffeId:
    trust_domain: str
    path: str  # "" or "/a/b"

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}{self.path}"

    @property
    def uri(self) -> str:
        return str(self)

    def member_of(self, trust_domain: str) -> bool:
        return self.trust_domain == trust_domain


def parse_trust_domain(value: str) -> str:
    """Validate a bare trust domain name (``example.org``); ValueError says why."""
    if not value:
        raise ValueError("trust domain is empty")
    if not _TD_RE.match(value):
        raise ValueError(
            f"trust domain '{value}' may hold only lower-case letters, digits, '.', '-' and '_'"
        )
    return value


def parse_spiffe_id(value: str) -> SpiffeId:
    """Parse and validate a SPIFFE ID; ``ValueError`` says what is wrong."""
    if not isinstance(value, str):
        raise ValueError(f"SPIFFE ID must be a string, not {type(value).__name__}")
    if len(value.encode()) > MAX_LENGTH:
        raise ValueError(f"SPIFFE ID is longer than {MAX_LENGTH} bytes")
    scheme = "spiffe://"
    if not value.startswith(scheme):
        raise ValueError(f"SPIFFE ID '{value}' must start with '{scheme}'")
    rest = value[len(scheme) :]
    if any(c in rest for c in "?#"):
        raise ValueError(f"SPIFFE ID '{value}' must not have a query or fragment")
    td, slash, path = rest.partition("/")
    if "@" in td or ":" in td:
        raise ValueError(f"SPIFFE ID '{value}' must not have user info or a port")
    try:
        parse_trust_domain(td)
    except ValueError as exc:
        raise ValueError(f"SPIFFE ID '{value}': {exc}") from None
    if not slash:
        return SpiffeId(td, "")
    for segment in path.split("/"):
        if segment == "":
            raise ValueError(f"SPIFFE ID '{value}' has an empty path segment")
        if segment in (".", ".."):
            raise ValueError(f"SPIFFE ID '{value}' has a '.' or '..' path segment")
        if not _SEGMENT_RE.match(segment):
            raise ValueError(
                f"SPIFFE ID '{value}': path segment '{segment}' may hold only letters, "
                "digits, '.', '-' and '_'"
            )
    return SpiffeId(td, "/" + path)
