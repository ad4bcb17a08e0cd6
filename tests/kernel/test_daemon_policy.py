"""The policy lifecycle through the daemon as operators run it (`sidecar run` in its own process).

Hot reload on file change and on SIGHUP, a bad policy rejected while the old
one keeps enforcing, decision events attributed to identity and instance,
and the fail-static promise: SIGKILL the daemon and every deny keeps denying;
restart it and it takes the pinned state over without attaching twice.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import (
    Probe,
    attached_program_ids,
    free_port_pair,
    hook_program_ids,
    write_entries_file,
)

from sidecar.kernel.checks import cgroup2_root
from sidecar.testing.daemon_process import DaemonConfigFile, DaemonProcess, launch_daemon
from sidecar.testing.scratch import wait_until

AGENT = "spiffe://example.org/agent/research-bot"
PYTHON = os.path.realpath(sys.executable)


def policy_text(port: int, mode: str = "enforce") -> str:
    return f"""apiVersion: sidecar/v1
kind: Policy
defaults:
  unidentified: allow
identities:
  - id: {AGENT}
    mode: {mode}
    egress:
      - name: port-{port}
        cidrs: [127.0.0.1/32]
        ports: [{port}]
        protocols: [udp]
"""


def replace_file(path: Path, text: str) -> None:
    """Write as editors and kubelet do: a new file renamed over the old one."""
    tmp = path.with_suffix(".new")
    tmp.write_text(text)
    os.replace(tmp, path)


@pytest.fixture
def setup(scratch_cgroup: Path, pin_dir: Path, short_tmp: Path) -> dict[str, object]:
    rel = "/" + str(scratch_cgroup.relative_to(cgroup2_root()))
    sha = hashlib.sha256(Path(PYTHON).read_bytes()).hexdigest()
    entries = write_entries_file(
        short_tmp,
        f"""  - spiffeId: {AGENT}
    selectors: [unix:uid:0, "unix:sha256:{sha}", "cgroup:path:{rel}"]
""",
    )
    a, b = free_port_pair(), free_port_pair()
    while b == a:
        b = free_port_pair()
    policy = short_tmp / "policy.yaml"
    policy.write_text(policy_text(a))
    return {
        "entries": entries,
        "policy": policy,
        "a": a,
        "b": b,
        "cgroup": scratch_cgroup,
        "pin_dir": pin_dir,
        "tmp": short_tmp,
    }


def config_file(
    setup: dict[str, object],
    *,
    interval: int = 1,
    detach: bool = True,
    pages: int = 256,
    entries: bool = True,
) -> Path:
    tmp: Path = setup["tmp"]  # type: ignore[assignment]
    return DaemonConfigFile(
        pin_dir=setup["pin_dir"],  # type: ignore[arg-type]
        cgroup=setup["cgroup"],  # type: ignore[arg-type]
        work=tmp,
        host="policy-test",
        detach_on_exit=detach,
        ring_pages=pages,
        entries=setup["entries"] if entries else None,  # type: ignore[arg-type]
        policy=setup["policy"],  # type: ignore[arg-type]
        reload_interval=interval,
    ).write(tmp / "daemon.yaml")


@pytest.fixture
def running(setup: dict[str, object]) -> Iterator[DaemonProcess]:
    d = launch_daemon(config_file(setup), setup["tmp"])  # type: ignore[arg-type]
    try:
        yield d
    finally:
        d.stop()


def attested_probe(d: DaemonProcess, cgroup: Path) -> Probe:
    probe = Probe(cgroup)
    ev = d.wait_for(type="exec", pid=probe.pid)
    if ev["identity"] != AGENT:
        probe.close()
        raise AssertionError(f"probe not attested: {ev}")
    return probe


def test_decisions_are_events_with_identity_instance_serial_rule_and_version(
    running: DaemonProcess, setup: dict[str, object]
) -> None:
    probe = attested_probe(running, setup["cgroup"])  # type: ignore[arg-type]
    try:
        loaded = running.wait_for(type="policy_loaded")
        assert probe.ask(f"udp 4 127.0.0.1 {setup['a']}") == 0
        assert probe.ask(f"udp 4 127.0.0.1 {setup['b']}") == errno.EPERM
        deny = running.wait_for(type="connect", pid=probe.pid, verdict="deny")
        assert deny["identity"] == AGENT
        assert deny["instance_id"]
        assert deny["svid_serial"] is None  # it never asked for a credential: none was signed
        assert deny["rule"] == "default"
        assert deny["dport"] == setup["b"]
        assert deny["policy_version"] == loaded["policy_version"]
        # Allowed decisions are not logged unless the policy says log_allowed.
        assert not running.events() or all(
            e.get("verdict") != "allow" for e in running.events() if e["type"] == "connect"
        )
    finally:
        probe.close()


def test_policy_file_change_reloads_and_a_bad_one_keeps_the_old_enforcing(
    running: DaemonProcess, setup: dict[str, object]
) -> None:
    a, b = setup["a"], setup["b"]
    policy: Path = setup["policy"]  # type: ignore[assignment]
    probe = attested_probe(running, setup["cgroup"])  # type: ignore[arg-type]
    try:
        first = running.wait_for(type="policy_loaded")["policy_version"]
        assert probe.ask(f"udp 4 127.0.0.1 {a}") == 0
        replace_file(policy, policy_text(b))  # type: ignore[arg-type]
        second = wait_until(
            lambda: [
                e
                for e in running.events()
                if e["type"] == "policy_loaded" and e["policy_version"] != first
            ],
            what="reload after file change",
        )[0]["policy_version"]
        assert probe.ask(f"udp 4 127.0.0.1 {a}") == errno.EPERM
        assert probe.ask(f"udp 4 127.0.0.1 {b}") == 0

        policy.write_text(policy_text(b).replace("ports: [", "ports: [0, "))
        rejected = running.wait_for(type="policy_rejected")
        assert f"{policy}:" in rejected["error"] and "ports" in rejected["error"]
        assert probe.ask(f"udp 4 127.0.0.1 {b}") == 0  # the old policy still enforces
        assert probe.ask(f"udp 4 127.0.0.1 {a}") == errno.EPERM
        assert running.proc.poll() is None
        assert second != first
    finally:
        probe.close()


def test_the_running_daemon_carries_no_compiler(running: DaemonProcess) -> None:
    """Compiling happens in a child that exits: the daemon maps neither BCC nor LLVM."""
    import bcc  # noqa: F401  (control: a process that loads BCC shows it in its maps)

    assert "libbcc" in Path(f"/proc/{os.getpid()}/maps").read_text()
    running.wait_for(type="policy_loaded")  # started, programs attached, policy in force
    maps = Path(f"/proc/{running.proc.pid}/maps").read_text()
    assert "libbcc" not in maps and "LLVM" not in maps
    assert running.proc.poll() is None


def test_sighup_reloads(setup: dict[str, object]) -> None:
    d = launch_daemon(config_file(setup, interval=3600), setup["tmp"])  # type: ignore[arg-type]
    probe = None
    try:
        probe = attested_probe(d, setup["cgroup"])  # type: ignore[arg-type]
        first = d.wait_for(type="policy_loaded")["policy_version"]
        replace_file(setup["policy"], policy_text(setup["b"]))  # type: ignore[arg-type]
        assert probe.ask(f"udp 4 127.0.0.1 {setup['b']}") == errno.EPERM  # not yet: no timer
        d.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: [
                e
                for e in d.events()
                if e["type"] == "policy_loaded" and e["policy_version"] != first
            ],
            what="reload on SIGHUP",
        )
        assert probe.ask(f"udp 4 127.0.0.1 {setup['b']}") == 0
    finally:
        if probe is not None:
            probe.close()
        d.stop()


def _ours_at_root(pin_dir: Path) -> tuple[set[int], list[int]]:
    """Our hook programs, and those of them attached at the cgroup2 root (once each)."""
    ours = hook_program_ids(pin_dir)
    return ours, [i for i in attached_program_ids(cgroup2_root()) if i in ours]


def test_daemon_killed_denies_still_deny_and_restart_takes_over_without_attaching_twice(
    setup: dict[str, object],
) -> None:
    a, b = setup["a"], setup["b"]
    cgroup: Path = setup["cgroup"]  # type: ignore[assignment]
    cfg = config_file(setup, detach=False)
    d = launch_daemon(cfg, setup["tmp"])  # type: ignore[arg-type]
    probe = None
    try:
        probe = attested_probe(d, cgroup)
        assert probe.ask(f"udp 4 127.0.0.1 {b}") == errno.EPERM
        pin_dir: Path = setup["pin_dir"]  # type: ignore[assignment]
        ours, attached = _ours_at_root(pin_dir)
        # connect4/6, sendmsg4/6, sock_create, setsockopt, connect_unix, sendmsg_unix:
        # each attached once, at the root
        assert len(ours) == 8 and sorted(attached) == sorted(ours)

        d.kill()
        assert probe.ask(f"udp 4 127.0.0.1 {b}") == errno.EPERM  # fail-static
        assert probe.ask(f"udp 4 127.0.0.1 {a}") == 0
        assert probe.ask(f"fork-connect 127.0.0.1 {b}") == errno.EPERM  # new children too
        assert _ours_at_root(pin_dir) == (ours, attached)

        d = launch_daemon(cfg, setup["tmp"])  # type: ignore[arg-type]
        # Taken over: the new programs swapped in behind the same links, the
        # old ones gone, nothing attached twice.
        new, attached = _ours_at_root(pin_dir)
        assert len(new) == 8 and sorted(attached) == sorted(new)
        assert not ours & set(attached_program_ids(cgroup2_root()))
        assert probe.ask(f"udp 4 127.0.0.1 {b}") == errno.EPERM
        assert probe.ask(f"udp 4 127.0.0.1 {a}") == 0
        # The table was rebuilt from /proc: the probe is known and attested again.
        import json

        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar.cli",
                "identities",
                "--json",
                "--socket",
                str(setup["tmp"]) + "/admin.sock",
            ],  # type: ignore[operator]
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert out.returncode == 0, out.stderr
        pids = {r["pid"]: r for r in json.loads(out.stdout)["instances"]}
        assert pids[probe.pid]["spiffe_id"] == AGENT
        # Root without the dangerous capabilities: CAP_NET_RAW shown, nothing to disable.
        assert "CAP_NET_RAW" in pids[probe.pid]["capabilities"]
        assert "CAP_SYS_ADMIN" not in pids[probe.pid]["capabilities"]
        assert pids[probe.pid]["can_disable_enforcement"] is False
    finally:
        if probe is not None:
            probe.close()
        d.stop()


def test_uninstall_removes_every_program_and_pin(setup: dict[str, object]) -> None:
    pin_dir: Path = setup["pin_dir"]  # type: ignore[assignment]
    d = launch_daemon(config_file(setup, detach=False), setup["tmp"])  # type: ignore[arg-type]
    d.stop()
    assert pin_dir.exists()  # fail-static: still attached after a clean stop
    ours = hook_program_ids(pin_dir)
    assert len(ours) == 8 and ours <= set(attached_program_ids(cgroup2_root()))
    out = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "uninstall", "--pin-dir", str(pin_dir)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    assert out.returncode == 0, out.stderr
    assert not pin_dir.exists()
    assert not ours & set(attached_program_ids(cgroup2_root()))


def test_a_file_swapped_in_at_an_allowed_path_is_killed_by_the_kernel(
    setup: dict[str, object],
) -> None:
    """The kernel allows by file (device, inode): another file at the same path is refused."""
    tmp: Path = setup["tmp"]  # type: ignore[assignment]
    tool = tmp / "allowed-tool"
    shutil.copy2("/bin/true", tool)
    policy: Path = setup["policy"]  # type: ignore[assignment]
    policy.write_text(
        policy_text(setup["a"]) + f"    exec: [{os.path.realpath(sys.executable)}, {tool}]\n"  # type: ignore[arg-type]
    )
    d = launch_daemon(config_file(setup), tmp)
    probe = None
    try:
        probe = attested_probe(d, setup["cgroup"])  # type: ignore[arg-type]
        assert probe.ask(f"exec {tool}") == 0  # the allowed file runs
        swapped = tmp / "swap"
        shutil.copy2("/bin/sleep", swapped)
        os.replace(swapped, tool)  # same path, another file
        assert probe.ask(f"exec {tool} 30") == -signal.SIGKILL
        ev = wait_until(
            lambda: [
                e
                for e in d.events()
                if e["type"] == "exec" and e.get("verdict") == "deny" and "30" in e["argv"]
            ],
            what="the kernel's deny",
        )[0]
        assert ev["rule"] == "default"
        assert ev["identity"] == AGENT
    finally:
        if probe is not None:
            probe.close()
        d.stop()


# The agent a launcher starts: it waits a little (its launcher's records are
# attested meanwhile), then tries the port its policy does not name.
LAUNCHED = """
import os, socket, time
time.sleep(0.5)
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
try:
    s.sendto(b"x", ("127.0.0.1", {port})); code = 0
except OSError as e:
    code = e.errno
os.write(1, b"%d\\n" % code)  # one write: twenty agents share the pipe
"""


def test_agents_started_by_launchers_while_pending_all_keep_their_identity(
    running: DaemonProcess, setup: dict[str, object]
) -> None:
    """timeout and the shell fork while they are pending; their agent child must stay attested."""
    code = LAUNCHED.format(port=setup["b"])
    n = 20
    launcher = subprocess_in(
        setup["cgroup"],  # type: ignore[arg-type]
        [
            "/bin/sh",
            "-c",
            f'for i in $(seq {n}); do (timeout 20 "$0" -c "$1" || echo "rc=$?") & done; wait',
            PYTHON,
            code,
        ],
    )
    out, _ = launcher.communicate(timeout=60)
    assert launcher.returncode == 0
    answers = out.split()
    assert len(answers) == n
    # Every agent was judged as the agent: none slipped out as unidentified (allowed).
    assert answers == [str(errno.EPERM)] * n
    # The control: the same code run by an unidentified process is let through.
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert plain.stdout.split() == ["0"]


def subprocess_in(cgroup: Path, argv: list[str]) -> subprocess.Popen[str]:
    from conftest import spawn

    return spawn(  # type: ignore[return-value]
        cgroup, argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_after_the_daemon_is_killed_an_agent_is_still_held_on_every_path(
    setup: dict[str, object],
) -> None:
    cfg = config_file(setup, detach=False)
    d = launch_daemon(cfg, setup["tmp"])  # type: ignore[arg-type]
    probe = None
    outside = cgroup2_root() / f"sidecar-test-out-{os.getpid()}"
    outside.mkdir()
    try:
        probe = attested_probe(d, setup["cgroup"])  # type: ignore[arg-type]
        d.kill()
        b, a = setup["b"], setup["a"]
        assert probe.ask(f"udp 4 127.0.0.1 {a}") == 0  # control
        assert probe.ask(f"udp 4 127.0.0.1 {b}") == errno.EPERM
        assert probe.ask(f"fork-connect 127.0.0.1 {b}") == errno.EPERM
        # Out of the scope, as root can move itself: still the agent.
        (outside / "cgroup.procs").write_text(str(probe.pid))
        assert probe.ask(f"udp 4 127.0.0.1 {b}") == errno.EPERM
        assert probe.ask(f"tcp 6 ::ffff:127.0.0.1 {b}") == errno.EPERM
        assert probe.ask(f"udp 4 127.0.0.1 {a}") == 0
    finally:
        if probe is not None:
            probe.close()
        d.stop()
        from sidecar.proc.cgroups import remove_tree

        remove_tree(outside)


def test_an_agent_attested_while_holding_refused_capabilities_is_killed_and_reported(
    running: DaemonProcess, setup: dict[str, object]
) -> None:
    from conftest import spawn

    # Root with CAP_SYS_ADMIN, CAP_BPF, ...: matched as the agent, whose policy refuses them.
    held = spawn(
        setup["cgroup"],  # type: ignore[arg-type]
        [sys.executable, "-c", "import time; time.sleep(30)"],
        privileged=True,
    )
    try:
        assert held.wait(10) == -signal.SIGKILL
        ev = running.wait_for(type="exec", pid=held.pid)
        assert ev["identity"] == AGENT
        assert (ev["verdict"], ev["rule"]) == ("deny", "capabilities")
        assert set(ev["capabilities"]) == {
            "CAP_SYS_MODULE",
            "CAP_SYS_PTRACE",
            "CAP_SYS_ADMIN",
            "CAP_BPF",
        }
    finally:
        held.kill()
        held.wait(10)
    control = attested_probe(running, setup["cgroup"])  # type: ignore[arg-type]
    try:
        assert control.ask(f"udp 4 127.0.0.1 {setup['a']}") == 0  # the same, without them
    finally:
        control.close()


def test_a_policy_file_written_in_place_is_not_taken_half_written(
    running: DaemonProcess, setup: dict[str, object]
) -> None:
    """Half of the file is valid YAML that allows nothing: it must never be enforced."""
    import time

    probe = attested_probe(running, setup["cgroup"])  # type: ignore[arg-type]
    policy: Path = setup["policy"]  # type: ignore[assignment]
    a = setup["a"]
    full = policy_text(a).replace("protocols: [udp]", "protocols: [udp, tcp]")
    half = full[: full.index("    egress:")]  # the agent listed, with no egress rule yet
    assert "egress" not in half and AGENT in half
    try:
        assert probe.ask(f"udp 4 127.0.0.1 {a}") == 0
        refused = 0
        with policy.open("r+") as fh:  # in place: truncate, write half, pause, write the rest
            fh.truncate(0)
            fh.write(half)
            fh.flush()
            deadline = time.monotonic() + 0.9  # most of a reload interval (1 s)
            while time.monotonic() < deadline:
                refused += probe.ask(f"udp 4 127.0.0.1 {a}") == errno.EPERM
            fh.write(full[len(half) :])
        deadline = time.monotonic() + 3.0  # the daemon takes the finished file
        while time.monotonic() < deadline:
            refused += probe.ask(f"udp 4 127.0.0.1 {a}") == errno.EPERM
        assert refused == 0
        loaded = running.wait_for(type="policy_loaded", source=str(policy))
        assert loaded["policy_version"]
        assert not [e for e in running.events() if e["type"] == "policy_rejected"]
    finally:
        probe.close()


def _execs_while_down(
    setup: dict[str, object], cfg: Path, marker: str, n: int
) -> tuple[DaemonProcess, subprocess.Popen[bytes]]:
    """Start a daemon, SIGKILL it, run n execs (argv marker-1..n) in scope, start another."""
    from conftest import spawn

    d = launch_daemon(cfg, setup["tmp"])  # type: ignore[arg-type]
    try:
        d.wait_for(type="policy_loaded")
    finally:
        d.kill()
    loop = spawn(
        setup["cgroup"],  # type: ignore[arg-type]
        ["/bin/sh", "-c", f"for i in $(seq {n}); do /bin/true {marker}-$i; done"],
    )
    assert loop.wait(60) == 0
    return launch_daemon(cfg, setup["tmp"]), loop  # type: ignore[arg-type]


def test_what_the_kernel_records_while_the_daemon_is_down_reaches_the_next_daemon(
    setup: dict[str, object],
) -> None:
    """The ring buffer is pinned: execs seen while no daemon runs are reported after restart."""
    cfg = config_file(setup, detach=False)
    n = 200
    d, _ = _execs_while_down(setup, cfg, "down-marker", n)
    try:

        def markers() -> set[str]:
            return {
                a
                for e in d.events()
                if e["type"] == "exec"
                for a in e.get("argv", [])
                if a.startswith("down-marker-")
            }

        got = wait_until(lambda: len(markers()) == n and markers(), what="every marker exec")
        assert got == {f"down-marker-{i}" for i in range(1, n + 1)}
        # Nothing was lost meanwhile, so no loss is reported, by either daemon.
        assert not [e for e in d.events() if e["type"] == "lost"]
    finally:
        d.stop()


def test_records_that_did_not_fit_while_the_daemon_was_down_are_reported_lost_exactly(
    setup: dict[str, object],
) -> None:
    """A one-page ring overflows while no daemon reads it: received + reported lost = made."""
    cfg = config_file(setup, detach=False, pages=1)
    n = 200
    d, loop = _execs_while_down(setup, cfg, "full-marker", n)
    try:

        def lost_execs() -> int:
            return sum(e["counts"].get("exec", 0) for e in d.events() if e["type"] == "lost")

        wait_until(lambda: lost_execs() > 0, what="the loss reported")
        time.sleep(1.5)  # any later loss report, and the last records read
        received = [
            e
            for e in d.events()
            if e["type"] == "exec" and any(a.startswith("full-marker-") for a in e["argv"])
        ]
        shell = [
            e
            for e in d.events()
            if e["type"] == "exec"
            and e.get("pid") == loop.pid
            and not any(a.startswith("full-marker-") for a in e["argv"])
        ]
        assert 0 < len(received) < n
        # Every exec the kernel saw while the ring was full is counted: the loop's own
        # (the shell) and its 200 tools, either received or reported lost, once.
        assert len(received) + len(shell) + lost_execs() == n + 1
        d.kill()  # a third daemon reports nothing again
        d = launch_daemon(cfg, setup["tmp"])  # type: ignore[arg-type]
        d.wait_for(type="policy_loaded", timeout=20)
        time.sleep(1.5)
        assert lost_execs() == n + 1 - len(received) - len(shell)
    finally:
        d.stop()


@pytest.mark.parametrize("entries", [True, False], ids=["reader-thread", "read-on-loop"])
def test_a_daemon_killed_in_an_exec_storm_loses_nothing_silently_and_repeats_nothing(
    setup: dict[str, object], entries: bool
) -> None:
    """SIGKILL mid-storm: records read but not yet written stay in the ring for the next.

    Each exec of the storm reaches the output exactly once, or is reported
    lost by the kernel's count; none is written twice by the two daemons.
    With entries a thread reads the ring; without, the event loop does.
    """
    from conftest import spawn

    cfg = config_file(setup, detach=False, entries=entries)
    n = 3000
    marker = "storm-marker-"

    def marked(d: DaemonProcess) -> list[str]:
        return [
            a
            for e in d.events()
            if e["type"] == "exec"
            for a in e.get("argv", [])
            if a.startswith(marker)
        ]

    d = launch_daemon(cfg, setup["tmp"])  # type: ignore[arg-type]
    loop = None
    try:
        d.wait_for(type="policy_loaded")
        loop = spawn(
            setup["cgroup"],  # type: ignore[arg-type]
            ["/bin/sh", "-c", f"for i in $(seq {n}); do /bin/true {marker}$i; done"],
        )
        wait_until(lambda: len(marked(d)) >= 300, timeout=30, what="the storm under way")
        d.kill()  # mid-storm
        before = len(marked(d))
        assert loop.wait(120) == 0
        assert before < n  # the kill did land mid-storm
        d = launch_daemon(cfg, setup["tmp"])  # type: ignore[arg-type]

        def lost_execs() -> int:
            return sum(e["counts"].get("exec", 0) for e in d.events() if e["type"] == "lost")

        wait_until(lambda: len(set(marked(d))) + lost_execs() >= n, timeout=60, what="every exec")
        time.sleep(1.0)  # anything written twice would show by now
        got = marked(d)
        shell = [
            e
            for e in d.events()
            if e["type"] == "exec"
            and e.get("pid") == loop.pid
            and not any(a.startswith(marker) for a in e["argv"])
        ]
        assert len(got) == len(set(got)), "an exec was written twice"
        assert set(got) <= {f"{marker}{i}" for i in range(1, n + 1)}
        # The loop's own exec (the shell) and its n tools: each received or counted lost.
        assert len(got) + len(shell) + lost_execs() == n + 1
    finally:
        if loop is not None and loop.poll() is None:
            loop.kill()
            loop.wait()
        d.stop()
