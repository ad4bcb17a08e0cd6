"""``sidecar tail``: subscribe to a collector and print events as they are stored.

A subscription is resumable: on a disconnect (a too-slow terminal, a collector
restart) ``tail`` reconnects after the last cursor it printed, so nothing is skipped
or printed twice.  ``--no-follow`` pages through what is stored instead
(``Query``) and returns at its end.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from datetime import datetime, timezone

import grpc
from google.protobuf import json_format

from sidecar.api.v1 import collector_pb2, collector_pb2_grpc, event_pb2
from sidecar.util.errors import TransportError

_logger = logging.getLogger(__name__)

VERDICTS = {
    "allow": event_pb2.VERDICT_ALLOW,
    "deny": event_pb2.VERDICT_DENY,
    "would_deny": event_pb2.VERDICT_WOULD_DENY,
}
_VERDICT_NAMES: dict[int, str] = {int(v): k for k, v in VERDICTS.items()}
_FATAL = frozenset(
    {
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)


def _verdict(v: int) -> str:
    return _VERDICT_NAMES.get(v, f"verdict({v})")


def _details(ev: event_pb2.Event) -> str:
    kind = ev.WhichOneof("body")
    if kind == "exec":
        x = ev.exec
        return f"pid={x.pid} ppid={x.ppid} uid={x.uid} {x.exe} {_verdict(x.verdict)} rule={x.rule}"
    if kind == "connect":
        c = ev.connect
        proto = {event_pb2.PROTOCOL_TCP: "tcp", event_pb2.PROTOCOL_UDP: "udp"}.get(c.protocol, "?")
        host = f"[{c.address}]" if ":" in c.address else c.address
        return f"pid={c.pid} {proto} {host}:{c.port} {_verdict(c.verdict)} rule={c.rule}"
    if kind == "socket":
        k = ev.socket
        return f"pid={k.pid} {k.operation} {k.kind} {_verdict(k.verdict)} rule={k.rule}"
    if kind == "fork":
        return f"parent={ev.fork.parent_pid} child={ev.fork.child_pid}"
    if kind == "exit":
        return f"pid={ev.exit.pid}"
    if kind in ("credential_issued", "credential_revoked"):
        cr = ev.credential_issued if kind == "credential_issued" else ev.credential_revoked
        return f"serial={cr.serial} {cr.spiffe_id}"
    if kind == "policy_loaded":
        return f"version={ev.policy_loaded.version}"
    if kind == "lost":
        parts = [f"{c.kind}/{c.reason}={c.count}" for c in ev.lost.counts]
        if ev.lost.first_sequence:
            parts.append(f"seq={ev.lost.first_sequence}..{ev.lost.last_sequence}")
        return " ".join(parts)
    if kind == "integrity":
        a = ev.integrity
        name = event_pb2.IntegrityAlert.Kind.Name(a.kind) if a.kind in (1, 2, 3) else str(a.kind)
        return f"{name} seq={a.first_sequence}..{a.last_sequence} {a.detail}"
    return ""


def format_line(se: collector_pb2.StoredEvent) -> str:
    """One readable line: time, host, sequence, kind, identity, details, and a flag."""
    ev = se.event
    when = datetime.fromtimestamp(ev.time_ns / 1e9, timezone.utc).isoformat(timespec="milliseconds")
    flag = ""
    if se.verification not in (
        collector_pb2.VERIFICATION_VERIFIED,
        collector_pb2.VERIFICATION_COLLECTOR,
    ):
        flag = " !" + collector_pb2.Verification.Name(se.verification).removeprefix("VERIFICATION_")
    ident = ev.identity or "-"
    kind = ev.WhichOneof("body") or "?"
    return f"{when} {ev.host} #{ev.sequence} {kind} {ident} {_details(ev)}{flag}".rstrip()


def format_json(se: collector_pb2.StoredEvent) -> str:
    return json_format.MessageToJson(se, indent=None, preserving_proto_field_name=True)


async def tail(
    channel_factory: Callable[[], grpc.aio.Channel],
    request: collector_pb2.SubscribeRequest,
    emit: Callable[[collector_pb2.StoredEvent], None],
    limit: int = 0,
) -> int:
    """Print events until ``limit`` (0: forever); returns how many were printed."""
    printed = 0
    backoff = 0.2
    while True:
        async with channel_factory() as ch:
            call = collector_pb2_grpc.CollectorStub(ch).Subscribe(request)
            try:
                while not limit or printed < limit:
                    msg = await call.read()
                    if not isinstance(msg, collector_pb2.StoredEvent):
                        break
                    emit(msg)
                    printed += 1
                    backoff = 0.2
                    request.after_cursor = msg.cursor
                if limit and printed >= limit:
                    call.cancel()
                    return printed
            except grpc.aio.AioRpcError as exc:
                if exc.code() in _FATAL:
                    raise TransportError(
                        f"subscription refused: {exc.code().name}: {exc.details()}"
                    ) from exc
                _logger.warning("subscription ended (%s); resuming", exc.details())
        await asyncio.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


async def stored(
    channel_factory: Callable[[], grpc.aio.Channel],
    flt: collector_pb2.EventFilter,
    after_cursor: int,
    emit: Callable[[collector_pb2.StoredEvent], None],
    limit: int = 0,
) -> int:
    """Print the stored events matching ``flt`` after ``after_cursor``, page by page,
    and return how many were printed (at most ``limit``; 0: all)."""
    printed = 0
    cursor = after_cursor
    async with channel_factory() as ch:
        stub = collector_pb2_grpc.CollectorStub(ch)
        while True:
            request = collector_pb2.QueryRequest(filter=flt, after_cursor=cursor)
            try:
                page = await stub.Query(request)
            except grpc.aio.AioRpcError as exc:
                raise TransportError(f"query failed: {exc.code().name}: {exc.details()}") from exc
            for se in page.events:
                emit(se)
                printed += 1
                if limit and printed >= limit:
                    return printed
            if not page.more or page.next_cursor <= cursor:
                return printed
            cursor = page.next_cursor
