/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Maps shared by every program of the sidecar.
 *
 * State that enforcement needs (process identities, settings, the scope)
 * is pinned under PIN_DIR, so programs that stay attached after the daemon
 * dies keep judging from it, and a restarted daemon re-adopts it.  So are
 * the ring buffer and its loss counters: what the programs record while no
 * daemon runs is read, or counted as lost, by the next one.  Scratch space
 * is not pinned.
 *
 * Build settings come in as -D flags, validated by the loader:
 *   PIN_DIR        "/sys/fs/bpf/sidecar/v3" (a string literal)
 *   PROCS_MAX, RINGBUF_BYTES, POLICIES_MAX, EGRESS_MAX, EXEC_ALLOW_MAX,
 *   SOCKET_ALLOW_MAX, UNIX_ALLOW_MAX, EVENT_TYPE_SLOTS, DELIVERED_SLOTS
 *                  max_entries of the maps (LoadOptions.map_sizes, from
 *                  sidecar/kernel/limits.py, the one home of map sizes)
 *   SIDECAR_OFF_*  offsets of the few kernel-internal fields read (the file
 *                  an exec runs), from the running kernel's BTF
 *   SIDECAR_HAVE_GROUP_DEAD  sched_process_exit says when a whole process ends
 *   SIDECAR_BUILD_ID  a number of this load's own, nonzero (struct handled_mark)
 *
 * No size has a default here: a second value could differ from Python's
 * unnoticed, so a build without one stops instead
 * (tests/unit/test_abi_layout.py checks the loader passes each).
 */
#ifndef SIDECAR_MAPS_H
#define SIDECAR_MAPS_H

#include <uapi/linux/ptrace.h> /* struct pt_regs, for the user stack pointer */

#include "events.h"

#ifndef PIN_DIR
#error "PIN_DIR must be defined by the loader"
#endif
#if !defined(PROCS_MAX) || !defined(RINGBUF_BYTES) || !defined(POLICIES_MAX) ||                \
	!defined(EGRESS_MAX) || !defined(EXEC_ALLOW_MAX) || !defined(SOCKET_ALLOW_MAX) ||     \
	!defined(UNIX_ALLOW_MAX) || !defined(EVENT_TYPE_SLOTS) || !defined(DELIVERED_SLOTS)
#error "the loader passes every map size (LoadOptions.map_sizes): PROCS_MAX, RINGBUF_BYTES, ..."
#endif
#if !defined(SIDECAR_OFF_TASK_MM) || !defined(SIDECAR_OFF_MM_EXE_FILE) ||                   \
	!defined(SIDECAR_OFF_FILE_INODE) || !defined(SIDECAR_OFF_INODE_INO) ||              \
	!defined(SIDECAR_OFF_INODE_SB) || !defined(SIDECAR_OFF_SB_DEV) ||                   \
	!defined(SIDECAR_OFF_INODE_CTIME_SEC) || !defined(SIDECAR_OFF_INODE_CTIME_NSEC) ||    \
	!defined(SIDECAR_OFF_TASK_CRED) || !defined(SIDECAR_OFF_CRED_USER_NS) ||              \
	!defined(SIDECAR_OFF_USER_NS_LEVEL) || !defined(SIDECAR_OFF_CRED_CAP_EFFECTIVE) ||     \
	!defined(SIDECAR_OFF_TASK_REAL_PARENT) || !defined(SIDECAR_OFF_TASK_TGID) ||                \
	!defined(SIDECAR_OFF_TASK_START_BOOTTIME)
#error "the loader passes the kernel's field offsets (SIDECAR_OFF_*) from its BTF"
#endif

#if !defined(SIDECAR_BUILD_ID)
#error "the loader passes SIDECAR_BUILD_ID, a number of each load's own"
#endif

#define SIDECAR_AF_INET 2
#define SIDECAR_AF_INET6 10
#define SIDECAR_SOCK_STREAM 1
#define SIDECAR_SOCK_DGRAM 2
#define SIDECAR_IPPROTO_TCP 6
#define SIDECAR_IPPROTO_UDP 17
#define SIDECAR_SOL_IP 0
#define SIDECAR_IP_OPTIONS 4      /* carries LSRR/SSRR source routes */
#define SIDECAR_SOL_IPV6 41
#define SIDECAR_IPV6_2292RTHDR 5  /* routing header, RFC 2292 spelling */
#define SIDECAR_IPV6_RTHDR 57     /* routing header */
#define SIDECAR_CLONE_VFORK 0x00004000ULL
#define SIDECAR_CLONE_THREAD 0x00010000ULL
#define SIDECAR_SIGKILL 9

/*
 * Ring buffer wake-ups cost the traced workload a context switch each.  Most
 * records are read by the daemon's periodic poll (every 50 ms); only a record
 * someone is waiting on (an exec to attest) wakes the reader at once.
 */
#define SIDECAR_RB_NO_WAKEUP 1
#define SIDECAR_RB_FORCE_WAKEUP 2

/* thread group id -> identity and parent */
BPF_TABLE_PINNED("hash", u32, struct proc_state, procs, PROCS_MAX, PIN_DIR "/procs");
/* index 0: the cgroup whose subtree is in scope.  Spelled out because BCC's
 * BPF_CGROUP_ARRAY cannot be pinned and BPF_TABLE_PINNED lacks the
 * check_current_task() method. */
struct scope_table_t {
	int key;
	u32 leaf;
	int (*check_current_task)(int);
	u32 max_entries;
};
__attribute__((section("maps/cgroup_array:" PIN_DIR "/scope")))
struct scope_table_t scope = {.max_entries = 1};
/* index 0: struct settings written by the daemon */
BPF_TABLE_PINNED("array", u32, struct settings, settings, 1, PIN_DIR "/settings");

/* (generation, identity) -> mode and flags; identity 0 holds the default */
BPF_TABLE_PINNED("hash", struct policy_key, struct identity_policy, policies, POLICIES_MAX,
		 PIN_DIR "/policies");
/* (generation, identity, destination prefix) -> the port rules under it */
BPF_TABLE_PINNED("lpm_trie", struct egress_key, struct egress_rules, egress, EGRESS_MAX,
		 PIN_DIR "/egress", BPF_F_NO_PREALLOC);
/* (generation, identity, device, inode) -> the file's change time when allowed */
BPF_TABLE_PINNED("hash", struct exec_key, struct exec_file, exec_allow, EXEC_ALLOW_MAX,
		 PIN_DIR "/exec_allow", BPF_F_NO_PREALLOC);
/* (generation, identity, family, type, protocol) -> 1 for each other socket kind allowed */
BPF_TABLE_PINNED("hash", struct socket_key, u8, socket_allow, SOCKET_ALLOW_MAX,
		 PIN_DIR "/socket_allow");
/* (generation, identity, unix socket path or prefix) -> 1; judged by bpf/unix.bpf.c */
BPF_TABLE_PINNED("lpm_trie", struct unix_key, u8, unix_allow, UNIX_ALLOW_MAX, PIN_DIR "/unix_allow",
		 BPF_F_NO_PREALLOC);

/* The ring buffer is pinned too: what the programs record while no daemon
 * runs waits there for the next one (spelled out: BCC's BPF_RINGBUF_OUTPUT
 * cannot be pinned). */
struct events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u64 (*ringbuf_query)(u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" PIN_DIR "/events")))
struct events_table_t events = {.max_entries = RINGBUF_BYTES};
/* per-CPU scratch to build an exec record, sent without its unused argv tail */
BPF_PERCPU_ARRAY(exec_scratch, struct exec_event, 1);
/* the last process event handled on each CPU, by which build (struct handled_mark) */
BPF_TABLE_PINNED("percpu_array", u32, struct handled_mark, handled, 1, PIN_DIR "/handled");
/* records that could not be reserved, per CPU, by event type */
BPF_TABLE_PINNED("percpu_array", u32, u64, lost, EVENT_TYPE_SLOTS, PIN_DIR "/lost");
/* index: event type; what a daemon has reported lost so far (written by it) */
BPF_TABLE_PINNED("array", u32, u64, lost_reported, EVENT_TYPE_SLOTS, PIN_DIR "/lost_reported");
/* index: an output of the daemon (0 sink, 1 export); the ring position just past the
 * last record whose events it has written.  Only the daemon reads and writes it: a
 * restarted daemon re-reads what was not consumed and skips what each output holds. */
BPF_TABLE_PINNED("array", u32, u64, delivered, DELIVERED_SLOTS, PIN_DIR "/delivered");

#endif /* SIDECAR_MAPS_H */
