"""How the daemon settles a pending child with its parent's answer.

The kernel path is proven in tests/kernel/test_identity.py.  The case here,
a parent that has exited before its pending child is attested, cannot be
timed on a real kernel (the parent must outlive its own attestation by less
than the time between the two), so the kernel map is a dict.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from sidecar import config, daemon
from sidecar.daemon import Daemon, NullSink
from sidecar.kernel import abi

AGENT = "spiffe://example.org/agent/research-bot"


class KernelMap:
    """The procs map: pid -> (identity, ppid)."""

    def __init__(self) -> None:
        self.procs: dict[int, tuple[int, int]] = {}

    def proc_state(self, pid: int) -> tuple[int, int] | None:
        return self.procs.get(pid)

    def set_identity(self, pid: int, identity: int) -> None:
        self.procs[pid] = (identity, self.procs.get(pid, (0, 0))[1])


class Attestor:
    def __init__(self, matches: dict[int, str]) -> None:
        self.matches = matches

    def attest(self, pid: int, parent_identity: str | None) -> Any:
        sid = self.matches.get(pid)
        return SimpleNamespace(match=SimpleNamespace(spiffe_id=sid) if sid else None)


def make_daemon(matches: dict[int, str]) -> tuple[Daemon, KernelMap]:
    d = Daemon(config.load(None), NullSink())
    kernel = KernelMap()
    d._programs = kernel
    d.attestor = Attestor(matches)
    return d, kernel


def test_a_pending_child_takes_the_answer_of_a_parent_that_has_exited() -> None:
    d, kernel = make_daemon({100: AGENT})
    kernel.procs[100] = (abi.IDENTITY_PENDING, 1)
    kernel.procs[101] = (abi.IDENTITY_PENDING, 100)  # forked while the agent was pending
    d._attest_into_kernel(100, 1, None, abi.IDENTITY_PENDING)
    agent = kernel.procs[100][0]
    assert agent == d.numbers.number(AGENT)
    del kernel.procs[100]  # the agent exits before its child is attested
    d._attest_into_kernel(101, 100, None, abi.IDENTITY_PENDING)
    assert kernel.procs[101][0] == agent


def test_a_pending_child_of_a_parent_never_attested_has_no_identity() -> None:
    d, kernel = make_daemon({})
    kernel.procs[201] = (abi.IDENTITY_PENDING, 200)  # parent 200 gone, never settled
    d._attest_into_kernel(201, 200, None, abi.IDENTITY_PENDING)
    assert kernel.procs[201][0] == abi.IDENTITY_NONE
    kernel.procs[300] = (abi.IDENTITY_PENDING, 1)  # parent still pending
    kernel.procs[301] = (abi.IDENTITY_PENDING, 300)
    d._attest_into_kernel(301, 300, None, abi.IDENTITY_PENDING)
    assert kernel.procs[301][0] == abi.IDENTITY_NONE


def test_the_kernel_map_wins_over_a_remembered_answer_for_a_reused_pid() -> None:
    d, kernel = make_daemon({100: AGENT})
    kernel.procs[100] = (abi.IDENTITY_PENDING, 1)
    d._attest_into_kernel(100, 1, None, abi.IDENTITY_PENDING)
    kernel.procs[100] = (abi.IDENTITY_NONE, 1)  # pid 100 reused by a process with none
    kernel.procs[101] = (abi.IDENTITY_PENDING, 100)
    d._attest_into_kernel(101, 100, None, abi.IDENTITY_PENDING)
    assert kernel.procs[101][0] == abi.IDENTITY_NONE


def test_remembered_answers_are_bounded_and_the_oldest_go_first() -> None:
    d, kernel = make_daemon({})
    n = daemon.SETTLED_REMEMBERED
    for pid in range(1, n + 11):
        kernel.procs[pid] = (abi.IDENTITY_PENDING, 0)
        d._attest_into_kernel(pid, 0, None, abi.IDENTITY_PENDING)
    assert len(d._settled) == n
    assert 1 not in d._settled and 10 not in d._settled
    assert 11 in d._settled and n + 10 in d._settled
