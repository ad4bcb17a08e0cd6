/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * The contract between the kernel programs and the daemon.
 *
 * Every record in the ring buffer starts with struct event_header; the daemon
 * decodes records through ctypes mirrors of these structs (sidecar/kernel/
 * abi.py), and a test compiles this header and compares sizeof/offsetof with
 * the mirrors.  Fixed-width fields only, explicit padding, no pointers.
 * Bump SIDECAR_ABI_VERSION on any change of layout or meaning: the pinned
 * maps live under a directory named after it, so an old daemon's state is
 * never read with the wrong layout.
 */
#ifndef SIDECAR_EVENTS_H
#define SIDECAR_EVENTS_H

#include <linux/types.h>

#define SIDECAR_ABI_VERSION 3

/*
 * Limits.  Their Python definitions are in sidecar/kernel/limits.py (abi.py for the rest);
 * tests/unit/test_abi_layout.py fails on any SIDECAR_* constant here whose
 * value differs from Python's or that Python does not have.
 */
#define SIDECAR_COMM_LEN 16
#define SIDECAR_FILENAME_LEN 256 /* an exec's path, NUL included: longer ones are cut */
#define SIDECAR_ARGS_LEN 1024 /* NUL-separated argv, truncated */
#define SIDECAR_ARG_MAX 256   /* one argument, truncated */
#define SIDECAR_MAX_ARGS 32
#define SIDECAR_ADDR_LEN 16   /* an address in the IPv6 space, IPv4 as ::ffff:a.b.c.d */
#define SIDECAR_MAX_PORT_RULES 8
#define SIDECAR_RULE_NUMBER_MAX 0xffff /* port_rule.rule is a __u16 */
#define SIDECAR_UNIX_PATH_LEN 108 /* sizeof(sockaddr_un.sun_path) */
/* LPM trie keys count prefixlen from gen on: gen and identity are 64 bits. */
#define SIDECAR_LPM_PREFIX_BASE 64

/* Record types. */
enum sidecar_event_type {
	SIDECAR_EVENT_EXEC = 1,
	SIDECAR_EVENT_FORK = 2,
	SIDECAR_EVENT_EXIT = 3,
	SIDECAR_EVENT_CONNECT = 4,
	SIDECAR_EVENT_SOCKET = 5,
	SIDECAR_EVENT_UNIX = 6,
};

/* Identity numbers in the procs map. 0 and the top values are reserved. */
#define SIDECAR_IDENTITY_NONE 0u          /* attested: no registered identity */
#define SIDECAR_IDENTITY_PENDING 0xffffffffu /* exec seen, not yet attested */

/* Verdicts carried by exec and connect records. */
enum sidecar_verdict {
	SIDECAR_VERDICT_ALLOW = 1,
	SIDECAR_VERDICT_DENY = 2,
	SIDECAR_VERDICT_WOULD_DENY = 3,
};

/* Which hook saw a connection attempt. */
enum sidecar_hook {
	SIDECAR_HOOK_CONNECT4 = 1,
	SIDECAR_HOOK_CONNECT6 = 2,
	SIDECAR_HOOK_SENDMSG4 = 3,
	SIDECAR_HOOK_SENDMSG6 = 4,
	SIDECAR_HOOK_SOCKET_CREATE = 5, /* socket(): family, type, protocol */
	SIDECAR_HOOK_SETSOCKOPT = 6,    /* setsockopt(): a source-routing option */
	SIDECAR_HOOK_CONNECT_UNIX = 7,  /* connect() on a unix socket */
	SIDECAR_HOOK_SENDMSG_UNIX = 8,  /* sendmsg() to a unix socket address */
};

/* Flags of struct settings. */
#define SIDECAR_SETTING_ATTEST 0x1 /* mark new execs pending until attested */
#define SIDECAR_SETTING_POLICY 0x2 /* a policy is loaded: judge connects and execs */

/* Flags of struct identity_policy. */
#define SIDECAR_POLICY_ENFORCE 0x1         /* deny; without it, report would_deny */
#define SIDECAR_POLICY_EGRESS_ANY 0x2      /* no egress allowlist: every destination */
#define SIDECAR_POLICY_EXEC_RESTRICTED 0x4 /* only executables in exec_allow */
#define SIDECAR_POLICY_LOG_ALLOWED 0x8     /* report allowed decisions too */
#define SIDECAR_POLICY_UNIX_RESTRICTED 0x10 /* only unix socket addresses in unix_allow */

/* Protocol bits of struct port_rule. */
#define SIDECAR_PROTO_TCP 0x1
#define SIDECAR_PROTO_UDP 0x2

/* Flags of exec records. */
#define SIDECAR_EXEC_ARGS_TRUNCATED 0x1 /* argv cut: over 32 args, over 1 KiB, or an arg over 255 bytes */
#define SIDECAR_EXEC_NO_ARGS 0x2 /* argv could not be read */
#define SIDECAR_EXEC_FILE_CHANGED 0x4 /* an allowed file, changed since the policy allowed it */
#define SIDECAR_EXEC_FILE_UNKNOWN 0x8 /* the running file could not be read */
#define SIDECAR_EXEC_PRIVILEGED 0x10  /* holds capabilities its policy does not accept */
#define SIDECAR_EXEC_UNTRACKED 0x20   /* holds an identity, the process map is full: killed */

struct event_header {
	__u16 type;    /* enum sidecar_event_type */
	__u16 version; /* SIDECAR_ABI_VERSION */
	__u32 size;    /* bytes of the whole record */
	__u64 ts_ns;   /* bpf_ktime_get_ns(), CLOCK_MONOTONIC */
};

/* Who did it: the calling task, as the kernel saw it. */
struct task_ctx {
	__u32 pid;      /* thread group id */
	__u32 tid;      /* thread id */
	__u32 ppid;     /* parent's thread group id, 0 if unknown to the kernel maps */
	__u32 uid;
	__u32 gid;
	__u32 identity; /* SIDECAR_IDENTITY_* or a registered identity number */
	__u64 cgroup_id;
	char comm[SIDECAR_COMM_LEN];
};

/*
 * Sent only up to the end of the argv actually read: hdr.size is
 * offsetof(struct exec_event, args) + args_len, not sizeof(struct exec_event).
 */
struct exec_event {
	struct event_header hdr;
	struct task_ctx task;
	__u32 old_pid;      /* thread that called exec (differs from pid after de-thread) */
	__u32 flags;        /* SIDECAR_EXEC_* */
	__u32 policy_gen;   /* policy generation that judged it */
	__u16 filename_len; /* bytes in filename, including the NUL */
	__u16 args_len;     /* bytes used in args */
	__u16 args_count;   /* arguments read */
	__u8 verdict;       /* enum sidecar_verdict */
	__u8 pad;
	__u32 exe_dev;      /* the file the new image runs: its device (kernel encoding) */
	__u64 caps_refused; /* SIDECAR_EXEC_PRIVILEGED: the capabilities held and refused */
	/*
	 * What attestation needs of the process, as it was at this exec, so
	 * that it reads no /proc file for them: the effective capabilities as
	 * they count on the host (none in a user namespace of its own), the
	 * start time (task start_boottime, ns since boot; /proc/PID/stat shows
	 * it in clock ticks) and the running file's inode (0: unread, with
	 * SIDECAR_EXEC_FILE_UNKNOWN).
	 */
	__u64 caps_host;
	__u64 start_ns;
	__u64 exe_ino;
	char filename[SIDECAR_FILENAME_LEN];
	char args[SIDECAR_ARGS_LEN];
};

struct fork_event {
	struct event_header hdr;
	struct task_ctx task; /* the parent */
	__u32 child_pid;
	__u32 pad;
};

struct exit_event {
	struct event_header hdr;
	struct task_ctx task;
};

struct connect_event {
	struct event_header hdr;
	struct task_ctx task;
	__u8 family;   /* AF_INET or AF_INET6 as the caller spelled it */
	__u8 protocol; /* IPPROTO_TCP or IPPROTO_UDP */
	__u8 hook;     /* enum sidecar_hook */
	__u8 verdict;  /* enum sidecar_verdict */
	__u16 dport;   /* host byte order */
	__u16 pad;
	__u8 daddr[SIDECAR_ADDR_LEN]; /* IPv6 space; IPv4 as ::ffff:a.b.c.d */
	__u32 rule;     /* rule index + 1, 0 = default */
	__u32 policy_gen;
};

/* A socket the kernel judged at creation, or a socket option it refused. */
struct socket_event {
	struct event_header hdr;
	struct task_ctx task;
	__u16 family;
	__u16 type;
	__u16 protocol;
	__u8 hook;    /* SIDECAR_HOOK_SOCKET_CREATE or SIDECAR_HOOK_SETSOCKOPT */
	__u8 verdict; /* enum sidecar_verdict */
	__s32 level;  /* setsockopt level, 0 for socket creation */
	__s32 optname;
	__u32 policy_gen;
	__u32 pad;
};

/*
 * A unix socket address an identity connected or sent to (or would have).
 * path is sun_path as the caller passed it: for an abstract name, a NUL
 * byte and the name; path_len counts the bytes given.
 */
struct unix_event {
	struct event_header hdr;
	struct task_ctx task;
	__u8 hook;    /* SIDECAR_HOOK_CONNECT_UNIX or SIDECAR_HOOK_SENDMSG_UNIX */
	__u8 verdict; /* enum sidecar_verdict */
	__u16 path_len;
	__u32 policy_gen;
	char path[SIDECAR_UNIX_PATH_LEN];
	__u32 pad;
};

/* Kernel-side state of one process (key: thread group id). */
struct proc_state {
	__u32 identity;
	__u32 ppid;
	/* task start_boottime, set at each exec (0 until one is seen): the
	 * daemon checks it to know the pid still names the process whose exec
	 * it attests, without a pidfd */
	__u64 start_ns;
};

/*
 * The last process event the programs handled, per CPU.  A daemon that
 * starts while an earlier one's programs are attached attaches its own
 * before the old ones go, so that no exec goes unjudged; but the kernel
 * frees an unpinned link later, from a work queue, and for that moment
 * both builds run on each event, one after the other on the same CPU with
 * nothing in between.  The one that finds the very event it was called for
 * noted by another build does nothing: each event is handled, and
 * recorded, once.
 */
struct handled_mark {
	__u64 task;  /* pid_tgid of the task the event is about */
	__u64 key;   /* what tells this event from the task's others (see process.bpf.c) */
	__u32 build; /* SIDECAR_BUILD_ID of the programs that handled it */
	__u32 kind;  /* SIDECAR_EVENT_* */
};

/*
 * The daemon writes a heartbeat into settings at least every second.  When
 * it is older than this, the daemon is gone: new execs are no longer marked
 * pending (nobody would attest them) and fall to the policy's default.
 */
#define SIDECAR_HEARTBEAT_STALE_NS 5000000000ULL

/* Daemon-written settings, one entry at index 0. */
struct settings {
	__u32 flags;        /* SIDECAR_SETTING_* */
	__u32 policy_gen;   /* generation of the policy maps in force (0 or 1) */
	__u64 heartbeat_ns; /* bpf_ktime_get_ns() clock (CLOCK_MONOTONIC) */
	__u64 scope_id;     /* cgroup id of the scope, for hooks attached at the root */
	__u32 scope_level;  /* its depth below the cgroup2 root */
	__u32 pad;
};

/*
 * Policy maps.  Every key carries a generation: a reload writes the other
 * generation whole, then flips settings.policy_gen, so a decision reads one
 * generation from start to end and never a mix of two policies.
 */
struct policy_key {
	__u32 gen;
	__u32 identity; /* SIDECAR_IDENTITY_NONE holds the default for the unlisted */
};

struct identity_policy {
	__u32 flags; /* SIDECAR_POLICY_* */
	__u32 pad;
	/* Capabilities (bit n = capability n) this identity may not hold: an
	 * exec by a process holding any of them, in the host's user namespace,
	 * is refused. */
	__u64 caps_refused;
};

/* LPM trie key: prefixlen counts bits from gen on (SIDECAR_LPM_PREFIX_BASE + address prefix). */
struct egress_key {
	__u32 prefixlen;
	__u32 gen;
	__u32 identity;
	__u8 addr[SIDECAR_ADDR_LEN]; /* IPv6 space; IPv4 as ::ffff:a.b.c.d */
};

struct port_rule {
	__u16 port_lo;
	__u16 port_hi;
	__u8 protocols; /* SIDECAR_PROTO_* */
	__u8 pad;
	__u16 rule; /* rule index + 1 */
};

/* Every rule of an identity that covers the addresses under one prefix. */
struct egress_rules {
	__u32 count;
	struct port_rule rules[SIDECAR_MAX_PORT_RULES];
};

/*
 * An executable an identity may run, by the file itself: the device and
 * inode of the running image (mm->exe_file, the interpreter for a #! script),
 * not the path it was reached by.  dev is the kernel's dev_t (MAJOR << 20 |
 * MINOR), as in super_block.s_dev.
 */
struct exec_key {
	__u32 gen;
	__u32 identity;
	__u32 dev;
	__u32 pad;
	__u64 ino;
};

/* The file's change time when the policy allowed it: a write, chmod, link or
 * rename since then moves it, and the file is no longer trusted. */
struct exec_file {
	__u64 ctime_sec;
	__u32 ctime_nsec;
	__u32 pad;
};

/*
 * LPM trie key of the unix socket addresses an identity may use.  prefixlen
 * counts bits from gen on: SIDECAR_LPM_PREFIX_BASE + the path bits that must match.  An exact
 * entry includes one NUL after the path (it matches nothing longer); a
 * prefix entry does not.
 */
struct unix_key {
	__u32 prefixlen;
	__u32 gen;
	__u32 identity;
	char path[SIDECAR_UNIX_PATH_LEN];
};

/* A socket kind (other than TCP and UDP over IPv4/IPv6) an identity may create. */
struct socket_key {
	__u32 gen;
	__u32 identity;
	__u16 family;   /* AF_* */
	__u16 type;     /* SOCK_* */
	__u16 protocol; /* IPPROTO_* as the kernel resolved it */
	__u16 pad;
};

#endif /* SIDECAR_EVENTS_H */
