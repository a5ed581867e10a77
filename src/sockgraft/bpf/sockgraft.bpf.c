// SPDX-License-Identifier: GPL-2.0
/* sockgraft's in-kernel decisions for sockets grafted at socket() time.
 *
 * The node agent creates these sockets itself (in the host namespace, with
 * SO_MARK = 0x5347xxxx) and installs them into the container process at
 * socket(); from then on connect(), sendmsg() and getpeername() run here, in
 * the kernel, with no round trip to the agent:
 *
 *   connect4/6   policy: the container's first-match rule list on the address
 *                the application asked for (deny -> EPERM);
 *                egress: longest-prefix rule -> bpf_bind() the endpoint's host
 *                address (dynamic port: the kernel picks it at connect time);
 *                no egress rule -> EPERM;
 *                directory: a container overlay address:port that a grafted
 *                server published is rewritten to the host address:port its
 *                socket really listens on (cross-host bypass, no VXLAN).
 *   sendmsg4/6   the same for every unconnected UDP datagram (source address
 *                rewritten to the endpoint instead of bpf_bind).
 *   getpeername4/6, recvmsg4/6  the directory rewrite undone: the
 *                application sees the overlay address it connected to (and
 *                UDP replies come from it).
 *
 * Sockets without a sockgraft mark, or whose container has no entry in
 * sg_policy (containers grafted syscall by syscall), are left alone: return 1.
 * Every denial is counted and reported on the sg_events ring buffer so the
 * agent writes the audit line.
 *
 * Map layouts are mirrored byte for byte by sockgraft/model/bpfmaps.py.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10
#define MARK_MASK 0xffff0000u
#define MARK_BASE 0x53470000u
#define MAX_RULES 64

#define F_SOCKET_MODE 1u

#define V_DENY 0
#define V_ALLOW 1

#define EV_DENY_POLICY 1
#define EV_DENY_NO_EGRESS 2
#define EV_BIND_FAILED 3

#define OP_CONNECT 1
#define OP_SENDMSG 2

struct rule {
	__u32 addr[4];     /* network order; IPv4 in addr[0] */
	__u32 mask[4];
	__u16 port_lo;     /* host order, inclusive */
	__u16 port_hi;
	__u8 family;       /* 0 any, 4, 6 */
	__u8 proto;        /* 0 any, IPPROTO_TCP, IPPROTO_UDP */
	__u8 verdict;      /* V_DENY / V_ALLOW */
	__u8 pad;
	__u32 label;       /* index into the agent's rule labels (audit) */
};

struct policy {
	__u32 flags;
	__u32 nrules;
	__u32 default_verdict;
	__u32 default_label;
	__u16 gen;          /* egress generation live for this container */
	__u16 pad;
	__u32 pad2;
	struct rule rules[MAX_RULES];
};

struct egress4_key {
	__u32 prefixlen;    /* 64 + rule prefix length */
	__u32 mark;
	__u16 gen;
	__u16 port;         /* network order; 0 = a rule without a port */
	__u32 addr;
} __attribute__((packed));

struct egress6_key {
	__u32 prefixlen;
	__u32 mark;
	__u16 gen;
	__u16 port;
	__u32 addr[4];
} __attribute__((packed));

struct egress_val {
	__u32 plen;         /* the rule's prefix length (longest wins) */
	__u32 label;
	__u32 src[4];       /* endpoint host address, network order; IPv4 in src[0] */
	__u16 src_port;     /* network order; 0 = dynamic */
	__u8 src_family;    /* 4 or 6 */
	__u8 pad;
};

struct svc_key {
	__u32 addr[4];      /* overlay address; IPv4 in addr[0], rest 0 */
	__u16 port;         /* network order */
	__u8 family;        /* 4 or 6 */
	__u8 proto;         /* IPPROTO_TCP / IPPROTO_UDP */
};

struct svc_val {
	__u32 addr[4];      /* where the grafted server's host socket listens */
	__u16 port;
	__u8 family;
	__u8 pad;
};

struct event {
	__u32 kind;
	__u32 mark;
	__u32 op;
	__u32 label;
	__u32 addr[4];
	__u16 port;         /* host order */
	__u8 family;
	__u8 proto;
	__u32 pid;
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);
	__type(value, struct policy);
} sg_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct egress4_key);
	__type(value, struct egress_val);
} sg_egress4 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct egress6_key);
	__type(value, struct egress_val);
} sg_egress6 SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
} sg_services SEC(".maps");

/* host address:port -> overlay address:port, for getpeername */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct svc_key);
	__type(value, struct svc_val);
} sg_services_rev SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 1 << 16);
} sg_events SEC(".maps");

/* [0] connects judged, [1] connects + datagrams denied, [2] redirected by the directory */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} sg_counters SEC(".maps");

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&sg_counters, &idx);
	if (c)
		*c += 1;
}

static __always_inline struct policy *grafted_policy(struct bpf_sock_addr *ctx, __u32 *mark)
{
	struct bpf_sock *sk = ctx->sk;
	struct policy *p;

	if (!sk)
		return 0;
	*mark = sk->mark;
	if ((*mark & MARK_MASK) != MARK_BASE)
		return 0;
	p = bpf_map_lookup_elem(&sg_policy, mark);
	if (!p || !(p->flags & F_SOCKET_MODE))
		return 0;
	return p;
}

static __always_inline void report(__u32 kind, __u32 mark, __u32 op, __u32 label,
				   __u8 family, const __u32 *addr, __u16 port, __u8 proto)
{
	struct event ev = {};

	ev.kind = kind;
	ev.mark = mark;
	ev.op = op;
	ev.label = label;
	ev.family = family;
	ev.proto = proto;
	ev.port = port;
	ev.addr[0] = addr[0];
	if (family == 6) {
		ev.addr[1] = addr[1];
		ev.addr[2] = addr[2];
		ev.addr[3] = addr[3];
	}
	ev.pid = bpf_get_current_pid_tgid() >> 32;
	bpf_ringbuf_output(&sg_events, &ev, sizeof(ev), 0);
}

/* First match over the container's rule list; the label of the deciding rule
 * goes to *label. family is 4 (addr[0]) or 6. */
static __always_inline int judge(struct policy *p, __u8 family, const __u32 *addr,
				 __u16 port, __u8 proto, __u32 *label)
{
	__u32 n = p->nrules;

	for (__u32 i = 0; i < MAX_RULES; i++) {
		struct rule *r;

		if (i >= n)
			break;
		r = &p->rules[i];
		if (r->family && r->family != family)
			continue;
		if (r->proto && r->proto != proto)
			continue;
		if (port < r->port_lo || port > r->port_hi)
			continue;
		if ((addr[0] & r->mask[0]) != r->addr[0])
			continue;
		if (family == 6 &&
		    ((addr[1] & r->mask[1]) != r->addr[1] ||
		     (addr[2] & r->mask[2]) != r->addr[2] ||
		     (addr[3] & r->mask[3]) != r->addr[3]))
			continue;
		*label = r->label;
		return r->verdict;
	}
	*label = p->default_label;
	return p->default_verdict;
}

static __always_inline struct egress_val *egress4(__u32 mark, __u16 gen, __u32 addr,
						  __u16 port_be)
{
	struct egress4_key k = {};
	struct egress_val *with_port, *portless;

	k.prefixlen = 64 + 32;
	k.mark = mark;
	k.gen = gen;
	k.port = port_be;
	k.addr = addr;
	with_port = bpf_map_lookup_elem(&sg_egress4, &k);
	k.port = 0;
	portless = bpf_map_lookup_elem(&sg_egress4, &k);
	if (with_port && (!portless || with_port->plen >= portless->plen))
		return with_port;
	return portless;
}

static __always_inline struct egress_val *egress6(__u32 mark, __u16 gen, const __u32 *addr,
						  __u16 port_be)
{
	struct egress6_key k = {};
	struct egress_val *with_port, *portless;

	k.prefixlen = 64 + 128;
	k.mark = mark;
	k.gen = gen;
	k.port = port_be;
	k.addr[0] = addr[0];
	k.addr[1] = addr[1];
	k.addr[2] = addr[2];
	k.addr[3] = addr[3];
	with_port = bpf_map_lookup_elem(&sg_egress6, &k);
	k.port = 0;
	portless = bpf_map_lookup_elem(&sg_egress6, &k);
	if (with_port && (!portless || with_port->plen >= portless->plen))
		return with_port;
	return portless;
}

static __always_inline int is_v4mapped(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == bpf_htonl(0x0000ffff);
}

static __always_inline __u8 sock_proto(struct bpf_sock_addr *ctx)
{
	return ctx->type == 1 /* SOCK_STREAM */ ? IPPROTO_TCP : IPPROTO_UDP;
}

/* A v6 sockaddr's address as judged: a mapped one is the IPv4 packet it
 * becomes (j[0]); returns the family. a keeps the v6 form. */
static __always_inline __u8 dest6(struct bpf_sock_addr *ctx, __u32 *a, __u32 *j)
{
	a[0] = ctx->user_ip6[0];
	a[1] = ctx->user_ip6[1];
	a[2] = ctx->user_ip6[2];
	a[3] = ctx->user_ip6[3];
	if (is_v4mapped(a)) {
		j[0] = a[3];
		j[1] = j[2] = j[3] = 0;
		return 4;
	}
	j[0] = a[0];
	j[1] = a[1];
	j[2] = a[2];
	j[3] = a[3];
	return 6;
}

/* Policy, then egress rule, for one destination (j in the judged family).
 * Returns the endpoint to leave from, or 0 if refused (counted, reported). */
static __always_inline struct egress_val *admit(struct policy *p, __u32 mark, __u32 op,
						__u8 fam, const __u32 *j, __u16 port_be,
						__u8 proto)
{
	__u16 port = bpf_ntohs(port_be);
	struct egress_val *e;
	__u32 label = 0;

	if (judge(p, fam, j, port, proto, &label) != V_ALLOW) {
		count(1);
		report(EV_DENY_POLICY, mark, op, label, fam, j, port, proto);
		return 0;
	}
	e = fam == 4 ? egress4(mark, p->gen, j[0], port_be) : egress6(mark, p->gen, j, port_be);
	if (!e || e->src_family != fam) {
		count(1);
		report(EV_DENY_NO_EGRESS, mark, op, 0, fam, j, port, proto);
		return 0;
	}
	return e;
}

/* Directory lookups. Keys hold IPv4 in addr[0] (family 4) or the v6 address. */
static __always_inline struct svc_val *lookup_svc(void *map, __u8 fam, const __u32 *j,
						  __u16 port_be, __u8 proto)
{
	struct svc_key k = {};

	k.addr[0] = j[0];
	if (fam == 6) {
		k.addr[1] = j[1];
		k.addr[2] = j[2];
		k.addr[3] = j[3];
	}
	k.port = port_be;
	k.family = fam;
	k.proto = proto;
	return bpf_map_lookup_elem(map, &k);
}

/* Rewrite a v6 sockaddr to v (same family as judged: mapped stays mapped). */
static __always_inline void store6(struct bpf_sock_addr *ctx, __u8 fam, struct svc_val *v)
{
	if (fam == 4) {
		ctx->user_ip6[3] = v->addr[0];
	} else {
		ctx->user_ip6[0] = v->addr[0];
		ctx->user_ip6[1] = v->addr[1];
		ctx->user_ip6[2] = v->addr[2];
		ctx->user_ip6[3] = v->addr[3];
	}
	ctx->user_port = v->port;
}

static __always_inline void redirect4(struct bpf_sock_addr *ctx, __u8 proto)
{
	__u32 j[4] = {ctx->user_ip4, 0, 0, 0};
	struct svc_val *v = lookup_svc(&sg_services, 4, j, ctx->user_port, proto);

	if (v && v->family == 4) {
		ctx->user_ip4 = v->addr[0];
		ctx->user_port = v->port;
		count(2);
	}
}

static __always_inline void redirect6(struct bpf_sock_addr *ctx, __u8 fam, const __u32 *j,
				      __u8 proto)
{
	struct svc_val *v = lookup_svc(&sg_services, fam, j, ctx->user_port, proto);

	if (v && v->family == fam) {
		store6(ctx, fam, v);
		count(2);
	}
}

static __always_inline int unbound4(struct bpf_sock_addr *ctx)
{
	return ctx->sk->src_ip4 == 0 && ctx->sk->src_port == 0;
}

static __always_inline int no_addr6(struct bpf_sock_addr *ctx)
{
	return ctx->sk->src_ip6[0] == 0 && ctx->sk->src_ip6[1] == 0 &&
	       ctx->sk->src_ip6[2] == 0 && ctx->sk->src_ip6[3] == 0;
}

static __always_inline int unbound6(struct bpf_sock_addr *ctx)
{
	return ctx->sk->src_port == 0 && no_addr6(ctx);
}

SEC("cgroup/connect4")
int sg_connect4(struct bpf_sock_addr *ctx)
{
	__u32 mark, j[4] = {};
	struct policy *p = grafted_policy(ctx, &mark);
	struct sockaddr_in sin = {};
	struct egress_val *e;
	__u8 proto;

	if (!p)
		return 1;
	proto = sock_proto(ctx);
	count(0);
	j[0] = ctx->user_ip4;
	e = admit(p, mark, OP_CONNECT, 4, j, ctx->user_port, proto);
	if (!e)
		return 0;
	redirect4(ctx, proto);	/* after the checks: judged on what the application asked */
	if (!unbound4(ctx))
		return 1;
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = e->src[0];
	sin.sin_port = e->src_port;
	if (bpf_bind(ctx, (struct sockaddr *)&sin, sizeof(sin))) {
		report(EV_BIND_FAILED, mark, OP_CONNECT, e->label, 4, j, bpf_ntohs(ctx->user_port),
		       proto);
		return 0;
	}
	return 1;
}

SEC("cgroup/connect6")
int sg_connect6(struct bpf_sock_addr *ctx)
{
	__u32 mark, a[4], j[4];
	struct policy *p = grafted_policy(ctx, &mark);
	struct sockaddr_in6 sin6 = {};
	struct egress_val *e;
	__u8 proto, fam;

	if (!p)
		return 1;
	proto = sock_proto(ctx);
	count(0);
	fam = dest6(ctx, a, j);
	e = admit(p, mark, OP_CONNECT, fam, j, ctx->user_port, proto);
	if (!e)
		return 0;
	redirect6(ctx, fam, j, proto);
	if (!unbound6(ctx))
		return 1;
	sin6.sin6_family = AF_INET6;
	if (fam == 4) {
		sin6.sin6_addr.in6_u.u6_addr32[2] = bpf_htonl(0x0000ffff);
		sin6.sin6_addr.in6_u.u6_addr32[3] = e->src[0];
	} else {
		sin6.sin6_addr.in6_u.u6_addr32[0] = e->src[0];
		sin6.sin6_addr.in6_u.u6_addr32[1] = e->src[1];
		sin6.sin6_addr.in6_u.u6_addr32[2] = e->src[2];
		sin6.sin6_addr.in6_u.u6_addr32[3] = e->src[3];
	}
	sin6.sin6_port = e->src_port;
	if (bpf_bind(ctx, (struct sockaddr *)&sin6, sizeof(sin6))) {
		report(EV_BIND_FAILED, mark, OP_CONNECT, e->label, fam, j,
		       bpf_ntohs(ctx->user_port), proto);
		return 0;
	}
	return 1;
}

SEC("cgroup/sendmsg4")
int sg_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u32 mark, j[4] = {};
	struct policy *p = grafted_policy(ctx, &mark);
	struct egress_val *e;

	if (!p)
		return 1;
	j[0] = ctx->user_ip4;
	e = admit(p, mark, OP_SENDMSG, 4, j, ctx->user_port, IPPROTO_UDP);
	if (!e)
		return 0;
	redirect4(ctx, IPPROTO_UDP);
	if (ctx->sk->src_ip4 == 0)
		ctx->msg_src_ip4 = e->src[0];
	return 1;
}

SEC("cgroup/sendmsg6")
int sg_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u32 mark, a[4], j[4];
	struct policy *p = grafted_policy(ctx, &mark);
	struct egress_val *e;
	__u8 fam;

	if (!p)
		return 1;
	fam = dest6(ctx, a, j);
	e = admit(p, mark, OP_SENDMSG, fam, j, ctx->user_port, IPPROTO_UDP);
	if (!e)
		return 0;
	redirect6(ctx, fam, j, IPPROTO_UDP);
	if (!no_addr6(ctx))	/* bound to an address: it sends from it */
		return 1;
	if (fam == 4) {
		ctx->msg_src_ip6[0] = 0;
		ctx->msg_src_ip6[1] = 0;
		ctx->msg_src_ip6[2] = bpf_htonl(0x0000ffff);
		ctx->msg_src_ip6[3] = e->src[0];
	} else {
		ctx->msg_src_ip6[0] = e->src[0];
		ctx->msg_src_ip6[1] = e->src[1];
		ctx->msg_src_ip6[2] = e->src[2];
		ctx->msg_src_ip6[3] = e->src[3];
	}
	return 1;
}

/* getpeername (and recvmsg for UDP): a host address:port the directory sent
 * us to is shown as the overlay address:port the application asked for. */
static __always_inline int unredirect4(struct bpf_sock_addr *ctx, __u8 proto)
{
	__u32 mark, j[4] = {ctx->user_ip4, 0, 0, 0};
	struct svc_val *v;

	if (!grafted_policy(ctx, &mark))
		return 1;
	v = lookup_svc(&sg_services_rev, 4, j, ctx->user_port, proto);
	if (v && v->family == 4) {
		ctx->user_ip4 = v->addr[0];
		ctx->user_port = v->port;
	}
	return 1;
}

static __always_inline int unredirect6(struct bpf_sock_addr *ctx, __u8 proto)
{
	__u32 mark, a[4], j[4];
	struct svc_val *v;
	__u8 fam;

	if (!grafted_policy(ctx, &mark))
		return 1;
	fam = dest6(ctx, a, j);
	v = lookup_svc(&sg_services_rev, fam, j, ctx->user_port, proto);
	if (v && v->family == fam)
		store6(ctx, fam, v);
	return 1;
}

SEC("cgroup/recvmsg4")
int sg_recvmsg4(struct bpf_sock_addr *ctx)
{
	return unredirect4(ctx, IPPROTO_UDP);
}

SEC("cgroup/getpeername4")
int sg_getpeername4(struct bpf_sock_addr *ctx)
{
	return unredirect4(ctx, sock_proto(ctx));
}

SEC("cgroup/recvmsg6")
int sg_recvmsg6(struct bpf_sock_addr *ctx)
{
	return unredirect6(ctx, IPPROTO_UDP);
}

SEC("cgroup/getpeername6")
int sg_getpeername6(struct bpf_sock_addr *ctx)
{
	return unredirect6(ctx, sock_proto(ctx));
}

char LICENSE[] SEC("license") = "GPL";
