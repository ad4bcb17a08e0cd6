"""Compile, load, attach and pin the BPF programs; read their ring buffer.

The only module of the product that imports bcc.  Everything it hands out is
plain Python: raw ring-buffer records (bytes), counters, map entries.

Attachment is by BPF links pinned under ``<pin_dir>/links``, and shared
state (process identities, scope, settings) lives in maps pinned under
``<pin_dir>``.  So the programs keep running from the pinned state when the
daemon dies (fail-static), and a restarted daemon swaps its freshly loaded
programs in behind the same links, with no gap and no second attachment.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sidecar.kernel import abi, libbpf
from sidecar.kernel.btf import kernel_offset_cflags
from sidecar.kernel.maps import DELIVERED, KernelMaps
from sidecar.util.errors import KernelError

if TYPE_CHECKING:
    from sidecar.kernel.unix import ObjectBuild

_logger = logging.getLogger(__name__)

BPF_DIR_ENV = "SIDECAR_BPF_DIR"
SOURCES = ("common.bpf.c", "process.bpf.c", "connect.bpf.c")
_SAFE_PATH = re.compile(r"^/[A-Za-z0-9._/-]+$")
# Threads that load programs into the kernel side by side (the verifier is most of start-up).
VERIFY_THREADS = max(2, min(8, os.cpu_count() or 2))

# (pin name, BCC function, tracefs category, event)
TRACEPOINTS = (
    ("sched_process_exec", "tracepoint__sched__sched_process_exec", "sched", "sched_process_exec"),
    ("task_newtask", "tracepoint__task__task_newtask", "task", "task_newtask"),
    ("sched_process_exit", "tracepoint__sched__sched_process_exit", "sched", "sched_process_exit"),
)
# (pin name, BCC function, program type, attach type).  Attached at the
# cgroup2 root: a socket's hooks run for the cgroup it was made in, and a
# process with an identity is judged wherever it moves (bpf/connect.bpf.c).
CGROUP_HOOKS = (
    (
        "connect4",
        "sidecar_connect4",
        libbpf.PROG_TYPE_CGROUP_SOCK_ADDR,
        libbpf.ATTACH_CGROUP_INET4_CONNECT,
    ),
    (
        "connect6",
        "sidecar_connect6",
        libbpf.PROG_TYPE_CGROUP_SOCK_ADDR,
        libbpf.ATTACH_CGROUP_INET6_CONNECT,
    ),
    (
        "sendmsg4",
        "sidecar_sendmsg4",
        libbpf.PROG_TYPE_CGROUP_SOCK_ADDR,
        libbpf.ATTACH_CGROUP_UDP4_SENDMSG,
    ),
    (
        "sendmsg6",
        "sidecar_sendmsg6",
        libbpf.PROG_TYPE_CGROUP_SOCK_ADDR,
        libbpf.ATTACH_CGROUP_UDP6_SENDMSG,
    ),
    (
        "sock_create",
        "sidecar_sock_create",
        libbpf.PROG_TYPE_CGROUP_SOCK,
        libbpf.ATTACH_CGROUP_INET_SOCK_CREATE,
    ),
    (
        "setsockopt",
        "sidecar_setsockopt",
        libbpf.PROG_TYPE_CGROUP_SOCKOPT,
        libbpf.ATTACH_CGROUP_SETSOCKOPT,
    ),
)


def has_group_dead(tracefs: Path) -> bool:
    """Does sched_process_exit say when the last thread of a process ends (6.16+)?"""
    fmt = tracefs / "events" / "sched" / "sched_process_exit" / "format"
    try:
        return "group_dead" in fmt.read_text()
    except OSError:
        return False


def bpf_source_dir() -> Path:
    """Where the BPF C sources are: $SIDECAR_BPF_DIR, the checkout, or the install."""
    env = os.environ.get(BPF_DIR_ENV)
    candidates = [Path(env)] if env else []
    candidates += [
        Path(__file__).resolve().parents[2] / "bpf",
        Path("/usr/share/sidecar/bpf"),
    ]
    for c in candidates:
        if (c / "include" / "events.h").is_file():
            return c
    raise KernelError(
        f"BPF sources not found (looked in {', '.join(map(str, candidates))}); set {BPF_DIR_ENV}"
    )


@dataclass(frozen=True)
class LoadOptions:
    pin_dir: Path
    scope: Path
    tracefs: Path
    procs_max: int = abi.PROCS_MAX_DEFAULT
    ringbuf_pages: int = abi.RINGBUF_PAGES_DEFAULT
    attest: bool = False
    # Where the cgroup hooks attach: the cgroup2 root (found when None), so
    # that enforcement follows an identity out of the scope.
    hook_root: Path | None = None
    # The directory under pin_dir for this build's pins (tests name another
    # to stand in for an older build).
    abi_dir: str = f"v{abi.ABI_VERSION}"

    @property
    def root(self) -> Path:
        if self.hook_root is not None:
            return self.hook_root
        from sidecar.kernel.checks import cgroup2_root

        return cgroup2_root()

    def validate(self) -> None:
        for name, p in (
            ("pin directory", self.pin_dir),
            ("scope cgroup", self.scope),
            ("cgroup2 root", self.root),
        ):
            if not _SAFE_PATH.match(str(p)):
                raise KernelError(
                    f"{name} '{p}' must be an absolute path of letters, digits, '.', '_', '-', '/'"
                )
        lo, hi = abi.PROCS_MAX_RANGE
        if not lo <= self.procs_max <= hi:
            raise KernelError(f"procs_max {self.procs_max} must be within {lo}..{hi}")
        pages = self.ringbuf_pages
        if pages < 1 or pages & (pages - 1) or pages > abi.RINGBUF_PAGES_MAX:
            raise KernelError(
                f"ringbuf_pages {pages} must be a power of two up to {abi.RINGBUF_PAGES_MAX}"
            )

    @property
    def ringbuf_bytes(self) -> int:
        return self.ringbuf_pages * abi.RINGBUF_PAGE_BYTES

    def map_sizes(self) -> dict[str, int]:
        """max_entries of every map in bpf/maps.h that holds more than one entry.

        Passed as -D flags: maps.h has no sizes of its own and stops the build
        when one is missing, so these are the sizes the kernel gets.
        """
        return {
            "PROCS_MAX": self.procs_max,
            "RINGBUF_BYTES": self.ringbuf_bytes,
            "POLICIES_MAX": abi.POLICIES_MAX,
            "EGRESS_MAX": abi.EGRESS_MAX,
            "EXEC_ALLOW_MAX": abi.EXEC_ALLOW_MAX,
            "SOCKET_ALLOW_MAX": abi.SOCKET_ALLOW_MAX,
            "UNIX_ALLOW_MAX": abi.UNIX_ALLOW_MAX,
            "EVENT_TYPE_SLOTS": abi.EVENT_TYPE_SLOTS,
            "DELIVERED_SLOTS": len(DELIVERED),
        }


def new_build_id() -> int:
    """A load's own number: tells its programs from an earlier daemon's while both are
    attached for a moment at start-up (struct handled_mark in bpf/include/events.h)."""
    return secrets.randbits(31) + 1


def build_cflags(
    options: LoadOptions,
    pin_dir: Path,
    src: Path,
    offsets: list[str],
    build_id: int | None = None,
) -> list[str]:
    """The compiler flags of the BCC programs: paths, map sizes, the kernel's offsets."""
    cflags = [
        f"-I{src / 'include'}",
        f"-I{src}",
        f'-DPIN_DIR="{pin_dir}"',
        *(f"-D{name}={size}" for name, size in options.map_sizes().items()),
        *offsets,
        "-Wno-macro-redefined",
    ]
    if has_group_dead(options.tracefs):
        cflags.append("-DSIDECAR_HAVE_GROUP_DEAD=1")
    cflags.append(f"-DSIDECAR_BUILD_ID={build_id if build_id is not None else new_build_id()}")
    return cflags


@dataclass
class AttachReport:
    """What start-up did, for the log and for ``sidecar status``."""

    compile_seconds: float = 0.0
    adopted: list[str] = field(default_factory=list)  # links found pinned and taken over
    created: list[str] = field(default_factory=list)  # links made by this run
    retired: list[str] = field(default_factory=list)  # links of hooks this build no longer has


def _make_module_class() -> Any:
    try:
        from bcc import BPF
    except ImportError as exc:
        raise KernelError(
            f"the BCC Python module is missing ({exc}): apt-get install python3-bpfcc"
        ) from exc

    class _Module(BPF):  # type: ignore[misc]
        def _trace_autoload(self) -> None:
            # We attach tracepoints ourselves, as pinnable links.
            return None

    return _Module


class KernelPrograms(KernelMaps):
    """Compile, load, attach and pin the programs (the short-lived prepare step).

    The map methods come from :class:`KernelMaps`, on the pins ``load``
    creates: tests and the prepare step use both halves in one object, the
    daemon only the maps.
    """

    def __init__(self, options: LoadOptions) -> None:
        options.validate()
        self.options = options
        # Pins live in a directory per ABI version: a build with another map
        # layout never opens this one's maps (retire_other_versions).
        super().__init__(options.pin_dir / options.abi_dir)
        self.links_dir = self.pin_dir / "links"
        self._bpf: Any = None
        self._link_fds: dict[str, int] = {}
        self.unix: Any = None  # sidecar.kernel.unix.UnixHooks once loaded
        self._unix_build: ObjectBuild | None = None
        self.unix_problem: str | None = "not loaded"
        self.report = AttachReport()
        self.build_id = 0  # set by load()

    # -- loading -----------------------------------------------------------

    def _source_text(self, src: Path) -> str:
        parts = ['#include "maps.h"\n']
        for name in SOURCES:
            path = src / name
            parts.append(f'#line 1 "{path}"\n')
            parts.append(path.read_text())
        return "".join(parts)

    def load(self) -> None:
        """Compile and load the programs; create or re-open the pinned maps."""
        src = bpf_source_dir()
        # Root only: whoever can open a pinned map can rewrite identities.
        for d in (self.options.pin_dir, self.pin_dir, self.links_dir):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(d, 0o700)
        from sidecar.kernel.unix import PREBUILT_OBJECT, ObjectBuild

        # clang builds the unix-socket object while BCC compiles the rest,
        # unless it came built (the Debian package ships it).
        if not (src / PREBUILT_OBJECT).is_file():
            self._unix_build = ObjectBuild(src)
        self.build_id = new_build_id()
        cflags = build_cflags(
            self.options, self.pin_dir, src, kernel_offset_cflags(), self.build_id
        )
        self._resize_ring()
        module = _make_module_class()
        started = time.monotonic()
        try:
            self._bpf = module(text=self._source_text(src).encode(), cflags=cflags)
        except Exception as exc:  # bcc raises bare Exception for every failure
            raise KernelError(f"BPF programs failed to compile or load: {exc}") from exc
        self.report.compile_seconds = time.monotonic() - started
        self._verify_programs(src)

    def _verify_programs(self, src: Path) -> None:
        """Load every program into the kernel, the verifier's work spread over the CPUs.

        The kernel verifies each program as it is loaded (about 80 ms each
        here, most of start-up).  bpf(BPF_PROG_LOAD) runs without the GIL,
        so threads verify side by side; attach() then finds them loaded.
        The unix-socket object shares maps the BCC module made, so it starts
        only now.
        """
        from bcc import BPF

        wanted = [(name, BPF.TRACEPOINT, -1) for _p, name, _c, _e in TRACEPOINTS]
        wanted += [(name, ptype, atype) for _p, name, ptype, atype in CGROUP_HOOKS]
        with ThreadPoolExecutor(max_workers=VERIFY_THREADS, thread_name_prefix="verify") as pool:
            unix = pool.submit(self._load_unix, src)
            loads = [pool.submit(self._load_func, *w) for w in wanted]
            unix.result()
            for done in loads:
                done.result()  # a refusal raises here, naming the program
        self._set_scope()
        self.set_settings(attest=self.options.attest)

    def _resize_ring(self) -> None:
        """A pinned ring buffer of another size than configured is replaced (and said so)."""
        path = self.pin_dir / "events"
        fd = libbpf.obj_get(path)
        if fd is None:
            return
        try:
            size = libbpf.map_max_entries(fd)
        finally:
            os.close(fd)
        wanted = self.options.ringbuf_bytes
        if size != wanted:
            _logger.warning(
                "ring buffer resized from %d to %d bytes: records left unread in the old one "
                "are dropped",
                size,
                wanted,
            )
            path.unlink()
            with suppress(FileNotFoundError):  # positions in the old ring mean nothing now
                (self.pin_dir / "delivered").unlink()

    def _load_unix(self, src: Path) -> None:
        """The unix-socket hooks, on the same maps; without them, say why (and go on)."""
        from sidecar.kernel.unix import SHARED_MAPS, UnixHooks

        try:
            self.unix = UnixHooks.load(
                src, {name: self.fd(name) for name in SHARED_MAPS}, self._unix_build
            )
            self.unix_problem = None
        except KernelError as exc:
            self.unix, self.unix_problem = None, str(exc)
            _logger.warning("unix sockets will not be judged on this host: %s", exc)
        finally:
            self._close_unix_build()

    def _close_unix_build(self) -> None:
        if self._unix_build is not None:
            self._unix_build.close()
            self._unix_build = None

    def _set_scope(self) -> None:
        fd = self._open_scope()
        try:
            rel = self.options.scope.resolve().relative_to(self.options.root.resolve())
            self.set_scope(fd, os.fstat(fd).st_ino, len(rel.parts))
        finally:
            os.close(fd)

    # -- attaching ---------------------------------------------------------

    def attach(self) -> AttachReport:
        """Attach every program through pinned links, taking over links a previous run left."""
        assert self._bpf is not None, "load() first"
        from bcc import BPF

        for pin, fn_name, category, event in TRACEPOINTS:
            fn = self._load_func(fn_name, BPF.TRACEPOINT)
            tp_id = libbpf.tracepoint_id(self.options.tracefs, category, event)
            perf_fd = libbpf.perf_event_open_tracepoint(tp_id)
            try:
                link = libbpf.link_create(fn.fd, perf_fd, libbpf.ATTACH_PERF_EVENT)
            finally:
                os.close(perf_fd)  # the link holds the perf event
            self._replace_pin(pin, link)

        self.attach_cgroup_hooks()
        self._retire_stale_links()
        return self.report

    def _retire_stale_links(self) -> None:
        """Unpin links an earlier build made for hooks this one does not have.

        Without this, a program dropped or renamed in an upgrade would stay
        attached (a pinned link outlives every daemon) next to the new ones.
        The new programs are attached before anything is removed.
        """
        from sidecar.kernel.unix import UNIX_HOOKS

        current = {pin for pin, *_ in TRACEPOINTS} | {pin for pin, *_ in CGROUP_HOOKS}
        if self.unix is not None:
            current |= {pin for pin, *_ in UNIX_HOOKS}
        for path in sorted(self.links_dir.iterdir()):
            if path.name not in current:
                path.unlink()  # the link's last reference: its program detaches
                self.report.retired.append(path.name)

    def attach_cgroup_hooks(self) -> None:
        """Attach the socket hooks at the cgroup2 root, taking over links a previous run left."""
        cg_fd = self._open_cgroup(self.options.root, "cgroup2 root")
        try:
            root_id = os.fstat(cg_fd).st_ino
            for pin, fn_name, prog_type, attach_type in CGROUP_HOOKS:
                fn = self._load_func(fn_name, prog_type, attach_type)
                old = libbpf.obj_get(self.links_dir / pin)
                if old is not None and libbpf.link_cgroup_id(old) == root_id:
                    # Same cgroup: swap the program atomically, no gap.
                    libbpf.link_update(old, fn.fd)
                    self._link_fds[pin] = old
                    self.report.adopted.append(pin)
                    continue
                if old is not None:
                    os.close(old)
                link = libbpf.link_create(fn.fd, cg_fd, attach_type)
                self._replace_pin(pin, link)
            if self.unix is not None:
                from sidecar.kernel.unix import UNIX_HOOKS

                for pin, prog_name, attach_type in UNIX_HOOKS:
                    self._attach_cgroup_link(
                        pin, self.unix.prog_fds[prog_name], cg_fd, root_id, attach_type
                    )
        finally:
            os.close(cg_fd)

    def _attach_cgroup_link(
        self, pin: str, prog_fd: int, cg_fd: int, cg_id: int, attach_type: int
    ) -> None:
        old = libbpf.obj_get(self.links_dir / pin)
        if old is not None and libbpf.link_cgroup_id(old) == cg_id:
            libbpf.link_update(old, prog_fd)  # same cgroup: swap the program, no gap
            self._link_fds[pin] = old
            self.report.adopted.append(pin)
            return
        if old is not None:
            os.close(old)
        self._replace_pin(pin, libbpf.link_create(prog_fd, cg_fd, attach_type))

    def detach_cgroup_hooks(self) -> None:
        """Detach the cgroup hooks (benchmarks measure the host without them); attach() again."""
        from sidecar.kernel.unix import UNIX_HOOKS

        for pin, *_ in (*CGROUP_HOOKS, *UNIX_HOOKS):
            fd = self._link_fds.pop(pin, None)
            if fd is not None:
                os.close(fd)
            with suppress(FileNotFoundError):
                (self.links_dir / pin).unlink()  # the last reference: it detaches

    def _open_scope(self) -> int:
        return self._open_cgroup(self.options.scope, "scope cgroup")

    @staticmethod
    def _open_cgroup(path: Path, what: str) -> int:
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as exc:
            raise KernelError(f"{what} {path} cannot be opened: {exc.strerror}") from exc

    def _load_func(self, name: str, prog_type: int, attach_type: int = -1) -> Any:
        try:
            return self._bpf.load_func(name.encode(), prog_type, attach_type=attach_type)
        except Exception as exc:  # bcc raises bare Exception
            raise KernelError(f"BPF program {name} was refused by the kernel: {exc}") from exc

    def _replace_pin(self, pin: str, link_fd: int) -> None:
        """Pin a new link in place of an old one: the new one is attached first."""
        path = self.links_dir / pin
        if path.exists():
            path.unlink()  # the old link detaches; the new one already runs
            self.report.adopted.append(pin)
        else:
            self.report.created.append(pin)
        libbpf.obj_pin(link_fd, path)
        self._link_fds[pin] = link_fd

    # -- teardown --------------------------------------------------------------

    def close(self, *, detach: bool) -> None:
        """Release this run.  ``detach``: also remove links and pinned maps (uninstall)."""
        for fd in self._link_fds.values():
            with suppress(OSError):
                os.close(fd)
        self._link_fds.clear()
        self.close_maps()
        self._close_unix_build()
        if self.unix is not None:
            self.unix.close()
            self.unix = None
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
        if detach:
            uninstall(self.options.pin_dir)


# What a pin directory of ours holds: links/, pinned maps, and v<N>/ per ABI version.
_PINNED_NAMES = frozenset(
    {
        "links",
        "procs",
        "scope",
        "settings",
        "policies",
        "egress",
        "exec_allow",
        "socket_allow",
        "unix_allow",
        "events",
        "lost",
        "lost_reported",
        "handled",
        "delivered",
    }
)
_VERSION_DIR = re.compile(r"^v\d+$")


def _check_ours(pin_dir: Path) -> None:
    """Refuse to remove anything that is not a sidecar pin directory on bpffs."""
    from sidecar.kernel.checks import fs_type_of

    kind = fs_type_of(pin_dir)
    if kind != "bpf":
        raise KernelError(
            f"{pin_dir} is not on a BPF file system (it is on {kind or 'no known mount'}): "
            "refusing to remove it; pass the pin directory (default /sys/fs/bpf/sidecar)"
        )
    for group in [pin_dir, *(d for d in pin_dir.iterdir() if _VERSION_DIR.match(d.name))]:
        strangers = sorted(
            e.name
            for e in group.iterdir()
            if e.name not in _PINNED_NAMES and not (group == pin_dir and _VERSION_DIR.match(e.name))
        )
        if strangers:
            raise KernelError(
                f"{pin_dir} does not look like a sidecar pin directory ({group} holds "
                f"{', '.join(strangers[:5])}): refusing to remove it"
            )


def retire_other_versions(root: Path, abi_dir: str = f"v{abi.ABI_VERSION}") -> list[str]:
    """Detach and remove what builds of another ABI version left pinned.

    Called once this build's programs are attached, its policy is loaded
    and running processes are attested again: until then the old programs
    keep judging from their own maps, so an upgrade has no moment with
    nothing in force (for a while both judge, each from its own maps).
    """
    retired: list[str] = []
    legacy = root / "links"  # ABI 1 pinned straight under the root
    others = [legacy.parent] if legacy.is_dir() else []
    others += [
        d
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name != abi_dir and _VERSION_DIR.match(d.name)
    ]
    for old in others:
        links = old / "links"
        for link in sorted(links.iterdir()) if links.is_dir() else []:
            link.unlink()  # its program detaches
            retired.append(str(link))
        for entry in sorted(old.iterdir()):
            if entry.is_file():
                entry.unlink()
        if links.is_dir():
            links.rmdir()
        if old != root:
            shutil.rmtree(old, ignore_errors=True)
    if retired:
        _logger.info("retired %d links of another build: %s", len(retired), ", ".join(retired))
    return retired


def uninstall(pin_dir: Path) -> list[str]:
    """Remove every link and map pinned under ``pin_dir``: programs detach, state goes.

    Returns what was removed (empty when nothing was there).  Refuses a
    directory that is not on bpffs or holds anything a sidecar does not pin.
    """
    removed: list[str] = []
    if not pin_dir.exists():
        return removed
    _check_ours(pin_dir)
    groups = [pin_dir, *sorted(d for d in pin_dir.iterdir() if _VERSION_DIR.match(d.name))]
    # Links first, everywhere, so no program runs on half-removed state.
    for group in [g / "links" for g in groups] + groups:
        if not group.is_dir():
            continue
        for entry in sorted(group.iterdir()):
            if entry.is_dir():
                continue
            try:
                entry.unlink()
                removed.append(str(entry))
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    raise KernelError(f"cannot remove {entry}: {exc.strerror}") from exc
    for group in reversed(groups):
        with suppress(OSError):
            (group / "links").rmdir()
        with suppress(OSError):
            group.rmdir()
    return removed
