"""A unix-socket front that learns who is calling, for a gRPC server that cannot.

The Workload API must know the calling process (SPIFFE Workload Endpoint: callers are
identified out of band, by the kernel), but ``grpc`` for Python never shows the
accepted socket.  So this front accepts on the public socket, reads the peer's
``SO_PEERCRED`` (pid, uid, gid) and takes a pidfd at once, then splices the bytes to
the gRPC server on a private socket.  Each upstream connection is bound to a fresh,
random abstract address; gRPC reports it as ``context.peer()``
(``unix-abstract:<name>``, verified with grpcio 1.85), which :meth:`caller_for` maps
back to the caller.

The pidfd pins the process: a pid reused after the caller died is a different
process, and a resolver that checks the pidfd notices.  ``SO_PEERPIDFD`` (Linux 6.5)
gives a pidfd with no race at all; older kernels fall back to ``pidfd_open``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import secrets
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from sidecar.util.errors import TransportError

_logger = logging.getLogger(__name__)

_SO_PEERPIDFD = getattr(socket, "SO_PEERPIDFD", 77)  # Linux asm-generic value
_UCRED = struct.Struct("iII")  # struct ucred: pid_t pid; uid_t uid; gid_t gid
_CHUNK = 65536
_ABSTRACT_PREFIX = "sidecar-wl/"


@dataclass(frozen=True)
class Caller:
    """The process at the other end of a Workload API connection, as the kernel says."""

    pid: int
    uid: int
    gid: int
    pidfd: int  # owned by the front; valid while the connection lives


def peer_caller(sock: socket.socket) -> Caller:
    """Read the peer credentials of a connected unix socket and pin the process."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    if pid <= 0:
        raise TransportError("peer credentials carry no pid (peer in another pid namespace?)")
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERPIDFD)
    except OSError as exc:
        if exc.errno not in (errno.ENOPROTOOPT, errno.EINVAL):
            raise TransportError(f"SO_PEERPIDFD failed: {exc}") from exc
        try:
            pidfd = os.pidfd_open(pid)
        except OSError as exc2:
            raise TransportError(f"caller pid {pid} is gone: {exc2}") from exc2
    return Caller(pid=pid, uid=uid, gid=gid, pidfd=pidfd)


class PeerCredFront:
    """Accepts on ``public_path`` (mode 0666) and splices to ``upstream_path``."""

    def __init__(self, public_path: Path, upstream_path: Path) -> None:
        self.public_path = public_path
        self.upstream_path = upstream_path
        self._callers: dict[str, Caller] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    def caller_for(self, peer: str) -> Caller | None:
        """The caller behind a gRPC ``context.peer()`` string, if it came through us."""
        return self._callers.get(peer)

    async def start(self) -> None:
        try:
            self.public_path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
            _remove_stale_socket(self.public_path)
            self._server = await asyncio.start_unix_server(self._handle, path=self.public_path)
            os.chmod(self.public_path, 0o666)
        except OSError as exc:
            raise TransportError(f"cannot listen on {self.public_path}: {exc}") from exc
        _logger.info("workload API listening on unix://%s", self.public_path)

    def stop_accepting(self) -> None:
        """Refuse new connections; open ones carry on until :meth:`close`."""
        if self._server is not None:
            self._server.close()
        with contextlib.suppress(FileNotFoundError):
            self.public_path.unlink()

    async def close(self) -> None:
        """Stop accepting, cut every connection and remove the socket file."""
        self.stop_accepting()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._serve(reader, writer)
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock: socket.socket = writer.get_extra_info("socket")
        try:
            caller = peer_caller(sock)
        except (TransportError, OSError) as exc:
            _logger.warning("workload API connection refused: %s", exc)
            return
        up = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        name = _ABSTRACT_PREFIX + secrets.token_hex(16)
        peer = f"unix-abstract:{name}"
        try:
            up.bind(b"\0" + name.encode())
            up.setblocking(False)
            self._callers[peer] = caller
            await asyncio.get_running_loop().sock_connect(up, str(self.upstream_path))
            up_reader, up_writer = await asyncio.open_unix_connection(sock=up)
        except OSError as exc:
            _logger.error("cannot reach the workload API server: %s", exc)
            self._callers.pop(peer, None)
            up.close()
            os.close(caller.pidfd)
            return
        _logger.debug("caller pid %d uid %d connected as %s", caller.pid, caller.uid, peer)
        try:
            await _splice(reader, writer, up_reader, up_writer)
        finally:
            self._callers.pop(peer, None)
            up_writer.close()
            os.close(caller.pidfd)


async def _splice(
    a_reader: asyncio.StreamReader,
    a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader,
    b_writer: asyncio.StreamWriter,
) -> None:
    """Copy both ways until either side ends; then the whole connection ends."""
    pumps = [
        asyncio.create_task(_pump(a_reader, b_writer)),
        asyncio.create_task(_pump(b_reader, a_writer)),
    ]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()


def _remove_stale_socket(path: Path) -> None:
    """A socket file left by a crashed daemon would make bind fail: remove it, nothing else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise TransportError(f"{path} exists and is not a socket")
    path.unlink()
