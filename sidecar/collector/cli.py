"""Subcommands ``collector``, ``enroll`` and ``tail`` for the ``sidecar`` command.

``register_cli(subparsers)`` adds them; each sets ``handler`` (args -> exit code), as
the other subcommands of ``sidecar.cli`` do.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from sidecar.api.v1 import collector_pb2
from sidecar.util.errors import ConfigError, CredentialError

if TYPE_CHECKING:
    from sidecar.collector.config import CollectorConfig

_DURATION = re.compile(r"^(\d+)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """``90s``, ``10m``, ``2h``, ``1d`` -> seconds."""
    m = _DURATION.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"'{text}' is not a duration like 30s, 10m, 2h or 1d")
    return int(m.group(1)) * _UNITS[m.group(2)]


#: Lifetime of a bootstrap token without --ttl: long enough to roll out a node
#: pool, short enough that a leaked copy soon stops working.
BOOTSTRAP_TTL_S = 86400
ENV_NODE_NAME = "SIDECAR_NODE_NAME"


def _cmd_collector(args: argparse.Namespace) -> int:
    from sidecar.collector.config import load_config
    from sidecar.collector.server import create_join_token, serve
    from sidecar.collector.store import open_store
    from sidecar.collector.tls import roots_pem
    from sidecar.identity.x509 import CertificateAuthority

    cfg = load_config(args.config)
    if args.verify_chain:
        from sidecar.collector.verify import verify_stored_chain

        store = open_store(cfg)
        try:
            report = verify_stored_chain(store, args.verify_chain)
        finally:
            store.close()
        print(report.summary())
        return 0 if report.ok else 1
    if args.uses is not None and not args.bootstrap_token:
        raise ConfigError("--uses goes with --bootstrap-token")
    if args.bootstrap_token or args.revoke_host or args.release_host or args.expire_bootstrap_token:
        return _manage_enrollments(args, cfg)
    if args.join_token or args.issue_svid or args.bundle:
        cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        ca = CertificateAuthority.load_or_generate(cfg.ca_dir, cfg.trust_domain)
        if args.bundle:
            sys.stdout.buffer.write(roots_pem(ca))
        if args.join_token:
            store = open_store(cfg)
            try:
                ttl = int(args.ttl or cfg.join_token_ttl_s)
                print(create_join_token(store, cfg.trust_domain, args.join_token, ttl))
            finally:
                store.close()
        if args.issue_svid:
            if args.out is None:
                raise ConfigError("--issue-svid needs --out DIR")
            svid = ca.issue_x509_svid(args.issue_svid, timedelta(seconds=args.ttl or 86400))
            args.out.mkdir(mode=0o700, parents=True, exist_ok=True)
            (args.out / "svid.pem").write_bytes(svid.cert_chain_pem())
            (args.out / "svid.key").write_bytes(svid.key_pem())
            (args.out / "svid.key").chmod(0o600)
            (args.out / "bundle.pem").write_bytes(roots_pem(ca))
            print(f"wrote {svid.spiffe_id} into {args.out}")
        return 0
    asyncio.run(serve(cfg))
    return 0


def _manage_enrollments(args: argparse.Namespace, cfg: CollectorConfig) -> int:
    """--bootstrap-token, --expire-bootstrap-token, --revoke-host, --release-host."""
    from sidecar.collector.server import check_node_name, create_bootstrap_token, token_hash
    from sidecar.collector.store import open_store

    chosen = (
        args.bootstrap_token,
        args.expire_bootstrap_token,
        args.revoke_host,
        args.release_host,
    )
    if sum(map(bool, chosen)) > 1:
        raise ConfigError(
            "give one of --bootstrap-token, --expire-bootstrap-token, --revoke-host, --release-host"
        )
    old = None
    if args.expire_bootstrap_token:
        from sidecar.export.enroll import read_token_file

        src = args.expire_bootstrap_token
        old = read_token_file(Path("/dev/stdin") if src == "-" else Path(src))
    if args.bootstrap_token and args.uses is None:
        raise ConfigError("--bootstrap-token needs --uses N: how many nodes it may enroll")
    cfg.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    store = open_store(cfg)
    try:
        if args.bootstrap_token:
            ttl = int(args.ttl or BOOTSTRAP_TTL_S)
            print(create_bootstrap_token(store, args.uses, ttl))
            return 0
        if old is not None:
            if not store.expire_bootstrap_token(token_hash(old), time.time_ns()):
                raise CredentialError(
                    "no unexpired bootstrap token is the one given: nothing changed"
                )
            print("the bootstrap token enrolls no more; hosts it enrolled keep their credentials")
            return 0
        host = args.revoke_host or args.release_host
        # Any host name, not only a node name: a join-token host is revoked the same way.
        if not host or "/" in host:
            raise ConfigError(f"'{host}' is not a host name")
        store.revoke_host(host, time.time_ns(), release=bool(args.release_host))
    finally:
        store.close()
    if args.release_host:
        note = (
            ""
            if check_node_name(host) is None
            else " (not a node name: only a join token enrolls it)"
        )
        print(
            f"host {host}: certificates issued until now are refused; the name may enroll"
            f" again with a bootstrap token{note}"
        )
    else:
        print(
            f"host {host}: certificates issued until now are refused (at its next connection"
            " or renewal); it enrolls again only with a join token"
        )
    return 0


def _cmd_enroll(args: argparse.Namespace) -> int:
    from sidecar.export.enroll import enroll, renew

    if args.bootstrap_token_file is not None:
        return _enroll_bootstrap(args)
    if args.node_name:
        raise ConfigError("--node-name goes with --bootstrap-token-file")
    if args.renew:
        ident = asyncio.run(renew(args.collector, args.out, args.server_name))
    else:
        if not args.token or not args.bundle:
            raise ConfigError("enroll needs --token and --bundle (or --renew)")
        try:
            bundle = args.bundle.read_bytes()
        except OSError as exc:
            raise CredentialError(f"cannot read {args.bundle}: {exc}") from exc
        ident = asyncio.run(enroll(args.collector, args.token, bundle, args.out, args.server_name))
    print(f"host {ident.host}: credentials in {args.out}")
    return 0


def _enroll_bootstrap(args: argparse.Namespace) -> int:
    """Enroll this node once; later runs find its credentials and do nothing (exit 0)."""
    import os

    from sidecar.export.enroll import enroll_bootstrap, existing_credentials, read_token_file

    if args.renew or args.token:
        raise ConfigError("--bootstrap-token-file goes without --token and --renew")
    node = args.node_name or os.environ.get(ENV_NODE_NAME, "")
    if not node:
        raise ConfigError(f"--bootstrap-token-file needs --node-name NAME (or {ENV_NODE_NAME})")
    if args.bundle is None:
        raise ConfigError(
            "--bootstrap-token-file needs --bundle: the collector's CA bundle, obtained from"
            " the operator (sidecar collector --bundle), never from the network unchecked"
        )
    bundle = _read(args.bundle)
    held = existing_credentials(args.out, node, bundle)
    if held is not None:
        expiry = _held_expiry(args.out)
        print(
            f"host {held.host}: already enrolled, credentials in {args.out} (valid until {expiry})"
        )
        return 0
    token = read_token_file(args.bootstrap_token_file)
    ident = asyncio.run(
        enroll_bootstrap(args.collector, token, node, bundle, args.out, args.server_name)
    )
    print(f"host {ident.host}: enrolled, credentials in {args.out}")
    return 0


def _held_expiry(cred_dir: Path) -> str:
    from sidecar.export.enroll import credential_expiry

    when = credential_expiry(cred_dir)["host_svid"]
    return when.isoformat() if when else "unknown"


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise CredentialError(f"cannot read {path}: {exc}") from exc


def _cmd_tail(args: argparse.Namespace) -> int:
    from sidecar.collector.tail import VERDICTS, format_json, format_line, stored, tail

    creds = grpc.ssl_channel_credentials(
        _read(args.credentials / "bundle.pem"),
        _read(args.credentials / "svid.key"),
        _read(args.credentials / "svid.pem"),
    )
    options = [("grpc.ssl_target_name_override", args.server_name)] if args.server_name else []
    flt = collector_pb2.EventFilter(
        hosts=args.host,
        identities=args.identity,
        instances=args.instance,
        kinds=args.kind,
        verdicts=[VERDICTS[v] for v in args.verdict],
    )
    req = collector_pb2.SubscribeRequest(filter=flt)
    if args.after_cursor is not None:
        req.after_cursor = args.after_cursor
    elif args.since is not None:
        req.since_time_ns = time.time_ns() - int(args.since * 1e9)
    fmt = format_json if args.json else format_line

    def emit(se: collector_pb2.StoredEvent) -> None:
        print(fmt(se), flush=True)

    def channel() -> grpc.aio.Channel:
        return grpc.aio.secure_channel(args.collector, creds, options=options)

    try:
        if args.no_follow:
            if args.since is not None:
                flt.start_time_ns = time.time_ns() - int(args.since * 1e9)
            asyncio.run(stored(channel, flt, args.after_cursor or 0, emit, args.limit))
        else:
            asyncio.run(tail(channel, req, emit, args.limit))
    except KeyboardInterrupt:
        return 0
    return 0


def register_cli(subparsers: Any) -> None:
    """Add ``collector``, ``enroll`` and ``tail`` to the ``sidecar`` command's subparsers."""
    col = subparsers.add_parser("collector", help="run the central collector (or manage it)")
    col.add_argument("--config", type=Path, required=True, help="CollectorConfig YAML")
    col.add_argument("--join-token", metavar="HOST", help="print a single-use join token for HOST")
    col.add_argument("--issue-svid", metavar="SPIFFE_ID", help="issue a subscriber SVID")
    col.add_argument("--out", type=Path, help="folder for --issue-svid")
    col.add_argument("--bundle", action="store_true", help="print the trust bundle (PEM)")
    col.add_argument("--ttl", type=parse_duration, help="lifetime of a token or SVID (10m, 1d)")
    col.add_argument(
        "--bootstrap-token",
        action="store_true",
        help="print a bootstrap token that enrolls up to --uses node names, each once,"
        " until --ttl (default 1d)",
    )
    col.add_argument("--uses", type=int, metavar="N", help="enrollments a bootstrap token allows")
    col.add_argument(
        "--expire-bootstrap-token",
        metavar="FILE",
        help="the bootstrap token in FILE ('-': standard input) enrolls no more, from now on",
    )
    col.add_argument(
        "--revoke-host",
        metavar="HOST",
        help="refuse HOST's certificates issued until now (it re-enrolls only by join token)",
    )
    col.add_argument(
        "--release-host",
        metavar="HOST",
        help="as --revoke-host, and let a bootstrap token enroll the name HOST again",
    )
    col.add_argument(
        "--verify-chain",
        metavar="HOST",
        help="check HOST's stored events against the signed batches kept with them, again"
        " (exit 1 on any problem)",
    )
    col.set_defaults(handler=_cmd_collector)

    enr = subparsers.add_parser("enroll", help="enroll this host with a collector")
    enr.add_argument(
        "--collector",
        required=True,
        help="host:port: enrollment port, or the mTLS port with --renew",
    )
    enr.add_argument("--token", help="single-use join token")
    enr.add_argument(
        "--bootstrap-token-file",
        type=Path,
        metavar="FILE",
        help="enroll as --node-name with the bootstrap token in FILE; does nothing when"
        " --out already holds this node's valid credentials",
    )
    enr.add_argument(
        "--node-name",
        help=f"host name to enroll with a bootstrap token (default: ${ENV_NODE_NAME})",
    )
    enr.add_argument("--bundle", type=Path, help="the collector's trust bundle (PEM)")
    enr.add_argument("--out", type=Path, required=True, help="credential folder")
    enr.add_argument("--renew", action="store_true", help="renew over mTLS instead")
    enr.add_argument("--server-name", help="TLS name to expect (default: the host in --collector)")
    enr.set_defaults(handler=_cmd_enroll)

    tl = subparsers.add_parser("tail", help="print events from a collector as they arrive")
    tl.add_argument("--collector", required=True, help="host:port of the mTLS port")
    tl.add_argument(
        "--credentials", type=Path, required=True, help="folder with svid.pem, svid.key, bundle.pem"
    )
    tl.add_argument("--server-name", help="TLS name to expect")
    tl.add_argument("--host", action="append", default=[], help="only this host (repeatable)")
    tl.add_argument("--identity", action="append", default=[], help="only this SPIFFE ID")
    tl.add_argument(
        "--instance", action="append", default=[], help="only this process instance (repeatable)"
    )
    tl.add_argument("--kind", action="append", default=[], help="exec, connect, lost, integrity…")
    tl.add_argument(
        "--verdict", action="append", default=[], choices=["allow", "deny", "would_deny"]
    )
    tl.add_argument("--since", type=parse_duration, help="replay stored history from this long ago")
    tl.add_argument("--after-cursor", type=int, help="replay after this cursor")
    tl.add_argument("--json", action="store_true", help="one JSON object per line")
    tl.add_argument("--limit", type=int, default=0, help="stop after this many events")
    tl.add_argument(
        "--no-follow",
        action="store_true",
        help="print what is stored (all of it, or from --since / --after-cursor) and exit",
    )
    tl.set_defaults(handler=_cmd_tail)
