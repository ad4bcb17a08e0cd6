"""Secrets in command lines never leave the host: argv redaction.

Exec events carry the new image's argv, and agents are started with tokens,
passwords and keys on their command lines (``--token=...``, ``password=...``,
``https://user:secret@host``, ``-H 'Authorization: Bearer ...'``).  Before an
event reaches the local sink or the exporter, every argument is passed
through these rules; a rule replaces the secret part with ``[REDACTED]`` and
the event says ``args_redacted: true``.

Rules are regular expressions.  A match's named group ``secret`` (or, without
one, the whole match) is replaced.  A flag that takes its value as the next
argument (``--password hunter2``) redacts that next argument.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

MASK = "[REDACTED]"

_SECRET_WORDS = (
    r"pass(?:word|wd|phrase)?|token|secret|api[-_]?key|access[-_]?key|private[-_]?key"
    r"|client[-_]?secret|auth(?:orization)?|credentials?|session[-_]?id|cookie"
)

DEFAULT_PATTERNS: tuple[str, ...] = (
    # --token=abc, -password=abc, token=abc, API_KEY=abc (also a word ending in one: DB_PASSWORD=)
    rf"(?i)^-{{0,2}}[\w.-]*(?:{_SECRET_WORDS})[\w.-]*(?:=|:(?!\s))(?P<secret>.+)$",
    # https://user:secret@host
    r"(?i)[a-z][a-z0-9+.-]*://[^/\s:@]*:(?P<secret>[^@/\s]+)@",
    # ?token=abc&sig=abc in a URL
    r"(?i)[?&](?:access_token|token|api_key|apikey|key|sig|signature|password|secret)"
    r"=(?P<secret>[^&#\s]+)",
    # Authorization: Bearer abc (curl -H)
    r"(?i)\b(?:bearer|basic|token)\s+(?P<secret>[A-Za-z0-9._~+/=-]{8,})",
    # well-known key shapes anywhere: AWS access keys, GitHub and Slack tokens, JWTs
    r"(?P<secret>\b(?:AKIA|ASIA)[A-Z0-9]{16}\b)",
    r"(?P<secret>\bgh[pousr]_[A-Za-z0-9]{30,}\b)",
    r"(?P<secret>\bxox[abprs]-[A-Za-z0-9-]{10,}\b)",
    r"(?P<secret>\beyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]+)",
)
# A flag whose value is the next argument.
DEFAULT_FLAG = rf"(?i)^-{{1,2}}[\w.-]*(?:{_SECRET_WORDS})[\w.-]*$"


@dataclass(frozen=True)
class Redactor:
    patterns: tuple[re.Pattern[str], ...]
    flag: re.Pattern[str] | None

    @classmethod
    def build(
        cls, patterns: Iterable[str] = DEFAULT_PATTERNS, flag: str | None = DEFAULT_FLAG
    ) -> Redactor:
        """Compile the rules; raises ``re.error`` for a bad one (the config names it)."""
        return cls(tuple(re.compile(p) for p in patterns), re.compile(flag) if flag else None)

    def argv(self, argv: Sequence[str]) -> tuple[tuple[str, ...], bool]:
        """(argv with secrets masked, whether anything was)."""
        out: list[str] = []
        changed = False
        value_next = False
        for arg in argv:
            if value_next:
                out.append(MASK)
                changed, value_next = True, False
                continue
            masked = self.arg(arg)
            changed |= masked != arg
            out.append(masked)
            value_next = bool(self.flag is not None and self.flag.match(arg))
        return tuple(out), changed

    def arg(self, arg: str) -> str:
        for pattern in self.patterns:
            arg = pattern.sub(_mask, arg)
        return arg


def _mask(m: re.Match[str]) -> str:
    if "secret" not in m.re.groupindex:
        return MASK
    start, end = m.span("secret")
    if start < 0:
        return m.group(0)
    whole = m.group(0)
    base = m.start(0)
    return whole[: start - base] + MASK + whole[end - base :]
