"""The throwaway-PostgreSQL harness says what to run when the server programs are missing."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.testing import postgres


def test_missing_postgresql_binaries_fail_naming_make_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(postgres, "DEBIAN_ROOT", tmp_path / "nothing-here")
    monkeypatch.delenv("SIDECAR_PG_BIN", raising=False)
    with pytest.raises(postgres.PostgresUnavailable, match="run `make setup`"):
        postgres.find_bin_dir()
    with pytest.raises(postgres.PostgresUnavailable), postgres.cluster(tmp_path):
        pass
    assert list(tmp_path.iterdir()) == []  # nothing left behind


def test_the_newest_installed_version_is_chosen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for version in ("9", "15", "13"):
        bindir = tmp_path / version / "bin"
        bindir.mkdir(parents=True)
        for prog in ("initdb", "pg_ctl"):
            (bindir / prog).write_text("")
    monkeypatch.setattr(postgres, "DEBIAN_ROOT", tmp_path)
    monkeypatch.delenv("SIDECAR_PG_BIN", raising=False)
    assert postgres.find_bin_dir() == tmp_path / "15" / "bin"
