"""The daemon's collector setting names one replica or several, and status says which."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.daemon import config
from sidecar.daemon.status import render_status
from sidecar.export.exporter import Exporter, ExporterConfig, HostIdentity
from sidecar.util.errors import ConfigError

HEAD = "apiVersion: sidecar/v1\nkind: DaemonConfig\n"


def _load(tmp_path: Path, collector: str) -> config.DaemonConfig:
    path = tmp_path / "d.yaml"
    path.write_text(HEAD + "collector:\n" + collector)
    return config.load(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  address: a.example:4433\n", ("a.example:4433",)),
        ("  address: 'a:4433, b:4433,c:4433'\n", ("a:4433", "b:4433", "c:4433")),
        ("  address:\n    - a:4433\n    - '[::1]:4433'\n", ("a:4433", "[::1]:4433")),
        ("  address: ''\n", ()),
        ("  spoolDir: /var/tmp/s\n", ()),
    ],
)
def test_the_collector_address_takes_one_a_comma_list_or_a_yaml_list(
    tmp_path: Path, text: str, expected: tuple[str, ...]
) -> None:
    assert _load(tmp_path, text).collector == expected


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("  address:\n    - a:4433\n    - b\n", ":6: collector.address[1]: must be HOST:PORT"),
        ("  address:\n    - a:4433\n    - 7\n", ":6: collector.address[1]: must be HOST:PORT"),
        ("  address: 'a:4433,b:99999'\n", ":4: collector.address: must be HOST:PORT with a port"),
        ("  address: 'a:4433,,b:1'\n", ":4: collector.address: an empty address"),
        ("  address: [a:1, a:1]\n", ":4: collector.address[1]: a:1 is listed twice"),
        ("  address: []\n", ":4: collector.address: must list at least one"),
        ("  address: {a: 1}\n", ":4: collector.address: must be HOST:PORT, a list"),
    ],
)
def test_a_bad_collector_address_names_file_line_and_entry(
    tmp_path: Path, text: str, where: str
) -> None:
    with pytest.raises(ConfigError) as err:
        _load(tmp_path, text)
    assert f"d.yaml{where}" in str(err.value)


def test_the_exporter_tries_each_address_in_turn_and_says_which(tmp_path: Path) -> None:
    def no_identity() -> HostIdentity:
        raise AssertionError("not needed")

    exp = Exporter(
        ExporterConfig(target=("a:1", "b:2", "c:3"), spool_dir=tmp_path / "s"), no_identity
    )
    seen = [exp.address]
    for _ in range(3):
        exp._next_address()
        seen.append(exp.address)
    assert seen == ["a:1", "b:2", "c:3", "a:1"]
    assert exp.failovers == 3
    single = Exporter(ExporterConfig(target="a:1", spool_dir=tmp_path / "t"), no_identity)
    single._next_address()
    assert (single.address, single.failovers) == ("a:1", 0)
    with pytest.raises(ValueError, match="at least one"):
        ExporterConfig(target=(), spool_dir=tmp_path)


def test_status_names_the_replica_streamed_to() -> None:
    answer = {
        "host": "h",
        "uptime_seconds": 1.0,
        "scope": "/",
        "pin_dir": "/sys/fs/bpf/x",
        "programs": {
            "tracepoints": [],
            "cgroup_hooks": [],
            "unix_sockets": "judged",
            "attach_seconds": 0.1,
        },
        "processes_in_scope": 0,
        "identities": {},
        "policy": {"version": None, "file": None, "last_error": None},
        "events": {},
        "losses": {"kernel": {}, "decode_errors": 0},
        "collector": {
            "state": "connected",
            "address": "b:4433",
            "addresses": ["a:4433", "b:4433"],
            "spool_depth": 0,
        },
    }
    assert "collector     connected b:4433 (of 2 replicas)" in render_status(answer)
