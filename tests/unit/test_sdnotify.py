"""sd_notify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import socket
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar.daemon import sdnotify
from sidecar.util.errors import ConfigError, TransportError

_CREDS = struct.Struct("iII")  # struct ucred: pid, uid, gid


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start every test as if not run by systemd, whatever the test runner inherited."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A datagram socket bound in tmp_path, named in $NOTIFY_SOCKET, like systemd's."""
    path = tmp_path / "n.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    yield sock
    sock.close()


def _receive(sock: socket.socket) -> tuple[str, int]:
    """One datagram's text and the sender pid the kernel vouches for (SCM_CREDENTIALS)."""
    data, ancdata, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(_CREDS.size))
    pid = -1
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = _CREDS.unpack(payload[: _CREDS.size])[0]
    return data.decode(), pid


def test_ready_sends_ready_datagram_from_this_process(listener: socket.socket) -> None:
    assert sdnotify.ready() is True
    text, pid = _receive(listener)
    assert text == "READY=1"
    # NotifyAccess=main accepts messages only from the main pid: the kernel must see ours.
    assert pid == os.getpid()


def test_ready_with_status_flattens_newlines_into_one_status_line(
    listener: socket.socket,
) -> None:
    sdnotify.ready("enforcing\npolicy v3")
    text, _ = _receive(listener)
    assert text.splitlines() == ["READY=1", "STATUS=enforcing policy v3"]


def test_watchdog_reloading_stopping_and_status_send_their_keys(
    listener: socket.socket,
) -> None:
    sdnotify.watchdog()
    sdnotify.reloading()
    sdnotify.stopping()
    sdnotify.status("3 identities")
    received = [_receive(listener)[0] for _ in range(4)]
    assert received == ["WATCHDOG=1", "RELOADING=1", "STOPPING=1", "STATUS=3 identities"]


def test_abstract_socket_name_with_at_sign_is_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"sidecar-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.ready() is True
        assert sock.recv(4096) == b"READY=1"


def test_without_notify_socket_nothing_is_sent(listener: socket.socket) -> None:
    os.environ.pop("NOTIFY_SOCKET")
    assert sdnotify.ready() is False
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):
        listener.recv(4096)


def test_missing_socket_file_raises_transport_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    with pytest.raises(TransportError, match=r"absent\.sock"):
        sdnotify.ready()


def test_relative_notify_socket_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "relative/n.sock")
    with pytest.raises(TransportError, match="NOTIFY_SOCKET"):
        sdnotify.watchdog()


def test_state_without_assignment_is_rejected(listener: socket.socket) -> None:
    with pytest.raises(ValueError):
        sdnotify.notify("READY")


def test_watchdog_interval_is_none_without_watchdog() -> None:
    assert sdnotify.watchdog_interval() is None


def test_watchdog_interval_converts_microseconds_for_this_pid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0


def test_watchdog_interval_without_pid_applies_to_this_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "2500000")
    assert sdnotify.watchdog_interval() == 2.5


def test_watchdog_meant_for_another_pid_is_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert sdnotify.watchdog_interval() is None


@pytest.mark.parametrize(
    ("usec", "pid", "variable"),
    [("soon", None, "WATCHDOG_USEC"), ("0", None, "WATCHDOG_USEC"), ("100", "me", "WATCHDOG_PID")],
)
def test_malformed_watchdog_variables_raise_config_error_naming_them(
    monkeypatch: pytest.MonkeyPatch, usec: str, pid: str | None, variable: str
) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", usec)
    if pid is not None:
        monkeypatch.setenv("WATCHDOG_PID", pid)
    with pytest.raises(ConfigError, match=variable):
        sdnotify.watchdog_interval()
