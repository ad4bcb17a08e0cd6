"""CollectorConfig loading: defaults, relative paths, and errors that name file:line: field."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.collector.config import load_config
from sidecar.identity.spiffeid import parse_spiffe_id
from sidecar.util.errors import ConfigError

HEAD = "apiVersion: sidecar/v1\nkind: CollectorConfig\ntrustDomain: example.org\n"


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "collector.yaml"
    p.write_text(text)
    return p


def test_a_minimal_config_gets_defaults_and_resolves_data_dir_next_to_the_file(
    tmp_path: Path,
) -> None:
    cfg = load_config(
        _write(tmp_path, HEAD + "dataDir: data\nsubscribers: [spiffe://example.org/ops/a]\n")
    )
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.db_path == tmp_path / "data" / "events.db"
    assert cfg.listen == "127.0.0.1:7443"
    assert cfg.subscribers == frozenset({parse_spiffe_id("spiffe://example.org/ops/a")})


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ("dataDir: d\nlisten: nowhere\n", ":5: listen: 'nowhere' is not host:port"),
        ("dataDir: d\nsubscribers: [spiffe://other.org/x]\n", ":5: subscribers[0]: "),
        ("dataDir: d\nsubscriberBuffer: 0\n", ":5: subscriberBuffer: must be positive"),
        ("dataDir: d\nbogus: 1\n", ":5: bogus: unknown field"),
        ("", "missing required field 'dataDir'"),
        ("dataDir: d\nstore: mysql://db/x\n", ":5: store: 'mysql://db/x' is neither 'sqlite'"),
        ("dataDir: d\nstore: postgresql://db/x?nosuch=1\n", ":5: store: not a valid libpq URI"),
        ("dataDir: d\nstore: 5\n", ":5: store: must be 'sqlite' or a postgresql:// URI"),
        ("dataDir: d\nstoreConnections: 0\n", ":5: storeConnections: must be positive"),
        ("dataDir: d\nretention: 30\n", ":5: retention: 30 is not a number of days or weeks"),
        ("dataDir: d\nretention: 12h\n", ":5: retention: '12h' is not a number of days"),
        ("dataDir: d\nretention: 0d\n", ":5: retention: must be at least 1d"),
        ("dataDir: d\nretention: -3d\n", ":5: retention: '-3d' is not a number"),
    ],
)
def test_invalid_configs_name_file_line_and_field(tmp_path: Path, extra: str, message: str) -> None:
    path = _write(tmp_path, HEAD + extra)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(str(path))
    assert message in str(info.value)


def test_wrong_kind_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "apiVersion: sidecar/v1\nkind: DaemonConfig\ndataDir: d\n")
    with pytest.raises(ConfigError, match="kind: must be 'CollectorConfig'"):
        load_config(path)


def test_sqlite_is_the_default_store_and_a_postgresql_uri_is_passed_through_whole(
    tmp_path: Path,
) -> None:
    assert load_config(_write(tmp_path, HEAD + "dataDir: d\n")).store_dsn == ""
    assert load_config(_write(tmp_path, HEAD + "dataDir: d\nstore: sqlite\n")).store_dsn == ""
    uri = (
        "postgresql://sidecar@db.example.org:5432/sidecar"
        "?sslmode=verify-full&sslrootcert=/etc/sidecar/db-ca.pem&target_session_attrs=read-write"
    )
    cfg = load_config(_write(tmp_path, HEAD + f"dataDir: d\nstore: '{uri}'\nstoreConnections: 8\n"))
    assert cfg.store_dsn == uri
    assert cfg.store_connections == 8


def test_a_password_in_the_store_uri_never_reaches_an_error_message(tmp_path: Path) -> None:
    from sidecar.collector.config import redact_dsn

    assert redact_dsn("postgresql://u:s3cret@h/db") == "postgresql://u:***@h/db"
    assert redact_dsn("postgresql://u@h/db?sslmode=require&password=s3cret") == (
        "postgresql://u@h/db?sslmode=require&password=***"
    )
    assert redact_dsn("postgresql://h/db?password=s3cret") == "postgresql://h/db?password=***"
    path = _write(tmp_path, HEAD + "dataDir: d\nstore: 'postgres://u:s3cret@h/db?bad=1'\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "s3cret" not in str(info.value)


@pytest.mark.parametrize(("text", "days"), [("30d", 30), ("1d", 1), ("4w", 28)])
def test_retention_is_a_whole_number_of_days(tmp_path: Path, text: str, days: int) -> None:
    cfg = load_config(_write(tmp_path, HEAD + f"dataDir: d\nretention: {text}\n"))
    assert cfg.retention_days == days


def test_without_retention_everything_is_kept(tmp_path: Path) -> None:
    assert load_config(_write(tmp_path, HEAD + "dataDir: d\n")).retention_days is None
