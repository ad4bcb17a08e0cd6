/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Unix sockets: cgroup connect_unix and sendmsg_unix hooks (Linux 6.7+).
 *
 * The address is read from the kernel's context (bpf_cast_to_kern_ctx), a
 * kfunc BCC cannot call: this file is built with clang as a CO-RE object and
 * loaded with libbpf (sidecar/kernel/unix.py), and it shares the maps the
 * other programs pinned (procs, settings, policies, unix_allow) and their
 * ring buffer, handed to it by file descriptor before it loads.
 *
 * Like the other cgroup hooks it is attached at the cgroup2 root: every
 * process that holds no identity of ours and is outside the scope leaves on
 * its first map lookup.  Return 1 lets the call through; 0 makes it fail
 * with EPERM.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>

#include "events.h"

char LICENSE[] SEC("license") = "GPL";

/* Only the fields read; CO-RE relocates them against the running kernel. */
struct sockaddr_un {
	unsigned short sun_family;
	char sun_path[SIDECAR_UNIX_PATH_LEN];
} __attribute__((preserve_access_index));

struct bpf_sock_addr_kern {
	struct sockaddr_un *uaddr;
	__u32 uaddrlen;
} __attribute__((preserve_access_index));

extern void *bpf_cast_to_kern_ctx(void *obj) __ksym;

#define SUN_PATH_OFFSET 2 /* offsetof(struct sockaddr_un, sun_path) */

/* Shapes only: each is replaced by the pinned map's descriptor before load,
 * sizes included (maps.h has them, from the loader). */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32);
	__type(value, struct proc_state);
	__uint(max_entries, 1);
} procs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct settings);
	__uint(max_entries, 1);
} settings SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct policy_key);
	__type(value, struct identity_policy);
	__uint(max_entries, 1);
} policies SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct unix_key);
	__type(value, __u8);
	__uint(max_entries, 1);
	__uint(map_flags, BPF_F_NO_PREALLOC);
} unix_allow SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 4096);
} events SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
} lost SEC(".maps");

/* per-CPU scratch for the lookup key (too big for the stack with the rest) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct unix_key);
	__uint(max_entries, 1);
} key_scratch SEC(".maps");

#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))

static __always_inline void count_lost(__u32 type)
{
	__u64 *n = bpf_map_lookup_elem(&lost, &type);

	if (n)
		__sync_fetch_and_add(n, 1);
}

static __always_inline int judge_unix(struct bpf_sock_addr *ctx, __u8 hook)
{
	__u32 zero = 0, pid = bpf_get_current_pid_tgid() >> 32, identity, gen;
	struct proc_state *st = bpf_map_lookup_elem(&procs, &pid);
	struct settings *s = bpf_map_lookup_elem(&settings, &zero);
	struct policy_key pk = {};
	struct identity_policy *p;
	struct bpf_sock_addr_kern *sa;
	struct unix_key *k;
	struct unix_event *e;
	__u32 len;
	__u8 verdict;

	if (!s)
		return 1;
	if (st && st->identity != SIDECAR_IDENTITY_NONE) {
		identity = st->identity;
	} else {
		__u64 scope = READ_ONCE(s->scope_id);

		/* the fast path: no identity of ours, outside the scope */
		if (!scope ||
		    bpf_get_current_ancestor_cgroup_id(READ_ONCE(s->scope_level)) != scope)
			return 1;
		identity = SIDECAR_IDENTITY_NONE;
	}
	if (!(READ_ONCE(s->flags) & SIDECAR_SETTING_POLICY))
		return 1;
	gen = READ_ONCE(s->policy_gen);
	pk.gen = gen;
	pk.identity = identity;
	p = bpf_map_lookup_elem(&policies, &pk);
	if (!p) {
		pk.identity = SIDECAR_IDENTITY_NONE;
		p = bpf_map_lookup_elem(&policies, &pk);
	}
	if (!p || !(p->flags & SIDECAR_POLICY_UNIX_RESTRICTED))
		return 1;

	k = bpf_map_lookup_elem(&key_scratch, &zero);
	if (!k)
		return 1;
	__builtin_memset(k, 0, sizeof(*k));
	sa = bpf_cast_to_kern_ctx(ctx);
	len = sa->uaddrlen;
	len = len > SUN_PATH_OFFSET ? len - SUN_PATH_OFFSET : 0;
	if (len > SIDECAR_UNIX_PATH_LEN)
		len = SIDECAR_UNIX_PATH_LEN;
	/* verifier: len is bounded by SIDECAR_UNIX_PATH_LEN just above */
	if (len && bpf_probe_read_kernel(k->path, len & 0x7f, sa->uaddr->sun_path) < 0)
		len = 0;
	if (k->path[0]) {
		/*
		 * A file system path is a C string: what follows its NUL is not
		 * part of it, so those bytes are cleared.  Without a branch per
		 * byte: with one, the verifier walked ~158,000 instructions per
		 * program, a fifth of a second of every start-up.
		 */
		__u32 keep = 0xff; /* 0xff up to the first NUL, 0 past it */
		int i;

		for (i = 0; i < SIDECAR_UNIX_PATH_LEN; i++) {
			__u32 c = k->path[i];

			asm volatile("" : "+r"(c)); /* the compiler must not turn this into a branch */
			k->path[i] = c & keep;
			keep &= -((c + 0xff) >> 8); /* c != 0: unchanged; c == 0: 0 */
		}
	}
	k->prefixlen = SIDECAR_LPM_PREFIX_BASE + SIDECAR_UNIX_PATH_LEN * 8;
	k->gen = gen;
	k->identity = pk.identity;
	if (bpf_map_lookup_elem(&unix_allow, k))
		verdict = SIDECAR_VERDICT_ALLOW;
	else
		verdict = (p->flags & SIDECAR_POLICY_ENFORCE) ? SIDECAR_VERDICT_DENY
							      : SIDECAR_VERDICT_WOULD_DENY;
	if (verdict == SIDECAR_VERDICT_ALLOW && !(p->flags & SIDECAR_POLICY_LOG_ALLOWED))
		return 1;

	e = bpf_ringbuf_reserve(&events, sizeof(*e), 0);
	if (!e) {
		count_lost(SIDECAR_EVENT_UNIX);
		return verdict == SIDECAR_VERDICT_DENY ? 0 : 1;
	}
	e->hdr.type = SIDECAR_EVENT_UNIX;
	e->hdr.version = SIDECAR_ABI_VERSION;
	e->hdr.size = sizeof(*e);
	e->hdr.ts_ns = bpf_ktime_get_ns();
	{
		__u64 id = bpf_get_current_pid_tgid(), ug = bpf_get_current_uid_gid();

		e->task.pid = id >> 32;
		e->task.tid = (__u32)id;
		e->task.uid = (__u32)ug;
		e->task.gid = ug >> 32;
		e->task.cgroup_id = bpf_get_current_cgroup_id();
		e->task.identity = st ? st->identity : SIDECAR_IDENTITY_NONE;
		e->task.ppid = st ? st->ppid : 0;
		bpf_get_current_comm(&e->task.comm, sizeof(e->task.comm));
	}
	e->hook = hook;
	e->verdict = verdict;
	e->path_len = len;
	e->policy_gen = gen;
	e->pad = 0;
	__builtin_memcpy(e->path, k->path, SIDECAR_UNIX_PATH_LEN);
	/* Nobody waits on it: the daemon picks it up on its next read, as it
	 * does every record but those of pending processes. */
	bpf_ringbuf_submit(e, BPF_RB_NO_WAKEUP);
	return verdict == SIDECAR_VERDICT_DENY ? 0 : 1;
}

SEC("cgroup/connect_unix")
int sidecar_connect_unix(struct bpf_sock_addr *ctx)
{
	return judge_unix(ctx, SIDECAR_HOOK_CONNECT_UNIX);
}

SEC("cgroup/sendmsg_unix")
int sidecar_sendmsg_unix(struct bpf_sock_addr *ctx)
{
	return judge_unix(ctx, SIDECAR_HOOK_SENDMSG_UNIX);
}
