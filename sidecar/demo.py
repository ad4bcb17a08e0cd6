"""``make demo``: the product on its embedded default, end to end, in seconds.

The demo makes its own scratch cgroup and pin directory (never the root
cgroup, never the production pins), runs the daemon in the foreground
printing each event as it happens, starts a small demo agent inside the
cgroup (it runs a tool, connects over TCP to a loopback listener the demo
opens, and sends a UDP datagram without connecting), then stops and
removes everything it made.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
from dataclasses import replace
from pathlib import Path

from sidecar import config
from sidecar.daemon import Daemon, JsonLinesSink
from sidecar.errors import KernelError
from sidecar.kernel.checks import cgroup2_root

_logger = logging.getLogger(__name__)

AGENT = r"""
import os, socket, subprocess, sys
port = int(sys.argv[1])
print("demo agent: running a tool", file=sys.stderr)
subprocess.run(["/bin/echo", "hello from a tool the agent spawned"], check=True)
print("demo agent: connecting to 127.0.0.1:%d over TCP" % port, file=sys.stderr)
with socket.create_connection(("127.0.0.1", port), timeout=2):
    pass
print("demo agent: sending a UDP datagram to [::1]:%d without connect" % port, file=sys.stderr)
with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
    s.sendto(b"ping", ("::1", port))
"""


def _move_self_into(cgroup: Path) -> None:
    # Runs in the child between fork and exec: only async-signal-safe calls.
    fd = os.open(cgroup / "cgroup.procs", os.O_WRONLY)
    try:
        os.write(fd, b"0")
    finally:
        os.close(fd)


async def _demo(scratch: Path, pin_dir: Path) -> int:
    cfg = replace(
        config.load(None, cgroup=scratch, output="-"),
        pin_dir=pin_dir,
        detach_on_exit=True,
    )
    sink = JsonLinesSink("-")
    daemon = Daemon(cfg, sink)
    ready = asyncio.Event()
    runner = asyncio.create_task(daemon.run(on_ready=ready.set))
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    try:
        waiter = asyncio.create_task(ready.wait())
        done, _ = await asyncio.wait({waiter, runner}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done:
            await runner  # raises the start-up error
            return 1
        print(f"== daemon watching {scratch}; starting the demo agent", file=sys.stderr)
        agent = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            AGENT,
            str(port),
            preexec_fn=lambda: _move_self_into(scratch),
        )
        rc = await agent.wait()
        await asyncio.sleep(0.5)  # let the last records drain
        print(f"== demo agent exited with {rc}; stopping", file=sys.stderr)
        return 0 if rc == 0 else 1
    finally:
        listener.close()
        daemon.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        sink.close()


def run_demo(seconds: float = 0) -> int:
    del seconds  # the demo ends when its agent is done
    scratch = cgroup2_root() / f"sidecar-demo-{os.getpid()}"
    pin_dir = Path(f"/sys/fs/bpf/sidecar-demo-{os.getpid()}")
    try:
        scratch.mkdir()
    except OSError as exc:
        raise KernelError(f"cannot create the demo cgroup {scratch}: {exc.strerror}") from exc
    try:
        return asyncio.run(_demo(scratch, pin_dir))
    finally:
        from sidecar.kernel.loader import uninstall

        uninstall(pin_dir)
        with contextlib.suppress(OSError):
            scratch.rmdir()
