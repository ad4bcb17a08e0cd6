"""The ctypes mirrors in sidecar/kernel/abi.py match bpf/include/events.h byte for byte.

And every constant: each SIDECAR_* of events.h (and of maps.h) has its Python
value, each limit in sidecar/kernel/limits.py reaches C, and every map in
bpf/maps.h is sized from Python through the loader's -D flags.
"""

from __future__ import annotations

import ctypes
import enum
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from sidecar.kernel import abi, limits
from sidecar.kernel.loader import LoadOptions, build_cflags
from sidecar.kernel.maps import DELIVERED
from sidecar.policy import space
from sidecar.policy.compiled import MAX_RULES_PER_PREFIX

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "events.h"
MAPS_H = HEADER.parents[1] / "maps.h"


def _header_constants(path: Path) -> list[str]:
    """Every SIDECAR_* constant a header defines: #define'd values and enum members."""
    text = path.read_text()
    names = re.findall(r"^#define[ \t]+(SIDECAR_\w+)[ \t]+\S", text, re.M)  # not the guard
    names += re.findall(r"^\s*(SIDECAR_\w+)\s*=", text, re.M)
    return names


def _c_layout(tmp_path: Path) -> dict[str, int]:
    """Compile a tiny C program against events.h that prints sizes, offsets and constants."""
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
    names = {
        *_header_constants(HEADER),
        # Every Python enum member, so one missing from the header fails to compile.
        *(f"SIDECAR_EVENT_{t.name}" for t in abi.EventType),
        *(f"SIDECAR_VERDICT_{v.name}" for v in abi.Verdict),
        *(f"SIDECAR_HOOK_{h.name}" for h in abi.Hook),
    }
    for name in sorted(names):
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


_ENUMS: dict[str, type[enum.IntEnum]] = {
    "EVENT_": abi.EventType,
    "VERDICT_": abi.Verdict,
    "HOOK_": abi.Hook,
}


def _python_value(cname: str) -> int | None:
    """The Python counterpart of SIDECAR_<NAME>: abi.<NAME> (limits re-exported) or an enum."""
    name = cname.removeprefix("SIDECAR_")
    for prefix, members in _ENUMS.items():
        if name.startswith(prefix):
            member = members.__members__.get(name.removeprefix(prefix))
            return None if member is None else int(member)
    value = getattr(abi, name, None)
    return value if isinstance(value, int) else None


def test_every_header_constant_has_the_python_value(c_layout: dict[str, int]) -> None:
    names = _header_constants(HEADER)
    assert len(names) > 40  # the parse found the header's constants, not nothing
    missing = [n for n in names if _python_value(n) is None]
    assert not missing, f"events.h constants with no Python counterpart in abi/limits: {missing}"
    differ = {n: (c_layout[n], _python_value(n)) for n in names if c_layout[n] != _python_value(n)}
    assert not differ, f"C value, Python value: {differ}"


# Limits that are Python's alone: derived from a header constant, or bounds of
# configuration (the sizes themselves reach C as -D flags).
_PYTHON_ONLY_LIMITS = {
    "EXEC_PATH_MAX_BYTES",
    "PROCS_MAX_DEFAULT",
    "PROCS_MAX_RANGE",
    "RINGBUF_PAGES_DEFAULT",
    "RINGBUF_PAGES_MAX",
    "RINGBUF_PAGE_BYTES",
}


def test_every_limit_reaches_c_as_a_header_constant_or_a_map_size(
    c_layout: dict[str, int],
) -> None:
    sizes = _options().map_sizes()
    public = {n for n in vars(limits) if n.isupper()}
    assert public - _PYTHON_ONLY_LIMITS, "the parse found limits"
    for name in sorted(public - _PYTHON_ONLY_LIMITS):
        value = getattr(limits, name)
        assert getattr(abi, name) == value, f"abi.{name} is not limits.{name}"
        if f"SIDECAR_{name}" in c_layout:
            assert c_layout[f"SIDECAR_{name}"] == value, name
        else:
            assert sizes.get(name) == value, f"limits.{name} reaches C neither way"
    assert c_layout["SIDECAR_FILENAME_LEN"] - 1 == limits.EXEC_PATH_MAX_BYTES


def test_lpm_prefix_base_counts_the_key_bits_before_the_address(c_layout: dict[str, int]) -> None:
    for key, field in (("egress_key", "addr"), ("unix_key", "path")):
        before = c_layout[f"{key}.{field}"] - c_layout[f"{key}.gen"]
        assert before * 8 == abi.LPM_PREFIX_BASE, key
    assert abi.EgressKey.addr.size * 8 == space.ADDRESS_BITS


def test_port_rule_fields_hold_the_policy_limits() -> None:
    from sidecar.policy import model

    assert abi.PortRule.rule.size == 2 and abi.RULE_NUMBER_MAX == 0xFFFF
    assert model.MAX_RULES_PER_IDENTITY <= abi.RULE_NUMBER_MAX  # numbered 1.., 0 = default
    assert max(model.PROTOCOL_BITS.values()) < 1 << (8 * abi.PortRule.protocols.size)
    assert set(model.PROTOCOL_BITS.values()) == {abi.PROTO_TCP, abi.PROTO_UDP}
    assert MAX_RULES_PER_PREFIX == abi.MAX_PORT_RULES


# UAPI values maps.h spells out for the programs (BCC has no libc headers),
# with the Python value each must equal.
def _maps_h_mirrors() -> dict[str, int]:
    from sidecar.policy import model

    return {
        "SIDECAR_AF_INET": abi.AF_INET,
        "SIDECAR_AF_INET6": abi.AF_INET6,
        "SIDECAR_IPPROTO_TCP": abi.IPPROTO_TCP,
        "SIDECAR_IPPROTO_UDP": abi.IPPROTO_UDP,
        "SIDECAR_SOCK_STREAM": model.SOCKET_TYPES["stream"],
        "SIDECAR_SOCK_DGRAM": model.SOCKET_TYPES["dgram"],
        "SIDECAR_SIGKILL": int(signal.SIGKILL),
    }


# maps.h constants only the programs use (socket options they refuse, clone
# flags, ring buffer wake-up flags): no Python counterpart to drift from.
_MAPS_H_C_ONLY = {
    "SIDECAR_SOL_IP",
    "SIDECAR_IP_OPTIONS",
    "SIDECAR_SOL_IPV6",
    "SIDECAR_IPV6_2292RTHDR",
    "SIDECAR_IPV6_RTHDR",
    "SIDECAR_CLONE_VFORK",
    "SIDECAR_CLONE_THREAD",
    "SIDECAR_RB_NO_WAKEUP",
    "SIDECAR_RB_FORCE_WAKEUP",
}


def test_maps_h_constants_match_python_or_are_the_programs_own() -> None:
    from sidecar.policy import model

    text = MAPS_H.read_text()
    found = dict(re.findall(r"^#define[ \t]+(SIDECAR_\w+)[ \t]+(\w+)", text, re.M))
    mirrors = _maps_h_mirrors()
    assert set(found) == set(mirrors) | _MAPS_H_C_ONLY
    for name, want in mirrors.items():
        assert int(found[name].rstrip("ULul"), 0) == want, name
    # The policy's socket names are the same numbers.
    assert model.SOCKET_FAMILIES == {"inet": abi.AF_INET, "inet6": abi.AF_INET6}
    assert (model.SOCKET_PROTOCOLS["tcp"], model.SOCKET_PROTOCOLS["udp"]) == (
        abi.IPPROTO_TCP,
        abi.IPPROTO_UDP,
    )


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
    assert max(abi.EventType) < abi.EVENT_TYPE_SLOTS  # lost counters are indexed by type


def _options(**over: int) -> LoadOptions:
    return LoadOptions(
        pin_dir=Path("/sys/fs/bpf/sidecar-test"),
        scope=Path("/sys/fs/cgroup/test"),
        tracefs=Path("/nonexistent/tracefs"),
        **over,  # type: ignore[arg-type]
    )


def _preprocess_maps_h(tmp_path: Path, cflags: list[str]) -> subprocess.CompletedProcess[str]:
    """maps.h through the C preprocessor, with BCC's map macros reduced to name and size."""
    stub = tmp_path / "uapi" / "linux"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "ptrace.h").write_text("")
    prelude = tmp_path / "prelude.h"
    prelude.write_text(
        "#define BPF_TABLE_PINNED(type, k, v, name, size, ...) MAP name size\n"
        "#define BPF_PERCPU_ARRAY(name, v, size) MAP name size\n"
    )
    return subprocess.run(
        ["cc", "-E", "-P", f"-I{tmp_path}", "-include", str(prelude), *cflags, str(MAPS_H)],
        capture_output=True,
        text=True,
    )


def _c_map_sizes(out: str) -> dict[str, int]:
    sizes = {n: int(v, 0) for n, v in re.findall(r"\bMAP (\w+) (\w+)", out)}
    for name, size in re.findall(r"struct \w+_table_t (\w+) = \{\s*\.max_entries = (\w+)", out):
        sizes[name] = int(size, 0)
    return sizes


# Which -D flag sizes each map of maps.h; None: one entry by design.
_MAP_SIZED_BY = {
    "procs": "PROCS_MAX",
    "scope": None,
    "settings": None,
    "policies": "POLICIES_MAX",
    "egress": "EGRESS_MAX",
    "exec_allow": "EXEC_ALLOW_MAX",
    "socket_allow": "SOCKET_ALLOW_MAX",
    "unix_allow": "UNIX_ALLOW_MAX",
    "events": "RINGBUF_BYTES",
    "exec_scratch": None,
    "handled": None,
    "lost": "EVENT_TYPE_SLOTS",
    "lost_reported": "EVENT_TYPE_SLOTS",
    "delivered": "DELIVERED_SLOTS",
}


def test_the_loader_passes_python_s_map_sizes() -> None:
    options = _options(procs_max=8192, ringbuf_pages=64)  # not the defaults: nothing hides
    assert options.map_sizes() == {
        "PROCS_MAX": 8192,
        "RINGBUF_BYTES": 64 * abi.RINGBUF_PAGE_BYTES,
        "POLICIES_MAX": abi.POLICIES_MAX,
        "EGRESS_MAX": abi.EGRESS_MAX,
        "EXEC_ALLOW_MAX": abi.EXEC_ALLOW_MAX,
        "SOCKET_ALLOW_MAX": abi.SOCKET_ALLOW_MAX,
        "UNIX_ALLOW_MAX": abi.UNIX_ALLOW_MAX,
        "EVENT_TYPE_SLOTS": abi.EVENT_TYPE_SLOTS,
        "DELIVERED_SLOTS": len(DELIVERED),
    }
    cflags = build_cflags(options, Path("/sys/fs/bpf/t"), HEADER.parents[1], [])
    for name, size in options.map_sizes().items():
        assert f"-D{name}={size}" in cflags


def test_every_map_in_maps_h_takes_its_size_from_the_loader(tmp_path: Path) -> None:
    """Each map's max_entries is its -D flag, never a literal that equals it today."""
    if shutil.which("cc") is None:
        pytest.fail("a C compiler (cc) is needed to check the map sizes")
    sizes = _options().map_sizes()
    canary = {name: 1000 + i for i, name in enumerate(sorted(sizes))}
    cflags = [
        f
        for f in build_cflags(_options(), Path("/sys/fs/bpf/t"), HEADER.parents[1], [])
        if not any(f.startswith(f"-D{name}=") for name in sizes)
    ]
    cflags += [f"-D{name}={value}" for name, value in canary.items()]
    offsets = re.findall(r"defined\((SIDECAR_OFF_\w+)\)", MAPS_H.read_text())
    got = _preprocess_maps_h(tmp_path, [*cflags, *(f"-D{name}=0" for name in offsets)])
    assert got.returncode == 0, got.stderr
    assert _c_map_sizes(got.stdout) == {
        m: 1 if flag is None else canary[flag] for m, flag in _MAP_SIZED_BY.items()
    }
    assert {f for f in _MAP_SIZED_BY.values() if f} == set(sizes)


@pytest.mark.parametrize("size", sorted(_options().map_sizes()))
def test_maps_h_refuses_to_build_without_a_size_from_the_loader(tmp_path: Path, size: str) -> None:
    cflags = build_cflags(_options(), Path("/sys/fs/bpf/t"), HEADER.parents[1], [])
    got = _preprocess_maps_h(tmp_path, [f for f in cflags if not f.startswith(f"-D{size}=")])
    assert got.returncode != 0
    assert "the loader passes every map size" in got.stderr
