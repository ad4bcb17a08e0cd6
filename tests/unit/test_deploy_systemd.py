"""The shipped systemd units, checked by systemd's own tools offline.

``systemd-analyze verify`` insists that ExecStart names an existing
executable, and the Debian package's /usr/bin/sidecar is not installed here,
so each test copies the unit into tmp_path with that one path pointing at a
launcher of this checkout; every other byte is the shipped unit.  The units
as the package installs them are verified in tests/packaging/test_deb.py.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
INSTALLED_BINARY = "/usr/bin/sidecar"  # the Debian package's launcher

DAEMON_CAPABILITIES = {
    "CAP_BPF",
    "CAP_PERFMON",
    "CAP_NET_ADMIN",
    "CAP_SYS_PTRACE",
    "CAP_DAC_READ_SEARCH",
    "CAP_KILL",
}


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    assert found, "systemd-analyze is missing: run scripts/install-ops-deps.sh"
    return found


def settings(unit: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) for every assignment, repeated keys kept in order."""
    section = ""
    result = []
    for raw in unit.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        result.append((section, key.strip(), value.strip()))
    return result


def values(unit: Path, key: str) -> list[str]:
    return [value for _, k, value in settings(unit) if k == key]


def one(unit: Path, key: str) -> str:
    found = values(unit, key)
    assert len(found) == 1, f"{unit.name}: {key} set {len(found)} times"
    return found[0]


def installable_copy(unit_name: str, tmp_path: Path) -> Path:
    """The shipped unit with only the installed binary's path replaced."""
    launcher = tmp_path / "bin" / "sidecar"
    launcher.parent.mkdir()
    launcher.write_text(f'#!/bin/sh\nexec {sys.executable} -m sidecar.cli "$@"\n')
    launcher.chmod(0o755)
    shipped = (UNITS / unit_name).read_text()
    assert shipped.count(INSTALLED_BINARY) == 1
    copy = tmp_path / unit_name
    copy.write_text(shipped.replace(INSTALLED_BINARY, str(launcher)))
    return copy


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [systemd_analyze(), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.parametrize("unit_name", ["sidecar.service", "sidecar-collector.service"])
def test_unit_passes_systemd_analyze_verify_without_warnings(
    unit_name: str, tmp_path: Path
) -> None:
    result = run("verify", "--man=no", str(installable_copy(unit_name, tmp_path)))
    # verify exits 0 on unknown keys but prints them: a typo would pass unnoticed.
    assert (result.returncode, result.stderr, result.stdout) == (0, "", "")


def test_verify_catches_a_misspelt_setting(tmp_path: Path) -> None:
    """Guards the test above: the check we rely on does see a typo."""
    copy = installable_copy("sidecar-collector.service", tmp_path)
    copy.write_text(copy.read_text().replace("ProtectClock=yes", "ProtectClok=yes"))
    result = run("verify", "--man=no", str(copy))
    assert "ProtectClok" in result.stderr


@pytest.mark.parametrize(
    ("unit_name", "threshold"),
    # systemd's own exposure score, 0-100: 50 is "MEDIUM" for a root daemon
    # that must load BPF; the collector has no privilege and scores far lower.
    [("sidecar.service", 50), ("sidecar-collector.service", 20)],
)
def test_unit_exposure_stays_below_threshold(
    unit_name: str, threshold: int, tmp_path: Path
) -> None:
    copy = installable_copy(unit_name, tmp_path)
    result = run("security", "--offline=yes", f"--threshold={threshold}", str(copy))
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr


@pytest.mark.parametrize("unit_name", ["sidecar.service", "sidecar-collector.service"])
def test_unit_is_notify_type_fed_by_watchdog_and_restarted_on_failure(unit_name: str) -> None:
    unit = UNITS / unit_name
    assert one(unit, "Type") == "notify"
    assert one(unit, "NotifyAccess") == "main"
    assert one(unit, "WatchdogSec").endswith("s")
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "NoNewPrivileges") == "yes"
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "ProtectHome") == "yes"
    assert one(unit, "PrivateTmp") == "yes"


def test_daemon_runs_the_daemon_with_only_its_capabilities() -> None:
    unit = UNITS / "sidecar.service"
    assert one(unit, "ExecStart") == (f"{INSTALLED_BINARY} run --config /etc/sidecar/config.yaml")
    assert set(one(unit, "CapabilityBoundingSet").split()) == DAEMON_CAPABILITIES
    assert set(one(unit, "RestrictAddressFamilies").split()) == {
        "AF_UNIX",
        "AF_INET",
        "AF_INET6",
        "AF_NETLINK",
    }
    assert one(unit, "ReadWritePaths") == "/sys/fs/bpf"
    assert one(unit, "RuntimeDirectory") == "sidecar"
    assert one(unit, "StateDirectory") == "sidecar"
    assert one(unit, "ExecReload") == "/bin/kill -HUP $MAINPID"


def test_collector_runs_without_any_capability_as_a_dynamic_user() -> None:
    unit = UNITS / "sidecar-collector.service"
    assert one(unit, "ExecStart") == (
        f"{INSTALLED_BINARY} collector --config /etc/sidecar/collector.yaml"
    )
    assert one(unit, "CapabilityBoundingSet") == ""
    assert one(unit, "AmbientCapabilities") == ""
    assert one(unit, "DynamicUser") == "yes"
    assert one(unit, "StateDirectory") == "sidecar-collector"
    assert "AF_NETLINK" not in one(unit, "RestrictAddressFamilies")
    assert one(unit, "MemoryDenyWriteExecute") == "yes"
