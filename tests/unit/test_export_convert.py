"""The daemon's JSON-line events as wire Events: every carried field lands in its place."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pytest

from sidecar.api.v1 import event_pb2 as pb
from sidecar.export.convert import to_proto

AGENT = "spiffe://example.org/agent/research"
TIME = "2026-11-27T09:00:42.030354+00:00"
TIME_NS = 1_795_770_042_030_354_000


def base(kind: str, **more: Any) -> dict[str, Any]:
    ev = {
        "type": kind,
        "time": TIME,
        "host": "node-1",
        "pid": 4242,
        "ppid": 7,
        "uid": 1000,
        "gid": 1001,
        "comm": "agent",
        "exe": "/usr/bin/python3.11",
        "argv": ("python3", "agent.py"),
        "cgroup": "/agents/a1",
        "identity": AGENT,
        "instance_id": "0123456789abcdef01234567",
        "svid_serial": "1f2e",
        "policy_version": "v7",
    }
    ev.update(more)
    return ev


def test_time_is_exact_to_the_microsecond() -> None:
    assert (
        int(datetime(2026, 11, 27, 9, 0, 42, tzinfo=timezone.utc).timestamp()) * (10**9)
        + 30_354_000
        == TIME_NS
    )
    out = to_proto(base("exit"))
    assert out is not None and out.time_ns == TIME_NS


@pytest.mark.parametrize(
    ("iso", "ns"),
    [
        ("2026-11-27T09:00:42+00:00", 1_795_770_042_000_000_000),  # no fraction
        ("2026-11-27T10:00:42.5+01:00", 1_795_770_042_500_000_000),  # another offset
        ("", 0),
        (None, 0),
    ],
)
def test_times_in_other_shapes_still_convert(iso: str | None, ns: int) -> None:
    out = to_proto(dict(base("exit"), time=iso))
    assert out is not None and out.time_ns == ns


def test_exec() -> None:
    out = to_proto(base("exec", verdict="would_deny", rule="default"))
    assert out is not None
    assert (out.host, out.identity, out.credential_serial, out.policy_version) == (
        "node-1",
        AGENT,
        "1f2e",
        "v7",
    )
    assert (out.process.pid, out.process.instance_id) == (4242, "0123456789abcdef01234567")
    assert out.WhichOneof("body") == "exec"
    x = out.exec
    assert (x.pid, x.ppid, x.uid, x.gid) == (4242, 7, 1000, 1001)
    assert (x.exe, list(x.argv), x.cgroup) == (
        "/usr/bin/python3.11",
        ["python3", "agent.py"],
        "/agents/a1",
    )
    assert (x.verdict, x.rule) == (pb.VERDICT_WOULD_DENY, "default")


def test_unattested_exec_has_empty_identity_fields() -> None:
    out = to_proto(base("exec", identity=None, instance_id=None, svid_serial=None, verdict="allow"))
    assert out is not None
    assert (out.identity, out.credential_serial, out.process.instance_id) == ("", "", "")
    assert out.exec.verdict == pb.VERDICT_ALLOW and out.exec.rule == ""


def test_fork_exit_and_connect() -> None:
    fork = to_proto(base("fork"))
    assert fork is not None and fork.WhichOneof("body") == "fork"
    assert (fork.fork.parent_pid, fork.fork.child_pid) == (7, 4242)

    exit_ = to_proto(base("exit"))
    assert exit_ is not None and exit_.WhichOneof("body") == "exit"
    assert exit_.exit.pid == 4242

    conn = to_proto(
        base(
            "connect",
            family="inet6",
            protocol="udp",
            daddr="2001:db8::1",
            dport=53,
            verdict="deny",
            rule="default",
        )
    )
    assert conn is not None and conn.WhichOneof("body") == "connect"
    c = conn.connect
    assert (c.pid, c.family, c.protocol) == (4242, pb.ADDRESS_FAMILY_INET6, pb.PROTOCOL_UDP)
    assert (c.address, c.port, c.verdict, c.rule) == ("2001:db8::1", 53, pb.VERDICT_DENY, "default")


def test_socket_events_of_both_operations() -> None:
    made = to_proto(
        base(
            "socket",
            family="inet",
            operation="create",
            socket="inet/raw/icmp",
            verdict="deny",
            rule="default",
        )
    )
    assert made is not None and made.WhichOneof("body") == "socket"
    k = made.socket
    assert (k.pid, k.operation, k.kind, k.verdict, k.rule) == (
        4242,
        "create",
        "inet/raw/icmp",
        pb.VERDICT_DENY,
        "default",
    )
    opt = to_proto(
        base(
            "socket",
            family="inet",
            operation="setsockopt",
            option="IP_OPTIONS",
            verdict="would_deny",
            rule="source-route",
        )
    )
    assert opt is not None
    assert (opt.socket.kind, opt.socket.verdict) == ("IP_OPTIONS", pb.VERDICT_WOULD_DENY)


def test_credential_policy_and_loss_events() -> None:
    issued = to_proto(
        {
            "type": "credential_issued",
            "time": TIME,
            "host": "node-1",
            "identity": AGENT,
            "instance_id": "0123456789abcdef01234567",
            "svid_serial": "ab",
            "not_after": "2026-11-27T10:00:42+00:00",
        }
    )
    assert issued is not None and issued.WhichOneof("body") == "credential_issued"
    assert (issued.credential_issued.serial, issued.credential_issued.spiffe_id) == ("ab", AGENT)
    assert issued.credential_issued.not_after_ns == TIME_NS - 30_354_000 + 3600 * 10**9

    loaded = to_proto({"type": "policy_loaded", "time": TIME, "policy_version": "v8"})
    assert loaded is not None and loaded.policy_loaded.version == "v8"

    rejected = to_proto({"type": "entries_rejected", "time": TIME, "error": "f.yaml:3: bad"})
    assert rejected is not None
    assert (rejected.policy_rejected.what, rejected.policy_rejected.error) == (
        "entries",
        "f.yaml:3: bad",
    )

    lost = to_proto(
        {"type": "lost", "time": TIME, "reason": "ringbuf_full", "counts": {"exit": 2, "exec": 1}}
    )
    assert lost is not None
    assert [(c.kind, c.reason, c.count) for c in lost.lost.counts] == [
        ("exec", "ringbuf_full", 1),
        ("exit", "ringbuf_full", 2),
    ]


def test_kinds_the_collector_does_not_keep_give_none() -> None:
    assert to_proto({"type": "something_else", "time": TIME}) is None


def test_a_body_of_default_values_is_still_the_events_body() -> None:
    # pid 0 and an unknown parent: every field at its default, the kind still set.
    exit_ = to_proto(dict(base("exit"), pid=0))
    assert exit_ is not None and exit_.WhichOneof("body") == "exit"
    fork = to_proto(dict(base("fork"), pid=0, ppid=0))
    assert fork is not None and fork.WhichOneof("body") == "fork"
