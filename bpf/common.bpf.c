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

/* Settings are rewritten in place by the daemon: read each field once. */
#define READ_ONCE(x) (*(volatile typeof(x) *)&(x))

/* Is a live daemon attesting new images?  Its heartbeat says so. */
static __always_inline int attesting(void)
{
	u32 zero = 0;
	struct settings *s = settings.lookup(&zero);

	if (!s || !(READ_ONCE(s->flags) & SIDECAR_SETTING_ATTEST))
		return 0;
	return bpf_ktime_get_ns() - READ_ONCE(s->heartbeat_ns) < SIDECAR_HEARTBEAT_STALE_NS;
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

/*
 * The policy that governs an identity in generation gen: its own entry, or
 * the default (identity 0) for identities the policy does not list.  Writes
 * the identity whose rules apply to *ruled.
 */
static __always_inline struct identity_policy *policy_for(u32 gen, u32 identity, u32 *ruled)
{
	struct policy_key k = {.gen = gen, .identity = identity};
	struct identity_policy *p = policies.lookup(&k);

	if (!p) {
		k.identity = SIDECAR_IDENTITY_NONE;
		p = policies.lookup(&k);
	}
	*ruled = k.identity;
	return p;
}

/*
 * Judge a connection attempt: one LPM lookup by (gen, identity, address),
 * then a scan of the few port rules stored under the longest prefix.
 * Reads the generation once, so the whole decision uses one policy.
 */
static __always_inline u8 judge_connect(u32 identity, u8 protocol, u16 port, const u8 *addr,
					u32 *rule, u32 *gen_out, u32 *policy_flags)
{
	u32 zero = 0, ruled, i, gen;
	struct settings *s = settings.lookup(&zero);
	struct identity_policy *p;
	struct egress_key k = {};
	struct egress_rules *r;
	u8 bit;

	*rule = 0;
	*gen_out = 0;
	*policy_flags = SIDECAR_POLICY_LOG_ALLOWED;
	if (!s || !(READ_ONCE(s->flags) & SIDECAR_SETTING_POLICY))
		return SIDECAR_VERDICT_ALLOW;
	/* Read the generation exactly once: the daemon flips it in place. */
	gen = READ_ONCE(s->policy_gen);
	*gen_out = gen;
	p = policy_for(gen, identity, &ruled);
	if (!p)
		return SIDECAR_VERDICT_ALLOW;
	*policy_flags = p->flags;
	if (p->flags & SIDECAR_POLICY_EGRESS_ANY)
		return SIDECAR_VERDICT_ALLOW;

	k.prefixlen = 64 + 128;
	k.gen = gen;
	k.identity = ruled;
	__builtin_memcpy(k.addr, addr, 16);
	r = egress.lookup(&k);
	if (r) {
		bit = protocol == SIDECAR_IPPROTO_UDP ? SIDECAR_PROTO_UDP : SIDECAR_PROTO_TCP;
#pragma unroll
		for (i = 0; i < SIDECAR_MAX_PORT_RULES; i++) {
			struct port_rule *pr = &r->rules[i];

			if (i >= r->count)
				break;
			if ((pr->protocols & bit) && port >= pr->port_lo && port <= pr->port_hi) {
				*rule = pr->rule;
				return SIDECAR_VERDICT_ALLOW;
			}
		}
	}
	return (p->flags & SIDECAR_POLICY_ENFORCE) ? SIDECAR_VERDICT_DENY : SIDECAR_VERDICT_WOULD_DENY;
}
