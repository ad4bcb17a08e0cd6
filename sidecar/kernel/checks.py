"""What the kernel and host must offer before the daemon loads anything.

Each failed check says what is wrong and how to fix it; the CLI prints the
first one as a single line and exits with code 2.
"""

from __future__ import annotations

import importlib.util
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from sidecar.util.errors import KernelError

BTF_PATH = Path("/sys/kernel/btf/vmlinux")
SETUP_HINT = "run 'make setup' (or scripts/setup-host.sh) as root"


@dataclass(frozen=True)
class Mounts:
    cgroup2: Path
    tracefs: Path
    bpffs: Path


def _mounts(proc_mounts: Path = Path("/proc/mounts")) -> list[tuple[str, str]]:
    out = []
    for line in proc_mounts.read_text().splitlines():
        parts = line.split()
        if len(parts) >= 3:
            out.append((parts[2], parts[1].replace("\\040", " ")))
    return out


def find_mount(fstype: str, proc_mounts: Path = Path("/proc/mounts")) -> Path | None:
    """First mount point of a file system type (cgroup2, tracefs, bpf)."""
    for kind, where in _mounts(proc_mounts):
        if kind == fstype:
            return Path(where)
    return None


def fs_type_of(path: Path, proc_mounts: Path = Path("/proc/mounts")) -> str | None:
    """The file system type of the mount that holds ``path`` (the longest mount point)."""
    target = os.path.realpath(path)
    best, kind = "", None
    for fstype, where in _mounts(proc_mounts):
        if (target == where or target.startswith(where.rstrip("/") + "/")) and len(where) >= len(
            best
        ):
            best, kind = where, fstype
    return kind


def cgroup2_root() -> Path:
    root = find_mount("cgroup2")
    if root is None:
        raise KernelError(
            "no cgroup2 file system is mounted; mount one: "
            "mount -t cgroup2 none /sys/fs/cgroup/unified"
        )
    return root


def headers_dir(release: str | None = None) -> Path | None:
    """The kernel header tree BCC will compile against, if any."""
    env = os.environ.get("BCC_KERNEL_SOURCE")
    if env:
        return Path(env) if Path(env).is_dir() else None
    build = Path("/lib/modules") / (release or platform.release()) / "build"
    return build if (build / "include").is_dir() or (build / "Makefile").is_file() else None


def preflight(need_root: bool = True) -> Mounts:
    """Check everything; raise ``KernelError`` naming the first problem and its fix."""
    if need_root and os.geteuid() != 0:
        raise KernelError("the daemon must run as root (it loads BPF programs): run it with sudo")
    if not BTF_PATH.exists():
        raise KernelError(
            f"the kernel has no BTF ({BTF_PATH} is missing): use a kernel built with "
            "CONFIG_DEBUG_INFO_BTF=y"
        )
    cg = cgroup2_root()
    tracefs = find_mount("tracefs")
    if tracefs is None:
        raise KernelError(
            f"tracefs is not mounted: mount -t tracefs tracefs /sys/kernel/tracing, or {SETUP_HINT}"
        )
    bpffs = find_mount("bpf")
    if bpffs is None:
        raise KernelError(
            f"the BPF file system is not mounted: mount -t bpf bpf /sys/fs/bpf, or {SETUP_HINT}"
        )
    if headers_dir() is None:
        raise KernelError(
            f"no kernel headers at /lib/modules/{platform.release()}/build: install "
            f"linux-headers-{platform.release()}, or link a header tree there, or {SETUP_HINT}"
        )
    # Found, not imported: the prepare step compiles with it, this process never loads it.
    if importlib.util.find_spec("bcc") is None:
        raise KernelError(
            "the BCC Python module is missing: apt-get install python3-bpfcc, "
            "and run from a venv created with --system-site-packages"
        )
    return Mounts(cgroup2=cg, tracefs=tracefs, bpffs=bpffs)
