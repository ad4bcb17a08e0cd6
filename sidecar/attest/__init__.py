"""Process attestation: facts from /proc (through a pidfd) matched to registration entries."""

from sidecar.attest.attestor import AttestationResult, Attestor
from sidecar.attest.entries import Entries, Entry, Match, load_entries, load_entries_text
from sidecar.attest.facts import ProcessFacts, boot_id, gather, read_start_time
from sidecar.attest.hashcache import FileKey, HashCache
from sidecar.attest.selectors import Selector, parse_selector

__all__ = [
    "AttestationResult",
    "Attestor",
    "Entries",
    "Entry",
    "FileKey",
    "HashCache",
    "Match",
    "ProcessFacts",
    "Selector",
    "boot_id",
    "gather",
    "load_entries",
    "load_entries_text",
    "parse_selector",
    "read_start_time",
]
