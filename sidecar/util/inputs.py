"""Reading an operator's input file, where ``-`` means standard input.

Every offline tool (``policy validate``, ``suggest --history``, ``entries
validate`` ...) reads its files through here, so ``-`` works the same
everywhere and errors about standard input name ``<stdin>`` where they
would name a file.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from sidecar.util.errors import ConfigError, SidecarError

STDIN = "-"
STDIN_NAME = "<stdin>"


def is_stdin(path: str | Path | None) -> bool:
    return path is not None and str(path) == STDIN


def source_name(path: str | Path) -> str:
    """What errors call ``path``: the path itself, or ``<stdin>`` for ``-``."""
    return STDIN_NAME if is_stdin(path) else str(Path(path))


def read_bytes(
    path: str | Path, error_type: type[SidecarError], max_bytes: int
) -> tuple[bytes, str]:
    """Up to ``max_bytes + 1`` bytes of ``path`` (or stdin) and its name for errors.

    One byte more than allowed is read so that the caller can tell a file
    that is too large from one that is exactly at the limit.
    """
    name = source_name(path)
    try:
        if is_stdin(path):
            return sys.stdin.buffer.read(max_bytes + 1), name
        with Path(path).open("rb") as fh:
            return fh.read(max_bytes + 1), name
    except OSError as exc:
        raise error_type(f"{name}: cannot read: {exc.strerror or exc}") from exc


def read_lines(
    path: str | Path, error_type: type[SidecarError], max_bytes: int
) -> Iterator[tuple[int, str]]:
    """(line number, text) of each line of ``path`` (or stdin), decoded as UTF-8.

    Raises ``error_type`` naming the source (and the line, for bad UTF-8)
    when the input cannot be read, is not UTF-8 or passes ``max_bytes``.
    """
    name = source_name(path)
    try:
        if is_stdin(path):
            yield from _decoded(sys.stdin.buffer, name, error_type, max_bytes)
            return
        with Path(path).open("rb") as fh:
            yield from _decoded(fh, name, error_type, max_bytes)
    except OSError as exc:
        raise error_type(f"{name}: cannot read: {exc.strerror or exc}") from exc


def _decoded(
    lines: Iterable[bytes], name: str, error_type: type[SidecarError], max_bytes: int
) -> Iterator[tuple[int, str]]:
    total = 0
    for number, raw in enumerate(lines, 1):
        total += len(raw)
        if total > max_bytes:
            raise error_type(f"{name}: larger than {max_bytes} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise error_type(f"{name}:{number}: not UTF-8 text: {exc}") from exc
        yield number, text


def check_one_stdin(*paths: str | Path | None) -> None:
    """Standard input can be read once: refuse ``-`` for more than one input."""
    if sum(1 for p in paths if is_stdin(p)) > 1:
        raise ConfigError("only one input can be '-' (standard input)")
