"""The connect state machine: a grafted connect() to the checked destination,
never blocking the loop.

  start  -> connected at once (loopback, local peers), refused at once,
            or the application's socket is non-blocking: answer now
         -> a blocking connect() while the container (or the agent) already
            has its bound of pending connects: ENOBUFS now, nothing started
         -> in progress for a blocking application thread: PendingConnect,
            the host socket's fd in the loop's epoll (EPOLLOUT, one shot)
  ready  -> SO_ERROR: install the host socket at the application's fd (when
            it replaces one) and answer the application's connect()
  expire -> the kernel's SYN retries are over (ETIMEDOUT), or the
            application thread gave up waiting (its notification is no
            longer valid): close, nothing to answer

"install" is the grafter's: ADDFD at the application's fd number, then its
epoll registrations carried over, then counted. A pending connect owns its
socket (moved out of the grafter's ExitStack with `take`)."""

from __future__ import annotations

import errno
import logging
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol

from ..errors import KernelError, NotificationGone
from ..kernel import sockets as ksock
from ..model.sockaddr import InetAddr
from .inventory import GraftedSocket
from .loop import unregister
from .sessions import Session

log = logging.getLogger("sockgraft.agent")

CONNECT_TIMEOUT = 130.0   # about what the kernel's SYN retries take
# A pending connect holds a host socket (an fd of the agent) for a blocked
# application thread until the handshake ends: a container with thousands of
# threads connecting to a black hole would take the agent's fds from every
# container. Past these a blocking connect() is answered ENOBUFS at once.
MAX_PENDING_PER_SESSION = 256
MAX_PENDING = 4096


class Answer(Protocol):
    """What the connect state machine needs of the grafter."""
    def install(self, sess: Session, nid: int, tid: int, host: socket.socket, fd: int,
                cloexec: bool, watch: list, record: GraftedSocket | None) -> None: ...
    def respond(self, sess: Session, nid: int, *, val: int = 0, error: int = 0) -> None: ...
    def watchers(self, sess: Session, tid: int, fd: int, app: socket.socket) -> list: ...


@dataclass
class PendingConnect:
    session: Session
    notif_id: int
    tid: int
    fd: int                      # the application's fd number
    sock: socket.socket          # our host socket (or a dup of the grafted one)
    inject: bool                 # install sock at fd when done (False: it is already there)
    cloexec: bool
    app_nonblocking: bool
    record: GraftedSocket | None
    deadline: float
    watch: list = field(default_factory=list)   # target epoll items to carry over


def take(sock: socket.socket) -> socket.socket:
    """Move a socket out of its owner (an ExitStack's close of the old object
    becomes a no-op): the caller owns the returned object."""
    return type(sock)(fileno=sock.detach())      # (a TargetSocket stays one)


class Connects:
    def __init__(self, ep: select.epoll, answer: Answer, *,
                 max_per_session: int = MAX_PENDING_PER_SESSION,
                 max_total: int = MAX_PENDING) -> None:
        self.ep = ep
        self.answer = answer
        self.pending: dict[int, PendingConnect] = {}    # host socket fd -> pending connect
        self.max_per_session = max_per_session
        self.max_total = max_total
        self.refused = 0                                # blocking connects over the bounds

    def full(self, sess: Session) -> bool:
        """May no further connect of this session wait in the agent?"""
        if len(self.pending) >= self.max_total:
            return True
        if len(self.pending) < self.max_per_session:
            return False
        return sum(pc.session is sess for pc in self.pending.values()) >= self.max_per_session

    def owns(self, fd: int) -> bool:
        return fd in self.pending

    def start(self, sess: Session, nid: int, tid: int, fd: int, sock: socket.socket,
              dest: InetAddr, *, inject: bool, record: GraftedSocket | None,
              app: socket.socket | None = None) -> None:
        """Connect `sock` (non-blocking) to the checked `dest` for the
        application thread `tid` blocked in connect() on `fd`. inject: sock
        replaces the application's socket `app`; else sock is a duplicate of
        the application's own (grafted) socket. Takes `sock` if the connect
        stays pending."""
        a = self.answer
        app = app if app is not None else sock
        app_nb = ksock.file_nonblocking(app.fileno())
        if not app_nb and self.full(sess):
            # (before the connect starts: a shared socket must not go on
            # connecting behind an error)
            self.refused += 1
            if self.refused & (self.refused - 1) == 0:     # 1st, 2nd, 4th, ... logged
                log.warning("%s: %d connects already wait in the agent (bounds %d per "
                            "container, %d in all): connect() answered ENOBUFS (%d so far)",
                            sess.container, len(self.pending), self.max_per_session,
                            self.max_total, self.refused)
            a.respond(sess, nid, error=errno.ENOBUFS)
            return
        cloexec = ksock.target_fd_cloexec(tid, fd) if inject else False
        watch = a.watchers(sess, tid, fd, app) if inject else []
        restore_blocking = False
        if not inject and not app_nb:
            # A grafted socket shared with the application: connect it without
            # blocking the agent, then give the application its blocking mode back.
            ksock.set_blocking(sock, False)
            restore_blocking = True
        # (outside the agent's lock: the socket's O_NONBLOCK is the
        # application's too, and another of its threads may clear it first -
        # the connect would then wait for the handshake, up to minutes)
        with a.waiting_for_target():
            err = sock.connect_ex(ksock.sockaddr_tuple(dest))
        if err == 0 or (err != errno.EINPROGRESS and err != errno.EAGAIN):
            if restore_blocking:
                ksock.set_blocking(sock, True)
            if err == 0 and inject:
                ksock.set_blocking(sock, not app_nb)
                a.install(sess, nid, tid, sock, fd, cloexec, watch, record, replaced=app)
            a.respond(sess, nid, error=err)
            return
        if not app_nb and _writable(sock):
            # Loopback and local peers usually finish the handshake inside
            # connect(): answer now instead of after another epoll round.
            err = ksock.so_error(sock)
            if restore_blocking or inject:
                ksock.set_blocking(sock, True)
            if err == 0 and inject:
                a.install(sess, nid, tid, sock, fd, cloexec, watch, record, replaced=app)
            a.respond(sess, nid, error=err)
            return
        if app_nb:
            # The application will poll for writability and read SO_ERROR itself.
            if inject:
                a.install(sess, nid, tid, sock, fd, cloexec, watch, record, replaced=app)
            a.respond(sess, nid, error=errno.EINPROGRESS)
            return
        sock = take(sock)
        pc = PendingConnect(sess, nid, tid, fd, sock, inject, cloexec, app_nb, record,
                            time.monotonic() + CONNECT_TIMEOUT, watch)
        self.pending[sock.fileno()] = pc
        try:
            self.ep.register(sock.fileno(), select.EPOLLOUT | select.EPOLLONESHOT)
        except OSError:
            del self.pending[sock.fileno()]
            sock.close()
            raise

    def ready(self, fd: int) -> None:
        pc = self.pending[fd]
        self.finish(pc, ksock.so_error(pc.sock))

    def finish(self, pc: PendingConnect, err: int) -> None:
        fd = pc.sock.fileno()
        self.pending.pop(fd, None)
        unregister(self.ep, fd)
        sess = pc.session
        try:
            if err == 0 and pc.inject:
                ksock.set_blocking(pc.sock, True)
                self.answer.install(sess, pc.notif_id, pc.tid, pc.sock, pc.fd, pc.cloexec,
                                    pc.watch, pc.record)
            elif not pc.inject:
                ksock.set_blocking(pc.sock, True)
            self.answer.respond(sess, pc.notif_id, error=err)
        except NotificationGone:
            pass
        except KernelError as exc:
            log.warning("%s: finishing a connect failed: %s", sess.container, exc)
            self.answer.respond(sess, pc.notif_id, error=exc.errno or errno.EIO)
        finally:
            pc.sock.close()

    def expire(self, now: float) -> None:
        """Time out connects past their deadline; drop those whose application
        thread no longer waits (interrupted, exited, or its session gone)."""
        for pc in list(self.pending.values()):
            if now > pc.deadline:
                self.finish(pc, errno.ETIMEDOUT)
            elif pc.session.listener.closed or not pc.session.listener.id_valid(pc.notif_id):
                self.pending.pop(pc.sock.fileno(), None)
                unregister(self.ep, pc.sock.fileno())
                pc.sock.close()

    def abort_all(self) -> None:
        for pc in list(self.pending.values()):
            self.finish(pc, errno.ECONNABORTED)


def _writable(sock: socket.socket) -> bool:
    return bool(ksock.ready(sock, select.POLLOUT))
