"""Fixtures for tests against the real kernel.

Safety on shared machines: programs are attached only to scratch cgroups
these fixtures create under the cgroup2 mount, only the tests' own children
are moved into them, and every cgroup, link and pinned map is removed in
teardown, also when the test fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from sidecar.events.codec import encode_json, from_json, from_proto, to_proto
from sidecar.events.model import Event
from sidecar.proc.cgroups import DANGEROUS_CAPS, remove_tree, start_in

SCRATCH_PREFIX = "sidecar-test-"
BPFFS = Path("/sys/fs/bpf")
REPO = Path(__file__).resolve().parents[2]


def cgroup2_mount() -> Path:
    from sidecar.kernel.checks import cgroup2_root

    return cgroup2_root()


@pytest.fixture
def scratch_cgroup() -> Iterator[Path]:
    cg = cgroup2_mount() / f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:10]}"
    cg.mkdir()
    try:
        yield cg
    finally:
        remove_tree(cg)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    from sidecar.kernel.loader import uninstall

    path = BPFFS / f"{SCRATCH_PREFIX}{uuid.uuid4().hex[:10]}"
    try:
        yield path
    finally:
        uninstall(path)


def spawn(
    cgroup: Path,
    argv: Sequence[str],
    *,
    uid: int | None = None,
    privileged: bool = False,
    **kw: Any,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` inside ``cgroup`` (optionally as ``uid``), from its first instruction.

    As an agent should run: without the capabilities a policy refuses unless
    it accepts them (CAP_SYS_ADMIN, CAP_BPF, ...), unless ``privileged``.
    """
    drop = () if privileged else DANGEROUS_CAPS
    return start_in(cgroup, argv, uid=uid, drop_caps=drop, **kw)


def bpftool_json(*args: str) -> Any:
    """bpftool's JSON answer; bpftool is installed by ``make setup``, so its absence fails."""
    if shutil.which("bpftool") is None:
        pytest.fail("bpftool is missing: make setup installs it")
    out = subprocess.run(["bpftool", "-j", *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout) if out.stdout.strip() else None


def hook_program_ids(pin_dir: Path) -> set[int]:
    """Ids of the programs behind the cgroup links pinned under ``pin_dir``."""
    from sidecar.kernel import abi

    ids: set[int] = set()
    for link in sorted((pin_dir / f"v{abi.ABI_VERSION}" / "links").iterdir()):
        info = bpftool_json("link", "show", "pinned", str(link))
        if info and info.get("type") == "cgroup":
            ids.add(int(info["prog_id"]))
    return ids


def attached_program_ids(cgroup: Path) -> list[int]:
    """Ids of the programs attached directly at ``cgroup`` on every hook we use.

    Asked of the kernel (BPF_PROG_QUERY) rather than bpftool, which queries
    only the attach types its libbpf knows: not the unix-socket ones (6.7+).
    """
    import ctypes

    from sidecar.kernel import libbpf
    from sidecar.kernel.loader import CGROUP_HOOKS
    from sidecar.kernel.unix import UNIX_HOOKS

    lib = libbpf.lib()
    lib.bpf_prog_query.argtypes = [
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_uint32,
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
        ctypes.POINTER(ctypes.c_uint32),
    ]
    types = {t for *_, t in CGROUP_HOOKS} | {t for *_, t in UNIX_HOOKS}
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
    ids: list[int] = []
    try:
        for attach_type in sorted(types):
            buf = (ctypes.c_uint32 * 256)()
            count = ctypes.c_uint32(256)
            flags = ctypes.c_uint32(0)
            rc = lib.bpf_prog_query(
                fd, attach_type, 0, ctypes.byref(flags), buf, ctypes.byref(count)
            )
            assert rc == 0, f"BPF_PROG_QUERY on {cgroup} for attach type {attach_type}: {rc}"
            ids.extend(int(buf[i]) for i in range(count.value))
    finally:
        os.close(fd)
    return ids


def write_entries_file(tmp: Path, entries: str) -> Path:
    """A registration entries file in ``tmp`` with ``entries`` (YAML list items) under it."""
    path = tmp / "entries.yaml"
    path.write_text(
        "apiVersion: sidecar/v1\nkind: RegistrationEntries\ntrustDomain: example.org\n"
        "entries:\n" + entries
    )
    return path


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class MemorySink:
    """Event sink that keeps events in memory for assertions (thread-safe).

    Each event is kept as its JSON line reads back, so tests see exactly what
    the JSON-lines sink writes (argv is a list there, for example).  Each is
    also decoded back from its JSON line and its wire form, and must come
    back equal.
    """

    def __init__(self) -> None:
        self.target = "<memory>"
        self.events: list[dict[str, Any]] = []
        self._lock = threading.Lock()

    def write(self, event: Event) -> None:
        encoded = encode_json(event)
        # Every real event survives both encodings unchanged (tests/unit/test_events.py
        # proves it for one of each kind; here it is every event the kernel tests see).
        assert from_json(orjson.loads(encoded)) == event, encoded
        assert from_proto(to_proto(event)) == event, encoded
        with self._lock:
            self.events.append(orjson.loads(encoded))

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self.events)

    def find(self, **match: Any) -> list[dict[str, Any]]:
        return [e for e in self.snapshot() if all(e.get(k) == v for k, v in match.items())]

    def wait_for(self, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        found = wait_until(lambda: self.find(**match), timeout, f"event {match}")
        return found[0]  # type: ignore[no-any-return]


@dataclass
class InProcessDaemon:
    """The real daemon (real BPF) running on its own event loop in a thread."""

    daemon: Any
    sink: MemorySink
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def table(self) -> Any:
        return self.daemon.table

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the daemon's loop (where its state lives) and return its result."""

        async def _run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(_run(), self.loop).result(10)


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short, world-readable temporary folder (unix socket paths are limited to 108 bytes)."""
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def daemon_config(scratch: Path, pin_dir: Path, tmp: Path, **over: Any) -> Any:
    """The embedded default, pointed at a test's own cgroup, pins, sockets and state."""
    from sidecar.daemon import config

    base = replace(
        config.load(None, cgroup=scratch, output="-"),
        pin_dir=pin_dir,
        detach_on_exit=True,
        host="test-host",
        admin_socket=tmp / "admin.sock",
        workload_socket=tmp / "workload.sock",
        state_dir=tmp / "state",
        metrics="",
    )
    return replace(base, **over)


@contextlib.contextmanager
def run_daemon(cfg: Any, metrics: Any = None) -> Iterator[InProcessDaemon]:
    """The real daemon on its own loop in a thread, stopped and cleaned up on exit."""
    from sidecar.daemon.core import Daemon

    sink = MemorySink()
    d = Daemon(cfg, sink, metrics)
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    errors: list[BaseException] = []

    def _main() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(d.run(on_ready=ready.set))
        except BaseException as exc:  # reported to the test below
            errors.append(exc)
            ready.set()

    t = threading.Thread(target=_main, name="daemon", daemon=True)
    t.start()
    assert ready.wait(60), "daemon did not become ready"
    if errors:
        raise errors[0]
    try:
        yield InProcessDaemon(d, sink, loop, t)
    finally:
        loop.call_soon_threadsafe(d.stop)
        t.join(30)
        loop.close()
        if errors:
            raise errors[0]


@pytest.fixture
def daemon(scratch_cgroup: Path, pin_dir: Path, short_tmp: Path) -> Iterator[InProcessDaemon]:
    with run_daemon(daemon_config(scratch_cgroup, pin_dir, short_tmp)) as d:
        yield d


class NotifySocket:
    """A datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))

    def wait_for(self, word: str, timeout: float) -> str:
        self.sock.settimeout(timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = self.sock.recv(4096).decode()
            if word in msg.split("\n"):
                return msg
        raise AssertionError(f"no {word} from the daemon within {timeout}s")

    def close(self) -> None:
        self.sock.close()


@dataclass
class DaemonProcess:
    """``sidecar run`` as a separate process, as an operator runs it."""

    proc: subprocess.Popen[bytes]
    output: Path
    stderr: Path

    def events(self) -> list[dict[str, Any]]:
        if not self.output.exists():
            return []
        out = []
        for line in self.output.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                out.append(json.loads(line))
        return out

    def wait_for(self, timeout: float = 10.0, **match: Any) -> dict[str, Any]:
        def find() -> list[dict[str, Any]]:
            return [e for e in self.events() if all(e.get(k) == v for k, v in match.items())]

        return wait_until(find, timeout, f"event {match}")[0]  # type: ignore[no-any-return]


def start_daemon_process(
    tmp: Path, config_text: str, *extra: str, timeout: float = 60.0
) -> DaemonProcess:
    cfg = tmp / f"config-{uuid.uuid4().hex[:6]}.yaml"
    cfg.write_text(config_text)
    output = tmp / "events.jsonl"
    notify = NotifySocket(tmp / f"notify-{uuid.uuid4().hex[:6]}.sock")
    err = tmp / "daemon.stderr"
    env = dict(os.environ, NOTIFY_SOCKET=str(notify.path), PYTHONPATH=str(REPO))
    with err.open("ab") as err_fh:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sidecar.cli",
                "run",
                "--config",
                str(cfg),
                "--output",
                str(output),
                *extra,
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=err_fh,
        )
    try:
        notify.wait_for("READY=1", timeout)
    except (AssertionError, OSError) as exc:
        proc.kill()
        proc.wait()
        raise AssertionError(f"daemon not ready: {exc}\n{err.read_text()}") from exc
    finally:
        notify.close()
    return DaemonProcess(proc, output, err)


def stop_daemon_process(d: DaemonProcess, sig: int = signal.SIGTERM) -> int:
    if d.proc.poll() is None:
        d.proc.send_signal(sig)
    try:
        return d.proc.wait(30)
    except subprocess.TimeoutExpired:
        d.proc.kill()
        return d.proc.wait()


# A child that waits for commands on stdin and answers each with the errno
# of the attempt (0 = it went through).
PROBE = r"""
import os, socket, subprocess, sys
for line in sys.stdin:
    cmd = line.split()
    if cmd[0] == "pid":
        print(os.getpid(), flush=True); continue
    if cmd[0] == "exec":
        r = subprocess.run(cmd[1:])
        print(r.returncode, flush=True); continue
    if cmd[0] == "fork-connect":  # a grandchild, through a double fork, connects
        r, w = os.pipe()
        if os.fork() == 0:
            if os.fork() == 0:
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                try:
                    s.sendto(b"x", (cmd[1], int(cmd[2]))); code = 0
                except OSError as e:
                    code = e.errno
                os.write(w, str(code).encode()); os._exit(0)
            os._exit(0)
        os.wait()
        print(int(os.read(r, 16)), flush=True); continue
    fam = socket.AF_INET6 if cmd[1] == "6" else socket.AF_INET
    kind = socket.SOCK_STREAM if cmd[0] == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(fam, kind)
    s.settimeout(2)
    try:
        if kind == socket.SOCK_STREAM:
            s.connect((cmd[2], int(cmd[3])))
        else:
            s.sendto(b"x", (cmd[2], int(cmd[3])))
        code = 0
    except OSError as e:
        code = e.errno or -1
    s.close()
    print(code, flush=True)
"""


class Probe:
    """A process in the scratch cgroup that makes attempts on request."""

    def __init__(self, cgroup: Path, privileged: bool = False) -> None:
        self.proc = spawn(
            cgroup,
            [sys.executable, "-c", PROBE],
            privileged=privileged,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.pid = int(self.ask("pid"))

    def ask(self, line: str) -> int:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.kill()
        self.proc.wait(10)


def free_port_pair() -> int:
    """A port P such that nothing listens on P-1 .. P+2 on 127.0.0.1 right now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if 1025 < p < 65000:
            return p
    raise AssertionError("no free port")
