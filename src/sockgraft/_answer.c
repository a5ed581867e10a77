/* sockgraft._answer: the socket-mode answer loop in native code (issue 15).
 *
 * A notifier thread calls Worker.serve(), which releases the GIL and loops:
 *   NOTIF_RECV -> is it socket() of a kind the session's Table grafts?
 *     yes: take the spare host socket of that kind (or make one: fsuid the
 *          container's socket uid - kept until root's is needed again -,
 *          socket(), born marked and tagged by sg_born_sock - its mark read
 *          back -, else SO_MARK and the sg_sock tag
 *          through bpf(BPF_MAP_UPDATE_ELEM)) -> NOTIF_ADDFD with FLAG_SEND
 *          (installed and returned in one step) -> refill the spare
 *     an inet socket() of a kind nobody grafts: NOTIF_SEND with FLAG_CONTINUE
 *   or connect() of a syscall-mode container (Table connect on): answer_connect
 *     below - the common case grafted here, everything else to Python
 *     anything else: return its fields to Python (the agent's loop decides)
 * without taking the GIL and without a Python object per socket: the Table
 * counts. It holds no policy: Python writes the few numbers it needs (mark,
 * uid, tag map fd and generation, which kinds, on/off) with configure(),
 * under a sequence lock, and the loop reads a consistent copy per call.
 *
 * Containment: this code only ever acts on the listener it was given, with
 * the fds it made; a fault in it takes down the agent process, whose
 * containers keep their listeners in holder processes (OCI) or their
 * launcher and are served again by the restarted agent (calls trapped
 * meanwhile wait in the kernel; a call the dead agent had received but not
 * answered is not handed out again - the kernel hands a notification out
 * once - and waits until its thread gets a signal). No call here blocks
 * except NOTIF_RECV and NOTIF_ADDFD (which waits for the target to take
 * the fd).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/bpf.h>
#include <linux/kcmp.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_ADDFD_FLAG_SEND
#define SECCOMP_ADDFD_FLAG_SEND (1UL << 1)
#endif
#ifndef SO_MARK
#define SO_MARK 36
#endif
#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef SYS_pidfd_open
#define SYS_pidfd_open 434
#endif
#ifndef SYS_pidfd_getfd
#define SYS_pidfd_getfd 438
#endif

/* TC_PRIO_INTERACTIVE: the highest SO_PRIORITY a process may set without
 * CAP_NET_RAW / CAP_NET_ADMIN (kernel/sockets.py PRIO_UNPRIVILEGED) */
#define PRIO_UNPRIVILEGED 6

#define TYPE_MASK 0xF
#define TYPE_FLAGS (SOCK_NONBLOCK | SOCK_CLOEXEC)

/* kinds bitmask: bit (family == AF_INET6) * 2 + (type == SOCK_DGRAM) */
static int kind_bit(int family, int base)
{
	return 1 << ((family == AF_INET6) * 2 + (base == SOCK_DGRAM));
}

struct config {
	uint32_t mark;
	int64_t uid;		/* -1: do not switch (not root) */
	int tag_fd;		/* sg_sock map, -1: no kernel guards */
	uint32_t tag_flags;
	uint32_t gen;
	uint32_t kinds;
	int enabled;
	/* syscall mode: connect() grafted here (answer_connect) */
	int connect;
	int eg4_fd, eg6_fd;	/* sg_egress4/6: the container's egress rules */
	int svc_fd;		/* sg_services: directory redirects (Python follows them) */
	uint32_t egress_gen;	/* their generation (the policy's) */
	int sndbuf, rcvbuf;	/* the container's default buffer sizes (getsockopt), 0: unknown */
	int splice_fd;		/* sg_splice when the session traps splice(), else -1 */
	int born_fd;		/* sg_born: host sockets marked and tagged at birth, -1: not */
};

enum { C_TCP, C_UDP, C_CONTINUED, C_REFUSED, C_GONE, C_HANDED, C_NS, C_CONNECTS, C_CONNECT_NS,
       C_BORN, C_N };

typedef struct {
	PyObject_HEAD
	atomic_uint seq;	/* odd while configure() writes */
	struct config cfg;
	atomic_ullong count[C_N];
	atomic_ullong epoll_made;	/* CLOCK_MONOTONIC ns of the session's last
					 * epoll_create(1) (its filter traps them) */
} Table;

static void table_read(Table *t, struct config *out)
{
	unsigned s1, s2;

	do {
		s1 = atomic_load_explicit(&t->seq, memory_order_acquire);
		atomic_thread_fence(memory_order_acquire);
		memcpy(out, &t->cfg, sizeof(*out));
		atomic_thread_fence(memory_order_acquire);
		s2 = atomic_load_explicit(&t->seq, memory_order_acquire);
	} while ((s1 & 1) || s1 != s2);
}

static PyObject *Table_configure(Table *self, PyObject *args, PyObject *kw)
{
	static char *names[] = {"enabled", "mark", "uid", "tag_fd", "gen", "kinds",
				"tag_flags", "connect", "eg4_fd", "eg6_fd", "egress_gen",
				"sndbuf", "rcvbuf", "svc_fd", "splice_fd", "born_fd", NULL};
	struct config c = {0};
	long long uid = -1;
	unsigned int mark = 0, gen = 0, kinds = 0xF, tag_flags = 0, egress_gen = 0;
	int enabled = 0, tag_fd = -1, connect = 0, eg4_fd = -1, eg6_fd = -1, sndbuf = 0,
	    rcvbuf = 0, svc_fd = -1, splice_fd = -1, born_fd = -1;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "pIL|iIIIpiiIiiiii", names, &enabled, &mark,
					 &uid, &tag_fd, &gen, &kinds, &tag_flags, &connect,
					 &eg4_fd, &eg6_fd, &egress_gen, &sndbuf, &rcvbuf, &svc_fd,
					 &splice_fd, &born_fd))
		return NULL;
	c.born_fd = tag_fd >= 0 ? born_fd : -1;	/* (it tags: only with the guards) */
	c.splice_fd = splice_fd;
	/* connect() is grafted here only with the guards: the kernel judges the
	 * connect it continues (sg_connect4/6) */
	c.connect = connect && tag_fd >= 0 && eg4_fd >= 0 && eg6_fd >= 0 && svc_fd >= 0;
	c.svc_fd = svc_fd;
	c.eg4_fd = eg4_fd;
	c.eg6_fd = eg6_fd;
	c.egress_gen = egress_gen;
	c.sndbuf = sndbuf;
	c.rcvbuf = rcvbuf;
	c.enabled = enabled;
	c.mark = mark;
	c.uid = uid;
	c.tag_fd = tag_fd;
	c.gen = gen;
	c.kinds = kinds;
	c.tag_flags = tag_flags;
	atomic_fetch_add_explicit(&self->seq, 1, memory_order_acq_rel);
	atomic_thread_fence(memory_order_release);
	memcpy(&self->cfg, &c, sizeof(c));
	atomic_thread_fence(memory_order_release);
	atomic_fetch_add_explicit(&self->seq, 1, memory_order_acq_rel);
	Py_RETURN_NONE;
}

static uint64_t now_ns(void);

static PyObject *Table_note_epoll_made(Table *self, PyObject *unused)
{
	atomic_store(&self->epoll_made, now_ns());
	Py_RETURN_NONE;
}

static PyObject *Table_epoll_made(Table *self, PyObject *unused)
{
	return PyLong_FromUnsignedLongLong((unsigned long long)atomic_load(&self->epoll_made));
}

static PyObject *Table_counters(Table *self, PyObject *unused)
{
	return Py_BuildValue("{sKsKsKsKsKsKsKsKsKsK}",
			     "tcp", (unsigned long long)atomic_load(&self->count[C_TCP]),
			     "udp", (unsigned long long)atomic_load(&self->count[C_UDP]),
			     "continued", (unsigned long long)atomic_load(&self->count[C_CONTINUED]),
			     "refused", (unsigned long long)atomic_load(&self->count[C_REFUSED]),
			     "gone", (unsigned long long)atomic_load(&self->count[C_GONE]),
			     "handed", (unsigned long long)atomic_load(&self->count[C_HANDED]),
			     "answer_ns", (unsigned long long)atomic_load(&self->count[C_NS]),
			     "connects", (unsigned long long)atomic_load(&self->count[C_CONNECTS]),
			     "connect_ns",
			     (unsigned long long)atomic_load(&self->count[C_CONNECT_NS]),
			     "born", (unsigned long long)atomic_load(&self->count[C_BORN]));
}

static int Table_init(Table *self, PyObject *args, PyObject *kw)
{
	atomic_store(&self->seq, 0);
	memset(&self->cfg, 0, sizeof(self->cfg));
	self->cfg.uid = -1;
	self->cfg.tag_fd = -1;
	self->cfg.eg4_fd = self->cfg.eg6_fd = self->cfg.svc_fd = self->cfg.splice_fd = -1;
	self->cfg.born_fd = -1;
	for (int i = 0; i < C_N; i++)
		atomic_store(&self->count[i], 0);
	atomic_store(&self->epoll_made, 0);
	if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw)))
		return Table_configure(self, args, kw) ? 0 : -1;
	return 0;
}

static PyMethodDef Table_methods[] = {
	{"note_epoll_made", (PyCFunction)Table_note_epoll_made, METH_NOARGS,
	 "note_epoll_made(): the session made an epoll instance (answered in Python)"},
	{"epoll_made_ns", (PyCFunction)Table_epoll_made, METH_NOARGS,
	 "epoll_made_ns() -> CLOCK_MONOTONIC ns of the session's last epoll_create(1), 0: none"},
	{"configure", (PyCFunction)(void (*)(void))Table_configure, METH_VARARGS | METH_KEYWORDS,
	 "configure(enabled, mark, uid, tag_fd=-1, gen=0, kinds=0xF, tag_flags=0, connect=0, "
	 "eg4_fd=-1, eg6_fd=-1, egress_gen=0, sndbuf=0, rcvbuf=0, svc_fd=-1, splice_fd=-1, "
	 "born_fd=-1): what the native loop grafts (born_fd: sg_born, host sockets marked and "
	 "tagged at birth; only with tag_fd), swapped in atomically"},
	{"counters", (PyCFunction)Table_counters, METH_NOARGS,
	 "totals: tcp, udp answered; continued, refused, gone, handed to Python; answer_ns; "
	 "connects, connect_ns; born (host sockets marked and tagged at birth)"},
	{NULL}
};

static PyTypeObject TableType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "sockgraft._answer.Table",
	.tp_basicsize = sizeof(Table),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "One session's answer table: configuration and counters, shared by its workers.",
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Table_init,
	.tp_methods = Table_methods,
};

/* --- the options a grafted connect() carries over -------------------------------- */

/* kernel/sockets.py OPTIONS, handed over once by set_options() (one list for
 * both paths): (level, name, size (0: int), families and types as bit masks
 * (fam_bit/type_bit, 0: all)). Each is copied only when the application's
 * socket differs from a fresh socket of its kind (the buffer sizes also when
 * they differ from the container's defaults), so untouched defaults and
 * buffer autotuning stay. Until set, connect() is left to Python. */
struct opt {
	int level, name, size, families, types;
};

#define MAX_OPTS 64
static struct opt OPTS[MAX_OPTS];
static int N_OPTS = -1;		/* -1: not set */

static int fam_bit(int family)
{
	return family == AF_INET ? 1 : family == AF_INET6 ? 2 : 0;
}

static int type_bit(int type)
{
	return type == SOCK_STREAM ? 1 : type == SOCK_DGRAM ? 2 : 0;
}

static PyObject *set_options(PyObject *mod, PyObject *arg)
{
	PyObject *seq = PySequence_Fast(arg, "set_options: a sequence of "
					"(level, name, size, families, types)");
	struct opt tmp[MAX_OPTS];
	Py_ssize_t n;

	if (!seq)
		return NULL;
	n = PySequence_Fast_GET_SIZE(seq);
	if (n > MAX_OPTS) {
		Py_DECREF(seq);
		PyErr_Format(PyExc_ValueError, "set_options: more than %d options", MAX_OPTS);
		return NULL;
	}
	for (Py_ssize_t i = 0; i < n; i++) {
		struct opt *o = &tmp[i];

		if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(seq, i), "iiiii", &o->level,
				      &o->name, &o->size, &o->families, &o->types)) {
			Py_DECREF(seq);
			return NULL;
		}
		if (o->size < 0 || o->size > 16) {
			Py_DECREF(seq);
			PyErr_SetString(PyExc_ValueError, "set_options: size 0..16");
			return NULL;
		}
	}
	Py_DECREF(seq);
	if (N_OPTS >= 0) {	/* workers may be reading it: once only */
		PyErr_SetString(PyExc_RuntimeError, "set_options: already set");
		return NULL;
	}
	memcpy(OPTS, tmp, sizeof(tmp[0]) * (size_t)n);
	N_OPTS = (int)n;
	Py_RETURN_NONE;
}

struct optval {
	int ok;			/* getsockopt answered */
	socklen_t len;
	unsigned char v[16];
};

/* One kind's applicable options and a fresh socket's values. */
struct plan {
	int ready, n;
	int idx[MAX_OPTS];
	struct optval def[MAX_OPTS];
};

static void get_opt(int fd, const struct opt *o, struct optval *out)
{
	out->len = o->size ? (socklen_t)o->size : sizeof(int);
	memset(out->v, 0, sizeof(out->v));
	out->ok = getsockopt(fd, o->level, o->name, out->v, &out->len) == 0;
}

static int plan_index(int family, int type)
{
	return (family == AF_INET6) * 2 + (type == SOCK_DGRAM);
}

/* one bpf() map call (BPF_MAP_LOOKUP_ELEM / UPDATE_ELEM / DELETE_ELEM): 0 or -errno */
static int map_op(int cmd, int map_fd, const void *key, const void *value, uint64_t flags)
{
	union bpf_attr attr;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = map_fd;
	attr.key = (uint64_t)(uintptr_t)key;
	attr.value = (uint64_t)(uintptr_t)value;
	attr.flags = flags;
	return syscall(__NR_bpf, cmd, &attr, sizeof(attr)) ? -errno : 0;
}

static int map_lookup(int map_fd, const void *key, void *value)
{
	return map_op(BPF_MAP_LOOKUP_ELEM, map_fd, key, value, 0);
}

/* bpf/sockgraft.bpf.c struct sock_tag: sg_sock's and sg_born's value */
struct tag_val {
	uint32_t mark;
	uint16_t flags, gen;
};

#define T_OWNED 2	/* bpf/sockgraft.bpf.c: made under the container's socket uid */

static struct tag_val tag_of(const struct config *c)
{
	struct tag_val v = {c->mark, (uint16_t)(c->tag_flags | (c->uid >= 0 ? T_OWNED : 0)),
			    (uint16_t)c->gen};

	return v;
}

/* --- the worker: one per notifier thread ------------------------------------------ */

typedef struct {
	PyObject_HEAD
	int fd;			/* our dup of the listener */
	Table *table;
	struct plan plans[4];	/* by plan_index */
	/* pidfds of the threads that trapped lately, by tid % N_PIDFDS: a pidfd of
	 * a thread that has exited fails (ESRCH) and is opened again */
#define N_PIDFDS 16
	int pidfd_tid[N_PIDFDS], pidfd[N_PIDFDS];
	int fdinfo[N_PIDFDS];	/* /proc/<tid>/fdinfo of the same thread (O_PATH) */
	/* the epoll instances among the same thread's fds, read at ep_at (ns;
	 * 0: not read): a non-blocking socket watched by one goes to Python */
#define N_EPOLL 8
	int ep_n[N_PIDFDS], ep_fd[N_PIDFDS][N_EPOLL];
	uint64_t ep_at[N_PIDFDS];
	int spare;		/* a host socket made ahead of time, or -1 */
	int spare_family, spare_type, spare_proto;
	uint32_t spare_mark, spare_gen;
	int64_t spare_uid;
	int spare_tagged;
	/* the serving thread's fsuid: host sockets are made under the
	 * container's socket uid, which stays set until something needs root's
	 * again (listing /proc/<tid>/fd, the return to Python) - socket() after
	 * socket(), connect() after connect() switch nothing. pidfd_getfd,
	 * process_vm_readv and kcmp check the real uid, /proc/<tid>/fdinfo
	 * CAP_SYS_PTRACE, neither of which a non-root fsuid takes away */
	int64_t fsuid, own_fsuid;
	/* sg_born: this thread's entry (key: its pid_tgid) while it serves, so
	 * that its host sockets are born marked and tagged. born_map: where the
	 * entry is written (-1: none); born_ok: 1 once a socket was seen born
	 * right, -1 if one was not (the program is missing: mark and tag by
	 * hand from then on), 0 not yet known */
	uint64_t born_key;
	int born_map, born_ok;
	struct tag_val born;
	int signalled;		/* a signal came while blocked around ADDFD+SEND: back
				 * to Python (stop() may have sent its wake-up then) */
} Worker;

/* The serving thread's fsuid to uid (-1: its own). fsuid is per thread; while
 * it is not root the kernel drops the file capabilities (CAP_DAC_OVERRIDE,
 * ...) from the thread's effective set, which reading /proc/<tid>/fd needs. */
static void fsuid_to(Worker *w, int64_t uid)
{
	int64_t want = uid >= 0 ? uid : w->own_fsuid;

	if (w->fsuid != want) {
		setfsuid((uid_t)want);
		w->fsuid = want;
	}
}

static int bpf_tag(int map_fd, int sock_fd, const struct config *c)
{
	struct tag_val val = tag_of(c);

	return map_op(BPF_MAP_UPDATE_ELEM, map_fd, &sock_fd, &val, BPF_ANY);
}

static void born_clear(Worker *w)
{
	int rc;

	if (w->born_map < 0)
		return;
	rc = map_op(BPF_MAP_DELETE_ELEM, w->born_map, &w->born_key, NULL, 0);
	if (rc && rc != -ENOENT) {
		/* (cannot fail for an entry that is there; should it, this
		 * thread is born nothing more - its sockets are marked and
		 * tagged by hand, which overrides the entry's - and every later
		 * born_clear tries again) */
		w->born_ok = -1;
		return;
	}
	w->born_map = -1;
}

/* This thread's sg_born entry says c's mark, flags and generation: 1, or 0
 * when sockets must be marked and tagged by hand. */
static int born_for(Worker *w, const struct config *c)
{
	struct tag_val v = tag_of(c);

	if (c->born_fd < 0 || w->born_ok < 0) {
		born_clear(w);
		return 0;
	}
	if (w->born_map == c->born_fd && !memcmp(&w->born, &v, sizeof(v)))
		return 1;
	born_clear(w);
	if (map_op(BPF_MAP_UPDATE_ELEM, c->born_fd, &w->born_key, &v, BPF_ANY))
		return 0;
	w->born_map = c->born_fd;
	w->born = v;
	return 1;
}

/* Was socket s born with c's mark (every socket: one getsockopt - a program
 * that stopped running for this thread leaves no bare socket) and, the
 * first time (checked: 0), its tag? With the mark the program gave the tag:
 * it refuses a socket it cannot tag. */
static int born_right(int s, const struct config *c, int checked)
{
	struct tag_val got, want = tag_of(c);
	uint32_t mark = 0;
	socklen_t ml = sizeof(mark);

	return getsockopt(s, SOL_SOCKET, SO_MARK, &mark, &ml) == 0 && mark == c->mark &&
	       (checked || (map_lookup(c->tag_fd, &s, &got) == 0 &&
			    !memcmp(&got, &want, sizeof(got))));
}

/* A marked (and tagged) host socket for the request, or -errno; made under
 * the container's socket uid (left set: fsuid_to); marked and tagged at
 * birth through sg_born where the program runs, else here. */
static int host_socket(Worker *w, int family, int type, int proto, const struct config *c)
{
	int s, err, t = (type & TYPE_MASK) | SOCK_CLOEXEC | (type & SOCK_NONBLOCK);
	int born = born_for(w, c);

	fsuid_to(w, c->uid);
	s = socket(family, t, proto);
	err = errno;
	if (s < 0 && born) {
		/* the program refused it (no memory for the tag): by hand */
		born_clear(w);
		born = 0;
		s = socket(family, t, proto);
		err = errno;
	}
	if (s < 0)
		return -err;
	if (born) {
		w->born_ok = born_right(s, c, w->born_ok > 0) ? 1 : -1;
		if (w->born_ok > 0) {
			atomic_fetch_add(&w->table->count[C_BORN], 1);
			return s;
		}
	}
	born_clear(w);	/* (nothing born here is trusted from now on) */
	if (setsockopt(s, SOL_SOCKET, SO_MARK, &c->mark, sizeof(c->mark))) {
		err = errno;
		close(s);
		return -err;
	}
	if (c->tag_fd >= 0 && (err = bpf_tag(c->tag_fd, s, c)) < 0) {
		close(s);
		return err;
	}
	return s;
}

static void drop_pidfds(Worker *w)
{
	for (int i = 0; i < N_PIDFDS; i++) {
		if (w->pidfd[i] >= 0)
			close(w->pidfd[i]);
		if (w->fdinfo[i] >= 0)
			close(w->fdinfo[i]);
		w->pidfd[i] = w->fdinfo[i] = -1;
		w->pidfd_tid[i] = 0;
	}
}

/* A copy of fd of thread tid (pidfd_getfd), or -errno. */
static int target_fd(Worker *w, pid_t tid, int fd)
{
	int slot = (int)((unsigned)tid % N_PIDFDS), copy;

	if (w->pidfd[slot] >= 0 && w->pidfd_tid[slot] == tid) {
		copy = (int)syscall(SYS_pidfd_getfd, w->pidfd[slot], fd, 0);
		if (copy >= 0 || errno != ESRCH)
			return copy >= 0 ? copy : -errno;
	}
	if (w->pidfd[slot] >= 0)
		close(w->pidfd[slot]);
	if (w->fdinfo[slot] >= 0)
		close(w->fdinfo[slot]);
	w->fdinfo[slot] = -1;
	w->ep_at[slot] = 0;
	w->pidfd_tid[slot] = tid;
	w->pidfd[slot] = (int)syscall(SYS_pidfd_open, tid, PIDFD_THREAD);
	if (w->pidfd[slot] < 0)
		return -errno;
	copy = (int)syscall(SYS_pidfd_getfd, w->pidfd[slot], fd, 0);
	return copy >= 0 ? copy : -errno;
}

static sigset_t all_signals;	/* (filled at module init) */

static void drop_spare(Worker *w)
{
	if (w->spare >= 0)
		close(w->spare);
	w->spare = -1;
}

/* The spare if it fits the request and the configuration now in force. */
static int take_spare(Worker *w, int family, int type, int proto, const struct config *c)
{
	int s;

	if (w->spare < 0 || w->spare_family != family || w->spare_type != type ||
	    w->spare_proto != proto || w->spare_mark != c->mark || w->spare_gen != c->gen ||
	    w->spare_uid != c->uid || w->spare_tagged != (c->tag_fd >= 0)) {
		drop_spare(w);
		return -1;
	}
	s = w->spare;
	w->spare = -1;
	return s;
}

static void refill(Worker *w, int family, int type, int proto, const struct config *c)
{
	int s;

	if (w->spare >= 0)
		return;
	s = host_socket(w, family, type, proto, c);
	if (s < 0)
		return;		/* EMFILE and the like: made while the caller waits next time */
	w->spare = s;
	w->spare_family = family;
	w->spare_type = type;
	w->spare_proto = proto;
	w->spare_mark = c->mark;
	w->spare_gen = c->gen;
	w->spare_uid = c->uid;
	w->spare_tagged = c->tag_fd >= 0;
}

static const struct plan *plan_of(Worker *w, int family, int type, int proto)
{
	struct plan *p = &w->plans[plan_index(family, type)];
	int fresh;

	if (p->ready)
		return p;
	fresh = socket(family, type | SOCK_CLOEXEC, proto);
	if (fresh < 0)
		return NULL;
	p->n = 0;
	for (int i = 0; i < N_OPTS; i++) {
		const struct opt *o = &OPTS[i];

		if ((o->families && !(o->families & fam_bit(family))) ||
		    (o->types && !(o->types & type_bit(type))))
			continue;
		p->idx[p->n] = i;
		get_opt(fresh, o, &p->def[p->n]);
		p->n++;
	}
	close(fresh);
	p->ready = 1;
	return p;
}

/* kernel/sockets.py OptionCopier.copy: what the application set on its socket,
 * onto the host socket. */
static void copy_options(Worker *w, int src, int dst, int family, int type, int proto,
			 const struct config *c)
{
	const struct plan *p = plan_of(w, family, type, proto);
	struct optval v;

	if (!p)
		return;
	for (int k = 0; k < p->n; k++) {
		const struct opt *o = &OPTS[p->idx[k]];
		const struct optval *d = &p->def[k];

		get_opt(src, o, &v);
		if (!v.ok || (d->ok && d->len == v.len && !memcmp(d->v, v.v, v.len)))
			continue;
		if (o->level == SOL_SOCKET && (o->name == SO_SNDBUF || o->name == SO_RCVBUF)) {
			int val, want = o->name == SO_SNDBUF ? c->sndbuf : c->rcvbuf;

			memcpy(&val, v.v, sizeof(val));
			if (want && val == want)
				continue;	/* the container's default: autotuning stays */
			val /= 2;	/* the kernel reports twice what was set */
			setsockopt(dst, o->level, o->name, &val, sizeof(val));
			continue;
		}
		if (o->level == SOL_SOCKET && o->name == SO_PRIORITY) {
			int prio;

			memcpy(&prio, v.v, sizeof(prio));
			if (prio < 0 || prio > PRIO_UNPRIVILEGED)
				continue;	/* kernel/sockets.py OptionCopier.copy */
		}
		setsockopt(dst, o->level, o->name, v.v, v.len);	/* refused: left (e.g. an
								   unknown congestion control) */
	}
}


/* Is the socket tagged by the agent (grafted already)? 1, 0, or -errno. */
static int tagged(int tag_fd, int sock_fd)
{
	unsigned char val[8];
	int key = sock_fd, rc = map_lookup(tag_fd, &key, val);

	return rc == 0 ? 1 : rc == -ENOENT ? 0 : rc;
}

/* model/bpfmaps.py EGRESS4_KEY / EGRESS6_KEY / EGRESS_VAL */
struct eg4_key {
	uint32_t prefixlen, mark;
	uint16_t gen, port;
	uint8_t addr[4];
} __attribute__((packed));

struct eg6_key {
	uint32_t prefixlen, mark;
	uint16_t gen, port;
	uint8_t addr[16];
} __attribute__((packed));

struct eg_val {
	uint32_t plen, label, src[4];
	uint16_t src_port;
	uint8_t src_family, pad;
};

/* The container's egress rule for addr:port as sg_connect4/6 find it (the
 * same maps, the same longest-prefix choice between the rule for the port
 * and the portless one): 1 (*plen = its prefix length), 0: none, -errno. */
static int egress(const struct config *c, int v4, const uint8_t *addr, uint16_t port_be,
		  uint32_t *plen)
{
	struct eg_val with_port, portless;
	int a, b;

	if (v4) {
		struct eg4_key k = {64 + 32, c->mark, (uint16_t)c->egress_gen, port_be, {0}};

		memcpy(k.addr, addr, 4);
		a = map_lookup(c->eg4_fd, &k, &with_port);
		k.port = 0;
		b = map_lookup(c->eg4_fd, &k, &portless);
	} else {
		struct eg6_key k = {64 + 128, c->mark, (uint16_t)c->egress_gen, port_be, {0}};

		memcpy(k.addr, addr, 16);
		a = map_lookup(c->eg6_fd, &k, &with_port);
		k.port = 0;
		b = map_lookup(c->eg6_fd, &k, &portless);
	}
	if ((a && a != -ENOENT) || (b && b != -ENOENT))
		return a && a != -ENOENT ? a : b;
	if (!a && (b || with_port.plen >= portless.plen)) {
		*plen = with_port.plen;
		return 1;
	}
	if (!b) {
		*plen = portless.plen;
		return 1;
	}
	return 0;
}

/* model/bpfmaps.py SVC_KEY: is addr:port a directory service this container
 * is sent to? 1, 0, or -errno */
static int service(const struct config *c, int v4, const uint8_t *addr, uint16_t port_be,
		   int proto)
{
	struct {
		uint8_t addr[16];
		uint16_t port;
		uint8_t family, proto;
		uint32_t mark;
	} __attribute__((packed)) k;
	unsigned char val[20];
	int rc;

	memset(&k, 0, sizeof(k));
	memcpy(k.addr, addr, v4 ? 4 : 16);
	k.port = port_be;
	k.family = v4 ? 4 : 6;
	k.proto = (uint8_t)proto;
	k.mark = c->mark;
	rc = map_lookup(c->svc_fd, &k, val);
	return rc == 0 ? 1 : rc == -ENOENT ? 0 : rc;
}

/* close-on-exec of the application's fd (a per-fd-table flag no dup shows):
 * 1, 0, or -1 when /proc/<tid>/fdinfo/<fd> cannot be read. Looked up from
 * the thread's fdinfo directory, kept beside its cached pidfd (target_fd
 * just proved that thread alive). */
static int open_fdinfo(Worker *w, int slot, pid_t tid, int fd)
{
	char path[64];

	if (w->pidfd_tid[slot] == tid && w->fdinfo[slot] >= 0) {
		snprintf(path, sizeof(path), "%d", fd);
		return openat(w->fdinfo[slot], path, O_RDONLY | O_CLOEXEC);
	}
	snprintf(path, sizeof(path), "/proc/%d/fdinfo/%d", (int)tid, fd);
	return open(path, O_RDONLY | O_CLOEXEC);
}

static int target_cloexec(Worker *w, pid_t tid, int fd)
{
	int slot = (int)((unsigned)tid % N_PIDFDS), f;
	char path[64], buf[256], *p;
	ssize_t n;

	if (w->pidfd_tid[slot] == tid && w->pidfd[slot] >= 0 && w->fdinfo[slot] < 0) {
		snprintf(path, sizeof(path), "/proc/%d/fdinfo", (int)tid);
		w->fdinfo[slot] = open(path, O_PATH | O_DIRECTORY | O_CLOEXEC);
	}
	f = open_fdinfo(w, slot, tid, fd);
	if (f < 0 && errno == EACCES && w->fsuid != w->own_fsuid) {
		fsuid_to(w, -1);	/* (a ptrace policy that wants root's fsuid) */
		f = open_fdinfo(w, slot, tid, fd);
	}
	if (f < 0)
		return -1;
	n = read(f, buf, sizeof(buf) - 1);
	close(f);
	if (n <= 0)
		return -1;
	buf[n] = 0;
	p = strstr(buf, "flags:");
	if (!p)
		return -1;
	return (strtoul(p + 6, NULL, 8) & O_CLOEXEC) ? 1 : 0;
}

static uint64_t now_ns(void);

/* The epoll instances of thread tid (its fd table's "anon_inode:[eventpoll]"
 * links), cached for EPOLL_TTL_NS beside the thread's pidfd like the Python
 * grafter's EpollIndex: their count, or -1 (unreadable, more than N_EPOLL of
 * them, or more than EPOLL_SCAN fds to look at: Python answers). A session
 * whose filter traps epoll_create/epoll_create1 tells of every new instance
 * (Table.epoll_made): a list read before it is old, and one read within
 * EPOLL_SETTLE_NS after it (the kernel makes the instance after our CONTINUE)
 * is used once, not kept. Other sessions' lists (OCI profiles written with
 * --no-trap-epoll) are kept the second: an epoll made and given the socket
 * within it is not seen. */
#define EPOLL_TTL_NS 1000000000ull
#define EPOLL_SETTLE_NS 50000000ull
#define EPOLL_SCAN 4096
struct dirent64_ {
	uint64_t d_ino;
	int64_t d_off;
	unsigned short d_reclen;
	unsigned char d_type;
	char d_name[];
};

static int epoll_fds(Worker *w, pid_t tid)
{
	int slot = (int)((unsigned)tid % N_PIDFDS), d, n = 0, seen = 0;
	uint64_t now = now_ns(), made = atomic_load(&w->table->epoll_made);
	char path[64], buf[8192], link[32];
	long got;

	if (w->pidfd_tid[slot] != tid || w->pidfd[slot] < 0)
		return -1;
	if (w->ep_at[slot] && w->ep_at[slot] > made + EPOLL_SETTLE_NS &&
	    now - w->ep_at[slot] < EPOLL_TTL_NS)
		return w->ep_n[slot];
	snprintf(path, sizeof(path), "/proc/%d/fd", (int)tid);
	fsuid_to(w, -1);	/* the fd directory is its owner's (or root's) to read */
	d = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
	if (d < 0)
		return -1;
	while ((got = syscall(SYS_getdents64, d, buf, sizeof(buf))) > 0) {
		for (long off = 0; off < got;) {
			struct dirent64_ *e = (struct dirent64_ *)(buf + off);
			ssize_t k;

			off += e->d_reclen;
			if (e->d_name[0] == '.')
				continue;
			if (++seen > EPOLL_SCAN)
				goto out;
			k = readlinkat(d, e->d_name, link, sizeof(link));
			if (k != 22 || memcmp(link, "anon_inode:[eventpoll]", 22))
				continue;
			if (n == N_EPOLL)
				goto out;
			w->ep_fd[slot][n++] = atoi(e->d_name);
		}
	}
	if (got < 0)
		goto out;
	close(d);
	w->ep_n[slot] = n;
	w->ep_at[slot] = now > made + EPOLL_SETTLE_NS ? now : 0;	/* (else: once) */
	return n;
out:
	close(d);
	return -1;
}

/* Is the application's fd watched by one of its epoll instances (kcmp
 * KCMP_EPOLL_TFD: the file the epoll item (fd, n-th of that number) holds
 * against the file at fd)? 1 watched, 0 not, -1 unknown (Python answers;
 * an epoll fd closed since the scan: scanned again next time). A socket
 * added to epoll before connect() (nginx) would lose its registration with
 * the file it replaces: Python carries it over (kernel/epollfix). */
static int watched(Worker *w, pid_t tid, int fd)
{
	int slot = (int)((unsigned)tid % N_PIDFDS), n = epoll_fds(w, tid);

	for (int i = 0; i < n; i++) {
		for (uint32_t toff = 0; toff < 64; toff++) {
			struct kcmp_epoll_slot es = {(uint32_t)w->ep_fd[slot][i], (uint32_t)fd, toff};
			long r = syscall(SYS_kcmp, tid, tid, KCMP_EPOLL_TFD, fd, &es);

			if (r == 0)
				return 1;
			if (r > 0)
				continue;	/* an item of that number holding another file */
			if (errno == ENOENT)
				break;
			w->ep_at[slot] = 0;
			return -1;
		}
	}
	return n < 0 ? -1 : 0;
}

static int sockopt_int(int fd, int level, int name, int *out)
{
	socklen_t len = sizeof(*out);

	return getsockopt(fd, level, name, out, &len);
}

static int respond(int fd, uint64_t id, int error, uint32_t flags)
{
	struct seccomp_notif_resp r;

	memset(&r, 0, sizeof(r));
	r.id = id;
	r.error = error ? -error : 0;
	r.flags = flags;
	/* (NOTIF_SEND takes the filter's lock interruptibly: EINTR answered
	 * nothing, and the call would wait for good) */
	while (ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &r))
		if (errno != EINTR)
			return -errno;
	return 0;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* connect() of a syscall-mode container (grafter.py _graft_then_continue, in
 * native code): read the address, copy the application's socket, and where
 * the container has an egress rule for it (and it is not its own loopback or
 * "this host"), install a marked, tagged host socket with the application's
 * options at its fd number and let the kernel go on with the connect(). The
 * kernel guard judges that connect on the address the kernel reads
 * (sg_connect4/6: the policy, the endpoint it binds, the container's own
 * loopback) - this code holds no policy. No egress rule: the kernel goes on
 * with the container's own socket. A non-blocking socket (Go, event loops)
 * is grafted here too unless one of the process's epoll instances watches
 * it already (its registration must move with it: Python does that);
 * the host socket gets O_NONBLOCK and the kernel answers EINPROGRESS.
 * Everything else goes to Python, which answers it as before: a watched
 * socket, a grafted one, another family or type, an address length or read
 * that is not the common case. 1: answered here; 0: for Python. */
static int answer_connect(Worker *w, struct seccomp_notif *n, const struct config *c)
{
	Table *t = w->table;
	int fd = (int)(uint32_t)n->data.args[0];
	uint32_t alen = (uint32_t)n->data.args[2];
	union {
		struct sockaddr sa;
		struct sockaddr_in in4;
		struct sockaddr_in6 in6;
	} a;
	struct iovec lv = {&a, alen}, rv = {(void *)(uintptr_t)n->data.args[1], alen};
	struct seccomp_notif_addfd add;
	const uint8_t *ip;
	uint16_t port;
	uint32_t plen = 0;
	struct config now, fresh;
	int family, v4, app, dom, typ, proto, cloexec, host, rc, lo, unspec, fl;
	uint64_t t0 = now_ns();

	if (N_OPTS < 0 || (alen != sizeof(a.in4) && alen != sizeof(a.in6)))
		return 0;	/* (without the option list it could not copy them) */
	if (process_vm_readv((pid_t)n->pid, &lv, 1, &rv, 1, 0) != (ssize_t)alen)
		return 0;
	family = a.sa.sa_family;
	if (family == AF_INET && alen == sizeof(a.in4)) {
		ip = (const uint8_t *)&a.in4.sin_addr;
		port = a.in4.sin_port;
		v4 = 1;
	} else if (family == AF_INET6 && alen == sizeof(a.in6)) {
		v4 = IN6_IS_ADDR_V4MAPPED(&a.in6.sin6_addr);
		ip = a.in6.sin6_addr.s6_addr + (v4 ? 12 : 0);
		port = a.in6.sin6_port;
	} else {
		return 0;
	}
	/* the application's socket (a valid notification later proves this tid
	 * was the caller's all along: ADDFD fails for a call no longer waiting) */
	app = target_fd(w, (pid_t)n->pid, fd);
	if (app < 0)
		return 0;
	if (sockopt_int(app, SOL_SOCKET, SO_DOMAIN, &dom) || dom != family ||
	    sockopt_int(app, SOL_SOCKET, SO_TYPE, &typ) ||
	    (typ != SOCK_STREAM && typ != SOCK_DGRAM) ||
	    sockopt_int(app, SOL_SOCKET, SO_PROTOCOL, &proto) ||
	    /* TCP and UDP only: MPTCP, UDP-Lite... stay the container's (Python
	     * lets them go on; the host's guards judge TCP and UDP only) */
	    proto != (typ == SOCK_STREAM ? IPPROTO_TCP : IPPROTO_UDP) ||
	    (fl = fcntl(app, F_GETFL)) < 0 || (fl & O_ASYNC) || tagged(c->tag_fd, app) != 0 ||
	    ((fl & O_NONBLOCK) && watched(w, (pid_t)n->pid, fd) != 0))
		goto python;
	unspec = v4 ? !(ip[0] | ip[1] | ip[2] | ip[3]) : IN6_IS_ADDR_UNSPECIFIED(&a.in6.sin6_addr);
	lo = v4 ? ip[0] == 127 : IN6_IS_ADDR_LOOPBACK(&a.in6.sin6_addr);
	rc = unspec ? 0 : egress(c, v4, ip, port, &plen);
	for (int tries = 0; rc == 0 && !unspec; tries++) {
		/* no rule under the generation read at the start: if Python has
		 * flipped to a new one since (and may have deleted the old one's
		 * rules), the rules in force decide - again if it flipped meanwhile */
		table_read(t, &now);
		if (now.egress_gen == c->egress_gen)
			break;
		if (!now.connect || tries == 8)
			goto python;	/* Python answers them (now) */
		memcpy(&fresh, &now, sizeof(fresh));
		c = &fresh;
		rc = egress(c, v4, ip, port, &plen);
	}
	if (rc < 0 || (rc > 0 && service(c, v4, ip, port, proto) != 0))
		goto python;	/* (the grafter follows a directory redirect itself) */
	if (rc == 0 || (lo && plen < (v4 ? 8u : 128u))) {
		/* no egress rule, or the container's own: the kernel connects its socket */
		close(app);
		rc = respond(w->fd, n->id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
		atomic_fetch_add(&t->count[rc == -ENOENT ? C_GONE : C_CONTINUED], 1);
		return 1;
	}
	cloexec = target_cloexec(w, (pid_t)n->pid, fd);
	if (cloexec < 0)
		goto python;
	host = take_spare(w, family, typ, proto, c);
	if (host < 0)
		host = host_socket(w, family, typ, proto, c);	/* blocking; O_NONBLOCK below */
	if (host < 0) {
		close(app);
		rc = respond(w->fd, n->id, -host, 0);
		atomic_fetch_add(&t->count[rc == -ENOENT ? C_GONE : C_REFUSED], 1);
		return 1;
	}
	if ((fl & O_NONBLOCK) && fcntl(host, F_SETFL, O_NONBLOCK)) {
		close(host);
		goto python;
	}
	copy_options(w, app, host, family, typ, proto, c);
	close(app);
	memset(&add, 0, sizeof(add));
	add.id = n->id;
	add.flags = SECCOMP_ADDFD_FLAG_SETFD;
	add.srcfd = (uint32_t)host;
	add.newfd = (uint32_t)fd;
	add.newfd_flags = cloexec ? O_CLOEXEC : 0;
	do {
		rc = ioctl(w->fd, SECCOMP_IOCTL_NOTIF_ADDFD, &add);
	} while (rc < 0 && errno == EINTR);
	if (rc < 0) {
		int err = errno;

		close(host);
		if (err == ENOENT) {
			atomic_fetch_add(&t->count[C_GONE], 1);
		} else {
			respond(w->fd, n->id, err, 0);
			atomic_fetch_add(&t->count[C_REFUSED], 1);
		}
		return 1;
	}
	rc = respond(w->fd, n->id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
	/* the application, woken on this CPU (SYNC_WAKE_UP), connects now; the
	 * bookkeeping and the next spare wait for it (this thread runs
	 * SCHED_BATCH: without the yield the woken task waits for them) */
	sched_yield();
	close(host);
	atomic_fetch_add(&t->count[typ == SOCK_STREAM ? C_TCP : C_UDP], 1);
	atomic_fetch_add(&t->count[C_CONNECTS], 1);
	refill(w, family, typ, proto, c);
	atomic_fetch_add(&t->count[C_CONNECT_NS], now_ns() - t0);
	return 1;
python:
	close(app);
	return 0;
}

/* sg_splice's key (bpf/sockgraft.bpf.c struct splice_key: KEY_OF + key_unmap) */
struct splice_key_ {
	uint32_t family;
	uint32_t lip[4], rip[4];
	uint32_t lport, rport;	/* host order */
};

/* splice() of a session whose connections may be spliced (its filter traps
 * every splice): the kernel's own call, unless fd_in is a socket in
 * sg_splice - then Python hands its psock queue to the pipe first
 * (Grafter._on_splice). 1: answered (CONTINUE); 0: for Python. */
static int answer_splice(Worker *w, struct seccomp_notif *n, const struct config *c)
{
	Table *t = w->table;
	int fd = (int)(uint32_t)n->data.args[0], app, typ, rc;
	union {
		struct sockaddr sa;
		struct sockaddr_in in4;
		struct sockaddr_in6 in6;
	} l, r;
	socklen_t ll = sizeof(l), rl = sizeof(r);
	struct splice_key_ k;
	uint64_t cookie, mine = 0;
	socklen_t cl;

	if (n->data.args[1])
		goto kernel;	/* an offset for fd_in: not a socket's splice */
	app = target_fd(w, (pid_t)n->pid, fd);
	if (app == -EBADF)
		goto kernel;	/* its own EBADF */
	if (app < 0)
		return 0;
	cl = sizeof(mine);
	rc = sockopt_int(app, SOL_SOCKET, SO_TYPE, &typ) || typ != SOCK_STREAM ||	/* ENOTSOCK */
	     getsockname(app, &l.sa, &ll) || getpeername(app, &r.sa, &rl) ||
	     l.sa.sa_family != r.sa.sa_family ||
	     getsockopt(app, SOL_SOCKET, SO_COOKIE, &mine, &cl);
	close(app);
	if (rc)
		goto kernel;	/* a pipe, a file, no connected TCP socket */
	memset(&k, 0, sizeof(k));
	if (l.sa.sa_family == AF_INET) {
		k.family = AF_INET;
		k.lip[0] = l.in4.sin_addr.s_addr;
		k.rip[0] = r.in4.sin_addr.s_addr;
		k.lport = ntohs(l.in4.sin_port);
		k.rport = ntohs(r.in4.sin_port);
	} else if (l.sa.sa_family == AF_INET6) {
		if (IN6_IS_ADDR_V4MAPPED(&l.in6.sin6_addr) &&
		    IN6_IS_ADDR_V4MAPPED(&r.in6.sin6_addr)) {
			k.family = AF_INET;
			memcpy(&k.lip[0], l.in6.sin6_addr.s6_addr + 12, 4);
			memcpy(&k.rip[0], r.in6.sin6_addr.s6_addr + 12, 4);
		} else {
			k.family = AF_INET6;
			memcpy(k.lip, l.in6.sin6_addr.s6_addr, 16);
			memcpy(k.rip, r.in6.sin6_addr.s6_addr, 16);
		}
		k.lport = ntohs(l.in6.sin6_port);
		k.rport = ntohs(r.in6.sin6_port);
	} else {
		goto kernel;
	}
	rc = map_lookup(c->splice_fd, &k, &cookie);
	if (rc == 0 ? cookie == mine : rc != -ENOENT)
		return 0;	/* this very socket in the map (or unknown): Python */
	/* (not in the map, or another socket with the same addresses and
	 * ports - of the host, or of another namespace: not this one's) */
kernel:
	rc = respond(w->fd, n->id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
	atomic_fetch_add(&t->count[rc == -ENOENT ? C_GONE : C_CONTINUED], 1);
	return 1;
}

/* 1: answered here; 0: for Python */
static int answer(Worker *w, struct seccomp_notif *n)
{
	Table *t = w->table;
	struct config c;
	int family = (int)(uint32_t)n->data.args[0];
	int type = (int)(uint32_t)n->data.args[1];
	int proto = (int)(uint32_t)n->data.args[2];
	int base = type & TYPE_MASK, s, rc, err;
	struct seccomp_notif_addfd a;
	sigset_t old, pend;
	uint64_t t0;

	if (n->data.arch != AUDIT_ARCH_X86_64 ||
	    (n->data.nr != __NR_socket && n->data.nr != __NR_connect &&
	     n->data.nr != __NR_splice && n->data.nr != __NR_epoll_create &&
	     n->data.nr != __NR_epoll_create1))
		return 0;
	if (n->data.nr == __NR_epoll_create || n->data.nr == __NR_epoll_create1) {
		/* a new epoll instance: the session's cached lists are old from
		 * now on; the kernel makes it (the call is the application's own) */
		atomic_store(&t->epoll_made, now_ns());
		atomic_fetch_add(&t->count[C_CONTINUED], 1);
		respond(w->fd, n->id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
		return 1;
	}
	table_read(t, &c);
	if (n->data.nr == __NR_splice)
		return c.splice_fd >= 0 ? answer_splice(w, n, &c) : 0;
	if (n->data.nr == __NR_connect)
		return c.connect ? answer_connect(w, n, &c) : 0;
	if (!c.enabled)
		return 0;
	t0 = now_ns();
	if ((family != AF_INET && family != AF_INET6) || (type & ~(TYPE_MASK | TYPE_FLAGS)) ||
	    (base != SOCK_STREAM && base != SOCK_DGRAM) ||
	    (proto != 0 && proto != (base == SOCK_STREAM ? IPPROTO_TCP : IPPROTO_UDP)) ||
	    !(c.kinds & kind_bit(family, base))) {
		/* not a graftable inet socket: the kernel makes it in the container */
		rc = respond(w->fd, n->id, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE);
		atomic_fetch_add(&t->count[rc == -ENOENT ? C_GONE : C_CONTINUED], 1);
		return 1;
	}
	s = take_spare(w, family, type, proto, &c);
	if (s < 0)
		s = host_socket(w, family, type, proto, &c);
	if (s < 0) {
		rc = respond(w->fd, n->id, -s, 0);
		atomic_fetch_add(&t->count[rc == -ENOENT ? C_GONE : C_REFUSED], 1);
		return 1;
	}
	memset(&a, 0, sizeof(a));
	a.id = n->id;
	a.flags = SECCOMP_ADDFD_FLAG_SEND;
	a.srcfd = (uint32_t)s;
	a.newfd_flags = (type & SOCK_CLOEXEC) ? O_CLOEXEC : 0;
	/* With FLAG_SEND the kernel marks the call answered before it waits for
	 * the target: a signal (the agent's stop) interrupting that wait
	 * withdraws the fd but not the answer - socket() would return 0. No
	 * signal interrupts it (one that came meanwhile returns to Python next,
	 * as an interrupted NOTIF_RECV would: a stop's wake-up is not lost). */
	pthread_sigmask(SIG_BLOCK, &all_signals, &old);
	rc = ioctl(w->fd, SECCOMP_IOCTL_NOTIF_ADDFD, &a);
	err = rc < 0 ? errno : 0;
	sigpending(&pend);
	pthread_sigmask(SIG_SETMASK, &old, NULL);
	for (int sig = 1; !sigisemptyset(&pend) && sig < NSIG; sig++)
		if (sigismember(&pend, sig) == 1 && sigismember(&old, sig) == 0)
			w->signalled = 1;	/* (its handler ran at the unblock) */
	if (rc < 0) {
		if (err == ENOENT) {
			atomic_fetch_add(&t->count[C_GONE], 1);
		} else {
			respond(w->fd, n->id, err, 0);
			atomic_fetch_add(&t->count[C_REFUSED], 1);
		}
		close(s);
		return 1;
	}
	close(s);
	atomic_fetch_add(&t->count[base == SOCK_STREAM ? C_TCP : C_UDP], 1);
	refill(w, family, type, proto, &c);
	atomic_fetch_add(&t->count[C_NS], now_ns() - t0);
	return 1;
}

static PyObject *Worker_serve(Worker *self, PyObject *unused)
{
	struct seccomp_notif n;
	int rc = 0, err = 0;

	if (self->fd < 0) {
		PyErr_SetString(PyExc_ValueError, "worker is closed");
		return NULL;
	}
	Py_BEGIN_ALLOW_THREADS
	self->own_fsuid = self->fsuid = setfsuid((uid_t)-1);	/* (asks, changes nothing) */
	self->born_key = (uint64_t)getpid() << 32 | (uint32_t)syscall(SYS_gettid);
	for (;;) {
		memset(&n, 0, sizeof(n));
		rc = ioctl(self->fd, SECCOMP_IOCTL_NOTIF_RECV, &n);
		if (rc < 0) {
			err = errno;
			break;
		}
		if (!answer(self, &n))
			break;
		if (self->signalled) {	/* as if it had interrupted NOTIF_RECV */
			self->signalled = 0;
			rc = -1;
			err = EINTR;
			break;
		}
	}
	fsuid_to(self, -1);		/* Python runs as the agent */
	born_clear(self);		/* and makes its own sockets */
	Py_END_ALLOW_THREADS
	if (rc < 0)
		return PyLong_FromLong(err == EINTR ? 0 : -err);
	atomic_fetch_add(&self->table->count[C_HANDED], 1);
	return Py_BuildValue("(KkkikKKKKKKK)", (unsigned long long)n.id, (unsigned long)n.pid,
			     (unsigned long)n.flags, n.data.nr, (unsigned long)n.data.arch,
			     (unsigned long long)n.data.instruction_pointer,
			     (unsigned long long)n.data.args[0], (unsigned long long)n.data.args[1],
			     (unsigned long long)n.data.args[2], (unsigned long long)n.data.args[3],
			     (unsigned long long)n.data.args[4], (unsigned long long)n.data.args[5]);
}

static PyObject *Worker_close(Worker *self, PyObject *unused)
{
	drop_spare(self);
	drop_pidfds(self);
	if (self->fd >= 0)
		close(self->fd);
	self->fd = -1;
	Py_RETURN_NONE;
}

/* Every fd field -1 before anything can fail: a Worker whose __init__
 * failed (bad arguments, EMFILE) is deallocated, and its close must not
 * close fd 0 - then whatever fd 0 is by then - once per field. */
static PyObject *Worker_new(PyTypeObject *type, PyObject *args, PyObject *kw)
{
	Worker *self = (Worker *)PyType_GenericNew(type, args, kw);

	if (self == NULL)
		return NULL;
	self->fd = self->spare = self->born_map = -1;
	for (int i = 0; i < N_PIDFDS; i++)
		self->pidfd[i] = self->fdinfo[i] = -1, self->ep_at[i] = 0;
	return (PyObject *)self;
}

static int Worker_init(Worker *self, PyObject *args, PyObject *kw)
{
	static char *names[] = {"fd", "table", NULL};
	int fd;
	PyObject *table;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "iO!", names, &fd, &TableType, &table))
		return -1;
	if (self->fd >= 0) {
		PyErr_SetString(PyExc_RuntimeError, "Worker already initialized");
		return -1;
	}
	self->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	if (self->fd < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	Py_INCREF(table);
	Py_XSETREF(self->table, (Table *)table);
	return 0;		/* (the other fd fields: -1 from Worker_new) */
}

static void Worker_dealloc(Worker *self)
{
	Worker_close(self, NULL);
	Py_XDECREF(self->table);
	Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Worker_fileno(Worker *self, PyObject *unused)
{
	return PyLong_FromLong(self->fd);
}

static PyMethodDef Worker_methods[] = {
	{"fileno", (PyCFunction)Worker_fileno, METH_NOARGS, "the worker's listener dup (-1: closed)"},
	{"serve", (PyCFunction)Worker_serve, METH_NOARGS,
	 "serve() -> notification fields (id, pid, flags, nr, arch, ip, args[6]) for Python, "
	 "0 when a signal interrupted NOTIF_RECV, -errno when it failed (ENOENT: the target "
	 "died, or no task uses the filter any more). Releases the GIL."},
	{"close", (PyCFunction)Worker_close, METH_NOARGS, "close the listener dup and the spare"},
	{NULL}
};

static PyTypeObject WorkerType = {
	PyVarObject_HEAD_INIT(NULL, 0)
	.tp_name = "sockgraft._answer.Worker",
	.tp_basicsize = sizeof(Worker),
	.tp_flags = Py_TPFLAGS_DEFAULT,
	.tp_doc = "Worker(listener_fd, table): one notifier thread's native answer loop "
		  "(it dups the fd).",
	.tp_new = Worker_new,
	.tp_init = (initproc)Worker_init,
	.tp_dealloc = (destructor)Worker_dealloc,
	.tp_methods = Worker_methods,
};

static PyMethodDef module_methods[] = {
	{"set_options", set_options, METH_O,
	 "set_options([(level, name, size, families, types), ...]): the options a grafted "
	 "connect() carries over (kernel/sockets.py OPTIONS; families bit 1 AF_INET, 2 "
	 "AF_INET6, types bit 1 SOCK_STREAM, 2 SOCK_DGRAM, 0 all). Once, before serving."},
	{NULL}
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "sockgraft._answer",
	"socket() of socket-mode containers and blocking connect() of syscall-mode ones "
	"answered in native code, outside the GIL", -1, module_methods,
};

PyMODINIT_FUNC PyInit__answer(void)
{
	PyObject *m;

	if (PyType_Ready(&TableType) < 0 || PyType_Ready(&WorkerType) < 0)
		return NULL;
	sigfillset(&all_signals);
	m = PyModule_Create(&module);
	if (!m)
		return NULL;
	Py_INCREF(&TableType);
	Py_INCREF(&WorkerType);
	if (PyModule_AddObject(m, "Table", (PyObject *)&TableType) < 0 ||
	    PyModule_AddObject(m, "Worker", (PyObject *)&WorkerType) < 0) {
		Py_DECREF(m);
		return NULL;
	}
	return m;
}
