"""Secrets on command lines are masked before an event leaves the daemon."""

from __future__ import annotations

import re

import pytest

from sidecar.util.redact import MASK, Redactor

R = Redactor.build()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["agent", "--token=abc123"], ["agent", f"--token={MASK}"]),
        (
            ["agent", "--password", "hunter2", "--verbose"],
            ["agent", "--password", MASK, "--verbose"],
        ),
        (["env", "DB_PASSWORD=s3cret", "x"], ["env", f"DB_PASSWORD={MASK}", "x"]),
        (
            ["git", "clone", "https://bob:pa55@git.example.org/r"],
            ["git", "clone", f"https://bob:{MASK}@git.example.org/r"],
        ),
        (
            ["curl", "https://api.example.org/v1?token=zzz&x=1"],
            ["curl", f"https://api.example.org/v1?token={MASK}&x=1"],
        ),
        (
            ["curl", "-H", "Authorization: Bearer abcdefghijkl"],
            ["curl", "-H", f"Authorization: Bearer {MASK}"],
        ),
        (["aws", "AKIAABCDEFGHIJKLMNOP"], ["aws", MASK]),
        (["tool", "--api-key", "k"], ["tool", "--api-key", MASK]),
    ],
)
def test_secrets_are_masked_and_the_rest_is_kept(argv: list[str], expected: list[str]) -> None:
    out, changed = R.argv(argv)
    assert list(out) == expected
    assert changed


@pytest.mark.parametrize(
    "argv",
    [
        ["ls", "-la", "/tmp"],
        ["python3", "-c", "print(1)"],
        ["curl", "https://example.org/path?page=2"],
        ["grep", "--count", "token"],  # the word alone is not a secret
    ],
)
def test_ordinary_command_lines_are_untouched(argv: list[str]) -> None:
    out, changed = R.argv(argv)
    assert list(out) == argv and not changed


def test_operator_patterns_replace_the_defaults() -> None:
    r = Redactor.build([r"(?P<secret>\bcustomer-\d+\b)"], flag=None)
    assert r.argv(["report", "customer-42", "--token=x"]) == (
        ("report", MASK, "--token=x"),
        True,
    )
    with pytest.raises(re.error):
        Redactor.build(["(unclosed"])
