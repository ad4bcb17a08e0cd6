"""The systemd notification protocol (sd_notify), without libsystemd.

The daemon runs as ``Type=notify``: systemd considers it started only when it
says ``READY=1``, which the daemon sends once enforcement is attached, so that
units ordered after ``sidecar.service`` never run unprotected.  With
``WatchdogSec=`` set, systemd restarts the daemon when it stops sending
``WATCHDOG=1``; the daemon feeds it from its event loop so that a wedged loop
is noticed.

The protocol is one datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named
by ``$NOTIFY_SOCKET`` (a path, or an abstract name written with a leading
``@``).  Outside systemd the variable is unset and every call is a no-op, so
the same binary runs in a terminal, a container or under systemd.
"""

from __future__ import annotations

import logging
import os
import socket

from sidecar.util.errors import ConfigError, TransportError

_logger = logging.getLogger(__name__)

NOTIFY_SOCKET_ENV = "NOTIFY_SOCKET"
WATCHDOG_USEC_ENV = "WATCHDOG_USEC"
WATCHDOG_PID_ENV = "WATCHDOG_PID"


def _socket_address(value: str) -> str | bytes:
    """Turn ``$NOTIFY_SOCKET`` into an address ``sendto`` accepts.

    systemd writes abstract socket names with a leading ``@``; the kernel wants
    a leading NUL byte instead.
    """
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    raise TransportError(
        f"{NOTIFY_SOCKET_ENV}={value!r}: only absolute paths and abstract (@) names are supported"
    )


def notify(state: str) -> bool:
    """Send ``state`` (newline-separated ``KEY=VALUE`` lines) to systemd.

    Returns False without sending when ``$NOTIFY_SOCKET`` is unset (not run by
    systemd), True when the datagram was sent.  Raises ``TransportError`` when
    the socket is named but cannot be reached: a daemon that fails to say
    READY would be killed by systemd at ``TimeoutStartSec``, so the caller
    should know.
    """
    target = os.environ.get(NOTIFY_SOCKET_ENV)
    if not target:
        return False
    if not state or "=" not in state:
        raise ValueError(f"sd_notify state must be KEY=VALUE lines, got {state!r}")
    address = _socket_address(target)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        raise TransportError(f"cannot notify systemd at {target}: {exc}") from exc
    _logger.debug("sd_notify %r", state)
    return True


def ready(status: str | None = None) -> bool:
    """Tell systemd that start-up finished (enforcement attached), with an optional status."""
    return notify("READY=1" if status is None else f"READY=1\nSTATUS={_one_line(status)}")


def reloading(status: str | None = None) -> bool:
    """Tell systemd that a policy/entries reload started; follow with ``ready()``."""
    return notify("RELOADING=1" if status is None else f"RELOADING=1\nSTATUS={_one_line(status)}")


def stopping() -> bool:
    """Tell systemd that shutdown started, so it does not mistake the pause for a hang."""
    return notify("STOPPING=1")


def status(text: str) -> bool:
    """Publish a one-line status that ``systemctl status`` shows."""
    return notify(f"STATUS={_one_line(text)}")


def watchdog() -> bool:
    """Feed the systemd watchdog; call at least every ``watchdog_interval() / 2`` seconds."""
    return notify("WATCHDOG=1")


def watchdog_interval() -> float | None:
    """Seconds within which systemd expects ``watchdog()``, or None when no watchdog is on.

    systemd sets ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID``; the PID check keeps a
    child process that inherited the environment from feeding its parent's
    watchdog.  Malformed values raise ``ConfigError``.
    """
    usec_text = os.environ.get(WATCHDOG_USEC_ENV)
    if not usec_text:
        return None
    pid_text = os.environ.get(WATCHDOG_PID_ENV)
    if pid_text:
        try:
            pid = int(pid_text)
        except ValueError as exc:
            raise ConfigError(f"{WATCHDOG_PID_ENV}={pid_text!r} is not a process id") from exc
        if pid != os.getpid():
            return None
    try:
        usec = int(usec_text)
    except ValueError as exc:
        raise ConfigError(f"{WATCHDOG_USEC_ENV}={usec_text!r} is not a number") from exc
    if usec <= 0:
        raise ConfigError(f"{WATCHDOG_USEC_ENV}={usec_text!r} must be positive")
    return usec / 1_000_000


def _one_line(text: str) -> str:
    """Keep a status to one line: a newline would start a new KEY=VALUE assignment."""
    return " ".join(text.splitlines())
