"""Linux capabilities by name, and which ones a policy refuses unless it accepts them.

A process that holds CAP_SYS_ADMIN, CAP_BPF, CAP_SYS_PTRACE or CAP_SYS_MODULE
on the host can switch enforcement off or reach around it (rewrite the
kernel maps, drive an unconfined process, load kernel code).  An identity in
the policy is refused while it holds one of them, unless its `capabilities`
list accepts it.  CAP_NET_ADMIN and CAP_NET_RAW are shown (blast radius,
events), not refused: the socket hooks make raw sockets harmless.
"""

from __future__ import annotations

import functools

# include/uapi/linux/capability.h
NUMBERS: dict[str, int] = {
    "chown": 0,
    "dac_override": 1,
    "dac_read_search": 2,
    "fowner": 3,
    "fsetid": 4,
    "kill": 5,
    "setgid": 6,
    "setuid": 7,
    "setpcap": 8,
    "linux_immutable": 9,
    "net_bind_service": 10,
    "net_broadcast": 11,
    "net_admin": 12,
    "net_raw": 13,
    "ipc_lock": 14,
    "ipc_owner": 15,
    "sys_module": 16,
    "sys_rawio": 17,
    "sys_chroot": 18,
    "sys_ptrace": 19,
    "sys_pacct": 20,
    "sys_admin": 21,
    "sys_boot": 22,
    "sys_nice": 23,
    "sys_resource": 24,
    "sys_time": 25,
    "sys_tty_config": 26,
    "mknod": 27,
    "lease": 28,
    "audit_write": 29,
    "audit_control": 30,
    "setfcap": 31,
    "mac_override": 32,
    "mac_admin": 33,
    "syslog": 34,
    "wake_alarm": 35,
    "block_suspend": 36,
    "audit_read": 37,
    "perfmon": 38,
    "bpf": 39,
    "checkpoint_restore": 40,
}
NAMES = {v: k for k, v in NUMBERS.items()}

# Capabilities that can disable enforcement or reach around it.
DANGEROUS = ("sys_admin", "bpf", "sys_ptrace", "sys_module")
# Shown, never refused.
NOTABLE = ("net_admin", "net_raw")


def parse(text: str) -> int:
    """'CAP_SYS_ADMIN', 'cap_sys_admin' or 'sys_admin' -> 21."""
    name = text.strip().lower()
    name = name.removeprefix("cap_")
    if name not in NUMBERS:
        raise ValueError(f"'{text}' is not a Linux capability (for example CAP_SYS_ADMIN)")
    return NUMBERS[name]


def label(number: int) -> str:
    return f"CAP_{NAMES.get(number, str(number)).upper()}"


def mask(numbers: frozenset[int] | set[int] | tuple[int, ...]) -> int:
    out = 0
    for n in numbers:
        out |= 1 << n
    return out


def labels(bits: int) -> list[str]:
    """Names of the capabilities set in a mask, lowest first."""
    return [label(n) for n in range(64) if bits >> n & 1]


@functools.cache
def refused_mask(accepted: frozenset[int]) -> int:
    """The dangerous capabilities an identity may not hold, given what it accepts."""
    return mask({NUMBERS[n] for n in DANGEROUS} - accepted)
