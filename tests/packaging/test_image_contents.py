"""The images (`make image`): Debian packages only, the package list held to a checked-in one.

"Reproducible enough": the list of installed packages (name, architecture)
must equal packaging/image-packages.txt.  Versions are left out of the
comparison, since Debian's point releases and security updates change them
between builds of the same commit; a package that appears or disappears (a
new dependency, a shell session's leftover, apt or a compiler pulled in) fails
the test until the list is updated on purpose.  That catches drift across
time, which two builds back to back would not.  The image holds its own list
too, and a label with the list's hash.

Running the daemon image against the kernel is tests/kernel/test_images_in_podman.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest

from sidecar import __version__
from sidecar.testing.packaging import (
    PODMAN,
    PODMAN_LIMITS,
    built_images,
    image_packages,
    missing_tools,
)
from sidecar.testing.scratch import REPO

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap and podman need root")

EXPECTED = REPO / "packaging" / "image-packages.txt"


def inspect(image: str) -> Any:
    out = subprocess.run(
        [*PODMAN, "image", "inspect", image], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)[0]


def run(image: str, *argv: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    extra = ["--entrypoint", entrypoint] if entrypoint else []
    return subprocess.run(
        [*PODMAN, "run", "--rm", "--network=none", *PODMAN_LIMITS, *extra, image, *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture(scope="module")
def images() -> tuple[str, str]:
    assert not missing_tools(), f"missing {missing_tools()}: run make setup"
    return built_images()


def names(text: str) -> list[tuple[str, str]]:
    return sorted((ln.split()[0], ln.split()[1]) for ln in text.splitlines() if ln.strip())


def test_image_installs_exactly_the_checked_in_package_list(images: tuple[str, str]) -> None:
    built = names(image_packages().read_text())
    expected = names(EXPECTED.read_text())
    assert built == expected, (
        f"added: {sorted(set(built) - set(expected))}, "
        f"gone: {sorted(set(expected) - set(built))} (update {EXPECTED} if meant)"
    )
    wanted = {n for n, _ in built}
    assert {"sidecar", "python3-bpfcc", "libbpf1", "python3.11"} <= wanted
    # Nothing to change the image from inside, and no compiler: BCC's LLVM is a library.
    assert not wanted & {"apt", "usrmerge", "perl", "clang-14", "gcc-12", "systemd"}


def test_the_comparison_sees_a_package_too_many() -> None:
    """Guards the test above: an extra line does not compare equal."""
    text = EXPECTED.read_text()
    assert names(text + "curl amd64\n") != names(text)


def test_images_are_one_layer_with_their_command_labels_and_list(
    images: tuple[str, str],
) -> None:
    daemon, collector = images
    listed = image_packages().read_bytes()
    for image, title, cmd in (
        (daemon, "sidecar-daemon", ["run", "--config", "/etc/sidecar/config.yaml"]),
        (collector, "sidecar-collector", ["collector", "--config", "/etc/sidecar/collector.yaml"]),
    ):
        info = inspect(image)
        # One layer, the imported root: no base image underneath.
        assert len(info["RootFS"]["Layers"]) == 1
        config = info["Config"]
        assert config["Entrypoint"] == ["/usr/bin/sidecar"]
        assert config["Cmd"] == cmd
        labels = config["Labels"]
        assert labels["org.opencontainers.image.title"] == title
        assert labels["org.opencontainers.image.version"] == __version__
        assert labels["io.sidecar.packages.sha256"] == hashlib.sha256(listed).hexdigest()
    assert inspect(collector)["Config"]["User"] == "65532:65532"
    # Both roles share the one root: stored once.
    assert inspect(daemon)["RootFS"]["Layers"] == inspect(collector)["RootFS"]["Layers"]
    inside = run(daemon, "/usr/share/sidecar/image-packages.txt", entrypoint="/bin/cat")
    assert inside.stdout.encode() == listed


def test_images_run_the_packaged_command(images: tuple[str, str]) -> None:
    daemon, collector = images
    for image in images:
        result = run(image, "--version")
        assert (result.returncode, result.stdout.strip()) == (0, f"sidecar {__version__}")
    checked = run(collector, "policy", "validate", "/etc/sidecar/policy.yaml")
    assert checked.returncode == 0, checked.stderr
    # Nothing a build step left behind: no apt lists, caches, logs or the .deb.
    leftovers = run(
        daemon,
        "-c",
        "find /var/lib/apt/lists /var/cache/apt /var/log /tmp -mindepth 1 2>/dev/null; true",
        entrypoint="/bin/sh",
    )
    assert leftovers.stdout.strip() == "", leftovers.stdout
    assert Path(image_packages()).is_file()


def test_manifests_run_the_images_make_image_builds() -> None:
    kube = REPO / "deploy" / "kubernetes"
    used = {
        (f.name, line.split("image:", 1)[1].strip())
        for f in kube.glob("*.yaml")
        for line in f.read_text().splitlines()
        if line.strip().startswith("image:")
    }
    assert used == {
        ("daemon-daemonset.yaml", f"localhost/sidecar:{__version__}"),
        ("collector-deployment.yaml", f"localhost/sidecar-collector:{__version__}"),
    }
    build = (REPO / "packaging" / "build-image.sh").read_text()
    assert '"localhost/sidecar:$version"' in build
    assert '"localhost/sidecar-collector:$version"' in build
