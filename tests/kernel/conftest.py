"""Fixtures for tests against the real kernel.

Safety on shared machines: programs are attached only to scratch cgroups
these fixtures create under the cgroup2 mount, only the tests' own children
are moved into them, and every cgroup, link and pinned map is removed in
teardown, also when the test fails.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from sidecar.proc.cgroups import DANGEROUS_CAPS, start_in
from sidecar.testing.inprocess import InProcessDaemon, MemorySink, inprocess_config, run_daemon
from sidecar.testing.scratch import (
    make_cgroup,
    remove_cgroup,
    remove_pins,
    scratch_pin_dir,
    unique_name,
)

SCRATCH_PREFIX = "sidecar-test-"


@pytest.fixture
def scratch_cgroup() -> Iterator[Path]:
    cg = make_cgroup(unique_name(SCRATCH_PREFIX))
    try:
        yield cg
    finally:
        remove_cgroup(cg)


@pytest.fixture
def pin_dir() -> Iterator[Path]:
    path = scratch_pin_dir(unique_name(SCRATCH_PREFIX))
    try:
        yield path
    finally:
        remove_pins(path)


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


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A short, world-readable temporary folder (unix socket paths are limited to 108 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="sc-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def daemon(
    scratch_cgroup: Path, pin_dir: Path, short_tmp: Path
) -> Iterator[InProcessDaemon[MemorySink]]:
    with run_daemon(inprocess_config(scratch_cgroup, pin_dir, short_tmp)) as d:
        yield d


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
