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
