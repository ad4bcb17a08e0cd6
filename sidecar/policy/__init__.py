"""Policy: the YAML model, its compiler to kernel map entries, and operator tools.

See docs/policy-reference.md for the file format and the decision semantics.
"""

from sidecar.policy.blast import BlastRadius, blast_radius
from sidecar.policy.compiled import (
    MAX_RULES_PER_PREFIX,
    CompiledIdentity,
    CompiledPolicy,
    PortRule,
    PrefixEntry,
    compile_policy,
)
from sidecar.policy.diff import PolicyDiff, diff
from sidecar.policy.evaluate import PENDING_VERDICT, Decision, decide, decide_exec, exec_allowed
from sidecar.policy.history import read_history
from sidecar.policy.load import load_policy, load_policy_text, parse_policy_file, parse_policy_text
from sidecar.policy.suggest import suggest

__all__ = [
    "MAX_RULES_PER_PREFIX",
    "PENDING_VERDICT",
    "BlastRadius",
    "CompiledIdentity",
    "CompiledPolicy",
    "Decision",
    "PolicyDiff",
    "PortRule",
    "PrefixEntry",
    "blast_radius",
    "compile_policy",
    "decide",
    "decide_exec",
    "diff",
    "exec_allowed",
    "load_policy",
    "load_policy_text",
    "parse_policy_file",
    "parse_policy_text",
    "read_history",
    "suggest",
]
