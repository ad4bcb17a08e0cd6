"""Selectors: the facts a registration entry demands of a process.

A selector is written ``<type>:<value>``, for example ``unix:uid:1000``.  Every
type has a validator (it also normalises, so that two spellings of one value
compare equal) and a matcher against :class:`ProcessFacts`.

Except for ``cgroup:path`` (a prefix), every type demands one exact value:
two entries demanding different values of one type can never match the same
process, which is what the conflict check in :mod:`sidecar.attest.entries`
relies on.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Callable
from dataclasses import dataclass

from sidecar.attest import cgroup
from sidecar.attest.facts import ProcessFacts
from sidecar.identity.spiffeid import parse_spiffe_id

UID = "unix:uid"
GID = "unix:gid"
USER = "unix:user"
PATH = "unix:path"
SHA256 = "unix:sha256"
CGROUP_PATH = "cgroup:path"
SYSTEMD_UNIT = "systemd:unit"
POD_UID = "k8s:pod-uid"
CONTAINER_ID = "container:id"
#: The kinds read from the process's cgroup.
CGROUP_KINDS = frozenset({CGROUP_PATH, SYSTEMD_UNIT, POD_UID, CONTAINER_ID})
PARENT_ID = "parent:id"

_MAX_ID = 2**32 - 2  # (uid_t)-1 means "no id"
_USER_RE = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]{0,31}\$?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True, order=True)
class Selector:
    """One normalised selector, e.g. ``Selector("unix:uid", "1000")``."""

    kind: str
    value: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.value}"

    @property
    def is_prefix(self) -> bool:
        """True for types matched by prefix rather than by exact value."""
        return self.kind == CGROUP_PATH

    def matches(self, facts: ProcessFacts) -> bool:
        return _TYPES[self.kind].match(facts, self.value)


def compatible(a: Selector, b: Selector) -> bool:
    """Whether one process could satisfy both selectors of the same type."""
    if a.kind != b.kind:
        raise ValueError("selectors of different types are always compatible")
    if a.is_prefix:
        return cgroup.is_under(a.value, b.value) or cgroup.is_under(b.value, a.value)
    return a.value == b.value


def parse_selector(text: str, trust_domain: str) -> Selector:
    """Parse ``<type>:<value>``; ``ValueError`` says what is wrong."""
    a, sep1, rest = text.partition(":")
    b, sep2, value = rest.partition(":")
    kind = f"{a}:{b}"
    if not (sep1 and sep2) or kind not in _TYPES:
        known = ", ".join(sorted(_TYPES))
        raise ValueError(f"unknown selector type in '{text}' (known types: {known})")
    try:
        return Selector(kind, _TYPES[kind].validate(value, trust_domain))
    except ValueError as exc:
        raise ValueError(f"selector '{text}': {exc}") from None


def known_types() -> list[str]:
    return sorted(_TYPES)


# --- validators: return the normalised value or raise ValueError ------------


def _id(value: str, _td: str) -> str:
    if not value.isascii() or not value.isdigit():
        raise ValueError("must be a decimal number")
    n = int(value)
    if n > _MAX_ID:
        raise ValueError(f"must be at most {_MAX_ID}")
    return str(n)


def _user(value: str, _td: str) -> str:
    if not _USER_RE.match(value):
        raise ValueError("must be a user name (letters, digits, '_', '.', '-'; at most 32)")
    return value


def _abs_path(value: str, _td: str) -> str:
    if not value.startswith("/") or "\0" in value:
        raise ValueError("must be an absolute path")
    if posixpath.normpath(value) != value or value.startswith("//"):
        raise ValueError(f"must be a normalised path (like '{posixpath.normpath(value)}')")
    return value


def _sha256(value: str, _td: str) -> str:
    if not _SHA256_RE.match(value):
        raise ValueError("must be 64 lower-case hex digits")
    return value


def _cgroup_prefix(value: str, _td: str) -> str:
    if not value.startswith("/"):
        raise ValueError("must start with '/'")
    segs = value.split("/")[1:]
    if segs and segs[-1] == "":
        segs.pop()  # one trailing '/' is allowed: '/agents/' == '/agents'
    if any(s in ("", ".", "..") for s in segs):
        raise ValueError("must not have empty, '.' or '..' segments")
    return "/" + "/".join(segs)


def _unit(value: str, _td: str) -> str:
    if not cgroup.SYSTEMD_UNIT_RE.match(value):
        raise ValueError("must be a systemd unit name ending in '.service' or '.scope'")
    return value


def _pod_uid(value: str, _td: str) -> str:
    if not cgroup.POD_UID_RE.match(value):
        raise ValueError("must be a lower-case pod UID (UUID, or 32 hex digits)")
    return value


def _container_id(value: str, _td: str) -> str:
    if not cgroup.CONTAINER_ID_RE.match(value):
        raise ValueError("must be a full container ID (64 lower-case hex digits)")
    return value


def _parent(value: str, td: str) -> str:
    sid = parse_spiffe_id(value)
    if not sid.member_of(td):
        raise ValueError(f"'{value}' is not in trust domain '{td}'")
    return str(sid)


# --- matchers ------------------------------------------------------------------


def _match_path(f: ProcessFacts, v: str) -> bool:
    # A replaced or removed image no longer lives at its old path.
    return not f.exe_deleted and f.exe_path == v


def _match_cgroup(f: ProcessFacts, v: str) -> bool:
    return f.cgroup_path is not None and cgroup.is_under(f.cgroup_path, v)


@dataclass(frozen=True)
class _Type:
    validate: Callable[[str, str], str]
    match: Callable[[ProcessFacts, str], bool]


_TYPES: dict[str, _Type] = {
    UID: _Type(_id, lambda f, v: f.uid == int(v)),
    GID: _Type(_id, lambda f, v: f.gid == int(v)),
    USER: _Type(_user, lambda f, v: f.user == v),
    PATH: _Type(_abs_path, _match_path),
    SHA256: _Type(_sha256, lambda f, v: f.sha256 == v),
    CGROUP_PATH: _Type(_cgroup_prefix, _match_cgroup),
    SYSTEMD_UNIT: _Type(_unit, lambda f, v: f.systemd_unit == v),
    POD_UID: _Type(_pod_uid, lambda f, v: f.pod_uid == v),
    CONTAINER_ID: _Type(_container_id, lambda f, v: f.container_id == v),
    PARENT_ID: _Type(_parent, lambda f, v: f.parent_identity == v),
}
