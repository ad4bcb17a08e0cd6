"""``sidecar collector``/``enroll``/``tail`` end to end, against a collector on loopback."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.api.v1 import event_pb2 as ev
from sidecar.collector.cli import register_cli
from sidecar.collector.config import load_config
from sidecar.collector.server import CollectorServer
from sidecar.export.enroll import load_host_identity
from sidecar.export.exporter import Exporter, ExporterConfig

REPO = Path(__file__).resolve().parents[2]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sidecar")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(argv)
    return int(args.handler(args))


class _Background:
    """A collector running on its own event loop in a thread."""

    def __init__(self, config_path: Path) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = CollectorServer(load_config(config_path))
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)

    def call(self, coro: object) -> object:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)  # type: ignore[arg-type]

    def stop(self) -> None:
        self.call(self.server.stop(0.2))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture
def collector(tmp_path: Path) -> Iterator[tuple[_Background, Path]]:
    cfg = tmp_path / "collector.yaml"
    cfg.write_text(
        "apiVersion: sidecar/v1\nkind: CollectorConfig\ntrustDomain: example.org\n"
        "dataDir: data\nlisten: 127.0.0.1:0\nenrollmentListen: 127.0.0.1:0\n"
        "subscribers: [spiffe://example.org/ops/alice]\n"
    )
    bg = _Background(cfg)
    try:
        yield bg, cfg
    finally:
        bg.stop()


def test_enroll_publish_and_tail_from_the_command_line(
    collector: tuple[_Background, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bg, cfg = collector
    assert _run("collector", "--config", str(cfg), "--bundle") == 0
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(capsys.readouterr().out)
    assert _run("collector", "--config", str(cfg), "--join-token", "web-1") == 0
    token = capsys.readouterr().out.strip()
    creds = tmp_path / "host"
    enroll_target = f"127.0.0.1:{bg.server.enrollment_port}"
    assert (
        _run(
            "enroll",
            "--collector",
            enroll_target,
            "--token",
            token,
            "--bundle",
            str(bundle),
            "--out",
            str(creds),
        )
        == 0
    )
    alice = tmp_path / "alice"
    assert (
        _run(
            "collector",
            "--config",
            str(cfg),
            "--issue-svid",
            "spiffe://example.org/ops/alice",
            "--out",
            str(alice),
        )
        == 0
    )
    capsys.readouterr()

    async def publish() -> None:
        ident = load_host_identity(creds)
        exp = Exporter(
            ExporterConfig(target=f"127.0.0.1:{bg.server.port}", spool_dir=tmp_path / "spool"),
            lambda: ident,
        )
        task = asyncio.create_task(exp.run())
        exp.submit(
            ev.Event(
                time_ns=time.time_ns(),
                identity="spiffe://example.org/agent/a",
                connect=ev.Connect(
                    pid=7,
                    address="192.0.2.1",
                    port=443,
                    protocol=ev.PROTOCOL_TCP,
                    verdict=ev.VERDICT_DENY,
                    rule="default",
                ),
            )
        )
        exp.submit(ev.Event(time_ns=time.time_ns(), exit=ev.Exit(pid=7)))
        assert await exp.close(10)
        await task

    bg.call(publish())
    target = f"127.0.0.1:{bg.server.port}"
    assert (
        _run(
            "tail",
            "--collector",
            target,
            "--credentials",
            str(alice),
            "--since",
            "1d",
            "--kind",
            "connect",
            "--limit",
            "1",
        )
        == 0
    )
    line = capsys.readouterr().out.strip()
    assert "web-1 #1 connect spiffe://example.org/agent/a" in line
    assert "tcp 192.0.2.1:443 deny rule=default" in line
    assert (
        _run(
            "tail",
            "--collector",
            target,
            "--credentials",
            str(alice),
            "--after-cursor",
            "0",
            "--json",
            "--limit",
            "2",
        )
        == 0
    )
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["event"]["sequence"] for r in rows] == ["1", "2"]
    assert rows[1]["event"]["exit"]["pid"] == 7


A = "spiffe://example.org/agent/a"


def _enroll_and_subscribe(
    bg: _Background, cfg: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> tuple[Path, Path]:
    """Enroll host web-1 and issue the subscriber alice: (host creds, alice creds)."""
    assert _run("collector", "--config", str(cfg), "--bundle") == 0
    bundle = tmp_path / "bundle.pem"
    bundle.write_text(capsys.readouterr().out)
    assert _run("collector", "--config", str(cfg), "--join-token", "web-1") == 0
    token = capsys.readouterr().out.strip()
    creds = tmp_path / "host"
    target = f"127.0.0.1:{bg.server.enrollment_port}"
    argv = ["enroll", "--collector", target, "--token", token, "--bundle", str(bundle)]
    assert _run(*argv, "--out", str(creds)) == 0
    alice = tmp_path / "alice"
    argv = ["collector", "--config", str(cfg), "--issue-svid", "spiffe://example.org/ops/alice"]
    assert _run(*argv, "--out", str(alice)) == 0
    capsys.readouterr()
    return creds, alice


def _publish(bg: _Background, creds: Path, tmp_path: Path, events: list[ev.Event]) -> None:
    async def publish() -> None:
        ident = load_host_identity(creds)
        exp = Exporter(
            ExporterConfig(target=f"127.0.0.1:{bg.server.port}", spool_dir=tmp_path / "spool"),
            lambda: ident,
        )
        task = asyncio.create_task(exp.run())
        for e in events:
            exp.submit(e)
        assert await exp.close(10)
        await task

    bg.call(publish())


def _connect(address: str, port: int, proto: int, verdict: int) -> ev.Event:
    return ev.Event(
        time_ns=time.time_ns(),
        identity=A,
        connect=ev.Connect(
            pid=7, address=address, port=port, protocol=proto, verdict=verdict, rule="default"
        ),
    )


AUDIT_HISTORY = [
    _connect("192.0.2.1", 443, ev.PROTOCOL_TCP, ev.VERDICT_WOULD_DENY),
    _connect("192.0.2.1", 443, ev.PROTOCOL_TCP, ev.VERDICT_WOULD_DENY),
    _connect("2001:db8::1", 53, ev.PROTOCOL_UDP, ev.VERDICT_WOULD_DENY),
    _connect("198.51.100.9", 22, ev.PROTOCOL_TCP, ev.VERDICT_DENY),
    ev.Event(
        time_ns=time.time_ns(),
        identity=A,
        exec=ev.Exec(pid=8, ppid=7, exe="/usr/bin/curl", verdict=ev.VERDICT_WOULD_DENY),
    ),
    ev.Event(
        time_ns=time.time_ns(),
        identity=A,
        socket=ev.Socket(
            pid=7, operation="connect", kind="/run/x.sock", verdict=ev.VERDICT_WOULD_DENY
        ),
    ),
    ev.Event(time_ns=time.time_ns(), exit=ev.Exit(pid=7)),
]


def test_tail_no_follow_prints_what_is_stored_and_exits(
    collector: tuple[_Background, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bg, cfg = collector
    creds, alice = _enroll_and_subscribe(bg, cfg, tmp_path, capsys)
    _publish(bg, creds, tmp_path, AUDIT_HISTORY)
    base = ["tail", "--collector", f"127.0.0.1:{bg.server.port}", "--credentials", str(alice)]

    done: list[int] = []
    runner = threading.Thread(target=lambda: done.append(_run(*base, "--no-follow")))
    runner.start()
    runner.join(30)
    assert done == [0], "tail --no-follow did not return at the end of what is stored"
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(AUDIT_HISTORY)
    assert "tcp 198.51.100.9:22 deny" in lines[3]

    assert _run(*base, "--no-follow", "--verdict", "deny") == 0
    (only,) = capsys.readouterr().out.splitlines()
    assert "tcp 198.51.100.9:22 deny rule=default" in only
    assert _run(*base, "--no-follow", "--kind", "connect", "--since", "1h", "--json") == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [r["event"]["connect"]["port"] for r in rows] == [443, 443, 53, 22]
    assert _run(*base, "--no-follow", "--after-cursor", "5", "--limit", "1") == 0
    (sixth,) = capsys.readouterr().out.splitlines()
    assert "#6 socket" in sixth


def test_tail_as_a_process_ends_at_the_stored_end_and_quietly_on_a_closed_pipe(
    collector: tuple[_Background, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bg, cfg = collector
    creds, alice = _enroll_and_subscribe(bg, cfg, tmp_path, capsys)
    _publish(bg, creds, tmp_path, AUDIT_HISTORY)
    argv = [
        sys.executable,
        "-m",
        "sidecar.cli",
        "tail",
        "--collector",
        f"127.0.0.1:{bg.server.port}",
        "--credentials",
        str(alice),
        "--no-follow",
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == len(AUDIT_HISTORY)

    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        closed = subprocess.run(
            argv, env=env, stdout=write_end, stderr=subprocess.PIPE, text=True, timeout=60
        )
    finally:
        os.close(write_end)
    assert (closed.returncode, closed.stderr) == (141, "")


def test_policy_suggest_learns_from_what_tail_json_prints(
    collector: tuple[_Background, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sidecar.cli import main
    from sidecar.policy import decide, exec_allowed, load_policy_text

    bg, cfg = collector
    creds, alice = _enroll_and_subscribe(bg, cfg, tmp_path, capsys)
    _publish(bg, creds, tmp_path, AUDIT_HISTORY)
    target = f"127.0.0.1:{bg.server.port}"
    argv = ["tail", "--collector", target, "--credentials", str(alice), "--no-follow", "--json"]
    assert _run(*argv) == 0
    history = tmp_path / "history.jsonl"
    history.write_text(capsys.readouterr().out)

    assert main(["policy", "suggest", "--history", str(history)]) == 0
    out, err = capsys.readouterr()
    assert err == ""  # every line understood
    assert "from 6 connect/exec event(s)" in out
    learnt = load_policy_text(out, "learnt.yaml")
    assert decide(learnt, A, "tcp", "192.0.2.1", 443).verdict == "allow"
    assert decide(learnt, A, "udp", "2001:db8::1", 53).verdict == "allow"
    assert decide(learnt, A, "tcp", "198.51.100.9", 22).verdict != "allow"  # was denied
    assert exec_allowed(learnt, A, "/usr/bin/curl")
    assert learnt.identities[A].unix is not None and len(learnt.identities[A].unix) == 1
