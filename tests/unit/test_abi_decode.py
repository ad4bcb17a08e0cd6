"""The ring-buffer record decoder, on records packed here byte by byte.

tests/unit/test_abi_layout.py builds records through the ctypes mirrors;
these pack them with struct, field by field, as the C layout has them.
"""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest

from sidecar.daemon.reader import Batch, decode, merge
from sidecar.kernel import abi

HEADER = struct.Struct("<HHIQ")
TASK = struct.Struct("<IIIIIIQ16s")


def task(pid: int = 42, ppid: int = 7, identity: int = 0, comm: bytes = b"agent") -> bytes:
    return TASK.pack(pid, pid + 1, ppid, 1000, 1001, identity, 99, comm)


def record(kind: int, body: bytes, version: int = abi.ABI_VERSION) -> bytes:
    size = abi._SIZES[kind]
    data = HEADER.pack(kind, version, size, 123_456_789) + body
    return data.ljust(size, b"\0")


def exec_record(
    filename: bytes,
    args: list[bytes],
    *,
    name_len: int | None = None,
    flags: int = 0,
    verdict: int = abi.Verdict.ALLOW,
    caps_refused: int = 0,
    exe: tuple[int, int] = (0, 0),
    caps_host: int = 0,
    start_ns: int = 0,
) -> bytes:
    packed = b"".join(a + b"\0" for a in args)
    tail = struct.pack(
        f"<IIIHHHBBIQQQQ{abi.FILENAME_LEN}s",
        42,
        flags,
        1,
        len(filename) + 1 if name_len is None else name_len,
        len(packed),
        len(args),
        verdict,
        0,
        exe[0],
        caps_refused,
        caps_host,
        start_ns,
        exe[1],
        filename,
    )
    return record(abi.EventType.EXEC, task(identity=5) + tail + packed)


def test_exec_record_decodes_every_field() -> None:
    ev = abi.decode(exec_record(b"/usr/bin/curl", [b"curl", b"-s", b"https://example.org"]))
    assert isinstance(ev, abi.Exec)
    assert ev.ts_ns == 123_456_789
    assert ev.task == abi.Task(42, 43, 7, 1000, 1001, 5, 99, "agent")
    assert ev.filename == "/usr/bin/curl"
    assert ev.argv == ("curl", "-s", "https://example.org")
    assert ev.policy_gen == 1
    assert ev.verdict is abi.Verdict.ALLOW
    assert not ev.args_truncated and not ev.args_missing


def test_exec_record_carries_what_attestation_takes_from_the_kernel() -> None:
    ev = abi.decode(
        exec_record(
            b"/usr/bin/curl",
            [b"curl"],
            exe=(0x0080_0003, 1 << 40 | 77),
            caps_host=1 << 21,
            start_ns=123 * 10**9 + 456,
        )
    )
    assert isinstance(ev, abi.Exec)
    assert (ev.exe_dev, ev.exe_ino) == (0x0080_0003, 1 << 40 | 77)
    assert ev.caps_host == 1 << 21
    assert ev.start_ns == 123 * 10**9 + 456
    assert ev.filename == "/usr/bin/curl"  # the fields before the name did not shift it


def test_exec_record_sent_without_its_unused_args_tail() -> None:
    full = exec_record(b"/bin/echo", [b"echo", b"hi"])
    used = abi._ARGS + len(b"echo\0hi\0")
    short = full[:4] + struct.pack("<I", used) + full[8:used]
    ev = abi.decode(short)
    assert isinstance(ev, abi.Exec)
    assert ev.argv == ("echo", "hi") and ev.filename == "/bin/echo"


def test_exec_args_never_read_past_the_record() -> None:
    # A header shorter than args_len claims: only what came is read.
    full = exec_record(b"/bin/echo", [b"echo", b"hello"])
    cut = abi._ARGS + 5
    ev = abi.decode(full[:4] + struct.pack("<I", cut) + full[8:cut])
    assert isinstance(ev, abi.Exec)
    assert ev.argv == ("echo", "")


def test_exec_flags_and_verdicts() -> None:
    ev = abi.decode(
        exec_record(
            b"/bin/sh",
            [b"sh"],
            flags=abi.EXEC_ARGS_TRUNCATED | abi.EXEC_NO_ARGS,
            verdict=abi.Verdict.WOULD_DENY,
        )
    )
    assert isinstance(ev, abi.Exec)
    assert ev.args_truncated and ev.args_missing
    assert ev.verdict is abi.Verdict.WOULD_DENY


def test_exec_argv_stops_at_the_count_the_kernel_gave() -> None:
    # Empty arguments are arguments; bytes past the count are not.
    ev = abi.decode(exec_record(b"/bin/echo", [b"echo", b"", b"x"]))
    assert isinstance(ev, abi.Exec)
    assert ev.argv == ("echo", "", "x")


def test_exec_name_that_could_not_be_read_is_empty() -> None:
    # bpf_probe_read_kernel_str failed: a negative length, seen as a large u16.
    ev = abi.decode(exec_record(b"garbage", [b"x"], name_len=0xFFF2))
    assert isinstance(ev, abi.Exec)
    assert ev.filename == ""


def test_undecodable_bytes_in_names_survive_as_surrogates() -> None:
    ev = abi.decode(exec_record(b"/tmp/\xff", [b"\xfe"]))
    assert isinstance(ev, abi.Exec)
    assert ev.filename.encode("utf-8", "surrogateescape") == b"/tmp/\xff"
    assert ev.argv[0].encode("utf-8", "surrogateescape") == b"\xfe"


def test_fork_exit_and_connect_records() -> None:
    fork = abi.decode(record(abi.EventType.FORK, task() + struct.pack("<II", 4242, 0)))
    assert isinstance(fork, abi.Fork)
    assert fork.child_pid == 4242 and fork.task.pid == 42

    exit_ = abi.decode(record(abi.EventType.EXIT, task(comm=b"x" * 16)))
    assert isinstance(exit_, abi.Exit)
    assert exit_.task.comm == "x" * 16  # a full name has no NUL

    mapped = b"\0" * 10 + b"\xff\xff" + bytes([10, 0, 0, 1])
    body = struct.pack("<BBBBHH16sII", 2, 6, 1, 2, 443, 0, mapped, 3, 1)
    conn = abi.decode(record(abi.EventType.CONNECT, task() + body))
    assert isinstance(conn, abi.Connect)
    assert conn.address == ipaddress.IPv4Address("10.0.0.1")
    assert (conn.port, conn.rule, conn.policy_gen) == (443, 3, 1)
    assert conn.hook is abi.Hook.CONNECT4 and conn.verdict is abi.Verdict.DENY

    v6 = ipaddress.IPv6Address("2001:db8::1")
    body6 = struct.pack("<BBBBHH16sII", 10, 17, 4, 1, 53, 0, v6.packed, 0, 0)
    conn6 = abi.decode(record(abi.EventType.CONNECT, task() + body6))
    assert isinstance(conn6, abi.Connect)
    assert conn6.address == v6 and conn6.hook is abi.Hook.SENDMSG6


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (HEADER.pack(3, abi.ABI_VERSION, abi._SIZES[3], 0), "ExitEvent of 16 bytes"),
        (record(abi.EventType.EXIT, task())[:-1], "expected 64"),
        (exec_record(b"/bin/x", [])[: abi._ARGS - 1], "ExecEvent of"),
        (exec_record(b"/bin/x", [], verdict=9), "unknown verdict 9"),
        (exec_record(b"/bin/x", [], verdict=0), "unknown verdict 0"),
        (
            record(
                abi.EventType.CONNECT,
                task() + struct.pack("<BBBBHH16sII", 2, 6, 9, 1, 80, 0, bytes(16), 0, 0),
            ),
            "unknown hook 9",
        ),
    ],
)
def test_bad_records_raise_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(abi.DecodeError, match=message):
        abi.decode(data)


def test_a_privileged_exec_carries_the_refused_capabilities() -> None:
    ev = abi.decode(
        exec_record(
            b"/usr/bin/id",
            [b"id"],
            flags=abi.EXEC_PRIVILEGED,
            verdict=abi.Verdict.DENY,
            caps_refused=1 << 21 | 1 << 39,
        )
    )
    assert isinstance(ev, abi.Exec)
    assert ev.flags & abi.EXEC_PRIVILEGED
    assert ev.caps_refused == 1 << 21 | 1 << 39
    assert ev.filename == "/usr/bin/id" and ev.argv == ("id",)


def test_a_unix_record_keeps_the_address_bytes_it_was_given() -> None:
    path = b"\0agent-bus"
    body = struct.pack(
        f"<BBHI{abi.UNIX_PATH_LEN}sI",
        abi.Hook.SENDMSG_UNIX,
        abi.Verdict.WOULD_DENY,
        len(path),
        1,
        path,
        0,
    )
    ev = abi.decode(record(abi.EventType.UNIX, task() + body))
    assert isinstance(ev, abi.Unix)
    assert (ev.hook, ev.verdict, ev.path, ev.policy_gen) == (
        abi.Hook.SENDMSG_UNIX,
        abi.Verdict.WOULD_DENY,
        path,
        1,
    )


# -- the C decoder (the daemon's) against the Python one (the reference) ----------------


def _random_record(rng: random.Random) -> bytes:
    """A record of any kind with random fields, sizes and bytes, often malformed."""
    kind = rng.choice([1, 2, 3, 4, 5, 6, 1, 1, 3, rng.randrange(0, 9)])
    comm = bytes(rng.choice(b"ab\0\xff\xc3") for _ in range(16))
    head_task = struct.pack(
        "<IIIIIIQ16s",
        *(rng.choice([0, 1, 2**31, 2**32 - 1, rng.randrange(2**32)]) for _ in range(6)),
        rng.choice([0, 2**64 - 1, rng.randrange(2**64)]),
        comm,
    )
    if kind == abi.EventType.EXEC:
        args = [bytes(rng.choice(b"xy\0\xfe") for _ in range(rng.randrange(6))) for _ in range(4)]
        packed = b"".join(a + b"\0" for a in args)
        tail = struct.pack(
            f"<IIIHHHBBIQQQQ{abi.FILENAME_LEN}s",
            rng.randrange(2**32),
            rng.randrange(64),
            rng.randrange(2**32),
            rng.choice([0, 1, 5, 255, 256, 257, 0xFFFF]),
            rng.choice([len(packed), 0, 3, 1024, 1025, 0xFFFF]),
            rng.choice([0, 1, 3, 4, 40, 0xFFFF]),
            rng.choice([0, 1, 2, 3, 4, 255]),
            0,
            rng.randrange(2**32),
            rng.randrange(2**64),
            rng.randrange(2**64),
            rng.randrange(2**64),
            rng.randrange(2**64),
            bytes(rng.choice(b"/ab\0\xff") for _ in range(rng.randrange(20))),
        )
        body = head_task + tail + packed
        size = len(body) + 16 + rng.choice([0, 0, 0, -1, 1, 4000])
    elif kind == abi.EventType.CONNECT:
        addr = rng.choice(
            [bytes(10) + b"\xff\xff" + bytes(4), bytes(rng.randrange(256) for _ in range(16))]
        )
        body = head_task + struct.pack(
            "<BBBBHH16sII",
            rng.choice([2, 10, 0]),
            rng.choice([6, 17]),
            rng.randrange(10),
            rng.randrange(5),
            rng.randrange(2**16),
            0,
            addr,
            rng.randrange(2**32),
            rng.randrange(2**32),
        )
        size = abi._SIZES[kind]
    elif kind == abi.EventType.SOCKET:
        body = head_task + struct.pack(
            "<HHHBBiiII",
            *(rng.randrange(2**16) for _ in range(3)),
            rng.randrange(10),
            rng.randrange(5),
            rng.randrange(-(2**31), 2**31),
            rng.randrange(-(2**31), 2**31),
            rng.randrange(2**32),
            0,
        )
        size = abi._SIZES[kind]
    elif kind == abi.EventType.UNIX:
        path = bytes(rng.randrange(256) for _ in range(abi.UNIX_PATH_LEN))
        body = head_task + struct.pack(
            f"<BBHI{abi.UNIX_PATH_LEN}sI",
            rng.randrange(10),
            rng.randrange(5),
            rng.choice([0, 1, 50, 108, 109, 0xFFFF]),
            rng.randrange(2**32),
            path,
            0,
        )
        size = abi._SIZES[kind]
    else:
        body = head_task + struct.pack("<II", rng.randrange(2**32), 0)
        size = abi._SIZES.get(kind, 72)
    version = abi.ABI_VERSION if rng.random() < 0.9 else rng.choice([2, 4])
    data = HEADER.pack(kind, version, size, rng.randrange(2**64)) + body
    data = data.ljust(max(size, 0), b"\0")
    cut = rng.random()
    if cut < 0.05:
        data = data[: rng.randrange(len(data))]
    elif cut < 0.08:
        data += bytes(rng.randrange(1, 64))
    return data


def test_the_c_decoder_builds_what_the_python_decoder_builds_and_refuses_what_it_refuses() -> None:
    rng = random.Random(20261129)
    raw = [_random_record(rng) for _ in range(20_000)]
    raw += [
        exec_record(b"/usr/bin/curl", [b"curl", b"-s", b"https://example.org"]),
        exec_record(b"/bin/echo", [b"echo", b"", b"x"]),
        exec_record(b"/tmp/\xff", [b"\xfe"]),
        exec_record(b"x" * 255, [b"y" * 255], name_len=256),
        record(abi.EventType.EXIT, task(comm=b"x" * 16)),
        record(abi.EventType.FORK, task() + struct.pack("<II", 4242, 0)),
    ]
    decoded, refused = abi.decode_all(raw)
    expected: list[abi.KernelEvent] = []
    expected_refused: list[int] = []
    for i, one in enumerate(raw):
        try:
            expected.append(abi.decode(one))
        except abi.DecodeError:
            expected_refused.append(i)
    assert refused == expected_refused
    assert decoded == expected
    # The random records reach every kind and both outcomes.
    assert {type(ev) for ev in decoded} == {
        abi.Exec,
        abi.Fork,
        abi.Exit,
        abi.Connect,
        abi.Socket,
        abi.Unix,
    }
    assert len(refused) > 1000 and len(decoded) > 10_000
    # Types and enum members exactly, not merely equal values.
    for got, want in zip(decoded, expected, strict=True):
        assert type(got.task.comm) is str and type(got.ts_ns) is int
        if isinstance(got, abi.Exec):
            assert isinstance(want, abi.Exec)
            assert got.verdict is want.verdict and type(got.argv) is tuple
            assert type(got.args_truncated) is bool and type(got.args_missing) is bool


def test_the_c_decoder_takes_only_a_list_of_bytes() -> None:
    with pytest.raises(TypeError):
        abi.decode_all([bytearray(64)])  # type: ignore[list-item]
    assert abi.decode_all([]) == ([], [])


def test_the_reader_counts_a_record_it_cannot_decode_and_keeps_positions_with_records() -> None:
    good = record(abi.EventType.EXIT, task(pid=1))
    bad = exec_record(b"/bin/x", [], verdict=9)
    other = record(abi.EventType.FORK, task(pid=2) + struct.pack("<II", 3, 0))
    batch = decode([good, bad, other], [10, 20, 30], 30)
    assert [ev.task.pid for ev in batch.records] == [1, 2]
    assert (batch.errors, batch.ends, batch.cursor) == (1, [10, 30], 30)
    assert batch.settled == [None, None]
    clean = decode([good, other], [10, 30], 30)
    assert ([type(ev) for ev in clean.records], clean.errors, clean.ends) == (
        [abi.Exit, abi.Fork],
        0,
        [10, 30],
    )
    assert decode([good, bad], None, 20).ends is None


def test_the_c_decoder_builds_only_plain_slotted_classes_with_a_slot_per_field() -> None:
    from dataclasses import dataclass

    from sidecar.kernel import _records

    @dataclass(slots=True)
    class Checked:
        ts_ns: int
        task: abi.Task

        def __post_init__(self) -> None:  # would not run: refused
            raise AssertionError

    @dataclass(slots=True)
    class Short:
        ts_ns: int

    kinds = [abi.Task, abi.Exec, abi.Fork, abi.Exit, abi.Connect, abi.Socket, abi.Unix]
    rest = (abi._VERDICTS, abi._HOOKS, abi._address)
    assert _records.Decoder(*kinds, *rest) is not None  # positive control
    for bad in (Checked, Short, dict):
        with pytest.raises(TypeError, match="slot"):
            _records.Decoder(*kinds[:3], bad, *kinds[4:], *rest)


def test_reads_handed_over_undecoded_merge_in_order_and_decode_as_one() -> None:
    a = record(abi.EventType.EXIT, task(pid=1))
    b = exec_record(b"/bin/x", [], verdict=9)  # undecodable
    c = record(abi.EventType.FORK, task(pid=2) + struct.pack("<II", 3, 0))
    replayed = Batch([], [], [10, 20], 20, 0, [a, b])  # re-read after a restart: has ends
    fresh = Batch([], [], None, 30, 0, [c])
    merged = merge([replayed, fresh])
    assert (merged.raw, merged.ends, merged.cursor) == ([a, b, c], [10, 20, 1 << 64], 30)
    assert len(merged) == 3
    done = merged.decoded()
    assert [ev.task.pid for ev in done.records] == [1, 2]
    assert (done.errors, done.ends, done.cursor, done.raw) == (1, [10, 1 << 64], 30, None)
    assert done.decoded() is done
    # One reader makes either kind, never both; a mix is refused rather than misaligned.
    with pytest.raises(ValueError, match="undecoded"):
        merge([fresh, decode([a], None, 10)])
