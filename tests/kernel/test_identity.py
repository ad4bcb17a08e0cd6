"""Attested runtime identities and their SPIFFE credentials, end to end on the real kernel."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import site
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import spawn, write_entries_file

from sidecar.attest import read_start_time
from sidecar.enforce.enforcer import identity_number
from sidecar.testing.inprocess import InProcessDaemon, inprocess_config, run_daemon
from sidecar.testing.scratch import wait_until

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("wl_client.py")
NOBODY = 65534
PYTHON = os.path.realpath(sys.executable)


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cgroup_rel(cg: Path) -> str:
    from sidecar.kernel.checks import cgroup2_root

    return "/" + str(cg.relative_to(cgroup2_root()))


def copy_with_one_byte_changed(src: str, dst: Path) -> Path:
    """A copy that still runs: byte 9 of an ELF file is header padding."""
    data = bytearray(Path(src).read_bytes())
    assert data[:4] == b"\x7fELF"
    data[9] ^= 0x5A
    dst.write_bytes(bytes(data))
    dst.chmod(0o755)
    return dst


@pytest.fixture
def binaries(short_tmp: Path) -> dict[str, Path]:
    sleeper = short_tmp / "agent-sleep"
    shutil.copy2("/bin/sleep", sleeper)
    sleeper.chmod(0o755)
    return {
        "sleeper": sleeper,
        "sleeper_changed": copy_with_one_byte_changed("/bin/sleep", short_tmp / "agent-sleep-2"),
        "python_changed": copy_with_one_byte_changed(PYTHON, short_tmp / "python-2"),
    }


def write_entries(tmp: Path, scratch: Path, sleeper: Path) -> Path:
    return write_entries_file(
        tmp,
        f"""  - spiffeId: spiffe://example.org/agent/sleeper
    selectors:
      - unix:uid:{NOBODY}
      - unix:sha256:{sha256(sleeper)}
  - spiffeId: spiffe://example.org/agent/research-bot
    selectors:
      - unix:uid:0
      - unix:sha256:{sha256(PYTHON)}
      - cgroup:path:{cgroup_rel(scratch)}
""",
    )


@pytest.fixture
def agentd(
    scratch_cgroup: Path, pin_dir: Path, short_tmp: Path, binaries: dict[str, Path]
) -> Iterator[InProcessDaemon]:
    entries = write_entries(short_tmp, scratch_cgroup, binaries["sleeper"])
    cfg = inprocess_config(scratch_cgroup, pin_dir, short_tmp, entries=entries, svid_ttl=10)
    with run_daemon(cfg) as d:
        yield d


def client_env() -> dict[str, str]:
    # The repository and this interpreter's packages, also for a copied interpreter
    # that does not know the venv it came from.
    paths = [str(REPO), *site.getsitepackages()]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}


def run_client(
    cgroup: Path | None, sock: Path, *args: str, exe: str = sys.executable
) -> list[dict]:
    argv = [exe, str(CLIENT), str(sock), *args]
    if cgroup is None:
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=client_env())
    else:
        proc = spawn(cgroup, argv, stdout=subprocess.PIPE, text=True, env=client_env())
    out, _ = proc.communicate(timeout=60)
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_process_matching_uid_and_sha256_is_attested_and_others_are_not(
    agentd: InProcessDaemon, scratch_cgroup: Path, binaries: dict[str, Path]
) -> None:
    good = spawn(scratch_cgroup, [str(binaries["sleeper"]), "0.5"], uid=NOBODY)
    other = spawn(scratch_cgroup, ["/bin/true"], uid=NOBODY)
    changed = spawn(scratch_cgroup, [str(binaries["sleeper_changed"]), "0.1"], uid=NOBODY)
    for p in (good, other, changed):
        assert p.wait(10) == 0
    ev = agentd.sink.wait_for(type="exec", pid=good.pid)
    assert ev["identity"] == "spiffe://example.org/agent/sleeper"
    assert ev["instance_id"]
    assert agentd.sink.wait_for(type="exec", pid=other.pid)["identity"] is None
    assert agentd.sink.wait_for(type="exec", pid=changed.pid)["identity"] is None
    agentd.sink.wait_for(type="exit", pid=good.pid)
    assert agentd.call(lambda: agentd.daemon.instances.get(good.pid)) is None
    # It never asked for a credential, so none was signed for it: a short-lived
    # tool costs no signature.
    assert ev["svid_serial"] is None
    assert not agentd.sink.find(type="credential_issued", instance_id=ev["instance_id"])


def test_a_credential_is_issued_when_the_agent_first_asks_and_its_events_carry_the_serial(
    agentd: InProcessDaemon, scratch_cgroup: Path, short_tmp: Path
) -> None:
    [r] = run_client(scratch_cgroup, short_tmp / "workload.sock", "x509", "1")
    assert r["kind"] == "x509" and r["spiffe_id"] == "spiffe://example.org/agent/research-bot"
    issued = agentd.sink.wait_for(type="credential_issued", svid_serial=r["serial"])
    # The client's later events carry the serial; at exit the credential is revoked.
    [exit_ev] = wait_until(
        lambda: agentd.sink.find(type="exit", instance_id=issued["instance_id"]),
        what="the client's exit",
    )
    assert exit_ev["svid_serial"] == r["serial"]
    revoked = agentd.sink.wait_for(type="credential_revoked", instance_id=issued["instance_id"])
    assert revoked["svid_serial"] == r["serial"]


DOUBLE_FORK = r"""
import os, socket, sys, time
port = int(sys.argv[1])
r, w = os.pipe()
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b"x", ("127.0.0.1", port))
        os.write(w, str(os.getpid()).encode())
        os._exit(0)
    os._exit(0)
os.wait()
print(os.read(r, 32).decode(), flush=True)
"""


def test_child_and_grandchild_carry_the_identity_from_their_first_connect(
    agentd: InProcessDaemon, scratch_cgroup: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as srv:
        srv.bind(("127.0.0.1", 0))
        port = srv.getsockname()[1]
        agent = spawn(
            scratch_cgroup,
            [sys.executable, "-c", DOUBLE_FORK, str(port)],
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = agent.communicate(timeout=30)
    grandchild = int(out.strip())
    first = agentd.sink.wait_for(type="connect", pid=grandchild)
    assert first["identity"] == "spiffe://example.org/agent/research-bot"
    attested = agentd.sink.wait_for(type="exec", pid=agent.pid)
    assert first["instance_id"] == attested["instance_id"]  # attributed to the agent instance
    kernel_state = agentd.sink.find(type="connect", pid=grandchild)
    assert all(e["identity"] == first["identity"] for e in kernel_state)


def test_the_attested_process_fetches_a_valid_rotating_svid_revoked_at_exit(
    agentd: InProcessDaemon, scratch_cgroup: Path, short_tmp: Path
) -> None:
    results = run_client(scratch_cgroup, short_tmp / "workload.sock", "x509", "2")
    assert len(results) == 2, results
    first, second = results
    for r in results:
        assert r["kind"] == "x509"
        assert r["spiffe_id"] == r["verified_id"] == "spiffe://example.org/agent/research-bot"
        assert r["uri_sans"] == [r["spiffe_id"]]  # exactly one URI SAN
        assert r["ca"] is False
        assert r["digital_signature"] is True
        assert r["key_cert_sign"] is False
        assert 0 < r["ttl"] <= 10 + 60  # configured TTL, plus clock-skew backdating at most
    assert first["serial"] != second["serial"]  # rotated while it lived
    revoked = {e["svid_serial"] for e in agentd.sink.find(type="credential_revoked")}
    wait_until(
        lambda: (
            {first["serial"], second["serial"]}
            <= {e["svid_serial"] for e in agentd.sink.find(type="credential_revoked")}
        ),
        what="both serials revoked after exit",
    )
    assert revoked is not None
    manager = agentd.daemon.manager
    assert agentd.call(lambda: manager.is_revoked(int(second["serial"], 16)))


def test_jwt_svid_audience_is_honoured_and_tampering_detected(
    agentd: InProcessDaemon, scratch_cgroup: Path, short_tmp: Path
) -> None:
    [r] = run_client(scratch_cgroup, short_tmp / "workload.sock", "jwt", "payments-api")
    assert r["kind"] == "jwt"
    assert r["valid_for_own_audience"] == "spiffe://example.org/agent/research-bot"
    assert r["other_audience"] == "INVALID_ARGUMENT"
    assert r["tampered"] == "INVALID_ARGUMENT"


def test_a_process_without_identity_gets_permission_denied(
    agentd: InProcessDaemon, short_tmp: Path
) -> None:
    # Outside the scope: never attested.
    [r] = run_client(None, short_tmp / "workload.sock", "x509")
    assert (r["kind"], r["code"]) == ("error", "PERMISSION_DENIED")


def test_a_new_binary_exec_d_under_an_attested_pid_gets_permission_denied(
    agentd: InProcessDaemon, scratch_cgroup: Path, short_tmp: Path, binaries: dict[str, Path]
) -> None:
    # The attested agent (python) replaces itself with a different binary (a changed copy
    # of python, which matches no entry) that then asks for the agent's SVID.
    results = run_client(
        scratch_cgroup,
        short_tmp / "workload.sock",
        "exec",
        str(binaries["python_changed"]),
        str(CLIENT),
        str(short_tmp / "workload.sock"),
        "x509",
    )
    assert [(r["kind"], r.get("code")) for r in results] == [("error", "PERMISSION_DENIED")]


def test_identities_are_listed_over_the_admin_socket(
    agentd: InProcessDaemon, scratch_cgroup: Path, short_tmp: Path, binaries: dict[str, Path]
) -> None:
    agent = spawn(scratch_cgroup, [str(binaries["sleeper"]), "30"], uid=NOBODY)
    try:
        agentd.sink.wait_for(
            type="exec", pid=agent.pid, identity="spiffe://example.org/agent/sleeper"
        )
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "sidecar.cli",
                "identities",
                "--socket",
                str(short_tmp / "admin.sock"),
                "--json",
            ],
            capture_output=True,
            text=True,
            env=client_env(),
            timeout=30,
        )
        assert out.returncode == 0, out.stderr
        [row] = [r for r in json.loads(out.stdout)["instances"] if r["pid"] == agent.pid]
        assert row["spiffe_id"] == "spiffe://example.org/agent/sleeper"
        assert f"unix:uid:{NOBODY}" in row["selectors"]
        # It never asked the Workload API: no credential was signed for it.
        assert row["svid_serial"] is None and row["svid_expires"] is None
        assert identity_number(row["spiffe_id"]) == agentd.call(
            lambda: agentd.daemon.kernel.proc_state(agent.pid)[0]
        )
    finally:
        agent.kill()
        agent.wait(10)


def test_a_tool_registered_under_its_parent_identity_takes_that_identity(
    scratch_cgroup: Path, pin_dir: Path, short_tmp: Path
) -> None:
    """parent:id: what the agent spawns may be its own, narrower identity."""
    sleep = os.path.realpath("/bin/sleep")
    cg = cgroup_rel(scratch_cgroup)
    entries = write_entries_file(
        short_tmp,
        f"""  - spiffeId: spiffe://example.org/agent/research-bot
    selectors: [unix:uid:0, "unix:sha256:{sha256(PYTHON)}", "cgroup:path:{cg}"]
  - spiffeId: spiffe://example.org/tool/sleeper
    selectors: ["parent:id:spiffe://example.org/agent/research-bot", "unix:path:{sleep}"]
""",
    )
    cfg = inprocess_config(scratch_cgroup, pin_dir, short_tmp, entries=entries)
    with run_daemon(cfg) as d:
        agent = spawn(
            scratch_cgroup,
            [sys.executable, "-c", "import subprocess; subprocess.run(['/bin/sleep', '0.3'])"],
        )
        assert agent.wait(30) == 0
        tool = wait_until(
            lambda: [e for e in d.sink.find(type="exec") if e.get("filename") == "/bin/sleep"],
            what="the tool's exec",
        )[0]
        assert tool["identity"] == "spiffe://example.org/tool/sleeper"
        assert d.sink.wait_for(type="exec", pid=agent.pid)["identity"] == (
            "spiffe://example.org/agent/research-bot"
        )
        # Outside its parent, the same binary is nobody.
        alone = spawn(scratch_cgroup, ["/bin/sleep", "0.1"])
        assert alone.wait(10) == 0
        assert d.sink.wait_for(type="exec", pid=alone.pid)["identity"] is None


SPAWNER_C = r"""
#include <spawn.h>
#include <stdio.h>
#include <sys/wait.h>
extern char **environ;
int main(void)
{
    /* posix_spawn is vfork + exec: the tool starts within microseconds of
     * this image, while the daemon is still attesting it. */
    char *argv[] = {"sleep", "1", NULL};
    pid_t pid;
    int status;
    if (posix_spawn(&pid, "/bin/sleep", NULL, NULL, argv, environ))
        return 1;
    printf("%d\n", pid);
    fflush(stdout);
    waitpid(pid, &status, 0);
    return 0;
}
"""


def test_a_tool_spawned_while_its_agent_is_pending_takes_the_agent_identity(
    scratch_cgroup: Path, pin_dir: Path, short_tmp: Path
) -> None:
    # A vfork child sends no fork record: its exec record alone must carry
    # it into the agent's identity and instance, in the kernel and in events.
    src = short_tmp / "spawner.c"
    src.write_text(SPAWNER_C)
    spawner = short_tmp / "agent-spawner"
    subprocess.run(["cc", "-O2", "-o", str(spawner), str(src)], check=True)
    entries = write_entries_file(
        short_tmp,
        f"""  - spiffeId: spiffe://example.org/agent/spawner
    selectors: [unix:uid:0, "unix:sha256:{sha256(spawner)}"]
""",
    )
    cfg = inprocess_config(scratch_cgroup, pin_dir, short_tmp, entries=entries)
    with run_daemon(cfg) as d:
        agent = spawn(scratch_cgroup, [str(spawner)], stdout=subprocess.PIPE, text=True)
        try:
            assert agent.stdout is not None
            tool_pid = int(agent.stdout.readline())
            tool = d.sink.wait_for(type="exec", pid=tool_pid)
            attested = d.sink.wait_for(type="exec", pid=agent.pid)
            number = d.call(lambda: d.daemon.kernel.proc_state(tool_pid))
        finally:
            agent.kill()
            agent.wait(10)
    assert attested["identity"] == "spiffe://example.org/agent/spawner"
    assert tool["identity"] == attested["identity"]
    assert tool["ppid"] == agent.pid
    assert tool["instance_id"] == attested["instance_id"]
    assert tool["svid_serial"] == attested["svid_serial"]
    assert number is not None and number[0] == identity_number(attested["identity"])
    assert d.sink.find(type="fork", pid=tool_pid) == []


def test_credential_metrics_count_what_the_daemon_issued(
    scratch_cgroup: Path, pin_dir: Path, short_tmp: Path, binaries: dict[str, Path]
) -> None:
    """Through the product: an agent fetches an X.509-SVID and a JWT-SVID; the counters say so."""
    from sidecar.metrics import DaemonMetrics

    metrics = DaemonMetrics()
    entries = write_entries(short_tmp, scratch_cgroup, binaries["sleeper"])
    cfg = inprocess_config(scratch_cgroup, pin_dir, short_tmp, entries=entries, svid_ttl=60)
    with run_daemon(cfg, metrics) as d:
        [r] = run_client(scratch_cgroup, short_tmp / "workload.sock", "jwt", "payments-api")
        assert r["kind"] == "jwt"
        sid = "spiffe://example.org/agent/research-bot"
        sample = metrics.registry.get_sample_value
        wait_until(
            lambda: sample("sidecar_credentials_issued_total", {"identity": sid, "kind": "x509"}),
            what="the x509 issuance counted",
        )
        assert sample("sidecar_credentials_issued_total", {"identity": sid, "kind": "jwt"}) == 1
        assert d.sink.find(type="credential_issued", identity=sid)


def test_an_exec_is_attested_from_its_record_without_a_pidfd_and_with_one_in_doubt(
    agentd: InProcessDaemon,
    scratch_cgroup: Path,
    binaries: dict[str, Path],
    monkeypatch: pytest.MonkeyPatch,
    pidfds_opened: list[int],
) -> None:
    """The kernel's entry says the pid is still the recorded process: no pidfd is
    needed.  When it does not say so, the facts are read again through a pidfd."""
    sleeper = "spiffe://example.org/agent/sleeper"
    opened = pidfds_opened
    kernel = agentd.daemon.kernel
    tick = 10**9 // os.sysconf("SC_CLK_TCK")
    procs = [spawn(scratch_cgroup, [str(binaries["sleeper"]), "30"], uid=NOBODY)]
    try:
        first = procs[0]
        assert agentd.sink.wait_for(type="exec", pid=first.pid)["identity"] == sleeper
        assert first.pid not in opened
        state = kernel.proc_state(first.pid)
        assert state is not None
        assert state.identity == identity_number(sleeper)
        # The kernel wrote its start time at exec, and the daemon's write kept it.
        assert state.start_ns // tick == read_start_time(first.pid)
        assert kernel.holds_process(first.pid, state.start_ns)
        assert not kernel.holds_process(first.pid, state.start_ns + 1)

        monkeypatch.setattr(kernel, "holds_process", lambda pid, start_ns: False)
        procs.append(spawn(scratch_cgroup, [str(binaries["sleeper"]), "30"], uid=NOBODY))
        second = procs[1]
        assert agentd.sink.wait_for(type="exec", pid=second.pid)["identity"] == sleeper
        assert second.pid in opened  # read again through a pidfd, with the same answer
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # The entry goes at exit, before the pid can be reused: nothing holds it any more.
    wait_until(lambda: kernel.proc_state(first.pid) is None, 10, "the entry removed at exit")


def test_an_exec_from_a_thread_other_than_the_leader_is_attested_from_its_record(
    agentd: InProcessDaemon,
    scratch_cgroup: Path,
    binaries: dict[str, Path],
    pidfds_opened: list[int],
) -> None:
    """The exec'ing thread takes over the process (and its leader's start time): the
    record's start time must still be the one /proc and the kernel's map show, or
    attestation would fall back to a pidfd, or refuse the process as replaced."""
    sleeper = "spiffe://example.org/agent/sleeper"
    script = (
        "import os, sys, threading\n"
        "t = threading.Thread(target=os.execv, args=(sys.argv[1], [sys.argv[1], '30']))\n"
        "t.start(); t.join()\n"
    )
    p = spawn(scratch_cgroup, [sys.executable, "-c", script, str(binaries["sleeper"])], uid=NOBODY)
    try:
        ev = agentd.sink.wait_for(type="exec", pid=p.pid, exe=str(binaries["sleeper"]))
        assert ev["identity"] == sleeper
        assert p.pid not in pidfds_opened  # confirmed by the kernel's map, as for a leader
        state = agentd.daemon.kernel.proc_state(p.pid)
        assert state is not None and state.identity == identity_number(sleeper)
        tick = 10**9 // os.sysconf("SC_CLK_TCK")
        assert state.start_ns // tick == read_start_time(p.pid)
    finally:
        p.kill()
        p.wait()
