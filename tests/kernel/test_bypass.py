"""Attacks on enforcement, each with a positive control (docs/threat-model.md).

Every attempt here runs against the kernel programs alone, with no daemon
process at all, so each refusal also holds while the daemon is down.  The
agent is a process in the scratch cgroup whose pid the test writes into the
kernel's identity map; what it does after that (threads, forks, new
namespaces, a move to another cgroup, sockets handed in from outside) must
not shed the identity, and what it runs is judged by the file that runs.

Controls: for each refusal, the same step done the allowed way succeeds, so
no test passes because something unrelated failed.
"""

from __future__ import annotations

import errno
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import free_port_pair, spawn

from sidecar.enforce.enforcer import Enforcer, IdentityNumbers, identity_number
from sidecar.kernel import abi
from sidecar.kernel.checks import cgroup2_root, find_mount
from sidecar.policy import load_policy_text
from sidecar.proc.cgroups import remove_tree

AGENT = "spiffe://example.org/agent/attacker"
RAW_OK = "spiffe://example.org/agent/pinger"  # the same agent, with other socket kinds listed
AUDITED = "spiffe://example.org/agent/audited"
PLAIN = "spiffe://example.org/agent/plain"  # accepts no dangerous capability
ACCEPT_ALL = "    capabilities: [CAP_SYS_ADMIN, CAP_BPF, CAP_SYS_PTRACE, CAP_SYS_MODULE]\n"
NOBODY = 65534
PYTHON = os.path.realpath(sys.executable)
KILLED = -signal.SIGKILL

# The agent: runs the Python it is sent (one JSON string a line) and answers
# with the JSON of `result`, or {"oserror": errno}.
AGENT_PY = r"""
import ctypes, errno, json, os, socket, subprocess, sys, threading, time
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x10000000, 0x40000000
MS_BIND, MS_REC, MS_PRIVATE = 4096, 16384, 1 << 18

def check(rc):
    if rc != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

def in_child(fn):
    # Run fn in a forked child; its return value is the exit code, a signal is -N.
    pid = os.fork()
    if pid == 0:
        try:
            code = fn()
        except OSError as e:
            code = 100 + (e.errno or 0)
        except BaseException:
            code = 99
        os._exit(code or 0)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

def make(fam, typ, proto=0):
    try:
        socket.socket(fam, typ, proto).close()
        return 0
    except OSError as e:
        return e.errno

def send(host, port, fam=socket.AF_INET, sock=None):
    s = sock or socket.socket(fam, socket.SOCK_DGRAM)
    try:
        s.sendto(b"x", (host, port))
        return 0
    except OSError as e:
        return e.errno
    finally:
        if sock is None:
            s.close()

def tcp(host, port, fam=socket.AF_INET):
    s = socket.socket(fam, socket.SOCK_STREAM)
    s.settimeout(2)
    try:
        s.connect((host, port))
        return 0
    except OSError as e:
        return e.errno
    finally:
        s.close()

def run(argv):
    return subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode

ns = dict(globals())
for line in sys.stdin:
    ns["result"] = None
    try:
        exec(json.loads(line), ns)
        out = ns["result"]
    except OSError as e:
        out = {"oserror": e.errno}
    print(json.dumps(out), flush=True)
"""

HELPERS_C = {
    # The leader thread leaves with pthread_exit; another thread lives on and connects.
    "leaderexit": r"""
#include <arpa/inet.h>
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/socket.h>
#include <unistd.h>
static int port_ok, port_bad;
static int send_to(int port) {
    int s = socket(AF_INET, SOCK_DGRAM, 0);
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    inet_pton(AF_INET, "127.0.0.1", &a.sin_addr);
    int r = sendto(s, "x", 1, 0, (struct sockaddr *)&a, sizeof(a)) < 0 ? errno : 0;
    close(s);
    return r;
}
static void *worker(void *arg) {
    (void)arg;
    usleep(300000); /* the leader is a zombie by now */
    printf("%d %d\n", send_to(port_ok), send_to(port_bad));
    fflush(stdout);
    usleep(atoi(getenv("HOLD_MS") ? getenv("HOLD_MS") : "0") * 1000);
    exit(0);
}
int main(int argc, char **argv) {
    pthread_t t;
    port_ok = atoi(argv[1]);
    port_bad = atoi(argv[2]);
    pthread_create(&t, NULL, worker, NULL);
    pthread_exit(NULL);
}
""",
    # A thread other than the leader calls execv.
    "threadexec": r"""
#include <pthread.h>
#include <unistd.h>
static char **args;
static void *worker(void *arg) { (void)arg; execv(args[0], args); return NULL; }
int main(int argc, char **argv) {
    pthread_t t;
    (void)argc;
    args = argv + 1;
    pthread_create(&t, NULL, worker, NULL);
    pthread_join(t, NULL);
    return 3;
}
""",
}
STATIC_C = {"static-ok": "int main(void){return 0;}", "static-bad": "int main(void){return 42;}"}


def open_dir(prefix: str) -> Path:
    """A directory every user can reach (pytest's own sit under a root-only one)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    d.chmod(0o777)
    return d


@pytest.fixture(scope="module")
def bins() -> Iterator[dict[str, Path]]:
    d = open_dir("sidecar-bins-")
    try:
        yield _build(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _build(d: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for name, src in HELPERS_C.items():
        (d / f"{name}.c").write_text(src)
        subprocess.run(
            ["cc", "-O2", "-pthread", "-o", str(d / name), str(d / f"{name}.c")], check=True
        )
        out[name] = d / name
    for name, src in STATIC_C.items():
        (d / f"{name}.c").write_text(src)
        subprocess.run(["cc", "-static", "-o", str(d / name), str(d / f"{name}.c")], check=True)
        out[name] = d / name
    return out


class Agent:
    """A process that holds an identity and attacks on request."""

    def __init__(self, cgroup: Path, uid: int | None = None, privileged: bool = True) -> None:
        self.proc = spawn(
            cgroup,
            [sys.executable, "-c", AGENT_PY],
            uid=uid,
            privileged=privileged,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = self.proc.pid

    def do(self, code: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(textwrap.dedent(code)) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the agent died"
        return json.loads(line)

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


class Rig:
    """Kernel programs, a loaded policy, and a way to make agents."""

    def __init__(self, programs: Any, cgroup: Path, work: Path, bins: dict[str, Path]) -> None:
        self.programs = programs
        self.cgroup = cgroup
        self.work = work
        self.bins = bins
        self.ok = free_port_pair()
        self.bad = self.ok + 1
        self.tool = work / "tool"  # an allowed executable the tests tamper with
        shutil.copy2("/usr/bin/true", self.tool)
        self.forbidden = work / "forbidden"
        shutil.copy2("/usr/bin/id", self.forbidden)
        self.agents: list[Agent] = []
        self.abstract = f"sidecar-test-{uuid.uuid4().hex[:8]}"
        self.enforcer = Enforcer(programs, IdentityNumbers())

    def load(self, extra_exec: tuple[str, ...] = ()) -> None:
        allowed = [
            PYTHON,
            "/usr/bin/true",
            str(self.tool),
            *(str(p) for p in self.bins.values() if p.name != "static-bad"),
            *extra_exec,
        ]
        egress = f"""    egress:
      - name: ok
        cidrs: [127.0.0.1/32, "::1/128"]
        ports: [{self.ok}]
        protocols: [tcp, udp]
"""
        # The attackers run as root and keep root's capabilities (the
        # policy accepts them): what holds, holds against them too.
        w = self.work
        unix = f'    unix: ["{w}/ok.sock", "{w}/dir/*", "@{self.abstract}-ok"]\n'
        if self.programs.unix is None:  # a kernel before 6.7: such a policy is refused
            unix = ""
        text = f"""apiVersion: sidecar/v1
kind: Policy
identities:
  - id: {AGENT}
    mode: enforce
{egress}{ACCEPT_ALL}{unix}    exec: [{", ".join(allowed)}]
  - id: {RAW_OK}
    mode: enforce
{egress}{ACCEPT_ALL}    sockets: [inet/raw/icmp, inet/raw/raw, inet6/raw/icmpv6, inet/dgram/udplite,
              inet/dgram/icmp]
  - id: {AUDITED}
    mode: audit
{egress}{ACCEPT_ALL}{unix}    exec: [{PYTHON}]
  - id: {PLAIN}
    mode: enforce
{egress}"""
        self.enforcer.load(load_policy_text(text, "bypass-policy.yaml"))

    def agent(
        self, identity: str = AGENT, uid: int | None = None, privileged: bool = True
    ) -> Agent:
        a = Agent(self.cgroup, uid, privileged)
        self.programs.set_identity(a.pid, identity_number(identity))
        self.agents.append(a)
        return a

    def close(self) -> None:
        for a in self.agents:
            a.close()


@pytest.fixture
def rig(scratch_cgroup: Path, pin_dir: Path, bins: dict[str, Path]) -> Iterator[Rig]:
    from sidecar.kernel.loader import KernelPrograms, LoadOptions

    tracefs = find_mount("tracefs")
    assert tracefs is not None
    work = open_dir("sidecar-bypass-")  # the unprivileged agent writes here too
    k = KernelPrograms(LoadOptions(pin_dir=pin_dir, scope=scratch_cgroup, tracefs=tracefs))
    try:
        k.load()
        k.attach()
        r = Rig(k, scratch_cgroup, work, bins)
        try:
            r.load()
            yield r
        finally:
            r.close()
    finally:
        k.close(detach=True)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture
def outside() -> Iterator[Path]:
    """A cgroup outside the scope, that the test made (root-owned, removed after)."""
    cg = cgroup2_root() / f"sidecar-test-out-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        yield cg
    finally:
        remove_tree(cg)


# -- identity lifetime ------------------------------------------------------------------


def test_the_identity_outlives_a_leader_thread_that_exits_first(rig: Rig) -> None:
    a = rig.agent()
    # The leader calls pthread_exit; the surviving thread is judged as the agent.
    out = a.do(
        f"""
        p = subprocess.run([{str(rig.bins["leaderexit"])!r}, "{rig.ok}", "{rig.bad}"],
                           capture_output=True, text=True)
        result = p.stdout.split()
        """
    )
    assert out == ["0", str(errno.EPERM)]


def test_the_identity_ends_when_the_last_thread_does(rig: Rig) -> None:
    proc = spawn(
        rig.cgroup,
        [str(rig.bins["leaderexit"]), str(rig.ok), str(rig.bad)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "HOLD_MS": "1500"},
    )
    rig.programs.set_identity(proc.pid, identity_number(AGENT))
    assert proc.stdout is not None
    assert proc.stdout.readline().split() == ["0", str(errno.EPERM)]
    # The leader is gone, the process is not: the kernel still holds its identity.
    assert rig.programs.proc_state(proc.pid) is not None
    assert rig.programs.proc_state(proc.pid)[0] == identity_number(AGENT)
    assert proc.wait(10) == 0
    assert rig.programs.proc_state(proc.pid) is None  # removed with the last thread


def test_exec_from_a_thread_other_than_the_leader_is_judged(rig: Rig) -> None:
    a = rig.agent()
    te = str(rig.bins["threadexec"])
    assert a.do(f"result = run([{te!r}, '/usr/bin/true'])") == 0  # control
    assert a.do(f"result = run([{te!r}, {str(rig.forbidden)!r}])") == KILLED


def test_a_thread_of_the_agent_is_judged_as_the_agent(rig: Rig) -> None:
    a = rig.agent()
    out = a.do(
        f"""
        box = []
        t = threading.Thread(target=lambda: box.extend([send("127.0.0.1", {rig.ok}),
                                                         send("127.0.0.1", {rig.bad})]))
        t.start(); t.join()
        result = box
        """
    )
    assert out == [0, errno.EPERM]


def test_children_and_grandchildren_carry_the_identity(rig: Rig) -> None:
    a = rig.agent()
    assert a.do(f"result = in_child(lambda: send('127.0.0.1', {rig.ok}))") == 0
    assert a.do(f"result = in_child(lambda: send('127.0.0.1', {rig.bad}))") == errno.EPERM
    assert (
        a.do(f"result = in_child(lambda: in_child(lambda: send('127.0.0.1', {rig.bad})))")
        == errno.EPERM
    )
    # vfork-style spawning (posix_spawn, subprocess) too
    code = f"import socket; socket.socket(2, 2).sendto(b'x', ('127.0.0.1', {rig.bad}))"
    assert a.do(f"result = run([{PYTHON!r}, '-c', {code!r}])") == 1


def test_a_new_session_and_process_group_keep_the_identity(rig: Rig) -> None:
    a = rig.agent()
    assert (
        a.do(f"result = in_child(lambda: (os.setsid(), send('127.0.0.1', {rig.bad}))[1])")
        == errno.EPERM
    )


# -- exec judged by the file ------------------------------------------------------------


def test_a_forbidden_file_is_killed_before_it_runs_and_an_allowed_one_runs(rig: Rig) -> None:
    a = rig.agent()
    assert a.do(f"result = run([{str(rig.tool)!r}])") == 0
    assert a.do("result = run(['/usr/bin/true'])") == 0
    assert a.do(f"result = run([{str(rig.forbidden)!r}])") == KILLED
    assert a.do("result = run(['/usr/bin/id'])") == KILLED


def test_a_symlink_to_a_forbidden_file_is_killed_and_one_to_an_allowed_file_runs(
    rig: Rig,
) -> None:
    good, bad = rig.work / "link-good", rig.work / "link-bad"
    good.symlink_to(rig.tool)
    bad.symlink_to(rig.forbidden)
    a = rig.agent()
    assert a.do(f"result = run([{str(good)!r}])") == 0
    assert a.do(f"result = run([{str(bad)!r}])") == KILLED


def test_a_file_renamed_over_an_allowed_path_is_killed(rig: Rig) -> None:
    a = rig.agent()
    assert a.do(f"result = run([{str(rig.tool)!r}])") == 0  # control: the allowed file
    swap = rig.work / "swap"
    shutil.copy2(rig.forbidden, swap)
    os.replace(swap, rig.tool)
    assert a.do(f"result = run([{str(rig.tool)!r}])") == KILLED


def test_an_allowed_file_overwritten_in_place_is_killed_until_reload(rig: Rig) -> None:
    a = rig.agent()
    assert a.do(f"result = run([{str(rig.tool)!r}])") == 0
    ino = rig.tool.stat().st_ino
    # The agent itself rewrites the file it may run, keeping the inode.
    a.do(
        f"""
        with open({str(rig.tool)!r}, 'r+b') as f:
            f.write(open({str(rig.forbidden)!r}, 'rb').read())
        result = 0
        """
    )
    assert rig.tool.stat().st_ino == ino
    assert a.do(f"result = run([{str(rig.tool)!r}])") == KILLED
    rig.load()  # the operator reloads: the file as it is now is trusted again
    assert a.do(f"result = run([{str(rig.tool)!r}])") == 0


def test_an_allowed_path_rewritten_as_a_script_for_a_forbidden_interpreter_is_killed(
    rig: Rig,
) -> None:
    a = rig.agent()
    script = rig.work / "script"
    script.write_text("#!/usr/bin/true\n")
    script.chmod(0o755)
    assert a.do(f"result = run([{str(script)!r}])") == 0  # interpreter allowed: runs
    script.write_text(f"#!{rig.forbidden}\n")
    assert a.do(f"result = run([{str(script)!r}])") == KILLED
    rig.tool.write_text(f"#!{rig.forbidden}\n")  # the allowed path itself
    assert a.do(f"result = run([{str(rig.tool)!r}])") == KILLED


def test_a_bind_mount_over_an_allowed_path_in_a_private_mount_namespace_is_killed(
    rig: Rig,
) -> None:
    a = rig.agent()
    tool, bad = str(rig.tool), str(rig.forbidden)
    attempt = f"""
        def attack(over):
            check(libc.unshare(CLONE_NEWNS))
            check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
            if over:
                check(libc.mount({bad!r}.encode(), {tool!r}.encode(), None, MS_BIND, None))
            os.execv({tool!r}, [{tool!r}])
        """
    a.do(attempt)
    assert a.do("result = in_child(lambda: attack(False))") == 0  # control: same steps
    assert a.do("result = in_child(lambda: attack(True))") == KILLED


def test_a_bind_mount_made_in_an_unprivileged_user_namespace_is_killed(rig: Rig) -> None:
    a = rig.agent(uid=NOBODY)
    tool, bad = str(rig.tool), str(rig.forbidden)
    a.do(
        f"""
        def attack(over):
            check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS))
            check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None))
            if over:
                check(libc.mount({bad!r}.encode(), {tool!r}.encode(), None, MS_BIND, None))
            os.execv({tool!r}, [{tool!r}])
        """
    )
    control = a.do("result = in_child(lambda: attack(False))")
    if control == 100 + errno.EPERM:
        pytest.fail("unprivileged user namespaces are off here: the attack cannot be tried")
    assert control == 0
    assert a.do("result = in_child(lambda: attack(True))") == KILLED


def test_a_chroot_holding_another_file_at_the_allowed_path_is_killed(rig: Rig) -> None:
    root = rig.work / "jail"
    (root / "bin").mkdir(parents=True)
    os.link(rig.bins["static-ok"], root / "bin" / "ok")  # the same file: allowed
    shutil.copy2(rig.bins["static-bad"], root / "bin" / "bad")
    # A copy of an allowed file is another file; spelled like the allowed one inside the jail.
    inside = root / str(rig.bins["static-ok"]).lstrip("/")
    inside.parent.mkdir(parents=True)
    shutil.copy2(rig.bins["static-bad"], inside)
    rig.load()  # after the hard link: a new link changes the file's ctime
    a = rig.agent()
    a.do(
        f"""
        def jailed(path):
            os.chroot({str(root)!r}); os.chdir("/")
            os.execv(path, [path])
        """
    )
    assert a.do("result = in_child(lambda: jailed('/bin/ok'))") == 0
    assert a.do(f"result = in_child(lambda: jailed({str(rig.bins['static-ok'])!r}))") == KILLED
    assert a.do("result = in_child(lambda: jailed('/bin/bad'))") == KILLED


def test_exec_through_a_descriptor_is_judged_by_the_file(rig: Rig) -> None:
    a = rig.agent()
    a.do(
        """
        def fexec(path):
            fd = os.open(path, os.O_RDONLY)
            os.execve(fd, [path], {})
        """
    )
    assert a.do(f"result = in_child(lambda: fexec({str(rig.tool)!r}))") == 0
    assert a.do(f"result = in_child(lambda: fexec({str(rig.forbidden)!r}))") == KILLED


def test_a_hard_link_to_an_allowed_file_made_after_the_policy_is_killed(rig: Rig) -> None:
    a = rig.agent()
    link = rig.work / "hard"
    os.link(rig.tool, link)  # same inode, but its ctime moved: no longer trusted
    assert a.do(f"result = run([{str(link)!r}])") == KILLED
    rig.load()
    assert a.do(f"result = run([{str(link)!r}])") == 0
    assert a.do(f"result = run([{str(rig.tool)!r}])") == 0


def test_audit_mode_reports_but_does_not_kill(rig: Rig) -> None:
    a = rig.agent(AUDITED)
    assert a.do(f"result = run([{str(rig.forbidden)!r}])") == 0


# -- every socket judged ----------------------------------------------------------------


@pytest.mark.parametrize(
    "family, kind, proto",
    [
        (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW),
        (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
        (socket.AF_INET, socket.SOCK_DGRAM, 136),  # UDP-Lite
    ],
    ids=["raw", "icmp-raw", "icmpv6-raw", "udplite"],
)
def test_socket_kinds_not_listed_are_refused_at_creation(
    rig: Rig, family: int, kind: int, proto: int
) -> None:
    attacker, listed = rig.agent(), rig.agent(RAW_OK)
    code = f"result = make({family}, {kind}, {proto})"
    assert listed.do(code) == 0  # control: listed, it is made
    assert attacker.do(code) == errno.EPERM
    assert attacker.do(f"result = make({family}, socket.SOCK_DGRAM, 0)") == 0  # plain UDP


def test_mptcp_is_not_tcp(rig: Rig) -> None:
    a = rig.agent()
    assert a.do("result = make(socket.AF_INET, socket.SOCK_STREAM, 262)") == errno.EPERM
    assert a.do("result = make(socket.AF_INET, socket.SOCK_STREAM, 0)") == 0


def test_icmp_ping_sockets_are_refused_in_a_namespace_that_allows_them(rig: Rig) -> None:
    code = """
        def ping():
            check(libc.unshare(CLONE_NEWNET))
            open("/proc/sys/net/ipv4/ping_group_range", "w").write("0 2147483647")
            return make(socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP)
        result = in_child(ping)
        """
    assert rig.agent(RAW_OK).do(code) == 0
    assert rig.agent().do(code) == errno.EPERM


def test_udp_lite_does_not_pass_as_udp_at_send(rig: Rig) -> None:
    a = rig.agent(RAW_OK)  # may make the socket; its egress names udp, not udplite
    out = a.do(
        f"""
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM, 136)
        result = [send("127.0.0.1", {rig.ok}, sock=s)]
        s.close()
        result.append(send("127.0.0.1", {rig.ok}))
        """
    )
    assert out == [errno.EPERM, 0]


def test_a_tcp_only_port_is_not_reachable_over_udp_and_back(rig: Rig) -> None:
    a = rig.agent()
    assert a.do(f"result = send('127.0.0.1', {rig.ok})") == 0
    assert a.do(f"result = send('127.0.0.1', {rig.bad})") == errno.EPERM
    assert a.do(f"result = tcp('127.0.0.1', {rig.bad})") == errno.EPERM
    assert a.do(f"result = tcp('::ffff:127.0.0.1', {rig.bad}, socket.AF_INET6)") == errno.EPERM


def test_ipv4_source_routing_options_are_refused(rig: Rig) -> None:
    a = rig.agent()
    # LSRR through 127.0.0.2, then 127.0.0.1: the first hop is not the judged address.
    out = a.do(
        """
        lsrr = bytes([1, 0x83, 7, 4, 127, 0, 0, 2])
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        r = []
        try:
            s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, 0x10); r.append(0)
        except OSError as e:
            r.append(e.errno)
        for opt in (lsrr, b""):
            try:
                s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, opt); r.append(0)
            except OSError as e:
                r.append(e.errno)
        s.close()
        result = r
        """
    )
    assert out == [0, errno.EPERM, 0]  # IP_TOS and clearing the options are fine


def test_ipv6_routing_headers_are_refused(rig: Rig) -> None:
    a = rig.agent()
    out = a.do(
        """
        s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        rthdr = bytes([0, 2, 0, 1, 0, 0, 0, 0]) + socket.inet_pton(socket.AF_INET6, "::2")
        r = []
        for name, val in ((socket.IPV6_UNICAST_HOPS, (5).to_bytes(4, "little")),
                          (socket.IPV6_RTHDR, rthdr)):
            try:
                s.setsockopt(socket.IPPROTO_IPV6, name, val); r.append(0)
            except OSError as e:
                r.append(e.errno)
        s.close()
        result = r
        """
    )
    assert out == [0, errno.EPERM]


def test_a_new_network_namespace_does_not_shed_the_judgement(rig: Rig) -> None:
    a = rig.agent()
    out = a.do(
        f"""
        def fresh():
            check(libc.unshare(CLONE_NEWNET))
            return send("127.0.0.1", {rig.bad})
        def control():
            check(libc.unshare(CLONE_NEWNET))
            return send("127.0.0.1", {rig.ok})
        result = [in_child(control), in_child(fresh)]
        """
    )
    # loopback is down in a new namespace: the allowed send passes the hook and fails there
    assert out == [errno.ENETUNREACH, errno.EPERM]


# -- enforcement follows the identity, not the cgroup ----------------------------------


def test_an_agent_that_moves_itself_out_of_the_scope_is_still_judged(
    rig: Rig, outside: Path
) -> None:
    a = rig.agent()
    a.do(f"open({str(outside / 'cgroup.procs')!r}, 'w').write('0'); result = 0")
    assert str(a.pid) in (outside / "cgroup.procs").read_text().split()
    assert a.do(f"result = send('127.0.0.1', {rig.ok})") == 0
    assert a.do(f"result = send('127.0.0.1', {rig.bad})") == errno.EPERM
    assert a.do("result = make(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)") == errno.EPERM
    assert a.do(f"result = run([{str(rig.forbidden)!r}])") == KILLED
    assert a.do(f"result = run([{str(rig.tool)!r}])") == 0


def test_a_socket_made_outside_the_scope_and_handed_in_is_judged_at_use(
    rig: Rig, outside: Path
) -> None:
    a = rig.agent()
    path = rig.work / "handoff.sock"
    a.do(
        f"""
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind({str(path)!r}); srv.listen(1)
        def receive():
            c, _ = srv.accept()
            msg, fds, _, _ = socket.recv_fds(c, 16, 2)
            c.close()
            return [socket.socket(fileno=fd) for fd in fds]
        result = 0
        """
    )
    # A process outside the scope, with no identity: it makes the sockets and passes them in.
    giver = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import socket, sys
                open({str(outside / "cgroup.procs")!r}, "w").write("0")
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                u.sendto(b"x", ("127.0.0.1", {rig.bad}))  # itself unjudged: no identity
                c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                c.connect({str(path)!r})
                socket.send_fds(c, [b"x"], [u.fileno(), t.fileno()])
                """
            ),
        ]
    )
    out = a.do(
        f"""
        u, t = receive()
        t.settimeout(2)
        r = [send("127.0.0.1", {rig.bad}, sock=u), send("127.0.0.1", {rig.ok}, sock=u)]
        try:
            t.connect(("127.0.0.1", {rig.bad})); r.append(0)
        except OSError as e:
            r.append(e.errno)
        result = r
        """
    )
    assert giver.wait(10) == 0  # the control: unjudged outside the scope
    assert out == [errno.EPERM, 0, errno.EPERM]


def test_a_process_outside_the_scope_without_an_identity_is_never_judged(
    rig: Rig, outside: Path
) -> None:
    """The hooks are attached at the cgroup2 root: everything else on the host passes."""
    rig.agent()  # an agent is under policy meanwhile
    code = textwrap.dedent(
        f"""
        import socket, subprocess
        open({str(outside / "cgroup.procs")!r}, "w").write("0")
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", ("127.0.0.1", {rig.bad}))
        socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW).close()
        t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        t.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes([1, 0x83, 7, 4, 127, 0, 0, 2]))
        assert subprocess.run([{str(rig.forbidden)!r}], stdout=subprocess.DEVNULL).returncode == 0
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# -- the pinned state -------------------------------------------------------------------


def test_the_pin_directory_is_root_only(rig: Rig, pin_dir: Path) -> None:
    assert pin_dir.stat().st_mode & 0o777 == 0o700
    a = rig.agent(uid=NOBODY)
    out = a.do(
        f"""
        try:
            os.listdir({str(pin_dir)!r}); result = 0
        except OSError as e:
            result = e.errno
        """
    )
    assert out == errno.EACCES


def test_an_unprivileged_agent_is_held_like_a_root_one(rig: Rig) -> None:
    rig.tool.chmod(0o777)  # a file the agent may write (policy validate warns of it)
    rig.load()
    a = rig.agent(uid=NOBODY)
    assert a.do(f"result = send('127.0.0.1', {rig.ok})") == 0
    assert a.do(f"result = send('127.0.0.1', {rig.bad})") == errno.EPERM
    assert a.do(f"result = run([{str(rig.forbidden)!r}])") == KILLED
    assert a.do(f"result = run([{str(rig.tool)!r}])") == 0
    assert a.do(f"result = open({str(rig.tool)!r}, 'ab').write(b'\\0')") == 1  # its own write
    assert a.do(f"result = run([{str(rig.tool)!r}])") == KILLED


# -- privilege ----------------------------------------------------------------------------


def test_an_agent_holding_a_capability_its_policy_refuses_is_killed_at_exec(rig: Rig) -> None:
    held = rig.agent(PLAIN, privileged=True)  # root, with CAP_SYS_ADMIN, CAP_BPF, ...
    assert held.do("result = run(['/usr/bin/true'])") == KILLED
    dropped = rig.agent(PLAIN, privileged=False)  # root without them: runs
    assert dropped.do("result = run(['/usr/bin/true'])") == 0
    accepted = rig.agent(AGENT, privileged=True)  # its policy accepts them
    assert accepted.do("result = run(['/usr/bin/true'])") == 0


def test_capabilities_regained_through_a_setuid_exec_are_refused(rig: Rig) -> None:
    setuid = rig.work / "setuid-true"
    shutil.copy2("/usr/bin/true", setuid)
    os.chown(setuid, 0, 0)
    setuid.chmod(0o4755)
    a = rig.agent(PLAIN, uid=NOBODY)
    assert a.do("result = run(['/usr/bin/true'])") == 0  # nobody holds no capability
    # setuid root: the new image would hold root's capabilities on the host.
    assert a.do(f"result = run([{str(setuid)!r}])") == KILLED


def test_capabilities_inside_a_user_namespace_of_its_own_do_not_count(rig: Rig) -> None:
    a = rig.agent(PLAIN, uid=NOBODY)
    out = a.do(
        """
        def inside():
            check(libc.unshare(CLONE_NEWUSER))  # full capabilities, in its own namespace only
            os.execv("/usr/bin/true", ["/usr/bin/true"])
        result = in_child(inside)
        """
    )
    assert out == 0


# -- unix sockets ----------------------------------------------------------------------------

UNIX_HELPERS = """
def unix_try(addr, kind=socket.SOCK_STREAM):
    s = socket.socket(socket.AF_UNIX, kind)
    try:
        if kind == socket.SOCK_STREAM:
            s.connect(addr)
        else:
            s.sendto(b"x", addr)
        return 0
    except OSError as e:
        return e.errno
    finally:
        s.close()
result = 0
"""


@pytest.fixture
def listeners(rig: Rig) -> Iterator[dict[str, str]]:
    """Unix sockets listening at allowed and refused addresses (stream and datagram)."""
    if rig.programs.unix is None:
        release = tuple(int(x) for x in os.uname().release.split(".")[:2])
        if release < (6, 7):
            pytest.skip(f"kernel {os.uname().release} has no unix-socket hooks (6.7+)")
        pytest.fail(f"unix-socket hooks did not load: {rig.programs.unix_problem}")
    w = rig.work
    (w / "dir").mkdir()
    paths = {
        "ok": f"{w}/ok.sock",
        "bad": f"{w}/bad.sock",
        "longer": f"{w}/ok.sock2",  # the allowed exact path with more after it
        "in_dir": f"{w}/dir/a.sock",
        "beside_dir": f"{w}/dirx.sock",  # shares the prefix's letters, not its slash
        "dgram_ok": f"{w}/dir/d.sock",
        "dgram_bad": f"{w}/d.sock",
        "abs_ok": "\0" + rig.abstract + "-ok",
        "abs_bad": "\0" + rig.abstract + "-bad",
    }
    socks = []
    for name, addr in paths.items():
        kind = socket.SOCK_DGRAM if name.startswith("dgram") else socket.SOCK_STREAM
        s = socket.socket(socket.AF_UNIX, kind)
        s.bind(addr)
        if kind == socket.SOCK_STREAM:
            s.listen(8)
        if not addr.startswith("\0"):
            os.chmod(addr, 0o777)
        socks.append(s)
    try:
        yield paths
    finally:
        for s in socks:
            s.close()


def test_unix_socket_addresses_not_listed_are_refused(rig: Rig, listeners: dict[str, str]) -> None:
    a = rig.agent()
    a.do(UNIX_HELPERS)
    p = listeners
    refused = {
        name: a.do(f"result = unix_try({p[name]!r})")
        for name in ("ok", "bad", "longer", "in_dir", "beside_dir", "abs_ok", "abs_bad")
    }
    assert refused == {
        "ok": 0,
        "bad": errno.EPERM,
        "longer": errno.EPERM,
        "in_dir": 0,
        "beside_dir": errno.EPERM,
        "abs_ok": 0,
        "abs_bad": errno.EPERM,
    }
    dgram = "socket.SOCK_DGRAM"
    assert a.do(f"result = unix_try({p['dgram_ok']!r}, {dgram})") == 0
    assert a.do(f"result = unix_try({p['dgram_bad']!r}, {dgram})") == errno.EPERM
    # The same address spelled another way is judged as spelled: refused, not let through.
    rel = os.path.relpath(p["ok"], "/")
    assert a.do(f"os.chdir('/'); result = unix_try({rel!r})") == errno.EPERM


def test_a_unix_path_is_judged_up_to_its_nul_whatever_follows_it(
    rig: Rig, listeners: dict[str, str]
) -> None:
    # The kernel reaches a path socket by the C string in sun_path; bytes the
    # caller adds past its NUL (within the address length) are not part of
    # it, so the program clears them before the lookup.  Each tail is tried
    # behind an allowed and a refused path (the control), including a tail
    # that spells an allowed path and one that runs to the end of sun_path.
    a = rig.agent()
    a.do(UNIX_HELPERS)
    p = listeners
    names = ("ok", "in_dir", "bad", "beside_dir")
    paths = {name: p[name].encode() for name in names}
    fill = 107  # sun_path holds 108: the last tail runs to its end (Python keeps one for a NUL)
    tails = [lambda _: b"junk", lambda _: b"/ok.sock", lambda _: b"\0\0\0x"]
    tails.append(lambda path: b"y" * (fill - len(path) - 1))
    for tail in tails:
        addrs = {name: path + b"\0" + tail(path) for name, path in paths.items()}
        got = {name: a.do(f"result = unix_try({addr!r})") for name, addr in addrs.items()}
        assert got == {
            "ok": 0,
            "in_dir": 0,
            "bad": errno.EPERM,
            "beside_dir": errno.EPERM,
        }, addrs
    # And with no tail at all.
    assert a.do(f"result = unix_try({p['ok'].encode()!r})") == 0


def test_unix_sockets_are_judged_in_threads_children_and_unprivileged(
    rig: Rig, listeners: dict[str, str]
) -> None:
    bad, ok = listeners["bad"], listeners["ok"]
    a = rig.agent(uid=NOBODY)
    a.do(UNIX_HELPERS)
    assert a.do(f"result = unix_try({ok!r})") == 0
    assert a.do(f"result = in_child(lambda: unix_try({bad!r}))") == errno.EPERM
    out = a.do(
        f"""
        box = []
        t = threading.Thread(target=lambda: box.append(unix_try({bad!r})))
        t.start(); t.join()
        result = box
        """
    )
    assert out == [errno.EPERM]


def test_unix_sockets_of_identities_without_a_list_and_of_everyone_else_pass(
    rig: Rig, listeners: dict[str, str], outside: Path
) -> None:
    bad = listeners["bad"]
    unlisted = rig.agent(RAW_OK)  # its policy names no unix list: unrestricted
    unlisted.do(UNIX_HELPERS)
    assert unlisted.do(f"result = unix_try({bad!r})") == 0
    audited = rig.agent(AUDITED)  # audit mode: reported, not refused
    audited.do(UNIX_HELPERS)
    assert audited.do(f"result = unix_try({bad!r})") == 0
    code = textwrap.dedent(
        f"""
        import socket
        open({str(outside / "cgroup.procs")!r}, "w").write("0")
        s = socket.socket(socket.AF_UNIX)
        s.connect({bad!r})
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.stdout.strip() == "ok", out.stderr


def test_an_agent_that_leaves_the_scope_is_still_held_to_its_unix_list(
    rig: Rig, listeners: dict[str, str], outside: Path
) -> None:
    a = rig.agent()
    a.do(UNIX_HELPERS)
    a.do(f"open({str(outside / 'cgroup.procs')!r}, 'w').write('0'); result = 0")
    assert a.do(f"result = unix_try({listeners['ok']!r})") == 0
    assert a.do(f"result = unix_try({listeners['bad']!r})") == errno.EPERM


# -- a full process map ----------------------------------------------------------------------

FILLER_C = r"""
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
int main(int argc, char **argv) {
    int n = atoi(argv[1]);
    for (int i = 0; i < n; i++) {
        pid_t p = fork();
        if (p == 0) { pause(); _exit(0); }
        if (p < 0) { perror("fork"); return 1; }
    }
    printf("ready\n");
    fflush(stdout);
    pause();
    return 0;
}
"""


def test_a_child_of_an_identified_process_never_runs_untracked_when_the_map_is_full(
    scratch_cgroup: Path, pin_dir: Path, bins: dict[str, Path]
) -> None:
    """procsMax 1024, filled by unidentified processes: the agent's new tool is killed, counted."""
    from sidecar.kernel import abi
    from sidecar.kernel.loader import KernelPrograms, LoadOptions

    tracefs = find_mount("tracefs")
    assert tracefs is not None
    work = open_dir("sidecar-full-")
    src = work / "filler.c"
    src.write_text(FILLER_C)
    subprocess.run(["cc", "-O2", "-o", str(work / "filler"), str(src)], check=True)
    k = KernelPrograms(
        LoadOptions(pin_dir=pin_dir, scope=scratch_cgroup, tracefs=tracefs, procs_max=1024)
    )
    filler = None
    try:
        k.load()
        k.attach()
        rig = Rig(k, scratch_cgroup, work, bins)
        rig.load()
        a = rig.agent()
        assert a.do("result = run(['/usr/bin/true'])") == 0  # control: room in the map
        lost_before = k.lost_counts()
        filler = spawn(
            scratch_cgroup,
            [str(work / "filler"), "1100"],
            stdout=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert filler.stdout is not None and filler.stdout.readline().strip() == "ready"
        # The agent's child could not be recorded: it may not run where nothing judges it.
        assert a.do("result = run(['/usr/bin/true'])") == KILLED
        lost = k.lost_counts()
        assert lost[abi.EventType.FORK] > lost_before[abi.EventType.FORK]  # counted, reported
        assert lost[abi.EventType.EXEC] > lost_before[abi.EventType.EXEC]
        os.killpg(filler.pid, signal.SIGKILL)
        filler.wait(10)
        filler = None
        deadline = time.monotonic() + 10  # the fillers' entries go as they are reaped
        while a.do("result = run(['/usr/bin/true'])") != 0:
            assert time.monotonic() < deadline, "the map never had room again"
            time.sleep(0.2)
        rig.close()
    finally:
        if filler is not None:
            os.killpg(filler.pid, signal.SIGKILL)
            filler.wait(10)
        k.close(detach=True)
        shutil.rmtree(work, ignore_errors=True)


# -- pid reuse ---------------------------------------------------------------------


def _unused_pid() -> int:
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    limit = int(Path("/proc/sys/kernel/pid_max").read_text())
    for pid in range(last + 200, min(last + 5000, limit)):
        if not Path(f"/proc/{pid}").exists():
            return pid
    pytest.fail("no free pid found above the last one handed out")


def test_an_identity_written_after_its_process_exited_leaves_nothing_behind(rig: Rig) -> None:
    """The daemon attests from records; by the time it writes, a short tool may be gone."""
    p = spawn(rig.cgroup, ["/bin/true"])
    assert p.wait(10) == 0
    assert rig.programs.proc_state(p.pid) is None  # the kernel removed it at exit
    assert rig.programs.set_identity(p.pid, identity_number(AGENT)) is False
    assert rig.programs.proc_state(p.pid) is None
    # Control: a live process in scope has an entry, and the write lands.
    a = rig.agent()
    state = rig.programs.proc_state(a.pid)
    assert state is not None and state[0] == identity_number(AGENT)


def test_a_reused_pid_never_carries_a_stale_identity(rig: Rig) -> None:
    """An entry left under a pid (however it got there) dies when a new process takes the pid.

    Steers the next pid with ns_last_pid, so a process started from outside
    the scope, with no identity, gets the pid of a planted entry.
    """
    planted_for = identity_number(AGENT)
    last_pid = Path("/proc/sys/kernel/ns_last_pid")
    for _attempt in range(20):
        pid = _unused_pid()
        assert rig.programs.set_identity(pid, planted_for, create=True)
        assert rig.programs.proc_state(pid)[:2] == (planted_for, 0)  # control: it is there
        last_pid.write_text(str(pid - 1))
        child = subprocess.Popen(["/usr/bin/sleep", "5"])
        try:
            if child.pid != pid:  # another process on the host took it first
                continue
            assert rig.programs.proc_state(pid) is None
            # It runs (and execs) as what it is: a process with no identity.
            assert child.poll() is None
            return
        finally:
            child.kill()
            child.wait()
            rig.programs.delete_entries("procs", [pid.to_bytes(4, "little")])
    pytest.fail("could not steer a new process onto the planted pid in 20 tries")


def test_a_unix_record_wakes_nobody_and_a_pending_fork_does(
    rig: Rig, listeners: dict[str, str]
) -> None:
    """Only records someone waits on wake the daemon's reader: a refused unix
    connect is picked up on the reader's next read, like a refused inet one."""
    a = rig.agent()
    a.do(UNIX_HELPERS)
    k = rig.programs
    watch = select.epoll()  # nothing else reads this ring: the test consumes it
    try:
        watch.register(k.fd("events"), select.EPOLLIN | select.EPOLLET)

        def wakeups(code: str) -> int:
            # Consumed up to here: the next record lands where the kernel's
            # adaptive wake-up (a submit without flags) would wake a reader.
            k.poll(0)
            while watch.poll(0.05):  # wake-ups from before
                pass
            a.do(code)
            return len(watch.poll(0.5))

        assert wakeups(f"result = unix_try({listeners['bad']!r})") == 0
        # The control: the watch sees a wake-up, that of a pending parent's fork.
        state = k.proc_state(a.pid)
        assert state is not None
        assert k.set_identity(a.pid, abi.IDENTITY_PENDING)
        try:
            assert wakeups("result = in_child(lambda: 0)") >= 1
        finally:
            assert k.set_identity(a.pid, state.identity)
        assert wakeups(f"result = unix_try({listeners['bad']!r})") == 0
    finally:
        watch.close()
