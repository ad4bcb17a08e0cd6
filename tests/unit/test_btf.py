"""sidecar.kernel.btf reads member offsets out of BTF correctly.

Synthetic blobs, built here byte by byte, pin down each rule of the format
(kind trailers, anonymous members, typedef chains, FWD vs definition,
kind_flag bitfields).  The running kernel's /sys/kernel/btf/vmlinux is then
checked for plausibility and against an independent reader (bpftool, else
pahole) where one is installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import struct
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sidecar.kernel.btf import Btf, cached_kernel_offsets, kernel_offset_cflags, kernel_offsets
from sidecar.util.errors import KernelError

VMLINUX = Path("/sys/kernel/btf/vmlinux")

INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST = range(1, 11)
RESTRICT, FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(11, 20)

OFFSET_NAMES = {
    "SIDECAR_OFF_TASK_MM",
    "SIDECAR_OFF_TASK_CRED",
    "SIDECAR_OFF_MM_EXE_FILE",
    "SIDECAR_OFF_FILE_INODE",
    "SIDECAR_OFF_INODE_INO",
    "SIDECAR_OFF_INODE_SB",
    "SIDECAR_OFF_SB_DEV",
    "SIDECAR_OFF_INODE_CTIME_SEC",
    "SIDECAR_OFF_INODE_CTIME_NSEC",
    "SIDECAR_OFF_CRED_CAP_EFFECTIVE",
    "SIDECAR_OFF_TASK_REAL_PARENT",
    "SIDECAR_OFF_TASK_TGID",
    "SIDECAR_OFF_TASK_START_BOOTTIME",
    "SIDECAR_OFF_CRED_USER_NS",
    "SIDECAR_OFF_USER_NS_LEVEL",
}


# --------------------------------------------------------------- blob builder


@dataclass
class Blob:
    """Writes a BTF blob: header, type section, string section.  Ids count from 1."""

    types: bytearray = field(default_factory=bytearray)
    strings: bytearray = field(default_factory=lambda: bytearray(b"\0"))
    next_id: int = 1
    hdr_pad: int = 0  # extra header bytes, as newer kernels write

    def name(self, text: str) -> int:
        if not text:
            return 0
        off = len(self.strings)
        self.strings += text.encode() + b"\0"
        return off

    def add(
        self,
        kind: int,
        name: str,
        size_or_type: int,
        vlen: int = 0,
        kflag: int = 0,
        extra: bytes = b"",
    ) -> int:
        info = (kflag << 31) | (kind << 24) | vlen
        self.types += struct.pack("<III", self.name(name), info, size_or_type) + extra
        self.next_id += 1
        return self.next_id - 1

    def int_(self, name: str, size: int, nr_bits: int | None = None, bit_off: int = 0) -> int:
        bits = size * 8 if nr_bits is None else nr_bits
        return self.add(INT, name, size, extra=struct.pack("<I", (bit_off << 16) | bits))

    def ptr(self, target: int = 0) -> int:
        return self.add(PTR, "", target)

    def array(self, elem: int, index: int, nelems: int) -> int:
        return self.add(ARRAY, "", 0, extra=struct.pack("<III", elem, index, nelems))

    def typedef(self, name: str, target: int) -> int:
        return self.add(TYPEDEF, name, target)

    def composite(
        self,
        name: str,
        size: int,
        members: list[tuple[str, int, int]],
        kind: int = STRUCT,
        kflag: int = 0,
    ) -> int:
        """members: (name, type id, raw offset word: bits, or bitfield_size << 24 | bits)."""
        extra = b"".join(struct.pack("<III", self.name(n), t, off) for n, t, off in members)
        return self.add(kind, name, size, vlen=len(members), kflag=kflag, extra=extra)

    def bytes(self) -> bytes:
        hdr_len = 24 + self.hdr_pad
        header = struct.pack(
            "<HBBIIIII",
            0xEB9F,
            1,
            0,
            hdr_len,
            0,
            len(self.types),
            len(self.types),
            len(self.strings),
        )
        return header + b"\0" * self.hdr_pad + bytes(self.types) + bytes(self.strings)

    def btf(self) -> Btf:
        return Btf.from_bytes(self.bytes(), source="synthetic")


def every_other_kind(b: Blob, u32: int) -> None:
    """One type of each kind with a trailer, so a wrong trailer size shifts what follows."""
    b.add(ENUM, "colour", 4, vlen=3, extra=struct.pack("<6I", 0, 0, 0, 1, 0, 2))
    b.add(FUNC_PROTO, "", u32, vlen=2, extra=struct.pack("<4I", 0, u32, 0, u32))
    fn = b.add(FUNC, "do_thing", 0)
    var = b.add(VAR, "counter", u32, extra=struct.pack("<I", 1))
    b.add(DATASEC, ".data", 4, vlen=1, extra=struct.pack("<3I", var, 0, 4))
    b.add(DECL_TAG, "tag", fn, extra=struct.pack("<I", 0xFFFFFFFF))
    b.add(ENUM64, "big", 8, vlen=2, extra=struct.pack("<6I", 0, 1, 0, 0, 2, 0))
    b.add(FLOAT, "double", 8)
    b.add(FWD, "somewhere", 0)
    b.add(VOLATILE, "", u32)
    b.add(RESTRICT, "", b.ptr(u32))
    b.add(TYPE_TAG, "user", u32)


# ------------------------------------------------------------ synthetic tests


def test_anonymous_union_and_struct_offsets_add_up() -> None:
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long long unsigned int", 8)
    every_other_kind(b, u32)
    inner = b.composite("", 8, [("y", u32, 0), ("z", u32, 32)])
    anon_union = b.composite("", 8, [("x", u64, 0), ("", inner, 0)], kind=UNION)
    b.composite("outer", 24, [("a", u32, 0), ("", anon_union, 64), ("tail", u64, 128)])
    btf = b.btf()
    assert btf.type_count == b.next_id - 1
    assert btf.member_offset("outer", "a") == 0
    assert btf.member_offset("outer", "x") == 8
    assert btf.member_offset("outer", "y") == 8
    assert btf.member_offset("outer", "z") == 12  # 8 (union) + 0 (struct) + 4
    assert btf.member_offset("outer", "tail") == 16
    assert btf.member_size("outer", "z") == 4
    assert btf.member_size("outer", "x") == 8
    assert btf.has_member("outer", "z")
    assert not btf.has_member("outer", "w")


def test_dotted_path_descends_through_typedef_and_const() -> None:
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long long unsigned int", 8)
    inner = b.composite("inner", 16, [("a", u32, 0), ("b", u64, 64)])
    inner_t = b.typedef("inner_t", inner)
    const_inner = b.add(CONST, "", inner_t)
    vol = b.add(VOLATILE, "", const_inner)
    b.composite("holder", 40, [("pad", u64, 0), ("in", const_inner, 128), ("v", vol, 256)])
    btf = b.btf()
    assert btf.member_offset("holder", "in") == 16
    assert btf.member_offset("holder", "in.a") == 16
    assert btf.member_offset("holder", "in.b") == 24
    assert btf.member_offset("holder", "v.b") == 40
    assert btf.member_size("holder", "in") == 16
    assert btf.member_size("holder", "in.b") == 8
    with pytest.raises(KernelError, match=r"member 'pad' is not a struct or union"):
        btf.member_offset("holder", "pad.x")
    with pytest.raises(KernelError, match=r"struct holder has no member 'in\.c'"):
        btf.member_offset("holder", "in.c")
    assert not btf.has_member("holder", "in.c")
    assert not btf.has_member("holder", "pad.x")


def test_fwd_and_empty_declarations_give_way_to_the_definition() -> None:
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    b.add(FWD, "thing", 0)
    b.composite("thing", 0, [])  # an empty declaration does not count either
    b.composite("thing", 16, [("pad", u32, 0), ("v", u32, 64)])
    b.composite("thing", 8, [("v", u32, 0)])  # a later duplicate: the first definition wins
    b.add(FWD, "only_declared", 0)
    btf = b.btf()
    assert btf.member_offset("thing", "v") == 8
    with pytest.raises(KernelError, match=r"only_declared is only forward-declared"):
        btf.member_offset("only_declared", "x")
    with pytest.raises(KernelError, match=r"no struct or union named 'nowhere'"):
        btf.has_member("nowhere", "x")


def test_union_is_looked_up_by_name_too() -> None:
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long long unsigned int", 8)
    b.composite("either", 8, [("small", u32, 0), ("big", u64, 0)], kind=UNION)
    btf = b.btf()
    assert btf.member_offset("either", "big") == 0
    assert btf.member_size("either", "big") == 8


def test_kind_flag_bitfields_raise_and_plain_members_decode() -> None:
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long long unsigned int", 8)
    b.composite(
        "flags",
        24,
        [("lo", u32, (3 << 24) | 0), ("hi", u32, (5 << 24) | 3), ("whole", u64, 64)],
        kflag=1,
    )
    btf = b.btf()
    # With kind_flag the high byte is the bitfield size, not part of the offset.
    assert btf.member_offset("flags", "whole") == 8
    assert btf.has_member("flags", "hi")
    with pytest.raises(KernelError, match=r"struct flags member 'hi' is a bitfield"):
        btf.member_offset("flags", "hi")
    with pytest.raises(KernelError, match=r"bitfield"):
        btf.member_size("flags", "lo")


def test_int_encoded_bitfields_and_unaligned_members_raise() -> None:
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    three_bits = b.int_("unsigned int", 4, nr_bits=3)
    b.composite("old", 8, [("f", three_bits, 0), ("odd", u32, 12), ("ok", u32, 32)])
    btf = b.btf()
    with pytest.raises(KernelError, match=r"'f' is a bitfield"):
        btf.member_offset("old", "f")
    with pytest.raises(KernelError, match=r"'odd' is at bit 12, not on a byte boundary"):
        btf.member_offset("old", "odd")
    assert btf.member_offset("old", "ok") == 4


def test_member_sizes_of_arrays_pointers_enums() -> None:
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    idx = b.int_("int", 4)
    pair = b.array(u32, idx, 2)
    grid = b.array(pair, idx, 3)
    colour = b.add(ENUM, "colour", 4, vlen=1, extra=struct.pack("<2I", 0, 0))
    cap = b.composite("kernel_cap_struct", 8, [("cap", pair, 0)])
    cap_t = b.typedef("kernel_cap_t", cap)
    b.composite(
        "misc",
        48,
        [("p", b.ptr(0), 0), ("grid", grid, 64), ("c", colour, 256), ("cap", cap_t, 320)],
    )
    btf = b.btf()
    assert btf.member_size("misc", "p") == 8
    assert btf.member_size("misc", "grid") == 24
    assert btf.member_size("misc", "c") == 4
    assert btf.member_size("misc", "cap") == 8
    assert btf.member_size("misc", "cap.cap") == 8
    assert btf.member_offset("misc", "cap.cap") == 40


def test_missing_member_names_struct_member_and_file(tmp_path: Path) -> None:
    b = Blob()
    b.composite("task_struct", 8, [("mm", b.ptr(0), 0)])
    path = tmp_path / "vmlinux"
    path.write_bytes(b.bytes())
    btf = Btf.load(path)
    assert btf.member_offset("task_struct", "mm") == 0
    with pytest.raises(KernelError) as err:
        btf.member_offset("task_struct", "mmm")
    assert str(err.value) == f"BTF of {path}: struct task_struct has no member 'mmm'"
    with pytest.raises(KernelError, match=r"not a member path"):
        btf.member_offset("task_struct", "mm.")


def test_missing_file_says_config_debug_info_btf(tmp_path: Path) -> None:
    with pytest.raises(KernelError, match=r"BTF is missing.*CONFIG_DEBUG_INFO_BTF"):
        Btf.load(tmp_path / "absent")


def test_load_caches_per_path_until_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "btf"
    b = Blob()
    b.composite("s", 4, [("a", b.int_("int", 4), 0)])
    path.write_bytes(b.bytes())
    first = Btf.load(path)
    assert Btf.load(path) is first
    b.composite("t", 8, [("b", b.int_("long", 8), 0)])
    path.write_bytes(b.bytes())  # a new size, so a new key
    second = Btf.load(path)
    assert second is not first
    assert second.member_offset("t", "b") == 0


def test_unknown_kind_raises() -> None:
    b = Blob()
    b.int_("int", 4)
    b.add(25, "mystery", 0)
    with pytest.raises(KernelError, match=r"type id 2 has unknown kind 25"):
        b.btf()
    unkn = Blob()
    unkn.add(0, "", 0)
    with pytest.raises(KernelError, match=r"unknown kind 0"):
        unkn.btf()


def test_malformed_blobs_raise() -> None:
    with pytest.raises(KernelError, match=r"bad magic"):
        Btf.from_bytes(b"\x00" * 32)
    with pytest.raises(KernelError, match=r"too short"):
        Btf.from_bytes(b"\x9f\xeb\x01")
    b = Blob()
    b.composite("s", 8, [("a", b.int_("int", 4), 0)])
    data = bytearray(b.bytes())
    struct.pack_into("<I", data, 12, len(b.types) - 4)  # type_len cuts the struct's member
    with pytest.raises(KernelError, match=r"runs past the type section"):
        Btf.from_bytes(bytes(data))


def test_longer_header_is_skipped() -> None:
    b = Blob(hdr_pad=8)
    b.composite("s", 16, [("a", b.int_("int", 4), 0), ("b", b.int_("long", 8), 64)])
    assert b.btf().member_offset("s", "b") == 8


# ------------------------------------------------- kernel_offsets, synthetic


def fake_kernel(ctime: str, cap_as_array: bool = False, tgid_size: int = 4) -> bytes:
    """A BTF blob with just the structs kernel_offsets reads, at known offsets."""
    b = Blob()
    u32 = b.int_("unsigned int", 4)
    u64 = b.int_("long long unsigned int", 8)
    ulong = b.int_("long unsigned int", 8)
    sint = b.int_("int", tgid_size)
    slong = b.int_("long int", 8)
    pid_t = b.typedef("pid_t", b.typedef("__kernel_pid_t", sint))
    dev_t = b.typedef("dev_t", b.typedef("__kernel_dev_t", u32))
    time64 = b.typedef("time64_t", b.int_("long long int", 8))
    ts64 = b.composite("timespec64", 16, [("tv_sec", time64, 0), ("tv_nsec", slong, 64)])
    if cap_as_array:
        cap = b.composite("kernel_cap_struct", 8, [("cap", b.array(u32, u32, 2), 0)])
    else:
        cap = b.composite("", 8, [("val", u64, 0)])
    cap_t = b.typedef("kernel_cap_t", cap)
    vp = b.ptr(0)
    b.add(FWD, "task_struct", 0)
    b.composite(
        "task_struct",
        3000,
        [
            ("mm", vp, 8 * 1136),
            ("tgid", pid_t, 8 * 1268),
            ("real_parent", vp, 8 * 1280),
            ("start_boottime", u64, 8 * 1672),
            ("cred", vp, 8 * 1736),
        ],
    )
    anon = b.composite("", 1000, [("pad", u64, 0), ("exe_file", vp, 8 * 896)])
    b.composite("mm_struct", 1472, [("", anon, 8 * 64), ("cpu_bitmap", ulong, 8 * 1464)])
    b.composite("file", 200, [("f_mode", u32, 0), ("f_inode", vp, 8 * 32)])
    b.composite("super_block", 1000, [("s_list", u64, 0), ("s_dev", dev_t, 8 * 16)])
    b.composite(
        "cred",
        200,
        [("usage", u32, 0), ("cap_effective", cap_t, 8 * 64), ("user_ns", vp, 8 * 144)],
    )
    b.composite("user_namespace", 300, [("ns", u64, 0), ("level", u32, 8 * 200)])
    inode = [("i_sb", vp, 8 * 40), ("i_ino", ulong, 8 * 64)]
    if ctime == "split":
        inode += [("i_ctime_sec", time64, 8 * 104), ("i_ctime_nsec", u32, 8 * 120)]
    elif ctime == "private":
        inode += [("__i_ctime", ts64, 8 * 96)]
    elif ctime == "public":
        inode += [("i_ctime", ts64, 8 * 112)]
    b.composite("inode", 616, inode)
    return b.bytes()


@pytest.mark.parametrize(
    ("ctime", "sec", "nsec"),
    [("split", 104, 120), ("private", 96, 104), ("public", 112, 120)],
)
def test_kernel_offsets_on_each_ctime_layout(ctime: str, sec: int, nsec: int) -> None:
    btf = Btf.from_bytes(fake_kernel(ctime, cap_as_array=ctime == "public"))
    offsets = kernel_offsets(btf)
    assert offsets == {
        "SIDECAR_OFF_TASK_MM": 1136,
        "SIDECAR_OFF_TASK_CRED": 1736,
        "SIDECAR_OFF_TASK_REAL_PARENT": 1280,
        "SIDECAR_OFF_TASK_TGID": 1268,
        "SIDECAR_OFF_TASK_START_BOOTTIME": 1672,
        "SIDECAR_OFF_MM_EXE_FILE": 64 + 896,
        "SIDECAR_OFF_FILE_INODE": 32,
        "SIDECAR_OFF_INODE_SB": 40,
        "SIDECAR_OFF_INODE_INO": 64,
        "SIDECAR_OFF_SB_DEV": 16,
        "SIDECAR_OFF_CRED_CAP_EFFECTIVE": 64,
        "SIDECAR_OFF_CRED_USER_NS": 144,
        "SIDECAR_OFF_USER_NS_LEVEL": 200,
        "SIDECAR_OFF_INODE_CTIME_SEC": sec,
        "SIDECAR_OFF_INODE_CTIME_NSEC": nsec,
    }
    flags = kernel_offset_cflags(btf)
    assert flags == sorted(flags)
    assert flags[0] == "-DSIDECAR_OFF_CRED_CAP_EFFECTIVE=64"
    assert f"-DSIDECAR_OFF_INODE_CTIME_NSEC={nsec}" in flags
    assert len(flags) == len(OFFSET_NAMES)


def test_kernel_offsets_refuse_unknown_layouts() -> None:
    with pytest.raises(KernelError, match=r"struct inode has none of i_ctime_sec"):
        kernel_offsets(Btf.from_bytes(fake_kernel("none")))
    with pytest.raises(KernelError, match=r"member 'tgid' is 8 bytes, the BPF programs read 4"):
        kernel_offsets(Btf.from_bytes(fake_kernel("split", tgid_size=8)))


# ------------------------------------------------------------ offsets cache


def _kernel_file(tmp_path: Path, ctime: str = "split") -> Path:
    path = tmp_path / f"vmlinux-{ctime}"
    path.write_bytes(fake_kernel(ctime))
    return path


def _plant(cache: Path, offsets: dict[str, object], key: str | None = None) -> Path:
    """Rewrite the cache entry's offsets, keeping (or replacing) its key."""
    entry = cache / "btf-offsets.json"
    raw = json.loads(entry.read_text())
    raw["offsets"] = offsets
    if key is not None:
        raw["key"] = key
    entry.write_text(json.dumps(raw))
    return entry


def test_offsets_cache_is_written_and_read_back(tmp_path: Path) -> None:
    kernel, cache = _kernel_file(tmp_path), tmp_path / "cache"
    want = kernel_offsets(Btf.from_bytes(kernel.read_bytes()))
    assert cached_kernel_offsets(kernel, cache) == want
    assert stat.S_IMODE(cache.stat().st_mode) == 0o700
    # The entry is what the next start-up reads: a planted (valid) value comes back,
    # which shows the refusals below are the cache's checks and not a cache never read.
    _plant(cache, {**want, "SIDECAR_OFF_TASK_MM": 8})
    assert cached_kernel_offsets(kernel, cache)["SIDECAR_OFF_TASK_MM"] == 8


def test_offsets_cached_for_another_kernel_are_not_used(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    split, private = _kernel_file(tmp_path, "split"), _kernel_file(tmp_path, "private")
    cached_kernel_offsets(split, cache)
    got = cached_kernel_offsets(private, cache)  # same cache folder, other BTF
    assert got["SIDECAR_OFF_INODE_CTIME_SEC"] == 96
    assert got == kernel_offsets(Btf.from_bytes(private.read_bytes()))


@pytest.mark.parametrize(
    "bad",
    [
        {"SIDECAR_OFF_TASK_MM": -8},
        {"SIDECAR_OFF_TASK_MM": 1 << 40},
        {"SIDECAR_OFF_TASK_MM": "8"},
        {"SIDECAR_OFF_TASK_MM": 8.0},
        {"SIDECAR_OFF_TASK_MM": True},
        {"PIN_DIR": 8},
        {},
        [8],
    ],
)
def test_a_cache_entry_with_unexpected_content_is_a_miss(tmp_path: Path, bad: object) -> None:
    kernel, cache = _kernel_file(tmp_path), tmp_path / "cache"
    want = cached_kernel_offsets(kernel, cache)
    _plant(cache, bad)  # type: ignore[arg-type]
    assert cached_kernel_offsets(kernel, cache) == want


def test_a_cache_entry_under_another_key_or_unreadable_is_a_miss(tmp_path: Path) -> None:
    kernel, cache = _kernel_file(tmp_path), tmp_path / "cache"
    want = cached_kernel_offsets(kernel, cache)
    _plant(cache, {**want, "SIDECAR_OFF_TASK_MM": 8}, key="0" * 64)
    assert cached_kernel_offsets(kernel, cache) == want
    (cache / "btf-offsets.json").write_text("{not json")
    assert cached_kernel_offsets(kernel, cache) == want


def test_a_cache_others_may_write_is_not_trusted(tmp_path: Path) -> None:
    kernel, cache = _kernel_file(tmp_path), tmp_path / "cache"
    want = cached_kernel_offsets(kernel, cache)
    entry = _plant(cache, {**want, "SIDECAR_OFF_TASK_MM": 8})
    entry.chmod(0o666)  # the file writable by anyone
    assert cached_kernel_offsets(kernel, cache) == want
    entry = _plant(cache, {**want, "SIDECAR_OFF_TASK_MM": 8})  # (the miss rewrote it)
    cache.chmod(0o777)  # the folder writable by anyone (the file could be swapped)
    assert cached_kernel_offsets(kernel, cache) == want
    cache.chmod(0o700)
    assert cached_kernel_offsets(kernel, cache)["SIDECAR_OFF_TASK_MM"] == 8  # control


def test_a_cache_entry_that_is_a_symlink_is_not_followed(tmp_path: Path) -> None:
    kernel, cache = _kernel_file(tmp_path), tmp_path / "cache"
    want = cached_kernel_offsets(kernel, cache)
    entry = _plant(cache, {**want, "SIDECAR_OFF_TASK_MM": 8})
    elsewhere = tmp_path / "elsewhere.json"
    entry.rename(elsewhere)
    entry.symlink_to(elsewhere)
    assert cached_kernel_offsets(kernel, cache) == want
    # ... and the cache folder itself as a symlink is refused too.
    real = tmp_path / "real-cache"
    cache.rename(real)
    (real / "btf-offsets.json").unlink()
    elsewhere.rename(real / "btf-offsets.json")
    cache.symlink_to(real)
    assert cached_kernel_offsets(kernel, cache) == want
    assert cached_kernel_offsets(kernel, real)["SIDECAR_OFF_TASK_MM"] == 8  # control


def test_offsets_are_computed_when_no_cache_can_be_kept(tmp_path: Path) -> None:
    kernel = _kernel_file(tmp_path)
    blocked = tmp_path / "file-in-the-way"
    blocked.write_text("")
    want = kernel_offsets(Btf.from_bytes(kernel.read_bytes()))
    assert cached_kernel_offsets(kernel, blocked / "cache") == want
    assert cached_kernel_offsets(kernel, None) == want
    with pytest.raises(KernelError, match=r"BTF is missing"):
        cached_kernel_offsets(tmp_path / "absent", tmp_path / "cache")


# ------------------------------------------------------- the running kernel


def _vmlinux_unreadable() -> str | None:
    if not VMLINUX.exists():
        return f"{VMLINUX} does not exist (kernel without CONFIG_DEBUG_INFO_BTF)"
    if not os.access(VMLINUX, os.R_OK):
        return f"{VMLINUX} is not readable by uid {os.geteuid()} (root only on this host)"
    return None


needs_vmlinux = pytest.mark.skipif(
    _vmlinux_unreadable() is not None, reason=_vmlinux_unreadable() or ""
)


@needs_vmlinux
def test_vmlinux_offsets_are_plausible() -> None:
    btf = Btf.load()
    assert btf.type_count > 10_000
    offsets = kernel_offsets(btf)
    assert set(offsets) == OFFSET_NAMES
    assert kernel_offset_cflags() == kernel_offset_cflags(btf)

    inode_size = btf._type_size(btf._struct_id("inode"), "inode")
    task_size = btf._type_size(btf._struct_id("task_struct"), "task_struct")
    assert 200 < inode_size < 4096
    sec = offsets["SIDECAR_OFF_INODE_CTIME_SEC"]
    nsec = offsets["SIDECAR_OFF_INODE_CTIME_NSEC"]
    assert sec < nsec < inode_size
    assert nsec - sec >= 8  # the seconds are 8 bytes and come first
    inode_fields = ["SIDECAR_OFF_INODE_INO", "SIDECAR_OFF_INODE_SB"]
    assert len({offsets[n] for n in inode_fields} | {sec, nsec}) == 4
    for name in inode_fields:
        assert offsets[name] % 8 == 0 and offsets[name] < inode_size
    task_fields = [
        "SIDECAR_OFF_TASK_MM",
        "SIDECAR_OFF_TASK_CRED",
        "SIDECAR_OFF_TASK_REAL_PARENT",
        "SIDECAR_OFF_TASK_TGID",
        "SIDECAR_OFF_TASK_START_BOOTTIME",
    ]
    assert len({offsets[n] for n in task_fields}) == len(task_fields)
    for name in task_fields:
        assert 0 < offsets[name] < task_size
        assert offsets[name] % (4 if name.endswith("TGID") else 8) == 0
    assert btf.member_size("cred", "cap_effective") == 8
    assert btf.member_size("task_struct", "tgid") == 4
    assert btf.member_size("task_struct", "mm") == 8
    # Real bitfields exist in task_struct; they must be refused, not misread.
    assert btf.has_member("task_struct", "sched_reset_on_fork")
    with pytest.raises(KernelError, match=r"bitfield"):
        btf.member_offset("task_struct", "sched_reset_on_fork")
    with pytest.raises(KernelError, match=r"struct task_struct has no member 'mmm'"):
        btf.member_offset("task_struct", "mmm")


# bpftool's raw dump, parsed into an independent model: id -> (kind, name, attrs, members).
_HEAD = re.compile(r"^\[(\d+)\] (\w+) '([^']*)'(.*)$")
_MEMBER = re.compile(r"^\t'([^']*)' type_id=(\d+) bits_offset=(\d+)(?: bitfield_size=(\d+))?$")
_ATTR = re.compile(r"(\w+)=(\S+)")


@dataclass
class RawType:
    kind: str
    name: str
    attrs: dict[str, str]
    members: list[tuple[str, int, int, int]] = field(default_factory=list)


def _bpftool_model() -> dict[int, RawType]:
    bpftool = shutil.which("bpftool") or "/usr/sbin/bpftool"
    out = subprocess.run(
        [bpftool, "btf", "dump", "file", str(VMLINUX), "format", "raw"],
        check=True,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    model: dict[int, RawType] = {}
    current: RawType | None = None
    for line in out.splitlines():
        head = _HEAD.match(line)
        if head:
            current = RawType(head[2], head[3], dict(_ATTR.findall(head[4])))
            model[int(head[1])] = current
            continue
        member = _MEMBER.match(line)
        if member and current is not None and current.kind in ("STRUCT", "UNION"):
            current.members.append((member[1], int(member[2]), int(member[3]), int(member[4] or 0)))
    return model


class RawResolver:
    """Offsets and sizes computed from bpftool's dump, not from sidecar.kernel.btf."""

    def __init__(self, model: dict[int, RawType]) -> None:
        self.model = model
        self.by_name: dict[str, int] = {}

    def strip(self, tid: int) -> int:
        while self.model[tid].kind in ("TYPEDEF", "CONST", "VOLATILE", "RESTRICT", "TYPE_TAG"):
            tid = int(self.model[tid].attrs["type_id"])
        return tid

    def struct(self, name: str) -> int:
        if not self.by_name:
            for tid in sorted(self.model):
                t = self.model[tid]
                if t.kind in ("STRUCT", "UNION") and (int(t.attrs["size"]) > 0 or t.members):
                    self.by_name.setdefault(t.name, tid)
        return self.by_name[name]

    def find(self, tid: int, name: str) -> tuple[int, int] | None:
        for mname, mtype, bits, _ in self.model[tid].members:
            if mname == name:
                return bits, mtype
            inner = self.strip(mtype)
            if mname == "(anon)" and self.model[inner].kind in ("STRUCT", "UNION"):
                hit = self.find(inner, name)
                if hit:
                    return bits + hit[0], hit[1]
        return None

    def offset(self, struct: str, path: str) -> int:
        tid, total = self.struct(struct), 0
        for part in path.split("."):
            hit = self.find(tid, part)
            assert hit is not None, f"bpftool: {struct} has no {path}"
            total += hit[0]
            tid = self.strip(hit[1])
        return total // 8

    def size(self, tid: int) -> int:
        t = self.model[self.strip(tid)]
        if t.kind == "PTR":
            return 8
        if t.kind == "ARRAY":
            return self.size(int(t.attrs["type_id"])) * int(t.attrs["nr_elems"])
        return int(t.attrs["size"])


CROSS_CHECKED = {
    "SIDECAR_OFF_TASK_MM": ("task_struct", "mm"),
    "SIDECAR_OFF_TASK_CRED": ("task_struct", "cred"),
    "SIDECAR_OFF_TASK_REAL_PARENT": ("task_struct", "real_parent"),
    "SIDECAR_OFF_TASK_TGID": ("task_struct", "tgid"),
    "SIDECAR_OFF_MM_EXE_FILE": ("mm_struct", "exe_file"),
    "SIDECAR_OFF_FILE_INODE": ("file", "f_inode"),
    "SIDECAR_OFF_INODE_INO": ("inode", "i_ino"),
    "SIDECAR_OFF_INODE_SB": ("inode", "i_sb"),
    "SIDECAR_OFF_SB_DEV": ("super_block", "s_dev"),
    "SIDECAR_OFF_CRED_CAP_EFFECTIVE": ("cred", "cap_effective"),
    "SIDECAR_OFF_CRED_USER_NS": ("cred", "user_ns"),
    "SIDECAR_OFF_USER_NS_LEVEL": ("user_namespace", "level"),
}


def _check_with_bpftool(btf: Btf) -> None:
    raw = RawResolver(_bpftool_model())
    assert btf.type_count == max(raw.model)
    offsets = kernel_offsets(btf)
    for name, (struct_name, path) in CROSS_CHECKED.items():
        assert offsets[name] == raw.offset(struct_name, path), name
    inode = raw.model[raw.struct("inode")]
    names = {m[0] for m in inode.members}
    ctime = next(
        (s, n)
        for s, n in [
            ("i_ctime_sec", "i_ctime_nsec"),
            ("__i_ctime.tv_sec", "__i_ctime.tv_nsec"),
            ("i_ctime.tv_sec", "i_ctime.tv_nsec"),
        ]
        if s.split(".")[0] in names
    )
    assert offsets["SIDECAR_OFF_INODE_CTIME_SEC"] == raw.offset("inode", ctime[0])
    assert offsets["SIDECAR_OFF_INODE_CTIME_NSEC"] == raw.offset("inode", ctime[1])
    # Beyond the offsets we use: every named, whole-byte member of a few big structs,
    # with its size, so a misparsed type anywhere in the section shows up.
    checked = 0
    for struct_name in ("task_struct", "inode", "mm_struct", "cred", "file", "super_block"):
        tid = raw.struct(struct_name)
        for mname, mtype, bits, bitfield in raw.model[tid].members:
            if mname == "(anon)" or bitfield or bits % 8:
                continue
            assert btf.member_offset(struct_name, mname) == bits // 8, (struct_name, mname)
            if raw.model[raw.strip(mtype)].kind not in ("FUNC_PROTO", "FWD"):
                assert btf.member_size(struct_name, mname) == raw.size(mtype), (
                    struct_name,
                    mname,
                )
            checked += 1
    assert checked > 100


def _check_with_pahole(btf: Btf, pahole: str) -> None:
    # pahole prints "type name;  /* offset size */" for each member.
    for struct_name, path in [("task_struct", "mm"), ("cred", "cap_effective"), ("inode", "i_sb")]:
        out = subprocess.run(
            [pahole, "-C", struct_name, str(VMLINUX)],
            check=True,
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
        found = re.search(rf"[\s*]{path};\s*/\*\s*(\d+)\s+(\d+)\s*\*/", out)
        assert found, f"pahole shows no {struct_name}.{path}"
        assert btf.member_offset(struct_name, path) == int(found[1])
        assert btf.member_size(struct_name, path) == int(found[2])


@needs_vmlinux
def test_vmlinux_offsets_match_an_independent_reader() -> None:
    btf = Btf.load()
    bpftool = shutil.which("bpftool") or (
        "/usr/sbin/bpftool" if os.access("/usr/sbin/bpftool", os.X_OK) else None
    )
    pahole = shutil.which("pahole")
    if bpftool:
        _check_with_bpftool(btf)
    elif pahole:
        _check_with_pahole(btf, pahole)
    else:
        pytest.skip("neither bpftool nor pahole is installed: no independent BTF reader")
