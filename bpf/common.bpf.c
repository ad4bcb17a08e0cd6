/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Helpers shared by the hook families.  They live in a .bpf.c file rather
 * than in maps.h because BCC rewrites map calls (map.lookup()) only in the
 * source it is given, not in included headers; the loader puts the files
 * together in one unit.
 */

static __always_inline int in_scope(void)
{
	/* 1: current task is in the scope cgroup's subtree */
	return scope.check_current_task(0) == 1;
}

static __always_inline void count_lost(u32 type)
{
	u64 *n = lost.lookup(&type);
	if (n)
		(*n)++;
}

static __always_inline u32 settings_flags(void)
{
	u32 zero = 0;
	struct settings *s = settings.lookup(&zero);
	return s ? s->flags : 0;
}

static __always_inline void fill_header(struct event_header *h, u16 type, u32 size)
{
	h->type = type;
	h->version = SIDECAR_ABI_VERSION;
	h->size = size;
	h->ts_ns = bpf_ktime_get_ns();
}

static __always_inline void fill_task(struct task_ctx *t, struct proc_state *st)
{
	u64 id = bpf_get_current_pid_tgid();
	u64 ug = bpf_get_current_uid_gid();

	t->pid = id >> 32;
	t->tid = (u32)id;
	t->uid = (u32)ug;
	t->gid = ug >> 32;
	t->cgroup_id = bpf_get_current_cgroup_id();
	t->identity = st ? st->identity : SIDECAR_IDENTITY_NONE;
	t->ppid = st ? st->ppid : 0;
	bpf_get_current_comm(&t->comm, sizeof(t->comm));
}
