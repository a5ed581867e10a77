"""The grafter (agent/grafter.py) driven without root: a notification in, an
answer out. The target is this test process (its memory is a table of
buffers, its fds are real sockets); the seccomp listener is a fake that
records answers and does ADDFD as dup2; host sockets are plain sockets (a
mark needs CAP_NET_ADMIN). Everything else - the decisions, the executors,
the connect state machine, the fd ownership - is the agent's own code.

Each case also checks that no fd leaked: whatever the grafter made or
copied is closed once the notification is answered (or owned by a pending
connect)."""

from __future__ import annotations

import errno
import os
import select
import socket
import textwrap
from types import SimpleNamespace

import pytest

from sockgraft.agent.grafter import Grafter
from sockgraft.agent.inventory import Inventory
from sockgraft.agent.sessions import Session
from sockgraft.kernel import seccomp
from sockgraft.model.graftconfig import load_config
from sockgraft.model.sockaddr import InetAddr, UnixAddr, pack_sockaddr

from nettools import full_backlog_server

pytestmark = pytest.mark.unit

CONFIG = load_config(textwrap.dedent('''
    container = "web"
    [endpoints.ep-out]
    type = "ipv4"
    addr = "127.0.0.1"
    port = "dynamic"
    [endpoints.ep-srv]
    type = "ipv4"
    addr = "127.0.0.1"
    port = "dynamic"
    [rules]
    ingress = ["0.0.0.0:80=ep-srv"]
    egress = ["127.0.0.0/8=ep-out"]
    [policy]
    builtin_denies = false
    deny = ["deny tcp 127.0.0.9"]
'''), "test.toml")


class FakeListener:
    closed = False

    def __init__(self) -> None:
        self.answers: list[tuple] = []
        self.valid = True

    def respond(self, nid, *, val=0, error=0):
        self.answers.append(("respond", val, error))

    def continue_(self, nid):
        self.answers.append(("continue",))

    def addfd(self, nid, srcfd, *, newfd, cloexec):
        os.dup2(srcfd, newfd, inheritable=not cloexec)
        self.answers.append(("addfd",))

    def id_valid(self, nid):
        return self.valid


class FakeTargets:
    """This process as the trapped thread."""

    def __init__(self) -> None:
        self.mem: dict[int, bytes] = {}
        self.copies = 0

    def put(self, data: bytes) -> int:
        ptr = 0x1000 * (len(self.mem) + 1)
        self.mem[ptr] = data
        return ptr

    def read(self, tid, ptr, size):
        return self.mem[ptr][:size]

    def dup_socket(self, tid, fd):
        self.copies += 1
        try:
            newfd = os.dup(fd)
        except OSError as exc:
            return exc.errno
        try:
            return socket.socket(fileno=newfd)
        except OSError:
            os.close(newfd)
            return errno.ENOTSOCK

    def pidfd(self, tid):
        raise AssertionError("only epoll re-registration needs a pidfd")


class PlainSockets:
    def host_socket(self, family, type_, proto, mark, flags=0):
        return socket.socket(family, type_ | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto)


@pytest.fixture
def rig():
    ep = select.epoll()
    targets = FakeTargets()
    published = []
    g = Grafter(Inventory(), targets, PlainSockets(), SimpleNamespace(bpf=None),
                SimpleNamespace(services={}, publish_bind=lambda *a: published.append(a)),
                ep, "off")
    server = socket.create_server(("127.0.0.1", 0))
    yield SimpleNamespace(g=g, targets=targets, server=server, published=published)
    server.close()
    g.close()
    ep.close()


def _open_fds() -> set[int]:
    return {int(f) for f in os.listdir("/proc/self/fd")}


def _notif(nr, args, arch=seccomp.AUDIT_ARCH_X86_64):
    return seccomp.Notification(7, os.getpid(), 0, nr, arch, 0, tuple(args) + (0,) *
                                (6 - len(args)))


def _addr(ip, port):
    return pack_sockaddr(InetAddr.of(ip, port))


def _trap(rig, sess, call, app, data, *, alen=None, arch=seccomp.AUDIT_ARCH_X86_64):
    ptr = rig.targets.put(data)
    alen = len(data) if alen is None else alen
    fd = app if isinstance(app, int) else app.fileno()
    if call == "connect":
        n = _notif(seccomp.SYS_CONNECT, (fd, ptr, alen), arch)
    elif call == "bind":
        n = _notif(seccomp.SYS_BIND, (fd, ptr, alen), arch)
    else:
        n = _notif(seccomp.SYS_SENDTO, (fd, 0, 1, 0, ptr, alen), arch)
    before = _open_fds()
    rig.g.handle(sess, n)
    assert _open_fds() - before == set(), "the grafter leaked an fd"
    return sess.listener.answers


def _session(cfg=CONFIG):
    return Session("web", os.getpid(), FakeListener(), 0x53470001, cfg, {})


def _tcp(nonblocking=False):
    s = socket.socket()
    s.setblocking(not nonblocking)
    return s


# --- the table: one trapped call in, one answer out ---------------------------------

def test_connect_through_an_egress_rule_is_grafted_and_answered(rig):
    sess, app = _session(), _tcp()
    ino = os.fstat(app.fileno()).st_ino
    port = rig.server.getsockname()[1]
    answers = _trap(rig, sess, "connect", app, _addr("127.0.0.1", port))
    assert answers == [("addfd",), ("respond", 0, 0)]
    assert os.fstat(app.fileno()).st_ino != ino          # the host socket took its place
    assert app.getpeername() == ("127.0.0.1", port)
    assert sess.counters.grafted == 1
    (rec,) = rig.g.inv.grafted.values()
    assert (rec.kind, rec.endpoint, rec.fd, rec.inode) == \
        ("egress", "ep-out", app.fileno(), os.fstat(app.fileno()).st_ino)
    rig.server.accept()[0].close()
    app.close()


def test_a_nonblocking_connect_is_installed_and_answered_in_progress_or_done(rig):
    sess, app = _session(), _tcp(nonblocking=True)
    answers = _trap(rig, sess, "connect", app, _addr("127.0.0.1", rig.server.getsockname()[1]))
    assert answers[0] == ("addfd",) and answers[1][0] == "respond"
    assert answers[1][2] in (0, errno.EINPROGRESS)
    assert not app.getblocking()                          # its mode carried over
    app.close()


@pytest.mark.parametrize("call, sock, data, alen, answer, counter", [
    # policy: refused and audited, nothing installed
    ("connect", "tcp", ("127.0.0.9", 80), None, ("respond", 0, errno.EACCES), "denied"),
    # no egress rule: the container's own network
    ("connect", "tcp", ("192.0.2.1", 80), None, ("continue",), "passed"),
    # a sockaddr the kernel refuses, on the container's socket: the kernel answers
    ("connect", "tcp", ("127.0.0.1", 80), 3, ("continue",), "passed"),
    # not an inet address: the kernel's
    ("connect", "tcp", "unix", None, ("continue",), "passed"),
    # no ingress rule for this port
    ("bind", "tcp", ("0.0.0.0", 81), None, ("continue",), "passed"),
    # no egress rule: no graft starts
    ("sendto", "udp", ("192.0.2.1", 53), None, ("continue",), "passed"),
])
def test_calls_that_are_not_grafted(rig, call, sock, data, alen, answer, counter):
    sess = _session()
    app = _tcp() if sock == "tcp" else socket.socket(type=socket.SOCK_DGRAM)
    ino = os.fstat(app.fileno()).st_ino
    raw = pack_sockaddr(UnixAddr(b"/run/x.sock")) if data == "unix" else _addr(*data)
    assert _trap(rig, sess, call, app, raw, alen=alen) == [answer]
    assert os.fstat(app.fileno()).st_ino == ino           # still the container's socket
    assert getattr(sess.counters, counter) == 1 and sess.counters.grafted == 0
    app.close()


def test_sendto_without_a_rule_does_not_even_copy_the_socket(rig):
    sess, app = _session(), socket.socket(type=socket.SOCK_DGRAM)
    _trap(rig, sess, "sendto", app, _addr("192.0.2.1", 53))
    assert rig.targets.copies == 0
    app.close()


def test_bind_through_an_ingress_rule_moves_the_server_to_its_endpoint(rig):
    sess, app = _session(), _tcp()
    answers = _trap(rig, sess, "bind", app, _addr("0.0.0.0", 80))
    assert answers == [("addfd",), ("respond", 0, 0)]
    ip, port = app.getsockname()
    assert ip == "127.0.0.1" and port != 0                # the dynamic endpoint port
    (pub,) = rig.published
    assert pub[0] == "web" and str(pub[-1]) == "0.0.0.0:80"
    app.close()


def test_sendto_through_an_egress_rule_installs_then_lets_the_kernel_send(rig):
    sess, app = _session(), socket.socket(type=socket.SOCK_DGRAM)
    answers = _trap(rig, sess, "sendto", app, _addr("127.0.0.1", 9))
    assert answers == [("addfd",), ("continue",)]
    assert app.getsockname()[0] == "127.0.0.1"           # bound to the endpoint
    assert rig.g.inv.totals.grafted == 1
    app.close()


@pytest.mark.parametrize("arch, nr", sorted(seccomp.EPOLL_CREATES))
def test_epoll_create_of_every_abi_is_noted_and_let_through(rig, arch, nr):
    """An OCI profile names epoll_create(1) and traps it for every ABI in its
    architectures list (Docker's: x86_64, x32, i386): whatever the ABI, the
    kernel makes the instance (continue) - an ENOSYS would break a 32-bit
    program that sockgraft grafts nothing of - and the session notes it.
    Another i386 or x32 call is still refused (ENOSYS: not grafted)."""
    sess = _session()
    rig.g.handle(sess, _notif(nr, (0,), arch))
    assert sess.listener.answers == [("continue",)]
    assert sess.epoll_made() > 0
    other = _session()
    rig.g.handle(other, _notif(nr + 1, (0,), arch))
    assert other.listener.answers == [("respond", 0, errno.ENOSYS)]
    assert other.epoll_made() == 0


@pytest.mark.parametrize("what, answer", [
    ("pipe", ("respond", 0, errno.ENOTSOCK)),
    ("closed", ("respond", 0, errno.EBADF)),
    ("arch", ("respond", 0, errno.ENOSYS)),
    ("unconfigured", ("continue",)),
])
def test_odd_targets_get_the_kernels_answer(rig, what, answer):
    sess = _session(None if what == "unconfigured" else CONFIG)
    r, w = os.pipe()
    app = {"pipe": r, "closed": w}.get(what) or _tcp()
    if what == "closed":
        os.close(w)
    arch = 0x40000003 if what == "arch" else seccomp.AUDIT_ARCH_X86_64   # i386
    assert _trap(rig, sess, "bind", app, _addr("0.0.0.0", 80), arch=arch) == [answer]
    os.close(r)
    if what != "closed":
        os.close(w)
    if not isinstance(app, int):
        app.close()


def test_listen_is_done_on_the_agents_own_copy(rig):
    sess, app = _session(), _tcp()
    app.bind(("127.0.0.1", 0))
    rig.g.handle(sess, _notif(seccomp.SYS_LISTEN, (app.fileno(), 5)))
    assert sess.listener.answers == [("respond", 0, 0)]
    assert app.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    app.close()


def test_a_thread_interrupted_while_its_address_was_read_gets_no_answer(rig):
    sess, app = _session(), _tcp()
    sess.listener.valid = False
    assert _trap(rig, sess, "connect", app, _addr("127.0.0.1", 80)) == []
    app.close()


# --- the connect state machine ---------------------------------------------------------

def _pending_connect(rig, sess):
    """A blocking connect that cannot finish at once: the server's accept
    queue is full, so its SYN waits for a retransmission."""
    full, fillers = full_backlog_server()
    port = full.getsockname()[1]
    app = _tcp()
    before = _open_fds()
    rig.g.handle(sess, _notif(seccomp.SYS_CONNECT,
                              (app.fileno(), rig.targets.put(_addr("127.0.0.1", port)), 16)))
    return full, fillers, app, _open_fds() - before


def test_a_pending_connect_owns_its_socket_and_times_out_with_an_answer(rig):
    sess = _session()
    full, fillers, app, new = _pending_connect(rig, sess)
    if not rig.g.connects.pending:
        pytest.skip("the handshake finished at once on this kernel")
    (pc,) = rig.g.connects.pending.values()
    assert new == {pc.sock.fileno()}                      # only the pending one stays open
    assert sess.listener.answers == []                    # the thread still waits
    pc.deadline = 0
    rig.g.connects.expire(1.0)
    assert sess.listener.answers == [("respond", 0, errno.ETIMEDOUT)]
    assert not rig.g.connects.pending and pc.sock.fileno() == -1
    for s in (full, app, *fillers):
        s.close()


def test_a_pending_connect_whose_thread_gave_up_is_dropped_unanswered(rig):
    sess = _session()
    full, fillers, app, _ = _pending_connect(rig, sess)
    if not rig.g.connects.pending:
        pytest.skip("the handshake finished at once on this kernel")
    sess.listener.valid = False
    rig.g.connects.expire(1.0)
    assert sess.listener.answers == [] and not rig.g.connects.pending
    for s in (full, app, *fillers):
        s.close()


def test_pending_connects_are_bounded_per_container_and_in_all(rig):
    """A container whose threads all block in connect() to a black hole may
    not take the agent's fds: past its bound a blocking connect() is answered
    ENOBUFS before anything starts (no fd, no SYN), other containers keep
    theirs until the agent-wide bound."""
    c = rig.g.connects
    c.max_per_session, c.max_total = 2, 3
    full, fillers = full_backlog_server()
    port = full.getsockname()[1]
    web, other = _session(), _session()
    apps = []

    def connect(sess, nonblocking=False):
        app = _tcp(nonblocking)
        apps.append(app)
        before = _open_fds()
        sess.listener.answers.clear()
        rig.g.handle(sess, _notif(seccomp.SYS_CONNECT,
                                  (app.fileno(), rig.targets.put(_addr("127.0.0.1", port)), 16)))
        return sess.listener.answers[:], _open_fds() - before

    assert connect(web)[0] == []
    if not c.pending:
        pytest.skip("the handshake finished at once on this kernel")
    assert connect(web)[0] == [] and len(c.pending) == 2
    answers, new = connect(web)                       # the container's bound
    assert answers == [("respond", 0, errno.ENOBUFS)] and new == set()
    assert connect(other)[0] == [] and len(c.pending) == 3   # another container's own
    answers, new = connect(other)                     # the agent's bound
    assert answers == [("respond", 0, errno.ENOBUFS)] and new == set()
    assert c.refused == 2
    # a non-blocking connect holds nothing in the agent: never bounded
    answers, _ = connect(web, nonblocking=True)
    assert answers[-1] == ("respond", 0, errno.EINPROGRESS)
    # once one finishes, the container may wait again
    c.finish(next(iter(c.pending.values())), errno.ETIMEDOUT)
    assert connect(web)[0] == []
    c.abort_all()
    for s in (full, *fillers, *apps):
        s.close()
