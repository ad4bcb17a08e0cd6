"""How the daemon settles a pending child with its parent's answer.

The kernel path is proven in tests/kernel/test_identity.py.  The case here,
a parent that has exited before its pending child is attested, cannot be
timed on a real kernel (the parent must outlive its own attestation by less
than the time between the two), so the kernel map is a dict.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from sidecar.daemon import settle
from sidecar.daemon.settle import Settler
from sidecar.enforce.enforcer import IdentityNumbers
from sidecar.kernel import abi
from sidecar.kernel.maps import ProcEntry

AGENT = "spiffe://example.org/agent/research-bot"


class KernelMap:
    """The procs map: pid -> (identity, ppid); start times are not kept here."""

    def __init__(self) -> None:
        self.procs: dict[int, tuple[int, int]] = {}

    def proc_state(self, pid: int) -> ProcEntry | None:
        state = self.procs.get(pid)
        return ProcEntry(*state) if state is not None else None

    def holds_process(self, pid: int, start_ns: int) -> bool:
        return False

    def set_identity(
        self, pid: int, identity: int, ppid: int = 0, *, create: bool = False, start_ns: int = 0
    ) -> bool:
        # As the kernel map: only an entry that is there is updated (BPF_EXIST),
        # and a ppid of 0 keeps the one the entry has.
        if pid not in self.procs and not create:
            return False
        self.procs[pid] = (identity, ppid or self.procs.get(pid, (0, 0))[1])
        return True


class Attestor:
    def __init__(self, matches: dict[int, str]) -> None:
        self.matches = matches
        self.entries: Any = SimpleNamespace(needs_parent=False)

    def attest(
        self, pid: int, parent_identity: str | None, seen: Any = None, still_running: Any = None
    ) -> Any:
        sid = self.matches.get(pid)
        return SimpleNamespace(
            match=SimpleNamespace(spiffe_id=sid) if sid else None,
            facts=SimpleNamespace(cap_eff=0, cap_host=None),
        )


def make_daemon(matches: dict[int, str]) -> tuple[Settler, KernelMap]:
    kernel = KernelMap()
    return Settler(Attestor(matches), kernel, IdentityNumbers(), lambda: None), kernel


def test_a_pending_child_takes_the_answer_of_a_parent_that_has_exited() -> None:
    d, kernel = make_daemon({100: AGENT})
    kernel.procs[100] = (abi.IDENTITY_PENDING, 1)
    kernel.procs[101] = (abi.IDENTITY_PENDING, 100)  # forked while the agent was pending
    d.attest_into_kernel(100, 1, None, abi.IDENTITY_PENDING)
    agent = kernel.procs[100][0]
    assert agent == d.numbers.number(AGENT)
    del kernel.procs[100]  # the agent exits before its child is attested
    d.attest_into_kernel(101, 100, None, abi.IDENTITY_PENDING)
    assert kernel.procs[101][0] == agent


def test_a_pending_child_of_a_parent_never_attested_has_no_identity() -> None:
    d, kernel = make_daemon({})
    kernel.procs[201] = (abi.IDENTITY_PENDING, 200)  # parent 200 gone, never settled
    d.attest_into_kernel(201, 200, None, abi.IDENTITY_PENDING)
    assert kernel.procs[201][0] == abi.IDENTITY_NONE


def test_a_pending_child_of_a_pending_parent_waits_for_the_parent_answer() -> None:
    d, kernel = make_daemon({300: AGENT})
    kernel.procs[300] = (abi.IDENTITY_PENDING, 1)  # parent still pending
    kernel.procs[301] = (abi.IDENTITY_PENDING, 300)
    kernel.procs[302] = (abi.IDENTITY_PENDING, 301)  # and a grandchild
    d.attest_into_kernel(301, 300, None, abi.IDENTITY_PENDING)
    d.attest_into_kernel(302, 301, None, abi.IDENTITY_PENDING)
    assert kernel.procs[301][0] == abi.IDENTITY_PENDING  # not unidentified meanwhile
    d.attest_into_kernel(300, 1, None, abi.IDENTITY_PENDING)
    agent = d.numbers.number(AGENT)
    assert [kernel.procs[p][0] for p in (300, 301, 302)] == [agent, agent, agent]
    # Each entry keeps the parent the kernel gave it.
    assert [kernel.procs[p][1] for p in (300, 301, 302)] == [1, 300, 301]


def test_a_fork_settle_never_overwrites_a_child_attested_since() -> None:
    """The launcher race: the child is attested as itself before the fork record is settled."""
    d, kernel = make_daemon({400: AGENT, 401: "spiffe://example.org/tool/other"})
    kernel.procs[400] = (abi.IDENTITY_PENDING, 1)
    kernel.procs[401] = (abi.IDENTITY_PENDING, 400)
    d.attest_into_kernel(401, 400, None, abi.IDENTITY_PENDING)  # child matched first
    child = kernel.procs[401][0]
    d.settle_forked(401, 400)  # parent still pending: the child would wait
    d.attest_into_kernel(400, 1, None, abi.IDENTITY_PENDING)  # now the parent settles
    assert kernel.procs[401][0] == child  # its own answer stays
    assert kernel.procs[400][0] == d.numbers.number(AGENT)


def test_records_settle_in_kernel_order_within_a_batch() -> None:
    d, kernel = make_daemon({500: AGENT})
    kernel.procs[500] = (abi.IDENTITY_PENDING, 1)
    kernel.procs[501] = (abi.IDENTITY_PENDING, 500)

    def task(pid: int, identity: int, ppid: int = 0) -> abi.Task:
        return abi.Task(pid, pid, ppid, 0, 0, identity, 0, "x")

    exec_ = abi.Exec(
        1, task(500, abi.IDENTITY_PENDING, 1), 0, "/a", (), False, False, abi.Verdict.ALLOW
    )
    fork = abi.Fork(2, task(500, abi.IDENTITY_PENDING, 1), 501)
    out = d.attest_batch([exec_, fork])
    agent = d.numbers.number(AGENT)
    assert out[0] is not None and out[0].number == agent and out[1] is None
    assert kernel.procs[501][0] == agent


def test_the_kernel_map_wins_over_a_remembered_answer_for_a_reused_pid() -> None:
    d, kernel = make_daemon({100: AGENT})
    kernel.procs[100] = (abi.IDENTITY_PENDING, 1)
    d.attest_into_kernel(100, 1, None, abi.IDENTITY_PENDING)
    kernel.procs[100] = (abi.IDENTITY_NONE, 1)  # pid 100 reused by a process with none
    kernel.procs[101] = (abi.IDENTITY_PENDING, 100)
    d.attest_into_kernel(101, 100, None, abi.IDENTITY_PENDING)
    assert kernel.procs[101][0] == abi.IDENTITY_NONE


def test_remembered_answers_are_bounded_and_the_oldest_go_first() -> None:
    d, kernel = make_daemon({})
    n = settle.SETTLED_REMEMBERED
    for pid in range(1, n + 11):
        kernel.procs[pid] = (abi.IDENTITY_PENDING, 0)
        d.attest_into_kernel(pid, 0, None, abi.IDENTITY_PENDING)
    assert len(d.settled) == n
    assert 1 not in d.settled and 10 not in d.settled
    assert 11 in d.settled and n + 10 in d.settled
