"""The Vagrantfile, checked by ``vagrant validate`` without booting anything.

``vagrant validate`` needs a usable provider to check provider blocks. The
libvirt provider (Debian's vagrant-libvirt) is usable without a running
libvirtd, so it validates the libvirt block for real; ``--ignore-provider``
validates everything else independently of any provider.  Vagrant's state,
home and update check are kept out of the repository and off the network.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
VAGRANTFILE = REPO / "vagrant" / "Vagrantfile"


def vagrant_validate(
    folder: Path, tmp_path: Path, *args: str, provider: str | None = "libvirt"
) -> subprocess.CompletedProcess[str]:
    vagrant = shutil.which("vagrant")
    assert vagrant, "vagrant is missing: run scripts/install-ops-deps.sh"
    env = {
        **os.environ,
        "VAGRANT_CWD": str(folder),
        "VAGRANT_DOTFILE_PATH": str(tmp_path / "dotfile"),
        "VAGRANT_HOME": str(tmp_path / "home"),
        "VAGRANT_CHECKPOINT_DISABLE": "1",
    }
    env.pop("VAGRANT_DEFAULT_PROVIDER", None)
    if provider is not None:
        env["VAGRANT_DEFAULT_PROVIDER"] = provider
    return subprocess.run(
        [vagrant, "validate", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def edited_copy(tmp_path: Path, old: str, new: str) -> Path:
    """The Vagrantfile with one edit, in a folder beside which the synced repo exists."""
    text = VAGRANTFILE.read_text()
    assert old in text
    folder = tmp_path / "repo" / "vagrant"
    folder.mkdir(parents=True)
    (folder / "Vagrantfile").write_text(text.replace(old, new))
    return folder


def heredoc(name: str) -> str:
    match = re.search(rf"^{name} = <<~SHELL\n(.*?)^SHELL$", VAGRANTFILE.read_text(), re.M | re.S)
    assert match, f"no {name} script in the Vagrantfile"
    return match.group(1)


def test_vagrantfile_validates_with_the_libvirt_provider(tmp_path: Path) -> None:
    result = vagrant_validate(VAGRANTFILE.parent, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "validated successfully" in result.stdout


def test_vagrantfile_validates_without_provider_config(tmp_path: Path) -> None:
    result = vagrant_validate(VAGRANTFILE.parent, tmp_path, "--ignore-provider", provider=None)
    assert result.returncode == 0, result.stdout + result.stderr


def test_validation_leaves_no_state_in_the_repository(tmp_path: Path) -> None:
    vagrant_validate(VAGRANTFILE.parent, tmp_path)
    assert not (VAGRANTFILE.parent / ".vagrant").exists()
    assert (tmp_path / "home").is_dir()


@pytest.mark.parametrize(
    ("old", "new", "complaint"),
    [
        ('config.vm.hostname = "', 'config.vm.hostnam = "', "hostnam"),
        ("lv.memory = MEMORY", "lv.memroy = MEMORY", "memroy"),
    ],
)
def test_validation_rejects_a_misspelt_setting(
    tmp_path: Path, old: str, new: str, complaint: str
) -> None:
    """Guards the tests above: both the VM and the provider block are checked."""
    result = vagrant_validate(edited_copy(tmp_path, old, new), tmp_path)
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr


def test_vm_installs_headers_of_its_running_kernel() -> None:
    assert '"linux-headers-$(uname -r)"' in heredoc("PREPARE")


def test_vm_runs_the_test_suite_with_kernel_tests_required_then_the_demo() -> None:
    text = VAGRANTFILE.read_text()
    assert "SIDECAR_REQUIRE_KERNEL=1 make test" in heredoc("TEST")
    assert "make demo" in heredoc("DEMO")
    order = [text.index(f'config.vm.provision "{name}"') for name in ("prepare", "test", "demo")]
    assert order == sorted(order)


@pytest.mark.parametrize("name", ["PREPARE", "TEST", "DEMO"])
def test_provisioning_scripts_are_valid_bash(name: str) -> None:
    result = subprocess.run(
        ["bash", "-n"], input=heredoc(name), capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
