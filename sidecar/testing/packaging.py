"""The Debian package and the images, built once per test session, and a clean root to install into.

``built_deb`` and ``built_images`` run the same scripts as ``make deb`` and
``make image`` (packaging/), once per process, so the package tests and the
image's kernel test share one build.  Downloaded Debian packages are kept in
``build/pkg-cache/archives`` (gitignored), so a second session fetches
nothing.  ``PODMAN`` is how the tests run podman: as root, with runc and
cgroupfs (crun refuses hosts whose cgroup layout is hybrid) and open-file
and process limits within the host's hard limits, chosen on the command line
so the host's container configuration is left as it is.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from sidecar.testing.scratch import REPO
from sidecar.util.errors import SidecarError

CACHE = REPO / "build" / "pkg-cache"
ARCHIVES = CACHE / "archives"
DIST = REPO / "build" / "test-dist"
SUITE = "bookworm"
PODMAN = ["podman", "--runtime", "runc", "--cgroup-manager", "cgroupfs"]
PODMAN_LIMITS = ["--ulimit", "nofile=1024:1024", "--ulimit", "nproc=4096:4096"]
#: What the package tests need on the host (scripts/setup-host.sh installs them).
TOOLS = ("mmdebstrap", "dpkg-deb", "podman", "runc", "systemd-analyze")


def missing_tools() -> list[str]:
    return [t for t in TOOLS if shutil.which(t) is None]


def _run(
    argv: list[str], what: str, env: dict[str, str] | None = None, timeout: float = 600
) -> str:
    proc = subprocess.run(
        argv, capture_output=True, text=True, env=env, timeout=timeout, check=False
    )
    if proc.returncode != 0:
        raise SidecarError(f"{what} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc.stdout


@functools.cache
def built_deb() -> Path:
    """packaging/build-deb.sh with this interpreter's virtualenv; the .deb's path."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(DIST)}
    out = _run([str(REPO / "packaging" / "build-deb.sh")], "build-deb.sh", env=env)
    return Path(out.strip().splitlines()[-1])


@functools.cache
def built_images() -> tuple[str, str]:
    """packaging/build-image.sh on :func:`built_deb`; (daemon image, collector image)."""
    env = {**os.environ, "CACHE": str(ARCHIVES)}
    deb = built_deb()
    out = _run([str(REPO / "packaging" / "build-image.sh"), str(deb)], "build-image.sh", env=env)
    daemon, collector = out.strip().splitlines()[-1].split()
    return daemon, collector


def image_packages() -> Path:
    """The package list of the last image build (written next to the .deb)."""
    built_images()
    return built_deb().parent / "sidecar-image-packages.txt"


def install_into_clean_root(deb: Path, root: Path) -> str:
    """A fresh Debian root at ``root`` (apt and systemd, as on a new host), then
    ``apt-get install ./<deb>`` inside it; apt's output.

    Recommends are not installed: they add the kernel headers for BCC, which
    the checks here do not need and which would triple the download.
    """
    ARCHIVES.mkdir(parents=True, exist_ok=True)
    log = root.parent / f"{root.name}-apt.log"
    _run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=apt",
            "--include=systemd",
            "--skip=download/empty",
            '--setup-hook=mkdir -p "$1"/var/cache/apt/archives',
            f"--setup-hook=sync-in '{ARCHIVES}' /var/cache/apt/archives",
            f"--customize-hook=copy-in '{deb}' /tmp",
            '--customize-hook=chroot "$1" apt-get install -y --no-install-recommends '
            f"'/tmp/{deb.name}' >'{log}' 2>&1",
            f"--customize-hook=sync-out /var/cache/apt/archives '{ARCHIVES}'",
            f"--customize-hook=rm -f \"$1\"/tmp/'{deb.name}'",
            SUITE,
            str(root),
        ],
        "mmdebstrap of a clean root with the package",
    )
    return log.read_text()


def unit_executables(unit_text: str) -> list[str]:
    """The programs a unit's Exec*= lines start (the path before any argument,
    without systemd's ``+-@!:`` prefixes)."""
    found = []
    for raw in unit_text.splitlines():
        key, sep, value = raw.strip().partition("=")
        if sep and key.startswith("Exec") and value:
            found.append(value.split()[0].lstrip("+-@!:"))
    return found
