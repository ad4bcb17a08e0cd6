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

/*
 * The same question for the cgroup hooks, which are attached at the cgroup2
 * root and run for every process on the host: is the caller inside the
 * scope's subtree?  The daemon writes the scope's id and depth in settings.
 */
static __always_inline int in_scope_cg(void)
{
	u32 zero = 0;
	struct settings *s = settings.lookup(&zero);
	u64 id;

	if (!s)
		return 0;
	id = READ_ONCE(s->scope_id);
	return id && bpf_get_current_ancestor_cgroup_id(READ_ONCE(s->scope_level)) == id;
}

/*
 * Which identity judges the calling process at a cgroup hook?  Returns 0
 * for a process that is none of ours to judge: no identity of our maps and
 * outside the scope.  That is the fast path every other process on the host
 * takes: one hash lookup, and a cgroup check only without an identity.
 */
static __always_inline int judged_identity(struct proc_state **stp, u32 *identity)
{
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	struct proc_state *st = procs.lookup(&pid);

	*stp = st;
	if (st && st->identity != SIDECAR_IDENTITY_NONE) {
		*identity = st->identity;
		return 1;
	}
	if (!in_scope_cg())
		return 0;
	*identity = SIDECAR_IDENTITY_NONE;
	return 1;
}

/*
 * Did another build's program handle this very event a moment ago, on
 * this CPU?  Then this one must not (struct handled_mark).  Otherwise
 * note the event as this build's.  Called before anything is changed.
 */
static __always_inline int handled_elsewhere(u32 kind, u64 task, u64 key)
{
	u32 zero = 0;
	struct handled_mark *m = handled.lookup(&zero);

	if (!m)
		return 0;
	if (m->kind == kind && m->task == task && m->key == key && m->build != SIDECAR_BUILD_ID)
		return 1;
	m->task = task;
	m->key = key;
	m->build = SIDECAR_BUILD_ID;
	m->kind = kind;
	return 0;
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
 * The policy in force for an identity, or NULL when nothing restricts it (no
 * policy loaded, the identity unlisted under an "allow" default, or egress
 * unrestricted).  Reads the generation once, so a whole decision uses one.
 */
static __always_inline struct identity_policy *restricting_policy(u32 identity, u32 *gen_out,
								  u32 *ruled, u32 *policy_flags)
{
	u32 zero = 0, gen;
	struct settings *s = settings.lookup(&zero);
	struct identity_policy *p;

	*gen_out = 0;
	*policy_flags = SIDECAR_POLICY_LOG_ALLOWED;
	if (!s || !(READ_ONCE(s->flags) & SIDECAR_SETTING_POLICY))
		return NULL;
	/* Read the generation exactly once: the daemon flips it in place. */
	gen = READ_ONCE(s->policy_gen);
	*gen_out = gen;
	p = policy_for(gen, identity, ruled);
	if (!p)
		return NULL;
	*policy_flags = p->flags;
	if (p->flags & SIDECAR_POLICY_EGRESS_ANY)
		return NULL;
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
	u32 ruled, i;
	struct identity_policy *p;
	struct egress_key k = {};
	struct egress_rules *r;
	u8 bit;

	*rule = 0;
	p = restricting_policy(identity, gen_out, &ruled, policy_flags);
	if (!p)
		return SIDECAR_VERDICT_ALLOW;

	k.prefixlen = SIDECAR_LPM_PREFIX_BASE + SIDECAR_ADDR_LEN * 8; /* the whole address */
	k.gen = *gen_out;
	k.identity = ruled;
	__builtin_memcpy(k.addr, addr, SIDECAR_ADDR_LEN);
	r = egress.lookup(&k);
	/* Protocols match exactly: only TCP and UDP have port rules. */
	if (protocol == SIDECAR_IPPROTO_TCP)
		bit = SIDECAR_PROTO_TCP;
	else if (protocol == SIDECAR_IPPROTO_UDP)
		bit = SIDECAR_PROTO_UDP;
	else
		bit = 0;
	if (r && bit) {
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

/*
 * May this identity create a socket of (family, type, protocol)?  TCP and UDP
 * over IPv4 and IPv6 are judged at connect and sendmsg; every other kind
 * (raw, ICMP, UDP-Lite, SCTP, MPTCP, ...) only when its policy names it.
 */
static __always_inline u8 judge_socket(u32 identity, u16 family, u16 type, u16 protocol,
				       u32 *gen_out, u32 *policy_flags)
{
	u32 ruled;
	struct identity_policy *p;
	struct socket_key k = {};

	p = restricting_policy(identity, gen_out, &ruled, policy_flags);
	if (!p)
		return SIDECAR_VERDICT_ALLOW;
	k.gen = *gen_out;
	k.identity = ruled;
	k.family = family;
	k.type = type;
	k.protocol = protocol;
	if (socket_allow.lookup(&k))
		return SIDECAR_VERDICT_ALLOW;
	return (p->flags & SIDECAR_POLICY_ENFORCE) ? SIDECAR_VERDICT_DENY : SIDECAR_VERDICT_WOULD_DENY;
}
