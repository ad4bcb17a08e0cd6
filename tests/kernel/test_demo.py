"""`make demo` runs the whole story to completion: the front door must never rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_tells_the_story_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "demo"],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout + out.stderr
    assert out.returncode == 0, text
    assert "fetched its X.509-SVID: spiffe://example.org/agent/research-bot" in text
    assert "(on its allowlist): connected" in text
    assert "refused by the kernel (EPERM)" in text
    assert "killed before it ran" in text
    assert "NOT EXPECTED" not in text
    # The collector's live stream shows the attributed decisions.
    assert " connect spiffe://example.org/agent/research-bot " in text and " deny " in text
    assert " exec spiffe://example.org/agent/research-bot " in text
    assert "credential_revoked" in text
    assert "blast radius of policy" in text
    assert "collector     connected" in text
