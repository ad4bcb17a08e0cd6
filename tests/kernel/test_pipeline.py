"""The kernel pipeline end to end: real BPF programs, real processes, real sockets."""

from __future__ import annotations

import os
import select
import shutil
import socket
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from conftest import Probe, spawn

from sidecar.attest import HashCache, gather, read_start_time
from sidecar.attest.facts import ExecSeen
from sidecar.daemon.reader import Batch
from sidecar.kernel import abi
from sidecar.proc.read import kernel_dev
from sidecar.testing.inprocess import InProcessDaemon
from sidecar.testing.scratch import wait_until

NOBODY = 65534


def test_exec_in_scope_is_reported_with_pid_ppid_uid_exe_and_argv(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    child = spawn(scratch_cgroup, ["/bin/sleep", "0.3"], uid=NOBODY)
    child.wait(10)
    ev = daemon.sink.wait_for(type="exec", pid=child.pid)
    assert ev["ppid"] == os.getpid()
    assert ev["uid"] == NOBODY
    assert ev["gid"] == NOBODY
    assert ev["exe"] == os.path.realpath("/bin/sleep")
    assert ev["argv"] == ["/bin/sleep", "0.3"]
    assert ev["filename"] == "/bin/sleep"
    assert ev["cgroup"].endswith("/" + scratch_cgroup.name)
    assert ev["host"] == "test-host"


def test_exec_outside_the_scope_is_not_reported(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    outside = subprocess.Popen(["/bin/echo", "outside-marker"], stdout=subprocess.DEVNULL)
    outside.wait(10)
    inside = spawn(scratch_cgroup, ["/bin/echo", "inside-marker"], stdout=subprocess.DEVNULL)
    inside.wait(10)
    # Records arrive in order per CPU; waiting for the inside exit covers the outside exec.
    daemon.sink.wait_for(type="exit", pid=inside.pid)
    assert daemon.sink.find(pid=outside.pid) == []
    assert [e["argv"] for e in daemon.sink.find(type="exec", pid=inside.pid)] == [
        ["/bin/echo", "inside-marker"]
    ]


CONNECT = r"""
import socket, sys
family = socket.AF_INET6 if sys.argv[1] == "6" else socket.AF_INET
kind = socket.SOCK_STREAM if sys.argv[2] == "tcp" else socket.SOCK_DGRAM
s = socket.socket(family, kind)
if kind == socket.SOCK_STREAM:
    s.connect((sys.argv[3], int(sys.argv[4])))
else:
    s.sendto(b"x", (sys.argv[3], int(sys.argv[4])))
s.close()
"""


def _run_client(cgroup: Path, family: str, proto: str, host: str, port: int) -> int:
    child = spawn(cgroup, [sys.executable, "-c", CONNECT, family, proto, host, str(port)])
    assert child.wait(20) == 0
    return child.pid


def test_tcp_connect_over_ipv4_is_reported_with_destination_and_caller_pid(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        pid = _run_client(scratch_cgroup, "4", "tcp", "127.0.0.1", port)
    ev = daemon.sink.wait_for(type="connect", pid=pid)
    assert (ev["family"], ev["protocol"], ev["daddr"], ev["dport"]) == (
        "inet",
        "tcp",
        "127.0.0.1",
        port,
    )
    assert ev["hook"] == "connect4"
    assert ev["verdict"] == "allow"


def test_tcp_connect_over_ipv6_is_reported_with_destination_and_caller_pid(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    with socket.create_server(("::1", 0), family=socket.AF_INET6) as srv:
        port = srv.getsockname()[1]
        pid = _run_client(scratch_cgroup, "6", "tcp", "::1", port)
    ev = daemon.sink.wait_for(type="connect", pid=pid)
    assert (ev["family"], ev["protocol"], ev["daddr"], ev["dport"]) == ("inet6", "tcp", "::1", port)
    assert ev["hook"] == "connect6"


def test_udp_sendto_without_connect_is_reported_as_a_connection_attempt(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        pid = _run_client(scratch_cgroup, "4", "udp", "127.0.0.1", port)
        assert srv.recv(16) == b"x"
    ev = daemon.sink.wait_for(type="connect", pid=pid)
    assert (ev["family"], ev["protocol"], ev["daddr"], ev["dport"]) == (
        "inet",
        "udp",
        "127.0.0.1",
        port,
    )
    assert ev["hook"] == "sendmsg4"


def test_a_program_named_with_bytes_that_are_not_utf8_is_recorded_and_so_are_its_neighbours(
    daemon: InProcessDaemon, scratch_cgroup: Path, tmp_path: Path
) -> None:
    """Neither encoding carries such bytes as they are: they are written as \\xNN, and the
    event, the exit and the events around them in the same batch all reach the outputs."""
    odd = tmp_path / os.fsdecode(b"tool\xff")
    shutil.copy("/bin/true", odd)
    odd.chmod(0o755)
    before = spawn(scratch_cgroup, ["/bin/true", "before"])
    child = spawn(scratch_cgroup, [str(odd), os.fsdecode(b"arg\xfe")])
    after = spawn(scratch_cgroup, ["/bin/true", "after"])
    for p in (before, child, after):
        p.wait(10)
    shown = f"{tmp_path}/tool\\xff"
    ev = daemon.sink.wait_for(type="exec", pid=child.pid)
    assert (ev["filename"], ev["exe"], ev["argv"]) == (shown, shown, [shown, "arg\\xfe"])
    assert daemon.sink.wait_for(type="exit", pid=child.pid)["exe"] == shown
    for p, arg in ((before, "before"), (after, "after")):  # positive controls
        assert daemon.sink.wait_for(type="exec", pid=p.pid)["argv"] == ["/bin/true", arg]
    assert not daemon.sink.changed_by_encoding


def test_exit_removes_the_process_from_the_table(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    child = spawn(scratch_cgroup, ["/bin/sleep", "30"])
    try:
        daemon.sink.wait_for(type="exec", pid=child.pid)
        row = daemon.call(lambda: daemon.table.get(child.pid))
        assert row is not None
        assert row.start_ns > 0
        assert row.exe == os.path.realpath("/bin/sleep")
        assert row.argv == ("/bin/sleep", "30")
    finally:
        child.kill()
        child.wait(10)
    daemon.sink.wait_for(type="exit", pid=child.pid)
    assert daemon.call(lambda: daemon.table.get(child.pid)) is None


FORKER = r"""
import os, socket, sys
port = int(sys.argv[1])
pid = os.fork()
if pid == 0:
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.close()
    os._exit(0)
os.waitpid(pid, 0)
print(pid, flush=True)
"""


def test_a_forked_child_is_attributed_to_its_own_pid(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    with socket.create_server(("127.0.0.1", 0)) as srv:
        port = srv.getsockname()[1]
        parent = spawn(
            scratch_cgroup, [sys.executable, "-c", FORKER, str(port)], stdout=subprocess.PIPE
        )
        out, _ = parent.communicate(timeout=20)
    child_pid = int(out.decode().strip())
    assert child_pid != parent.pid
    fork = daemon.sink.wait_for(type="fork", pid=child_pid)
    assert fork["ppid"] == parent.pid
    conn = daemon.sink.wait_for(type="connect", dport=port)
    assert conn["pid"] == child_pid
    assert conn["ppid"] == parent.pid
    wait_until(lambda: daemon.sink.find(type="exit", pid=child_pid), what="child exit")
    assert daemon.call(lambda: daemon.table.get(child_pid)) is None


def test_argv_past_the_argument_limit_is_cut_and_flagged(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    many = [f"a{i}" for i in range(40)]  # more than SIDECAR_MAX_ARGS (32)
    child = spawn(scratch_cgroup, ["/bin/echo", *many], stdout=subprocess.DEVNULL)
    child.wait(10)
    ev = daemon.sink.wait_for(type="exec", pid=child.pid)
    assert ev["argv"] == ["/bin/echo", *many][:32]
    assert ev["args_truncated"] is True

    short = spawn(scratch_cgroup, ["/bin/echo", "x"], stdout=subprocess.DEVNULL)
    short.wait(10)
    assert daemon.sink.wait_for(type="exec", pid=short.pid)["args_truncated"] is False


def test_a_long_argument_is_cut_to_the_per_argument_limit_and_flagged(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    long_arg = "L" * 300  # more than SIDECAR_ARG_MAX (256, NUL included)
    child = spawn(scratch_cgroup, ["/bin/echo", long_arg, "after"], stdout=subprocess.DEVNULL)
    child.wait(10)
    ev = daemon.sink.wait_for(type="exec", pid=child.pid)
    assert ev["argv"][:2] == ["/bin/echo", "L" * 255]
    assert ev["args_truncated"] is True


def test_an_argument_that_just_fits_is_whole_and_one_byte_more_is_flagged(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    # 255 bytes and its NUL fill the per-argument limit exactly: the program
    # then looks at the byte after the copy, which is the argument's own NUL
    # (not cut) or its 256th byte (cut).  Each case is the other's control,
    # with the long argument first, last, and among short ones.
    cases = [
        (["L" * 255], False),
        (["L" * 256], True),
        (["a", "L" * 255, "b"], False),
        (["a", "L" * 256, "b"], True),
        (["a", "L" * 254, "b"], False),
    ]
    for args, cut in cases:
        child = spawn(scratch_cgroup, ["/bin/echo", *args], stdout=subprocess.DEVNULL)
        child.wait(10)
        ev = daemon.sink.wait_for(type="exec", pid=child.pid)
        assert ev["args_truncated"] is cut, [len(a) for a in args]
        assert ev["argv"] == ["/bin/echo", *(a[:255] for a in args)]


FEXECVE = r"""
import os, sys
fd = os.open("/bin/sleep", os.O_RDONLY)
os.execve(fd, ["sleep", "1"], {})
"""


def test_exec_through_a_file_descriptor_reports_its_argv_and_real_file(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    # glibc's fexecve is execveat(fd, "", AT_EMPTY_PATH).  The kernel names the
    # file /dev/fd/N, N being the child's descriptor: the daemon must not
    # resolve that in its own descriptor table, but read the child's exe.
    child = spawn(scratch_cgroup, [sys.executable, "-c", FEXECVE])
    try:
        found = wait_until(
            lambda: [
                e for e in daemon.sink.find(type="exec", pid=child.pid) if e["argv"][0] == "sleep"
            ],
            what="exec of sleep through a file descriptor",
        )
    finally:
        child.kill()
        child.wait(10)
    assert found[0]["argv"] == ["sleep", "1"]
    assert found[0]["filename"].startswith("/dev/fd/")
    assert found[0]["exe"] == os.path.realpath("/bin/sleep")


def test_a_script_reports_the_argv_its_interpreter_runs_with(
    daemon: InProcessDaemon, scratch_cgroup: Path, tmp_path: Path
) -> None:
    # argv is read from the new image's stack, so a #! script reports what
    # the kernel handed its interpreter: the same argv /proc/PID/cmdline shows.
    script = tmp_path / "agent-tool.sh"
    script.write_text("#!/bin/sh\nexec sleep 2\n")
    script.chmod(0o755)
    child = spawn(scratch_cgroup, [str(script), "--flag", "value"])
    try:
        ev = daemon.sink.wait_for(type="exec", pid=child.pid)
        assert ev["argv"] == ["/bin/sh", str(script), "--flag", "value"]
        assert ev["filename"] == str(script)
        assert ev["args_truncated"] is False
    finally:
        child.kill()
        child.wait(10)


def test_secrets_on_the_command_line_never_leave_the_daemon(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    argv = ["/bin/echo", "--token=tok-SECRET-1", "--password", "SECRET-2", "https://u:SECRET-3@h/x"]
    child = spawn(scratch_cgroup, argv, stdout=subprocess.DEVNULL)
    child.wait(10)
    ev = daemon.sink.wait_for(type="exec", pid=child.pid)
    assert ev["argv"] == [
        "/bin/echo",
        "--token=[REDACTED]",
        "--password",
        "[REDACTED]",
        "https://u:[REDACTED]@h/x",
    ]
    assert ev["args_redacted"] is True
    assert "SECRET" not in repr(daemon.sink.events)  # nowhere in any event
    plain = spawn(scratch_cgroup, ["/bin/echo", "hello"], stdout=subprocess.DEVNULL)
    plain.wait(10)
    ev = daemon.sink.wait_for(type="exec", pid=plain.pid)
    assert ev["argv"] == ["/bin/echo", "hello"] and "args_redacted" not in ev


def _cap_eff(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(ln.split()[1] for ln in status.splitlines() if ln.startswith("CapEff:")), 16)


def test_the_exec_record_carries_start_time_running_file_and_host_capabilities(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    """Attestation takes these from the record instead of /proc: they must be /proc's."""
    reader = daemon.daemon.reader
    assert reader is not None
    records: list[abi.Exec] = []
    handoff = reader.handoff

    def keep(batch: Batch) -> None:
        batch = batch.decoded()
        records.extend(r for r in batch.records if isinstance(r, abi.Exec))
        handoff(batch)

    reader.handoff = keep
    root = spawn(scratch_cgroup, ["/bin/sleep", "30"])
    nobody = spawn(scratch_cgroup, ["/bin/sleep", "30"], uid=NOBODY)
    # Full capabilities, but in a user namespace of its own: none on the host.
    userns = spawn(
        scratch_cgroup,
        ["unshare", "--user", "--map-root-user", "/bin/sleep", "30"],
        privileged=True,
    )
    children = (root, nobody, userns)
    try:

        def record_of(pid: int) -> abi.Exec | None:
            mine = [r for r in records if r.task.pid == pid and r.filename == "/bin/sleep"]
            return mine[-1] if mine else None

        got = wait_until(
            lambda: (
                [record_of(c.pid) for c in children]
                if all(record_of(c.pid) for c in children)
                else None
            ),
            10,
            "the exec records of the three sleeps",
        )
        tick = 10**9 // os.sysconf("SC_CLK_TCK")
        for child, rec in zip(children, got, strict=True):
            assert rec is not None
            st = os.stat(f"/proc/{child.pid}/exe")
            assert rec.start_ns // tick == read_start_time(child.pid)
            assert (rec.exe_dev, rec.exe_ino) == (kernel_dev(st.st_dev), st.st_ino)
            assert not rec.flags & abi.EXEC_FILE_UNKNOWN
        assert _cap_eff(root.pid) != 0 and got[0].caps_host == _cap_eff(root.pid)
        assert _cap_eff(nobody.pid) == 0 and got[1].caps_host == 0
        assert _cap_eff(userns.pid) != 0 and got[2].caps_host == 0
        assert (got[1].task.uid, got[1].task.gid) == (NOBODY, NOBODY)
        # The facts attestation builds from the record are those /proc gives.
        for child, rec in zip(children, got, strict=True):
            assert rec is not None
            seen = ExecSeen(
                rec.start_ns, rec.task.uid, rec.task.gid, rec.caps_host, rec.exe_dev, rec.exe_ino
            )
            fast = gather(child.pid, None, HashCache(), seen=seen)
            slow = gather(child.pid, None, HashCache())
            assert fast.cap_host == rec.caps_host
            assert replace(fast, cap_eff=0, cap_host=None) == replace(slow, cap_eff=0)
    finally:
        reader.handoff = handoff
        for c in children:
            c.kill()
            c.wait()


def test_the_fork_record_of_a_pending_parent_wakes_the_reader_and_no_other_does(
    daemon: InProcessDaemon, scratch_cgroup: Path
) -> None:
    """A child forked while its parent is pending is pending too, and refused
    while a policy enforces, until the reader gives it the parent's answer: its
    fork record must wake the reader at once, as the pending exec record does,
    rather than wait up to 50 ms for the reader's next read."""
    kernel = daemon.daemon.kernel
    assert kernel is not None
    probe = Probe(scratch_cgroup)
    watch = select.epoll()  # beside the daemon's: the kernel wakes every waiter
    try:
        watch.register(kernel.fd("events"), select.EPOLLIN | select.EPOLLET)

        def wakeups_of_a_fork(identity: int) -> int:
            assert kernel.set_identity(probe.pid, identity)
            while watch.poll(0.05):  # wake-ups from before
                pass
            # A fork, its child's fork, a UDP send to the discard port, two exits.
            assert probe.ask("fork-connect 127.0.0.1 9") == 0
            return len(watch.poll(0.5))

        # The control: records of processes that are not pending wake nobody.
        assert wakeups_of_a_fork(abi.IDENTITY_NONE) == 0
        assert wakeups_of_a_fork(abi.IDENTITY_PENDING) >= 1
        assert wakeups_of_a_fork(abi.IDENTITY_NONE) == 0
    finally:
        watch.close()
        probe.close()
