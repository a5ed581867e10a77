/* attack: what an attacker inside a grafted container does with its sockets.
 *
 * A static binary (it runs in the busybox rootfs of the runc tests as well
 * as under `sockgraft run`) that interprets a script of socket steps on one
 * "current" socket and prints one JSON line per step:
 *     {"op": "bind", "arg": "127.0.0.1:7100", "ret": -1, "errno": "EACCES"}
 *
 *   attack [--caps docker|none|keep] STEP...
 *
 * Steps (ADDR:PORT is a.b.c.d:p or [v6]:p; LEN overrides the address length):
 *   sock tcp4|tcp6|udp4|udp6      a new current socket
 *   sockhi FAMILY                 socket(FAMILY | 1 << 32, SOCK_STREAM, 0), raw syscall
 *   connect ADDR:PORT [LEN]       connect (LEN: the address length passed)
 *   disconnect                    connect(AF_UNSPEC): drops the peer (and a TCP port)
 *   bind ADDR:PORT [LEN]          bind
 *   bindhi ADDR:PORT              bind with address length 16|28 + (1 << 32)
 *   listen                        listen(fd, 16)
 *   acceptwait SECONDS            poll the listener for a connection
 *   setopt LEVEL OPT VALUE        setsockopt(int)
 *   getopt LEVEL OPT              getsockopt(int): "value"
 *   chown UID|mark                fchown() the current socket (CAP_CHOWN): its owner,
 *                                 sk_uid; "mark": the uid equal to its SO_MARK
 *   setulp NAME [LEN]             setsockopt(TCP_ULP, NAME) (LEN bytes: strlen(NAME); the
 *                                 name in a zeroed 8 KiB buffer)
 *   setopt32 LEVEL OPT VALUE      the same through the i386 ABI (int 0x80, setsockopt
 *                                 366) in a child; "signal" when the filter killed it
 *   send ADDR:PORT                sendto("x")
 *   sendc                         send("x") on a connected socket
 *   sendpktinfo SRC ADDR:PORT     sendmsg with IP_PKTINFO / IPV6_PKTINFO source SRC
 *   sendmark MARK ADDR:PORT       sendmsg with an SO_MARK control message
 *   sendprio PRIO ADDR:PORT       sendmsg with an SO_PRIORITY control message
 *   sendopts ADDR:PORT            sendmsg with IPv4 options (IP_RETOPTS) / an IPv6
 *                                 destination options header (IPV6_DSTOPTS)
 *   tfo ADDR:PORT                 sendto(MSG_FASTOPEN) on a TCP socket
 *   recvwait SECONDS              a datagram (or stream data) within SECONDS
 *   name                          getsockname
 *   ifconf                        SIOCGIFCONF on the current socket: "ifaces": "name=addr,..."
 *                                 and "need": the length a NULL buffer is told
 *   ifreq CMD NAME [INT]          ioctl(CMD with 0xdead in the high word, raw syscall) with an
 *                                 ifreq naming NAME (INT: ifr_ifindex / ifr_mtu): the
 *                                 answer's "int", "addr", "mac", "name"
 *   arp ADDR DEV                  SIOCGARP for ADDR on DEV: "mac" and "flags"
 *   userns                        unshare(CLONE_NEWUSER): every capability - in a user
 *                                 namespace of its own, which owns none of its other
 *                                 namespaces
 *   spoofto SRC:PORT              from the container's own network stack (a raw
 *                                 IPPROTO_RAW socket, CAP_NET_RAW), one UDP datagram
 *                                 forged from SRC:PORT to the current socket's own
 *                                 (host) address and port: a "request" whose reply the
 *                                 host's conntrack would then take as established
 *   loop N ADDR:PORT              N connects of fresh TCP sockets (a flood of denials)
 *   nbconnect ADDR:PORT           a fresh non-blocking TCP socket connect()ed, polled
 *                                 for writable (2 s); kept open
 *   epconnect ADDR:PORT           a new epoll instance, then a fresh non-blocking TCP
 *                                 socket registered with it (EPOLLOUT) before connect()
 *                                 (nginx's order); reports the events of a 2 s
 *                                 epoll_wait and the socket's SO_MARK; both kept open
 *   race tcp|udp|mptcp|udplite N A:P B:P
 *                                 N fresh sockets, each connect()ed (tcp, mptcp) or sent
 *                                 one datagram (udp, udplite) through one sockaddr buffer that a
 *                                 second thread keeps switching between A and B (the
 *                                 agent reads one, the kernel may read the other)
 *   hog SECONDS [N]               N threads per CPU (pinned to it; 1) spinning for SECONDS
 *   idle                          this thread SCHED_IDLE, pinned to CPU 0: slow to run
 *   bindfor SECONDS ADDR:PORT     fresh TCP sockets bound to ADDR:PORT (each closed) for
 *                                 SECONDS: how many, and the slowest bind in ms
 *   lingerfill ADDR:PORT          the current TCP socket connected to a listener of
 *                                 our own at ADDR:PORT that never accepts, its send
 *                                 buffer filled, SO_LINGER on for an hour, O_ASYNC
 *                                 (a close of its last reference waits for the hour)
 *   sleep SECONDS
 *
 * It never exits early: every step runs and reports, so a test sees the
 * whole attack, not just the first refusal. Each line carries "ms", the
 * step's duration (a dropped first SYN shows as a connect of ~1000 ms).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/capability.h>
#include <net/if.h>
#include <net/if_arp.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <time.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef MSG_FASTOPEN
#define MSG_FASTOPEN 0x20000000
#endif

static int cur = -1;
static int cur_family = AF_INET;

static const char *ename(int e)
{
	switch (e) {
	case 0: return "0";
	case EPERM: return "EPERM";
	case EACCES: return "EACCES";
	case EINVAL: return "EINVAL";
	case EADDRINUSE: return "EADDRINUSE";
	case EADDRNOTAVAIL: return "EADDRNOTAVAIL";
	case ECONNREFUSED: return "ECONNREFUSED";
	case EAFNOSUPPORT: return "EAFNOSUPPORT";
	case EISCONN: return "EISCONN";
	case ENOTCONN: return "ENOTCONN";
	case EINPROGRESS: return "EINPROGRESS";
	case ETIMEDOUT: return "ETIMEDOUT";
	case EAGAIN: return "EAGAIN";
	case EBADF: return "EBADF";
	case ENOTSOCK: return "ENOTSOCK";
	case EOPNOTSUPP: return "EOPNOTSUPP";
	case ENOPROTOOPT: return "ENOPROTOOPT";
	case EHOSTUNREACH: return "EHOSTUNREACH";
	case ENETUNREACH: return "ENETUNREACH";
	case EDESTADDRREQ: return "EDESTADDRREQ";
	case ENOSYS: return "ENOSYS";
	case ENODEV: return "ENODEV";
	case ENXIO: return "ENXIO";
	case ENOTTY: return "ENOTTY";
	case EFAULT: return "EFAULT";
	default: {
		static char buf[16];
		snprintf(buf, sizeof(buf), "%d", e);
		return buf;
	}
	}
}

static struct timespec step_start;

/* the race step's shared sockaddr and its flipper thread */
static struct sockaddr_storage race_buf, race_a, race_b;
static atomic_int race_stop;

static void *race_flip(void *unused)
{
	(void)unused;
	while (!atomic_load_explicit(&race_stop, memory_order_relaxed)) {
		memcpy(&race_buf, &race_a, sizeof(race_a));
		__asm__ volatile("" ::: "memory");	/* both stores happen */
		memcpy(&race_buf, &race_b, sizeof(race_b));
		__asm__ volatile("" ::: "memory");
	}
	return 0;
}

static double hog_until;

static double now_s(void)
{
	struct timespec t;

	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec + t.tv_nsec / 1e9;
}

static void *hog(void *cpu)
{
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET((int)(long)cpu, &set);
	pthread_setaffinity_np(pthread_self(), sizeof(set), &set);
	while (now_s() < hog_until)
		;
	return NULL;
}

static void report(const char *op, const char *arg, long ret, int err, const char *extra)
{
	struct timespec now;
	long ms;

	clock_gettime(CLOCK_MONOTONIC, &now);
	ms = (now.tv_sec - step_start.tv_sec) * 1000 + (now.tv_nsec - step_start.tv_nsec) / 1000000;
	printf("{\"op\": \"%s\", \"arg\": \"%s\", \"ret\": %ld, \"errno\": \"%s\", \"ms\": %ld%s%s}\n",
	       op, arg ? arg : "", ret, ret < 0 ? ename(err) : "0", ms, extra ? ", " : "",
	       extra ? extra : "");
	fflush(stdout);
}

/* "a.b.c.d:p" or "[v6]:p" into a zeroed 128-byte buffer; returns the natural length */
static socklen_t parse(const char *text, struct sockaddr_storage *ss)
{
	char host[128];
	const char *colon = strrchr(text, ':');
	int port;

	memset(ss, 0, sizeof(*ss));
	if (!colon)
		return 0;
	port = atoi(colon + 1);
	if (text[0] == '[') {
		struct sockaddr_in6 *s6 = (struct sockaddr_in6 *)ss;
		size_t n = (size_t)(colon - text) - 2;

		memcpy(host, text + 1, n);
		host[n] = 0;
		s6->sin6_family = AF_INET6;
		s6->sin6_port = htons(port);
		inet_pton(AF_INET6, host, &s6->sin6_addr);
		return sizeof(*s6);
	} else {
		struct sockaddr_in *s4 = (struct sockaddr_in *)ss;
		size_t n = (size_t)(colon - text);

		memcpy(host, text, n);
		host[n] = 0;
		s4->sin_family = AF_INET;
		s4->sin_port = htons(port);
		inet_pton(AF_INET, host, &s4->sin_addr);
		return sizeof(*s4);
	}
}

static void drop_caps(const char *which)
{
	/* Docker's default capability set */
	static const int docker[] = {0, 1, 3, 4, 5, 6, 7, 8, 10, 13, 18, 27, 29, 31};
	struct __user_cap_header_struct h = {_LINUX_CAPABILITY_VERSION_3, 0};
	struct __user_cap_data_struct d[2] = {};
	int keep_docker = !strcmp(which, "docker");

	if (!strcmp(which, "keep"))
		return;
	if (keep_docker)
		for (size_t i = 0; i < sizeof(docker) / sizeof(docker[0]); i++) {
			d[docker[i] / 32].effective |= 1u << (docker[i] % 32);
			d[docker[i] / 32].permitted |= 1u << (docker[i] % 32);
		}
	for (int c = 0; c <= 63; c++) {
		int keep = 0;

		for (size_t i = 0; keep_docker && i < sizeof(docker) / sizeof(docker[0]); i++)
			keep |= docker[i] == c;
		if (!keep)
			prctl(PR_CAPBSET_DROP, c, 0, 0, 0);
	}
	if (syscall(SYS_capset, &h, d)) {
		perror("capset");
		exit(3);
	}
}

static void new_socket(const char *kind)
{
	int fam = strchr(kind, '6') ? AF_INET6 : AF_INET;
	int type = !strncmp(kind, "udp", 3) ? SOCK_DGRAM : SOCK_STREAM;

	if (cur >= 0)
		close(cur);
	cur = socket(fam, type, 0);
	cur_family = fam;
	report("sock", kind, cur, errno, NULL);
}

static void do_sendmsg_cmsg(const char *op, const char *arg, const char *dest, int level,
			    int type, const void *data, size_t len)
{
	struct sockaddr_storage ss;
	socklen_t alen = parse(dest, &ss);
	char cbuf[CMSG_SPACE(64)] = {0};
	char payload = 'x';
	struct iovec iov = {&payload, 1};
	struct msghdr m = {0};
	struct cmsghdr *c;
	long r;

	m.msg_name = &ss;
	m.msg_namelen = alen;
	m.msg_iov = &iov;
	m.msg_iovlen = 1;
	m.msg_control = cbuf;
	m.msg_controllen = CMSG_SPACE(len);
	c = CMSG_FIRSTHDR(&m);
	c->cmsg_level = level;
	c->cmsg_type = type;
	c->cmsg_len = CMSG_LEN(len);
	memcpy(CMSG_DATA(c), data, len);
	r = sendmsg(cur, &m, 0);
	report(op, arg, r, errno, NULL);
}

int main(int argc, char **argv)
{
	int i = 1;

	setvbuf(stdout, NULL, _IOLBF, 0);
	if (i + 1 < argc && !strcmp(argv[i], "--caps")) {
		drop_caps(argv[i + 1]);
		i += 2;
	}
	while (i < argc) {
		const char *op = argv[i++];
		struct sockaddr_storage ss;
		socklen_t alen;
		long r;

		clock_gettime(CLOCK_MONOTONIC, &step_start);
		if (!strcmp(op, "sock")) {
			new_socket(argv[i++]);
		} else if (!strcmp(op, "sockhi")) {
			long fam = atol(argv[i++]);

			if (cur >= 0)
				close(cur);
			cur = syscall(SYS_socket, fam | (1L << 32), (long)SOCK_STREAM, 0L);
			cur_family = (int)fam;
			report(op, argv[i - 1], cur, errno, NULL);
		} else if (!strcmp(op, "connect") || !strcmp(op, "bind")) {
			const char *arg = argv[i++];

			alen = parse(arg, &ss);
			if (i < argc && argv[i][0] >= '0' && argv[i][0] <= '9')
				alen = (socklen_t)atoi(argv[i++]);
			r = !strcmp(op, "bind") ? bind(cur, (struct sockaddr *)&ss, alen)
						: connect(cur, (struct sockaddr *)&ss, alen);
			report(op, arg, r, errno, NULL);
		} else if (!strcmp(op, "bindhi")) {
			const char *arg = argv[i++];

			alen = parse(arg, &ss);
			r = syscall(SYS_bind, (long)cur, &ss, (long)alen | (1L << 32));
			report(op, arg, r, errno, NULL);
		} else if (!strcmp(op, "disconnect")) {
			struct sockaddr sa = {.sa_family = AF_UNSPEC};

			r = connect(cur, &sa, sizeof(sa));
			report(op, "", r, errno, NULL);
		} else if (!strcmp(op, "listen")) {
			r = listen(cur, 16);
			report(op, "", r, errno, NULL);
		} else if (!strcmp(op, "acceptwait")) {
			struct pollfd p = {cur, POLLIN, 0};
			int ms = atoi(argv[i++]) * 1000;
			int got = poll(&p, 1, ms);

			report(op, "", got > 0 ? 0 : -1, got == 0 ? ETIMEDOUT : errno,
			       got > 0 ? "\"accepted\": true" : "\"accepted\": false");
		} else if (!strcmp(op, "setopt")) {
			int level = atoi(argv[i]), opt = atoi(argv[i + 1]), val = atoi(argv[i + 2]);
			char arg[64];

			snprintf(arg, sizeof(arg), "%d/%d=%d", level, opt, val);
			i += 3;
			r = setsockopt(cur, level, opt, &val, sizeof(val));
			report(op, arg, r, errno, NULL);
		} else if (!strcmp(op, "getopt")) {
			int level = atoi(argv[i]), opt = atoi(argv[i + 1]), val = -1;
			socklen_t len = sizeof(val);
			char arg[64], extra[48];

			snprintf(arg, sizeof(arg), "%d/%d", level, opt);
			i += 2;
			r = getsockopt(cur, level, opt, &val, &len);
			snprintf(extra, sizeof(extra), "\"value\": %d", val);
			report(op, arg, r, errno, extra);
		} else if (!strcmp(op, "chown")) {
			const char *who = argv[i++];
			unsigned int uid = 0;
			socklen_t len = sizeof(uid);

			if (!strcmp(who, "mark"))
				getsockopt(cur, SOL_SOCKET, SO_MARK, &uid, &len);
			else
				uid = (unsigned int)strtoul(who, NULL, 0);
			r = fchown(cur, uid, (gid_t)-1);
			report(op, who, r, errno, NULL);
		} else if (!strcmp(op, "setulp")) {
			static char ulp[8192];
			const char *name = argv[i++];
			size_t len = strlen(name);

			if (i < argc && argv[i][0] >= '0' && argv[i][0] <= '9')
				len = (size_t)atol(argv[i++]);
			memset(ulp, 0, sizeof(ulp));
			memcpy(ulp, name, strlen(name) < sizeof(ulp) ? strlen(name) : sizeof(ulp) - 1);
			r = setsockopt(cur, IPPROTO_TCP, 31 /* TCP_ULP */, ulp,
				       len < sizeof(ulp) ? len : sizeof(ulp));
			report(op, name, r, errno, NULL);
		} else if (!strcmp(op, "setopt32")) {
			int level = atoi(argv[i]), opt = atoi(argv[i + 1]), val = atoi(argv[i + 2]);
			char arg[64], extra[32];
			int st = 0;
			pid_t pid;

			snprintf(arg, sizeof(arg), "%d/%d=%d", level, opt, val);
			i += 3;
			pid = fork();
			if (pid == 0) {
				/* compat calls take 32-bit pointers: a buffer below 4 GiB */
				int *buf = mmap(NULL, 4096, PROT_READ | PROT_WRITE,
						MAP_PRIVATE | MAP_ANONYMOUS | MAP_32BIT, -1, 0);
				long ret;

				if (buf == MAP_FAILED)
					_exit(255);
				*buf = val;
				__asm__ volatile("int $0x80"
						 : "=a"(ret)
						 : "a"(366L), "b"((long)cur), "c"((long)level),
						   "d"((long)opt), "S"((long)buf), "D"(4L)
						 : "memory", "r8", "r9", "r10", "r11");
				_exit(ret == 0 ? 0 : ret < 0 && ret > -250 ? (int)-ret : 254);
			}
			waitpid(pid, &st, 0);
			if (WIFSIGNALED(st)) {
				snprintf(extra, sizeof(extra), "\"signal\": %d", WTERMSIG(st));
				report(op, arg, -1, 0, extra);
			} else {
				r = WEXITSTATUS(st);
				report(op, arg, r ? -1 : 0, r, NULL);
			}
		} else if (!strcmp(op, "send") || !strcmp(op, "tfo")) {
			const char *arg = argv[i++];

			alen = parse(arg, &ss);
			r = sendto(cur, "x", 1, !strcmp(op, "tfo") ? MSG_FASTOPEN : 0,
				   (struct sockaddr *)&ss, alen);
			report(op, arg, r, errno, NULL);
		} else if (!strcmp(op, "sendc")) {
			r = send(cur, "x", 1, 0);
			report(op, "", r, errno, NULL);
		} else if (!strcmp(op, "sendpktinfo")) {
			const char *src = argv[i++], *dest = argv[i++];

			if (cur_family == AF_INET6) {
				struct in6_pktinfo pi = {0};

				inet_pton(AF_INET6, src, &pi.ipi6_addr);
				do_sendmsg_cmsg(op, src, dest, IPPROTO_IPV6, IPV6_PKTINFO, &pi,
						sizeof(pi));
			} else {
				struct in_pktinfo pi = {0};

				inet_pton(AF_INET, src, &pi.ipi_spec_dst);
				do_sendmsg_cmsg(op, src, dest, IPPROTO_IP, IP_PKTINFO, &pi, sizeof(pi));
			}
		} else if (!strcmp(op, "sendopts")) {
			/* per-packet IP options: IPv4 IP_RETOPTS (three no-ops and
			 * an end: a harmless 4-byte option), IPv6 a destination
			 * options header of padding (IPV6_DSTOPTS, CAP_NET_RAW) */
			if (cur_family == AF_INET6) {
				unsigned char d[8] = {0, 0, 1, 4, 0, 0, 0, 0};

				do_sendmsg_cmsg(op, argv[i], argv[i], IPPROTO_IPV6, IPV6_DSTOPTS, d,
						sizeof(d));
			} else {
				unsigned char o[4] = {1, 1, 1, 0};

				do_sendmsg_cmsg(op, argv[i], argv[i], IPPROTO_IP, IP_RETOPTS, o,
						sizeof(o));
			}
			i++;
		} else if (!strcmp(op, "sendmark")) {
			unsigned int mark = (unsigned int)strtoul(argv[i++], NULL, 0);

			do_sendmsg_cmsg(op, argv[i], argv[i], SOL_SOCKET, SO_MARK, &mark, sizeof(mark));
			i++;
		} else if (!strcmp(op, "sendprio")) {
			int prio = atoi(argv[i++]);

			do_sendmsg_cmsg(op, argv[i], argv[i], SOL_SOCKET, SO_PRIORITY, &prio,
					sizeof(prio));
			i++;
		} else if (!strcmp(op, "recvwait")) {
			struct pollfd p = {cur, POLLIN, 0};
			char buf[256];
			int got = poll(&p, 1, atoi(argv[i++]) * 1000);

			r = got > 0 ? recv(cur, buf, sizeof(buf), MSG_DONTWAIT) : -1;
			report(op, "", r, got == 0 ? ETIMEDOUT : errno, NULL);
		} else if (!strcmp(op, "name")) {
			char host[64] = "", extra[128];
			int port = 0;

			alen = sizeof(ss);
			r = getsockname(cur, (struct sockaddr *)&ss, &alen);
			if (ss.ss_family == AF_INET6) {
				inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&ss)->sin6_addr, host,
					  sizeof(host));
				port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
			} else {
				inet_ntop(AF_INET, &((struct sockaddr_in *)&ss)->sin_addr, host,
					  sizeof(host));
				port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
			}
			snprintf(extra, sizeof(extra), "\"local\": [\"%s\", %d]", host, port);
			report(op, "", r, errno, extra);
		} else if (!strcmp(op, "spoofto")) {
			const char *arg = argv[i++];
			struct sockaddr_storage me, from;
			socklen_t ml = sizeof(me);
			unsigned char pkt[64] = {0};
			int raw, n;

			parse(arg, &from);
			r = getsockname(cur, (struct sockaddr *)&me, &ml);
			if (!r && me.ss_family == AF_INET) {
				struct sockaddr_in *a = (struct sockaddr_in *)&me,
						   *f = (struct sockaddr_in *)&from;
				unsigned sum = 0;

				pkt[0] = 0x45; pkt[8] = 64; pkt[9] = IPPROTO_UDP;
				pkt[3] = 20 + 8 + 4;
				memcpy(pkt + 12, &f->sin_addr, 4);
				memcpy(pkt + 16, &a->sin_addr, 4);
				for (n = 0; n < 20; n += 2)
					sum += (pkt[n] << 8) | pkt[n + 1];
				sum = (sum & 0xffff) + (sum >> 16);
				sum = ~((sum & 0xffff) + (sum >> 16)) & 0xffff;
				pkt[10] = sum >> 8; pkt[11] = sum & 0xff;
				memcpy(pkt + 20, &f->sin_port, 2);
				memcpy(pkt + 22, &a->sin_port, 2);
				pkt[25] = 8 + 4;	/* UDP checksum 0: none (IPv4) */
				memcpy(pkt + 28, "ping", 4);
				raw = socket(AF_INET, SOCK_RAW, IPPROTO_RAW);
				r = raw < 0 ? -1 : (int)sendto(raw, pkt, 32, 0, (struct sockaddr *)a,
							      sizeof(*a));
			} else if (!r) {
				/* IPv6: a raw UDP socket bound to the forged source (IPV6_FREEBIND: not ours) */
				struct sockaddr_in6 *a = (struct sockaddr_in6 *)&me,
						    *f = (struct sockaddr_in6 *)&from, src = *f;
				int one = 1;

				raw = socket(AF_INET6, SOCK_RAW, IPPROTO_UDP);
				src.sin6_port = 0;
				if (raw >= 0)
					setsockopt(raw, SOL_IPV6, 47 /* IPV6_FREEBIND */, &one, sizeof(one));
				n = 6;		/* the kernel computes the UDP checksum (mandatory in IPv6) */
				if (raw >= 0)
					setsockopt(raw, SOL_IPV6, IPV6_CHECKSUM, &n, sizeof(n));
				memcpy(pkt, &f->sin6_port, 2);
				memcpy(pkt + 2, &a->sin6_port, 2);
				pkt[5] = 8 + 4;
				memcpy(pkt + 8, "ping", 4);
				r = raw < 0 || bind(raw, (struct sockaddr *)&src, sizeof(src)) ? -1 :
				    (int)sendto(raw, pkt, 12, 0, (struct sockaddr *)a, sizeof(*a));
			}
			report(op, arg, r < 0 ? -1 : 0, errno, NULL);
		} else if (!strcmp(op, "hog")) {
			long cpus = sysconf(_SC_NPROCESSORS_ONLN);
			pthread_t t;

			long per = 1;

			hog_until = now_s() + atof(argv[i++]);
			if (i < argc && argv[i][0] >= '0' && argv[i][0] <= '9')
				per = atol(argv[i++]);
			r = 0;
			for (long k = 0; k < cpus * per && !r; k++)
				r = pthread_create(&t, NULL, hog, (void *)(k % cpus));
			report(op, argv[i - 1], r ? -1 : 0, r, NULL);
		} else if (!strcmp(op, "idle")) {
			struct sched_param sp = {0};
			cpu_set_t set;

			CPU_ZERO(&set);
			CPU_SET(0, &set);
			r = sched_setaffinity(0, sizeof(set), &set) ||
			    sched_setscheduler(0, SCHED_IDLE, &sp);
			report(op, "", r ? -1 : 0, errno, NULL);
		} else if (!strcmp(op, "bindfor")) {
			double until = now_s() + atof(argv[i++]), worst = 0;
			const char *arg = argv[i++];
			int n = 0, fails = 0;
			char extra[96];

			alen = parse(arg, &ss);
			while (now_s() < until) {
				int s = socket(ss.ss_family, SOCK_STREAM, 0);
				double t0 = now_s();

				if (bind(s, (struct sockaddr *)&ss, alen))
					fails++;
				if (now_s() - t0 > worst)
					worst = now_s() - t0;
				close(s);
				n++;
			}
			snprintf(extra, sizeof(extra), "\"binds\": %d, \"failed\": %d, \"worst_ms\": %.1f",
				 n, fails, worst * 1000);
			report(op, arg, 0, 0, extra);
		} else if (!strcmp(op, "lingerfill")) {
			const char *arg = argv[i++];
			struct linger lg = {1, 3600};
			static char buf[65536];
			long total = 0, k;
			char extra[64];
			int l, one = 1, fl;

			alen = parse(arg, &ss);
			l = socket(ss.ss_family, SOCK_STREAM, 0);	/* kept open: never accepts */
			setsockopt(l, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
			r = bind(l, (struct sockaddr *)&ss, alen) || listen(l, 1) ||
			    connect(cur, (struct sockaddr *)&ss, alen);
			if (!r) {
				fl = fcntl(cur, F_GETFL);
				fcntl(cur, F_SETFL, fl | O_NONBLOCK);
				while ((k = send(cur, buf, sizeof(buf), 0)) > 0)
					total += k;
				fcntl(cur, F_SETFL, (fl & ~O_NONBLOCK) | O_ASYNC);
				r = setsockopt(cur, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
			}
			snprintf(extra, sizeof(extra), "\"queued\": %ld", total);
			report(op, arg, r ? -1 : 0, errno, extra);
		} else if (!strcmp(op, "loop")) {
			int n = atoi(argv[i++]), fails = 0;
			const char *arg = argv[i++];
			char extra[64];

			alen = parse(arg, &ss);
			for (int k = 0; k < n; k++) {
				int s = socket(ss.ss_family, SOCK_STREAM, 0);

				if (connect(s, (struct sockaddr *)&ss, alen))
					fails++;
				close(s);
			}
			snprintf(extra, sizeof(extra), "\"failed\": %d", fails);
			report(op, arg, 0, 0, extra);
		} else if (!strcmp(op, "race")) {
			const char *kind = argv[i++];
			int udp = !strcmp(kind, "udp") || !strcmp(kind, "udplite");
			int proto = !strcmp(kind, "mptcp") ? 262 : !strcmp(kind, "udplite") ? 136 : 0;
			int n = atoi(argv[i++]), ok = 0, fails = 0;
			const char *a = argv[i++], *b = argv[i++];
			int by_errno[160] = {0};
			socklen_t alen_b;
			pthread_t flipper;
			char extra[512];
			size_t used;

			alen = parse(a, &race_a);
			alen_b = parse(b, &race_b);
			if (alen_b > alen)
				alen = alen_b;
			memcpy(&race_buf, &race_a, sizeof(race_a));
			atomic_store(&race_stop, 0);
			pthread_create(&flipper, 0, race_flip, 0);
			for (int k = 0; k < n; k++) {
				int s = socket(race_a.ss_family, udp ? SOCK_DGRAM : SOCK_STREAM, proto);
				long rr = udp ? sendto(s, "x", 1, 0, (struct sockaddr *)&race_buf, alen)
					      : connect(s, (struct sockaddr *)&race_buf, alen);

				if (rr < 0) {
					fails++;
					by_errno[errno < 160 ? errno : 0]++;
				} else {
					ok++;
				}
				close(s);
			}
			atomic_store(&race_stop, 1);
			pthread_join(flipper, 0);
			used = (size_t)snprintf(extra, sizeof(extra), "\"ok\": %d, \"failed\": %d, "
						"\"errnos\": {", ok, fails);
			for (int e = 0, first = 1; e < 160 && used < sizeof(extra) - 40; e++) {
				if (!by_errno[e])
					continue;
				used += (size_t)snprintf(extra + used, sizeof(extra) - used,
							 "%s\"%s\": %d", first ? "" : ", ",
							 ename(e), by_errno[e]);
				first = 0;
			}
			snprintf(extra + used, sizeof(extra) - used, "}");
			report(op, a, 0, 0, extra);
		} else if (!strcmp(op, "nbconnect") || !strcmp(op, "epconnect")) {
			const char *arg = argv[i++];
			int ep = -1, s, mark = 0, soerr = 0;
			struct epoll_event ev = {.events = EPOLLOUT}, got = {0};
			struct pollfd pf;
			socklen_t ml = sizeof(mark), el = sizeof(soerr);
			char extra[128];

			alen = parse(arg, &ss);
			if (!strcmp(op, "epconnect"))
				ep = epoll_create1(EPOLL_CLOEXEC);
			s = socket(ss.ss_family, SOCK_STREAM | SOCK_NONBLOCK, 0);
			if (ep >= 0)
				epoll_ctl(ep, EPOLL_CTL_ADD, s, &ev);
			r = connect(s, (struct sockaddr *)&ss, alen);
			if (ep >= 0) {
				if (epoll_wait(ep, &got, 1, 2000) != 1)
					got.events = 0;
			} else {
				pf.fd = s;
				pf.events = POLLOUT;
				pf.revents = 0;
				poll(&pf, 1, 2000);
				got.events = (uint32_t)pf.revents;
			}
			getsockopt(s, SOL_SOCKET, SO_MARK, &mark, &ml);
			getsockopt(s, SOL_SOCKET, SO_ERROR, &soerr, &el);
			snprintf(extra, sizeof(extra), "\"events\": %u, \"mark\": %d, \"so_error\": %d",
				 got.events, mark, soerr);
			report(op, arg, r, r ? errno : 0, extra);
		} else if (!strcmp(op, "ifconf")) {
			struct ifreq rq[64];
			struct ifconf ic = {.ifc_len = sizeof(rq), .ifc_req = rq}, q = {0};
			char extra[4096], ab[INET_ADDRSTRLEN];
			int r0 = ioctl(cur, SIOCGIFCONF, &q), e;
			size_t o;

			r = ioctl(cur, SIOCGIFCONF, &ic);
			e = errno;
			o = (size_t)snprintf(extra, sizeof(extra), "\"need\": %d, \"ifaces\": \"",
					     r0 ? -1 : q.ifc_len);
			for (size_t k = 0; r == 0 && k < ic.ifc_len / sizeof(struct ifreq); k++) {
				struct sockaddr_in *sin = (struct sockaddr_in *)&rq[k].ifr_addr;

				inet_ntop(AF_INET, &sin->sin_addr, ab, sizeof(ab));
				o += (size_t)snprintf(extra + o, sizeof(extra) - o, "%s%.16s=%s",
						      k ? "," : "", rq[k].ifr_name, ab);
			}
			snprintf(extra + o, sizeof(extra) - o, "\"");
			report(op, "", r, e, extra);
		} else if (!strcmp(op, "ifreq")) {
			unsigned long cmd = strtoul(argv[i], NULL, 0);
			const char *name = argv[i + 1];
			struct ifreq q;
			char extra[256], ab[INET6_ADDRSTRLEN] = "", arg[64];
			unsigned char *m = (unsigned char *)q.ifr_hwaddr.sa_data;
			struct sockaddr_in *sin = (struct sockaddr_in *)&q.ifr_addr;

			i += 2;
			memset(&q, 0, sizeof(q));
			strncpy(q.ifr_name, name, IFNAMSIZ - 1);
			if (i < argc && argv[i][0] >= '0' && argv[i][0] <= '9')
				q.ifr_ifindex = atoi(argv[i++]);
			snprintf(arg, sizeof(arg), "%#lx %s", cmd, name);
			r = syscall(SYS_ioctl, (long)cur, (long)(cmd | 0xdeadUL << 32), &q);
			if (sin->sin_family == AF_INET)
				inet_ntop(AF_INET, &sin->sin_addr, ab, sizeof(ab));
			snprintf(extra, sizeof(extra),
				 "\"int\": %d, \"addr\": \"%s\", \"name\": \"%.16s\", "
				 "\"mac\": \"%02x:%02x:%02x:%02x:%02x:%02x\"",
				 q.ifr_ifindex, ab, q.ifr_name, m[0], m[1], m[2], m[3], m[4], m[5]);
			report(op, arg, r, errno, extra);
		} else if (!strcmp(op, "userns")) {
			r = unshare(CLONE_NEWUSER);
			report(op, "", r, errno, NULL);
		} else if (!strcmp(op, "arp")) {
			struct arpreq a;
			struct sockaddr_in *sin = (struct sockaddr_in *)&a.arp_pa;
			unsigned char *m = (unsigned char *)a.arp_ha.sa_data;
			char extra[128];

			memset(&a, 0, sizeof(a));
			sin->sin_family = AF_INET;
			inet_pton(AF_INET, argv[i], &sin->sin_addr);
			strncpy(a.arp_dev, argv[i + 1], sizeof(a.arp_dev) - 1);
			i += 2;
			r = ioctl(cur, SIOCGARP, &a);
			snprintf(extra, sizeof(extra),
				 "\"flags\": %d, \"mac\": \"%02x:%02x:%02x:%02x:%02x:%02x\"",
				 a.arp_flags, m[0], m[1], m[2], m[3], m[4], m[5]);
			report(op, argv[i - 2], r, errno, extra);
		} else if (!strcmp(op, "sleep")) {
			usleep((useconds_t)(atof(argv[i++]) * 1e6));
		} else {
			fprintf(stderr, "attack: unknown step %s\n", op);
			return 2;
		}
	}
	printf("{\"done\": true}\n");
	return 0;
}
