"""Signalling a process by pidfd, so that a reused pid is never the one hit."""

from __future__ import annotations

import os
import signal


def kill(pid: int) -> bool:
    """SIGKILL ``pid`` through a pidfd; False if it is gone."""
    try:
        fd = os.pidfd_open(pid)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
        finally:
            os.close(fd)
    except OSError:
        return False
    return True
