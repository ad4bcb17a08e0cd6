"""The sizes and limits of the kernel contract: the one Python home of each.

Field lengths of the records and map keys in ``bpf/include/events.h``, the
port rules the kernel scans per prefix, the bits of a port rule's protocol
set, the LPM prefix base, and the number of entries of every map in
``bpf/maps.h``.

This module imports nothing, on purpose.  The policy package is
kernel-neutral (it validates and compiles YAML on machines without BCC,
libbpf or root), yet it must refuse what the kernel cannot hold: more port
rules under one prefix than the kernel scans, an executable path longer
than an exec record carries.  So it imports these numbers from here rather
than keeping copies: one definition, no copy to drift, and no path from the
policy into :mod:`sidecar.kernel.abi` (ctypes, the decoder) or the BCC and
libbpf modules.  ``tests/unit/test_policy_validation.py`` proves importing
the policy loads no other kernel module.

How each number reaches C:

- field lengths and the other header constants are ``#define``\\ s of
  ``events.h`` (the clang-built ``unix.bpf.c`` includes it too, without the
  loader's flags); ``tests/unit/test_abi_layout.py`` compiles the header and
  fails on any ``SIDECAR_*`` constant whose value differs from here or from
  :mod:`sidecar.kernel.abi`, or that has no Python counterpart at all;
- map sizes are passed by the loader as ``-D`` flags, and ``maps.h`` has no
  value of its own (it stops the build when one is missing), so a size
  changed here is the size the kernel gets.
"""

from __future__ import annotations

# -- record and key fields (events.h) ------------------------------------------

COMM_LEN = 16  # task_ctx.comm, the kernel's TASK_COMM_LEN
FILENAME_LEN = 256  # exec_event.filename, NUL included
ARGS_LEN = 1024  # exec_event.args: NUL-separated argv, truncated
ARG_MAX = 256  # one argument in exec_event.args, NUL included, truncated
MAX_ARGS = 32  # arguments read per exec
ADDR_LEN = 16  # connect_event.daddr, egress_key.addr: IPv6 space, IPv4 mapped
UNIX_PATH_LEN = 108  # unix_event.path, unix_key.path: sizeof(sockaddr_un.sun_path)

#: The longest executable path an exec record carries whole (the NUL takes a byte).
EXEC_PATH_MAX_BYTES = FILENAME_LEN - 1

# -- egress rules (events.h) -------------------------------------------------------

MAX_PORT_RULES = 8  # port rules under one prefix; the kernel scans them all
RULE_NUMBER_MAX = 0xFFFF  # port_rule.rule is a __u16 (rule index + 1, 0 = default)
PROTO_TCP = 0x1  # port_rule.protocols bits
PROTO_UDP = 0x2

#: Bits of an LPM key before the address or path: gen and identity, two __u32.
#: egress_key and unix_key count prefixlen from gen on.
LPM_PREFIX_BASE = 64

# -- map sizes (maps.h, passed as -D flags) ----------------------------------------

# Each policy map holds two generations of the largest policy that
# `policy validate` accepts (sidecar/policy/model.py limits, checked by
# tests/unit/test_abi_layout.py): a reload writes one while the other judges.
POLICIES_MAX = 20_480  # 2 x (10,000 identities + the default and pending entries)
EGRESS_MAX = 409_600  # 2 x 200,000 CIDRs (one compiled prefix per CIDR at most)
EXEC_ALLOW_MAX = 102_400  # 2 x 50,000 executables
SOCKET_ALLOW_MAX = 8_192  # 2 x 4,096 socket kinds
UNIX_ALLOW_MAX = 8_192  # 2 x 4,096 unix socket addresses

#: lost and lost_reported are indexed by event type: room for types 0..7.
#: (delivered has a slot per output of the daemon: len(sidecar.kernel.maps.DELIVERED).)
EVENT_TYPE_SLOTS = 8

# The process map and the ring buffer are sized by configuration, within these.
PROCS_MAX_DEFAULT = 65_536
PROCS_MAX_RANGE = (1_024, 4_194_304)
RINGBUF_PAGES_DEFAULT = 256  # a power of two
RINGBUF_PAGES_MAX = 65_536
RINGBUF_PAGE_BYTES = 4_096  # the ring buffer's size is a multiple of the page size
