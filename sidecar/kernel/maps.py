"""The pinned maps and ring buffer, opened from bpffs: everything a running daemon needs.

The daemon itself never compiles or loads programs: a short-lived step
(``sidecar.kernel.prepare``) does that with BCC and pins the maps and links,
then exits and takes the compiler's memory with it.  What stays in the daemon
is this: map file descriptors opened from their pins, read and written
through libbpf's system-call wrappers, and the ring-buffer reader.
"""

from __future__ import annotations

import ctypes
import os
import time
from contextlib import suppress
from pathlib import Path
from typing import NamedTuple

from sidecar.kernel import abi, libbpf
from sidecar.kernel.ring import Ring
from sidecar.util.errors import KernelError

#: Slots of the pinned ``delivered`` map: the ring position each output of the
#: daemon has written through, then the sink's intent (the position and the
#: file size of a batch being flushed; see sidecar.daemon.outputs.Delivery).
DELIVERED = ("sink", "export", "sink_intent", "sink_intent_end")
BATCH = 8192  # map entries per batched update
_U32 = ctypes.c_uint32
_U64 = ctypes.c_uint64

#: Policy maps and the key type that carries each entry's generation.
POLICY_MAPS: tuple[tuple[str, type[ctypes.Structure]], ...] = (
    ("policies", abi.PolicyKey),
    ("egress", abi.EgressKey),
    ("exec_allow", abi.ExecKey),
    ("socket_allow", abi.SocketKey),
    ("unix_allow", abi.UnixKey),
)


def _u32(n: int) -> bytes:
    return bytes(_U32(n))


class ProcEntry(NamedTuple):
    """A process's entry in the kernel's process map."""

    identity: int
    ppid: int
    start_ns: int = 0  # task start, ns since boot, as of the last exec the kernel saw; 0: none


class KernelMaps:
    """Maps pinned under one ABI version's directory (``<pinDir>/v<N>``)."""

    def __init__(self, pin_dir: Path) -> None:
        self.pin_dir = pin_dir
        self._fds: dict[str, int] = {}
        self._sizes: dict[str, tuple[int, int]] = {}
        self._ring: Ring | None = None
        self._scope_id = 0
        self._scope_level = 0
        #: Why unix sockets are not judged on this host (None: they are).
        self.unix_problem: str | None = None

    # -- opening -------------------------------------------------------------

    def fd(self, name: str) -> int:
        """File descriptor of the pinned map ``name`` (opened once)."""
        fd = self._fds.get(name)
        if fd is None:
            path = self.pin_dir / name
            fd = libbpf.obj_get(path)
            if fd is None:
                raise KernelError(
                    f"pinned map {path} is missing: the programs are not loaded "
                    "(start the daemon, which loads them)"
                )
            info = libbpf.map_info(fd)
            self._fds[name] = fd
            self._sizes[name] = (int(info.key_size), int(info.value_size))
        return fd

    def _lookup(self, name: str, key: bytes) -> bytes | None:
        fd = self.fd(name)
        return libbpf.map_lookup(fd, key, self._sizes[name][1])

    def _u64_at(self, name: str, index: int) -> int:
        """The u64 at ``index`` of an array map."""
        raw = self._lookup(name, _u32(index))
        return int.from_bytes(raw[:8], "little") if raw else 0

    # -- ring buffer ---------------------------------------------------------

    @property
    def ring(self) -> Ring:
        """The pinned ring buffer, read with a cursor and consumed on commit."""
        if self._ring is None:
            fd = self.fd("events")
            self._ring = Ring(fd, libbpf.map_max_entries(fd))
        return self._ring

    def poll(self, timeout_ms: int) -> list[bytes]:
        """Wait up to ``timeout_ms`` for records; returns and consumes those that arrived."""
        got = self.ring.read(timeout_ms)
        self.ring.commit(got.cursor)
        return got.records

    def delivered(self) -> dict[str, int]:
        """Ring position each output has written through (see :meth:`set_delivered`)."""
        return {name: self._u64_at("delivered", i) for i, name in enumerate(DELIVERED)}

    def set_delivered(self, output: str, position: int) -> None:
        """``output`` wrote the events of every record before ``position`` (pinned)."""
        libbpf.map_update(
            self.fd("delivered"), _u32(DELIVERED.index(output)), bytes(_U64(position))
        )

    # -- losses ----------------------------------------------------------------

    def lost_counts(self) -> dict[abi.EventType, int]:
        """Records the kernel could not reserve, summed over CPUs, by type."""
        fd = self.fd("lost")
        cpus = libbpf.possible_cpus()
        out: dict[abi.EventType, int] = {}
        for t in abi.EventType:
            raw = libbpf.map_lookup(fd, _u32(int(t)), 8 * cpus) or b""
            out[t] = sum((_U64 * cpus).from_buffer_copy(raw.ljust(8 * cpus, b"\0")))
        return out

    def lost_reported_counts(self) -> dict[abi.EventType, int]:
        """What daemons have reported lost so far, by type (pinned across restarts)."""
        return {t: self._u64_at("lost_reported", int(t)) for t in abi.EventType}

    def set_lost_reported(self, counts: dict[abi.EventType, int]) -> None:
        fd = self.fd("lost_reported")
        for t, n in counts.items():
            libbpf.map_update(fd, _u32(int(t)), bytes(_U64(n)))

    # -- process map -------------------------------------------------------------

    def proc_state(self, pid: int) -> ProcEntry | None:
        """What the kernel holds for a process, or None."""
        raw = self._lookup("procs", _u32(pid))
        if raw is None:
            return None
        leaf = abi.ProcState.from_buffer_copy(raw)
        return ProcEntry(int(leaf.identity), int(leaf.ppid), int(leaf.start_ns))

    def holds_process(self, pid: int, start_ns: int) -> bool:
        """Does ``pid`` still name the process that started at ``start_ns`` (ns since boot)?

        The kernel writes a process's start time into its entry at each
        exec and removes the entry when the process ends, before its pid can
        be reused: while the entry shows that start time, the pid is still
        that process's.  False also when the entry shows none (0), which
        says nothing either way.
        """
        state = self.proc_state(pid)
        return state is not None and start_ns != 0 and state.start_ns == start_ns

    def set_identity(
        self, pid: int, identity: int, ppid: int = 0, *, create: bool = False, start_ns: int = 0
    ) -> bool:
        """Write ``pid``'s identity; False when it has no entry (it exited) and not ``create``.

        Only an entry the kernel made is updated: a write that lands after
        the process exited must not leave an identity behind for the next
        process to get that pid.  ``create``: for processes that ran before
        the programs were loaded (start-up).  A ``ppid`` of 0 keeps the
        entry's parent and start time; otherwise ``start_ns`` is written
        with it (what the caller knows of the entry, 0 for nothing).
        """
        if not ppid:
            current = self.proc_state(pid)
            if current is None and not create:
                return False
            ppid, start_ns = (current.ppid, current.start_ns) if current else (0, start_ns)
        return libbpf.map_update(
            self.fd("procs"),
            _u32(pid),
            bytes(abi.ProcState(identity, ppid, start_ns)),
            libbpf.BPF_ANY if create else libbpf.BPF_EXIST,
        )

    # -- settings ----------------------------------------------------------------

    def set_scope(self, cgroup_fd: int, scope_id: int, level: int) -> None:
        """The cgroup whose subtree is in scope (its fd goes into the cgroup array)."""
        libbpf.map_update(self.fd("scope"), _u32(0), _u32(cgroup_fd))
        self._scope_id, self._scope_level = scope_id, level
        flags, gen = self.settings()
        self._write_settings(flags, gen)

    def _settings(self) -> abi.Settings:
        raw = self._lookup("settings", _u32(0))
        return abi.Settings.from_buffer_copy(raw) if raw else abi.Settings()

    def settings(self) -> tuple[int, int]:
        """(flags, policy generation) the kernel judges with now."""
        leaf = self._settings()
        if not self._scope_id:  # opened from pins: keep the scope the loader set
            self._scope_id, self._scope_level = int(leaf.scope_id), int(leaf.scope_level)
        return int(leaf.flags), int(leaf.policy_gen)

    def set_settings(self, *, attest: bool | None = None, policy_gen: int | None = None) -> None:
        """Change settings (and beat the heart); ``policy_gen`` also marks a policy loaded.

        One map write, so the kernel never sees half of a change.
        """
        flags, gen = self.settings()
        if attest is not None:
            flags = flags | abi.SETTING_ATTEST if attest else flags & ~abi.SETTING_ATTEST
        if policy_gen is not None:
            flags |= abi.SETTING_POLICY
            gen = policy_gen
        self._write_settings(flags, gen)

    def _write_settings(self, flags: int, gen: int) -> None:
        leaf = abi.Settings(flags, gen, time.monotonic_ns(), self._scope_id, self._scope_level, 0)
        libbpf.map_update(self.fd("settings"), _u32(0), bytes(leaf))

    def heartbeat(self) -> None:
        """Tell the kernel a daemon is alive to attest new images."""
        self.set_settings()

    def clear_policy(self) -> None:
        """Stop judging: no policy loaded (programs observe only)."""
        flags, gen = self.settings()
        self._write_settings(flags & ~abi.SETTING_POLICY, gen)

    # -- policy maps ---------------------------------------------------------------

    def write_entries(self, name: str, entries: list[tuple[bytes, bytes]]) -> None:
        """Write packed (key, value) entries, in batches of one system call where possible."""
        if not entries:
            return
        fd = self.fd(name)
        try:
            for start in range(0, len(entries), BATCH):
                chunk = entries[start : start + BATCH]
                keys = b"".join(k for k, _ in chunk)
                values = b"".join(v for _, v in chunk)
                if not libbpf.map_update_batch(fd, keys, values, len(chunk)):
                    for key, value in chunk:
                        libbpf.map_update(fd, key, value)
        except KernelError as exc:
            raise KernelError(f"cannot write the {name} map: {exc}") from exc

    def delete_entries(self, name: str, keys: list[bytes]) -> None:
        """Delete known keys (what a previous load wrote), without scanning the map."""
        fd = self.fd(name)
        for key in keys:
            libbpf.map_delete(fd, key)

    def delete_generation(self, gen: int) -> int:
        """Remove every policy entry of one generation; returns how many."""
        removed = 0
        for name, key_t in POLICY_MAPS:
            fd = self.fd(name)
            doomed = [
                k
                for k in libbpf.map_keys(fd, self._sizes[name][0])
                if key_t.from_buffer_copy(k).gen == gen
            ]
            for k in doomed:
                libbpf.map_delete(fd, k)
            removed += len(doomed)
        return removed

    # -- teardown --------------------------------------------------------------

    def retire_other_versions(self) -> list[str]:
        """Detach what builds of another ABI version left pinned (see loader)."""
        from sidecar.kernel.loader import retire_other_versions

        return retire_other_versions(self.pin_dir.parent, self.pin_dir.name)

    def close(self, *, detach: bool) -> None:
        """Release this run.  ``detach``: also remove links and pinned maps (uninstall)."""
        self.close_maps()
        if detach:
            from sidecar.kernel.loader import uninstall

            uninstall(self.pin_dir.parent)

    def close_maps(self) -> None:
        if self._ring is not None:
            self._ring.close()
            self._ring = None
        for fd in self._fds.values():
            with suppress(OSError):
                os.close(fd)
        self._fds.clear()
