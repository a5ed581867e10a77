/* sockgraft._answer: the socket-mode answer loop in native code (issue 15).
 *
 * A notifier thread calls Worker.serve(), which releases the GIL and loops:
 *   NOTIF_RECV -> is it socket() of a kind the session's Table grafts?
 *     yes: take the spare host socket of that kind (or make one: setfsuid to
 *          the container's socket uid, socket(), SO_MARK, the sg_sock tag
 *          through bpf(BPF_MAP_UPDATE_ELEM)) -> NOTIF_ADDFD with FLAG_SEND
 *          (installed and returned in one step) -> refill the spare
 *     an inet socket() of a kind nobody grafts: NOTIF_SEND with FLAG_CONTINUE
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
 * meanwhile wait in the kernel). No call here blocks except NOTIF_RECV and
 * NOTIF_ADDFD (which waits for the target to take the fd).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/bpf.h>
#include <linux/seccomp.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>
#include <sys/fsuid.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef SECCOMP_ADDFD_FLAG_SEND
#define SECCOMP_ADDFD_FLAG_SEND (1UL << 1)
#endif
#ifndef SO_MARK
#define SO_MARK 36
#endif

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
};

enum { C_TCP, C_UDP, C_CONTINUED, C_REFUSED, C_GONE, C_HANDED, C_NS, C_N };

typedef struct {
	PyObject_HEAD
	atomic_uint seq;	/* odd while configure() writes */
	struct config cfg;
	atomic_ullong count[C_N];
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
				"tag_flags", NULL};
	struct config c = {0};
	long long uid = -1;
	unsigned int mark = 0, gen = 0, kinds = 0xF, tag_flags = 0;
	int enabled = 0, tag_fd = -1;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "pIL|iIII", names, &enabled, &mark, &uid,
					 &tag_fd, &gen, &kinds, &tag_flags))
		return NULL;
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

static PyObject *Table_counters(Table *self, PyObject *unused)
{
	return Py_BuildValue("{sKsKsKsKsKsKsK}",
			     "tcp", (unsigned long long)atomic_load(&self->count[C_TCP]),
			     "udp", (unsigned long long)atomic_load(&self->count[C_UDP]),
			     "continued", (unsigned long long)atomic_load(&self->count[C_CONTINUED]),
			     "refused", (unsigned long long)atomic_load(&self->count[C_REFUSED]),
			     "gone", (unsigned long long)atomic_load(&self->count[C_GONE]),
			     "handed", (unsigned long long)atomic_load(&self->count[C_HANDED]),
			     "answer_ns", (unsigned long long)atomic_load(&self->count[C_NS]));
}

static int Table_init(Table *self, PyObject *args, PyObject *kw)
{
	atomic_store(&self->seq, 0);
	memset(&self->cfg, 0, sizeof(self->cfg));
	self->cfg.uid = -1;
	self->cfg.tag_fd = -1;
	for (int i = 0; i < C_N; i++)
		atomic_store(&self->count[i], 0);
	if (PyTuple_GET_SIZE(args) || (kw && PyDict_GET_SIZE(kw)))
		return Table_configure(self, args, kw) ? 0 : -1;
	return 0;
}

static PyMethodDef Table_methods[] = {
	{"configure", (PyCFunction)(void (*)(void))Table_configure, METH_VARARGS | METH_KEYWORDS,
	 "configure(enabled, mark, uid, tag_fd=-1, gen=0, kinds=0xF, tag_flags=0): what the "
	 "native loop grafts, swapped in atomically"},
	{"counters", (PyCFunction)Table_counters, METH_NOARGS,
	 "totals: tcp, udp answered; continued, refused, gone, handed to Python; answer_ns"},
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

/* --- the worker: one per notifier thread ------------------------------------------ */

typedef struct {
	PyObject_HEAD
	int fd;			/* our dup of the listener */
	Table *table;
	int spare;		/* a host socket made ahead of time, or -1 */
	int spare_family, spare_type, spare_proto;
	uint32_t spare_mark, spare_gen;
	int64_t spare_uid;
	int spare_tagged;
} Worker;

static int bpf_tag(int map_fd, int sock_fd, const struct config *c)
{
	union bpf_attr attr;
	struct {
		uint32_t mark;
		uint16_t flags;
		uint16_t gen;
	} val = {c->mark, (uint16_t)c->tag_flags, (uint16_t)c->gen};
	int key = sock_fd;

	memset(&attr, 0, sizeof(attr));
	attr.map_fd = map_fd;
	attr.key = (uint64_t)(uintptr_t)&key;
	attr.value = (uint64_t)(uintptr_t)&val;
	attr.flags = BPF_ANY;
	return syscall(__NR_bpf, BPF_MAP_UPDATE_ELEM, &attr, sizeof(attr)) ? -errno : 0;
}

/* A marked (and tagged) host socket for the request, or -errno. */
static int host_socket(int family, int type, int proto, const struct config *c)
{
	int s, err, t = (type & TYPE_MASK) | SOCK_CLOEXEC | (type & SOCK_NONBLOCK);
	int old = -1;

	if (c->uid >= 0)
		old = setfsuid((uid_t)c->uid);
	s = socket(family, t, proto);
	err = errno;
	if (c->uid >= 0)
		setfsuid((uid_t)old);
	if (s < 0)
		return -err;
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
	s = host_socket(family, type, proto, c);
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

static int respond(int fd, uint64_t id, int error, uint32_t flags)
{
	struct seccomp_notif_resp r;

	memset(&r, 0, sizeof(r));
	r.id = id;
	r.error = error ? -error : 0;
	r.flags = flags;
	return ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &r) ? -errno : 0;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + ts.tv_nsec;
}

/* 1: answered here; 0: for Python */
static int answer(Worker *w, struct seccomp_notif *n)
{
	Table *t = w->table;
	struct config c;
	int family = (int)(uint32_t)n->data.args[0];
	int type = (int)(uint32_t)n->data.args[1];
	int proto = (int)(uint32_t)n->data.args[2];
	int base = type & TYPE_MASK, s, rc;
	struct seccomp_notif_addfd a;
	uint64_t t0;

	if (n->data.nr != __NR_socket || n->data.arch != AUDIT_ARCH_X86_64)
		return 0;
	table_read(t, &c);
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
		s = host_socket(family, type, proto, &c);
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
	do {
		rc = ioctl(w->fd, SECCOMP_IOCTL_NOTIF_ADDFD, &a);
	} while (rc < 0 && errno == EINTR);	/* the kernel withdrew it before EINTR */
	if (rc < 0) {
		int err = errno;

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
	for (;;) {
		memset(&n, 0, sizeof(n));
		rc = ioctl(self->fd, SECCOMP_IOCTL_NOTIF_RECV, &n);
		if (rc < 0) {
			err = errno;
			break;
		}
		if (!answer(self, &n))
			break;
	}
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
	if (self->fd >= 0)
		close(self->fd);
	self->fd = -1;
	Py_RETURN_NONE;
}

static int Worker_init(Worker *self, PyObject *args, PyObject *kw)
{
	static char *names[] = {"fd", "table", NULL};
	int fd;
	PyObject *table;

	if (!PyArg_ParseTupleAndKeywords(args, kw, "iO!", names, &fd, &TableType, &table))
		return -1;
	self->fd = fcntl(fd, F_DUPFD_CLOEXEC, 3);
	if (self->fd < 0) {
		PyErr_SetFromErrno(PyExc_OSError);
		return -1;
	}
	Py_INCREF(table);
	Py_XSETREF(self->table, (Table *)table);
	self->spare = -1;
	return 0;
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
	.tp_new = PyType_GenericNew,
	.tp_init = (initproc)Worker_init,
	.tp_dealloc = (destructor)Worker_dealloc,
	.tp_methods = Worker_methods,
};

static struct PyModuleDef module = {
	PyModuleDef_HEAD_INIT, "sockgraft._answer",
	"socket() of socket-mode containers answered in native code, outside the GIL", -1, NULL,
};

PyMODINIT_FUNC PyInit__answer(void)
{
	PyObject *m;

	if (PyType_Ready(&TableType) < 0 || PyType_Ready(&WorkerType) < 0)
		return NULL;
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
