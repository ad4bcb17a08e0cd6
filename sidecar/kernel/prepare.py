"""The prepare step: compile, load, attach and pin the programs, then exit.

BCC keeps LLVM in the process that compiles, well over 100 MiB that a daemon
would carry for its whole life.  So the daemon runs this module as a child
(``python -m sidecar.kernel.prepare``): it compiles with BCC, loads the
programs, creates or re-opens the pinned maps, attaches every program
through a pinned link, and exits.  The links keep the programs attached; the
daemon opens the pinned maps (``sidecar.kernel.maps``) and never imports BCC.

Options come as JSON on stdin; the attach report goes as JSON to stdout; an
error goes to stderr with exit status 1.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from sidecar.kernel.loader import AttachReport, KernelPrograms, LoadOptions
from sidecar.util.errors import KernelError

_logger = logging.getLogger(__name__)
_PATHS = ("pin_dir", "scope", "tracefs", "hook_root")


@dataclasses.dataclass
class Prepared:
    """What the prepare step did, for the daemon's log and status."""

    report: AttachReport
    unix_problem: str | None


def _options_to_json(options: LoadOptions) -> str:
    raw = dataclasses.asdict(options)
    for key in _PATHS:
        if raw[key] is not None:
            raw[key] = str(raw[key])
    return json.dumps(raw)


def _options_from_json(text: str) -> LoadOptions:
    raw: dict[str, Any] = json.loads(text)
    for key in _PATHS:
        if raw.get(key) is not None:
            raw[key] = Path(raw[key])
    return LoadOptions(**raw)


def prepare_here(options: LoadOptions) -> Prepared:
    """Do the step in this process (the child's body; tests call it too)."""
    programs = KernelPrograms(options)
    try:
        programs.load()
        report = programs.attach()
        return Prepared(report, programs.unix_problem)
    finally:
        programs.close(detach=False)  # the pinned links keep the programs attached


def prepare(options: LoadOptions, timeout: float = 120.0) -> Prepared:
    """Run the step in a child process, so that the compiler leaves with it."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "sidecar.kernel.prepare"],
            input=_options_to_json(options),
            capture_output=True,
            text=True,
            env=env,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired as exc:
        raise KernelError(f"loading the BPF programs took longer than {timeout:.0f} s") from exc
    if out.returncode != 0:
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        raise KernelError(lines[-1] if lines else f"prepare step exited {out.returncode}")
    for line in out.stderr.splitlines():  # its warnings belong in the daemon's log
        if line.strip():
            _logger.warning("%s", line.strip())
    raw = json.loads(out.stdout)
    return Prepared(AttachReport(**raw["report"]), raw["unix_problem"])


def main() -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        done = prepare_here(_options_from_json(sys.stdin.read()))
    except KernelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    json.dump(
        {"report": dataclasses.asdict(done.report), "unix_problem": done.unix_problem},
        sys.stdout,
    )
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Everything is pinned and said: skip tearing down the interpreter and
    # the compiler (40 ms the daemon would wait for).
    os._exit(code)
