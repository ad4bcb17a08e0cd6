"""The example configurations in examples/ load with the product's own loaders."""

from __future__ import annotations

from pathlib import Path

from sidecar.collector.config import load_config
from sidecar.daemon import config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_the_daemon_example_loads_and_matches_the_defaults_it_documents() -> None:
    cfg = config.load(EXAMPLES / "daemon.yaml")
    d = config.defaults()
    assert (cfg.pin_dir, cfg.procs_max, cfg.ringbuf_pages) == (
        d.pin_dir,
        d.procs_max,
        d.ringbuf_pages,
    )
    assert cfg.detach_on_exit is False
    assert cfg.entries == Path("/etc/sidecar/entries.yaml")
    assert cfg.policy == Path("/etc/sidecar/policy.yaml")
    assert cfg.svid_ttl == 600
    assert cfg.collector == ()


def test_the_collector_example_loads() -> None:
    cfg = load_config(EXAMPLES / "collector.yaml")
    assert cfg.trust_domain == "example.org"
    assert [str(s) for s in cfg.subscribers] == ["spiffe://example.org/ops/security-team"]
