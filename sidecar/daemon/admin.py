"""The daemon's local admin socket: ``sidecar status`` and ``sidecar identities``.

One JSON request per connection (``{"cmd": "status"}``), one JSON answer.
The socket is mode 0600: only root asks the daemon about its state.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sidecar.util.errors import DaemonNotRunning, TransportError

_logger = logging.getLogger(__name__)

MAX_REQUEST = 4096
Handler = Callable[[dict[str, Any]], dict[str, Any]]


class AdminServer:
    def __init__(self, path: Path, handlers: dict[str, Handler]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            old = os.umask(0o177)
            try:
                self._server = await asyncio.start_unix_server(self._serve, path=str(self.path))
            finally:
                os.umask(old)
        except OSError as exc:
            raise TransportError(f"admin socket {self.path}: {exc.strerror or exc}") from exc

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await asyncio.wait_for(reader.readline(), timeout=5)
            try:
                req = json.loads(line[:MAX_REQUEST] or b"{}")
                handler = self.handlers.get(str(req.get("cmd")))
                if handler is None:
                    answer = {
                        "error": f"unknown command; known: {', '.join(sorted(self.handlers))}"
                    }
                else:
                    answer = handler(req)
            except (ValueError, AttributeError) as exc:
                answer = {"error": f"bad request: {exc}"}
            writer.write(json.dumps(answer, default=str).encode() + b"\n")
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, cmd: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask the daemon at ``path``.

    ``DaemonNotRunning`` when no daemon is there (the socket is absent, or
    nothing accepts on it: a daemon that was killed leaves its socket
    behind); ``TransportError`` for every other failure.
    """
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            try:
                s.connect(str(path))
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                raise DaemonNotRunning(
                    f"no daemon is running: nothing answers at {path} "
                    f"({exc.strerror or exc}; start it with 'sidecar run')"
                ) from exc
            s.sendall(json.dumps({"cmd": cmd}).encode() + b"\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
    except OSError as exc:
        raise TransportError(
            f"cannot reach the daemon at {path}: {exc.strerror or exc} (is 'sidecar run' running?)"
        ) from exc
    try:
        answer: dict[str, Any] = json.loads(b"".join(chunks))
    except ValueError as exc:
        raise TransportError(f"the daemon at {path} sent a malformed answer") from exc
    if "error" in answer:
        raise TransportError(f"the daemon refused: {answer['error']}")
    return answer
