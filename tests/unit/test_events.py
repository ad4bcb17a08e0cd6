"""One event model, two encodings: every kind survives JSON lines and the wire unchanged.

The samples below are one of each kind (and the variants of a kind whose
fields differ), with no field at its default, so that a field an encoding
forgot shows as a difference.  Real events from the real kernel go through
the same round trips in every kernel test (tests/kernel/conftest.py,
``MemorySink``).
"""

from __future__ import annotations

import dataclasses
import ipaddress
import random
from collections.abc import Sequence
from typing import Any

import orjson
import pytest

from sidecar.api.v1 import event_pb2 as pb
from sidecar.daemon.describe import Describer
from sidecar.enforce.enforcer import IdentityNumbers
from sidecar.events import codec
from sidecar.events import model as m
from sidecar.events.codec import (
    encode_json,
    format_time,
    from_json,
    from_proto,
    parse_time,
    to_json,
    to_proto,
    write_json_lines,
)
from sidecar.kernel import abi
from sidecar.proc.cgroups import CgroupNames

AGENT = "spiffe://example.org/agent/research"
TIME = "2026-11-27T09:00:42.030354123+00:00"
TIME_NS = 1_795_770_042_030_354_123


def header(**more: Any) -> dict[str, Any]:
    out = {
        "time_ns": TIME_NS,
        "host": "node-1",
        "identity": AGENT,
        "instance_id": "0123456789abcdef01234567",
        "svid_serial": "1f2e",
        "policy_version": "v7",
    }
    out.update(more)
    return out


def process(**more: Any) -> dict[str, Any]:
    out = header(
        pid=4242,
        ppid=7,
        uid=1000,
        gid=1001,
        comm="agent",
        exe="/usr/bin/python3.11",
        argv=("python3", "agent.py"),
        cgroup="/agents/a1",
        attestation_pending=True,
    )
    out.update(more)
    return out


SAMPLES: list[m.Event] = [
    m.Exec(
        **process(),
        filename="python3",
        args_truncated=True,
        args_redacted=True,
        verdict="deny",
        rule="capabilities",
        capabilities=("CAP_SYS_ADMIN", "CAP_BPF"),
    ),
    m.Fork(**process()),
    m.Exit(**process()),
    m.Connect(
        **process(),
        family="inet6",
        protocol="udp",
        daddr="2001:db8::1",
        dport=53,
        hook="sendmsg6",
        verdict="would_deny",
        rule="dns",
    ),
    m.Socket(
        **process(),
        family="inet",
        operation="create",
        verdict="deny",
        rule="default",
        socket="inet/raw/icmp",
    ),
    m.Socket(
        **process(),
        family="inet",
        operation="setsockopt",
        verdict="would_deny",
        rule="source-route",
        option="IP_OPTIONS",
    ),
    m.Socket(
        **process(),
        family="unix",
        operation="sendmsg",
        verdict="allow",
        rule="unix",
        address="@agent-bus",
    ),
    m.CredentialIssued(**header(), not_after_ns=TIME_NS + 3600 * 10**9),
    m.CredentialRevoked(**header(), not_after_ns=TIME_NS + 60 * 10**9),
    m.PolicyLoaded(**header(), source="/etc/sidecar/policy.yaml", identities=(AGENT, "x")),
    m.PolicyRejected(**header(), error="policy.yaml:3: identities[0].id: not a SPIFFE ID"),
    m.EntriesLoaded(**header(), digest="9f2c"),
    m.EntriesRejected(**header(), error="entries.yaml:5: selectors: unknown kind"),
    m.Lost(**header(), reason="ringbuf_full", counts={"exit": 2, "exec": 1}),
]


def _id(ev: m.Event) -> str:
    return f"{ev.KIND}-{getattr(ev, 'operation', '')}"


def test_the_samples_cover_every_kind() -> None:
    assert {type(ev) for ev in SAMPLES} == set(m.KINDS.values())


@pytest.mark.parametrize("ev", SAMPLES, ids=_id)
def test_a_json_line_decodes_back_into_the_same_event(ev: m.Event) -> None:
    line = encode_json(ev)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert from_json(orjson.loads(line)) == ev


@pytest.mark.parametrize("ev", SAMPLES, ids=_id)
def test_the_positional_constructor_builds_the_same_event(ev: m.Event) -> None:
    values = [getattr(ev, f.name) for f in dataclasses.fields(ev)]
    built = m.positional(type(ev))(*values)
    assert type(built) is type(ev) and built == ev
    with pytest.raises(TypeError):
        m.positional(type(ev))(*values[:-1])


@pytest.mark.parametrize("ev", SAMPLES, ids=_id)
def test_a_batch_of_json_lines_is_each_event_s_line_in_order(ev: m.Event) -> None:
    lines: list[bytes] = []
    write_json_lines([ev, SAMPLES[0], ev], lines.append)
    assert lines == [encode_json(ev), encode_json(SAMPLES[0]), encode_json(ev)]


@pytest.mark.parametrize("ev", SAMPLES, ids=_id)
def test_the_wire_event_decodes_back_into_the_same_event(ev: m.Event) -> None:
    wire = pb.Event.FromString(to_proto(ev).SerializeToString())
    assert wire.WhichOneof("body") == ev.KIND.replace("entries_rejected", "policy_rejected")
    assert from_proto(wire) == ev


@pytest.mark.parametrize("ev", SAMPLES, ids=_id)
def test_every_field_is_carried_by_both_encodings(ev: m.Event) -> None:
    """Change any one field: both encodings change (none is dropped on the way)."""
    json0, wire0 = to_json(ev), to_proto(ev).SerializeToString()
    for f in dataclasses.fields(ev):
        value = getattr(ev, f.name)
        if isinstance(value, bool):
            other: Any = not value
        elif isinstance(value, int):
            other = value + 1
        elif isinstance(value, tuple):
            other = (*value, "more")
        elif isinstance(value, dict):
            other = {**value, "connect": 9}
        elif isinstance(value, str):
            other = {"deny": "allow", "allow": "deny", "would_deny": "deny"}.get(value, value + "x")
        else:
            continue  # None: a field the sample leaves out (the other socket targets)
        if f.name == "operation":
            continue  # names which target field is set; covered by the three socket samples
        changed = dataclasses.replace(ev, **{f.name: other})
        assert to_json(changed) != json0, f"{ev.KIND}.{f.name} not in the JSON line"
        assert to_proto(changed).SerializeToString() != wire0, f"{ev.KIND}.{f.name} not on the wire"


def _set_fields(msg: Any, prefix: str = "") -> set[str]:
    out = set()
    for fd, value in msg.ListFields():
        name = prefix + fd.name
        out.add(name)
        if fd.message_type is not None and not isinstance(value, Sequence):
            out |= _set_fields(value, name + ".")
        elif fd.message_type is not None:
            for item in value:
                out |= _set_fields(item, name + ".")
    return out


def _schema_fields(desc: Any, prefix: str = "") -> set[str]:
    out = set()
    for fd in desc.fields:
        name = prefix + fd.name
        out.add(name)
        if fd.message_type is not None:
            out |= _schema_fields(fd.message_type, name + ".")
    return out


# Set by the exporter (boot id, sequence, a loss's hole) or raised by the collector.
NOT_THE_DAEMONS = {"boot_id", "sequence", "lost.first_sequence", "lost.last_sequence"}


def test_every_field_of_the_schema_has_a_place_in_the_model() -> None:
    used = set().union(*(_set_fields(to_proto(ev)) for ev in SAMPLES))
    schema = {f for f in _schema_fields(pb.Event.DESCRIPTOR) if not f.startswith("integrity")}
    assert schema - NOT_THE_DAEMONS - used == set()


@pytest.mark.parametrize("ev", SAMPLES, ids=_id)
def test_every_kind_says_where_and_when_and_process_kinds_say_who(ev: m.Event) -> None:
    line = to_json(ev)
    assert line["host"] == "node-1" and line["time"] == TIME
    wire = to_proto(ev)
    assert wire.host == "node-1" and wire.time_ns == TIME_NS
    if isinstance(ev, (m.ProcessEvent, m.CredentialIssued, m.CredentialRevoked)):
        assert line["identity"] == AGENT and line["instance_id"]
        assert wire.identity == AGENT and wire.process.instance_id == ev.instance_id


def test_an_unattested_process_has_null_identity_in_json_and_empty_fields_on_the_wire() -> None:
    ev = m.Exit(**process(identity=None, instance_id=None, svid_serial=None))
    line = to_json(ev)
    assert line["identity"] is None and line["instance_id"] is None
    assert line["svid_serial"] is None
    wire = to_proto(ev)
    assert (wire.identity, wire.credential_serial, wire.process.instance_id) == ("", "", "")
    assert from_proto(wire) == ev and from_json(line) == ev


def test_an_allowed_exec_has_no_rule_and_optional_facts_are_left_out() -> None:
    ev = m.Exec(
        **process(attestation_pending=False),
        filename="/bin/true",
        args_truncated=False,
        verdict="allow",
    )
    line = to_json(ev)
    for key in ("rule", "capabilities", "args_redacted", "attestation"):
        assert key not in line
    assert line["verdict"] == "allow" and line["args_truncated"] is False
    assert to_proto(ev).exec.verdict == pb.VERDICT_ALLOW
    assert from_json(line) == ev and from_proto(to_proto(ev)) == ev


def test_the_json_line_keeps_its_documented_shape() -> None:
    exec_ = to_json(SAMPLES[0])
    assert list(exec_)[:2] == ["type", "time"]
    assert exec_["attestation"] == "pending" and exec_["argv"] == ("python3", "agent.py")
    issued = to_json(SAMPLES[7])
    assert issued["not_after"] == "2026-11-27T10:00:42.030354123+00:00"
    lost = to_proto(SAMPLES[-1])
    assert [(c.kind, c.reason, c.count) for c in lost.lost.counts] == [
        ("exec", "ringbuf_full", 1),
        ("exit", "ringbuf_full", 2),
    ]


def test_time_is_exact_to_the_nanosecond_and_other_shapes_still_parse() -> None:
    assert format_time(TIME_NS) == TIME
    assert parse_time(TIME) == TIME_NS
    assert parse_time("2026-11-27T09:00:42.030354+00:00") == TIME_NS - 123  # microseconds
    assert parse_time("2026-11-27T09:00:42Z") == 1_795_770_042_000_000_000
    assert parse_time("2026-11-27T10:00:42.5+01:00") == 1_795_770_042_500_000_000
    assert parse_time("2026-11-27T09:00:42") == 1_795_770_042_000_000_000  # naive: UTC


def test_an_unknown_kind_is_refused_by_both_decoders() -> None:
    with pytest.raises(ValueError, match="unknown event type"):
        from_json({"type": "something_else", "time": TIME})
    with pytest.raises(ValueError, match="no host event"):
        from_proto(pb.Event(time_ns=1))


def test_a_body_of_default_values_is_still_the_events_body() -> None:
    exit_ = to_proto(m.Exit(**process(pid=0, ppid=0)))
    assert exit_.WhichOneof("body") == "exit"
    fork = to_proto(m.Fork(**process(pid=0, ppid=0)))
    assert fork.WhichOneof("body") == "fork"


# -- the describe stage's handler table -------------------------------------------------


def _describer() -> Describer:
    from pathlib import Path

    return Describer("node-1", IdentityNumbers(), lambda: None, CgroupNames(Path("/"), Path("/x")))


def test_every_kernel_record_kind_has_a_handler() -> None:
    kinds = set(abi.KernelEvent.__args__)  # type: ignore[attr-defined]
    assert set(_describer().handlers) == kinds


def test_a_record_of_an_unknown_kind_is_counted_never_taken_for_a_connect() -> None:
    d = _describer()

    class NewKind:
        task = abi.Task(1, 1, 0, 0, 0, abi.IDENTITY_NONE, 0, "x")
        ts_ns = 1

    assert d.describe(NewKind()) is None  # type: ignore[arg-type]
    assert d.unhandled == 1


def test_a_record_becomes_one_typed_event_with_host_and_time() -> None:
    d = _describer()
    d.clock_offset = 1_000
    task = abi.Task(4242, 4242, 1, 1000, 1000, abi.IDENTITY_NONE, 0, "curl")
    conn = abi.Connect(
        5,
        task,
        abi.AF_INET,
        abi.IPPROTO_TCP,
        abi.Hook.CONNECT4,
        abi.Verdict.ALLOW,
        ipaddress.IPv4Address("192.0.2.1"),
        443,
        0,
        0,
    )
    ev = d.describe(conn)
    assert isinstance(ev, m.Connect)
    assert (ev.host, ev.time_ns, ev.daddr, ev.dport, ev.identity, ev.hook) == (
        "node-1",
        1_005,
        "192.0.2.1",
        443,
        None,
        "connect4",
    )
    assert d.unhandled == 0


def test_an_exec_name_as_long_as_the_record_holds_is_taken_from_proc_not_from_the_name() -> None:
    import os

    d = _describer()
    cut = "/" + "d" * 254  # 255 bytes: the record may have cut a longer name here
    assert d._exe(os.getpid(), cut) == os.readlink(f"/proc/{os.getpid()}/exe")
    assert d._exe(os.getpid(), "/usr/bin/../bin/true") == os.path.realpath("/usr/bin/true")


@pytest.mark.parametrize("ev", SAMPLES, ids=_id)
def test_the_c_json_builder_builds_what_the_python_one_builds(ev: m.Event) -> None:
    """The same object, keys in the same order, for every kind and many variants."""
    rng = random.Random(ev.KIND)
    kind = type(ev)
    for i in range(300):
        variant = ev
        for f in dataclasses.fields(ev):
            value = getattr(ev, f.name)
            if rng.random() < 0.3:  # empty, falsy or flipped values, and times near and far
                if f.name.endswith("_ns"):
                    value = rng.choice([0, -1, 1, 10**9 - 1, -(10**9), rng.randrange(2**62)])
                elif isinstance(value, bool):
                    value = not value
                elif isinstance(value, (str, tuple)) or value is None:
                    value = rng.choice([None, "", (), "x\\u00e9\\udcff", ("a", "")])
            variant = dataclasses.replace(variant, **{f.name: value})
        fast = codec._C_ENCODERS[kind](variant)
        slow = codec._ENCODERS[kind](variant)
        assert fast is not None, (i, variant)
        assert fast == slow and list(fast) == list(slow), (i, variant)
    # A time past 64 bits comes back None from C, and Python's encoder writes it.
    far = dataclasses.replace(ev, time_ns=2**64 + 5)
    assert codec._C_ENCODERS[kind](far) is None
    assert to_json(far) == codec._ENCODERS[kind](far)


def test_names_and_arguments_that_are_not_utf8_are_recorded_in_both_encodings() -> None:
    """An attacker's program named /tmp/\\xff must not make its event, or its batch, vanish."""
    raw_name = b"/tmp/ag\xffent"
    name = raw_name.decode("utf-8", "surrogateescape")  # as the kernel decoders give it
    ev = m.Exec(
        **process(),
        filename=name,
        args_truncated=False,
        verdict="deny",
        rule="default",
    )
    ev = dataclasses.replace(ev, exe=name, argv=(name, "\udcfe", "ok"), comm="ag\udcffent")
    line = orjson.loads(encode_json(ev))
    assert line["filename"] == line["exe"] == "/tmp/ag\\xffent"
    assert line["argv"] == ["/tmp/ag\\xffent", "\\xfe", "ok"] and line["comm"] == "ag\\xffent"
    wire = pb.Event.FromString(to_proto(ev).SerializeToString())
    assert wire.exec.filename == "/tmp/ag\\xffent" and list(wire.exec.argv)[1] == "\\xfe"
    assert from_proto(wire) == from_json(line) == codec.printable(ev)
    # A batch with such an event writes every event, in order.
    lines: list[bytes] = []
    write_json_lines([SAMPLES[0], ev, SAMPLES[1]], lines.append)
    assert lines == [encode_json(SAMPLES[0]), encode_json(ev), encode_json(SAMPLES[1])]
    # Valid text is left as it is, and the event itself when all of it is.
    assert codec.printable(SAMPLES[0]) is SAMPLES[0]
    assert codec.printable(dataclasses.replace(ev, comm="\ud800")).comm == "\\ud800"
