"""Kernel enforcement of per-identity allowlists, decided by the real BPF programs.

These tests drive the programs directly (load, attach, write an identity
into the process map, load a policy) so each kernel decision is checked
exactly; tests/kernel/test_daemon_policy.py covers the same path through
the daemon.
"""

from __future__ import annotations

import ctypes
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Probe, free_port_pair, spawn

from sidecar.enforce.enforcer import Enforcer, IdentityNumbers, identity_number
from sidecar.kernel import abi
from sidecar.kernel.checks import find_mount
from sidecar.policy import load_policy_text
from sidecar.testing.scratch import wait_until

AGENT = "spiffe://example.org/agent/a"


@pytest.fixture
def programs(scratch_cgroup: Path, pin_dir: Path) -> Iterator[object]:
    from sidecar.kernel.loader import KernelPrograms, LoadOptions

    tracefs = find_mount("tracefs")
    assert tracefs is not None
    k = KernelPrograms(LoadOptions(pin_dir=pin_dir, scope=scratch_cgroup, tracefs=tracefs))
    k.load()
    k.attach()
    try:
        yield k
    finally:
        k.close(detach=True)


@pytest.fixture
def probe(scratch_cgroup: Path, programs: object) -> Iterator[Probe]:
    p = Probe(scratch_cgroup)
    try:
        yield p
    finally:
        p.close()


def policy(body: str) -> str:
    return f"apiVersion: sidecar/v1\nkind: Policy\n{body}"


def load(programs: object, text: str) -> Enforcer:
    enf = Enforcer(programs, IdentityNumbers())  # type: ignore[arg-type]
    enf.load(load_policy_text(text, "test-policy.yaml"))
    return enf


def test_allowed_tcp_and_udp_over_ipv4_and_ipv6_pass_and_everything_else_gets_eperm(
    programs: object, probe: Probe
) -> None:
    port = free_port_pair()
    load(
        programs,
        policy(
            f"""identities:
  - id: {AGENT}
    mode: enforce
    egress:
      - name: v4-tcp
        cidrs: [127.0.0.1/32]
        ports: [{port}]
        protocols: [tcp]
      - name: v6-udp
        cidrs: ["::1/128"]
        ports: [{port}]
        protocols: [udp]
"""
        ),
    )
    programs.set_identity(probe.pid, identity_number(AGENT))  # type: ignore[attr-defined]
    with socket.create_server(("127.0.0.1", port)):
        assert probe.ask(f"tcp 4 127.0.0.1 {port}") == 0
        assert probe.ask(f"tcp 6 ::ffff:127.0.0.1 {port}") == 0  # same address, v6 spelling
    assert probe.ask(f"udp 6 ::1 {port}") == 0
    assert probe.ask(f"udp 4 127.0.0.1 {port}") == errno.EPERM  # rule is tcp only
    assert probe.ask(f"tcp 6 ::1 {port}") == errno.EPERM  # rule is udp only
    assert probe.ask(f"udp 4 127.0.0.2 {port}") == errno.EPERM
    assert probe.ask(f"udp 6 ::1 {port + 1}") == errno.EPERM


def test_cidr_and_port_range_boundaries_are_exact(programs: object, probe: Probe) -> None:
    port = free_port_pair()
    load(
        programs,
        policy(
            f"""identities:
  - id: {AGENT}
    mode: enforce
    egress:
      - cidrs: [127.0.8.0/30]
        ports: ["{port}-{port + 1}"]
        protocols: [udp]
"""
        ),
    )
    programs.set_identity(probe.pid, identity_number(AGENT))  # type: ignore[attr-defined]
    inside = [("127.0.8.0", port), ("127.0.8.3", port), ("127.0.8.0", port + 1)]
    outside = [
        ("127.0.7.255", port),
        ("127.0.8.4", port),
        ("127.0.8.0", port - 1),
        ("127.0.8.3", port + 2),
    ]
    for host, p in inside:
        assert probe.ask(f"udp 4 {host} {p}") == 0, (host, p)
        assert probe.ask(f"udp 6 ::ffff:{host} {p}") == 0, (host, p)
    for host, p in outside:
        assert probe.ask(f"udp 4 {host} {p}") == errno.EPERM, (host, p)
        assert probe.ask(f"udp 6 ::ffff:{host} {p}") == errno.EPERM, (host, p)


def test_processes_without_identity_fall_to_the_default(programs: object, probe: Probe) -> None:
    port = free_port_pair()
    load(programs, policy(f"defaults:\n  unidentified: deny\nidentities:\n  - id: {AGENT}\n"))
    assert probe.ask(f"udp 4 127.0.0.1 {port}") == errno.EPERM
    load(programs, policy("defaults:\n  unidentified: allow\n"))
    assert probe.ask(f"udp 4 127.0.0.1 {port}") == 0


def test_a_pending_process_may_not_connect(programs: object, probe: Probe) -> None:
    port = free_port_pair()
    load(
        programs,
        policy(f"identities:\n  - id: {AGENT}\n    egress:\n      - cidrs: [127.0.0.0/8]\n"),
    )
    programs.set_identity(probe.pid, abi.IDENTITY_PENDING)  # type: ignore[attr-defined]
    assert probe.ask(f"udp 4 127.0.0.1 {port}") == errno.EPERM
    programs.set_identity(probe.pid, identity_number(AGENT))  # type: ignore[attr-defined]
    assert probe.ask(f"udp 4 127.0.0.1 {port}") == 0


def test_child_and_grandchild_are_held_to_the_same_rules(programs: object, probe: Probe) -> None:
    port = free_port_pair()
    load(
        programs,
        policy(
            f"""identities:
  - id: {AGENT}
    egress:
      - cidrs: [127.0.0.1/32]
        ports: [{port}]
"""
        ),
    )
    programs.set_identity(probe.pid, identity_number(AGENT))  # type: ignore[attr-defined]
    assert probe.ask(f"fork-connect 127.0.0.1 {port}") == 0
    assert probe.ask(f"fork-connect 127.0.0.1 {port + 1}") == errno.EPERM
    assert probe.ask(f"fork-connect 127.0.0.2 {port}") == errno.EPERM


def test_audit_mode_lets_everything_through_and_reports_each_would_deny(
    programs: object, probe: Probe
) -> None:
    port = free_port_pair()
    load(
        programs,
        policy(
            f"""identities:
  - id: {AGENT}
    mode: audit
    egress:
      - cidrs: [127.0.0.1/32]
        ports: [{port}]
"""
        ),
    )
    programs.set_identity(probe.pid, identity_number(AGENT))  # type: ignore[attr-defined]
    programs.poll(0)  # type: ignore[attr-defined]
    assert probe.ask(f"udp 4 127.0.0.2 {port}") == 0
    assert probe.ask(f"udp 4 127.0.0.1 {port + 1}") == 0
    assert probe.ask(f"udp 4 127.0.0.1 {port}") == 0
    seen: list[abi.Connect] = []

    def connects() -> list[abi.Connect]:
        for raw in programs.poll(50):  # type: ignore[attr-defined]
            ev = abi.decode(raw)
            if isinstance(ev, abi.Connect) and ev.task.pid == probe.pid:
                seen.append(ev)
        return seen if len(seen) >= 2 else []

    wait_until(connects, what="two would-deny records")
    assert [(str(e.address), e.port, e.verdict) for e in seen] == [
        ("127.0.0.2", port, abi.Verdict.WOULD_DENY),
        ("127.0.0.1", port + 1, abi.Verdict.WOULD_DENY),
    ]
    assert all(e.task.identity == identity_number(AGENT) for e in seen)


@pytest.fixture
def exec_setup(tmp_path: Path) -> dict[str, str]:
    """An allowed tool, a forbidden one that would write a marker, and ways to reach it."""
    marker = tmp_path / "marker"
    forbidden = tmp_path / "forbidden"
    forbidden.write_text(f"#!/bin/sh\ntouch {marker}\n")
    forbidden.chmod(0o755)
    link = tmp_path / "innocent-name"
    link.symlink_to("/usr/bin/touch")
    script = tmp_path / "script.sh"
    script.write_text(f"#!/usr/bin/touch {marker}\n")  # running it would create the marker
    script.chmod(0o755)
    return {
        "marker": str(marker),
        "forbidden": str(forbidden),
        "link": str(link),
        "script": str(script),
        "dir": str(tmp_path),
    }


def test_a_disallowed_executable_is_killed_before_it_runs_however_it_is_reached(
    programs: object, probe: Probe, exec_setup: dict[str, str]
) -> None:
    load(
        programs,
        policy(
            f"""identities:
  - id: {AGENT}
    exec: [/usr/bin/true, {sys.executable}]
"""
        ),
    )
    programs.set_identity(probe.pid, identity_number(AGENT))  # type: ignore[attr-defined]
    marker = Path(exec_setup["marker"])
    assert probe.ask("exec /usr/bin/true") == 0
    assert probe.ask("exec /bin/true") == 0  # the same file through the system's /bin link
    assert probe.ask(f"exec {exec_setup['forbidden']}") == -9
    assert probe.ask(f"exec /usr/bin/touch {marker}") == -9
    assert probe.ask(f"exec {exec_setup['link']} {marker}") == -9  # symlink to touch
    # relative path: run from the folder holding the symlink
    rel = os.path.relpath(exec_setup["link"], os.getcwd())
    assert probe.ask(f"exec {rel} {marker}") == -9
    assert probe.ask(f"exec {exec_setup['script']}") == -9  # #! script for touch
    assert not marker.exists()


def test_exec_in_audit_mode_runs_and_is_reported_as_would_deny(
    programs: object, probe: Probe, exec_setup: dict[str, str]
) -> None:
    load(
        programs,
        policy(f"identities:\n  - id: {AGENT}\n    mode: audit\n    exec: [/usr/bin/true]\n"),
    )
    programs.set_identity(probe.pid, identity_number(AGENT))  # type: ignore[attr-defined]
    programs.poll(0)  # type: ignore[attr-defined]
    marker = Path(exec_setup["marker"])
    assert probe.ask(f"exec /usr/bin/touch {marker}") == 0
    assert marker.exists()
    found: list[abi.Exec] = []

    def execs() -> list[abi.Exec]:
        for raw in programs.poll(50):  # type: ignore[attr-defined]
            ev = abi.decode(raw)
            if isinstance(ev, abi.Exec) and ev.filename == "/usr/bin/touch":
                found.append(ev)
        return found

    ev = wait_until(execs, what="exec record")[0]
    assert ev.verdict == abi.Verdict.WOULD_DENY


STORM = r"""
import signal, socket, sys
stop = False
def halt(*_):
    global stop
    stop = True
signal.signal(signal.SIGUSR1, halt)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
ok = refused = 0
print("ready", flush=True)
while not stop:
    try:
        s.sendto(b"x", ("127.0.0.1", int(sys.argv[1])))
        ok += 1
    except PermissionError:
        refused += 1
print(ok, refused, flush=True)
"""


def test_reloads_during_a_connect_storm_never_mix_two_policies(
    programs: object, scratch_cgroup: Path
) -> None:
    """Policy A: audit, nothing allowed. Policy B: enforce, the target allowed.

    Either policy lets a send to the target through; only a decision that took
    A's mode with B's rules (or B's mode with A's) could refuse it.  100
    reloads alternate A and B while a process sends as fast as it can; it
    counts every refusal itself.
    """
    port = free_port_pair()
    a = load_policy_text(
        policy(f"identities:\n  - id: {AGENT}\n    mode: audit\n    egress: []\n"), "a"
    )
    b = load_policy_text(
        policy(
            f"identities:\n  - id: {AGENT}\n    mode: enforce\n    egress:\n"
            f"      - cidrs: [127.0.0.1/32]\n        ports: [{port}]\n"
        ),
        "b",
    )
    enf = Enforcer(programs, IdentityNumbers())  # type: ignore[arg-type]
    enf.load(a)
    storm = spawn(
        scratch_cgroup,
        [sys.executable, "-c", STORM, str(port)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert storm.stdout is not None
        assert storm.stdout.readline().strip() == "ready"
        programs.set_identity(storm.pid, identity_number(AGENT))  # type: ignore[attr-defined]
        for i in range(100):
            enf.load(b if i % 2 == 0 else a)
        storm.send_signal(signal.SIGUSR1)
        ok, refused = (int(x) for x in storm.stdout.readline().split())
    finally:
        storm.kill()
        storm.wait(10)
    assert refused == 0
    assert ok > 1000  # the storm really ran across the reloads


def test_a_restart_unpins_links_of_hooks_this_build_no_longer_has(
    programs: object, scratch_cgroup: Path, pin_dir: Path
) -> None:
    from sidecar.kernel import libbpf
    from sidecar.kernel.loader import CGROUP_HOOKS, TRACEPOINTS, KernelPrograms, LoadOptions
    from sidecar.kernel.unix import UNIX_HOOKS

    links = programs.links_dir  # type: ignore[attr-defined]
    assert links == pin_dir / f"v{abi.ABI_VERSION}" / "links"
    # What an older build would leave: a pinned link under a name this build
    # does not use (here a second pin of a live link, so it is a real link).
    fd = libbpf.obj_get(links / "connect4")
    assert fd is not None
    try:
        libbpf.obj_pin(fd, links / "retired_hook")
    finally:
        os.close(fd)
    tracefs = find_mount("tracefs")
    assert tracefs is not None
    again = KernelPrograms(LoadOptions(pin_dir=pin_dir, scope=scratch_cgroup, tracefs=tracefs))
    again.load()
    try:
        report = again.attach()
        assert report.retired == ["retired_hook"]
        assert not (links / "retired_hook").exists()
        current = {pin for pin, *_ in (*TRACEPOINTS, *CGROUP_HOOKS, *UNIX_HOOKS)}
        assert len(current) == 11
        assert {p.name for p in links.iterdir()} == current
    finally:
        again.close(detach=False)


def test_an_upgrade_across_abi_versions_never_reads_old_maps_and_leaves_no_gap(
    scratch_cgroup: Path, pin_dir: Path
) -> None:
    """A build of another map layout pins elsewhere; the new one retires it once in force."""
    from sidecar.kernel.loader import KernelPrograms, LoadOptions

    tracefs = find_mount("tracefs")
    assert tracefs is not None
    text = policy(
        f"""identities:
  - id: {AGENT}
    egress: []
"""
    )
    # The "old" build: pinned under v1, holding the agent's identity in its maps.
    old = KernelPrograms(
        LoadOptions(pin_dir=pin_dir, scope=scratch_cgroup, tracefs=tracefs, abi_dir="v1")
    )
    old.load()
    old.attach()
    new = None
    p = Probe(scratch_cgroup)
    try:
        load(old, text)
        old.set_identity(p.pid, identity_number(AGENT))
        port = free_port_pair()
        assert p.ask(f"udp 4 127.0.0.1 {port}") == errno.EPERM
        old.close(detach=False)  # the old daemon is gone; its programs judge on
        new = KernelPrograms(LoadOptions(pin_dir=pin_dir, scope=scratch_cgroup, tracefs=tracefs))
        new.load()
        new.attach()
        assert new.proc_state(p.pid) is None  # fresh maps: nothing read from the old layout
        assert p.ask(f"udp 4 127.0.0.1 {port}") == errno.EPERM  # the old still holds it
        load(new, text)
        # attested again (rebuild_from_proc): the new maps have no entry for it yet
        assert new.set_identity(p.pid, identity_number(AGENT), create=True)
        retired = new.retire_other_versions()
        assert len(retired) == 11 and not (pin_dir / "v1").exists()
        assert p.ask(f"udp 4 127.0.0.1 {port}") == errno.EPERM  # now held by the new build
        new.set_identity(p.pid, 0)
        # Control: nothing old is left judging.  The kernel frees an unpinned
        # link from a work queue, a moment after retirement: wait for that.
        wait_until(lambda: p.ask(f"udp 4 127.0.0.1 {port}") == 0, 10, "the old build's links freed")
    finally:
        p.close()
        if new is not None:
            new.close(detach=True)
        else:
            old.close(detach=True)


def test_while_an_earlier_daemon_s_programs_still_run_each_event_is_recorded_once(
    scratch_cgroup: Path, pin_dir: Path
) -> None:
    """At start-up the new programs attach before the old ones go, and the kernel
    frees an unpinned link later, from a work queue: both builds run on the same
    events for a moment.  Here the old links are held open, so that moment lasts."""
    from sidecar.kernel import libbpf
    from sidecar.kernel.loader import TRACEPOINTS, KernelPrograms, LoadOptions

    tracefs = find_mount("tracefs")
    assert tracefs is not None
    options = LoadOptions(pin_dir=pin_dir, scope=scratch_cgroup, tracefs=tracefs)
    old = KernelPrograms(options)
    old.load()
    old.attach()
    links = pin_dir / f"v{abi.ABI_VERSION}" / "links"
    held = [libbpf.obj_get(links / pin) for pin, *_ in TRACEPOINTS]
    old.close(detach=False)  # the old daemon is gone; its programs run on
    new = KernelPrograms(options)
    try:
        new.load()
        new.attach()
        assert new.build_id != old.build_id
        assert all(fd is not None for fd in held)

        def run_tools(n: int) -> list[int]:
            pids = []
            for _ in range(n):
                child = spawn(scratch_cgroup, ["/bin/true"])
                assert child.wait(10) == 0
                pids.append(child.pid)
            return pids

        def records_of(pids: list[int]) -> dict[tuple[str, int], int]:
            wanted = {("exec", p): 0 for p in pids} | {("exit", p): 0 for p in pids}
            deadline_reads = 0
            while deadline_reads < 20 and not all(wanted[("exit", p)] for p in pids):
                deadline_reads += 1
                for raw in new.poll(200):
                    ev = abi.decode(raw)
                    kind = {abi.Exec: "exec", abi.Exit: "exit"}.get(type(ev))
                    if kind and (kind, ev.task.pid) in wanted:
                        wanted[(kind, ev.task.pid)] += 1
            return wanted

        def marked_builds() -> set[int]:
            cpus = libbpf.possible_cpus()
            size = ctypes.sizeof(abi.HandledMark)
            raw = libbpf.map_lookup(new.fd("handled"), (0).to_bytes(4, "little"), size * cpus)
            assert raw is not None
            marks = [abi.HandledMark.from_buffer_copy(raw, i * size) for i in range(cpus)]
            return {m.build for m in marks if m.kind}

        both = records_of(run_tools(10))
        assert set(both.values()) == {1}, both
        # Positive control: the old build was running, and handled those events.
        assert old.build_id in marked_builds()
        for fd in held:
            assert fd is not None
            os.close(fd)
        held.clear()
        # The old build gone (freed from the work queue), the new one handles them all.
        wait_until(
            lambda: (
                set(records_of(run_tools(1)).values()) == {1} and marked_builds() == {new.build_id}
            ),
            10,
            "the new build handling every event alone",
        )
        alone = records_of(run_tools(10))
        assert set(alone.values()) == {1}, alone
    finally:
        for fd in held:
            if fd is not None:
                os.close(fd)
        new.close(detach=True)
