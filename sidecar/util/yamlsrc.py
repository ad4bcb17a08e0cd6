"""Strict YAML reading with file, line and field in every error.

Every YAML document the product reads (daemon config, registration entries,
policy) goes through :func:`load_document`, which

- refuses anchors and aliases (no alias bombs) and duplicate keys,
- caps the input size,
- remembers the line of every key and item, so that validation errors can
  say ``policy.yaml:12: identities[0].egress[1].ports: ...``.

:class:`Fields` then reads one mapping strictly: required and optional keys
with their types, and an error for any key that is not known.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml

from sidecar.util.errors import SidecarError
from sidecar.util.inputs import read_bytes

T = TypeVar("T")
Path_ = tuple[str | int, ...]

DEFAULT_MAX_BYTES = 4 * 1024 * 1024


def render_path(path: Path_) -> str:
    """``("identities", 0, "egress")`` -> ``identities[0].egress``."""
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part
    return out or "<document>"


@dataclass
class Document:
    """A parsed YAML document and the line of each of its parts."""

    source: str
    data: Any
    lines: dict[Path_, int] = field(default_factory=dict)
    error_type: type[SidecarError] = SidecarError

    def line(self, path: Path_) -> int:
        """Line of ``path``, or of its nearest ancestor that has one."""
        while path not in self.lines and path:
            path = path[:-1]
        return self.lines.get(path, 1)

    def error(self, path: Path_, message: str) -> SidecarError:
        """An error naming file, line and field."""
        return self.error_type(f"{self.source}:{self.line(path)}: {render_path(path)}: {message}")


# libyaml's parser when the system has it (ten times faster on large policies);
# aliases are refused while converting, so composing them is harmless.  Its
# composer recurses on the C stack, so deeply nested input would crash the
# process instead of raising: it only gets documents whose nesting is
# provably shallow (few brackets, short lines bound the depth), and the rest
# go to the pure-Python loader, which fails cleanly.
_CLoader: Any = getattr(yaml, "CSafeLoader", None)
_MAX_BRACKETS = 2000
_MAX_LINE = 1000


def _loader_for(text: bytes) -> Any:
    if _CLoader is None:
        return yaml.SafeLoader
    if text.count(b"[") + text.count(b"{") > _MAX_BRACKETS:
        return yaml.SafeLoader
    if max((len(line) for line in text.splitlines()), default=0) > _MAX_LINE:
        return yaml.SafeLoader
    return _CLoader


def load_document(
    text: str | bytes,
    source: str,
    error_type: type[SidecarError] = SidecarError,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Document:
    """Parse one YAML document strictly; errors name ``source`` and a line."""
    if isinstance(text, str):
        text = text.encode("utf-8", "surrogateescape")
    if len(text) > max_bytes:
        raise error_type(
            f"{source}: file is {len(text)} bytes, larger than the {max_bytes} allowed"
        )
    try:
        loader = _loader_for(text)(text)
        try:
            node = loader.get_single_node()
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else 1
        raise error_type(f"{source}:{line}: invalid YAML: {exc.problem or exc}") from exc
    except yaml.YAMLError as exc:
        raise error_type(f"{source}: invalid YAML: {exc}") from exc
    except RecursionError as exc:
        raise error_type(f"{source}: the document is nested too deeply") from exc
    doc = Document(source=source, data=None, error_type=error_type)
    if node is None:
        raise error_type(f"{source}:1: the document is empty")
    constructor = yaml.SafeLoader("")
    doc.data = _convert(node, (), doc, constructor, set())
    return doc


def load_file(
    path: str | Path,
    error_type: type[SidecarError] = SidecarError,
    max_bytes: int = DEFAULT_MAX_BYTES,
) -> Document:
    """Read and parse a YAML file (``-``: standard input, named ``<stdin>``);
    a missing or unreadable file is ``error_type``."""
    raw, source = read_bytes(path, error_type, max_bytes)
    return load_document(raw, source, error_type, max_bytes)


def _convert(
    node: yaml.Node, path: Path_, doc: Document, ctor: yaml.SafeLoader, seen: set[int]
) -> Any:
    # An alias is the same node object met twice: refuse it (no alias bombs).
    # Its own position is gone after composing; the line of its key is near.
    if id(node) in seen:
        doc.lines[path] = doc.line(path[:-1]) if path else 1
        raise doc.error(path, "anchors and aliases are not allowed")
    seen.add(id(node))
    doc.lines.setdefault(path, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise doc.error(path, "mapping keys must be plain scalars")
            key = ctor.construct_object(key_node, deep=True)
            if not isinstance(key, str | int):
                raise doc.error(path, f"key {key!r} must be a string")
            key_path = (*path, str(key))
            doc.lines[key_path] = key_node.start_mark.line + 1
            if key in out:
                raise doc.error(key_path, "duplicate key")
            out[key] = _convert(value_node, key_path, doc, ctor, seen)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, (*path, i), doc, ctor, seen) for i, item in enumerate(node.value)]
    if node.tag == _STR_TAG:
        return node.value  # the common case, without the constructor's machinery
    try:
        return ctor.construct_object(node, deep=True)
    except yaml.YAMLError as exc:
        raise doc.error(path, f"invalid value: {exc}") from exc


_STR_TAG = "tag:yaml.org,2002:str"

_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    bool: "true or false",
    float: "a number",
    list: "a list",
    dict: "a mapping",
}


def type_name(t: type | tuple[type, ...]) -> str:
    if isinstance(t, tuple):
        return " or ".join(_TYPE_NAMES.get(x, x.__name__) for x in t)
    return _TYPE_NAMES.get(t, t.__name__)


def check_type(doc: Document, path: Path_, value: Any, expected: type | tuple[type, ...]) -> None:
    """Raise unless ``value`` is of ``expected`` type (bools are not integers)."""
    exp = expected if isinstance(expected, tuple) else (expected,)
    ok = isinstance(value, exp)
    if isinstance(value, bool) and bool not in exp:
        ok = False
    if not ok:
        got = "nothing" if value is None else type_name(type(value))
        raise doc.error(path, f"must be {type_name(expected)}, not {got}")


_MISSING = object()


class Fields:
    """Strict reader of one mapping: typed keys, and no unknown ones.

    >>> f = Fields(doc, ("spec",), doc.data["spec"])
    >>> name = f.required("name", str)
    >>> ttl = f.optional("ttl", int, 600)
    >>> f.done()   # raises if a key was not read
    """

    def __init__(self, doc: Document, path: Path_, value: Any) -> None:
        check_type(doc, path, value, dict)
        self.doc = doc
        self.path = path
        self.value: Mapping[str, Any] = value
        self._seen: set[str] = set()

    def at(self, key: str) -> Path_:
        return (*self.path, key)

    def required(self, key: str, expected: type[T] | tuple[type, ...]) -> T:
        self._seen.add(key)
        if key not in self.value:
            raise self.doc.error(self.path, f"missing required field '{key}'")
        v = self.value[key]
        check_type(self.doc, self.at(key), v, expected)
        return v  # type: ignore[no-any-return]

    def optional(self, key: str, expected: type[T] | tuple[type, ...], default: T) -> T:
        self._seen.add(key)
        v = self.value.get(key, _MISSING)
        if v is _MISSING or v is None:
            return default
        check_type(self.doc, self.at(key), v, expected)
        return v  # type: ignore[no-any-return]

    def parse(self, key: str, conv: Callable[[Any], T], default: T | None = None) -> T | None:
        """Read ``key`` through ``conv``; a ``ValueError`` from it names the field."""
        self._seen.add(key)
        if key not in self.value or self.value[key] is None:
            return default
        try:
            return conv(self.value[key])
        except (ValueError, TypeError) as exc:
            raise self.doc.error(self.at(key), str(exc)) from exc

    def done(self) -> None:
        unknown = [k for k in self.value if k not in self._seen]
        if unknown:
            known = ", ".join(sorted(self._seen)) or "none"
            raise self.doc.error(self.at(str(unknown[0])), f"unknown field (known fields: {known})")


def check_header(doc: Document, api_version: str, kind: str) -> Fields:
    """Check ``apiVersion`` and ``kind`` of a document and return its top-level reader."""
    top = Fields(doc, (), doc.data)
    got_api = top.required("apiVersion", str)
    if got_api != api_version:
        raise doc.error(("apiVersion",), f"must be '{api_version}', not '{got_api}'")
    got_kind = top.required("kind", str)
    if got_kind != kind:
        raise doc.error(("kind",), f"must be '{kind}', not '{got_kind}'")
    return top
