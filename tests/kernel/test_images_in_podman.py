"""The daemon and collector images (`make image`), run by podman as the manifests run them.

The daemon container gets what deploy/kubernetes/daemon-daemonset.yaml
declares: the host's PID and network namespaces, only its six capabilities
(no privileged mode), no_new_privs, a read-only root file system, bpffs,
tracefs, the cgroup tree and the kernel headers (/lib/modules, /usr/src,
read only), a state folder, a runtime folder and its configuration.  The
collector container runs as uid 65532 on a read-only root with its store on a
volume, as collector-deployment.yaml has it.  Both listen on loopback only.

Test safety as everywhere in tests/kernel: the daemon's scope is a scratch
cgroup this test made, its pins live in a scratch pin directory, the runtime
and state folders are the test's own (not the host's /run/sidecar), and
containers, cgroup and pins are removed in teardown even when the test fails.

Against a real collector, the host enrolls with a join token, a process
started in the scratch cgroup is attested, a send the policy names goes
through (positive control) and one it does not name gets EPERM, the same for
a unix socket (judged by the object the package ships prebuilt), and the sends
events reach the collector's store, read back with `sidecar tail
--no-follow`.  SIGTERM stops each container with status 0 and no program of
the daemon is left attached or loaded.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import (
    Probe,
    attached_program_ids,
    bpftool_json,
    free_port_pair,
    hook_program_ids,
    spawn,
)

from sidecar.kernel.checks import cgroup2_root
from sidecar.testing.daemon_process import DaemonConfigFile, read_events
from sidecar.testing.packaging import PODMAN, PODMAN_LIMITS, built_images, missing_tools
from sidecar.testing.scratch import free_port, unique_name, wait_until

AGENT = "spiffe://example.org/agent/image-test"
SUBSCRIBER = "spiffe://example.org/ops/image-test"
HOST = "image-test-host"
PYTHON = os.path.realpath(sys.executable)
# deploy/kubernetes/daemon-daemonset.yaml: securityContext.capabilities.add
DAEMON_CAPS = ("BPF", "PERFMON", "NET_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH", "KILL")


class UnixProbe(Probe):
    """The kernel tests' probe, plus ``unix PATH``: connect to a unix stream socket."""

    SOURCE = r"""
import os, socket, sys
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "pid":
        print(os.getpid(), flush=True); continue
    s = socket.socket(socket.AF_UNIX if cmd[0] == "unix" else socket.AF_INET,
                      socket.SOCK_STREAM if cmd[0] == "unix" else socket.SOCK_DGRAM)
    try:
        if cmd[0] == "unix":
            s.connect(cmd[1])
        else:
            s.sendto(b"x", (cmd[2], int(cmd[3])))
        code = 0
    except OSError as e:
        code = e.errno or -1
    s.close()
    print(code, flush=True)
"""

    def __init__(self, cgroup: Path) -> None:
        self.proc = spawn(
            cgroup,
            [sys.executable, "-c", self.SOURCE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = int(self.ask("pid"))


def seccomp_as_containerd(dest: Path) -> Path:
    """podman's default seccomp profile with containerd's rules for the two BPF calls.

    The DaemonSet asks for the runtime's default profile.  containerd's
    (1.6+) allows bpf() to a container holding CAP_BPF and perf_event_open()
    to one holding CAP_PERFMON; podman 4.3's (Debian 12) allows both only with
    CAP_SYS_ADMIN, which the daemon is not given.  Every other rule is podman's.
    """
    profile = json.loads(Path("/usr/share/containers/seccomp.json").read_text())
    moved = {"bpf": "CAP_BPF", "perf_event_open": "CAP_PERFMON"}
    for rule in profile["syscalls"]:
        names = rule.get("names", [])
        if rule["action"] == "SCMP_ACT_ERRNO" and moved.keys() & set(names):
            # "refused unless CAP_SYS_ADMIN": now also allowed by the rules below
            rule["names"] = [n for n in names if n not in moved]
    for name, cap in moved.items():
        profile["syscalls"].append(
            {"names": [name], "action": "SCMP_ACT_ALLOW", "includes": {"caps": [cap]}}
        )
    dest.write_text(json.dumps(profile))
    return dest


def podman(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*PODMAN, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def must(*args: str, timeout: float = 120) -> str:
    result = podman(*args, timeout=timeout)
    assert result.returncode == 0, f"podman {' '.join(args[:3])}: {result.stderr[-3000:]}"
    return result.stdout


def program_ids() -> set[int]:
    return {int(p["id"]) for p in bpftool_json("prog", "show") or []}


def get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except OSError:
        return 0


class Containers:
    """Names of the containers this test started; all removed in teardown."""

    def __init__(self) -> None:
        self.names: list[str] = []

    def start(self, name: str, *args: str) -> str:
        self.names.append(name)
        must("run", "-d", "--name", name, *PODMAN_LIMITS, *args)
        return name

    def running(self, name: str) -> bool:
        out = podman("inspect", "--format", "{{.State.Running}}", name)
        return out.stdout.strip() == "true"

    def logs(self, name: str) -> str:
        return podman("logs", name).stderr[-4000:]

    def stop(self, name: str) -> int:
        """SIGTERM (podman stop), SIGKILL after 30 s; the container's exit status."""
        must("stop", "--time", "30", name, timeout=60)
        return int(must("inspect", "--format", "{{.State.ExitCode}}", name).strip())

    def remove_all(self) -> None:
        for name in self.names:
            podman("rm", "--force", "--time", "0", name, timeout=60)


@pytest.fixture
def containers() -> Iterator[Containers]:
    assert not missing_tools(), f"missing {missing_tools()}: run make setup"
    c = Containers()
    try:
        yield c
    finally:
        c.remove_all()


def collector_config(port: int, enroll_port: int) -> str:
    return f"""apiVersion: sidecar/v1
kind: CollectorConfig
trustDomain: example.org
dataDir: /var/lib/sidecar-collector
listen: 127.0.0.1:{port}
enrollmentListen: 127.0.0.1:{enroll_port}
serverNames: [localhost, 127.0.0.1]
subscribers: [{SUBSCRIBER}]
metrics: ""
"""


def tail_stored(collector: str, port: int) -> list[dict[str, Any]]:
    """What the collector stored, as `sidecar tail --no-follow --json` prints it."""
    out = must(
        "exec",
        collector,
        "sidecar",
        "tail",
        "--collector",
        f"127.0.0.1:{port}",
        "--credentials",
        "/var/lib/sidecar-collector/subscriber",
        "--no-follow",
        "--json",
    )
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_daemon_image_attests_enforces_and_streams_to_the_collector_image(
    containers: Containers, scratch_cgroup: Path, pin_dir: Path, short_tmp: Path
) -> None:
    daemon_image, collector_image = built_images()
    programs_before = program_ids()
    work = short_tmp
    for sub in ("collector", "collector-etc", "state", "run", "etc", "config"):
        (work / sub).mkdir()
    os.chown(work / "collector", 65532, 65532)
    (work / "collector").chmod(0o700)

    # -- the collector, as collector-deployment.yaml runs it --------------------------
    port, enroll_port = free_port(), free_port()
    (work / "collector-etc" / "collector.yaml").write_text(collector_config(port, enroll_port))
    collector = containers.start(
        unique_name("sidecar-test-collector-"),
        "--network=host",
        "--user=65532:65532",
        "--cap-drop=all",
        "--security-opt=no-new-privileges",
        "--read-only",
        "--tmpfs=/tmp",
        f"--volume={work / 'collector'}:/var/lib/sidecar-collector",
        f"--volume={work / 'collector-etc'}:/etc/sidecar:ro",
        collector_image,
    )

    def collector_listens() -> bool:
        assert containers.running(collector), containers.logs(collector)
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return True
        return False

    wait_until(collector_listens, 60, "the collector container to listen")

    cfg = ["--config", "/etc/sidecar/collector.yaml"]
    (work / "state" / "bundle.pem").write_text(
        must("exec", collector, "sidecar", "collector", *cfg, "--bundle")
    )
    token = must("exec", collector, "sidecar", "collector", *cfg, "--join-token", HOST).strip()
    must(
        "exec",
        collector,
        "sidecar",
        "collector",
        *cfg,
        "--issue-svid",
        SUBSCRIBER,
        "--out",
        "/var/lib/sidecar-collector/subscriber",
    )

    # -- enrollment by join token, with the daemon image ------------------------------
    must(
        "run",
        "--rm",
        *PODMAN_LIMITS,
        "--network=host",
        f"--volume={work / 'state'}:/var/lib/sidecar",
        daemon_image,
        "enroll",
        "--collector",
        f"127.0.0.1:{enroll_port}",
        "--token",
        token,
        "--bundle",
        "/var/lib/sidecar/bundle.pem",
        "--out",
        "/var/lib/sidecar/host",
    )
    assert (work / "state" / "host").is_dir()

    # -- entries, policy and config of the daemon -------------------------------------
    rel = "/" + str(scratch_cgroup.relative_to(cgroup2_root()))
    sha = hashlib.sha256(Path(PYTHON).read_bytes()).hexdigest()
    (work / "etc" / "entries.yaml").write_text(
        "apiVersion: sidecar/v1\nkind: RegistrationEntries\ntrustDomain: example.org\n"
        f"entries:\n  - spiffeId: {AGENT}\n"
        f'    selectors: [unix:uid:0, "unix:sha256:{sha}", "cgroup:path:{rel}"]\n'
    )
    allowed, refused = free_port_pair(), free_port_pair()
    while refused == allowed:
        refused = free_port_pair()
    # Unix sockets are judged by the hooks the package ships prebuilt.
    listeners = []
    for name in ("ok", "bad"):
        lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        lsock.bind(str(work / f"{name}.sock"))
        lsock.listen(4)
        listeners.append(lsock)
    (work / "etc" / "policy.yaml").write_text(
        f"""apiVersion: sidecar/v1
kind: Policy
defaults:
  unidentified: allow
  log_allowed: true
identities:
  - id: {AGENT}
    mode: enforce
    egress:
      - name: allowed-port
        cidrs: [127.0.0.1/32]
        ports: [{allowed}]
        protocols: [udp]
    unix: ["{work}/ok.sock"]
"""
    )
    metrics = free_port()
    config = DaemonConfigFile(
        pin_dir=pin_dir,
        cgroup=scratch_cgroup,
        host=HOST,
        detach_on_exit=True,
        entries=Path("/etc/sidecar/entries.yaml"),
        policy=Path("/etc/sidecar/policy.yaml"),
        reload_interval=1,
        collector=f"127.0.0.1:{port}",
        credentials=Path("/var/lib/sidecar/host"),
        spool_dir=Path("/var/lib/sidecar/spool"),
        metrics=f"127.0.0.1:{metrics}",
    ).document()
    config["output"] = "/var/lib/sidecar/events.jsonl"
    (work / "config" / "config.yaml").write_text(json.dumps(config))

    # -- the daemon, as daemon-daemonset.yaml runs it ---------------------------------
    mounts = [
        "--volume=/sys/fs/bpf:/sys/fs/bpf",
        "--volume=/sys/kernel/tracing:/sys/kernel/tracing:ro",
        "--volume=/sys/fs/cgroup:/sys/fs/cgroup:ro",
        "--volume=/lib/modules:/lib/modules:ro",
        "--volume=/usr/src:/usr/src:ro",
        f"--volume={work / 'run'}:/run/sidecar",
        f"--volume={work / 'state'}:/var/lib/sidecar",
        f"--volume={work / 'config'}:/etc/sidecar-config:ro",
        f"--volume={work / 'etc'}:/etc/sidecar:ro",
        "--tmpfs=/tmp",
    ]
    daemon = containers.start(
        unique_name("sidecar-test-daemon-"),
        "--pid=host",
        "--network=host",
        "--cgroupns=host",
        "--user=0",
        "--cap-drop=all",
        *(f"--cap-add={c}" for c in DAEMON_CAPS),
        "--security-opt=no-new-privileges",
        f"--security-opt=seccomp={seccomp_as_containerd(work / 'seccomp.json')}",
        "--security-opt=apparmor=unconfined",
        "--read-only",
        "--env=NODE_NAME=" + HOST,
        *mounts,
        daemon_image,
        "run",
        "--config",
        "/etc/sidecar-config/config.yaml",
    )

    def ready() -> bool:
        assert containers.running(daemon), f"daemon container exited:\n{containers.logs(daemon)}"
        return get(f"http://127.0.0.1:{metrics}/readyz") == 200

    wait_until(ready, 240, "the daemon container's /readyz")
    ours = hook_program_ids(pin_dir)
    at_root = [i for i in attached_program_ids(cgroup2_root()) if i in ours]
    # connect4/6, sendmsg4/6, sock_create, setsockopt and the two unix-socket
    # hooks (from the object the package ships prebuilt): each attached once.
    assert len(ours) == 8 and sorted(at_root) == sorted(ours), containers.logs(daemon)
    loaded_by_daemon = program_ids() - programs_before
    assert ours <= loaded_by_daemon

    # -- attestation and enforcement in the scratch cgroup ----------------------------
    events = work / "state" / "events.jsonl"
    probe = UnixProbe(scratch_cgroup)
    try:
        ev = wait_until(
            lambda: [
                e
                for e in read_events(events)
                if e.get("type") == "exec" and e.get("pid") == probe.pid
            ],
            30,
            "the probe's exec event",
        )[0]
        assert ev["identity"] == AGENT, ev
        assert probe.ask(f"udp 4 127.0.0.1 {allowed}") == 0  # positive control
        assert probe.ask(f"udp 4 127.0.0.1 {refused}") == errno.EPERM
        assert probe.ask(f"unix {work}/ok.sock") == 0  # positive control
        assert probe.ask(f"unix {work}/bad.sock") == errno.EPERM
    finally:
        probe.close()
        for lsock in listeners:
            lsock.close()

    # -- the events in the collector's store ------------------------------------------
    def probe_rows(kind: str) -> list[dict[str, Any]]:
        rows = [r["event"] for r in tail_stored(collector, port)]
        return [e for e in rows if int(e.get(kind, {}).get("pid", 0)) == probe.pid]

    execs = wait_until(lambda: probe_rows("exec"), 60, "the probe's exec in the store")
    assert {(e["host"], e["identity"]) for e in execs} == {(HOST, AGENT)}

    def both_connects() -> dict[int, str]:
        found = {int(e["connect"]["port"]): e["connect"]["verdict"] for e in probe_rows("connect")}
        return found if {allowed, refused} <= found.keys() else {}

    verdicts = wait_until(both_connects, 60, "the probe's sends in the store")
    assert verdicts[allowed] == "VERDICT_ALLOW"
    assert verdicts[refused] == "VERDICT_DENY"

    # -- both stop on SIGTERM, and nothing of the daemon stays ------------------------
    assert containers.stop(daemon) == 0, containers.logs(daemon)
    assert containers.stop(collector) == 0, containers.logs(collector)
    assert not set(attached_program_ids(cgroup2_root())) & ours, "programs still attached"
    assert not program_ids() & loaded_by_daemon, "programs of the daemon still loaded"
    left = list(pin_dir.rglob("*")) if pin_dir.exists() else []
    assert not left, f"pins left: {left}"
    assert shutil.which("bpftool")
