"""Arguments every offline tool of the ``sidecar`` command shares."""

from __future__ import annotations

import argparse


def add_offline_flags(parser: argparse.ArgumentParser) -> None:
    """Mark an offline tool (one that reads files and talks to nothing): it logs
    nothing below WARNING unless ``-v`` is given, before or after its name."""
    parser.add_argument(
        "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress"
    )
    parser.set_defaults(offline=True)
