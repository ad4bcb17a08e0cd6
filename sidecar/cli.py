"""The ``sidecar`` command: parses arguments, wires objects, sets up logging.

Any ``SidecarError`` becomes one line on stderr and exit code 2; a Python
traceback reaching the user is a bug.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from sidecar import __version__
from sidecar.util.errors import SidecarError

_logger = logging.getLogger("sidecar")

Handler = Callable[[argparse.Namespace], int]


def _cmd_run(args: argparse.Namespace) -> int:
    from sidecar.daemon import config
    from sidecar.daemon.core import Daemon, EventSink, JsonLinesSink, NullSink

    cfg = config.load(
        args.config,
        cgroup=args.cgroup,
        output=args.output,
        policy=args.policy,
        entries=args.entries,
    )
    sink: EventSink = JsonLinesSink(cfg.output) if cfg.output else NullSink()
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
    from sidecar.daemon import config
    from sidecar.kernel.loader import uninstall

    cfg = config.load(args.config)
    pin_dir = args.pin_dir or cfg.pin_dir
    removed = uninstall(pin_dir)
    if removed:
        print(f"removed {len(removed)} pinned objects under {pin_dir}; programs detached")
    else:
        print(f"nothing was pinned under {pin_dir}: no program of ours is attached there")
    return 0


def _admin_socket(args: argparse.Namespace) -> Path:
    from sidecar.daemon import config

    cfg = config.load(args.config)
    if args.socket is not None:
        return Path(args.socket)
    if cfg.admin_socket is None:
        raise SidecarError(f"{cfg.source}: adminSocket is off; the daemon cannot be asked")
    return cfg.admin_socket


def _cmd_status(args: argparse.Namespace) -> int:
    from sidecar.daemon.admin import request
    from sidecar.daemon.status import render_status

    answer = request(_admin_socket(args), "status")
    print(json.dumps(answer, indent=2) if args.json else render_status(answer))
    return 0


def _cmd_identities(args: argparse.Namespace) -> int:
    from sidecar.daemon.admin import request
    from sidecar.daemon.status import render_identities

    answer = request(_admin_socket(args), "identities")
    print(json.dumps(answer, indent=2) if args.json else render_identities(answer))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from sidecar.testing.demo import run_demo

    return run_demo()


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

    for name, fn, text in (
        ("status", _cmd_status, "the running daemon's state in one screen"),
        ("identities", _cmd_identities, "live attested instances, their selectors and SVIDs"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", type=Path, help="DaemonConfig YAML naming the admin socket")
        p.add_argument("--socket", help="admin socket (overrides the config)")
        p.add_argument("--json", action="store_true", help="print JSON")
        p.set_defaults(handler=fn)

    from sidecar.collector.cli import register_cli as register_collector
    from sidecar.policy.cli import register_cli as register_policy

    register_policy(sub)
    register_collector(sub)

    demo = sub.add_parser("demo", help="run the product on its embedded default and show events")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _log_level(args: argparse.Namespace) -> int:
    """INFO for the daemon and the commands that talk to one; offline tools
    (which call :func:`add_offline_flags`) only warn, unless ``-v``."""
    if args.verbose:
        return logging.DEBUG
    return logging.WARNING if getattr(args, "offline", False) else logging.INFO


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=_log_level(args),
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
