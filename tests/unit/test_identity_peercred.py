"""The kernel, not the caller, says who is on the other end of the workload socket."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
from pathlib import Path

import pytest

from sidecar.identity.peercred import PeerCredFront, peer_caller
from sidecar.util.errors import TransportError


def _pidfd_pid(pidfd: int) -> int:
    with open(f"/proc/self/fdinfo/{pidfd}") as fh:
        for line in fh:
            if line.startswith("Pid:"):
                return int(line.split()[1])
    raise AssertionError("not a pidfd")


def test_peer_caller_reports_the_connected_process_and_pins_it_with_a_pidfd() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        caller = peer_caller(a)
        try:
            assert (caller.pid, caller.uid, caller.gid) == (os.getpid(), os.getuid(), os.getgid())
            assert _pidfd_pid(caller.pidfd) == os.getpid()
        finally:
            os.close(caller.pidfd)


def test_front_socket_is_mode_0666_and_replaces_a_stale_socket(tmp_path: Path) -> None:
    path = tmp_path / "s" / "api.sock"
    path.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(path))
    stale.close()  # the file stays behind, as after a crash

    async def scenario() -> int:
        front = PeerCredFront(path, tmp_path / "upstream.sock")
        await front.start()
        mode = stat.S_IMODE(path.stat().st_mode)
        await front.close()
        return mode

    assert asyncio.run(scenario()) == 0o666
    assert not path.exists()


def test_front_refuses_to_replace_a_file_that_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    path.write_text("not a socket")

    async def scenario() -> None:
        await PeerCredFront(path, tmp_path / "upstream.sock").start()

    with pytest.raises(TransportError, match="not a socket"):
        asyncio.run(scenario())
    assert path.read_text() == "not a socket"


def test_front_maps_the_upstream_peer_address_to_the_caller_while_connected(
    tmp_path: Path,
) -> None:
    async def scenario() -> tuple[str, int | None, bool, bool]:
        peers: asyncio.Queue[str] = asyncio.Queue()

        async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            name = writer.get_extra_info("socket").getpeername()
            await peers.put("unix-abstract:" + name[1:].decode())
            writer.write(await reader.readexactly(4))  # echo: the splice works both ways
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_unix_server(upstream, path=tmp_path / "up.sock")
        front = PeerCredFront(tmp_path / "api.sock", tmp_path / "up.sock")
        await front.start()
        reader, writer = await asyncio.open_unix_connection(tmp_path / "api.sock")
        writer.write(b"ping")
        echoed = await reader.readexactly(4) == b"ping"
        peer = await peers.get()
        caller = front.caller_for(peer)
        pid = caller.pid if caller else None
        writer.close()
        await writer.wait_closed()
        while front.caller_for(peer) is not None:
            await asyncio.sleep(0.01)
        await front.close()
        server.close()
        return peer, pid, echoed, front.caller_for("unix:") is None

    peer, pid, echoed, direct_unknown = asyncio.run(scenario())
    assert peer.startswith("unix-abstract:sidecar-wl/")
    assert pid == os.getpid()
    assert echoed
    assert direct_unknown
