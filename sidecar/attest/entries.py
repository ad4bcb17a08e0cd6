"""Registration entries: which SPIFFE ID a process gets, by its selectors.

File format (``docs/entries-reference.md`` has the full reference)::

    apiVersion: sidecar/v1
    kind: RegistrationEntries
    trustDomain: example.org
    entries:
      - spiffeId: spiffe://example.org/agent/research-bot
        selectors: [unix:uid:1000, unix:sha256:<64 hex>]

A process matches an entry when it satisfies every selector of it.  When
several entries match, the most specific one (most selectors) wins.  Two
entries of equal specificity for different SPIFFE IDs that one process could
both satisfy would make the answer depend on file order, so loading refuses
them and names both.  Several entries may share one SPIFFE ID (alternative
ways to be the same workload).
"""

from __future__ import annotations

import hashlib
import itertools
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from sidecar.attest import selectors as sel
from sidecar.attest.facts import ProcessFacts
from sidecar.attest.selectors import Selector, parse_selector
from sidecar.identity.spiffeid import parse_spiffe_id, parse_trust_domain
from sidecar.util.errors import AttestationError
from sidecar.util.inputs import read_bytes
from sidecar.util.yamlsrc import (
    DEFAULT_MAX_BYTES,
    Document,
    Fields,
    Path_,
    check_header,
    check_type,
)
from sidecar.util.yamlsrc import load_document as _load_document

_logger = logging.getLogger(__name__)

API_VERSION = "sidecar/v1"
KIND = "RegistrationEntries"


@dataclass(frozen=True)
class Entry:
    """One registration entry as written, with where it was written."""

    spiffe_id: str
    selectors: tuple[Selector, ...]
    index: int
    source: str
    line: int

    @property
    def specificity(self) -> int:
        return len(self.selectors)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def matches(self, facts: ProcessFacts) -> bool:
        return all(s.matches(facts) for s in self.selectors)


@dataclass(frozen=True)
class Match:
    """The entry that gave a process its identity, for audit records."""

    spiffe_id: str
    entry_index: int
    source: str
    line: int
    selectors: tuple[Selector, ...]


class Entries:
    """A validated, immutable set of registration entries."""

    def __init__(
        self, trust_domain: str, entries: tuple[Entry, ...], source: str, digest: str
    ) -> None:
        self.trust_domain = trust_domain
        self.entries = entries
        self.source = source
        self.digest = digest  # sha256 of the file's bytes: the entries' version
        # Most specific first; file order among equals (only entries for one
        # SPIFFE ID can tie, which makes the order harmless).
        self._order = sorted(entries, key=lambda e: (-e.specificity, e.index))
        kinds = {s.kind for e in entries for s in e.selectors}
        self.needs_sha256 = sel.SHA256 in kinds
        self.needs_user = sel.USER in kinds
        self.needs_cgroup = not kinds.isdisjoint(sel.CGROUP_KINDS)
        self.needs_parent = sel.PARENT_ID in kinds

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)

    @property
    def spiffe_ids(self) -> set[str]:
        return {e.spiffe_id for e in self.entries}

    def match(self, facts: ProcessFacts) -> Match | None:
        """The most specific entry whose selectors all hold for ``facts``."""
        for e in self._order:
            if e.matches(facts):
                return Match(e.spiffe_id, e.index, e.source, e.line, e.selectors)
        return None

    def spawn_graph(self) -> dict[str, set[str]]:
        """Parent SPIFFE ID -> identities whose entries name it in ``parent:id``."""
        graph: dict[str, set[str]] = defaultdict(set)
        for e in self.entries:
            for s in e.selectors:
                if s.kind == sel.PARENT_ID:
                    graph[s.value].add(e.spiffe_id)
        return dict(graph)


def load_entries(path: str | Path) -> Entries:
    """Read and validate a registration entries file (``-``: standard input);
    errors name file:line: field."""
    raw, source = read_bytes(path, AttestationError, DEFAULT_MAX_BYTES)
    return load_entries_text(raw, source)


def load_entries_text(text: str | bytes, source: str) -> Entries:
    """Validate registration entries given as text; ``source`` names it in errors."""
    raw = text.encode() if isinstance(text, str) else text
    doc = _load_document(raw, source, AttestationError)
    top = check_header(doc, API_VERSION, KIND)
    td_text = top.required("trustDomain", str)
    try:
        trust_domain = parse_trust_domain(td_text)
    except ValueError as exc:
        raise doc.error(top.at("trustDomain"), str(exc)) from exc
    items = top.required("entries", list)
    top.done()
    entries = tuple(_entry(doc, i, item, trust_domain) for i, item in enumerate(items))
    _check_parents(doc, entries)
    _check_conflicts(doc, entries)
    digest = hashlib.sha256(raw).hexdigest()
    _logger.info("loaded %d registration entries from %s", len(entries), source)
    return Entries(trust_domain, entries, source, digest)


def _entry(doc: Document, i: int, item: object, trust_domain: str) -> Entry:
    path = ("entries", i)
    f = Fields(doc, path, item)
    sid_text = f.required("spiffeId", str)
    try:
        sid = parse_spiffe_id(sid_text)
    except ValueError as exc:
        raise doc.error(f.at("spiffeId"), str(exc)) from exc
    if not sid.member_of(trust_domain):
        raise doc.error(f.at("spiffeId"), f"'{sid}' is not in trust domain '{trust_domain}'")
    if not sid.path:
        raise doc.error(f.at("spiffeId"), f"'{sid}' names no workload (it has no path)")
    raw_selectors = f.required("selectors", list)
    f.done()
    if not raw_selectors:
        raise doc.error(f.at("selectors"), "an entry needs at least one selector")
    selectors: list[Selector] = []
    for j, raw in enumerate(raw_selectors):
        at = (*path, "selectors", j)
        check_type(doc, at, raw, str)
        try:
            s = parse_selector(raw, trust_domain)
        except ValueError as exc:
            raise doc.error(at, str(exc)) from exc
        _check_fits(doc, at, s, selectors)
        selectors.append(s)
    return Entry(str(sid), tuple(selectors), i, doc.source, doc.line(path))


def _check_fits(doc: Document, at: Path_, s: Selector, earlier: list[Selector]) -> None:
    """Refuse a selector that repeats, or contradicts, one before it in its entry."""
    for prev in earlier:
        if prev == s:
            raise doc.error(at, f"duplicate selector '{s}'")
        if prev.kind == s.kind and not sel.compatible(prev, s):
            raise doc.error(at, f"'{s}' contradicts '{prev}': the entry could never match")


def _check_parents(doc: Document, entries: tuple[Entry, ...]) -> None:
    """A ``parent:id`` must name an identity defined here; a typo would never match."""
    defined = {e.spiffe_id for e in entries}
    for e in entries:
        for j, s in enumerate(e.selectors):
            if s.kind == sel.PARENT_ID and s.value not in defined:
                raise doc.error(
                    ("entries", e.index, "selectors", j),
                    f"'{s}' names a parent identity that no entry defines",
                )


def could_both_match(a: Entry, b: Entry) -> bool:
    """Whether some process could satisfy every selector of ``a`` and of ``b``.

    Conservative: selectors of different types never exclude each other (a
    uid and a user name may well be the same account).
    """
    for s, t in itertools.product(a.selectors, b.selectors):
        if s.kind == t.kind and not sel.compatible(s, t):
            return False
    return True


def _check_conflicts(doc: Document, entries: tuple[Entry, ...]) -> None:
    by_specificity: dict[int, list[Entry]] = defaultdict(list)
    for e in entries:
        by_specificity[e.specificity].append(e)
    for group in by_specificity.values():
        for a, b in itertools.combinations(group, 2):
            if a.spiffe_id != b.spiffe_id and could_both_match(a, b):
                raise doc.error(
                    ("entries", b.index),
                    f"conflicts with entries[{a.index}] at {a.where}: "
                    f"'{b.spiffe_id}' ({b.where}) and '{a.spiffe_id}' ({a.where}) "
                    f"have the same number of selectors ({a.specificity}) and one process "
                    "could match both; add a selector that tells them apart",
                )
