"""The ctypes mirrors in sidecar/kernel/abi.py match bpf/include/events.h byte for byte."""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from sidecar.kernel import abi

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "events.h"


def _c_layout(tmp_path: Path) -> dict[str, int]:
    """Compile a tiny C program against events.h that prints sizes and offsets."""
    lines = [
        "#include <stdio.h>",
        "#include <stddef.h>",
        f'#include "{HEADER}"',
        "int main(void) {",
    ]
    for cname, mirror in abi.MIRRORS.items():
        lines.append(f'printf("{cname} %zu\\n", sizeof(struct {cname}));')
        for fname, *_ in mirror._fields_:
            lines.append(f'printf("{cname}.{fname} %zu\\n", offsetof(struct {cname}, {fname}));')
    for name in (
        "SIDECAR_ABI_VERSION",
        "SIDECAR_COMM_LEN",
        "SIDECAR_FILENAME_LEN",
        "SIDECAR_ARGS_LEN",
        "SIDECAR_ARG_MAX",
        "SIDECAR_MAX_ARGS",
        "SIDECAR_IDENTITY_PENDING",
        "SIDECAR_SETTING_ATTEST",
        "SIDECAR_EXEC_ARGS_TRUNCATED",
        "SIDECAR_EXEC_NO_ARGS",
        "SIDECAR_EXEC_FILE_CHANGED",
        "SIDECAR_EXEC_FILE_UNKNOWN",
        "SIDECAR_EXEC_PRIVILEGED",
        "SIDECAR_EXEC_UNTRACKED",
        "SIDECAR_POLICY_UNIX_RESTRICTED",
        "SIDECAR_UNIX_PATH_LEN",
        *(f"SIDECAR_EVENT_{t.name}" for t in abi.EventType),
        *(f"SIDECAR_HOOK_{h.name}" for h in abi.Hook),
        "SIDECAR_VERDICT_ALLOW",
        "SIDECAR_VERDICT_DENY",
        "SIDECAR_VERDICT_WOULD_DENY",
        "SIDECAR_SETTING_POLICY",
        "SIDECAR_POLICY_ENFORCE",
        "SIDECAR_POLICY_EGRESS_ANY",
        "SIDECAR_POLICY_EXEC_RESTRICTED",
        "SIDECAR_POLICY_LOG_ALLOWED",
        "SIDECAR_PROTO_TCP",
        "SIDECAR_PROTO_UDP",
        "SIDECAR_MAX_PORT_RULES",
        "SIDECAR_HEARTBEAT_STALE_NS",
    ):
        lines.append(f'printf("{name} %llu\\n", (unsigned long long){name});')
    lines.append("return 0; }")
    src = tmp_path / "layout.c"
    src.write_text("\n".join(lines))
    exe = tmp_path / "layout"
    subprocess.run(["cc", "-Wall", "-Werror", "-o", str(exe), str(src)], check=True)
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


@pytest.fixture(scope="module")
def c_layout(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    if shutil.which("cc") is None:
        pytest.fail("a C compiler (cc) is needed to check the ABI layout")
    return _c_layout(tmp_path_factory.mktemp("abi"))


@pytest.mark.parametrize("cname", sorted(abi.MIRRORS))
def test_ctypes_mirror_has_the_size_and_offsets_of_the_c_struct(
    c_layout: dict[str, int], cname: str
) -> None:
    mirror = abi.MIRRORS[cname]
    assert ctypes.sizeof(mirror) == c_layout[cname]
    for fname, *_ in mirror._fields_:
        assert getattr(mirror, fname).offset == c_layout[f"{cname}.{fname}"], fname


def test_python_constants_match_the_header(c_layout: dict[str, int]) -> None:
    assert c_layout["SIDECAR_ABI_VERSION"] == abi.ABI_VERSION
    assert c_layout["SIDECAR_COMM_LEN"] == abi.COMM_LEN
    assert c_layout["SIDECAR_FILENAME_LEN"] == abi.FILENAME_LEN
    assert c_layout["SIDECAR_ARGS_LEN"] == abi.ARGS_LEN
    assert c_layout["SIDECAR_ARG_MAX"] == abi.ARG_MAX
    assert c_layout["SIDECAR_MAX_ARGS"] == abi.MAX_ARGS
    assert c_layout["SIDECAR_IDENTITY_PENDING"] == abi.IDENTITY_PENDING
    assert c_layout["SIDECAR_SETTING_ATTEST"] == abi.SETTING_ATTEST
    assert c_layout["SIDECAR_EXEC_ARGS_TRUNCATED"] == abi.EXEC_ARGS_TRUNCATED
    assert c_layout["SIDECAR_EXEC_NO_ARGS"] == abi.EXEC_NO_ARGS
    for t in abi.EventType:
        assert c_layout[f"SIDECAR_EVENT_{t.name}"] == t.value
    for v in abi.Verdict:
        assert c_layout[f"SIDECAR_VERDICT_{v.name}"] == v.value
    for h in abi.Hook:
        assert c_layout[f"SIDECAR_HOOK_{h.name}"] == h.value
    assert c_layout["SIDECAR_EXEC_FILE_CHANGED"] == abi.EXEC_FILE_CHANGED
    assert c_layout["SIDECAR_EXEC_FILE_UNKNOWN"] == abi.EXEC_FILE_UNKNOWN
    assert c_layout["SIDECAR_EXEC_PRIVILEGED"] == abi.EXEC_PRIVILEGED
    assert c_layout["SIDECAR_EXEC_UNTRACKED"] == abi.EXEC_UNTRACKED
    assert c_layout["SIDECAR_POLICY_UNIX_RESTRICTED"] == abi.POLICY_UNIX_RESTRICTED
    assert c_layout["SIDECAR_UNIX_PATH_LEN"] == abi.UNIX_PATH_LEN
    assert c_layout["SIDECAR_SETTING_POLICY"] == abi.SETTING_POLICY
    assert c_layout["SIDECAR_POLICY_ENFORCE"] == abi.POLICY_ENFORCE
    assert c_layout["SIDECAR_POLICY_EGRESS_ANY"] == abi.POLICY_EGRESS_ANY
    assert c_layout["SIDECAR_POLICY_EXEC_RESTRICTED"] == abi.POLICY_EXEC_RESTRICTED
    assert c_layout["SIDECAR_POLICY_LOG_ALLOWED"] == abi.POLICY_LOG_ALLOWED
    assert c_layout["SIDECAR_PROTO_TCP"] == abi.PROTO_TCP
    assert c_layout["SIDECAR_PROTO_UDP"] == abi.PROTO_UDP
    assert c_layout["SIDECAR_MAX_PORT_RULES"] == abi.MAX_PORT_RULES
    assert c_layout["SIDECAR_HEARTBEAT_STALE_NS"] == abi.HEARTBEAT_STALE_NS


def _connect_record(**over: int) -> bytes:
    rec = abi.ConnectEvent()
    rec.hdr.type = abi.EventType.CONNECT
    rec.hdr.version = abi.ABI_VERSION
    rec.hdr.size = ctypes.sizeof(rec)
    rec.task.pid = 42
    rec.family = abi.AF_INET
    rec.protocol = abi.IPPROTO_TCP
    rec.hook = abi.Hook.CONNECT4
    rec.verdict = abi.Verdict.DENY
    rec.dport = 443
    rec.daddr[:] = list(bytes(10) + b"\xff\xff" + bytes([10, 1, 2, 3]))
    for k, v in over.items():
        setattr(rec, k, v)
    return bytes(rec)


def test_decode_maps_an_ipv4_mapped_address_back_to_ipv4() -> None:
    ev = abi.decode(_connect_record())
    assert isinstance(ev, abi.Connect)
    assert str(ev.address) == "10.1.2.3"
    assert (ev.task.pid, ev.port, ev.verdict) == (42, 443, abi.Verdict.DENY)


def test_decode_reads_nul_separated_argv_in_full() -> None:
    rec = abi.ExecEvent()
    rec.hdr.type, rec.hdr.version, rec.hdr.size = (
        abi.EventType.EXEC,
        abi.ABI_VERSION,
        ctypes.sizeof(rec),
    )
    rec.verdict = abi.Verdict.ALLOW
    args = b"/bin/echo\0hello\0world\0"
    rec.args[: len(args)] = list(args)
    rec.args_len, rec.args_count = len(args), 3
    rec.filename = b"/bin/echo"
    rec.filename_len = len(b"/bin/echo") + 1  # what bpf_probe_read_kernel_str returns
    ev = abi.decode(bytes(rec))
    assert isinstance(ev, abi.Exec)
    assert ev.argv == ("/bin/echo", "hello", "world")
    assert ev.filename == "/bin/echo"


@pytest.mark.parametrize(
    "mutate, message",
    [
        (lambda b: b[:8], "shorter than its header"),
        (lambda b: b[:2] + (9).to_bytes(2, "little") + b[4:], "ABI version 9"),
        (lambda b: (77).to_bytes(2, "little") + b[2:], "unknown type 77"),
        (lambda b: b[:-4], "expected"),
    ],
)
def test_decode_rejects_malformed_records(mutate, message) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(abi.DecodeError, match=message):
        abi.decode(mutate(_connect_record()))


def test_decode_rejects_an_unknown_verdict() -> None:
    with pytest.raises(abi.DecodeError, match="unknown verdict 9"):
        abi.decode(_connect_record(verdict=9))


def test_policy_maps_hold_two_generations_of_the_largest_valid_policy() -> None:
    from sidecar.policy import model

    assert abi.POLICIES_MAX >= 2 * (model.MAX_IDENTITIES + 2)
    assert abi.EGRESS_MAX >= 2 * model.MAX_CIDRS_TOTAL
    assert abi.EXEC_ALLOW_MAX >= 2 * model.MAX_EXEC_TOTAL
    assert abi.SOCKET_ALLOW_MAX >= 2 * model.MAX_SOCKETS_TOTAL
    assert abi.UNIX_ALLOW_MAX >= 2 * model.MAX_UNIX_TOTAL
    assert model.UNIX_PATH_BYTES == abi.UNIX_PATH_LEN


def test_the_loader_passes_every_map_size_the_programs_need() -> None:
    maps_h = (HEADER.parents[1] / "maps.h").read_text()
    loader = (HEADER.parents[2] / "sidecar" / "kernel" / "loader.py").read_text()
    for name in (
        "POLICIES_MAX",
        "EGRESS_MAX",
        "EXEC_ALLOW_MAX",
        "SOCKET_ALLOW_MAX",
        "UNIX_ALLOW_MAX",
    ):
        assert f"#define {name}" not in maps_h  # no second, silent default
        assert f'f"-D{name}={{abi.{name}}}"' in loader
