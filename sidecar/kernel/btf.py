"""Byte offsets of kernel-internal struct fields, read from the running kernel's BTF.

The BPF programs are compiled by BCC against whatever kernel headers are at
hand, which need not match the running kernel: ``task_struct``, ``inode`` and
friends change layout between releases and configs.  So the few internal
fields the programs read are reached through offsets taken from
``/sys/kernel/btf/vmlinux`` and passed to the compiler as ``-D`` macros
(``kernel_offset_cflags``).

This is a small BTF reader with no dependencies beyond ``struct``.  It only
indexes the type section (one tuple per type id) and decodes members and
names when asked, so parsing is cheap: 0.054 s for the vmlinux BTF of a
6.18 kernel (126,572 types, 5.5 MB; Python 3.11, median of five
``Btf.from_bytes`` calls), plus about 0.02 s on the first struct lookup to
index struct names.  ``Btf.load`` caches the parsed object per path.  Only
base BTF is handled; split module BTF (``/sys/kernel/btf/<module>``) refers
to vmlinux type ids and is not needed here.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
import struct
import tempfile
import threading
from pathlib import Path

from sidecar.util.errors import KernelError

VMLINUX_BTF = Path("/sys/kernel/btf/vmlinux")

BTF_MAGIC = 0xEB9F

# BTF_KIND_* (include/uapi/linux/btf.h)
KIND_INT = 1
KIND_PTR = 2
KIND_ARRAY = 3
KIND_STRUCT = 4
KIND_UNION = 5
KIND_ENUM = 6
KIND_FWD = 7
KIND_TYPEDEF = 8
KIND_VOLATILE = 9
KIND_CONST = 10
KIND_RESTRICT = 11
KIND_FUNC = 12
KIND_FUNC_PROTO = 13
KIND_VAR = 14
KIND_DATASEC = 15
KIND_FLOAT = 16
KIND_DECL_TAG = 17
KIND_TYPE_TAG = 18
KIND_ENUM64 = 19

KIND_NAMES = (
    "UNKN",
    "INT",
    "PTR",
    "ARRAY",
    "STRUCT",
    "UNION",
    "ENUM",
    "FWD",
    "TYPEDEF",
    "VOLATILE",
    "CONST",
    "RESTRICT",
    "FUNC",
    "FUNC_PROTO",
    "VAR",
    "DATASEC",
    "FLOAT",
    "DECL_TAG",
    "TYPE_TAG",
    "ENUM64",
)

# Bytes that follow the 12-byte btf_type, as (fixed, per vlen entry), by kind.
# None marks kinds this parser does not know (0 is BTF_KIND_UNKN, never a type).
_TRAILER: tuple[tuple[int, int] | None, ...] = (
    None,  # UNKN
    (4, 0),  # INT: encoding word
    (0, 0),  # PTR
    (12, 0),  # ARRAY: btf_array
    (0, 12),  # STRUCT: btf_member
    (0, 12),  # UNION: btf_member
    (0, 8),  # ENUM: btf_enum
    (0, 0),  # FWD
    (0, 0),  # TYPEDEF
    (0, 0),  # VOLATILE
    (0, 0),  # CONST
    (0, 0),  # RESTRICT
    (0, 0),  # FUNC
    (0, 8),  # FUNC_PROTO: btf_param
    (4, 0),  # VAR: btf_var
    (0, 12),  # DATASEC: btf_var_secinfo
    (0, 0),  # FLOAT
    (4, 0),  # DECL_TAG: btf_decl_tag
    (0, 0),  # TYPE_TAG
    (0, 12),  # ENUM64: btf_enum64
)

# Kinds that only qualify or rename another type: sizes and members see through them.
_MODIFIERS = frozenset({KIND_TYPEDEF, KIND_VOLATILE, KIND_CONST, KIND_RESTRICT, KIND_TYPE_TAG})
_COMPOSITES = frozenset({KIND_STRUCT, KIND_UNION})
_SIZED = frozenset({KIND_INT, KIND_STRUCT, KIND_UNION, KIND_ENUM, KIND_ENUM64, KIND_FLOAT})

POINTER_SIZE = 8  # the product runs on 64-bit kernels only
_MAX_CHAIN = 64  # a longer typedef/modifier chain or nesting means a cycle in bad data

_HEADER_LEN = 24  # the fields we read; hdr_len may be larger (newer kernels append fields)

# One type: (kind, name_off, size_or_type, data offset in the blob, vlen, kind_flag).
_Type = tuple[int, int, int, int, int, int]
# One member: (name, type id, raw offset word).
_Member = tuple[str, int, int]
# A resolved member path: (offset in bits from the struct start, type id, bitfield size
# or 0 when the struct's kind_flag says it is not a bitfield).
_Hit = tuple[int, int, int]


class Btf:
    """A parsed BTF blob: type index plus lazily decoded names and members."""

    def __init__(
        self,
        data: bytes,
        source: str,
        endian: str,
        types: list[_Type],
        str_start: int,
        str_end: int,
    ) -> None:
        self._data = data
        self.source = source
        self._endian = endian
        self._types = types
        self._str_start = str_start
        self._str_end = str_end
        self._members_cache: dict[int, list[_Member]] = {}
        self._by_name: dict[str, list[int]] | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: Path = VMLINUX_BTF) -> Btf:
        """Parse the BTF file at ``path``; cached per path while the file is unchanged."""
        try:
            st = path.stat()
        except FileNotFoundError:
            raise KernelError(
                f"BTF is missing: {path} does not exist; the kernel needs CONFIG_DEBUG_INFO_BTF=y"
            ) from None
        except OSError as exc:
            raise KernelError(f"cannot read BTF at {path}: {exc}") from exc
        # sysfs gives vmlinux a fixed mtime, so this key only changes for real files.
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        name = str(path)
        with _CACHE_LOCK:
            cached = _CACHE.get(name)
            if cached is not None and cached[0] == key:
                return cached[1]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise KernelError(f"cannot read BTF at {path}: {exc}") from exc
        btf = cls.from_bytes(data, source=name)
        with _CACHE_LOCK:
            _CACHE[name] = (key, btf)
        return btf

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> Btf:
        """Parse a raw BTF blob; ``source`` names it in error messages."""
        data = bytes(data)
        if len(data) < _HEADER_LEN:
            raise KernelError(f"BTF of {source}: {len(data)} bytes is too short for a header")
        magic_le = struct.unpack_from("<H", data, 0)[0]
        if magic_le == BTF_MAGIC:
            endian = "<"
        elif magic_le == 0x9FEB:  # written by a big-endian host
            endian = ">"
        else:
            raise KernelError(f"BTF of {source}: bad magic {magic_le:#06x} (want {BTF_MAGIC:#06x})")
        _, version, _, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from(
            endian + "HBBIIIII", data, 0
        )
        if version != 1:
            raise KernelError(f"BTF of {source}: unsupported version {version}")
        if hdr_len < _HEADER_LEN:
            raise KernelError(f"BTF of {source}: header length {hdr_len} is too short")
        type_start = hdr_len + type_off
        type_end = type_start + type_len
        str_start = hdr_len + str_off
        str_end = str_start + str_len
        if type_end > len(data) or str_end > len(data):
            raise KernelError(
                f"BTF of {source}: sections run past the end of the data "
                f"(types end at {type_end}, strings at {str_end}, size {len(data)})"
            )
        types = _index_types(data, source, endian, type_start, type_end)
        return cls(data, source, endian, types, str_start, str_end)

    # ------------------------------------------------------------- public API

    @property
    def type_count(self) -> int:
        """Number of types (ids 1..type_count; id 0 is void)."""
        return len(self._types) - 1

    def member_offset(self, struct: str, path: str) -> int:
        """Byte offset of a member path (``"mm"``, ``"__i_ctime.tv_nsec"``) in a struct or union."""
        return self._resolve(struct, path)[0]

    def member_size(self, struct: str, path: str) -> int:
        """Size in bytes of the member's type."""
        _, type_id = self._resolve(struct, path)
        return self._type_size(type_id, f"{self._describe(struct)} member '{path}'")

    def has_member(self, struct: str, path: str) -> bool:
        """Whether the path names a member (raises if the struct itself is unknown)."""
        return not isinstance(self._walk(struct, path), str)

    # -------------------------------------------------------------- internals

    def _type(self, type_id: int) -> _Type:
        if not 0 < type_id < len(self._types):
            raise KernelError(f"BTF of {self.source}: type id {type_id} is out of range")
        return self._types[type_id]

    def _str(self, off: int) -> str:
        start = self._str_start + off
        if off == 0:
            return ""
        if start >= self._str_end:
            raise KernelError(f"BTF of {self.source}: string offset {off} is out of range")
        end = self._data.find(b"\0", start, self._str_end)
        if end < 0:
            raise KernelError(f"BTF of {self.source}: string at {off} is not terminated")
        return self._data[start:end].decode("utf-8", "replace")

    def _members(self, type_id: int) -> list[_Member]:
        cached = self._members_cache.get(type_id)
        if cached is not None:
            return cached
        _, _, _, data_off, vlen, _ = self._types[type_id]
        fmt = struct.Struct(self._endian + "III")
        members = [
            (self._str(name_off), mtype, raw)
            for name_off, mtype, raw in fmt.iter_unpack(self._data[data_off : data_off + 12 * vlen])
        ]
        self._members_cache[type_id] = members
        return members

    def _composites_named(self, name: str) -> list[int]:
        """Ids of STRUCT, UNION and FWD types with this name, in id order."""
        if self._by_name is None:
            # Built on first use: decoding ~20k names is far cheaper than all 150k.
            index: dict[str, list[int]] = {}
            for type_id, (kind, name_off, *_) in enumerate(self._types):
                if name_off and (kind in _COMPOSITES or kind == KIND_FWD):
                    index.setdefault(self._str(name_off), []).append(type_id)
            self._by_name = index
        return self._by_name.get(name, [])

    def _struct_id(self, name: str) -> int:
        candidates = self._composites_named(name)
        defined = [t for t in candidates if self._types[t][0] in _COMPOSITES]
        for type_id in defined:
            _, _, size, _, vlen, _ = self._types[type_id]
            if vlen > 0 or size > 0:
                return type_id
        if defined:  # a genuinely empty struct is still a definition
            return defined[0]
        if candidates:
            raise KernelError(
                f"BTF of {self.source}: struct {name} is only forward-declared, never defined"
            )
        raise KernelError(f"BTF of {self.source}: no struct or union named '{name}'")

    def _describe(self, struct: str) -> str:
        return f"BTF of {self.source}: struct {struct}"

    def _strip(self, type_id: int) -> int:
        """Follow typedef/const/volatile/restrict/type_tag to the underlying type id."""
        for _ in range(_MAX_CHAIN):
            if type_id == 0:
                return 0
            kind, _, target, *_ = self._type(type_id)
            if kind not in _MODIFIERS:
                return type_id
            type_id = target
        raise KernelError(f"BTF of {self.source}: type chain at id {type_id} does not end")

    def _is_int_bitfield(self, type_id: int) -> bool:
        """An INT whose encoding covers fewer bits than its size (pre-kind_flag bitfields)."""
        type_id = self._strip(type_id)
        if type_id == 0:
            return False
        kind, _, size, data_off, _, _ = self._types[type_id]
        if kind != KIND_INT:
            return False
        encoding: int = struct.unpack_from(self._endian + "I", self._data, data_off)[0]
        bits_offset = (encoding >> 16) & 0xFF
        nr_bits = encoding & 0xFF
        return bits_offset != 0 or nr_bits != size * 8

    def _find(self, type_id: int, name: str, depth: int = 0) -> _Hit | None:
        """Find a member by name, descending into anonymous struct/union members."""
        if depth > _MAX_CHAIN:
            raise KernelError(f"BTF of {self.source}: members nest too deep at type id {type_id}")
        kind_flag = self._types[type_id][5]
        for mname, mtype, raw in self._members(type_id):
            if kind_flag:
                bit_off, bits = raw & 0xFFFFFF, raw >> 24
            else:
                bit_off, bits = raw, 0
            if mname == name:
                return bit_off, mtype, bits
            if not mname:
                inner = self._strip(mtype)
                if inner and self._types[inner][0] in _COMPOSITES:
                    hit = self._find(inner, name, depth + 1)
                    if hit is not None:
                        return bit_off + hit[0], hit[1], hit[2]
        return None

    def _walk(self, struct: str, path: str) -> _Hit | str:
        """Resolve a dotted path; a string return says why the path does not exist."""
        current = self._struct_id(struct)
        parts = path.split(".")
        if not all(parts):
            return f"'{path}' is not a member path"
        total = 0
        hit: _Hit | None = None
        for i, part in enumerate(parts):
            if hit is not None:
                current = self._strip(hit[1])
                if current == 0 or self._types[current][0] not in _COMPOSITES:
                    prefix = ".".join(parts[:i])
                    return f"member '{prefix}' is not a struct or union, so it has no '{part}'"
            hit = self._find(current, part)
            if hit is None:
                return f"has no member '{path}'"
            total += hit[0]
        assert hit is not None  # parts is never empty
        return total, hit[1], hit[2]

    def _resolve(self, struct: str, path: str) -> tuple[int, int]:
        """(byte offset, type id) of a member path, or KernelError."""
        found = self._walk(struct, path)
        if isinstance(found, str):
            raise KernelError(f"{self._describe(struct)} {found}")
        bit_off, type_id, bitfield_size = found
        if bitfield_size or self._is_int_bitfield(type_id):
            raise KernelError(
                f"{self._describe(struct)} member '{path}' is a bitfield, which is not supported"
            )
        if bit_off % 8:
            raise KernelError(
                f"{self._describe(struct)} member '{path}' is at bit {bit_off}, "
                "not on a byte boundary"
            )
        return bit_off // 8, type_id

    def _type_size(self, type_id: int, what: str, depth: int = 0) -> int:
        if depth > _MAX_CHAIN:
            raise KernelError(f"{what}: array nesting too deep")
        type_id = self._strip(type_id)
        if type_id == 0:
            raise KernelError(f"{what} is void and has no size")
        kind, _, size_or_type, data_off, _, _ = self._types[type_id]
        if kind in _SIZED:
            return size_or_type
        if kind == KIND_PTR:
            return POINTER_SIZE
        if kind == KIND_ARRAY:
            elem: int
            nelems: int
            elem, _, nelems = struct.unpack_from(self._endian + "III", self._data, data_off)
            return self._type_size(elem, what, depth + 1) * nelems
        raise KernelError(f"{what} has a {KIND_NAMES[kind]} type, which has no size")


def _index_types(data: bytes, source: str, endian: str, pos: int, end: int) -> list[_Type]:
    """One record per type id; id 0 is void.  The hot loop of parsing."""
    unpack = struct.Struct(endian + "III").unpack_from
    trailer = _TRAILER
    known = len(trailer)
    types: list[_Type] = [(0, 0, 0, 0, 0, 0)]
    append = types.append
    while pos < end:
        if pos + 12 > end:
            raise KernelError(f"BTF of {source}: type id {len(types)} is cut off")
        name_off, info, size_or_type = unpack(data, pos)
        kind = (info >> 24) & 0x1F
        extra = trailer[kind] if kind < known else None
        if extra is None:
            raise KernelError(
                f"BTF of {source}: type id {len(types)} has unknown kind {kind} "
                f"(this parser knows kinds 1-{known - 1}); the kernel is newer than the parser"
            )
        vlen = info & 0xFFFF
        data_off = pos + 12
        pos = data_off + extra[0] + extra[1] * vlen
        append((kind, name_off, size_or_type, data_off, vlen, info >> 31))
    if pos != end:
        raise KernelError(f"BTF of {source}: type id {len(types) - 1} runs past the type section")
    return types


_CACHE: dict[str, tuple[tuple[int, int, int, int], Btf]] = {}
_CACHE_LOCK = threading.Lock()


# ---------------------------------------------------------------- offsets

POINTER_MEMBERS = {
    "SIDECAR_OFF_TASK_MM": ("task_struct", "mm"),
    "SIDECAR_OFF_TASK_CRED": ("task_struct", "cred"),
    "SIDECAR_OFF_TASK_REAL_PARENT": ("task_struct", "real_parent"),
    "SIDECAR_OFF_MM_EXE_FILE": ("mm_struct", "exe_file"),
    "SIDECAR_OFF_FILE_INODE": ("file", "f_inode"),
    "SIDECAR_OFF_INODE_SB": ("inode", "i_sb"),
    "SIDECAR_OFF_CRED_USER_NS": ("cred", "user_ns"),
}


def _sized(btf: Btf, struct_name: str, path: str, sizes: tuple[int, ...]) -> int:
    """Offset of a member whose size the BPF programs rely on; KernelError if it differs."""
    offset = btf.member_offset(struct_name, path)
    size = btf.member_size(struct_name, path)
    if size not in sizes:
        want = " or ".join(str(s) for s in sizes)
        raise KernelError(
            f"BTF of {btf.source}: struct {struct_name} member '{path}' is {size} bytes, "
            f"the BPF programs read {want}"
        )
    return offset


def _ctime(btf: Btf) -> tuple[int, int]:
    """(seconds, nanoseconds) offsets of the inode change time, across its three layouts."""
    if btf.has_member("inode", "i_ctime_sec"):  # 6.11+: split time64_t + u32
        sec_path, nsec_path = "i_ctime_sec", "i_ctime_nsec"
    elif btf.has_member("inode", "__i_ctime"):  # 6.6-6.10: private timespec64
        sec_path, nsec_path = "__i_ctime.tv_sec", "__i_ctime.tv_nsec"
    elif btf.has_member("inode", "i_ctime"):  # up to 6.5
        sec_path, nsec_path = "i_ctime.tv_sec", "i_ctime.tv_nsec"
    else:
        raise KernelError(
            f"BTF of {btf.source}: struct inode has none of i_ctime_sec, __i_ctime, i_ctime"
        )
    # tv_nsec is a long in timespec64 but a u32 on 6.11+; the value fits 32 bits either
    # way, so the programs read the low 4 bytes (little-endian).
    return _sized(btf, "inode", sec_path, (8,)), _sized(btf, "inode", nsec_path, (4, 8))


def kernel_offsets(btf: Btf) -> dict[str, int]:
    """The kernel struct offsets the BPF programs need, as C macro name -> byte offset."""
    out = {
        name: _sized(btf, struct_name, path, (POINTER_SIZE,))
        for name, (struct_name, path) in POINTER_MEMBERS.items()
    }
    out["SIDECAR_OFF_INODE_INO"] = _sized(btf, "inode", "i_ino", (8,))
    out["SIDECAR_OFF_SB_DEV"] = _sized(btf, "super_block", "s_dev", (4,))
    out["SIDECAR_OFF_TASK_TGID"] = _sized(btf, "task_struct", "tgid", (4,))
    # What /proc/PID/stat shows as the start time (field 22), in ns since boot.
    out["SIDECAR_OFF_TASK_START_BOOTTIME"] = _sized(btf, "task_struct", "start_boottime", (8,))
    # kernel_cap_t: struct { u64 val; } on 6.3+, struct { u32 cap[2]; } before; 8 bytes both.
    out["SIDECAR_OFF_CRED_CAP_EFFECTIVE"] = _sized(btf, "cred", "cap_effective", (8,))
    # Capabilities count only in the host's user namespace (level 0).
    out["SIDECAR_OFF_USER_NS_LEVEL"] = _sized(btf, "user_namespace", "level", (4,))
    sec, nsec = _ctime(btf)
    out["SIDECAR_OFF_INODE_CTIME_SEC"] = sec
    out["SIDECAR_OFF_INODE_CTIME_NSEC"] = nsec
    return out


# ---------------------------------------------------------- offsets cache

#: Where the offsets of the running kernel are kept between start-ups: a
#: tmpfs, emptied at boot, as a kernel's BTF only changes with a reboot.
OFFSETS_CACHE_DIR = Path("/run/sidecar/kernel")
_OFFSETS_FILE = "btf-offsets.json"
_MAX_OFFSET = 1 << 20  # far past any kernel struct; a larger number is not ours


def _offsets_key(data: bytes) -> str:
    """What the offsets follow from: this reader's code (what is asked, how) and the BTF."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(data)
    return digest.hexdigest()


def _private_dir(path: Path) -> bool:
    """A real directory of this user's that nobody else may write into."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


def _cached_offsets(cache_dir: Path, key: str) -> dict[str, int] | None:
    """The offsets cached for ``key``, or None: any doubt (owner, mode, content) is a miss."""
    if not _private_dir(cache_dir):
        return None
    try:
        fd = os.open(cache_dir / _OFFSETS_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
            return None
        raw = json.loads(os.read(fd, 1 << 16))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    if not isinstance(raw, dict) or raw.get("key") != key:
        return None
    offsets = raw.get("offsets")
    if not isinstance(offsets, dict) or not offsets:
        return None
    for name, value in offsets.items():
        if (
            not isinstance(name, str)
            or not name.startswith("SIDECAR_OFF_")
            or type(value) is not int
            or not 0 <= value < _MAX_OFFSET
        ):
            return None
    return offsets


def _store_offsets(cache_dir: Path, key: str, offsets: dict[str, int]) -> None:
    """Keep the offsets for the next start-up; a cache that cannot be written is no error."""
    try:
        cache_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not _private_dir(cache_dir):
            return
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=".btf-offsets-")
        try:
            with os.fdopen(fd, "w") as fh:
                json.dump({"key": key, "offsets": offsets}, fh)
            os.replace(tmp, cache_dir / _OFFSETS_FILE)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    except OSError:
        return


def cached_kernel_offsets(
    path: Path = VMLINUX_BTF, cache_dir: Path | None = OFFSETS_CACHE_DIR
) -> dict[str, int]:
    """:func:`kernel_offsets` of the BTF at ``path``, kept in ``cache_dir`` between runs.

    Parsing the kernel's BTF takes about 0.08 s of every start-up; hashing
    it takes 3 ms.  The cache entry is keyed by the SHA-256 of this reader's
    source and of the BTF itself, so another kernel or another reader never
    uses it; it is read only from a directory and file of this user's that
    nobody else may write (root's, for the daemon), and anything unexpected
    in it is a miss that parses the BTF again.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise KernelError(
            f"BTF is missing: {path} does not exist; the kernel needs CONFIG_DEBUG_INFO_BTF=y"
        ) from None
    except OSError as exc:
        raise KernelError(f"cannot read BTF at {path}: {exc}") from exc
    key = _offsets_key(data)
    if cache_dir is not None:
        cached = _cached_offsets(cache_dir, key)
        if cached is not None:
            return cached
    offsets = kernel_offsets(Btf.from_bytes(data, source=str(path)))
    if cache_dir is not None:
        _store_offsets(cache_dir, key, offsets)
    return offsets


def kernel_offset_cflags(btf: Btf | None = None) -> list[str]:
    """``-DNAME=VALUE`` compiler flags for the offsets, sorted by name.

    Without ``btf``: the running kernel's, through the cache
    (:func:`cached_kernel_offsets`).
    """
    offsets = cached_kernel_offsets() if btf is None else kernel_offsets(btf)
    return [f"-D{name}={value}" for name, value in sorted(offsets.items())]


__all__ = [
    "OFFSETS_CACHE_DIR",
    "VMLINUX_BTF",
    "Btf",
    "cached_kernel_offsets",
    "kernel_offset_cflags",
    "kernel_offsets",
]
