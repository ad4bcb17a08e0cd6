"""The ``sidecar`` command: parses arguments, wires objects, sets up logging.

Exit codes: 0 success; 1 "differs" (``policy diff``); 2 any ``SidecarError``,
as one line on stderr (a Python traceback reaching the user is a bug); 3 no
daemon running (``status``, ``identities``: the LSB ``status`` code for "not
running"); 141 stdout was a pipe that closed (128 + SIGPIPE, what a shell
reports for a command the closed pipe killed, so ``set -o pipefail`` sees
it as other commands do); 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sidecar import __version__
from sidecar.util.cliargs import add_offline_flags
from sidecar.util.errors import DaemonNotRunning, SidecarError

_logger = logging.getLogger("sidecar")

Handler = Callable[[argparse.Namespace], int]

EXIT_OK = 0
EXIT_ERROR = 2
EXIT_NO_DAEMON = 3
EXIT_BROKEN_PIPE = 141


def _cmd_run(args: argparse.Namespace) -> int:
    from sidecar.daemon import config
    from sidecar.daemon.core import Daemon
    from sidecar.daemon.outputs import EventSink, JsonLinesSink, NullSink

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


def _ask_daemon(args: argparse.Namespace, cmd: str, render: Callable[[Any], str]) -> int:
    """Ask the daemon; no daemon is exit 3 (as an LSB ``status`` says "not running").

    Under ``--json`` a failure is also a JSON object on stdout, ``{"error": ...,
    "code": "no_daemon"}`` or ``"code": "error"``, so that a script reading
    stdout always gets JSON.
    """
    from sidecar.daemon.admin import request

    try:
        answer = request(_admin_socket(args), cmd)
    except SidecarError as exc:
        no_daemon = isinstance(exc, DaemonNotRunning)
        if args.json:
            print(json.dumps({"error": str(exc), "code": "no_daemon" if no_daemon else "error"}))
        if not no_daemon:
            raise
        print(f"sidecar: {exc}", file=sys.stderr)
        return EXIT_NO_DAEMON
    print(json.dumps(answer, indent=2) if args.json else render(answer))
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from sidecar.daemon.status import render_status

    return _ask_daemon(args, "status", render_status)


def _cmd_identities(args: argparse.Namespace) -> int:
    from sidecar.daemon.status import render_identities

    return _ask_daemon(args, "identities", render_identities)


def _cmd_entries_validate(args: argparse.Namespace) -> int:
    from sidecar.attest import load_entries

    entries = load_entries(args.file)
    print(
        f"{entries.source}: OK: {len(entries)} registration entries "
        f"for trust domain {entries.trust_domain}"
    )
    return EXIT_OK


def _cmd_config_validate(args: argparse.Namespace) -> int:
    from sidecar.daemon import config

    cfg, warnings = config.check_file(args.file)
    for warning in warnings:
        print(f"{cfg.source}: warning: {warning}", file=sys.stderr)
    print(f"{cfg.source}: OK: DaemonConfig for host {cfg.host}")
    return EXIT_OK


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

    for name, fn, text in (
        ("entries", _cmd_entries_validate, "registration entries"),
        ("config", _cmd_config_validate, "the daemon's configuration (DaemonConfig)"),
    ):
        group = sub.add_parser(name, help=f"check {text}")
        group_sub = group.add_subparsers(dest=f"{name}_command", metavar="COMMAND", required=True)
        p = group_sub.add_parser("validate", help=f"check a file of {text}")
        p.add_argument("file", metavar="FILE", help="YAML file ('-': standard input)")
        add_offline_flags(p)
        p.set_defaults(handler=fn)

    demo = sub.add_parser("demo", help="run the product on its embedded default and show events")
    demo.set_defaults(handler=_cmd_demo)
    return parser


def _log_level(args: argparse.Namespace) -> int:
    """INFO for the daemon and the commands that talk to one; offline tools
    (which call ``add_offline_flags``) only warn, unless ``-v``."""
    if args.verbose:
        return logging.DEBUG
    return logging.WARNING if getattr(args, "offline", False) else logging.INFO


def _discard_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush of what
    is still buffered cannot fail again on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is no file (a test's capture)
        pass
    finally:
        os.close(devnull)


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
        code = handler(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except BrokenPipeError:
        # The reader went away (`sidecar status --json | head -c 10`): end
        # quietly, with the status a shell shows for a command SIGPIPE killed.
        _discard_stdout()
        return EXIT_BROKEN_PIPE
    except SidecarError as exc:
        print(f"sidecar: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
