"""The reference evaluator: the kernel's decision, computed in Python.

It implements exactly the compiled-form semantics (one longest-prefix match
in the identity's prefixes, then a scan of that entry's port rules), so the
operator tools, the tests and the daemon's own checks agree with what the
BPF programs decide from the same map entries.

Who is decided for (as the BPF programs do it, see ``policy_for`` in
bpf/common.bpf.c and the exec check in bpf/process.bpf.c):

- ``identity=None`` (a process in scope with no identity) and an identity
  the policy does not list: ``defaults.unidentified`` for connects; their
  execs are never restricted.
- a listed identity in ``audit`` mode: nothing is blocked, a would-be deny
  is reported as ``would_deny``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sidecar.policy.compiled import CompiledPolicy
from sidecar.policy.model import PROTOCOL_BITS
from sidecar.policy.space import parse_address

_logger = logging.getLogger(__name__)

DEFAULT_RULE = "default"
EXEC_RULE = "exec"
# A process whose identity is not yet known is refused everything; the
# policy file only accepts 'deny' for defaults.pending.
PENDING_VERDICT = "deny"


@dataclass(frozen=True)
class Decision:
    verdict: str  # allow | deny | would_deny
    rule: str  # the matching rule name, or 'default'


def _refusal(mode: str) -> Decision:
    return Decision("would_deny" if mode == "audit" else "deny", DEFAULT_RULE)


def decide(
    policy: CompiledPolicy, identity: str | None, protocol: str, address: str, port: int
) -> Decision:
    """The verdict for a connect/sendmsg; ``ValueError`` for a bad protocol, address or port."""
    if protocol not in PROTOCOL_BITS:
        raise ValueError(f"protocol must be tcp or udp, not {protocol!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0-65535, not {port!r}")
    return decide_value(policy, identity, protocol, parse_address(address), port)


def decide_value(
    policy: CompiledPolicy, identity: str | None, protocol: str, address: int, port: int
) -> Decision:
    """:func:`decide` for an address already in the 128-bit space (IPv4 mapped)."""
    bit = PROTOCOL_BITS[protocol]
    ci = None if identity is None else policy.identities.get(identity)
    if ci is None:
        return Decision(policy.unidentified, DEFAULT_RULE)
    entry = ci.lookup(address)
    if entry is not None:
        for pr in entry.rules:
            if pr.protocol_mask & bit and pr.port_lo <= port <= pr.port_hi:
                return Decision("allow", ci.rule_names[pr.rule_index])
    return _refusal(ci.mode)


def decide_exec(policy: CompiledPolicy, identity: str | None, path: str) -> Decision:
    """The verdict for an exec of ``path`` (exact match of the absolute path)."""
    ci = None if identity is None else policy.identities.get(identity)
    if ci is None or ci.exec_paths is None:
        return Decision("allow", DEFAULT_RULE)
    if path in ci.exec_paths:
        return Decision("allow", EXEC_RULE)
    return _refusal(ci.mode)


def exec_allowed(policy: CompiledPolicy, identity: str | None, path: str) -> bool:
    """Whether the policy allows the exec (in audit mode a refusal is not enforced)."""
    return decide_exec(policy, identity, path).verdict == "allow"
