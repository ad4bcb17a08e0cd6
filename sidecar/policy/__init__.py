"""Policy: the YAML model, its compiler to kernel map entries, and operator tools."""

from sidecar.policy.compiled import (
    MAX_RULES_PER_PREFIX,
    CompiledIdentity,
    CompiledPolicy,
    PortRule,
    PrefixEntry,
    compile_policy,
)
from sidecar.policy.evaluate import Decision, decide, decide_exec, exec_allowed
from sidecar.policy.load import load_policy, load_policy_text, parse_policy_file, parse_policy_text

__all__ = [
    "MAX_RULES_PER_PREFIX",
    "CompiledIdentity",
    "CompiledPolicy",
    "Decision",
    "PortRule",
    "PrefixEntry",
    "compile_policy",
    "decide",
    "decide_exec",
    "exec_allowed",
    "load_policy",
    "load_policy_text",
    "parse_policy_file",
    "parse_policy_text",
]
