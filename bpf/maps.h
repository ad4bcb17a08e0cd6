/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Maps shared by every program of the sidecar.
 *
 * State that enforcement needs (process identities, settings, the scope)
 * is pinned under PIN_DIR, so programs that stay attached after the daemon
 * dies keep judging from it, and a restarted daemon re-adopts it.  The ring
 * buffer and scratch space belong to one daemon run and are not pinned.
 *
 * Build settings come in as -D flags, validated by the loader:
 *   PIN_DIR        "/sys/fs/bpf/sidecar/v1" (a string literal)
 *   PROCS_MAX      entries of the process map
 *   RINGBUF_PAGES  ring buffer size in pages (a power of two)
 *   EGRESS_MAX, EXEC_ALLOW_MAX, POLICIES_MAX  policy map sizes (both generations)
 */
#ifndef SIDECAR_MAPS_H
#define SIDECAR_MAPS_H

#include <uapi/linux/ptrace.h> /* struct pt_regs, for the user stack pointer */

#include "events.h"

#ifndef PIN_DIR
#error "PIN_DIR must be defined by the loader"
#endif
#ifndef PROCS_MAX
#define PROCS_MAX 65536
#endif
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 256
#endif
#ifndef EGRESS_MAX
#define EGRESS_MAX 262144
#endif
#ifndef EXEC_ALLOW_MAX
#define EXEC_ALLOW_MAX 16384
#endif
#ifndef POLICIES_MAX
#define POLICIES_MAX 4096
#endif

#define SIDECAR_AF_INET 2
#define SIDECAR_AF_INET6 10
#define SIDECAR_IPPROTO_UDP 17
#define SIDECAR_CLONE_VFORK 0x00004000ULL
#define SIDECAR_CLONE_THREAD 0x00010000ULL
#define SIDECAR_NEW_THREAD 1
#define SIDECAR_NEW_VFORK 2

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
/* (generation, identity, executable path) -> 1 when the identity may run it */
BPF_TABLE_PINNED("hash", struct exec_key, u8, exec_allow, EXEC_ALLOW_MAX, PIN_DIR "/exec_allow");

BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
/* per-CPU scratch to build an exec record, sent without its unused argv tail */
BPF_PERCPU_ARRAY(exec_scratch, struct exec_event, 1);
/* per-CPU scratch for exec_key (too big for the stack next to the rest) */
BPF_PERCPU_ARRAY(exec_key_scratch, struct exec_key, 1);
/* records that could not be reserved, per CPU, by event type */
BPF_PERCPU_ARRAY(lost, u64, 8);

/* new task id -> SIDECAR_NEW_THREAD or SIDECAR_NEW_VFORK, from task_newtask to
 * sched_process_fork */
BPF_TABLE("lru_hash", u32, u8, new_tasks, 4096);

#endif /* SIDECAR_MAPS_H */
