"""``sidecar policy ...``: validate, diff, suggest and blast-radius.

Each command returns its exit code: 0 success, 2 for any product error
(one line on stderr naming file, line and field).  ``diff`` follows diff(1)
and returns 1 when the policies differ in what they allow, so scripts and
CI can gate on it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Any

from sidecar.policy.blast import blast_radius
from sidecar.policy.diff import diff
from sidecar.policy.history import read_history, unrecognised
from sidecar.policy.load import load_policy, parse_policy_file
from sidecar.policy.suggest import suggest, suggest_into
from sidecar.util.cliargs import add_offline_flags
from sidecar.util.errors import ConfigError, SidecarError
from sidecar.util.inputs import check_one_stdin, read_bytes, source_name

EXIT_OK = 0
EXIT_DIFFERENT = 1
EXIT_ERROR = 2

MAX_SPAWN_GRAPH_BYTES = 4 * 1024 * 1024

Handler = Callable[[argparse.Namespace], int]


def _guarded(handler: Handler) -> Handler:
    """Turn a product error into one line on stderr and exit code 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except SidecarError as exc:
            print(f"sidecar: error: {exc}", file=sys.stderr)
            return EXIT_ERROR

    run.__name__ = handler.__name__
    run.__doc__ = handler.__doc__
    return run


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=False))


@_guarded
def cmd_validate(args: argparse.Namespace) -> int:
    """Validate and compile a policy; print its version, and warn of weak executables."""
    policy = load_policy(args.file)
    for warning in exec_warnings(policy):
        print(f"{source_name(args.file)}: warning: {warning}", file=sys.stderr)
    print(policy.version)
    return EXIT_OK


def exec_warnings(policy: Any) -> list[str]:
    """Allowed executables that someone other than root could change or replace.

    The kernel stops trusting an allowed file the moment it changes (its
    change time moves), so such a file is no way around the policy: it is
    a way to stop the agent's own tools from running.  Either way the
    operator should know.
    """
    out: list[str] = []
    for sid, ident in sorted(policy.identities.items()):
        for path in sorted(ident.exec_paths or ()):
            try:
                st = os.stat(path)
            except OSError as exc:
                out.append(f"{sid}: {path} cannot be read ({exc.strerror}): it will not run")
                continue
            if st.st_uid != 0 or st.st_mode & 0o022:
                owner = f"owned by uid {st.st_uid}" if st.st_uid != 0 else "writable by others"
                out.append(f"{sid}: {path} is {owner}: only root should be able to change it")
            parent = os.stat(os.path.dirname(path) or "/")
            if parent.st_uid != 0 or (parent.st_mode & 0o022 and not parent.st_mode & 0o1000):
                out.append(
                    f"{sid}: {path} is in a directory others can write: a file renamed over it "
                    "is refused, and stops the allowed one from running"
                )
    return out


@_guarded
def cmd_diff(args: argparse.Namespace) -> int:
    """What the new policy grants and takes away, per identity."""
    check_one_stdin(args.old, args.new)
    result = diff(load_policy(args.old), load_policy(args.new))
    if args.json:
        _print_json(result.to_json())
    else:
        sys.stdout.write(result.render_text())
    return EXIT_OK if result.empty else EXIT_DIFFERENT


@_guarded
def cmd_suggest(args: argparse.Namespace) -> int:
    """A policy learnt from audit-mode history, on its own or merged into one."""
    check_one_stdin(args.history, args.into)
    source = source_name(args.history)
    events = read_history(args.history)
    _warn_unrecognised(source, events)
    options: dict[str, Any] = {
        "merge_cidrs": args.merge_cidrs,
        "merge_ports": args.merge_ports,
        "include_denied": args.include_denied,
        "source": source,
    }
    if args.into:
        text = suggest_into(parse_policy_file(args.into), events, **options)
    else:
        text = suggest(events, **options)
    sys.stdout.write(text)
    return EXIT_OK


def _warn_unrecognised(source: str, events: list[dict[str, Any]]) -> None:
    count, first = unrecognised(events)
    if count:
        print(
            f"{source}:{first}: warning: {count} line(s) are neither daemon events nor "
            "'sidecar tail --json' output, and were ignored (this is the first)",
            file=sys.stderr,
        )


def _read_spawn_graph(path: str) -> dict[str, set[str]]:
    data, name = read_bytes(path, ConfigError, MAX_SPAWN_GRAPH_BYTES)
    if len(data) > MAX_SPAWN_GRAPH_BYTES:
        raise ConfigError(f"{name}: larger than {MAX_SPAWN_GRAPH_BYTES} bytes")
    try:
        raw = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{name}: not JSON: {exc}") from exc
    ok = isinstance(raw, dict) and all(
        isinstance(v, list) and all(isinstance(c, str) for c in v) for v in raw.values()
    )
    if not ok:
        raise ConfigError(f"{name}: must map each parent SPIFFE ID to a list of child IDs")
    return {str(k): set(v) for k, v in raw.items()}


@_guarded
def cmd_blast_radius(args: argparse.Namespace) -> int:
    """What a compromise of each identity could reach, largest first."""
    check_one_stdin(args.file, args.observed, args.spawn_graph, args.entries)
    policy = load_policy(args.file)
    observed = read_history(args.observed) if args.observed else None
    if observed is not None:
        _warn_unrecognised(source_name(args.observed), observed)
    graph = _read_spawn_graph(args.spawn_graph) if args.spawn_graph else None
    if args.entries:
        from sidecar.attest import load_entries

        graph = {**(graph or {}), **load_entries(args.entries).spawn_graph()}
    source = source_name(args.observed) if args.observed else "<history>"
    result = blast_radius(policy, graph, observed, source=source)
    if args.json:
        _print_json(result.to_json())
    else:
        sys.stdout.write(result.render_text())
    return EXIT_OK


def _prefix_length(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0 <= value <= 32:
        raise argparse.ArgumentTypeError("must be an IPv4 prefix length, 0-32")
    return value


def register_cli(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``policy`` and its commands; each sets ``func(args) -> int``."""
    policy = subparsers.add_parser("policy", help="validate, compare and learn policies")
    sub = policy.add_subparsers(dest="policy_command", metavar="COMMAND", required=True)

    p = sub.add_parser("validate", help="check a policy file and print its version")
    p.add_argument("file", metavar="FILE", help="policy YAML ('-': standard input)")
    add_offline_flags(p)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("diff", help="destinations and executables gained and lost")
    p.add_argument("old", metavar="OLD", help="policy YAML ('-': standard input)")
    p.add_argument("new", metavar="NEW", help="policy YAML ('-': standard input)")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_offline_flags(p)
    p.set_defaults(handler=cmd_diff)

    p = sub.add_parser("suggest", help="learn an allowlist from audit-mode history")
    p.add_argument(
        "--history",
        required=True,
        metavar="FILE",
        help="events, JSON lines: the daemon's output or 'sidecar tail --json' ('-': stdin)",
    )
    p.add_argument(
        "--merge-cidrs",
        type=_prefix_length,
        metavar="N",
        help="merge observed addresses sharing a /N (IPv4; same host bits for IPv6)",
    )
    p.add_argument(
        "--merge-ports", action="store_true", help="widen ports to one range per protocol"
    )
    p.add_argument("--include-denied", action="store_true", help="also learn from blocked attempts")
    p.add_argument(
        "--into",
        metavar="POLICY",
        help="merge into this policy: its rules are kept, what they miss is added",
    )
    add_offline_flags(p)
    p.set_defaults(handler=cmd_suggest)

    p = sub.add_parser("blast-radius", help="what a compromise of each identity could reach")
    p.add_argument("file", metavar="FILE", help="policy YAML ('-': standard input)")
    p.add_argument("--observed", metavar="HISTORY", help="history to find unused allowances")
    p.add_argument(
        "--spawn-graph",
        metavar="FILE",
        help="JSON object: parent SPIFFE ID -> child IDs (registration entries' parent_id)",
    )
    p.add_argument(
        "--entries",
        metavar="FILE",
        help="registration entries: identities reachable through parent:id selectors",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    add_offline_flags(p)
    p.set_defaults(handler=cmd_blast_radius)
