"""The Debian package (`make deb`), installed with apt into a clean Debian 12 root.

The root is made by mmdebstrap (apt and systemd, as on a new host); the
package goes in with ``apt-get install ./sidecar_<version>_<arch>.deb``, so
apt has to find every dependency from the package's own Depends.  Then the
installed command runs in that root, the units are checked by that root's
systemd (``systemd-analyze verify``), and each program a unit starts must be
a file the package (or a dependency) put there.
"""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from sidecar import __version__
from sidecar.testing.packaging import (
    built_deb,
    install_into_clean_root,
    missing_tools,
    unit_executables,
)

UNITS = ("sidecar.service", "sidecar-collector.service")
CONFFILES = {
    "/etc/sidecar/config.yaml",
    "/etc/sidecar/policy.yaml",
    "/etc/sidecar/entries.yaml",
    "/etc/sidecar/collector.yaml",
}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mmdebstrap and chroot need root")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    assert not missing_tools(), f"missing {missing_tools()}: run make setup"
    where = tmp_path_factory.mktemp("deb") / "root"
    install_into_clean_root(built_deb(), where)
    yield where


def in_root(root: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["chroot", str(root), *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    )


def verify(root: Path, *units: str) -> subprocess.CompletedProcess[str]:
    """The root's own systemd-analyze (Debian 12's systemd) on units inside it."""
    return in_root(root, "systemd-analyze", "verify", "--man=no", *units)


def test_deb_is_named_and_labelled_for_its_version_and_architecture() -> None:
    deb = built_deb()
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert deb.name == f"sidecar_{__version__}_{arch}.deb"
    fields = {
        f: subprocess.run(
            ["dpkg-deb", "-f", str(deb), f], capture_output=True, text=True, check=True
        ).stdout.strip()
        for f in ("Package", "Version", "Architecture", "Depends")
    }
    assert (fields["Package"], fields["Version"], fields["Architecture"]) == (
        "sidecar",
        __version__,
        arch,
    )
    # Built for one Python minor version: the C extension and the binary wheels.
    assert "python3 (>= 3.11)" in fields["Depends"]
    assert "python3 (<< 3.12)" in fields["Depends"]
    assert "python3-bpfcc" in fields["Depends"]


def test_installed_command_runs_with_its_bundled_libraries_and_debians_bcc(root: Path) -> None:
    version = in_root(root, "sidecar", "--version")
    assert (version.returncode, version.stdout.strip()) == (0, f"sidecar {__version__}")
    # The launcher's interpreter sees both the private tree and python3-bpfcc.
    probe = in_root(
        root,
        "/usr/bin/python3",
        "-c",
        "import sys; sys.path.insert(0, '/usr/lib/sidecar/python');"
        "import bcc, grpc, google.protobuf, sidecar;"
        "import sidecar.kernel._ringbatch, sidecar.kernel._records, sidecar.events._jsonline;"
        "print(sidecar.__file__, grpc.__version__, google.protobuf.__version__)",
    )
    assert probe.returncode == 0, probe.stderr
    path, grpc_version, protobuf_version = probe.stdout.split()
    assert path == "/usr/lib/sidecar/python/sidecar/__init__.py"
    assert tuple(map(int, grpc_version.split(".")[:2])) >= (1, 60)
    assert int(protobuf_version.split(".")[0]) >= 4


@pytest.mark.parametrize(
    ("what", "file"),
    [
        ("policy", "/etc/sidecar/policy.yaml"),
        ("entries", "/etc/sidecar/entries.yaml"),
        ("config", "/etc/sidecar/config.yaml"),
    ],
)
def test_shipped_examples_validate_inside_the_root(root: Path, what: str, file: str) -> None:
    result = in_root(root, "sidecar", what, "validate", file)
    assert result.returncode == 0, result.stdout + result.stderr


def test_validate_in_the_root_refuses_a_broken_file(root: Path) -> None:
    """Guards the test above: the installed validator does refuse, naming file and line."""
    bad = root / "tmp" / "bad-policy.yaml"
    bad.write_text("apiVersion: sidecar/v1\nkind: Policy\nidentities:\n  - id: 42\n")
    result = in_root(root, "sidecar", "policy", "validate", "/tmp/bad-policy.yaml")
    assert result.returncode != 0
    assert "/tmp/bad-policy.yaml:4" in result.stderr + result.stdout


def test_files_are_where_the_units_and_the_daemon_look(root: Path) -> None:
    for unit in UNITS:
        text = (root / "lib/systemd/system" / unit).read_text()
        programs = unit_executables(text)
        assert programs, unit
        for program in programs:
            target = root / program.lstrip("/")
            assert target.is_file(), f"{unit} starts {program}, missing in the root"
            assert os.access(target, os.X_OK), f"{unit}: {program} is not executable"
    # The daemon finds the BPF sources and the prebuilt unix-socket object here
    # (sidecar.kernel.loader.bpf_source_dir), so no clang is needed on the host.
    bpf = root / "usr/share/sidecar/bpf"
    assert (bpf / "include" / "events.h").is_file()
    obj = (bpf / "unix.bpf.o").read_bytes()
    assert obj[:4] == b"\x7fELF" and int.from_bytes(obj[18:20], "little") == 247  # EM_BPF
    state = (root / "var/lib/sidecar").stat()
    assert stat.S_IMODE(state.st_mode) == 0o700 and state.st_uid == 0
    conffiles = in_root(root, "dpkg-query", "-W", "-f", "${Conffiles}", "sidecar").stdout
    assert {line.split()[0] for line in conffiles.strip().splitlines()} == CONFFILES
    # Nothing enabled or started by the installation.
    wants = root / "etc/systemd/system/multi-user.target.wants"
    assert not any(wants.glob("sidecar*")), "the package must not enable its units"


def test_units_pass_systemd_analyze_verify_in_the_root(root: Path) -> None:
    result = verify(root, *(f"/lib/systemd/system/{u}" for u in UNITS))
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_verify_in_the_root_fails_for_a_unit_starting_a_missing_program(root: Path) -> None:
    """Negative control: the checks above would see an ExecStart the package does not install."""
    shipped = (root / "lib/systemd/system/sidecar.service").read_text()
    broken = shipped.replace("ExecStart=/usr/bin/sidecar ", "ExecStart=/usr/bin/sidecar-gone ")
    assert broken != shipped
    unit = root / "etc/systemd/system/sidecar-broken.service"
    unit.write_text(broken)
    try:
        result = verify(root, "/etc/systemd/system/sidecar-broken.service")
        assert result.returncode != 0
        assert "/usr/bin/sidecar-gone" in result.stderr
        missing = [p for p in unit_executables(broken) if not (root / p.lstrip("/")).is_file()]
        assert missing == ["/usr/bin/sidecar-gone"]
    finally:
        unit.unlink()


def test_remove_takes_the_code_away_and_keeps_the_configuration(root: Path) -> None:
    # Last in this module: it uninstalls the package from the shared root.
    result = in_root(root, "dpkg", "--remove", "sidecar")
    assert result.returncode == 0, result.stderr
    assert not (root / "usr/bin/sidecar").exists()
    assert not (root / "usr/lib/sidecar").exists()
    assert not (root / "lib/systemd/system/sidecar.service").exists()
    assert (root / "etc/sidecar/policy.yaml").is_file()  # conffiles stay until purge
