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

import hashlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

from sidecar.kernel.checks import cgroup2_root
from sidecar.proc.cgroups import DANGEROUS_CAPS, launch_argv
from sidecar.testing.scratch import Scratch, free_port
from sidecar.testing.stack import Stack
from sidecar.util.errors import SidecarError

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


def _step(text: str) -> None:
    print(f"\n== {text}", file=sys.stderr, flush=True)


class Demo:
    def __init__(self) -> None:
        self.stack = Stack(Scratch.create("sidecar-demo-"), host="demo-host")

    def run(self) -> int:
        st = self.stack
        w = st.work
        ok_port = free_port()
        bad_port = ok_port + 1 if ok_port < 65535 else ok_port - 1

        _step("1. collector: mTLS gRPC on loopback, SQLite store; this host enrolls")
        collector = st.start_collector(subscribers=(TAIL_ID,))
        print("   " + st.enroll(), file=sys.stderr)
        tail_creds = st.issue_svid(TAIL_ID, "tail")

        _step("2. daemon: attests processes in the demo cgroup, enforces the demo policy")
        python = os.path.realpath(sys.executable)
        digest = hashlib.sha256(Path(python).read_bytes()).hexdigest()
        rel = "/" + str(st.cgroup.relative_to(cgroup2_root()))
        st.write_daemon_config(
            entries=f"""apiVersion: sidecar/v1
kind: RegistrationEntries
trustDomain: example.org
entries:
  - spiffeId: {AGENT_ID}
    selectors: [unix:uid:{os.getuid()}, "unix:sha256:{digest}", "cgroup:path:{rel}"]
""",
            policy=f"""apiVersion: sidecar/v1
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
""",
        )
        daemon = st.start_daemon()
        print("   daemon ready: programs attached, policy in force", file=sys.stderr)

        _step("3. the collector's live stream (sidecar tail), and 4. the demo agent")
        tail = st.start(
            "tail",
            "--collector",
            f"127.0.0.1:{st.mtls_port}",
            "--credentials",
            str(tail_creds),
            "--identity",
            AGENT_ID,
            log="tail.log",
            stdout=None,  # the live stream is part of the story
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
                    cgroup=st.cgroup,
                    # As an agent should run: without the capabilities that could
                    # switch enforcement off (its policy would refuse them).
                    drop_caps=DANGEROUS_CAPS,
                ),
                env=st.env,
                timeout=60,
            )
        time.sleep(2.0)  # let the stream catch up
        st.stop(tail)
        if agent.returncode != 0:
            raise SidecarError(f"the demo agent failed (exit {agent.returncode})")

        _step("5. blast radius of the demo policy: what a compromise of each identity could reach")
        print(
            st.cli(
                "policy",
                "blast-radius",
                str(w / "policy.yaml"),
                "--entries",
                str(w / "entries.yaml"),
            )
        )
        print(st.cli("status", "--socket", str(w / "admin.sock")), file=sys.stderr)
        daemon.stop()
        st.stop(collector)
        _step("done: every event above was attested, enforced and stored by the collector")
        return 0

    def cleanup(self) -> None:
        keep = bool(os.environ.get("SIDECAR_DEMO_KEEP"))
        self.stack.cleanup(keep_work=keep)
        if keep:
            print(f"demo files kept in {self.stack.work}", file=sys.stderr)


def run_demo() -> int:
    demo = Demo()  # a SidecarError naming the cgroup where it cannot be made
    try:
        return demo.run()
    finally:
        demo.cleanup()
