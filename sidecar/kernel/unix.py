"""The unix-socket hooks: a CO-RE object built with clang and loaded with libbpf.

The connect_unix and sendmsg_unix hooks (Linux 6.7+) read the socket
address through a kfunc (``bpf_cast_to_kern_ctx``) that BCC cannot call, so
``bpf/unix.bpf.c`` is compiled with clang for the BPF target and loaded with
the system's libbpf.  Before it loads, each of its maps is replaced by the
descriptor of the map the BCC programs made (procs, settings, policies,
unix_allow, the ring buffer and the loss counters), so both halves judge
from one state and report into one ring.

Hosts without clang (and without the object the Debian package ships
prebuilt), or with an older kernel, run without these hooks:
``UnixHooks.load`` says why, and a policy that lists unix addresses is then
refused rather than silently unenforced.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

from sidecar.kernel import libbpf
from sidecar.util.errors import KernelError

_logger = logging.getLogger(__name__)

# enum bpf_attach_type (uapi/linux/bpf.h, 6.7+)
ATTACH_CGROUP_UNIX_CONNECT = 49
ATTACH_CGROUP_UNIX_SENDMSG = 50

# (pin name, program name, attach type)
UNIX_HOOKS = (
    ("connect_unix", "sidecar_connect_unix", ATTACH_CGROUP_UNIX_CONNECT),
    ("sendmsg_unix", "sidecar_sendmsg_unix", ATTACH_CGROUP_UNIX_SENDMSG),
)
# Maps of the object that are the BCC programs' maps.
SHARED_MAPS = ("procs", "settings", "policies", "unix_allow", "events", "lost")
# The Debian package ships the object built from the same sources next to
# them (packaging/build-deb.sh), so hosts need no clang; a checkout has none
# and compiles it at load time.
PREBUILT_OBJECT = "unix.bpf.o"
CLANG_NAMES = ("clang", "clang-19", "clang-18", "clang-17", "clang-16", "clang-15", "clang-14")


def find_clang() -> str | None:
    for name in CLANG_NAMES:
        found = shutil.which(name)
        if found:
            return found
    return None


def _lib() -> ctypes.CDLL:
    lib = libbpf.lib()
    lib.bpf_object__open_file.restype = ctypes.c_void_p
    lib.bpf_object__open_file.argtypes = [ctypes.c_char_p, ctypes.c_void_p]
    lib.bpf_object__find_program_by_name.restype = ctypes.c_void_p
    lib.bpf_object__find_program_by_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.bpf_object__find_map_by_name.restype = ctypes.c_void_p
    lib.bpf_object__find_map_by_name.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    lib.bpf_map__reuse_fd.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.bpf_program__set_type.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.bpf_program__set_expected_attach_type.argtypes = [ctypes.c_void_p, ctypes.c_int]
    lib.bpf_object__load.argtypes = [ctypes.c_void_p]
    lib.bpf_program__fd.argtypes = [ctypes.c_void_p]
    lib.bpf_object__close.argtypes = [ctypes.c_void_p]
    lib.libbpf_get_error.argtypes = [ctypes.c_void_p]
    lib.libbpf_get_error.restype = ctypes.c_long
    return lib


def _clang_argv(clang: str, src: Path, include: Path, out: Path) -> list[str]:
    arch_inc = Path("/usr/include") / f"{os.uname().machine}-linux-gnu"
    return [
        clang,
        "-g",
        "-O2",
        "-target",
        "bpf",
        f"-I{include}",
        f"-I{arch_inc}",
        "-c",
        str(src),
        "-o",
        str(out),
    ]


def compile_object(src: Path, include: Path, out: Path) -> None:
    """clang -target bpf: a CO-RE object that libbpf relocates for the running kernel."""
    clang = find_clang()
    if clang is None:
        raise KernelError("clang is not installed (apt-get install clang)")
    proc = subprocess.run(
        _clang_argv(clang, src, include, out), capture_output=True, text=True, timeout=120
    )
    if proc.returncode != 0:
        raise KernelError(f"{src} does not compile: {proc.stderr.strip()[-2000:]}")


class ObjectBuild:
    """clang building the object in the background, into a private folder.

    Started before the BCC programs compile (the two compilers then share
    the CPUs); :meth:`wait` gives the object, or raises what
    :func:`compile_object` would have.  :meth:`close` stops it and removes
    the folder.
    """

    TIMEOUT = 120.0

    def __init__(self, bpf_dir: Path) -> None:
        self.src = bpf_dir / "unix.bpf.c"
        self._tmp = tempfile.TemporaryDirectory(prefix="sidecar-unix-")
        self.out = Path(self._tmp.name) / "unix.bpf.o"
        self._began = time.monotonic()
        self._proc: subprocess.Popen[str] | None = None
        clang = find_clang()
        if clang is not None:
            self._proc = subprocess.Popen(
                _clang_argv(clang, self.src, bpf_dir / "include", self.out),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )

    def wait(self) -> Path:
        if self._proc is None:
            raise KernelError("clang is not installed (apt-get install clang)")
        left = max(0.0, self.TIMEOUT - (time.monotonic() - self._began))
        try:
            _, err = self._proc.communicate(timeout=left)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
            raise KernelError(
                f"{self.src} took longer than {self.TIMEOUT:.0f} s to compile"
            ) from None
        if self._proc.returncode != 0:
            raise KernelError(f"{self.src} does not compile: {err.strip()[-2000:]}")
        return self.out

    def close(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()
        self._tmp.cleanup()


class UnixHooks:
    """The loaded unix-socket programs (their object keeps the shared maps open)."""

    def __init__(self, obj: int, prog_fds: dict[str, int]) -> None:
        self._obj = obj
        self.prog_fds = prog_fds

    @classmethod
    def load(
        cls, bpf_dir: Path, map_fds: Mapping[str, int], build: ObjectBuild | None = None
    ) -> UnixHooks:
        """Build (or take ``build``'s object) and load the programs on the shared maps.

        KernelError says why not.  ``build`` stays the caller's to close.
        """
        lib = _lib()
        prebuilt = bpf_dir / PREBUILT_OBJECT
        if prebuilt.is_file():
            obj = lib.bpf_object__open_file(str(prebuilt).encode(), None)
        elif build is not None:
            obj = lib.bpf_object__open_file(str(build.wait()).encode(), None)
        else:
            with tempfile.TemporaryDirectory(prefix="sidecar-unix-") as tmp:
                obj_path = Path(tmp) / "unix.bpf.o"
                compile_object(bpf_dir / "unix.bpf.c", bpf_dir / "include", obj_path)
                obj = lib.bpf_object__open_file(str(obj_path).encode(), None)
        if not obj or lib.libbpf_get_error(obj):
            raise KernelError("libbpf cannot open the unix-socket object")
        try:
            for name in SHARED_MAPS:
                m = lib.bpf_object__find_map_by_name(obj, name.encode())
                if not m or lib.bpf_map__reuse_fd(m, map_fds[name]) != 0:
                    raise KernelError(f"the unix-socket object cannot share map {name}")
            progs = {}
            for _pin, prog_name, attach_type in UNIX_HOOKS:
                prog = lib.bpf_object__find_program_by_name(obj, prog_name.encode())
                if not prog:
                    raise KernelError(f"program {prog_name} is missing from the object")
                # libbpf before 1.3 does not know the section names: say what they are.
                lib.bpf_program__set_type(prog, libbpf.PROG_TYPE_CGROUP_SOCK_ADDR)
                lib.bpf_program__set_expected_attach_type(prog, attach_type)
                progs[prog_name] = prog
            rc = lib.bpf_object__load(obj)
            if rc != 0:
                raise KernelError(
                    f"the kernel refused the unix-socket programs ({os.strerror(-rc)}): "
                    "judging unix sockets needs Linux 6.7 or newer"
                )
            fds = {name: int(lib.bpf_program__fd(p)) for name, p in progs.items()}
        except BaseException:
            lib.bpf_object__close(obj)
            raise
        return cls(obj, fds)

    def close(self) -> None:
        if self._obj:
            _lib().bpf_object__close(self._obj)
            self._obj = 0
