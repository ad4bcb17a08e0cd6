/* SPDX-License-Identifier: (GPL-2.0-only OR Apache-2.0) */
/*
 * Sockets: cgroup hooks on connect() (TCP and UDP), on sendmsg() without a
 * connected address (UDP sendto), on socket creation and on setsockopt().
 *
 * They are attached at the cgroup2 root, not at the scope: the hooks of a
 * socket run for the cgroup the socket was made in, so a socket made (or a
 * process moved) outside the scope would otherwise never be judged.  Every
 * process that holds no identity of ours and is outside the scope takes the
 * fast path out (judged_identity) and is never judged.
 *
 * Return 1 lets the call through; 0 makes it fail with EPERM.
 */

static __always_inline int report_connect(struct bpf_sock_addr *ctx, u8 hook, u8 family)
{
	struct proc_state *st;
	u32 identity;
	u8 protocol;
	u16 port;
	u32 rule, gen, flags;
	struct connect_event *e;
	u8 addr[SIDECAR_ADDR_LEN] = {};
	u8 verdict;

	if (!judged_identity(&st, &identity))
		return 1;
	protocol = ctx->protocol;
	port = bpf_ntohs((u16)ctx->user_port);

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
	__builtin_memcpy(e->daddr, addr, SIDECAR_ADDR_LEN);
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

static __always_inline void report_socket(struct proc_state *st, u16 family, u16 type,
					  u16 protocol, u8 hook, u8 verdict, s32 level,
					  s32 optname, u32 gen)
{
	struct socket_event *e = events.ringbuf_reserve(sizeof(struct socket_event));

	if (!e) {
		count_lost(SIDECAR_EVENT_SOCKET);
		return;
	}
	fill_header(&e->hdr, SIDECAR_EVENT_SOCKET, sizeof(*e));
	fill_task(&e->task, st);
	e->family = family;
	e->type = type;
	e->protocol = protocol;
	e->hook = hook;
	e->verdict = verdict;
	e->level = level;
	e->optname = optname;
	e->policy_gen = gen;
	e->pad = 0;
	events.ringbuf_submit(e, SIDECAR_RB_NO_WAKEUP);
}

/* socket(): the kind of socket, before it exists (inet and inet6 families). */
int sidecar_sock_create(struct bpf_sock *ctx)
{
	struct proc_state *st;
	u32 identity, gen, flags;
	u16 family, type, protocol;
	u8 verdict;

	if (!judged_identity(&st, &identity))
		return 1;
	family = ctx->family;
	type = ctx->type;
	protocol = ctx->protocol;
	if ((family == SIDECAR_AF_INET || family == SIDECAR_AF_INET6) &&
	    ((type == SIDECAR_SOCK_STREAM && protocol == SIDECAR_IPPROTO_TCP) ||
	     (type == SIDECAR_SOCK_DGRAM && protocol == SIDECAR_IPPROTO_UDP)))
		return 1; /* judged where it connects or sends */
	verdict = judge_socket(identity, family, type, protocol, &gen, &flags);
	if (verdict != SIDECAR_VERDICT_ALLOW || (flags & SIDECAR_POLICY_LOG_ALLOWED))
		report_socket(st, family, type, protocol, SIDECAR_HOOK_SOCKET_CREATE, verdict, 0, 0,
			      gen);
	return verdict == SIDECAR_VERDICT_DENY ? 0 : 1;
}

/*
 * setsockopt(): source routing (IPv4 LSRR/SSRR options, IPv6 routing
 * headers) would send a packet to a first hop other than the address judged
 * at connect.  Refused, with every other IPv4 option, for a process under a
 * policy that restricts egress.  Clearing the options (length 0) is allowed.
 */
int sidecar_setsockopt(struct bpf_sockopt *ctx)
{
	struct proc_state *st;
	u32 identity, gen, flags;
	s32 level = ctx->level, optname = ctx->optname;
	u8 verdict;

	if (!((level == SIDECAR_SOL_IP && optname == SIDECAR_IP_OPTIONS) ||
	      (level == SIDECAR_SOL_IPV6 &&
	       (optname == SIDECAR_IPV6_RTHDR || optname == SIDECAR_IPV6_2292RTHDR))))
		return 1;
	if (ctx->optlen <= 0)
		return 1;
	if (!judged_identity(&st, &identity))
		return 1;
	verdict = judge_socket(identity, SIDECAR_AF_INET, 0, 0, &gen, &flags);
	if (verdict == SIDECAR_VERDICT_ALLOW)
		return 1;
	report_socket(st, level == SIDECAR_SOL_IP ? SIDECAR_AF_INET : SIDECAR_AF_INET6, 0, 0,
		      SIDECAR_HOOK_SETSOCKOPT, verdict, level, optname, gen);
	return verdict == SIDECAR_VERDICT_DENY ? 0 : 1;
}
