// SPDX-License-Identifier: GPL-2.0
/* sockgraft's in-kernel decisions and guards for grafted sockets.
 *
 * The node agent creates every grafted socket itself, in the host namespace,
 * and tags it in sg_sock (socket-local storage: {mark, flags}) before any
 * container process holds it. The tag is the socket's identity: a container
 * cannot change it (SO_MARK can be changed with CAP_NET_RAW since Linux 5.17;
 * the tag needs the map's fd, which only the agent holds). The programs are
 * attached to the agent's cgroup, which every socket it creates carries, and
 * accepted sockets inherit both the cgroup and (BPF_F_CLONE) the tag.
 *
 * Guards, for every tagged socket, in both graft modes, whatever the call:
 *   bind4/6      only the agent binds a grafted socket (it binds the endpoint
 *                address it checked); anything else: EACCES
 *   setsockopt   options that would change which addresses or packets the
 *                socket may use (SO_MARK, *_TRANSPARENT, FREEBIND, device
 *                binding, source routing, multicast joins, sticky IPv6
 *                PKTINFO, TCP repair...) are refused: EPERM
 *   cgroup_skb egress  every packet: its mark must be the tag's (an SO_MARK
 *                control message cannot relabel a datagram) and its source
 *                an address the container's endpoints grant (no IP_PKTINFO
 *                or any other forged source): else dropped (EPERM)
 *   cgroup_skb ingress  a grafted listener the agent did not allow (listen()
 *                called by a process outside the seccomp filter) gets nothing
 *   connect4/6   the container's policy, also for connects the agent did not
 *                make (address lengths it does not trap, TCP fast open, a
 *                disconnected socket connected again)
 *
 * Sockets grafted at socket() time (policy flag F_SOCKET_MODE) also have their
 * connect(), sendmsg() and getpeername() decided here, with no round trip to
 * the agent:
 *
 *   connect4/6   policy: the container's first-match rule list on the address
 *                the application asked for (deny -> EACCES, as the agent
 *                answers a policy denial in syscall mode);
 *                egress: longest-prefix rule -> bpf_bind() the endpoint's host
 *                address (dynamic port: the kernel picks it at connect time);
 *                no egress rule -> ENETUNREACH (no way out for it);
 *                directory: a container overlay address:port that a grafted
 *                server published is rewritten to the host address:port its
 *                socket really listens on (cross-host bypass, no VXLAN).
 *   sendmsg4/6   the same for every unconnected UDP datagram (source address
 *                rewritten to the endpoint instead of bpf_bind).
 *   getpeername4/6, recvmsg4/6  the directory rewrite undone: the
 *                application sees the overlay address it connected to (and
 *                UDP replies come from it).
 *
 * A socket-mode container's loopback is its own: 127.0.0.0/8 and ::1 (no
 * egress rule naming loopback) become its private loopback addresses on the
 * host, 127.83.H.L and fd53:4c4f::HL (HL = the mark's id), in connect and
 * sendmsg (the source bound to the same address), and back to 127.0.0.1 /
 * ::1 in getsockname, getpeername and recvmsg. The agent binds a socket's
 * loopback bind() there. A tagged socket on a private loopback address
 * receives only packets carrying its container's mark (cgroup_skb
 * ingress): no other container and no host process reaches it.
 *
 * Untagged sockets are left alone (return 1). A tagged socket whose container
 * has no policy entry is refused everything the guards judge (fail closed).
 * Calls made by the agent itself (its cgroup, sg_config[0]) are not judged
 * again: it decided them. Every denial is counted and reported on the
 * sg_events ring buffer so the agent writes the audit line.
 *
 * Map layouts are mirrored byte for byte by sockgraft/model/bpfmaps.py.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_core_read.h>

#define AF_INET 2
#define AF_INET6 10
#define MARK_MASK 0xffff0000u
#define MARK_BASE 0x53470000u
#define MAX_RULES 1024    /* walked with bpf_loop: the verifier sees one rule */

#define F_SOCKET_MODE 1u
#define F_NO_SPLICE 2u       /* the container asked not to be spliced */

#define T_INGRESS 1u        /* tag flag: bound by the agent through an ingress rule */
#define T_OWNED 2u          /* tag flag: made under the container's socket uid (the mark) */

#define LO4_NET 0x7f530000u /* 127.83.0.0/16, host order: containers' private loopback */
#define LO6_NET 0xfd534c4fu /* fd53:4c4f::/96 */

#define V_DENY 0
#define V_ALLOW 1

#define EV_DENY_POLICY 1
#define EV_DENY_NO_EGRESS 2
#define EV_BIND_FAILED 3
#define EV_DENY_BIND 4
#define EV_DENY_SOCKOPT 5
#define EV_DENY_SOURCE 6
#define EV_DENY_MARK 7
#define EV_DENY_LISTEN 8
#define EV_DENY_UNKNOWN 9
#define EV_SPLICE_LEAVE 10  /* not a denial: sockets in sg_splice_leave to remove */
#define EV_DENY_KEPT 11     /* syscall mode: the container's own loopback / "this host" */
#define EV_DENY_SPOOF 12    /* fast path: label = what (SP_*), the address claimed */
#define EV_DENY_IPOPTS 13   /* a packet with IPv4 options / IPv6 routing or option headers */
#define EV_DENY_PRIORITY 14 /* a packet with a priority above TC_PRIO_INTERACTIVE (label) */
#define EV_DENY_OWNER 15    /* a packet of a socket whose owner was changed (label: the uid) */
#define EV_DENY_GROUP 16    /* a packet for a socket in another's SO_REUSEPORT group */
#define REUSEPORT_SCAN 128  /* members of an SO_REUSEPORT group looked at, at most */
#define PRIO_UNPRIVILEGED 6 /* TC_PRIO_INTERACTIVE: what SO_PRIORITY allows without a capability */
#define SP_SOURCE 1         /* an IP source that is not the container's */
#define SP_ARP 2            /* an ARP sender address that is not its own (a
			     * probe: its target address) */
#define SP_ND_TARGET 3      /* a neighbour advertisement (or a duplicate address
			     * probe) of another's address */
#define SP_ND_MALFORMED 4   /* neighbour discovery carrying more than the link needs */
#define SP_ROUTER 5         /* a router advertisement or redirect, an MLD query */
#define SP_FRAGMENT 6       /* a non-first fragment whose first was not judged */
#define SP_MAC 7            /* an Ethernet source (or ARP sender hardware address)
			     * that is not its interface's: the bridge would learn
			     * a neighbour's MAC on its port */

#define OP_CONNECT 1
#define OP_SENDMSG 2
#define OP_BIND 3
#define OP_SETSOCKOPT 4
#define OP_SEND 5
#define OP_LISTEN 6

#define SOL_SOCKET 1
#define SOL_TCP 6
#define SOL_IPV6 41
#define ETH_P_IP 0x0800
#define ETH_P_IPV6 0x86dd

struct rule {
	__u32 addr[4];     /* network order; IPv4 in addr[0] */
	__u32 mask[4];
	__u16 port_lo;     /* host order, inclusive */
	__u16 port_hi;
	__u8 family;       /* 0 any, 4, 6 */
	__u8 proto;        /* 0 any, IPPROTO_TCP, IPPROTO_UDP */
	__u8 verdict;      /* V_DENY / V_ALLOW */
	__u8 flags;        /* RULE_HOST_ONLY */
	__u32 label;       /* index into the agent's rule labels (audit) */
};

/* A rule for host sockets only (the built-in multicast and broadcast denies:
 * a host socket's datagram to a group reaches a host link), skipped by the
 * fast path, which judges what a container sends from its own network
 * stack - to its own link (DHCP, mDNS, IGMP). */
#define RULE_HOST_ONLY 1

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
	__u32 mark;         /* sg_services: the client container the agent lets
			     * follow this record (its policy allows it, on the
			     * overlay and the host address); sg_services_rev: 0 */
};

struct svc_val {
	__u32 addr[4];      /* where the grafted server's host socket listens */
	__u16 port;
	__u8 family;
	__u8 pad;
};

struct sock_tag {
	__u32 mark;         /* the container's mark (MARK_BASE | id): its identity, */
	__u16 flags;        /* T_INGRESS */
	__u16 gen;          /* with the generation of that mark (sg_gen) */
};

struct src_key {
	__u32 mark;
	__u8 family;        /* 4 or 6 */
	__u8 pad[3];
	__u32 addr[4];      /* network order; IPv4 in addr[0]; all 0 = any address */
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
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC | BPF_F_CLONE);
	__type(key, int);
	__type(value, struct sock_tag);
} sg_sock SEC(".maps");

/* [pid_tgid of an agent thread serving in the native loop] the tag (and
 * mark) of the host sockets that thread makes now: given at birth by
 * sg_born (no SO_MARK setsockopt and no sg_sock update per socket). The
 * entry exists only while the thread is in the native loop, which makes
 * host sockets for that one container only. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, __u64);
	__type(value, struct sock_tag);
} sg_born SEC(".maps");

/* [0] the agent's cgroup id: its own calls are not judged again
 * [1] CFG_SPLICE: 1 = grafted local pairs established from now on are spliced
 * [2] CFG_RMEM_MAX: the most a spliced receiver may hold queued when its
 *     application did not set SO_RCVBUF (8 x net.ipv4.tcp_rmem's default, at
 *     most its maximum); beyond it the sender takes TCP, whose flow control
 *     stops it as it would stop a TCP sender
 * [3] CFG_FAST: 1 = the packet fast path forwards local pairs directly */
#define CFG_SPLICE 1
#define CFG_RMEM_MAX 2
#define CFG_FAST 3
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} sg_config SEC(".maps");

/* [mark id] the generation of each container mark. A released mark handed
 * to a new container gets the next generation: sockets tagged for the old
 * container (still held somewhere) no longer match and are refused
 * everything, as if their container had no policy. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__uint(max_entries, 65536);
	__type(key, __u32);
	__type(value, __u32);
} sg_gen SEC(".maps");

/* source addresses a container's packets may carry (its endpoints) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 65536);
	__type(key, struct src_key);
	__type(value, __u8);
} sg_sources SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__uint(map_flags, BPF_F_NO_PREALLOC);	/* 37 KB a container: only those there are */
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

/* [0] connects judged, [1] connects + datagrams denied, [2] redirected by the
 * directory, [3] refused by the guards (bind, setsockopt, forged packets) */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, 4);
	__type(key, __u32);
	__type(value, __u64);
} sg_counters SEC(".maps");

/* --- splicing of grafted local pairs (sockmap) -----------------------------
 * A grafted TCP socket enters sg_splice when it is established (sockops),
 * keyed by its own 4-tuple (v4-mapped addresses as IPv4: a dual-stack server
 * meets an IPv4 client); a client only when its server may be on this node,
 * an accepted socket only when its client entered. The two learn each other
 * (sg_splice_clients, sg_splice_peer -> splice_state.peer). sg_msg runs on
 * every sendmsg of a socket in the map and hands the data straight to the
 * peer's receive queue (psock ingress), skipping TCP/IP. Each direction
 * switches between the two paths only where the order of bytes is kept:
 *   TCP -> spliced   only when every byte sent by TCP was read by the peer
 *                    (sender write_seq == peer rcv_nxt == peer copied_seq);
 *   spliced -> TCP   always (the peer reads its psock queue first), taken
 *                    when the peer's psock queue holds its receive buffer's
 *                    worth (TCP's flow control takes over: the queue never
 *                    outgrows the buffer), when the peer set SO_RCVLOWAT
 *                    (poll must honour it; the psock queue does not), or
 *                    when the peer left the map.
 * Only non-blocking sockets: a blocking recv() on a socket in a sockhash
 * returns EAGAIN after a wakeup that brought no data (tcp_bpf_recvmsg waits
 * once, it does not loop like tcp_recvmsg), and the socket's own sends wake
 * it (write space) - measured here: a blocking client that sent 1 MB then
 * waited for a reply got EAGAIN in 19 runs of 20, with its data on TCP or
 * spliced alike. So a client enters only if its file is O_NONBLOCK when it
 * connects; data goes into a peer's psock queue only while the peer's file
 * is O_NONBLOCK (an accepted socket has no file before accept(): TCP until
 * it has one); and a socket that sends while blocking takes TCP and is taken
 * out of the map by the agent (woken by an EV_SPLICE_LEAVE event; nothing
 * waits in its psock queue, by the rule before). Between that send and its
 * removal (the agent's reaction time) a blocking recv could still meet the
 * kernel's EAGAIN: docs/architecture.md says so.
 * The kernel removes a socket from sg_splice when it closes. */
struct splice_key {
	__u32 family;
	__u32 lip[4];       /* network order; IPv4 in [0] */
	__u32 rip[4];
	__u32 lport;        /* host order */
	__u32 rport;
};

/* this node's own addresses (the agent writes them; loopback is known here):
 * a client enters sg_splice only when its server may be local */
struct local_key {
	__u32 family;       /* 4 or 6 */
	__u32 addr[4];      /* network order; IPv4 in [0] */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 1024);
	__type(key, struct local_key);
	__type(value, __u8);
} sg_local SEC(".maps");

/* client key -> the client's struct sock, until its accepted peer enters;
 * then client key -> the accepted socket, until the client's first send
 * takes it (LRU: entries of pairs that never complete age out) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct splice_key);
	__type(value, __u64);
} sg_splice_clients SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 16384);
	__type(key, struct splice_key);
	__type(value, __u64);
} sg_splice_peer SEC(".maps");

/* grafted listeners (family, address as bound, port) -> their struct sock,
 * from listen() until they close: an accepted socket enters sg_splice only
 * while its listener's file is O_NONBLOCK (event loops accept non-blocking
 * sockets; a blocking server would only pay tcp_bpf for nothing) */
struct listen_key {
	__u32 family;
	__u32 addr[4];
	__u32 port;         /* host order */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct listen_key);
	__type(value, __u64);
} sg_splice_listeners SEC(".maps");

/* sockets whose file became blocking, for the agent to take out of sg_splice
 * (a sk_msg program cannot delete from a sockhash) */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 4096);
	__type(key, struct splice_key);
	__type(value, __u8);
} sg_splice_leave SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__uint(max_entries, 65536);
	__type(key, struct splice_key);
	__type(value, __u64);
} sg_splice SEC(".maps");

/* sockets whose application called splice(2) on them: nothing more is
 * spliced into them (their peer's sends take TCP) while the agent hands
 * what waits in their psock queue to the pipe and takes them out of the map
 * (tcp_splice_read reads the TCP queue only; written by the agent) */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 65536);
	__type(key, struct splice_key);
	__type(value, __u8);
} sg_splice_norx SEC(".maps");

#define S_SPLICED 1u        /* this socket's sends go to its peer's psock queue */

struct splice_state {
	__u32 flags;
	__u32 pad;
	__u64 peer;         /* the peer's struct sock (read with probe_read only) */
};

struct {
	__uint(type, BPF_MAP_TYPE_SK_STORAGE);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, int);
	__type(value, struct splice_state);
} sg_splice_st SEC(".maps");

struct splice_stats {
	__u64 sockets;      /* grafted sockets that entered sg_splice */
	__u64 streams;      /* times a direction switched to the spliced path */
	__u64 bytes;        /* bytes handed over spliced */
	__u64 fallback;     /* sends to a known peer that took TCP */
	__u64 left;         /* sockets that left the map (their file became blocking) */
};

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_HASH);
	__uint(max_entries, 4096);
	__type(key, __u32);     /* container mark */
	__type(value, struct splice_stats);
} sg_splice_stats SEC(".maps");

/* the kernel's own structures, read through BTF (CO-RE) */
struct tcp_sock___sg {
	__u32 rcv_nxt;
	__u32 copied_seq;
	__u32 write_seq;
} __attribute__((preserve_access_index));

struct file___sg {
	unsigned int f_flags;
} __attribute__((preserve_access_index));

struct socket___sg {
	struct file___sg *file;
} __attribute__((preserve_access_index));

struct kuid___sg {
	__u32 val;
} __attribute__((preserve_access_index));

struct sock_reuseport___sg;

struct sock___sg {
	struct kuid___sg sk_uid;
	__u32 sk_mark;
	struct sock_reuseport___sg *sk_reuseport_cb;
	void *sk_user_data;
	int sk_rcvbuf;
	int sk_rcvlowat;
	__u8 sk_userlocks;
	struct socket___sg *sk_socket;
} __attribute__((preserve_access_index));

#define O_NONBLOCK_ 04000

struct sock_reuseport___sg {
	__u16 num_socks;
	struct sock___sg *socks[];
} __attribute__((preserve_access_index));

struct sk_psock___sg {
	__u32 msg_tot_len;
} __attribute__((preserve_access_index));

static __always_inline void count(__u32 idx)
{
	__u64 *c = bpf_map_lookup_elem(&sg_counters, &idx);
	if (c)
		*c += 1;
}

static __always_inline struct sock_tag *tag_of(struct bpf_sock *sk)
{
	if (!sk)
		return 0;
	return bpf_sk_storage_get(&sg_sock, sk, 0, 0);
}

/* A tag of an earlier holder of its mark (the container is gone). */
static __always_inline int stale(struct sock_tag *t)
{
	__u32 id = t->mark & 0xFFFF;
	__u32 *g = bpf_map_lookup_elem(&sg_gen, &id);

	return !g || *g != t->gen;
}

/* The kernel address of a socket the program holds, as a plain number (the
 * verifier allows no arithmetic on a socket pointer; CO-RE reads of its
 * fields go through bpf_probe_read_kernel from the number). */
static __always_inline struct sock___sg *sk_kernel(struct bpf_sock *sk)
{
	__u64 addr = 0, ptr = (__u64)(void *)sk;

	bpf_probe_read_kernel(&addr, sizeof(addr), &ptr);
	return (struct sock___sg *)addr;
}

/* The uid that owns a socket made under the container's socket uid: it
 * must still be that (kernel/sockets.socket_uid: the mark). fchown() on a
 * socket fd (CAP_CHOWN, which Docker keeps) rewrites sk_uid, and sk_uid is
 * what keeps SO_REUSEPORT groups apart (a container would join a root
 * service's group and take its connections) and what uid routing rules
 * match. 1 (and the uid found) when it is no longer the mark. Only for
 * sockets that may_group(). */
static __always_inline int owner_changed(struct sock___sg *ks, struct sock_tag *t, __u32 *uid)
{
	if (!(t->flags & T_OWNED))
		return 0;
	*uid = BPF_CORE_READ(ks, sk_uid.val);
	return *uid != t->mark;
}

/* Listeners and datagram sockets: the only ones in SO_REUSEPORT groups, and
 * the only ones whose owner is judged - an accepted socket's owner is
 * whoever accept()ed it (sock_graft: the application's fsuid). Established
 * TCP traffic, the bulk, skips the reads below. */
static __always_inline int may_group(struct bpf_sock *sk)
{
	return sk->type != 1 /* SOCK_STREAM */ || sk->state == BPF_TCP_LISTEN;
}

/* 1: sk shares an SO_REUSEPORT group with a socket that is not its
 * container's (another mark: a host service, another container). The kernel
 * groups sockets of the same owner (sk_uid), and a container can rewrite its
 * socket's owner (fchown, also through /proc/self/fd/N) and put it back after
 * joining; the mark it cannot change. A socket in such a group gets nothing:
 * no connection or datagram meant for the others' sockets is delivered to
 * it. A group larger than REUSEPORT_SCAN counts as foreign. */
static __always_inline int foreign_group(struct sock___sg *ks, __u32 mark)
{
	struct sock_reuseport___sg *r = BPF_CORE_READ(ks, sk_reuseport_cb);
	__u64 base;
	__u16 n;

	if (!r)
		return 0;
	n = BPF_CORE_READ(r, num_socks);
	if (n <= 1)
		return 0;
	if (n > REUSEPORT_SCAN)
		return 1;
	base = (__u64)r + bpf_core_field_offset(struct sock_reuseport___sg, socks);
	for (int i = 0; i < REUSEPORT_SCAN; i++) {
		struct sock___sg *m = 0;

		if (i >= n)
			break;
		if (bpf_probe_read_kernel(&m, sizeof(m), (void *)(base + i * sizeof(m))) || !m ||
		    BPF_CORE_READ(m, sk_mark) != mark)
			return 1;
	}
	return 0;
}

static __always_inline int by_agent(void)
{
	__u32 k = 0;
	__u64 *cg = bpf_map_lookup_elem(&sg_config, &k);

	return cg && *cg && bpf_get_current_cgroup_id() == *cg;
}

/* The policy of a tagged socket's container, or 0 (untagged: *mark = 0;
 * tagged without a policy entry: *mark set). socket_mode: only containers
 * grafted at socket() time. */
static __always_inline struct policy *grafted_policy(struct bpf_sock_addr *ctx, __u32 *mark,
						     int socket_mode)
{
	struct sock_tag *t = tag_of(ctx->sk);
	struct policy *p;

	*mark = 0;
	if (!t)
		return 0;
	*mark = t->mark;
	if (stale(t))
		return 0;	/* refused like a container without policy */
	p = bpf_map_lookup_elem(&sg_policy, mark);
	if (!p || (socket_mode && !(p->flags & F_SOCKET_MODE)))
		return 0;
	return p;
}

static __always_inline void report_as(__u32 pid, __u32 kind, __u32 mark, __u32 op,
				      __u32 label, __u8 family, const __u32 *addr, __u16 port,
				      __u8 proto)
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
	ev.pid = pid;
	bpf_ringbuf_output(&sg_events, &ev, sizeof(ev), 0);
}

#define report(kind, mark, op, label, family, addr, port, proto) \
	report_as(bpf_get_current_pid_tgid() >> 32, kind, mark, op, label, family, addr, \
		  port, proto)

/* First match over the container's rule list; the label of the deciding rule
 * goes to *label. family is 4 (addr[0]) or 6. The walk is a bpf_loop: any
 * number of rules up to MAX_RULES costs the verifier one rule. */
struct judge_ctx {
	struct policy *p;
	__u32 n;
	__u32 addr[4];
	__u16 port;
	__u8 family;
	__u8 proto;
	__u8 fast;         /* the fast path judges: host-only rules skipped */
	__u32 label;
	int verdict;
};

static __always_inline int rule_matches(struct judge_ctx *c, struct rule *r)
{
	if (r->family && r->family != c->family)
		return 0;
	if (r->proto && r->proto != c->proto)
		return 0;
	if (c->port < r->port_lo || c->port > r->port_hi)
		return 0;
	/* a rule naming ports names TCP or UDP ones (as nftables' rules do):
	 * not an ICMP echo identifier, not any port of another protocol */
	if ((r->port_lo || r->port_hi != 65535) && c->proto != IPPROTO_TCP &&
	    c->proto != IPPROTO_UDP)
		return 0;
	if ((c->addr[0] & r->mask[0]) != r->addr[0])
		return 0;
	if (c->family == 6 &&
	    ((c->addr[1] & r->mask[1]) != r->addr[1] ||
	     (c->addr[2] & r->mask[2]) != r->addr[2] ||
	     (c->addr[3] & r->mask[3]) != r->addr[3]))
		return 0;
	return 1;
}

#define JUDGE_BLOCK 8      /* rules per bpf_loop step: the call costs more than a rule */

/* Rules [block * JUDGE_BLOCK, + JUDGE_BLOCK) of c->p, up to c->n. */
static long judge_block(__u64 block, void *data)
{
	struct judge_ctx *c = data;

	__u32 base = (__u32)(block & (MAX_RULES / JUDGE_BLOCK - 1)) * JUDGE_BLOCK;

	for (int j = 0; j < JUDGE_BLOCK; j++) {
		__u32 i = base + j;
		struct rule *r;

		if (i >= c->n || i >= MAX_RULES)
			return 1;
		r = &c->p->rules[i & (MAX_RULES - 1)];
		if (c->fast && (r->flags & RULE_HOST_ONLY))
			continue;
		if (rule_matches(c, r)) {
			c->label = r->label;
			c->verdict = r->verdict;
			return 1;
		}
	}
	return 0;
}

static __always_inline int judge(struct policy *p, __u8 family, const __u32 *addr,
				 __u16 port, __u8 proto, __u32 *label, __u8 fast)
{
	struct judge_ctx c = {};
	__u32 n = p->nrules;

	c.p = p;
	c.fast = fast;
	c.addr[0] = addr[0];
	if (family == 6) {
		c.addr[1] = addr[1];
		c.addr[2] = addr[2];
		c.addr[3] = addr[3];
	}
	c.port = port;
	c.family = family;
	c.proto = proto;
	c.verdict = -1;
	c.n = n < MAX_RULES ? n : MAX_RULES;
	bpf_loop((c.n + JUDGE_BLOCK - 1) / JUDGE_BLOCK, judge_block, &c, 0);
	if (c.verdict >= 0) {
		*label = c.label;
		return c.verdict;
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

/* A tagged socket whose container has no policy entry (its configuration
 * was removed): refused, fail closed. Untagged (mark 0): not ours. */
static __always_inline int unknown_container(__u32 mark, __u32 op)
{
	__u32 none[4] = {};

	if (!mark)
		return 1;
	count(1);
	report(EV_DENY_UNKNOWN, mark, op, 0, 4, none, 0, 0);
	bpf_set_retval(-13 /* EACCES */);
	return 0;
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

	if (judge(p, fam, j, port, proto, &label, 0) != V_ALLOW) {
		count(1);
		report(EV_DENY_POLICY, mark, op, label, fam, j, port, proto);
		bpf_set_retval(-13 /* EACCES: one errno for a policy denial, both modes */);
		return 0;
	}
	e = fam == 4 ? egress4(mark, p->gen, j[0], port_be) : egress6(mark, p->gen, j, port_be);
	if (!e || e->src_family != fam) {
		count(1);
		report(EV_DENY_NO_EGRESS, mark, op, 0, fam, j, port, proto);
		bpf_set_retval(-101 /* ENETUNREACH */);
		return 0;
	}
	return e;
}

/* Directory lookups. Keys hold IPv4 in addr[0] (family 4) or the v6 address. */
static __always_inline struct svc_val *lookup_svc(void *map, __u8 fam, const __u32 *j,
						  __u16 port_be, __u8 proto, __u32 mark)
{
	struct svc_key k = {};

	k.mark = mark;
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

static __always_inline void redirect4(struct bpf_sock_addr *ctx, __u8 proto, __u32 mark)
{
	__u32 j[4] = {ctx->user_ip4, 0, 0, 0};
	struct svc_val *v = lookup_svc(&sg_services, 4, j, ctx->user_port, proto, mark);

	if (v && v->family == 4) {
		ctx->user_ip4 = v->addr[0];
		ctx->user_port = v->port;
		count(2);
	}
}

static __always_inline void redirect6(struct bpf_sock_addr *ctx, __u8 fam, const __u32 *j,
				      __u8 proto, __u32 mark)
{
	struct svc_val *v = lookup_svc(&sg_services, fam, j, ctx->user_port, proto, mark);

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

/* --- a socket-mode container's private loopback ----------------------------- */

static __always_inline __u32 lo4_of(__u32 mark)
{
	return bpf_htonl(LO4_NET | (mark & 0xffff));
}

static __always_inline int is_lo4(__u32 a_be)
{
	return (bpf_ntohl(a_be) >> 24) == 127;
}

static __always_inline int is_lo6(const __u32 *a)
{
	return a[0] == 0 && a[1] == 0 && a[2] == 0 && a[3] == bpf_htonl(1);
}

static __always_inline int is_private6(const __u32 *a, __u32 mark)
{
	return a[0] == bpf_htonl(LO6_NET) && a[1] == 0 && a[2] == 0 &&
	       a[3] == bpf_htonl(mark & 0xffff);
}

/* Where a loopback-ish destination of a grafted socket goes. Loopback stays
 * the container's unless an egress rule names loopback (a rule inside
 * 127.0.0.0/8 or ::1/128 grafts it onto the host's, in both modes).
 * LO_OWN (socket mode): the container's own loopback (no egress rule inside
 * the loopback range) and "this host" (0.0.0.0, ::: after the hook the
 * kernel connects those to 127.0.0.1 / ::1 - never the host's) are its
 * private loopback address on the host.
 * LO_KEPT (syscall mode): the agent keeps the container's own loopback and
 * "this host" (0.0.0.0, ::) in the container (model.graft._keeps_loopback);
 * the kernel re-reads the address of a call the agent continued, so a
 * grafted socket whose application changed the address after the agent read
 * it is refused them here: it reaches nothing the agent would not graft.
 * 0: judged like any other destination. */
#define LO_OWN 1
#define LO_KEPT 2

static __always_inline int loopback_of(struct policy *p, __u32 mark, __u8 fam, const __u32 *a,
				       const __u32 *j, __u16 port_be)
{
	int socket_mode = p->flags & F_SOCKET_MODE;
	struct egress_val *e;

	if (fam == 4) {
		if (j[0] == 0)		/* "this host": the kernel makes it loopback */
			return socket_mode ? LO_OWN : LO_KEPT;
		if (!is_lo4(j[0]))
			return 0;
		e = egress4(mark, p->gen, j[0], port_be);
		if (e && e->plen >= 8)
			return 0;
	} else {
		if (!(a[0] | a[1] | a[2] | a[3]))
			return socket_mode ? LO_OWN : LO_KEPT;
		if (!is_lo6(a))
			return 0;
		e = egress6(mark, p->gen, a, port_be);
		if (e && e->plen >= 128)
			return 0;
	}
	return socket_mode ? LO_OWN : LO_KEPT;
}

static __always_inline int refuse_kept(__u32 mark, __u32 op, __u8 fam, const __u32 *j,
				       __u16 port_be, __u8 proto)
{
	count(1);
	report(EV_DENY_KEPT, mark, op, 0, fam, j, bpf_ntohs(port_be), proto);
	bpf_set_retval(-13 /* EACCES */);
	return 0;
}

static __always_inline int bind_lo4(struct bpf_sock_addr *ctx, __u32 mark)
{
	struct sockaddr_in sin = {};

	if (!unbound4(ctx))
		return 1;
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = lo4_of(mark);
	if (bpf_bind(ctx, (struct sockaddr *)&sin, sizeof(sin))) {
		bpf_set_retval(-99 /* EADDRNOTAVAIL */);
		return 0;
	}
	return 1;
}

/* fam 4: the mapped form of the IPv4 private address; 6: the IPv6 one */
static __always_inline int bind_lo6(struct bpf_sock_addr *ctx, __u32 mark, __u8 fam)
{
	struct sockaddr_in6 sin6 = {};

	if (!unbound6(ctx))
		return 1;
	sin6.sin6_family = AF_INET6;
	if (fam == 4) {
		sin6.sin6_addr.in6_u.u6_addr32[2] = bpf_htonl(0x0000ffff);
		sin6.sin6_addr.in6_u.u6_addr32[3] = lo4_of(mark);
	} else {
		sin6.sin6_addr.in6_u.u6_addr32[0] = bpf_htonl(LO6_NET);
		sin6.sin6_addr.in6_u.u6_addr32[3] = bpf_htonl(mark & 0xffff);
	}
	if (bpf_bind(ctx, (struct sockaddr *)&sin6, sizeof(sin6))) {
		bpf_set_retval(-99 /* EADDRNOTAVAIL */);
		return 0;
	}
	return 1;
}

static __always_inline void store_lo6(struct bpf_sock_addr *ctx, __u32 mark, __u8 fam)
{
	if (fam == 4) {
		ctx->user_ip6[3] = lo4_of(mark);
	} else {
		ctx->user_ip6[0] = bpf_htonl(LO6_NET);
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(mark & 0xffff);
	}
}

/* The private loopback address shown as the loopback the application uses. */
static __always_inline void show_lo4(struct bpf_sock_addr *ctx, __u32 mark)
{
	if (ctx->user_ip4 == lo4_of(mark))
		ctx->user_ip4 = bpf_htonl(0x7f000001);
}

static __always_inline void show_lo6(struct bpf_sock_addr *ctx, __u32 mark)
{
	__u32 a[4] = {ctx->user_ip6[0], ctx->user_ip6[1], ctx->user_ip6[2], ctx->user_ip6[3]};

	if (is_private6(a, mark)) {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	} else if (is_v4mapped(a) && a[3] == lo4_of(mark)) {
		ctx->user_ip6[3] = bpf_htonl(0x7f000001);
	}
}

SEC("cgroup/connect4")
int sg_connect4(struct bpf_sock_addr *ctx)
{
	__u32 mark, j[4] = {}, port;
	struct policy *p;
	struct sockaddr_in sin = {};
	struct egress_val *e;
	__u8 proto;
	int lo;

	if (by_agent())		/* it checked this destination itself */
		return 1;
	p = grafted_policy(ctx, &mark, 0);
	if (!p)
		return unknown_container(mark, OP_CONNECT);
	proto = sock_proto(ctx);
	count(0);
	j[0] = ctx->user_ip4;
	port = ctx->user_port;
	lo = loopback_of(p, mark, 4, j, j, port);
	if (lo == LO_OWN) {
		ctx->user_ip4 = lo4_of(mark);
		return bind_lo4(ctx, mark);
	}
	e = admit(p, mark, OP_CONNECT, 4, j, port, proto);
	if (!e)
		return 0;
	if (lo == LO_KEPT)	/* (after the policy: its refusal is the one to report) */
		return refuse_kept(mark, OP_CONNECT, 4, j, port, proto);
	redirect4(ctx, proto, mark);	/* after the checks: judged on what the application asked */
	if (!unbound4(ctx))
		return 1;
	sin.sin_family = AF_INET;
	sin.sin_addr.s_addr = e->src[0];
	sin.sin_port = e->src_port;
	if (bpf_bind(ctx, (struct sockaddr *)&sin, sizeof(sin))) {
		report(EV_BIND_FAILED, mark, OP_CONNECT, e->label, 4, j, bpf_ntohs(ctx->user_port),
		       proto);
		bpf_set_retval(-99 /* EADDRNOTAVAIL: the endpoint address */);
		return 0;
	}
	return 1;
}

SEC("cgroup/connect6")
int sg_connect6(struct bpf_sock_addr *ctx)
{
	__u32 mark, a[4], j[4], port;
	struct policy *p;
	struct sockaddr_in6 sin6 = {};
	struct egress_val *e;
	__u8 proto, fam;
	int lo;

	if (by_agent())		/* it checked this destination itself */
		return 1;
	p = grafted_policy(ctx, &mark, 0);
	if (!p)
		return unknown_container(mark, OP_CONNECT);
	proto = sock_proto(ctx);
	count(0);
	fam = dest6(ctx, a, j);
	port = ctx->user_port;
	lo = loopback_of(p, mark, fam, a, j, port);
	if (lo == LO_OWN) {
		store_lo6(ctx, mark, fam);
		return bind_lo6(ctx, mark, fam);
	}
	e = admit(p, mark, OP_CONNECT, fam, j, port, proto);
	if (!e)
		return 0;
	if (lo == LO_KEPT)	/* (after the policy: its refusal is the one to report) */
		return refuse_kept(mark, OP_CONNECT, fam, j, port, proto);
	redirect6(ctx, fam, j, proto, mark);
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
		bpf_set_retval(-99 /* EADDRNOTAVAIL: the endpoint address */);
		return 0;
	}
	return 1;
}

/* A send on a connected UDP socket with an IP-level control message
 * (IP_TOS, IP_PKTINFO, IPV6_TCLASS...): the kernel runs the sendmsg hooks
 * with no address - all zero, port 0 - and then sends to the connected
 * peer, judged at connect(); an address of port 0 given by the
 * application is refused by the kernel after the hook (EINVAL). */
static __always_inline int unaddressed4(struct bpf_sock_addr *ctx)
{
	return !ctx->user_port && !ctx->user_ip4;
}

static __always_inline int unaddressed6(struct bpf_sock_addr *ctx)
{
	return !ctx->user_port && !ctx->user_ip6[0] && !ctx->user_ip6[1] && !ctx->user_ip6[2] &&
	       !ctx->user_ip6[3];
}

SEC("cgroup/sendmsg4")
int sg_sendmsg4(struct bpf_sock_addr *ctx)
{
	__u32 mark, j[4] = {ctx->user_ip4, 0, 0, 0}, port = ctx->user_port;
	struct policy *p = grafted_policy(ctx, &mark, 0);
	struct egress_val *e;
	int lo;

	if (!p || unaddressed4(ctx))
		return 1;
	lo = loopback_of(p, mark, 4, j, j, port);
	if (lo == LO_KEPT)
		return refuse_kept(mark, OP_SENDMSG, 4, j, port, IPPROTO_UDP);
	if (!(p->flags & F_SOCKET_MODE))	/* nftables judges its datagrams */
		return 1;
	if (lo == LO_OWN) {
		ctx->user_ip4 = lo4_of(mark);
		if (ctx->sk->src_ip4 == 0)
			ctx->msg_src_ip4 = lo4_of(mark);
		return 1;
	}
	e = admit(p, mark, OP_SENDMSG, 4, j, port, IPPROTO_UDP);
	if (!e)
		return 0;
	redirect4(ctx, IPPROTO_UDP, mark);
	if (ctx->sk->src_ip4 == 0)
		ctx->msg_src_ip4 = e->src[0];
	return 1;
}

SEC("cgroup/sendmsg6")
int sg_sendmsg6(struct bpf_sock_addr *ctx)
{
	__u32 mark, a[4], j[4], port;
	struct policy *p = grafted_policy(ctx, &mark, 0);
	struct egress_val *e;
	__u8 fam;
	int lo;

	if (!p || unaddressed6(ctx))
		return 1;
	fam = dest6(ctx, a, j);
	port = ctx->user_port;
	lo = loopback_of(p, mark, fam, a, j, port);
	if (lo == LO_KEPT)
		return refuse_kept(mark, OP_SENDMSG, fam, j, port, IPPROTO_UDP);
	if (!(p->flags & F_SOCKET_MODE))	/* nftables judges its datagrams */
		return 1;
	if (lo == LO_OWN) {
		store_lo6(ctx, mark, fam);
		if (no_addr6(ctx)) {
			if (fam == 4) {
				ctx->msg_src_ip6[0] = 0;
				ctx->msg_src_ip6[1] = 0;
				ctx->msg_src_ip6[2] = bpf_htonl(0x0000ffff);
				ctx->msg_src_ip6[3] = lo4_of(mark);
			} else {
				ctx->msg_src_ip6[0] = bpf_htonl(LO6_NET);
				ctx->msg_src_ip6[1] = 0;
				ctx->msg_src_ip6[2] = 0;
				ctx->msg_src_ip6[3] = bpf_htonl(mark & 0xffff);
			}
		}
		return 1;
	}
	e = admit(p, mark, OP_SENDMSG, fam, j, port, IPPROTO_UDP);
	if (!e)
		return 0;
	redirect6(ctx, fam, j, IPPROTO_UDP, mark);
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

	if (!grafted_policy(ctx, &mark, 1))
		return 1;
	if (ctx->user_ip4 == lo4_of(mark)) {
		show_lo4(ctx, mark);
		return 1;
	}
	v = lookup_svc(&sg_services_rev, 4, j, ctx->user_port, proto, 0);
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

	if (!grafted_policy(ctx, &mark, 1))
		return 1;
	fam = dest6(ctx, a, j);
	if (fam == 4 ? j[0] == lo4_of(mark) : is_private6(a, mark)) {
		show_lo6(ctx, mark);
		return 1;
	}
	v = lookup_svc(&sg_services_rev, fam, j, ctx->user_port, proto, 0);
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

SEC("cgroup/getsockname4")
int sg_getsockname4(struct bpf_sock_addr *ctx)
{
	__u32 mark;

	if (!by_agent() && grafted_policy(ctx, &mark, 1))
		show_lo4(ctx, mark);
	return 1;
}

SEC("cgroup/getsockname6")
int sg_getsockname6(struct bpf_sock_addr *ctx)
{
	__u32 mark;

	if (!by_agent() && grafted_policy(ctx, &mark, 1))
		show_lo6(ctx, mark);
	return 1;
}

/* --- guards for every tagged socket ------------------------------------------ */

/* Only the agent binds a grafted socket: it binds the endpoint address it
 * checked, on its own copy of the address. Anything else the container
 * tries (any address length, after a disconnect, racing the agent) fails. */
static __always_inline int guard_bind(struct bpf_sock_addr *ctx, __u8 fam)
{
	struct sock_tag *t = tag_of(ctx->sk);
	__u32 a[4] = {}, j[4] = {};

	if (!t || by_agent())
		return 1;
	if (fam == 4)
		j[0] = ctx->user_ip4;
	else
		fam = dest6(ctx, a, j);
	count(3);
	report(EV_DENY_BIND, t->mark, OP_BIND, 0, fam, j, bpf_ntohs(ctx->user_port),
	       sock_proto(ctx));
	bpf_set_retval(-13 /* EACCES, as the agent answers */);
	return 0;
}

SEC("cgroup/bind4")
int sg_bind4(struct bpf_sock_addr *ctx)
{
	return guard_bind(ctx, 4);
}

SEC("cgroup/bind6")
int sg_bind6(struct bpf_sock_addr *ctx)
{
	return guard_bind(ctx, 6);
}

/* Socket options that would change which addresses a grafted socket may
 * use, which packets it receives or how its packets are routed or labelled.
 * The list is documented option by option in docs/architecture.md. */
static __always_inline int option_refused(int level, int opt)
{
	switch (level) {
	case SOL_SOCKET:
		return opt == 36 /* SO_MARK */ || opt == 25 /* SO_BINDTODEVICE */ ||
		       opt == 62 /* SO_BINDTOIFINDEX */ || opt == 5 /* SO_DONTROUTE */ ||
		       opt == 73 /* SO_RESERVE_MEM */ ||
		       opt == 51 /* SO_ATTACH_REUSEPORT_CBPF */ ||
		       opt == 52 /* SO_ATTACH_REUSEPORT_EBPF */ ||
		       opt == 68 /* SO_DETACH_REUSEPORT_BPF */;
	case IPPROTO_IP:
		return opt == 4 /* IP_OPTIONS (source routing) */ ||
		       opt == 15 /* IP_FREEBIND */ || opt == 16 /* IP_IPSEC_POLICY */ ||
		       opt == 17 /* IP_XFRM_POLICY */ || opt == 19 /* IP_TRANSPARENT */ ||
		       opt == 35 /* IP_ADD_MEMBERSHIP */ ||
		       opt == 39 /* IP_ADD_SOURCE_MEMBERSHIP */ ||
		       opt == 41 /* IP_MSFILTER */ || opt == 42 /* MCAST_JOIN_GROUP */ ||
		       opt == 46 /* MCAST_JOIN_SOURCE_GROUP */ || opt == 48 /* MCAST_MSFILTER */ ||
		       opt == 50 /* IP_UNICAST_IF */ || opt == 51 /* IP_LOCAL_PORT_RANGE */;
	case SOL_IPV6:
		return opt == 1 /* IPV6_ADDRFORM */ || opt == 2 /* IPV6_2292PKTINFO */ ||
		       opt == 3 /* IPV6_2292HOPOPTS */ || opt == 4 /* IPV6_2292DSTOPTS */ ||
		       opt == 5 /* IPV6_2292RTHDR */ || opt == 6 /* IPV6_2292PKTOPTIONS */ ||
		       opt == 20 /* IPV6_ADD_MEMBERSHIP */ || opt == 34 /* IPV6_IPSEC_POLICY */ ||
		       opt == 35 /* IPV6_XFRM_POLICY */ || opt == 42 /* MCAST_JOIN_GROUP */ ||
		       opt == 46 /* MCAST_JOIN_SOURCE_GROUP */ || opt == 48 /* MCAST_MSFILTER */ ||
		       opt == 50 /* IPV6_PKTINFO (sticky source) */ ||
		       opt == 54 /* IPV6_HOPOPTS */ || opt == 55 /* IPV6_RTHDRDSTOPTS */ ||
		       opt == 57 /* IPV6_RTHDR */ || opt == 59 /* IPV6_DSTOPTS */ ||
		       opt == 75 /* IPV6_TRANSPARENT */ || opt == 76 /* IPV6_UNICAST_IF */ ||
		       opt == 78 /* IPV6_FREEBIND */;
	case SOL_TCP:
		return opt == 19 /* TCP_REPAIR */ || opt == 20 /* TCP_REPAIR_QUEUE */ ||
		       opt == 21 /* TCP_QUEUE_SEQ */ || opt == 22 /* TCP_REPAIR_OPTIONS */ ||
		       opt == 29 /* TCP_REPAIR_WINDOW */;
	case IPPROTO_UDP:
		return opt == 100 /* UDP_ENCAP */;
	}
	return 0;
}

/* TCP_ULP: kTLS ("tls") only. Another upper-layer protocol takes the
 * connection over: "smc" turns the socket into an SMC one whose connect runs
 * on a kernel socket no cgroup hook judges, "espintcp" carries IPsec. The
 * kernel reads the name as the first min(optlen, 15) bytes up to a NUL. */
static __always_inline int ulp_allowed(struct bpf_sockopt *ctx)
{
	char *name = ctx->optval;

	/* past a page the kernel reads the name from the caller's buffer again
	 * (this program sees a copy of the first page only): another thread
	 * could change it in between - and a name has at most 16 bytes */
	if (ctx->optlen > 16)
		return 0;
	if (ctx->optlen < 3 || name + 4 > (char *)ctx->optval_end)
		return ctx->optlen == 3 && name + 3 <= (char *)ctx->optval_end &&
		       name[0] == 't' && name[1] == 'l' && name[2] == 's';
	return name[0] == 't' && name[1] == 'l' && name[2] == 's' && name[3] == 0;
}

/* SO_PRIORITY: 0..6 (TC_PRIO_BESTEFFORT..TC_PRIO_INTERACTIVE) is what any
 * process may set; a higher or negative one needs CAP_NET_RAW or CAP_NET_ADMIN
 * in the socket's namespace - for a grafted socket the host's, where the root
 * of a container (Docker keeps CAP_NET_RAW; no user namespace) would pick the
 * host's egress traffic classes: a pfifo_fast band, an mqprio class, an HTB
 * or DRR class by its handle. (In its own namespace the priority stays on its
 * veth: forwarding resets it from the TOS.) The kernel reads an int from the
 * first 4 bytes. */
static __always_inline int priority_allowed(struct bpf_sockopt *ctx)
{
	int *val = ctx->optval;

	if (ctx->optlen < 4)
		return 1;	/* the kernel's EINVAL */
	/* past a page the kernel reads the caller's buffer again (see above) */
	if (ctx->optlen > 16 || (void *)(val + 1) > ctx->optval_end)
		return 0;
	return *val >= 0 && *val <= PRIO_UNPRIVILEGED;
}

/* An inet socket made in the agent's cgroup by a thread with an sg_born
 * entry: the container's mark and its tag, before anybody holds it (the
 * same as SO_MARK and the sg_sock update the agent makes otherwise). */
SEC("cgroup/sock_create")
int sg_born_sock(struct bpf_sock *ctx)
{
	__u64 id = bpf_get_current_pid_tgid();
	struct sock_tag *want = bpf_map_lookup_elem(&sg_born, &id), init;
	struct sock_tag *t;

	if (!want)
		return 1;
	init = *want;
	ctx->mark = init.mark;
	t = bpf_sk_storage_get(&sg_sock, ctx, &init, BPF_SK_STORAGE_GET_F_CREATE);
	if (!t)
		return 0;	/* never a marked socket without its tag: EPERM, the
				 * agent makes it by hand */
	*t = init;	/* (an entry could only be another's if reused) */
	return 1;
}

SEC("cgroup/setsockopt")
int sg_setsockopt(struct bpf_sockopt *ctx)
{
	struct sock_tag *t = tag_of(ctx->sk);
	__u32 none[4] = {};

	if (!t || by_agent())
		return 1;
	if (ctx->level == SOL_TCP && ctx->optname == 31 /* TCP_ULP */) {
		if (ulp_allowed(ctx))
			return 1;
	} else if (ctx->level == SOL_SOCKET && ctx->optname == 12 /* SO_PRIORITY */) {
		if (priority_allowed(ctx))
			return 1;
	} else if (!option_refused(ctx->level, ctx->optname)) {
		return 1;	/* optval untouched: the kernel uses the caller's */
	}
	count(3);
	/* label = option name, port = level (decoded by model/bpfmaps.py) */
	report(EV_DENY_SOCKOPT, t->mark, OP_SETSOCKOPT, ctx->optname, 4, none,
	       (__u16)ctx->level, 0);
	return 0;	/* EPERM */
}

/* Every packet a tagged socket sends: the mark it carries must be the tag's
 * (an SO_MARK control message would relabel it for the host's routing and
 * netfilter), its priority one any process may set (an SO_PRIORITY control
 * message asks for more per packet: see priority_allowed) and its source an
 * address one of the container's endpoints grants (IP_PKTINFO and friends
 * cannot forge it). Runs after routing and netfilter; a drop fails the send
 * with EPERM. */
SEC("cgroup_skb/egress")
int sg_egress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct sock_tag *t;
	struct src_key k = {};
	__u32 kind, uid = 0;
	__u8 hdr = 0;
	int opts;

	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;	/* request and timewait sockets: their listener's */
	t = bpf_sk_storage_get(&sg_sock, sk, 0, 0);
	if (!t)
		return 1;
	if (stale(t)) {
		count(3);
		report(EV_DENY_UNKNOWN, t->mark, OP_SEND, 0, 4, k.addr, 0, 0);
		return 0;
	}
	if (may_group(sk) && owner_changed(sk_kernel(sk), t, &uid)) {
		count(3);
		/* label = the socket's owner now */
		report(EV_DENY_OWNER, t->mark, OP_SEND, uid, 4, k.addr, 0, 0);
		return 0;
	}
	k.mark = t->mark;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		k.family = 4;
		if (bpf_skb_load_bytes(skb, 12, &k.addr[0], 4) ||
		    bpf_skb_load_bytes(skb, 0, &hdr, 1))
			return 0;
		opts = (hdr & 0x0f) != 5;
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		k.family = 6;
		if (bpf_skb_load_bytes(skb, 8, k.addr, 16) ||
		    bpf_skb_load_bytes(skb, 6, &hdr, 1))
			return 0;
		opts = hdr == 0 || hdr == 43 || hdr == 60;	/* hop-by-hop, routing, dest. */
	} else {
		return 1;
	}
	if (opts) {
		/* what the refused options would do, asked per packet by a
		 * control message (IP_RETOPTS: source routing past the address
		 * the hooks judged; IPV6_RTHDR, IPV6_HOPOPTS, IPV6_DSTOPTS) */
		kind = EV_DENY_IPOPTS;
	} else if (skb->priority > PRIO_UNPRIVILEGED) {
		count(3);
		/* the packet's source; label = the priority it asked for */
		report(EV_DENY_PRIORITY, t->mark, OP_SEND, skb->priority, k.family, k.addr, 0, 0);
		return 0;
	} else if (skb->mark != t->mark) {
		kind = EV_DENY_MARK;
	} else {
		__u32 src[4] = {k.addr[0], k.addr[1], k.addr[2], k.addr[3]};

		if (bpf_map_lookup_elem(&sg_sources, &k))
			return 1;
		k.addr[0] = k.addr[1] = k.addr[2] = k.addr[3] = 0;
		if (bpf_map_lookup_elem(&sg_sources, &k))
			return 1;	/* an endpoint on the wildcard address */
		k.addr[0] = src[0];
		k.addr[1] = src[1];
		k.addr[2] = src[2];
		k.addr[3] = src[3];
		kind = EV_DENY_SOURCE;
	}
	count(3);
	/* the offending source; label = the mark the packet carried */
	report(kind, t->mark, OP_SEND, skb->mark, k.family, k.addr, 0, 0);
	return 0;
}

/* A socket on its container's private loopback address takes packets only
 * from its own container's sockets: they carry the container's mark (the
 * egress guard makes the mark the tag's; loopback keeps it). A TCP reset
 * the kernel sends for a closed port carries no mark and is let through: a
 * refused connect fails at once, and a reset opens nothing. Host processes
 * (mark 0: an IPv6 one even picks the private address as its source) and
 * other containers get nothing else. */
static __always_inline int is_rst(struct __sk_buff *skb, __u32 l4)
{
	__u8 flags = 0;

	return !bpf_skb_load_bytes(skb, l4 + 13, &flags, 1) && (flags & 0x04);
}

static __always_inline int private_source_ok(struct __sk_buff *skb, struct bpf_sock *sk,
					     __u32 mark)
{
	__u32 lo[4] = {sk->src_ip6[0], sk->src_ip6[1], sk->src_ip6[2], sk->src_ip6[3]};
	__u8 b = 0;

	if (sk->family == AF_INET ? sk->src_ip4 != lo4_of(mark) :
	    !(is_private6(lo, mark) || (is_v4mapped(lo) && lo[3] == lo4_of(mark))))
		return 1;			/* not on the private loopback */
	if (skb->mark == mark)
		return 1;
	if (sk->protocol != IPPROTO_TCP)
		return 0;
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		if (bpf_skb_load_bytes(skb, 0, &b, 1))
			return 0;
		return is_rst(skb, (b & 0x0f) * 4);
	}
	if (bpf_skb_load_bytes(skb, 6, &b, 1) || b != IPPROTO_TCP)
		return 0;
	return is_rst(skb, 40);
}

/* A grafted socket listens only once the agent bound it through an ingress
 * rule, and the agent makes every listen() of a filtered process. A process
 * outside the filter that holds a grafted socket (passed over a unix socket)
 * could still call listen(): such a listener never receives a packet. */
SEC("cgroup_skb/ingress")
int sg_ingress(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	struct sock_tag *t;
	__u32 none[4] = {}, uid = 0;

	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	t = bpf_sk_storage_get(&sg_sock, sk, 0, 0);
	if (!t)
		return 1;
	if (stale(t)) {		/* a socket of a container that is gone gets nothing */
		count(3);
		report(EV_DENY_UNKNOWN, t->mark, OP_LISTEN, 0, 4, none, (__u16)sk->src_port,
		       sk->protocol);
		return 0;
	}
	if (!private_source_ok(skb, sk, t->mark)) {
		count(3);
		return 0;
	}
	if (may_group(sk)) {
		struct sock___sg *ks = sk_kernel(sk);

		if (owner_changed(ks, t, &uid)) {
			count(3);
			report(EV_DENY_OWNER, t->mark, OP_LISTEN, uid, 4, none,
			       (__u16)sk->src_port, sk->protocol);
			return 0;
		}
		if (foreign_group(ks, t->mark)) {
			count(3);
			report(EV_DENY_GROUP, t->mark, OP_LISTEN, 0, 4, none,
			       (__u16)sk->src_port, sk->protocol);
			return 0;
		}
	}
	if (sk->state != BPF_TCP_LISTEN || (t->flags & T_INGRESS))
		return 1;
	count(3);
	report(EV_DENY_LISTEN, t->mark, OP_LISTEN, 0, 4, none, (__u16)sk->src_port, IPPROTO_TCP);
	return 0;
}

static __always_inline struct splice_stats *splice_stats(__u32 mark)
{
	struct splice_stats zero = {}, *st = bpf_map_lookup_elem(&sg_splice_stats, &mark);

	if (st)
		return st;
	bpf_map_update_elem(&sg_splice_stats, &mark, &zero, BPF_NOEXIST);
	return bpf_map_lookup_elem(&sg_splice_stats, &mark);
}

static __always_inline int splice_on(void)
{
	__u32 k = CFG_SPLICE;
	__u64 *on = bpf_map_lookup_elem(&sg_config, &k);

	return on && *on;
}

/* v4-mapped IPv6 ends are keyed as IPv4 (a [::] server, an IPv4 client) */
static __always_inline void key_unmap(struct splice_key *k)
{
	if (k->family != AF_INET6 || !is_v4mapped(k->lip) || !is_v4mapped(k->rip))
		return;
	k->family = AF_INET;
	k->lip[0] = k->lip[3];
	k->rip[0] = k->rip[3];
	k->lip[1] = k->lip[2] = k->lip[3] = 0;
	k->rip[1] = k->rip[2] = k->rip[3] = 0;
}

/* a socket's own splice key, from a context with the bpf_sock address
 * fields (struct bpf_sock_ops, struct sk_msg_md: the same names) */
#define KEY_OF(k, c) do {						\
	(k).family = (c)->family;					\
	if ((c)->family == AF_INET) {					\
		(k).lip[0] = (c)->local_ip4;				\
		(k).rip[0] = (c)->remote_ip4;				\
	} else {							\
		(k).lip[0] = (c)->local_ip6[0];				\
		(k).lip[1] = (c)->local_ip6[1];				\
		(k).lip[2] = (c)->local_ip6[2];				\
		(k).lip[3] = (c)->local_ip6[3];				\
		(k).rip[0] = (c)->remote_ip6[0];			\
		(k).rip[1] = (c)->remote_ip6[1];			\
		(k).rip[2] = (c)->remote_ip6[2];			\
		(k).rip[3] = (c)->remote_ip6[3];			\
	}								\
	(k).lport = (c)->local_port;					\
	(k).rport = bpf_ntohl((c)->remote_port);			\
	key_unmap(&(k));						\
} while (0)

static __always_inline void key_reverse(const struct splice_key *k, struct splice_key *r)
{
	r->family = k->family;
	r->lip[0] = k->rip[0];
	r->lip[1] = k->rip[1];
	r->lip[2] = k->rip[2];
	r->lip[3] = k->rip[3];
	r->rip[0] = k->lip[0];
	r->rip[1] = k->lip[1];
	r->rip[2] = k->lip[2];
	r->rip[3] = k->lip[3];
	r->lport = k->rport;
	r->rport = k->lport;
}

/* the file of a socket (its struct sock at addr): 0 none yet (accepted,
 * not accept()ed), 1 blocking, 2 O_NONBLOCK */
static __always_inline int file_mode_at(__u64 addr)
{
	struct sock___sg *sk = (void *)addr;
	struct socket___sg *so = BPF_CORE_READ(sk, sk_socket);
	struct file___sg *f;

	if (!so)
		return 0;
	f = BPF_CORE_READ(so, file);
	if (!f)
		return 0;
	return BPF_CORE_READ(f, f_flags) & O_NONBLOCK_ ? 2 : 1;
}

/* the same for a socket the program holds (read through BTF) */
static __always_inline int nonblocking_sk(struct bpf_sock *sk)
{
	struct sock___sg *s = (void *)bpf_skc_to_tcp_sock(sk);
	struct socket___sg *so;
	struct file___sg *f;

	if (!s)
		return 0;
	so = s->sk_socket;
	if (!so)
		return 0;
	f = so->file;
	return f && (f->f_flags & O_NONBLOCK_);
}

/* bytes waiting in a socket's psock queue; -1: it has no psock */
static __always_inline __s64 psock_queued(struct sock___sg *s)
{
	/* sk_user_data carries flag bits (SK_USER_DATA_NOCOPY/BPF/PSOCK) */
	struct sk_psock___sg *psock =
		(void *)((__u64)BPF_CORE_READ(s, sk_user_data) & ~7ULL);

	return psock ? BPF_CORE_READ(psock, msg_tot_len) : -1;
}

/* Name a socket (its splice key) for the agent to take out of sg_splice
 * (a program cannot delete from a sockhash), once, counted for mark. */
static __always_inline void ask_leave(struct splice_key *k, __u32 mark)
{
	struct splice_stats *stats;
	__u32 none[4] = {};
	__u8 one = 1;

	if (bpf_map_update_elem(&sg_splice_leave, k, &one, BPF_NOEXIST))
		return;
	stats = splice_stats(mark);
	if (stats)
		stats->left++;
	report(EV_SPLICE_LEAVE, mark, OP_SEND, 0, 4, none, 0, IPPROTO_TCP);
}

static __always_inline int peer_may_be_local(struct splice_key *k)
{
	struct local_key lk = {};
	__u32 *a = k->rip;

	if (k->family == AF_INET) {
		if ((bpf_ntohl(a[0]) >> 24) == 127)
			return 1;
		lk.family = 4;
	} else {
		if (!a[0] && !a[1] && !a[2] && a[3] == bpf_htonl(1))
			return 1;	/* ::1 */
		if (bpf_ntohl(a[0]) == LO6_NET && !a[1] && !a[2])
			return 1;	/* a private loopback fd53:4c4f::HL */
		lk.family = 6;
		lk.addr[1] = a[1];
		lk.addr[2] = a[2];
		lk.addr[3] = a[3];
	}
	lk.addr[0] = a[0];
	return bpf_map_lookup_elem(&sg_local, &lk) != 0;
}

/* A grafted TCP socket enters sg_splice once established: a client
 * (ACTIVE_) when its server may be local, the accepted socket (PASSIVE_,
 * after its client's ACTIVE_) when its client entered. Only sockets of a
 * live container whose config does not say splice = false. */
static __always_inline void listen_key_of(struct bpf_sock_ops *ctx, struct listen_key *lk)
{
	lk->family = ctx->family;
	lk->port = ctx->local_port;
	if (ctx->family == AF_INET) {
		lk->addr[0] = ctx->local_ip4;
	} else {
		lk->addr[0] = ctx->local_ip6[0];
		lk->addr[1] = ctx->local_ip6[1];
		lk->addr[2] = ctx->local_ip6[2];
		lk->addr[3] = ctx->local_ip6[3];
	}
}

/* a grafted listener is recorded at listen() (and forgotten when it closes:
 * the STATE_CB it asks for) */
static __always_inline int listener_event(struct bpf_sock_ops *ctx)
{
	struct listen_key lk = {};
	struct sock_tag *t;
	__u64 me;

	if (ctx->op == BPF_SOCK_OPS_STATE_CB) {
		if (ctx->args[0] == BPF_TCP_LISTEN && ctx->args[1] == BPF_TCP_CLOSE) {
			listen_key_of(ctx, &lk);
			bpf_map_delete_elem(&sg_splice_listeners, &lk);
		}
		return 1;
	}
	if (!ctx->sk || (ctx->family != AF_INET && ctx->family != AF_INET6))
		return 1;
	t = bpf_sk_storage_get(&sg_sock, ctx->sk, 0, 0);
	if (!t)
		return 1;
	listen_key_of(ctx, &lk);
	me = (__u64)ctx->sk;
	if (!bpf_map_update_elem(&sg_splice_listeners, &lk, &me, BPF_ANY))
		bpf_sock_ops_cb_flags_set(ctx, ctx->bpf_sock_ops_cb_flags |
					  BPF_SOCK_OPS_STATE_CB_FLAG);
	return 1;
}

/* 1 when the listener an accepted socket came from is known and blocking */
static __always_inline int listener_blocking(struct bpf_sock_ops *ctx)
{
	struct listen_key lk = {};
	__u64 *l;

	listen_key_of(ctx, &lk);
	l = bpf_map_lookup_elem(&sg_splice_listeners, &lk);
	if (!l) {
		lk.addr[0] = lk.addr[1] = lk.addr[2] = lk.addr[3] = 0;   /* a wildcard bind */
		l = bpf_map_lookup_elem(&sg_splice_listeners, &lk);
	}
	return l && file_mode_at(*l) == 1;
}

SEC("sockops")
int sg_sockops(struct bpf_sock_ops *ctx)
{
	struct splice_key k = {}, r = {};
	struct splice_state *st;
	struct splice_stats *stats;
	struct sock_tag *t;
	struct policy *p;
	struct bpf_sock *sk;
	__u64 me, *client;
	int active = ctx->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;

	if (ctx->op == BPF_SOCK_OPS_TCP_LISTEN_CB || ctx->op == BPF_SOCK_OPS_STATE_CB)
		return splice_on() || ctx->op == BPF_SOCK_OPS_STATE_CB ? listener_event(ctx) : 1;
	if (!active && ctx->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	sk = ctx->sk;
	if (!sk || !splice_on())
		return 1;
	t = bpf_sk_storage_get(&sg_sock, sk, 0, 0);
	if (!t || stale(t))
		return 1;
	p = bpf_map_lookup_elem(&sg_policy, &t->mark);
	if (!p || (p->flags & F_NO_SPLICE))
		return 1;
	if (ctx->family != AF_INET && ctx->family != AF_INET6)
		return 1;
	KEY_OF(k, ctx);
	me = (__u64)sk;
	if (active) {
		if (!peer_may_be_local(&k) || !nonblocking_sk(sk))
			return 1;	/* no overhead for connections that cannot be spliced */
		client = 0;
	} else {
		key_reverse(&k, &r);
		client = bpf_map_lookup_elem(&sg_splice_clients, &r);
		if (!client)
			return 1;	/* not a grafted client of this node */
		if (listener_blocking(ctx)) {
			/* a blocking server: neither end is spliced; the agent takes
			 * the client out (nothing was spliced into it: no peer yet) */
			bpf_map_delete_elem(&sg_splice_clients, &r);
			ask_leave(&r, t->mark);
			return 1;
		}
	}
	st = bpf_sk_storage_get(&sg_splice_st, sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st || bpf_sock_hash_update(ctx, &sg_splice, &k, BPF_NOEXIST))
		return 1;
	/* a socket connected again (connect(AF_UNSPEC), then connect) keeps
	 * its storage: nothing of its last connection - its peer, its switch
	 * to the spliced path - carries over to this one */
	st->peer = 0;
	st->flags = 0;
	if (active) {
		/* an entry of an earlier connection of this 4-tuple whose client
		 * never sent (LRU keeps it): its peer is not this one's */
		bpf_map_delete_elem(&sg_splice_peer, &k);
		bpf_map_update_elem(&sg_splice_clients, &k, &me, BPF_ANY);
	} else {
		st->peer = *client;
		bpf_map_delete_elem(&sg_splice_clients, &r);
		bpf_map_update_elem(&sg_splice_peer, &r, &me, BPF_ANY);
	}
	stats = splice_stats(t->mark);
	if (stats)
		stats->sockets++;
	return 1;
}

/* May this send be handed to the peer's psock queue without reordering or
 * outgrowing the peer's buffer? (see the comment at sg_splice) The peer is
 * read with probe_read: a peer freed meanwhile reads as garbage, and then
 * the redirect finds no peer in sg_splice and the send takes TCP. */
static __always_inline int splice_ok(struct bpf_sock *sk, __u64 peer, __u32 spliced,
				     __u32 size)
{
	struct tcp_sock___sg *me = (void *)bpf_skc_to_tcp_sock(sk);
	struct tcp_sock___sg *tp = (void *)peer;
	struct sock___sg *psk = (void *)peer;
	__u32 limit, k = CFG_RMEM_MAX;
	__s64 queued;
	__u64 *rmem;

	if (!me || BPF_CORE_READ(psk, sk_rcvlowat) > 1 || file_mode_at(peer) != 2)
		return 0;
	if (!spliced) {
		__u32 rcv_nxt = BPF_CORE_READ(tp, rcv_nxt);

		if (me->write_seq != rcv_nxt || BPF_CORE_READ(tp, copied_seq) != rcv_nxt)
			return 0;	/* bytes sent by TCP not read yet: they come first */
	}
	queued = psock_queued(psk);
	if (queued < 0)
		return 0;
	limit = BPF_CORE_READ(psk, sk_rcvbuf);
	rmem = bpf_map_lookup_elem(&sg_config, &k);
	if (!(BPF_CORE_READ(psk, sk_userlocks) & 2 /* SOCK_RCVBUF_LOCK */) && rmem &&
	    *rmem > limit)
		limit = *rmem;
	return queued + size <= limit;
}

SEC("sk_msg")
int sg_msg(struct sk_msg_md *msg)
{
	struct bpf_sock *sk = msg->sk;
	struct splice_state *st;
	struct splice_stats *stats;
	struct splice_key k = {}, me = {};
	struct sock_tag *t;
	__u64 *peer;
	__u32 was, ok;

	if (!sk)
		return SK_PASS;
	t = bpf_sk_storage_get(&sg_sock, sk, 0, 0);
	st = bpf_sk_storage_get(&sg_splice_st, sk, 0, 0);
	if (!t || !st || stale(t))
		return SK_PASS;	/* TCP: the egress guard judges a stale socket's packets */
	KEY_OF(me, msg);
	if (!st->peer) {	/* a client learns its accepted peer at its first send */
		peer = bpf_map_lookup_elem(&sg_splice_peer, &me);
		if (peer) {
			st->peer = *peer;
			bpf_map_delete_elem(&sg_splice_peer, &me);
		}
	}
	if (!nonblocking_sk(sk)) {
		/* blocking now: TCP, and the agent takes it out of the map once
		 * nothing waits in its psock queue (nothing is spliced into a
		 * blocking socket; bytes spliced before it turned blocking are
		 * read first - it stays in the map until then) */
		struct sock___sg *s = (void *)bpf_skc_to_tcp_sock(sk);

		if (s && psock_queued(s) <= 0)
			ask_leave(&me, t->mark);
		return SK_PASS;
	}
	if (!st->peer)
		return SK_PASS;	/* the accepted peer is not established yet */
	key_reverse(&me, &k);
	was = st->flags & S_SPLICED;
	ok = !bpf_map_lookup_elem(&sg_splice_norx, &k) && splice_ok(sk, st->peer, was, msg->size);
	if (ok && bpf_msg_redirect_hash(msg, &sg_splice, &k, BPF_F_INGRESS) != SK_PASS)
		ok = 0;
	stats = splice_stats(t->mark);
	if (!ok) {
		st->flags &= ~S_SPLICED;
		if (stats)
			stats->fallback++;
		return SK_PASS;
	}
	st->flags |= S_SPLICED;
	if (stats) {
		stats->bytes += msg->size;
		if (!was)
			stats->streams++;
	}
	return SK_PASS;
}

/* --- packet fast path for containers' own interfaces (--fastpath) ---------
 * Two tc programs on the host side of every container's veth (tcx links,
 * pinned): sg_fast_in sees what the container sends, sg_fast_out what the
 * normal path delivers to it. They see every packet of the container,
 * grafted or not (a grafted socket's data never crosses the veth).
 *
 * Policy in the data path: a port whose container has a policy entry
 * (sg_fast_ports.mark -> sg_policy) has each flow it starts judged with the
 * first-match list the cgroup programs use (judge()); the verdict is cached
 * per flow in sg_fast_flows under the policy's generation, so a policy change
 * (a new generation) re-judges every flow at its next packet. A flow the
 * container did not start - its first packet came to the container, through
 * the fast path or the normal one - is a reply and allowed (conntrack's
 * "established"). An ICMP error passes only when it quotes a packet of such
 * a flow (conntrack's "related": related()); IPv6 neighbour discovery passes
 * when well formed (judged beyond the link), MLD to a multicast group,
 * router advertisements and redirects never (icmp_parse());
 * non-first fragments carry no ports and get their first's verdict
 * (recorded per identification; a fragment without its judged first is
 * dropped: frag_verdict()). A
 * policed container's packets must carry one of its own addresses (or a
 * link-local / unspecified one: neighbour discovery, DAD, DHCP).
 *
 * Same-host forwarding: a packet from a container's own address to the MAC
 * and IP address of another local container (sg_fast_addrs) goes straight
 * into that container's namespace with bpf_redirect_peer, skipping the
 * bridge and the second veth hop. Everything else (ARP, broadcast and
 * multicast, the gateway, other hosts, routed packets) takes the normal
 * path unchanged.
 *
 * Per packet: one hash lookup for the port, one for the destination, the
 * flow cache (LRU) only for policed containers; headers read in place. */
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define IPPROTO_ICMPV6_ 58
#define OP_PACKET 7
#define FL_OUT 1            /* flow started by the port's container: judged */
#define FL_IN 2             /* flow started by the other end: a reply */
#define FAST_SLOTS 4096

struct fast_port {
	__u32 mark;         /* the container's policy key; 0 = no policy */
	__u32 slot;         /* its counters: sg_fast_stats[slot] */
	__u32 addr4;        /* its IPv4 address (network order); 0 = none */
	__u32 addr6[4];     /* its IPv6 address; all 0 = none (more: sg_fast_addrs) */
	__u8 gw[6];         /* its bridge's MAC: what it sends routed packets to */
	__u8 mac[6];        /* its interface's MAC (all 0: unknown) */
};

struct fast_addr_key {
	__u8 family;
	__u8 pad[3];
	__u32 addr[4];
};

struct fast_addr {
	__u32 ifindex;      /* the container's host-side veth */
	__u8 mac[6];        /* its interface's MAC */
	__u8 gw[6];         /* its bridge's MAC: the source of what is routed to it */
	__u32 mark;         /* its policy key: replies it may send are recorded */
	__u16 slot;         /* its counters */
	__u16 flags;        /* FA_REDIRECTS */
};

#define FA_REDIRECTS 1      /* a grafted server of this container is redirected
			     * (nftables DNAT at the host's prerouting): packets
			     * to its address:port must meet that hook */

/* (family, protocol, port, container address) a grafted server's DNAT takes:
 * never delivered around it (model/redirect.py) */
struct redirect_key {
	__u8 family;
	__u8 proto;
	__u16 port;         /* network order */
	__u32 addr[4];
};

/* Across hosts: the overlay's routes, as the kernel's tables say (a route
 * via the VXLAN device, its neighbour and FDB entries, the underlay's
 * neighbour), written by the agent. LPM key: family byte, then the address. */
struct remote_key {
	__u32 prefixlen;    /* 32 + the route's prefix length */
	__u8 family;
	__u8 pad[3];
	__u32 addr[4];
};

struct remote {
	__u32 ifindex;      /* the underlay device */
	__u32 saddr;        /* outer source: this host's VTEP address */
	__u32 daddr;        /* outer destination: the other host's */
	__u32 vni;          /* host order */
	__u16 dport;        /* network order */
	__u8 outer_dmac[6]; /* the underlay next hop */
	__u8 outer_smac[6]; /* the underlay device's */
	__u8 inner_dmac[6]; /* the other host's VXLAN device */
	__u8 inner_smac[6]; /* ours */
	__u16 sport_min;    /* outer source ports (a flow hash picks one), host order */
	__u16 sport_max;
	__u16 mtu;          /* the VXLAN device's: larger packets take the normal path,
			     * whose routing answers them (fragmentation needed) */
};

/* What the underlay device of `ifindex` accepts for decapsulation. */
struct tunnel {
	__u32 vni;          /* host order */
	__u32 addr;         /* this host's VTEP address (outer destination) */
	__u16 dport;        /* network order */
	__u8 vtep_mac[6];   /* our VXLAN device's MAC: the inner destination */
};

struct flow_key {
	__u32 ifindex;      /* the port whose container is the local end */
	__u8 family;
	__u8 proto;
	__u16 lport;        /* network order; 0 for protocols without ports */
	__u16 rport;
	__u16 kind;         /* 0: a flow; FK_FRAGS: one datagram's fragments, whose
			     * identification lport:rport hold (frag_key) */
	__u32 raddr[4];     /* the remote end */
};
#define FK_FRAGS 1

struct flow_val {
	__u16 gen;          /* the policy generation the verdict was made under */
	__u8 verdict;
	__u8 origin;        /* FL_OUT / FL_IN */
	__u32 label;
};

struct fast_stats {
	__u64 fast_pkts;    /* redirected into a local container */
	__u64 fast_bytes;
	__u64 slow_pkts;    /* left to the normal path */
	__u64 drops;        /* denied by the policy, or spoofed (below) */
	__u64 hits;         /* verdict cache */
	__u64 misses;
	__u64 encap_pkts;   /* encapsulated here, straight to the underlay */
	__u64 encap_bytes;
	__u64 decap_pkts;   /* decapsulated at the underlay, straight into it */
	__u64 decap_bytes;
	__u64 spoofed;      /* of the drops: a forged source (IP, ARP, ND target),
			     * malformed ND, router advertisements, redirects */
	__u64 unreported;   /* policy denials without their audit line (the rate limit) */
	/* not counters: this CPU's audit window for the port */
	__u64 audit_at;     /* its start (ns) */
	__u64 audit_n;      /* policy denials reported in it */
};
#define AUDIT_PER_SEC 32    /* a port's policy denials reported a second, per CPU */

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, FAST_SLOTS);
	__type(key, __u32);
	__type(value, struct fast_port);
} sg_fast_ports SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct fast_addr_key);
	__type(value, struct fast_addr);
} sg_fast_addrs SEC(".maps");

/* The flow cache: one LRU per policed port (ifindex -> its own map, made
 * by the agent before the port's policy mark is written, of the size
 * `--flows-per-container` says), so a container that starts flows by the
 * hundred thousand evicts only its own records - never another container's
 * "established" ones. A policed port without one (its map could not be
 * made) has every packet judged and nothing remembered: fail closed. */
struct flows_map {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__uint(max_entries, 8192);	/* the template: the agent's maps differ in size */
	__uint(key_size, sizeof(struct flow_key));	/* (sizes: the types are only */
	__uint(value_size, sizeof(struct flow_val));	/* forward-declared here in BTF) */
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__uint(max_entries, FAST_SLOTS);
	__type(key, __u32);
	__array(values, struct flows_map);
} sg_fast_flows SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__uint(max_entries, 16384);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__type(key, struct remote_key);
	__type(value, struct remote);
} sg_fast_remote SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, __u32);
	__type(value, struct tunnel);
} sg_fast_tunnels SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct redirect_key);
	__type(value, __u8);
} sg_fast_redirects SEC(".maps");

/* Link-local addresses the node knows the owner of: each container's
 * EUI-64 address (from its MAC) -> its port's ifindex, each bridge's -> 0.
 * No policed container may claim one of another (ND source, NA target). */
struct ll_key {
	__u32 addr[4];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, struct ll_key);
	__type(value, __u32);
} sg_fast_ll SEC(".maps");

/* the other hosts' VTEP addresses: the only outer sources decapsulated */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 16384);
	__type(key, __u32);
	__type(value, __u8);
} sg_fast_peers SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, FAST_SLOTS);
	__type(key, __u32);
	__type(value, struct fast_stats);
} sg_fast_stats SEC(".maps");

struct pkt {
	__u8 family;
	__u8 proto;
	__u8 judged;        /* subject to the policy (not an ICMP error / ND) */
	__u8 frag;          /* a non-first fragment: no ports */
	__u8 frag1;         /* the first fragment of several: its verdict is theirs */
	__u8 fragproto;     /* what follows the IPv4 header / the fragment header: the
			     * same in every fragment (IPv6: options may come before L4) */
	__u32 fragid;       /* the fragments' identification (IPv4: 16 bits) */
	__u8 icmp_err;      /* an ICMP / ICMPv6 error: judged by the flow it is about */
	__u8 bad;           /* dropped from a policed container whatever its policy: SP_* */
	__u16 l4off;        /* offset of the L4 header from skb->data */
	__u16 sport;
	__u16 dport;
	__u32 saddr[4];
	__u32 daddr[4];
	__u8 dmac[6];
	__u8 na;            /* a neighbour advertisement or duplicate address probe
			     * (solicitation from ::): its target, below, must be the
			     * sender's own */
	__u32 target[4];
	__u8 llmac[6];      /* the link-layer address option's MAC (has_ll) */
	__u8 has_ll;
};

static __always_inline int same_mac(const __u8 *a, const __u8 *b)
{
	return *(const __u32 *)a == *(const __u32 *)b &&
	       *(const __u16 *)(a + 4) == *(const __u16 *)(b + 4);
}

static __always_inline int no_mac(const __u8 *a)
{
	return !*(const __u32 *)a && !*(const __u16 *)(a + 4);
}

/* Neighbour discovery (RFC 4861) as the link needs it and nothing more: a
 * router solicitation, neighbour solicitation or advertisement with at
 * most its one link-layer address option (what is left to carry - a target
 * and a link-layer address - goes where the policy lets it: icmp_parse). */
static __always_inline int nd_ok(const __u8 *h, const __u8 *end, __u32 len)
{
	__u32 base = h[0] == 133 ? 8 : 24;
	__u8 opt = h[0] == 136 ? 2 : 1;

	if (len == base)
		return 1;
	if (len != base + 8 || h + base + 2 > end)
		return 0;
	return h[base] == opt && h[base + 1] == 1;
}

/* ICMP: errors are judged by the flow they quote (related()); an echo
 * request and its reply carry their identifier as both ports (a flow each).
 * IPv6: MLD to a multicast group is not judged; router solicitations,
 * neighbour solicitations and advertisements must be well formed (else
 * dropped) and are judged like any ICMPv6 unless sent on the link
 * (link-local or multicast destination; a unicast probe or answer to a
 * global address passes as a reply when its peer spoke first); router advertisements and redirects are dropped (a
 * container is no router: no rogue RA); every other type is judged. len:
 * the ICMPv6 message's length (0: unknown - behind extension headers). */
static __always_inline void icmp_parse(const __u8 *h, const __u8 *end, __u32 len,
				       struct pkt *p)
{
	__u8 t = h[0];

	if (p->family == 4) {
		p->icmp_err = t == 3 || t == 11 || t == 12;
		p->judged = !p->icmp_err;
	} else {
		int mcast = (p->daddr[0] & bpf_htonl(0xff000000)) == bpf_htonl(0xff000000);
		int link = mcast || (p->daddr[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000);

		p->icmp_err = t >= 1 && t <= 4;
		p->judged = !p->icmp_err;
		if (t == 130) {
			/* a listener query: a container is no multicast router
			 * (nor its querier, elected by the lowest address) */
			p->judged = 0;
			p->bad = SP_ROUTER;
		} else if (t == 131 || t == 132 || t == 143) {
			if (mcast)
				p->judged = 0;
		} else if (t == 133 || t == 135 || t == 136) {
			/* on the link unjudged; to a global address (a probe, an
			 * answer) like any ICMPv6: its target field is 16 bytes an
			 * application chooses - no channel to where it may not go */
			p->judged = !link;
			p->bad = nd_ok(h, end, len) ? 0 : SP_ND_MALFORMED;
			if (!p->bad && len == (t == 133 ? 16u : 32u) && h + len <= end) {
				/* its one link-layer address option: whose MAC */
				__builtin_memcpy(p->llmac, h + len - 6, 6);
				p->has_ll = 1;
			}
			/* whose address it announces (an advertisement) or
			 * probes for duplicates (a solicitation from ::, which
			 * makes a tentative owner give its address up): fast_judge */
			if (!p->bad && (t == 136 || (t == 135 && !(p->saddr[0] | p->saddr[1] |
								 p->saddr[2] | p->saddr[3])))) {
				if (h + 24 <= end) {
					p->na = 1;
					__builtin_memcpy(p->target, h + 8, 16);
				} else {
					p->bad = SP_ND_MALFORMED;	/* its target unread */
				}
			}
		} else if (t == 134 || t == 137) {
			p->judged = 0;
			p->bad = SP_ROUTER;
		}
	}
	if ((p->family == 4 && (t == 8 || t == 0)) ||
	    (p->family == 6 && (t == 128 || t == 129))) {
		__builtin_memcpy(&p->sport, &h[4], 2);
		p->dport = p->sport;
	}
}

static __always_inline int l4_parse(struct pkt *p, const __u8 *l4, const __u8 *end, __u32 len)
{
	if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) {
		__builtin_memcpy(&p->sport, l4, 2);
		__builtin_memcpy(&p->dport, l4 + 2, 2);
	} else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6_) {
		icmp_parse(l4, end, len, p);
	}
	return 0;
}

/* IPv6 behind extension headers (rare): read with bpf_skb_load_bytes, so
 * that no L4 protocol hides behind them. */
static __noinline int parse_ext6(struct __sk_buff *skb, struct pkt *p, __u32 base)
{
	__u32 off = base + 40;
	__u8 l4[6] = {};

	for (int i = 0; i < 4; i++) {
		__u8 e[8];
		__u8 cur = p->proto;

		if (cur != 0 && cur != 43 && cur != 60 && cur != 44)
			break;
		if (bpf_skb_load_bytes(skb, off, e, 8))
			return -1;
		p->proto = e[0];
		if (cur == 44) {
			__builtin_memcpy(&p->fragid, e + 4, 4);
			p->fragproto = e[0];
			if (((__u16)e[2] << 8 | e[3]) & 0xfff8) {
				p->frag = 1;
				return 0;
			}
			p->frag1 = e[3] & 1;
			off += 8;
		} else {
			off += ((__u32)e[1] + 1) * 8;
		}
	}
	if (p->proto == 0 || p->proto == 43 || p->proto == 60 || p->proto == 44)
		return -1;	/* more than four: not understood */
	if (bpf_skb_load_bytes(skb, off, l4, 6) &&
	    bpf_skb_load_bytes(skb, off, l4, 4))
		return p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP ? -1 : 0;
	p->l4off = (__u16)off;
	return l4_parse(p, l4, l4 + sizeof(l4), 0);
}

/* Does the packet hold more than its linear part? */
static __always_inline int nonlinear(struct __sk_buff *skb)
{
	return skb->len > skb->data_end - skb->data;
}

/* The first `want` bytes of the packet (fewer if it is shorter) into the
 * linear part; every packet pointer is to be derived again after it. */
static __always_inline int pull_upto(struct __sk_buff *skb, __u32 want)
{
	return bpf_skb_pull_data(skb, want < skb->len ? want : skb->len) < 0;
}

/* ICMPv6 bytes read in place: a neighbour solicitation / advertisement
 * with its one link-layer address option (nd_ok, icmp_parse) */
#define ND_PULL 32

/* What the programs need of a packet whose Ethernet header (of type
 * `proto`) starts at `base`, read in place; 0 = an IP packet they
 * understand. */
static __always_inline int parse_at(struct __sk_buff *skb, struct pkt *p, const __u32 base,
				    __u16 proto)
{
	__u8 *data = (void *)(long)skb->data;
	__u8 *end = (void *)(long)skb->data_end;

	p->judged = 1;
	if (data + base + 14 + 40 + 8 > end && nonlinear(skb)) {
		/* headers not all in the linear part: pull them in */
		if (pull_upto(skb, base + 14 + 40 + 8))
			return -1;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
	}
	data += base;
	if (data + 14 > end)
		return -1;
	__builtin_memcpy(p->dmac, data, 6);
	if (proto == bpf_htons(ETH_P_IP)) {
		__u8 *ip = data + 14, *l4;
		__u32 ihl;

		if (ip + 20 > end)
			return -1;
		p->family = 4;
		p->proto = ip[9];
		__builtin_memcpy(&p->saddr[0], ip + 12, 4);
		__builtin_memcpy(&p->daddr[0], ip + 16, 4);
		p->frag = (((__u16)ip[6] << 8 | ip[7]) & 0x1fff) != 0;
		p->frag1 = !p->frag && (ip[6] & 0x20);
		p->fragid = (__u32)ip[4] << 8 | ip[5];
		p->fragproto = ip[9];
		if (p->frag)
			return 0;
		ihl = (ip[0] & 0xf) * 4;
		if (ihl < 20)
			return -1;
		l4 = ip + ihl;
		if (l4 + 8 > end && nonlinear(skb)) {
			/* options pushed the L4 header out of the linear part (a
			 * PACKET_TX_RING frame): pulled in, so that an ICMP
			 * error is not taken for a flow of its own */
			if (pull_upto(skb, base + 14 + ihl + 8))
				return -1;
			ip = (void *)(long)skb->data + base + 14;
			end = (void *)(long)skb->data_end;
			if (ip + 20 > end)
				return -1;
			l4 = ip + ihl;
		}
		p->l4off = (__u16)(base + 14 + ihl);
		if (l4 + 6 > end) {
			if (l4 + 4 > end)
				return p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP ? -1 : 0;
			if (p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP) {
				__builtin_memcpy(&p->sport, l4, 2);
				__builtin_memcpy(&p->dport, l4 + 2, 2);
			}
			return 0;
		}
		return l4_parse(p, l4, end, 0);
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		__u8 *ip = data + 14;

		if (ip + 40 > end)
			return -1;
		if (ip[6] == IPPROTO_ICMPV6_ && ip + 40 + ND_PULL > end && nonlinear(skb)) {
			/* neighbour discovery: its target and option (up to 32
			 * bytes in) are judged - a sender that leaves them out of
			 * the linear part (a PACKET_TX_RING frame) must not slip
			 * them past the checks */
			if (pull_upto(skb, base + 14 + 40 + ND_PULL))
				return -1;
			ip = (void *)(long)skb->data + base + 14;
			end = (void *)(long)skb->data_end;
			if (ip + 40 > end)
				return -1;
		}
		p->family = 6;
		p->proto = ip[6];
		__builtin_memcpy(p->saddr, ip + 8, 16);
		__builtin_memcpy(p->daddr, ip + 24, 16);
		if (p->proto == 0 || p->proto == 43 || p->proto == 60 || p->proto == 44)
			return parse_ext6(skb, p, base + 14);
		p->l4off = (__u16)(base + 14 + 40);
		if (ip + 40 + 6 > end)
			return p->proto == IPPROTO_TCP || p->proto == IPPROTO_UDP ? -1 : 0;
		return l4_parse(p, ip + 40, end, (__u32)ip[4] << 8 | ip[5]);
	}
	return -1;
}

#define parse(skb, p) parse_at(skb, p, 0, (skb)->protocol)

static __always_inline void flow_key_of(struct flow_key *k, __u32 ifindex, struct pkt *p,
					int outgoing)
{
	k->ifindex = ifindex;
	k->family = p->family;
	k->proto = p->proto;
	k->lport = outgoing ? p->sport : p->dport;
	k->rport = outgoing ? p->dport : p->sport;
	__builtin_memcpy(k->raddr, outgoing ? p->daddr : p->saddr, 16);
}

/* The flow arrives at the policed container of `ifindex`: its replies are
 * allowed (a flow it started and was allowed stays its own: judged again
 * when its policy changes; one it was denied becomes the other end's). */
static __always_inline void note_incoming(__u32 ifindex, struct pkt *p)
{
	struct flow_key k = {};
	struct flow_val v = {}, *c;
	void *flows;

	if (p->frag)
		return;
	flows = bpf_map_lookup_elem(&sg_fast_flows, &ifindex);
	if (!flows)
		return;		/* not policed (or no cache: fail closed) */
	flow_key_of(&k, ifindex, p, 0);
	c = bpf_map_lookup_elem(flows, &k);
	if (c && (c->origin == FL_IN || c->verdict == V_ALLOW))
		return;
	v.verdict = V_ALLOW;
	v.origin = FL_IN;
	bpf_map_update_elem(flows, &k, &v, BPF_ANY);
}

/* A spoofed packet of a policed container: dropped, counted, and reported
 * for the audit at the 1st, 2nd, 4th, 8th... of its interface on a CPU (a
 * flood costs the ring buffer a logarithm of itself). */
static __always_inline void spoofed(struct fast_stats *st, __u32 mark, __u32 what,
				    __u8 family, const __u32 *addr, __u8 proto)
{
	__u64 n;

	if (!st)
		return;
	st->drops++;
	n = ++st->spoofed;
	if (!(n & (n - 1)))
		report_as(0, EV_DENY_SPOOF, mark, OP_PACKET, what, family, addr, 0, proto);
}

/* A flow the policy denied: its audit line, unless the port has reported
 * AUDIT_PER_SEC denials in this second on this CPU (a container starting
 * denied flows by the thousand does not flood the ring buffer every
 * container's audit shares: the rest are counted as unreported). */
static __always_inline void deny_audit(struct fast_stats *st, __u32 mark, __u32 label,
				       struct pkt *p)
{
	if (st) {
		__u64 now = bpf_ktime_get_ns();

		if (now - st->audit_at >= 1000000000ULL) {
			st->audit_at = now;
			st->audit_n = 0;
		}
		if (st->audit_n >= AUDIT_PER_SEC) {
			st->unreported++;
			return;
		}
		st->audit_n++;
	}
	report_as(0, EV_DENY_POLICY, mark, OP_PACKET, label, p->family, p->daddr,
		  bpf_ntohs(p->dport), p->proto);
}

/* Is addr (IPv4 in addr[0], the rest 0) one of the port's own addresses? */
static __always_inline int own_addr(struct fast_port *port, __u8 family, const __u32 *addr,
				    __u32 ifindex)
{
	struct fast_addr_key k = {};
	struct fast_addr *a;

	if (family == 4) {
		if (port->addr4 && addr[0] == port->addr4)
			return 1;
	} else if ((port->addr6[0] | port->addr6[1] | port->addr6[2] | port->addr6[3]) &&
		   addr[0] == port->addr6[0] && addr[1] == port->addr6[1] &&
		   addr[2] == port->addr6[2] && addr[3] == port->addr6[3]) {
		return 1;
	}
	/* a container with more addresses than one per family */
	k.family = family;
	__builtin_memcpy(k.addr, addr, 16);
	a = bpf_map_lookup_elem(&sg_fast_addrs, &k);
	return a && a->ifindex == ifindex;
}

/* Does the packet carry the port's own source address? */
static __always_inline int own_source(struct fast_port *port, struct pkt *p, __u32 ifindex)
{
	return own_addr(port, p->family, p->saddr, ifindex);
}

static __always_inline int link_source(struct pkt *p)
{
	if (p->family == 4)
		return p->saddr[0] == 0;
	return (p->saddr[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000) ||
	       !(p->saddr[0] | p->saddr[1] | p->saddr[2] | p->saddr[3]);
}

/* An ICMP error the container of `ifindex` sends is conntrack's RELATED
 * only: it must be about a packet of a flow the container may have - the
 * offending packet quoted in it came from the error's destination to the
 * container's own source address, and its flow is in sg_fast_flows as one
 * the remote started (FL_IN) or one the container started and was allowed
 * under the current generation. Anything else (an error about nothing, a
 * quote that does not match, IPv6 extension headers or a non-first
 * fragment quoted) is V_DENY: errors are no channel around the policy. */
static __noinline int related(struct __sk_buff *skb, struct pkt *p, __u32 ifindex, __u16 gen)
{
	struct flow_key k = {};
	struct flow_val *c;
	__u8 ip[40], l4[8];
	__u32 off = (__u32)p->l4off + 8, ihl;
	void *flows = bpf_map_lookup_elem(&sg_fast_flows, &ifindex);

	if (!flows)
		return V_DENY;
	if (p->family == 4) {
		if (bpf_skb_load_bytes(skb, off, ip, 20))
			return V_DENY;
		ihl = (ip[0] & 0xf) * 4;
		if (ihl < 20 || (((__u16)ip[6] << 8 | ip[7]) & 0x1fff))
			return V_DENY;
		k.proto = ip[9];
		if (*(__u32 *)(ip + 12) != p->daddr[0] || *(__u32 *)(ip + 16) != p->saddr[0])
			return V_DENY;
		__builtin_memcpy(k.raddr, ip + 12, 4);
		off += ihl;
	} else {
		if (bpf_skb_load_bytes(skb, off, ip, 40))
			return V_DENY;
		k.proto = ip[6];
		for (int i = 0; i < 4; i++)
			if (*(__u32 *)(ip + 8 + 4 * i) != p->daddr[i] ||
			    *(__u32 *)(ip + 24 + 4 * i) != p->saddr[i])
				return V_DENY;
		__builtin_memcpy(k.raddr, ip + 8, 16);
		off += 40;
	}
	if (bpf_skb_load_bytes(skb, off, l4, 8))
		return V_DENY;
	if (k.proto == IPPROTO_TCP || k.proto == IPPROTO_UDP) {
		__builtin_memcpy(&k.rport, l4, 2);
		__builtin_memcpy(&k.lport, l4 + 2, 2);
	} else if ((k.proto == IPPROTO_ICMP && p->family == 4 && l4[0] == 8) ||
		   (k.proto == IPPROTO_ICMPV6_ && p->family == 6 && l4[0] == 128)) {
		__builtin_memcpy(&k.rport, l4 + 4, 2);	/* an echo request it got */
		k.lport = k.rport;
	} else {
		return V_DENY;
	}
	k.ifindex = ifindex;
	k.family = p->family;
	c = bpf_map_lookup_elem(flows, &k);
	if (c && (c->origin == FL_IN || (c->verdict == V_ALLOW && c->gen == gen)))
		return V_ALLOW;
	return V_DENY;
}

/* Is this link-local address known to be another interface's (a
 * neighbour's or the bridge's EUI-64 address)? */
static __always_inline int ll_of_other(const __u32 *addr, __u32 ifindex)
{
	struct ll_key k;
	__u32 *owner;

	__builtin_memcpy(k.addr, addr, 16);
	owner = bpf_map_lookup_elem(&sg_fast_ll, &k);
	return owner && *owner != ifindex;
}

/* A neighbour advertisement names one of the container's own addresses
 * (ND's forged-source rule: no neighbour told that another's address is at
 * this MAC), and so does a duplicate address probe (a solicitation from ::
 * for another's tentative address makes the owner give it up, RFC 4862
 * 5.4.3); a link-local target passes unless it is known to be another's
 * (sg_fast_ll: a neighbour's or the gateway's EUI-64 address). */
static __noinline int own_target(struct fast_port *port, struct pkt *p, __u32 ifindex)
{
	if ((p->target[0] & bpf_htonl(0xffc00000)) == bpf_htonl(0xfe800000))
		return !ll_of_other(p->target, ifindex);
	return own_addr(port, 6, p->target, ifindex);
}

/* The verdict on a packet that is not a non-first fragment: an ICMP error
 * by what it quotes, a flow by the cache or the policy's list. */
static __always_inline int judge_first(struct __sk_buff *skb, struct pkt *p,
				       struct policy *pol, __u32 mark, struct fast_stats *st,
				       void *flows)
{
	struct flow_key k = {};
	struct flow_val v = {}, *c = 0;
	__u32 label = 0;

	if (p->icmp_err) {
		v.verdict = related(skb, p, skb->ifindex, pol->gen);
		if (v.verdict != V_ALLOW && st)
			st->drops++;
		return v.verdict;
	}
	if (!p->judged)
		return V_ALLOW;
	flow_key_of(&k, skb->ifindex, p, 1);
	if (flows)
		c = bpf_map_lookup_elem(flows, &k);
	if (c && (c->origin == FL_IN || c->gen == pol->gen)) {
		if (st) {
			st->hits++;
			if (c->verdict != V_ALLOW)
				st->drops++;
		}
		return c->verdict;
	}
	if (st)
		st->misses++;
	v.verdict = judge(pol, p->family, p->daddr, bpf_ntohs(p->dport), p->proto, &label, 1);
	v.gen = pol->gen;
	v.origin = FL_OUT;
	v.label = label;
	if (flows)
		bpf_map_update_elem(flows, &k, &v, BPF_ANY);
	if (v.verdict != V_ALLOW) {
		if (st)
			st->drops++;
		/* once per flow and policy generation: the audit line */
		deny_audit(st, mark, label, p);
	}
	return v.verdict;
}

/* The fragments of one datagram the container sends: keyed in the flow
 * cache by its identification, destination and the header after the IP /
 * fragment header (reassembly keys IPv4 by source, destination, protocol and
 * identification, IPv6 by source, destination and identification; the
 * source is the container's own, checked before). */
static __always_inline void frag_key(struct flow_key *k, __u32 ifindex, struct pkt *p)
{
	k->ifindex = ifindex;
	k->family = p->family;
	k->proto = p->fragproto;
	k->kind = FK_FRAGS;
	k->lport = (__u16)(p->fragid >> 16);
	k->rport = (__u16)p->fragid;
	__builtin_memcpy(k->raddr, p->daddr, 16);
}

/* A non-first fragment carries no ports: it gets its first fragment's
 * verdict, recorded under the same policy generation; without one (sent
 * alone, before its first, its first too long ago or under another policy)
 * it is dropped - no payload reaches an address the policy denies, not
 * even a receiver that reads packets before reassembly. */
static __always_inline int frag_verdict(struct pkt *p, __u32 ifindex, __u32 mark, __u16 gen,
					struct fast_stats *st, void *flows)
{
	struct flow_key k = {};
	struct flow_val *c = 0;

	frag_key(&k, ifindex, p);
	if (flows)
		c = bpf_map_lookup_elem(flows, &k);
	if (c && c->gen == gen) {
		if (c->verdict != V_ALLOW && st)
			st->drops++;
		return c->verdict;
	}
	spoofed(st, mark, SP_FRAGMENT, p->family, p->daddr, p->proto);
	return V_DENY;
}

/* The policy's (pol: the port's sg_policy entry) verdict on a packet the
 * container of `port` sends. */
static __always_inline int fast_judge(struct __sk_buff *skb, struct fast_port *port,
				      struct policy *pol, struct pkt *p, struct fast_stats *st,
				      int own)
{
	struct flow_key k = {};
	struct flow_val v = {};
	__u32 mark = port->mark, ifindex = skb->ifindex;
	void *flows;
	int verdict;
	/* no policy evaded with a forged source address (nor a neighbour's or
	 * the gateway's link-local one claimed) */
	if (!own && (!link_source(p) ||
		     (p->family == 6 && ll_of_other(p->saddr, skb->ifindex)))) {
		spoofed(st, mark, SP_SOURCE, p->family, p->saddr, p->proto);
		return V_DENY;
	}
	if (p->bad) {
		spoofed(st, mark, p->bad, p->family, p->daddr, p->proto);
		return V_DENY;
	}
	if (p->na && !own_target(port, p, skb->ifindex)) {
		spoofed(st, mark, SP_ND_TARGET, p->family, p->target, p->proto);
		return V_DENY;
	}
	if (p->has_ll && !no_mac(port->mac) && !same_mac(p->llmac, port->mac)) {
		/* "my address is at a neighbour's MAC": its neighbours would send
		 * what is the container's to the neighbour */
		spoofed(st, mark, SP_MAC, p->family, p->saddr, p->proto);
		return V_DENY;
	}
	flows = bpf_map_lookup_elem(&sg_fast_flows, &ifindex);
	if (p->frag)
		return frag_verdict(p, ifindex, mark, pol->gen, st, flows);
	verdict = judge_first(skb, p, pol, mark, st, flows);
	if (p->frag1 && flows) {
		frag_key(&k, ifindex, p);
		v.verdict = verdict;
		v.gen = pol->gen;
		v.origin = FL_OUT;	/* forgotten with the verdicts at a generation wrap */
		bpf_map_update_elem(flows, &k, &v, BPF_ANY);
	}
	return verdict;
}

/* Would the host's DNAT of a grafted server take this packet? */
static __always_inline int redirected(struct fast_addr *dst, struct pkt *p)
{
	struct redirect_key k = {};

	if (!(dst->flags & FA_REDIRECTS) || p->frag)
		return 0;
	k.family = p->family;
	k.proto = p->proto;
	k.port = p->dport;
	__builtin_memcpy(k.addr, p->daddr, 16);
	return bpf_map_lookup_elem(&sg_fast_redirects, &k) != 0;
}

/* The frame's Ethernet source is the port's interface's MAC (or the MAC is
 * not known): a policed container cannot make the bridge learn a
 * neighbour's MAC on its port (and take the neighbour's traffic). */
static __always_inline int own_mac(struct __sk_buff *skb, struct fast_port *port)
{
	__u8 *data = (void *)(long)skb->data;
	__u8 *end = (void *)(long)skb->data_end;

	if (no_mac(port->mac))
		return 1;
	if (data + 12 > end)
		return 0;
	return same_mac(data + 6, port->mac);
}


#define ADJ_DECAP_L3_IPV4 (1ULL << 7)      /* BPF_F_ADJ_ROOM_DECAP_L3_IPV4 (6.3) */
#define ADJ_DECAP_L3_IPV6 (1ULL << 8)
#define VXLAN_ROOM 50       /* outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14 */
#define VXLAN_HDRS 64       /* outer Ethernet + VXLAN_ROOM */

struct vxlan_hdrs {
	__u8 eth_dst[6];
	__u8 eth_src[6];
	__u16 eth_proto;
	__u8 ver_ihl;
	__u8 tos;
	__u16 tot_len;
	__u16 id;
	__u16 frag_off;
	__u8 ttl;
	__u8 protocol;
	__u16 check;
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u16 ulen;
	__u16 ucheck;
	__u32 vx_flags;
	__u32 vx_vni;
	__u8 in_dst[6];
	__u8 in_src[6];
	__u16 in_proto;
} __attribute__((packed));

static __always_inline __u16 ip_csum(const void *ip)
{
	const __u16 *w = ip;
	__u32 sum = 0;

#pragma clang loop unroll(full)
	for (int i = 0; i < 10; i++)
		sum += w[i];
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return ~sum;
}

/* One hop of routing, as the kernel's forwarding would do it: the TTL
 * (hop limit) of the IP header at `off` goes down by one. Returns -1 when
 * it may not (<= 1: the normal path answers with time exceeded). */
static __always_inline int hop(struct __sk_buff *skb, __u32 off, __u8 family)
{
	__u8 *data = (void *)(long)skb->data;
	__u8 *end = (void *)(long)skb->data_end;

	if (data + off + 40 > end && (family == 6 || data + off + 20 > end))
		return -1;
	if (family == 4) {
		__u16 old = *(__u16 *)(data + off + 8);	/* ttl, protocol */
		__u16 new;

		if (data[off + 8] <= 1)
			return -1;
		data[off + 8]--;
		new = *(__u16 *)(data + off + 8);
		return bpf_l3_csum_replace(skb, off + 10, old, new, 2) ? -1 : 0;
	}
	if (data[off + 7] <= 1)
		return -1;
	data[off + 7]--;
	return 0;
}

/* Check-only twin of hop(): may the packet be routed once more? */
static __always_inline int may_hop(struct __sk_buff *skb, __u32 off, __u8 family)
{
	__u8 *data = (void *)(long)skb->data;
	__u8 *end = (void *)(long)skb->data_end;

	if (family == 4)
		return data + off + 20 <= end && data[off + 8] > 1;
	return data + off + 40 <= end && data[off + 7] > 1;
}

/* Would the packet (each segment of a GSO packet) exceed the overlay's MTU? */
static __always_inline int too_big(struct __sk_buff *skb, struct pkt *p, __u32 mtu)
{
	__u32 iphl = 40, seg;
	__u8 b;

	if (!skb->gso_size)
		return skb->len - 14 > mtu;
	if (p->family == 4) {
		if (bpf_skb_load_bytes(skb, 14, &b, 1))
			return 1;
		iphl = (b & 0xf) * 4;
	}
	seg = iphl + skb->gso_size;
	if (p->proto == IPPROTO_TCP) {
		if (bpf_skb_load_bytes(skb, 14 + iphl + 12, &b, 1))
			return 1;
		seg += (b >> 4) * 4;
	} else if (p->proto == IPPROTO_UDP) {
		seg += 8;
	}
	return seg > mtu;
}

/* A packet routed to another host's container: encapsulated as the VXLAN
 * device would (its VNI, port, MACs; outer UDP checksum 0, allowed for
 * IPv4), inner TTL down by one, sent out of the underlay device. Returns
 * -1 to leave it to the normal path (no route, TTL, MAC not the bridge's). */
static __always_inline int encap(struct __sk_buff *skb, struct fast_port *port, struct pkt *p,
				 struct fast_stats *st)
{
	struct remote_key rk = {};
	struct remote *r;
	struct vxlan_hdrs h = {};
	__u32 len = skb->len, hash, span;
	__u64 flags = BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 | BPF_F_ADJ_ROOM_ENCAP_L4_UDP |
		      BPF_F_ADJ_ROOM_ENCAP_L2_ETH | BPF_F_ADJ_ROOM_ENCAP_L2(14);

	if (!same_mac(p->dmac, port->gw))
		return -1;
	rk.prefixlen = 32 + (p->family == 4 ? 32 : 128);
	rk.family = p->family;
	__builtin_memcpy(rk.addr, p->daddr, 16);
	r = bpf_map_lookup_elem(&sg_fast_remote, &rk);
	if (!r || !may_hop(skb, 14, p->family) || too_big(skb, p, r->mtu))
		return -1;
	__builtin_memcpy(h.eth_dst, r->outer_dmac, 6);
	__builtin_memcpy(h.eth_src, r->outer_smac, 6);
	h.eth_proto = bpf_htons(ETH_P_IP);
	h.ver_ihl = 0x45;
	h.tot_len = bpf_htons(len + VXLAN_ROOM - 14);	/* outer IP .. inner end */
	h.ttl = 64;
	h.protocol = IPPROTO_UDP;
	h.saddr = r->saddr;
	h.daddr = r->daddr;
	h.check = ip_csum(&h.ver_ihl);
	hash = bpf_get_hash_recalc(skb);
	span = r->sport_max > r->sport_min ? r->sport_max - r->sport_min + 1 : 1;
	h.sport = bpf_htons(r->sport_min + hash % span);
	h.dport = r->dport;
	h.ulen = bpf_htons(len + VXLAN_ROOM - 14 - 20);
	h.vx_flags = bpf_htonl(0x08000000);
	h.vx_vni = bpf_htonl(r->vni << 8);
	__builtin_memcpy(h.in_dst, r->inner_dmac, 6);
	__builtin_memcpy(h.in_src, r->inner_smac, 6);
	h.in_proto = p->family == 4 ? bpf_htons(ETH_P_IP) : bpf_htons(ETH_P_IPV6);
	if (bpf_skb_adjust_room(skb, VXLAN_ROOM, BPF_ADJ_ROOM_MAC, flags))
		return -1;
	if (bpf_skb_store_bytes(skb, 0, &h, sizeof(h), 0) || hop(skb, VXLAN_HDRS, p->family))
		return TC_ACT_SHOT;	/* half-built: cannot go back */
	if (st) {
		st->encap_pkts++;
		st->encap_bytes += len;
	}
	return bpf_redirect(r->ifindex, 0);
}

/* At an underlay device: a VXLAN packet from a known host, for a container
 * of this one, is decapsulated and handed straight into the container (as
 * the VXLAN device, routing and the bridge would deliver it: TTL down by
 * one, the bridge's MAC as its source). Everything else: the normal path. */
SEC("tc")
int sg_fast_decap(struct __sk_buff *skb)
{
	__u32 ifindex = skb->ifindex;
	struct tunnel *t = bpf_map_lookup_elem(&sg_fast_tunnels, &ifindex);
	struct fast_addr_key dk = {};
	struct fast_addr *dst;
	struct fast_stats *st;
	struct pkt p = {};
	__u8 *data, *end;
	__u16 in_proto;
	__u32 vni, saddr, len, slot;
	__u8 eth[14];

	if (!t || skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_OK;
	data = (void *)(long)skb->data;
	end = (void *)(long)skb->data_end;
	if (data + VXLAN_HDRS > end) {
		if (skb->len < VXLAN_HDRS + 20 || bpf_skb_pull_data(skb, VXLAN_HDRS + 40) < 0)
			return TC_ACT_OK;
		data = (void *)(long)skb->data;
		end = (void *)(long)skb->data_end;
		if (data + VXLAN_HDRS > end)
			return TC_ACT_OK;
	}
	/* outer IPv4 without options or fragments, UDP to our VXLAN port */
	if (data[14] != 0x45 || data[23] != IPPROTO_UDP ||
	    (((__u16)data[20] << 8 | data[21]) & 0x3fff))
		return TC_ACT_OK;
	if (*(__u32 *)(data + 30) != t->addr || *(__u16 *)(data + 36) != t->dport)
		return TC_ACT_OK;
	saddr = *(__u32 *)(data + 26);
	if (!bpf_map_lookup_elem(&sg_fast_peers, &saddr))
		return TC_ACT_OK;
	vni = bpf_ntohl(*(__u32 *)(data + 46)) >> 8;
	if (!(data[42] & 0x08) || vni != t->vni || !same_mac(data + 50, t->vtep_mac))
		return TC_ACT_OK;
	in_proto = *(__u16 *)(data + 62);
	if (parse_at(skb, &p, 50, in_proto))
		return TC_ACT_OK;
	dk.family = p.family;
	__builtin_memcpy(dk.addr, p.daddr, 16);
	dst = bpf_map_lookup_elem(&sg_fast_addrs, &dk);
	if (!dst || !may_hop(skb, VXLAN_HDRS, p.family) || redirected(dst, &p))
		return TC_ACT_OK;
	slot = dst->slot;		/* the key is a u32: not the u16 in place */
	st = bpf_map_lookup_elem(&sg_fast_stats, &slot);
	if (dst->mark)
		note_incoming(dst->ifindex, &p);
	len = skb->len;
	if (bpf_skb_adjust_room(skb, -VXLAN_ROOM, BPF_ADJ_ROOM_MAC,
				p.family == 4 ? ADJ_DECAP_L3_IPV4 : ADJ_DECAP_L3_IPV6))
		return TC_ACT_OK;
	__builtin_memcpy(eth, dst->mac, 6);
	__builtin_memcpy(eth + 6, dst->gw, 6);
	__builtin_memcpy(eth + 12, &in_proto, 2);
	if (bpf_skb_store_bytes(skb, 0, eth, 14, 0) || hop(skb, 14, p.family))
		return TC_ACT_SHOT;	/* half-undone: cannot go back */
	if (st) {
		st->decap_pkts++;
		st->decap_bytes += len - VXLAN_HDRS;
	}
	return bpf_redirect_peer(dst->ifindex, 0);
}

#define ETH_P_ARP_ 0x0806

/* An ARP packet of the port's container names one of its own addresses as
 * the sender (or 0.0.0.0 and its own as the target: a probe) - the forged-source rule for ARP: a
 * policed container cannot tell its neighbours (other containers, the
 * gateway) that another's address is at its MAC. Anything but Ethernet/IPv4
 * ARP is refused as well. */
static __noinline int arp_own(struct __sk_buff *skb, struct fast_port *port, __u32 ifindex,
			       __u32 *spa)
{
	__u32 w[4] = {}, addr[4] = {};
	__u8 *a = (__u8 *)w;	/* (u32-aligned: the sender's MAC at a + 8 compared in place) */

	if (bpf_skb_load_bytes(skb, 14, a, 14))
		return 0;
	/* htype 1, ptype IPv4, hlen 6, plen 4; the sender hardware address
	 * (its own), then the sender's address */
	if (a[0] != 0 || a[1] != 1 || a[2] != 0x08 || a[3] != 0 || a[4] != 6 || a[5] != 4 ||
	    (!no_mac(port->mac) && !same_mac(a + 8, port->mac)))
		return 0;
	if (bpf_skb_load_bytes(skb, 14 + 14, addr, 4))
		return 0;
	if (!addr[0]) {
		/* a probe (RFC 5227): whoever holds or is trying the target
		 * address takes it as a conflict and gives it up - only for
		 * one of its own */
		if (bpf_skb_load_bytes(skb, 14 + 24, addr, 4))
			return 0;
	}
	*spa = addr[0];
	return own_addr(port, 4, addr, ifindex);
}

SEC("tc")
int sg_fast_in(struct __sk_buff *skb)
{
	struct fast_port *port;
	struct fast_stats *st;
	struct fast_addr_key dk = {};
	struct fast_addr *dst;
	struct policy *pol = 0;
	struct pkt p = {};
	__u32 ifindex = skb->ifindex, k = CFG_FAST;
	__u64 *on;
	int own;

	port = bpf_map_lookup_elem(&sg_fast_ports, &ifindex);
	if (!port)
		return TC_ACT_OK;
	st = bpf_map_lookup_elem(&sg_fast_stats, &port->slot);
	/* policed: its container has a policy entry (a mark configured
	 * without one, yet, is forwarded unjudged) */
	if (port->mark)
		pol = bpf_map_lookup_elem(&sg_policy, &port->mark);
	if (pol && !own_mac(skb, port)) {
		__u32 none[4] = {};

		spoofed(st, port->mark, SP_MAC, 0, none, 0);
		return TC_ACT_SHOT;
	}
	if (skb->protocol == bpf_htons(ETH_P_ARP_)) {
		__u32 spa[4] = {};

		if (pol && !arp_own(skb, port, ifindex, spa)) {
			spoofed(st, port->mark, SP_ARP, 4, spa, 0);
			return TC_ACT_SHOT;	/* no neighbour poisoned with another's address */
		}
		if (st)
			st->slow_pkts++;
		return TC_ACT_OK;
	}
	if (parse(skb, &p)) {
		/* not IP, or IP the programs do not understand: a policed
		 * container's is dropped (nothing unjudged gets out - not a
		 * frame of another type either: behind a second VLAN tag, the
		 * kernel took the first away, an IP packet would pass unread) */
		if (pol) {
			if (st)
				st->drops++;
			return TC_ACT_SHOT;
		}
		if (st)
			st->slow_pkts++;
		return TC_ACT_OK;
	}
	own = own_source(port, &p, ifindex);
	if (pol && fast_judge(skb, port, pol, &p, st, own) != V_ALLOW)
		return TC_ACT_SHOT;
	on = bpf_map_lookup_elem(&sg_config, &k);
	if (!own || !on || !*on)
		goto slow;	/* a forged source takes the normal path, as without us */
	dk.family = p.family;
	__builtin_memcpy(dk.addr, p.daddr, 16);
	dst = bpf_map_lookup_elem(&sg_fast_addrs, &dk);
	if (!dst) {
		int ret = encap(skb, port, &p, st);	/* another host's container? */

		if (ret >= 0)
			return ret;
		goto slow;
	}
	if (dst->ifindex == ifindex || !same_mac(dst->mac, p.dmac) || redirected(dst, &p) ||
	    !same_mac(dst->gw, port->gw))
		goto slow;	/* (another bridge's: the bridges and the firewall decide) */
	/* the destination's replies are allowed: told at every packet (the
	 * record may have left the destination's cache - evicted by flows
	 * others start to it, or the cache replaced - while the sender's own
	 * record of the flow stays: its replies would be judged as flows it
	 * starts); note_incoming looks before it writes */
	if (dst->mark)
		note_incoming(dst->ifindex, &p);
	if (st) {
		st->fast_pkts++;
		st->fast_bytes += skb->len;
	}
	return bpf_redirect_peer(dst->ifindex, 0);
slow:
	if (st)
		st->slow_pkts++;
	return TC_ACT_OK;
}

SEC("tc")
int sg_fast_out(struct __sk_buff *skb)
{
	struct pkt p = {};
	__u32 ifindex = skb->ifindex;
	struct fast_port *port = bpf_map_lookup_elem(&sg_fast_ports, &ifindex);

	/* a flow addressed to the container (a broadcast, a multicast or a
	 * frame flooded to every port makes no reply allowed) */
	if (port && port->mark && !parse(skb, &p) &&
	    (no_mac(port->mac) || same_mac(p.dmac, port->mac)) &&
	    own_addr(port, p.family, p.daddr, ifindex))
		note_incoming(ifindex, &p);
	return TC_ACT_OK;
}

char LICENSE[] SEC("license") = "GPL";
