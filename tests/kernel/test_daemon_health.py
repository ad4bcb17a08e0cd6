"""The health endpoint of a real daemon (`sidecar run` in its own process).

/readyz answers 200 once the programs are attached and the policy is in
force, /healthz 200 while the event loop and the ring reader turn; the
liveness logic itself (a stalled reader fails /healthz) is proven in
tests/unit/test_health.py.
"""

from __future__ import annotations

import hashlib
import os
import socket
import sys
import urllib.error
import urllib.request
from pathlib import Path

from conftest import write_entries_file
from prometheus_client.parser import text_string_to_metric_families

from sidecar.kernel.checks import cgroup2_root
from sidecar.testing.daemon_process import DaemonConfigFile, launch_daemon

AGENT = "spiffe://example.org/agent/health-bot"
PYTHON = os.path.realpath(sys.executable)
POLICY = f"""apiVersion: sidecar/v1
kind: Policy
defaults:
  unidentified: allow
identities:
  - id: {AGENT}
    egress:
      - name: loopback-dns
        cidrs: [127.0.0.1/32]
        ports: [53]
        protocols: [udp]
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status), response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def test_a_running_daemon_is_ready_and_live_on_loopback(
    scratch_cgroup: Path, pin_dir: Path, short_tmp: Path
) -> None:
    rel = "/" + str(scratch_cgroup.relative_to(cgroup2_root()))
    sha = hashlib.sha256(Path(PYTHON).read_bytes()).hexdigest()
    entries = write_entries_file(
        short_tmp,
        f"""  - spiffeId: {AGENT}
    selectors: [unix:uid:0, "unix:sha256:{sha}", "cgroup:path:{rel}"]
""",
    )
    policy = short_tmp / "policy.yaml"
    policy.write_text(POLICY)
    port = free_port()
    config = DaemonConfigFile(
        pin_dir=pin_dir,
        cgroup=scratch_cgroup,
        work=short_tmp,
        host="health-test",
        entries=entries,
        policy=policy,
        metrics=f"127.0.0.1:{port}",
    ).write(short_tmp / "daemon.yaml")
    base = f"http://127.0.0.1:{port}"
    d = launch_daemon(config, short_tmp)
    try:
        d.wait_for(type="policy_loaded")
        assert get(base + "/readyz") == (200, "ok\n")
        assert get(base + "/healthz") == (200, "ok\n")
        status, body = get(base + "/metrics")
        assert status == 200 and "sidecar_events_lost_total" in body
        samples = {
            (x.name, tuple(sorted(x.labels.items()))): x.value
            for family in text_string_to_metric_families(body)
            for x in family.samples
        }
        assert samples[("sidecar_attached_programs", ())] > 0
        assert 0 <= samples[("sidecar_ringbuf_fill_ratio", ())] <= 1
        reader_age = samples[("sidecar_heartbeat_age_seconds", (("thread", "ring buffer reader"),))]
        assert reader_age < 15
        assert samples[("sidecar_policy_last_reload_success_timestamp_seconds", ())] > 0
        # Control: the answers come from this daemon; once it stops, nothing answers.
        assert d.stop() == 0
        try:
            get(base + "/healthz")
        except urllib.error.URLError as exc:
            assert isinstance(exc.reason, ConnectionRefusedError)
        else:
            raise AssertionError("the endpoint still answers after the daemon stopped")
    finally:
        d.stop()
