/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Connection attempts: cgroup sock_addr hooks on connect() (TCP and UDP) and
 * on sendmsg() without a connected address (UDP sendto).  Attached to the
 * scope cgroup, so everything seen here is in scope.
 *
 * Return 1 lets the call through; 0 makes it fail with EPERM.
 */

static __always_inline int report_connect(struct bpf_sock_addr *ctx, u8 hook, u8 family)
{
	u32 pid = bpf_get_current_pid_tgid() >> 32;
	struct proc_state *st = procs.lookup(&pid);
	u32 identity = st ? st->identity : SIDECAR_IDENTITY_NONE;
	u8 protocol = ctx->protocol;
	u16 port = bpf_ntohs((u16)ctx->user_port);
	u32 rule, gen, flags;
	struct connect_event *e;
	u8 addr[16] = {};
	u8 verdict;

	if (family == SIDECAR_AF_INET) {
		/* IPv4 as ::ffff:a.b.c.d, so both spellings are one address. */
		addr[10] = 0xff;
		addr[11] = 0xff;
		*(u32 *)&addr[12] = ctx->user_ip4;
	} else {
		*(u32 *)&addr[0] = ctx->user_ip6[0];
		*(u32 *)&addr[4] = ctx->user_ip6[1];
		*(u32 *)&addr[8] = ctx->user_ip6[2];
		*(u32 *)&addr[12] = ctx->user_ip6[3];
	}
	verdict = judge_connect(identity, protocol, port, addr, &rule, &gen, &flags);
	if (verdict == SIDECAR_VERDICT_ALLOW && !(flags & SIDECAR_POLICY_LOG_ALLOWED))
		return 1;

	e = events.ringbuf_reserve(sizeof(struct connect_event));
	if (!e) {
		count_lost(SIDECAR_EVENT_CONNECT);
		return verdict == SIDECAR_VERDICT_DENY ? 0 : 1;
	}
	fill_header(&e->hdr, SIDECAR_EVENT_CONNECT, sizeof(*e));
	fill_task(&e->task, st);
	e->family = family;
	e->protocol = protocol;
	e->hook = hook;
	e->verdict = verdict;
	e->dport = port;
	e->pad = 0;
	e->rule = rule;
	e->policy_gen = gen;
	__builtin_memcpy(e->daddr, addr, 16);
	events.ringbuf_submit(e, SIDECAR_RB_NO_WAKEUP);
	/* 0 makes connect()/sendmsg() fail with EPERM. */
	return verdict == SIDECAR_VERDICT_DENY ? 0 : 1;
}

int sidecar_connect4(struct bpf_sock_addr *ctx)
{
	return report_connect(ctx, SIDECAR_HOOK_CONNECT4, SIDECAR_AF_INET);
}

int sidecar_connect6(struct bpf_sock_addr *ctx)
{
	return report_connect(ctx, SIDECAR_HOOK_CONNECT6, SIDECAR_AF_INET6);
}

int sidecar_sendmsg4(struct bpf_sock_addr *ctx)
{
	return report_connect(ctx, SIDECAR_HOOK_SENDMSG4, SIDECAR_AF_INET);
}

int sidecar_sendmsg6(struct bpf_sock_addr *ctx)
{
	return report_connect(ctx, SIDECAR_HOOK_SENDMSG6, SIDECAR_AF_INET6);
}
