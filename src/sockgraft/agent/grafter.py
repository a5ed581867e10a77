"""The grafter: one trapped call in, one answer out.

  socket()  -> a marked host socket (notifiers.answer_socket) or Continue
  listen()  -> model.graft.decide_listen, done on the agent's own duplicate
  bind()/connect()/sendto():
     read the sockaddr from target memory -> re-check the notification is
     still valid -> model.graft.prefilter (no fd copied when the answer
     cannot depend on the socket) -> copy the target's socket -> decide
     (model.graft.decide_*, pure) -> one executor per Action type, acting on
     the checked copy of the address only

Every socket the grafter makes or copies belongs to one ExitStack per
notification: closed when the notification is answered, unless a pending
connect takes it (connects.take). Every path answers the notification,
except when the kernel says it is no longer valid (NotificationGone).

Nothing here owns a thread, a timer or an fd table entry beyond one call:
the loop (engine.py) calls `handle`, `connects.ready` and `connects.expire`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import time
from dataclasses import dataclass

from ..errors import KernelError, NotFound, NotificationGone, SockgraftError
from ..kernel import bpf as kbpf
from ..kernel import epollfix, seccomp
from ..kernel import sockets as ksock
from ..model import bpfmaps, graft
from ..model.graft import (BindGrafted, BindLoopback, ConnectGrafted, Continue, Deny, Fail,
                           GraftBind, GraftConnect, GraftSend, Listen, SockInfo)
from ..model.sockaddr import InetAddr
from . import ioctls, notifiers, procfs
from .connects import Connects
from .inventory import GraftedSocket, Inventory, fmt
from .sessions import Session

SPLICE_F_NONBLOCK = 2
STAGE = 65536           # bytes handed to a pipe per splice() (a new pipe's size)

log = logging.getLogger("sockgraft.agent")

SYSCALL_NAMES = {seccomp.SYS_SPLICE: "splice", seccomp.SYS_BIND: "bind",
                 seccomp.SYS_CONNECT: "connect",
                 seccomp.SYS_SENDTO: "sendto", seccomp.SYS_SOCKET: "socket",
                 seccomp.SYS_LISTEN: "listen", seccomp.SYS_EPOLL_CREATE: "epoll_create",
                 seccomp.SYS_EPOLL_CREATE1: "epoll_create1", seccomp.SYS_IOCTL: "ioctl"}
CALLS = {nr: SYSCALL_NAMES[nr]          # the calls that carry an address
         for nr in (seccomp.SYS_BIND, seccomp.SYS_CONNECT, seccomp.SYS_SENDTO)}


@dataclass(slots=True)
class Trapped:
    """One trapped bind/connect/sendto, its checked address and the agent's
    copy of the target's socket."""
    sess: Session
    n: seccomp.Notification
    name: str
    fd: int
    dup: socket.socket
    info: SockInfo
    proto: int


class Grafter:
    def __init__(self, inventory: Inventory, targets, sockets, enforcer, publisher,
                 ep, bpf_mode: str) -> None:
        """targets: agent/targets.Targets (or a fake: read, dup_socket, pidfd);
        sockets: kernel/sockets.HostSockets; enforcer: its `bpf` (the loaded
        programs or None); publisher: its `services` and `publish_bind`."""
        self.inv = inventory
        self.targets = targets
        self.sockets = sockets
        self.enforcer = enforcer
        self.publisher = publisher
        self.bpf_mode = bpf_mode
        self.host_addrs: frozenset = frozenset()
        self.copier = ksock.OptionCopier()
        self.epolls = epollfix.EpollIndex()
        self.reregistrar = epollfix.Reregistrar()
        self.connects = Connects(ep, self)
        self._noted: set[tuple[str, str]] = set()   # (container, note) logged once
        self.observe = None      # metrics: (syscall, seconds) of each call answered here
        # around a kernel call that waits for the trapped task (ADDFD), a
        # context (the agent's releases its loop lock there when a notifier
        # thread calls)
        self.waiting_for_target = contextlib.nullcontext
        # the listener a call is answered through: the session's, or (the
        # agent's) the notifier thread's own that received it - which stays
        # open while the thread answers, even once the session is dropped
        self.listener_of = lambda sess: sess.listener

    @property
    def bpf(self) -> kbpf.Programs | None:
        return self.enforcer.bpf

    @property
    def guarded(self) -> bool:
        """May the agent graft? Only with the kernel guards loaded (or when
        the operator chose --bpf off: trusted containers only)."""
        return self.bpf is not None or self.bpf_mode == "off"

    def grafts_sockets(self, sess: Session) -> bool:
        """Does socket() of this session get a host socket (read by notifier
        threads too: attribute reads only)?"""
        return sess.graft_at == "socket" and sess.config is not None and self.bpf is not None

    def close(self) -> None:
        self.connects.abort_all()
        self.reregistrar.close()

    # --- answers -------------------------------------------------------------

    def handle(self, sess: Session, n: seccomp.Notification) -> None:
        """Service one notification. Never raises: every path answers or drops."""
        name = SYSCALL_NAMES.get(n.nr, str(n.nr))
        t0 = time.perf_counter() if self.observe is not None else 0.0
        try:
            self._handle(sess, n, name)
            if self.observe is not None:
                self.observe(name, time.perf_counter() - t0)
        except NotificationGone:
            pass  # the target died or was interrupted: nothing to answer
        except KernelError as exc:
            # everything else is answered: an unanswered call blocks its thread
            # for good (a target that died meanwhile makes the answer a no-op)
            self.inv.count(sess, "errors")
            (log.debug if isinstance(exc, NotFound) else log.warning)(
                "%s pid %d %s: %s", sess.container, n.pid, name, exc)
            self.respond(sess, n.id, error=exc.errno or errno.EIO)
        except Exception:  # noqa: BLE001 - the agent keeps serving whatever happens
            self.inv.count(sess, "errors")
            log.exception("%s pid %d %s: internal error", sess.container, n.pid, name)
            self.respond(sess, n.id, error=errno.EIO)

    def note_once(self, container: str, reason: str) -> bool:
        """True the first time (container, reason) is noted: what is said of
        it is said once (bounded: the set starts over at 4096)."""
        if (container, reason) in self._noted:
            return False
        if len(self._noted) >= 4096:
            self._noted.clear()
        self._noted.add((container, reason))
        return True

    def respond(self, sess: Session, nid: int, *, val: int = 0, error: int = 0) -> None:
        try:
            self.listener_of(sess).respond(nid, val=val, error=error)
        except NotificationGone:
            pass

    def continue_(self, sess: Session, nid: int) -> None:
        self.inv.count(sess, "passed")
        try:
            self.listener_of(sess).continue_(nid)
        except NotificationGone:
            pass

    def install(self, sess: Session, nid: int, tid: int, host: socket.socket, fd: int,
                cloexec: bool, watch: list, record: GraftedSocket | None,
                replaced: socket.socket | None = None) -> None:
        """ADDFD the host socket at the application's fd number, carry the
        application's epoll registrations of the old socket over to it, count
        it. replaced: the agent's copy of the socket the host socket replaces
        (its close must not wait for the application's linger: unlinger)."""
        listener = self.listener_of(sess)
        with self.waiting_for_target():
            # ADDFD returns once the target has taken the fd: as long as a
            # task slow to run (SCHED_IDLE, a tight CPU quota) makes it
            listener.addfd(nid, host.fileno(), newfd=fd, cloexec=cloexec)
        if replaced is not None:
            ksock.unlinger(replaced)
        if watch and not self.reregistrar.reregister(self.targets.pidfd(tid), host.fileno(),
                                                     fd, watch):
            log.warning("%s tid %d fd %d: could not carry %d epoll registration(s) over",
                        sess.container, tid, fd, len(watch))
        self.inv.graft(sess, record)

    def watchers(self, sess: Session, tid: int, fd: int, app: socket.socket) -> list:
        """The target's epoll items on fd, read before the swap. Only sockets
        in non-blocking mode are looked at: a blocking socket in an epoll set
        before connect()/bind() is not a pattern event loops use."""
        if not ksock.file_nonblocking(app.fileno()):
            return []
        return epollfix.watchers(tid, fd, self.epolls, sess.epoll_made())

    # --- dispatch ------------------------------------------------------------

    def _handle(self, sess: Session, n: seccomp.Notification, name: str) -> None:
        if (n.arch, n.nr) in seccomp.EPOLL_CREATES:
            sess.note_epoll_made()              # its lists of epoll fds are old now
            self.continue_(sess, n.id)          # (the kernel makes the instance)
        elif n.arch != seccomp.AUDIT_ARCH_X86_64:
            self.respond(sess, n.id, error=errno.ENOSYS)
        elif n.nr == seccomp.SYS_SOCKET:
            self._on_socket(sess, n)
        elif n.nr == seccomp.SYS_LISTEN:
            self._on_listen(sess, n)
        elif n.nr == seccomp.SYS_SPLICE:
            self._on_splice(sess, n)
        elif n.nr in CALLS:
            self._on_address(sess, n, name)
        elif n.nr == seccomp.SYS_IOCTL:
            ioctls.answer(self, sess, n)
        else:
            self.respond(sess, n.id, error=errno.ENOSYS)

    def _on_socket(self, sess: Session, n: seccomp.Notification) -> None:
        """graft_at = socket: answer socket() with a host socket carrying the
        container's mark (notifiers.answer_socket). Normally the session's
        notifier threads do this; the loop does it when they are off."""
        if not self.grafts_sockets(sess):
            self.continue_(sess, n.id)      # unconfigured: the container's own socket
            return
        a = notifiers.answer_socket(self.listener_of(sess), n.id, n.pid, n.args, sess.mark, self.sockets)
        if a is not None:
            self.inv.socket_answered(sess, a)

    # the peer's sends that passed the no-rx check just before it was set
    # finish their hand-over into the psock queue within microseconds
    SPLICE_QUIESCE = 0.001

    def _on_splice(self, sess: Session, n: seccomp.Notification) -> None:
        """splice() of a container whose connections may be spliced (its
        filter traps it: seccomp_filter.with_splice). Out of a socket in
        sg_splice the kernel reads the TCP queue only, while the bytes its
        peer spliced to it wait in its psock queue: nothing more is spliced
        into it (sg_splice_norx), what waits is handed to the pipe as the
        call's result, and once nothing waits the socket leaves the map and
        the kernel goes on with the call (and every later one) as TCP. Any
        other splice (a pipe, a file, a socket not in the map): the kernel's."""
        bpf = self.bpf
        fd_in, off_in = n.args[0] & 0xFFFFFFFF, n.args[1]
        fd_out, length = n.args[2] & 0xFFFFFFFF, n.args[4]
        if bpf is None or not bpf.splice or off_in:
            self.continue_(sess, n.id)
            return
        got = self.targets.dup_socket(n.pid, fd_in)
        if isinstance(got, int):
            self.continue_(sess, n.id)          # not a socket: the kernel's own answer
            return
        with got:
            key = _splice_key(got)
            # the very socket in the map: one with the same addresses and
            # ports in the container's own namespace is not (acting on its
            # key would drop what waits for another container's socket)
            if key is None or not bpf.spliced(key, ksock.cookie(got)):
                self.continue_(sess, n.id)
                return
            bpf.stop_splicing_into(key)
            waiting = ksock.inq(got)             # tcp_bpf: the psock queue's bytes
            if waiting == 0:
                time.sleep(self.SPLICE_QUIESCE)
                waiting = ksock.inq(got)
            if waiting == 0:
                bpf.unsplice(key)
                bpf.allow_splicing_into(key)     # (out of the map: nothing can be)
                log.info("%s pid %d: splice() out of a spliced socket: it takes TCP from "
                         "now on", sess.container, n.pid)
                self.continue_(sess, n.id)
                return
            if not self.listener_of(sess).id_valid(n.id):
                raise NotificationGone(n.id)     # (read nothing for a call gone)
            self.respond(sess, n.id, **self._psock_to_pipe(n, got, fd_out, min(length,
                                                                              waiting)))

    def _psock_to_pipe(self, n: seccomp.Notification, sock: socket.socket, fd_out: int,
                       want: int) -> dict:
        """Move up to `want` waiting bytes into the application's pipe at
        fd_out (only an empty one: its whole size is then free); the answer."""
        try:
            pipe = self.targets.getfd(n.pid, fd_out)
        except KernelError as exc:
            return {"error": exc.errno or errno.EBADF}
        try:
            room = ksock.empty_pipe_room(pipe)
            if room is None:
                return {"error": errno.EINVAL}   # splice needs a pipe on one side
            if room == 0:
                return {"error": errno.EAGAIN}   # the application empties it first
            # never a blocking write into the application's pipe (its file,
            # its blocking mode: another of its threads may fill it between
            # the look and the write, and the agent would wait for it): the
            # bytes are peeked, staged in a pipe of the agent's and spliced
            # over without waiting; only what moved is taken from the socket
            data = sock.recv(min(want, room, STAGE), socket.MSG_DONTWAIT | socket.MSG_PEEK)
            r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            try:
                staged = os.write(w, data) if data else 0   # (at most STAGE: all of it)
                moved = os.splice(r, pipe, staged, flags=SPLICE_F_NONBLOCK) if staged else 0
            finally:
                os.close(r)
                os.close(w)
            sock.recv(moved, socket.MSG_DONTWAIT)
            return {"val": moved}
        except BlockingIOError:
            return {"error": errno.EAGAIN}
        except OSError as exc:
            return {"error": exc.errno or errno.EIO}
        finally:
            os.close(pipe)

    def _on_listen(self, sess: Session, n: seccomp.Notification) -> None:
        """listen(): graft.decide_listen. Whatever the verdict, the kernel never
        looks the fd up again after the check: the agent listens on its own
        duplicate of the socket it judged, or answers the errno itself (a
        racing dup2() cannot swap a grafted socket in)."""
        fd = n.args[0] & 0xFFFFFFFF
        got = self.targets.dup_socket(n.pid, fd)
        if isinstance(got, int):
            self.respond(sess, n.id, error=got)
            return
        with got:
            action = graft.decide_listen(self._sock_info(got)[0])
            if isinstance(action, Listen):
                self.respond(sess, n.id, error=ksock.listen(got, n.args[1]))
                return
            try:
                local = fmt(got.getsockname())
            except OSError:
                local = f"fd {fd}"
            self.inv.deny(sess, "listen", action.rule)
            self.inv.write_audit(sess.container, n.pid, "listen", local, "deny", action.rule,
                                 action.errno)
            self.respond(sess, n.id, error=action.errno)

    def _on_address(self, sess: Session, n: seccomp.Notification, name: str) -> None:
        if n.nr == seccomp.SYS_SENDTO:
            fd, ptr, alen, flags = n.args[0], n.args[4], n.args[5], n.args[3]
        else:
            fd, ptr, alen, flags = n.args[0], n.args[1], n.args[2], 0
        fd &= 0xFFFFFFFF
        alen &= 0xFFFFFFFF
        cfg = sess.config
        if cfg is None or not self.guarded:
            # nothing to graft; a grafted socket of a container whose config
            # is gone is still judged by the kernel guards
            self.continue_(sess, n.id)
            return
        sess.tids.add(n.pid)
        data = self.targets.read(n.pid, ptr, min(alen, 128)) if alen else b""
        if not self.listener_of(sess).id_valid(n.id):
            return      # the thread was interrupted or died while we read
        addr = graft.parse_trapped(data, alen)
        if isinstance(addr, Fail):
            self._malformed(sess, n, fd, addr)
            return
        if isinstance(graft.prefilter(CALLS[n.nr], cfg, addr), Continue):
            self.continue_(sess, n.id)
            return
        got = self.targets.dup_socket(n.pid, fd)
        if isinstance(got, int):
            self.respond(sess, n.id, error=got)
            return
        with contextlib.ExitStack() as owned:
            owned.enter_context(got)
            info, proto = self._sock_info(got, v6only=n.nr == seccomp.SYS_BIND)
            if n.nr == seccomp.SYS_BIND:
                socket_mode = sess.graft_at == "socket"
                to_lo = (socket_mode and isinstance(addr, InetAddr)
                         and addr.unmapped().ip.is_loopback)
                action = graft.decide_bind(cfg, info, addr, self.host_addrs,
                                           graft.private_loopback(sess.mark)
                                           if socket_mode else None,
                                           procfs.host_reserved_ports() if to_lo else ())
            elif n.nr == seccomp.SYS_CONNECT:
                action = graft.decide_connect(cfg, info, addr, self.publisher.services)
            else:
                action = graft.decide_sendto(cfg, info, addr, flags)
            getattr(self, EXECUTORS[type(action)])(Trapped(sess, n, name, fd, got, info, proto),
                                                   action, owned)

    def _malformed(self, sess: Session, n: seccomp.Notification, fd: int, fail: Fail) -> None:
        """A sockaddr the kernel would refuse (graft.decide_malformed)."""
        got = self.targets.dup_socket(n.pid, fd)
        info = None
        if not isinstance(got, int):
            with got:
                info = self._sock_info(got)[0]
        action = graft.decide_malformed(info, fail)
        if isinstance(action, Fail):
            self.respond(sess, n.id, error=action.errno)
        else:
            self.continue_(sess, n.id)

    def _sock_info(self, dup: socket.socket, v6only: bool = False) -> tuple[SockInfo, int]:
        """What the decisions need to know of a target's socket, and its
        protocol number. Grafted = tagged by this agent (the mark is only the
        fallback without the guards: a container with CAP_NET_RAW can set it)."""
        family, type_, proto, mark = ksock.info(dup)
        # IPV6_V6ONLY matters to binds only (graft.match_bind): not read on connects
        v6only = v6only and family == socket.AF_INET6 and ksock.v6only(dup)
        if self.bpf is not None:
            tag = self.bpf.tag_of(dup.fileno())
            grafted = tag is not None
            bound = grafted and _bound(dup)
            ingress = grafted and bool(tag[1] & kbpf.T_INGRESS)
        else:
            grafted = graft.is_grafted_mark(mark)
            bound = ingress = grafted and _bound(dup)
        return SockInfo(family, type_, grafted, bound if grafted else True, ingress,
                        v6only, proto), proto

    # --- one executor per action ----------------------------------------------

    def _do_continue(self, t: Trapped, a: Continue, owned) -> None:
        if a.note and self.note_once(t.sess.container, a.reason):
            # a bind a rule could have meant: say why it stays in the container, once
            log.warning("%s pid %d: %s", t.sess.container, t.n.pid, a.reason)
        self.continue_(t.sess, t.n.id)

    def _do_fail(self, t: Trapped, a: Fail, owned) -> None:
        self.inv.count(t.sess, "errors")
        log.info("%s pid %d %s: %s", t.sess.container, t.n.pid, t.name, a.reason)
        self.respond(t.sess, t.n.id, error=a.errno)

    def _do_deny(self, t: Trapped, a: Deny, owned) -> None:
        self.inv.deny(t.sess, t.name, a.rule)
        self.inv.write_audit(t.sess.container, t.n.pid, t.name, a.dest, "deny", a.rule,
                             a.errno)
        self.respond(t.sess, t.n.id, error=a.errno)

    def _do_bind_grafted(self, t: Trapped, a: BindGrafted, owned) -> None:
        """The application's own (grafted at socket()) host socket: bind it."""
        if a.endpoint is None:
            # an ephemeral wildcard bind: nothing to bind on the host (its
            # connect()/sendmsg() bind the egress endpoint later)
            self.respond(t.sess, t.n.id, val=0)
            return
        if not self._bind_own(t, a.local, "ingress", a.endpoint.name):
            return
        self.publisher.publish_bind(t.sess.container, t.sess.addresses, t.n.pid, t.fd,
                                    t.info.proto, t.dup, a.requested)
        self.respond(t.sess, t.n.id, val=0)

    def _do_bind_loopback(self, t: Trapped, a: BindLoopback, owned) -> None:
        """The container's own loopback: its private address on the host."""
        if self._bind_own(t, a.local, "loopback", ""):
            self.respond(t.sess, t.n.id, val=0)

    def _do_connect_grafted(self, t: Trapped, a: ConnectGrafted, owned) -> None:
        """The application's own host socket: connect it to the checked address."""
        self.connects.start(t.sess, t.n.id, t.n.pid, t.fd, t.dup, a.dest, inject=False,
                            record=None)

    def _do_graft_bind(self, t: Trapped, a: GraftBind, owned) -> None:
        host = owned.enter_context(self._host_socket(t, kbpf.T_INGRESS))
        try:
            host.bind(ksock.sockaddr_tuple(a.local))
        except OSError as exc:
            log.info("%s: bind %s for %s failed: %s", t.sess.container, a.local, a.requested,
                     exc.strerror)
            self.respond(t.sess, t.n.id, error=exc.errno or errno.EADDRNOTAVAIL)
            return
        self._inject(t, host, self._record(t, "ingress", a.endpoint.name, host, ""))
        self.respond(t.sess, t.n.id, val=0)
        self.publisher.publish_bind(t.sess.container, t.sess.addresses, t.n.pid, t.fd,
                                    t.info.proto, host, a.requested)

    def _do_graft_connect(self, t: Trapped, a: GraftConnect, owned) -> None:
        if self.bpf is not None and a.overlay is None:
            self._graft_then_continue(t, a, owned)
            return
        host = owned.enter_context(self._host_socket(t))
        _bind_local(host, a.local, defer_port=True)
        remote = str(a.dest) if a.overlay is None else f"{a.overlay} via {a.dest}"
        self.connects.start(t.sess, t.n.id, t.n.pid, t.fd, host, a.dest, inject=True,
                            record=self._record(t, "egress", a.endpoint.name, host, remote),
                            app=t.dup)

    def _graft_then_continue(self, t: Trapped, a: GraftConnect, owned) -> None:
        """With the kernel guards loaded: the host socket (tagged, the
        application's options and blocking mode) replaces the application's,
        then its connect() goes on in the kernel. sg_connect4/6 judge the
        address the kernel reads - the policy, the egress endpoint (they bind
        its source), the container's own loopback (refused: it stays in the
        container) - so an address changed after the agent read it reaches
        nothing the configuration does not grant. The handshake, blocking,
        EINPROGRESS, EINTR and SO_ERROR are the kernel's own, in the
        application's thread; the agent never waits on the network."""
        host = owned.enter_context(self._host_socket(t))
        self._inject(t, host, self._record(t, "egress", a.endpoint.name, host, str(a.dest)))
        # the application's old socket goes before its connect() returns: while
        # our copy kept it alive, an epoll item still on it (one the host
        # socket got a copy of) told an unconnected socket's EPOLLOUT|EPOLLHUP
        t.dup.close()
        self.listener_of(t.sess).continue_(t.n.id)

    def _do_graft_send(self, t: Trapped, a: GraftSend, owned) -> None:
        host = owned.enter_context(self._host_socket(t))
        _bind_local(host, a.local)
        self._inject(t, host, self._record(t, "sendto", a.endpoint.name, host, str(a.dest)))
        # The datagram itself goes through the kernel on the host socket; the
        # kernel judges it by the socket's mark and tag (no re-read hazard).
        self.listener_of(t.sess).continue_(t.n.id)

    # --- executor parts ------------------------------------------------------

    def _bind_own(self, t: Trapped, local: InetAddr, kind: str, endpoint: str) -> bool:
        """Bind the application's own host socket to the checked `local` and
        let it listen (T_INGRESS); False: the bind failed and was answered."""
        try:
            t.dup.bind(ksock.sockaddr_tuple(local))
        except OSError as exc:
            self.respond(t.sess, t.n.id, error=exc.errno or errno.EADDRNOTAVAIL)
            return False
        if self.bpf is not None:
            self.bpf.tag(t.dup.fileno(), t.sess.mark, kbpf.T_INGRESS)   # may listen now
        self.inv.graft(t.sess, self._record(t, kind, endpoint, t.dup, ""))
        return True

    def _host_socket(self, t: Trapped, flags: int = 0) -> socket.socket:
        """A host socket for the container, with the options the application
        set on its own socket copied over."""
        host = self.sockets.host_socket(t.info.family, t.info.type, t.proto, t.sess.mark,
                                        flags)
        try:
            self.copier.copy(t.dup, host, t.info.family, t.info.type, t.proto,
                             t.sess.buffers)
        except BaseException:
            host.close()
            raise
        return host

    def _inject(self, t: Trapped, host: socket.socket, record: GraftedSocket) -> None:
        """The host socket replaces the application's, in the application's
        blocking mode and close-on-exec flag."""
        cloexec = ksock.target_fd_cloexec(t.n.pid, t.fd)
        ksock.set_blocking(host, not ksock.file_nonblocking(t.dup.fileno()))
        self.install(t.sess, t.n.id, t.n.pid, host, t.fd, cloexec,
                     self.watchers(t.sess, t.n.pid, t.fd, t.dup), record, replaced=t.dup)

    def _record(self, t: Trapped, kind: str, endpoint: str, host: socket.socket,
                remote: str) -> GraftedSocket:
        return self.inv.record(t.sess.container, t.n.pid, t.fd, t.info.proto, kind, endpoint,
                               host, remote)


EXECUTORS = {Continue: "_do_continue", Fail: "_do_fail", Deny: "_do_deny",
             BindGrafted: "_do_bind_grafted", BindLoopback: "_do_bind_loopback",
             ConnectGrafted: "_do_connect_grafted",
             GraftBind: "_do_graft_bind", GraftConnect: "_do_graft_connect",
             GraftSend: "_do_graft_send"}


def _bind_local(host: socket.socket, local: InetAddr, *, defer_port: bool = False) -> None:
    """Bind to the endpoint. defer_port (a connect to come, dynamic port):
    IP_BIND_ADDRESS_NO_PORT leaves the port to connect(), which picks it
    knowing the destination and may reuse TIME_WAIT ports; a bind to port 0
    would reserve one per socket and exhaust the range under connection churn."""
    try:
        if defer_port and local.port == 0:
            host.setsockopt(ksock.IPPROTO_IP, ksock.IP_BIND_ADDRESS_NO_PORT, 1)
        host.bind(ksock.sockaddr_tuple(local))
    except OSError as exc:
        raise KernelError("bind endpoint", exc.errno or errno.EADDRNOTAVAIL,
                          str(local)) from None


def _bound(sock: socket.socket) -> bool:
    """Has the socket a local address or port? (getsockname of a fresh socket
    is the wildcard with port 0)"""
    try:
        name = sock.getsockname()
    except OSError:
        return True
    return name[1] != 0 or name[0] not in ("0.0.0.0", "::")


def _splice_key(sock: socket.socket) -> bytes | None:
    """sg_splice's key of a connected TCP socket (None: not one)."""
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET,
                                                                  socket.AF_INET6):
            return None
        local, remote = sock.getsockname(), sock.getpeername()
        return bpfmaps.splice_key(local[0], local[1], remote[0], remote[1])
    except (OSError, ValueError, SockgraftError):
        return None
