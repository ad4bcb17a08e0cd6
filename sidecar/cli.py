"""The ``sidecar`` command: parses arguments, wires objects, sets up logging.

Any ``SidecarError`` becomes one line on stderr and exit code 2; a Python
traceback reaching the user is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sidecar import __version__
from sidecar.errors import SidecarError

_logger = logging.getLogger("sidecar")

Handler = Callable[[argparse.Namespace], int]


def _cmd_run(args: argparse.Namespace) -> int:
    from sidecar import config
    from sidecar.daemon import Daemon, JsonLinesSink

    cfg = config.load(
        args.config,
        cgroup=args.cgroup,
        output=args.output,
        policy=args.policy,
        entries=args.entries,
    )
    sink = JsonLinesSink(cfg.output)
    metrics = None
    if cfg.metrics:
        from sidecar.metrics import DaemonMetrics

        metrics = DaemonMetrics()
    try:
        asyncio.run(Daemon(cfg, sink, metrics).run())
    finally:
        sink.close()
    return 0


def _cmd_uninstall(args: argparse.Namespace) -> int:
    from sidecar import config
    from sidecar.kernel.loader import uninstall

    cfg = config.load(args.config)
    pin_dir = args.pin_dir or cfg.pin_dir
    removed = uninstall(pin_dir)
    print(f"removed {len(removed)} pinned objects under {pin_dir}; programs detached")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.demo import run_demo

    return run_demo(seconds=args.seconds)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sidecar",
        description="Runtime identity and least agency for AI agents, enforced in the kernel.",
    )
    parser.add_argument("--version", action="version", version=f"sidecar {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the host daemon in the foreground")
    run.add_argument("--config", type=Path, help="DaemonConfig YAML (default: embedded)")
    run.add_argument("--cgroup", type=Path, help="scope cgroup directory (overrides the config)")
    run.add_argument("--output", help="event sink: '-' for stdout or a file (overrides the config)")
    run.add_argument("--policy", type=Path, help="policy YAML (overrides the config)")
    run.add_argument(
        "--entries", type=Path, help="registration entries YAML (overrides the config)"
    )
    run.set_defaults(handler=_cmd_run)

    uninstall = sub.add_parser("uninstall", help="detach every program and remove the pinned state")
    uninstall.add_argument("--config", type=Path, help="DaemonConfig YAML naming the pin dir")
    uninstall.add_argument("--pin-dir", type=Path, help="pin directory (overrides the config)")
    uninstall.set_defaults(handler=_cmd_uninstall)

    demo = sub.add_parser("demo", help="run the product on its embedded default and show events")
    demo.add_argument(
        "--seconds", type=float, default=0, help="stop after this long (0: when done)"
    )
    demo.set_defaults(handler=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler = args.handler
    try:
        return handler(args)
    except SidecarError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
