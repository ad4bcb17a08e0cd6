"""The room one test, demo or benchmark run works in: a scratch cgroup, pins, a folder.

Safety on shared machines (``DESIGN.md``): programs are attached only to
a scratch cgroup made here under the cgroup2 mount, only the run's own
children are moved into it, and :meth:`Scratch.remove` takes every pinned
link and map, the cgroup (killing what is left in it) and the work folder
away again, in that order, each even when an earlier one failed.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from sidecar.util.errors import SidecarError

REPO = Path(__file__).resolve().parents[2]
BPFFS = Path("/sys/fs/bpf")

T = TypeVar("T")


def repo_env() -> dict[str, str]:
    """The environment for a child that runs this checkout's ``sidecar``."""
    paths = [str(REPO), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, what: str = "condition") -> T:
    """Poll ``predicate`` until it returns something true; an AssertionError if it never does."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def unique_name(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def make_cgroup(name: str) -> Path:
    """A new, empty cgroup ``name`` directly under the cgroup2 mount."""
    from sidecar.kernel.checks import cgroup2_root

    cgroup = cgroup2_root() / name
    try:
        cgroup.mkdir()
    except OSError as exc:
        raise SidecarError(f"cannot create the scratch cgroup {cgroup}: {exc.strerror}") from exc
    return cgroup


def scratch_pin_dir(name: str) -> Path:
    """Where a run's daemon or loader pins its links and maps (made by them, not here)."""
    return BPFFS / name


def remove_cgroup(cgroup: Path) -> None:
    """Kill whatever is left in ``cgroup`` and its children, and remove them all."""
    from sidecar.proc.cgroups import remove_tree

    remove_tree(cgroup)


def remove_pins(pin_dir: Path) -> None:
    """Detach and unpin everything a daemon or loader pinned under ``pin_dir``."""
    from sidecar.kernel.loader import uninstall

    uninstall(pin_dir)


@dataclass
class Scratch:
    """A scratch cgroup, a pin directory and a work folder; :meth:`remove` them in a ``finally``."""

    cgroup: Path
    pin_dir: Path
    work: Path

    @classmethod
    def create(cls, prefix: str, work: Path | None = None) -> Scratch:
        """Cgroup and pins named ``prefix`` and a random tag; folder ``work``, or a new one.

        The folder is world-readable and short-named: unix socket paths in it
        are limited to 108 bytes.
        """
        name = unique_name(prefix)
        made = work is None
        folder = Path(tempfile.mkdtemp(prefix=f"{name}-", dir="/tmp")) if work is None else work
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o755)
        try:
            cgroup = make_cgroup(name)
        except BaseException:
            if made:
                shutil.rmtree(folder, ignore_errors=True)
            raise
        return cls(cgroup, scratch_pin_dir(name), folder)

    def remove(self, keep_work: bool = False) -> None:
        """Unpin (and detach), remove the cgroup, then the folder unless ``keep_work``."""
        try:
            remove_pins(self.pin_dir)
        finally:
            try:
                remove_cgroup(self.cgroup)
            finally:
                if not keep_work:
                    shutil.rmtree(self.work, ignore_errors=True)
