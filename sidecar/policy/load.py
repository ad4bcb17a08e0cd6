"""Loading a policy: strict YAML, validation, compilation, one error type.

Every problem with the input becomes a :class:`PolicyError` naming file,
line and field, so that a bad reload can be reported while the policy that
is enforcing stays in place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from sidecar.policy.compiled import CompiledPolicy, compile_policy
from sidecar.policy.model import MAX_FILE_BYTES, PolicySpec, parse_policy
from sidecar.util.errors import PolicyError
from sidecar.util.inputs import source_name
from sidecar.util.yamlsrc import load_document, load_file

_logger = logging.getLogger(__name__)


def parse_policy_text(text: str | bytes, source: str = "<policy>") -> PolicySpec:
    """Validate policy YAML into its source model (no compilation)."""
    try:
        doc = load_document(text, source, PolicyError, MAX_FILE_BYTES)
    except RecursionError as exc:  # deeply nested flow collections
        raise PolicyError(f"{source}: the YAML is nested too deeply") from exc
    return parse_policy(doc)


def parse_policy_file(path: str | Path) -> PolicySpec:
    """Read and validate a policy file into its source model."""
    try:
        doc = load_file(path, PolicyError, MAX_FILE_BYTES)
    except RecursionError as exc:
        raise PolicyError(f"{path}: the YAML is nested too deeply") from exc
    return parse_policy(doc)


def load_policy_text(text: str | bytes, source: str = "<policy>") -> CompiledPolicy:
    """Validate and compile policy YAML given as text."""
    return compile_policy(parse_policy_text(text, source))


def load_policy(path: str | Path) -> CompiledPolicy:
    """Read, validate and compile a policy file (``-``: standard input)."""
    policy = compile_policy(parse_policy_file(path))
    _logger.info("loaded policy %s version %s", source_name(path), policy.version)
    return policy
