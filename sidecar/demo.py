"""``make demo``: the whole product, end to end, in under a minute.

Everything runs as an operator would run it, as separate processes, on this
machine only (loopback), in a scratch cgroup and pin directory of its own
that are removed at the end:

1. a collector starts (mTLS gRPC, SQLite store) and this host enrolls with a
   single-use join token;
2. the daemon starts on the demo cgroup with registration entries and an
   enforcing policy, and streams every event to the collector;
3. ``sidecar tail`` prints the attributed events live as the collector stores them;
4. a demo agent starts in the cgroup: it is attested as
   ``spiffe://example.org/agent/research-bot``, fetches its X.509-SVID over the
   SPIFFE Workload API, makes the one connection its allowlist names, is
   refused (EPERM) a connection it does not name, and is killed trying to run
   a tool outside its list;
5. the blast-radius report of the demo policy is printed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sidecar.cgroups import DANGEROUS_CAPS, launch_argv, remove_tree
from sidecar.errors import SidecarError
from sidecar.kernel.checks import cgroup2_root

AGENT_ID = "spiffe://example.org/agent/research-bot"
TAIL_ID = "spiffe://example.org/ops/demo-tail"

AGENT = r"""
import errno, socket, subprocess, sys
import grpc
from cryptography import x509
from sidecar.api.workload import workload_pb2 as pb, workload_pb2_grpc as pb_grpc

sock, ok_port, bad_port = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
say = lambda msg: print(f"  demo agent | {msg}", file=sys.stderr, flush=True)

with grpc.insecure_channel(f"unix:{sock}") as ch:
    stub = pb_grpc.SpiffeWorkloadAPIStub(ch)
    meta = (("workload.spiffe.io", "true"),)
    svid = next(stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=meta)).svids[0]
    leaf_len = 4 + int.from_bytes(svid.x509_svid[2:4], "big")  # the first DER certificate
    leaf = x509.load_der_x509_certificate(svid.x509_svid[:leaf_len])
    say(f"fetched its X.509-SVID: {svid.spiffe_id}, serial {leaf.serial_number:x}, "
        f"valid until {leaf.not_valid_after_utc:%H:%M:%S} UTC")

with socket.create_connection(("127.0.0.1", ok_port), timeout=2):
    say(f"connect to 127.0.0.1:{ok_port} (on its allowlist): connected")
try:
    socket.create_connection(("127.0.0.1", bad_port), timeout=2)
    say(f"connect to 127.0.0.1:{bad_port}: connected (NOT EXPECTED)")
except PermissionError:
    say(f"connect to 127.0.0.1:{bad_port} (not on its allowlist): refused by the kernel (EPERM)")
r = subprocess.run(["/usr/bin/id"])
say(f"run /usr/bin/id (not on its exec list): exit status {r.returncode}"
    + (" - killed before it ran" if r.returncode == -9 else " (NOT EXPECTED)"))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], log: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SidecarError(f"the collector exited early:\n{log.read_text()}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.1)
    raise SidecarError(f"the collector did not listen on port {port} within {timeout}s")


def _step(text: str) -> None:
    print(f"\n== {text}", file=sys.stderr, flush=True)


class Demo:
    def __init__(self) -> None:
        self.repo_env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(
                p
                for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH"))
                if p
            ),
        }
        self.work = Path(tempfile.mkdtemp(prefix="sidecar-demo-", dir="/tmp"))
        self.work.chmod(0o755)
        self.cgroup = cgroup2_root() / f"sidecar-demo-{os.getpid()}"
        self.pin_dir = Path(f"/sys/fs/bpf/sidecar-demo-{os.getpid()}")
        self.procs: list[subprocess.Popen[bytes]] = []

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "sidecar.cli", *args],
            env=self.repo_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if out.returncode != 0:
            raise SidecarError(f"sidecar {' '.join(args[:2])} failed: {out.stderr.strip()}")
        return out.stdout

    def start(self, *args: str, log: str, **kw: object) -> subprocess.Popen[bytes]:
        with (self.work / log).open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "sidecar.cli", *args],
                env=kw.pop("env", self.repo_env),
                stderr=fh,
                **kw,  # type: ignore[call-overload]
            )
        self.procs.append(proc)
        return proc  # type: ignore[no-any-return]

    def run(self) -> int:
        w = self.work
        mtls, enroll_port, ok_port = _free_port(), _free_port(), _free_port()
        bad_port = ok_port + 1 if ok_port < 65535 else ok_port - 1

        _step("1. collector: mTLS gRPC on loopback, SQLite store; this host enrolls")
        (w / "collector.yaml").write_text(
            f"""apiVersion: sidecar/v1
kind: CollectorConfig
trustDomain: example.org
dataDir: {w}/collector
listen: 127.0.0.1:{mtls}
enrollmentListen: 127.0.0.1:{enroll_port}
subscribers: [{TAIL_ID}]
metrics: ""
"""
        )
        collector = self.start(
            "collector", "--config", str(w / "collector.yaml"), log="collector.log"
        )
        _wait_port(mtls, collector, w / "collector.log")
        (w / "bundle.pem").write_text(
            self.cli("collector", "--config", str(w / "collector.yaml"), "--bundle")
        )
        token = self.cli(
            "collector", "--config", str(w / "collector.yaml"), "--join-token", "demo-host"
        ).strip()
        print(
            "   "
            + self.cli(
                "enroll",
                "--collector",
                f"127.0.0.1:{enroll_port}",
                "--token",
                token,
                "--bundle",
                str(w / "bundle.pem"),
                "--out",
                str(w / "host"),
            ).strip(),
            file=sys.stderr,
        )
        self.cli(
            "collector",
            "--config",
            str(w / "collector.yaml"),
            "--issue-svid",
            TAIL_ID,
            "--out",
            str(w / "tail"),
        )

        _step("2. daemon: attests processes in the demo cgroup, enforces the demo policy")
        python = os.path.realpath(sys.executable)
        digest = hashlib.sha256(Path(python).read_bytes()).hexdigest()
        rel = "/" + str(self.cgroup.relative_to(cgroup2_root()))
        (w / "entries.yaml").write_text(
            f"""apiVersion: sidecar/v1
kind: RegistrationEntries
trustDomain: example.org
entries:
  - spiffeId: {AGENT_ID}
    selectors: [unix:uid:{os.getuid()}, "unix:sha256:{digest}", "cgroup:path:{rel}"]
"""
        )
        (w / "policy.yaml").write_text(
            f"""apiVersion: sidecar/v1
kind: Policy
defaults:
  unidentified: allow
identities:
  - id: {AGENT_ID}
    mode: enforce
    egress:
      - name: search-api
        cidrs: [127.0.0.1/32]
        ports: [{ok_port}]
        protocols: [tcp]
    exec: [{python}]
"""
        )
        (w / "daemon.yaml").write_text(
            f"""apiVersion: sidecar/v1
kind: DaemonConfig
host: demo-host
output: {w}/events.jsonl
scope:
  cgroup: {self.cgroup}
bpf:
  pinDir: {self.pin_dir}
  detachOnExit: true
identity:
  entries: {w}/entries.yaml
  stateDir: {w}/state
  workloadSocket: {w}/workload.sock
policy:
  file: {w}/policy.yaml
collector:
  address: 127.0.0.1:{mtls}
  credentials: {w}/host
  spoolDir: {w}/spool
adminSocket: {w}/admin.sock
metrics: ""
"""
        )
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(w / "notify.sock"))
        notify.settimeout(60)
        daemon = self.start(
            "run",
            "--config",
            str(w / "daemon.yaml"),
            log="daemon.log",
            env={**self.repo_env, "NOTIFY_SOCKET": str(w / "notify.sock")},
        )
        while b"READY=1" not in notify.recv(4096).split(b"\n"):
            pass
        notify.close()
        print("   daemon ready: programs attached, policy in force", file=sys.stderr)

        _step("3. the collector's live stream (sidecar tail), and 4. the demo agent")
        tail = self.start(
            "tail",
            "--collector",
            f"127.0.0.1:{mtls}",
            "--credentials",
            str(w / "tail"),
            "--identity",
            AGENT_ID,
            log="tail.log",
        )
        time.sleep(0.5)
        with socket.create_server(("127.0.0.1", ok_port)):
            agent = subprocess.run(
                launch_argv(
                    [
                        sys.executable,
                        "-c",
                        AGENT,
                        str(w / "workload.sock"),
                        str(ok_port),
                        str(bad_port),
                    ],
                    cgroup=self.cgroup,
                    # As an agent should run: without the capabilities that could
                    # switch enforcement off (its policy would refuse them).
                    drop_caps=DANGEROUS_CAPS,
                ),
                env=self.repo_env,
                timeout=60,
            )
        time.sleep(2.0)  # let the stream catch up
        tail.send_signal(signal.SIGTERM)
        tail.wait(10)
        if agent.returncode != 0:
            raise SidecarError(f"the demo agent failed (exit {agent.returncode})")

        _step("5. blast radius of the demo policy: what a compromise of each identity could reach")
        print(
            self.cli(
                "policy",
                "blast-radius",
                str(w / "policy.yaml"),
                "--entries",
                str(w / "entries.yaml"),
            )
        )
        print(self.cli("status", "--socket", str(w / "admin.sock")), file=sys.stderr)
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        collector.send_signal(signal.SIGTERM)
        collector.wait(30)
        _step("done: every event above was attested, enforced and stored by the collector")
        return 0

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        from sidecar.kernel.loader import uninstall

        uninstall(self.pin_dir)
        try:
            remove_tree(self.cgroup)
        except OSError as exc:
            print(f"demo cgroup {self.cgroup} not removed: {exc.strerror}", file=sys.stderr)
        if os.environ.get("SIDECAR_DEMO_KEEP"):
            print(f"demo files kept in {self.work}", file=sys.stderr)
        else:
            shutil.rmtree(self.work, ignore_errors=True)


def run_demo() -> int:
    demo = Demo()
    try:
        demo.cgroup.mkdir()
    except OSError as exc:
        raise SidecarError(f"cannot create the demo cgroup {demo.cgroup}: {exc.strerror}") from exc
    try:
        return demo.run()
    finally:
        demo.cleanup()
