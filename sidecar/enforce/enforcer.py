"""From a compiled policy to the kernel's policy maps, swapped in atomically.

The kernel programs judge from three pinned maps whose keys all carry a
generation (0 or 1).  A load writes the generation not in force, completely,
then flips ``settings.policy_gen`` with one map write; every decision reads
the generation once, so no connect or exec is ever judged by a mix of two
policies.  The old generation is deleted only after a grace period far
longer than any program run, so a decision that started just before the
flip still finds its entries.

Identity numbers in the maps are derived from the SPIFFE ID alone (a hash),
so a restarted daemon, or the kernel after the daemon died, agrees on them
without any saved state.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Protocol

from sidecar.kernel import abi
from sidecar.policy import CompiledIdentity, CompiledPolicy, caps
from sidecar.proc.read import kernel_dev
from sidecar.util.errors import PolicyError

_logger = logging.getLogger(__name__)

GRACE_SECONDS = 0.05  # a BPF program runs for microseconds


def identity_number(spiffe_id: str) -> int:
    """Stable number of an identity in kernel maps (never 0 or the pending marker)."""
    digest = hashlib.sha256(spiffe_id.encode()).digest()
    return int.from_bytes(digest[:4], "little") % (abi.IDENTITY_PENDING - 1) + 1


class IdentityNumbers:
    """SPIFFE ID <-> kernel number, with collisions refused."""

    def __init__(self) -> None:
        self._by_number: dict[int, str] = {}
        self._by_name: dict[str, int] = {}  # the hash, once per identity

    def number(self, spiffe_id: str) -> int:
        n = self._by_name.get(spiffe_id)
        if n is not None:
            return n
        n = identity_number(spiffe_id)
        other = self._by_number.setdefault(n, spiffe_id)
        if other != spiffe_id:
            raise PolicyError(
                f"identities {other} and {spiffe_id} hash to the same kernel number {n}; "
                "rename one of them"
            )
        self._by_name[spiffe_id] = n
        return n

    def known(self) -> list[str]:
        return sorted(self._by_number.values())

    def name(self, number: int) -> str | None:
        if number == abi.IDENTITY_PENDING:
            return None
        return self._by_number.get(number)


class PolicyMaps(Protocol):
    """What the enforcer needs of the loaded programs (KernelPrograms has it)."""

    def settings(self) -> tuple[int, int]: ...
    def set_settings(
        self, *, attest: bool | None = None, policy_gen: int | None = None
    ) -> None: ...
    def write_entries(self, name: str, entries: list[tuple[bytes, bytes]]) -> None: ...
    def delete_generation(self, gen: int) -> int: ...
    def delete_entries(self, name: str, keys: list[bytes]) -> None: ...
    def clear_policy(self) -> None: ...


@dataclass(frozen=True)
class ExecFile:
    """An allowed executable as the kernel knows it: the file, and when it last changed."""

    dev: int  # kernel dev_t (MAJOR << 20 | MINOR)
    ino: int
    ctime_ns: int

    @classmethod
    def of(cls, path: str) -> ExecFile:
        st = os.stat(path)  # follows symlinks: the kernel sees the file that runs
        return cls(kernel_dev(st.st_dev), st.st_ino, st.st_ctime_ns)


@dataclass
class Generation:
    """What was written into one generation."""

    gen: int
    version: str
    policy: CompiledPolicy | None = None
    entries: int = 0
    # identity number -> each executable it may run
    exec_files: dict[int, set[ExecFile]] = field(default_factory=dict)


@dataclass
class MapEntries:
    # (key, value) bytes per map, in the layouts of bpf/include/events.h
    policies: list[tuple[bytes, bytes]] = field(default_factory=list)
    egress: list[tuple[bytes, bytes]] = field(default_factory=list)
    exec_allow: list[tuple[bytes, bytes]] = field(default_factory=list)
    socket_allow: list[tuple[bytes, bytes]] = field(default_factory=list)
    unix_allow: list[tuple[bytes, bytes]] = field(default_factory=list)
    # identity number -> each allowed executable, for the userspace check
    exec_files: dict[int, set[ExecFile]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.policies) + len(self.egress) + len(self.exec_allow) + len(self.socket_allow)


def _flags(mode: str, log_allowed: bool) -> int:
    flags = abi.POLICY_ENFORCE if mode == "enforce" else 0
    return flags | (abi.POLICY_LOG_ALLOWED if log_allowed else 0)


def _identity_entries(
    out: MapEntries, gen: int, number: int, ident: CompiledIdentity, log_allowed: bool
) -> None:
    flags = _flags(ident.mode, log_allowed)
    if ident.exec_paths is not None:
        # The kernel judges the file that runs, not its path: each allowed
        # path is taken as the file it names now (device, inode) and the time
        # it last changed.  A file replaced or modified after this is refused
        # until the policy is loaded again.
        flags |= abi.POLICY_EXEC_RESTRICTED
        files: set[ExecFile] = set()
        for path in sorted(ident.exec_paths):
            try:
                files.add(ExecFile.of(path))
            except OSError as exc:
                _logger.warning(
                    "policy allows %s for %s, but it cannot be read (%s): it will not run",
                    path,
                    ident.spiffe_id,
                    exc.strerror,
                )
        for f in sorted(files, key=lambda f: (f.dev, f.ino)):
            sec, nsec = divmod(f.ctime_ns, 1_000_000_000)
            out.exec_allow.append(
                (abi.EXEC_KEY.pack(gen, number, f.dev, 0, f.ino), abi.EXEC_FILE.pack(sec, nsec, 0))
            )
        out.exec_files[number] = files
    if ident.unix is not None:
        flags |= abi.POLICY_UNIX_RESTRICTED
        for raw, is_prefix in sorted(ident.unix):
            # An exact address matches its bytes and the NUL after them, nothing longer.
            bits = 8 * (len(raw) if is_prefix else len(raw) + 1)
            out.unix_allow.append(
                (
                    abi.UNIX_KEY.pack(
                        abi.LPM_PREFIX_BASE + bits, gen, number, raw.ljust(abi.UNIX_PATH_LEN, b"\0")
                    ),
                    b"\1",
                )
            )
    for family, stype, proto in sorted(ident.sockets):
        out.socket_allow.append((abi.SOCKET_KEY.pack(gen, number, family, stype, proto, 0), b"\1"))
    refused = caps.refused_mask(ident.capabilities)
    out.policies.append(
        (abi.POLICY_KEY.pack(gen, number), abi.IDENTITY_POLICY.pack(flags, 0, refused))
    )
    egress_key = abi.EGRESS_KEY.pack
    rules_cache: dict[object, bytes] = {}  # prefixes share few distinct rule sets
    for prefix in ident.prefixes:
        value = rules_cache.get(prefix.rules)
        if value is None:
            try:
                value = abi.pack_egress_rules(
                    [
                        (r.port_lo, r.port_hi, r.protocol_mask, r.rule_index + 1)
                        for r in prefix.rules
                    ]
                )
            except ValueError as exc:
                raise PolicyError(f"{ident.spiffe_id}: {exc}") from exc
            rules_cache[prefix.rules] = value
        out.egress.append(
            (
                egress_key(abi.LPM_PREFIX_BASE + prefix.prefix_len, gen, number, prefix.address),
                value,
            )
        )


def build_entries(policy: CompiledPolicy, gen: int, numbers: IdentityNumbers) -> MapEntries:
    """All map entries of ``policy`` for generation ``gen`` (pure, no kernel)."""
    out = MapEntries()
    # The default: identity 0 stands for every process the policy does not list.
    default_flags = abi.POLICY_ENFORCE if policy.unidentified == "deny" else abi.POLICY_EGRESS_ANY
    if policy.log_allowed:
        default_flags |= abi.POLICY_LOG_ALLOWED
    out.policies.append(
        (abi.POLICY_KEY.pack(gen, abi.IDENTITY_NONE), abi.IDENTITY_POLICY.pack(default_flags, 0, 0))
    )
    enforcing = any(i.mode == "enforce" for i in policy.identities.values())
    # Pending (exec'd, not yet attested) may do nothing its identity could not: nothing at all.
    pending = (abi.POLICY_ENFORCE if enforcing else 0) | (
        abi.POLICY_LOG_ALLOWED if policy.log_allowed else 0
    )
    if policy.identities:
        out.policies.append(
            (
                abi.POLICY_KEY.pack(gen, abi.IDENTITY_PENDING),
                abi.IDENTITY_POLICY.pack(pending, 0, 0),
            )
        )
    for spiffe_id, ident in sorted(policy.identities.items()):
        _identity_entries(out, gen, numbers.number(spiffe_id), ident, policy.log_allowed)
    return out


class Enforcer:
    """Loads policies into the kernel maps, one generation at a time."""

    def __init__(self, maps: PolicyMaps, numbers: IdentityNumbers) -> None:
        self.maps = maps
        self.numbers = numbers
        self.active: Generation | None = None
        # What each generation holds, to name versions and rules in events
        # judged just before or after a flip.
        self.generations: dict[int, Generation] = {}
        self._written: dict[int, MapEntries] = {}

    def adopt(self) -> None:
        """Take over a generation a previous daemon left in force (nothing to write)."""
        flags, gen = self.maps.settings()
        if flags & abi.SETTING_POLICY:
            self.active = Generation(gen=gen, version="(previous run)")

    def load(self, policy: CompiledPolicy) -> Generation:
        """Write ``policy`` into the idle generation and put it in force."""
        problem = getattr(self.maps, "unix_problem", None)
        uses_unix = sorted(s for s, i in policy.identities.items() if i.unix is not None)
        if uses_unix and problem is not None:
            raise PolicyError(
                f"{policy.source}: {uses_unix[0]} lists unix socket addresses, which this host "
                f"cannot judge ({problem}); the policy is refused rather than left unenforced"
            )
        flags, current = self.maps.settings()
        in_force = bool(flags & abi.SETTING_POLICY)
        gen = 1 - current if in_force else current
        entries = build_entries(policy, gen, self.numbers)
        self._clear(gen)  # leftovers of an earlier load
        self.maps.write_entries("policies", entries.policies)
        self.maps.write_entries("egress", entries.egress)
        self.maps.write_entries("exec_allow", entries.exec_allow)
        self.maps.write_entries("socket_allow", entries.socket_allow)
        self.maps.write_entries("unix_allow", entries.unix_allow)
        self.maps.set_settings(policy_gen=gen)  # the flip: one map write
        self._written[gen] = entries
        if in_force:
            time.sleep(GRACE_SECONDS)
            self._clear(1 - gen)
        self.active = Generation(gen, policy.version, policy, len(entries), entries.exec_files)
        self.generations[gen] = self.active
        return self.active

    def _clear(self, gen: int) -> None:
        """Empty one generation: by the keys we wrote, or by scanning when we did not write it."""
        written = self._written.pop(gen, None)
        if written is None:
            self.maps.delete_generation(gen)
            return
        self.maps.delete_entries("policies", [k for k, _ in written.policies])
        self.maps.delete_entries("egress", [k for k, _ in written.egress])
        self.maps.delete_entries("exec_allow", [k for k, _ in written.exec_allow])
        self.maps.delete_entries("socket_allow", [k for k, _ in written.socket_allow])
        self.maps.delete_entries("unix_allow", [k for k, _ in written.unix_allow])

    def unload(self) -> None:
        flags, gen = self.maps.settings()
        self.maps.clear_policy()
        if flags & abi.SETTING_POLICY:
            time.sleep(GRACE_SECONDS)
            self._clear(gen)
        self.active = None

    def generation(self, gen: int) -> Generation | None:
        return self.generations.get(gen)
