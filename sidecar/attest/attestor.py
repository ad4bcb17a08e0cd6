"""The attestor: from a PID to the SPIFFE ID its registration entries give it.

The daemon calls :meth:`Attestor.attest` for every exec the kernel reports.
Entries can be swapped while attestations run: each attestation reads the
current entries once, so it sees either the old set or the new one, never a
mix, and a reload that fails leaves the old set in force.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sidecar.attest.entries import Entries, Match, load_entries
from sidecar.attest.facts import ExecSeen, ProcessFacts, gather
from sidecar.attest.hashcache import HashCache

_logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AttestationResult:
    """The match (None: the process has no identity) and the facts it was made from."""

    match: Match | None
    facts: ProcessFacts
    entries_digest: str  # which version of the entries decided

    @property
    def spiffe_id(self) -> str | None:
        return self.match.spiffe_id if self.match else None


class Attestor:
    """Attests processes against hot-swappable registration entries."""

    def __init__(self, entries: Entries, hashes: HashCache | None = None) -> None:
        self._entries = entries
        self._hashes = hashes if hashes is not None else HashCache()
        self._swap_lock = threading.Lock()

    @property
    def entries(self) -> Entries:
        return self._entries

    @property
    def hashes(self) -> HashCache:
        return self._hashes

    def attest(
        self,
        pid: int,
        parent_identity: str | None = None,
        seen: ExecSeen | None = None,
        still_running: Callable[[], bool] | None = None,
    ) -> AttestationResult:
        """Gather ``pid``'s facts and match them; AttestationError if it is gone or replaced.

        ``seen``: what the kernel recorded of the exec being attested;
        ``still_running``: whether ``pid`` is still that process (see
        :func:`sidecar.attest.facts.gather`).
        """
        entries = self._entries  # one consistent set for the whole attestation
        facts = gather(
            pid,
            parent_identity,
            self._hashes,
            want_sha256=entries.needs_sha256,
            want_user=entries.needs_user,
            want_cgroup=entries.needs_cgroup,
            seen=seen,
            still_running=still_running,
        )
        match = entries.match(facts)
        _logger.debug(
            "pid %d (start %d, %s) -> %s",
            pid,
            facts.start_time,
            facts.exe_path,
            match.spiffe_id if match else "no identity",
        )
        return AttestationResult(match, facts, entries.digest)

    def replace_entries(self, new: Entries) -> Entries:
        """Put ``new`` in force and return the entries it replaced."""
        with self._swap_lock:
            old, self._entries = self._entries, new
        _logger.info(
            "registration entries replaced: %d entries from %s (%s)",
            len(new),
            new.source,
            new.digest[:12],
        )
        return old

    def reload(self, path: str | Path) -> Entries:
        """Load ``path`` and put it in force; on any error raise and keep the old entries."""
        new = load_entries(path)  # raises AttestationError before anything changes
        self.replace_entries(new)
        return new
