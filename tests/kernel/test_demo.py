"""`make demo` runs the whole story to completion: the front door must never rot."""

from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_tells_the_story_end_to_end() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "demo"],
        env={**os.environ, "PYTHONPATH": str(REPO), "SIDECAR_DEMO_KEEP": "1"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    text = out.stdout + out.stderr
    kept = re.search(r"demo files kept in (\S+)", text)
    assert kept is not None, text
    work = Path(kept.group(1))
    try:
        db = sqlite3.connect(work / "collector" / "events.db")
        stored = dict(db.execute("SELECT kind, COUNT(*) FROM events GROUP BY kind").fetchall())
        db.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    # Every event from start-up on reached the collector: the first policy_loaded too.
    assert stored.get("policy_loaded") == 1, stored
    assert stored.get("exec", 0) >= 2 and stored.get("connect", 0) >= 1, stored
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
