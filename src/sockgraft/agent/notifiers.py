"""Answering socket() of socket-mode containers from threads blocked in
NOTIF_RECV: the per-connection fast path.

Why threads: a trapped socket() is a round trip between the application's
thread and the agent. When the agent waits in epoll, the kernel wakes it on
whatever CPU the scheduler picks, usually the idle one, and on a VM waking an
idle vCPU costs tens of microseconds - twice per socket (the notification,
then the ADDFD the target must run to install the fd). A thread that waits in
NOTIF_RECV itself is woken through the listener's own wait queue, where
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP puts it on the trapping task's CPU
(WF_CURRENT_CPU): no idle vCPU is woken. Two threads per listener, so that
one always waits in RECV while the other waits for its ADDFD to complete.
Measured on this project's 2 vCPU VM: 75-90 us per trapped socket() from the
epoll loop, 34-45 us from two such threads (docs/benchmarks.md). They run
SCHED_BATCH (no wakeup preemption: after its ADDFD a thread must not preempt
the task it answered, which usually runs on the same CPU).

What the threads do: socket() of an inet stream/datagram socket is answered
here with a host socket (marked and tagged, ksock.HostSockets), installed and returned in one
ADDFD_FLAG_SEND - from a `Spare` made ahead of time when the kind matches the
last one, else by `answer_socket`. Everything else they receive (bind,
listen) is forwarded to the agent's single loop, which owns all other state:
threads only read a session's fields and hand records over through `Inbox`.

Each thread owns a dup of the listener fd (its own buffers, and no fd number
that the loop could close and reuse under it). Threads end when every filtered
task has exited (NOTIF_RECV fails with ENOENT and the fd reports POLLHUP), or
when `stop()` interrupts their RECV with a signal (EINTR: the handler is
installed without SA_RESTART).
"""

from __future__ import annotations

import collections
import errno
import logging
import os
import select
import signal
import socket
import threading
import time
import _socket
from dataclasses import dataclass
from typing import Callable, NamedTuple

from ..errors import AgentError, KernelError, NotFound, NotificationGone
from ..kernel import seccomp
from ..kernel import sockets as ksock
from ..model import graft
from ..model import ioctl as mioctl

try:                        # the native answer loop (src/sockgraft/_answer.c)
    from .. import _answer as native
    NATIVE_ERROR = ""
except ImportError as _exc:   # not built (no compiler/headers at install): Python answers
    native = None
    NATIVE_ERROR = str(_exc)


def native_options(options=ksock.OPTIONS) -> list[tuple[int, int, int, int, int]]:
    """The options a grafted connect() carries over (kernel/sockets.py
    OPTIONS, the one list) as the native loop takes them: families and types
    as bit masks (AF_INET 1, AF_INET6 2; SOCK_STREAM 1, SOCK_DGRAM 2; 0: all).
    Pure."""
    fam = {socket.AF_INET: 1, socket.AF_INET6: 2}
    typ = {socket.SOCK_STREAM: 1, socket.SOCK_DGRAM: 2}
    return [(level, opt, size, sum(fam[f] for f in fams) if fams else 0,
             sum(typ[t] for t in types) if types else 0)
            for level, opt, size, fams, types in options]


if native is not None:
    native.set_options(native_options())

log = logging.getLogger("sockgraft.agent")

SOCK_TYPE_MASK = 0xF
SOCK_FLAGS = socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
INET_PROTO = {1: 6, 2: 17}      # SOCK_STREAM -> IPPROTO_TCP, SOCK_DGRAM -> IPPROTO_UDP
WAKE_SIGNAL = signal.SIGUSR2    # interrupts a thread's NOTIF_RECV on stop()
THREAD_STACK = 256 * 1024


class Answered(NamedTuple):
    """One socket() answered with a host socket."""
    tid: int
    fd: int          # the application's new fd number
    inode: int
    proto: str       # "tcp" | "udp"


def pack_answer(tid: int, fd: int, inode: int, udp: bool) -> int:
    """An answered socket as one int: what a notifier thread hands over per
    socket costs no object the garbage collector has to track. Pure."""
    return (tid << 65) | ((fd & 0xFFFFFFFF) << 33) | ((inode & 0xFFFFFFFF) << 1) | bool(udp)


def unpack_answer(x: int) -> Answered:
    return Answered(x >> 65, (x >> 33) & 0xFFFFFFFF, (x >> 1) & 0xFFFFFFFF,
                    "udp" if x & 1 else "tcp")


def socket_request(family: int, typ: int, proto: int) -> tuple[int, int, int] | None:
    """(family, type, proto) of a socket() call (its three registers) that the
    agent answers with a host socket, or None for one it lets the kernel
    create in the container (raw, SCTP, unknown type flags). Pure."""
    family &= 0xFFFFFFFF
    typ &= 0xFFFFFFFF
    proto &= 0xFFFFFFFF
    base = typ & SOCK_TYPE_MASK
    if (family not in (socket.AF_INET, socket.AF_INET6) or typ & ~(SOCK_TYPE_MASK | SOCK_FLAGS)
            or base not in INET_PROTO or proto not in (0, INET_PROTO[base])):
        return None
    return family, typ, proto


class Spare:
    """One host socket made ahead of time, of the kind last asked for: the
    next socket() of that kind is answered without creating one while the
    application waits. Refilled after each answer, when nobody waits (a
    SCHED_BATCH notifier thread does not preempt the task it answered)."""

    __slots__ = ("req", "sock")

    def __init__(self) -> None:
        self.req: tuple[int, int, int] | None = None
        self.sock: _socket.socket | None = None

    def take(self, req: tuple[int, int, int]) -> _socket.socket | None:
        """The spare if it is of kind req (it is then no longer the spare)."""
        if self.sock is None or req != self.req:
            return None
        sock, self.sock = self.sock, None
        return sock

    def refill(self, req: tuple[int, int, int], mark: int, sockets: ksock.HostSockets) -> None:
        if self.sock is not None:
            if req == self.req:
                return
            self.sock.close()
            self.sock = None
        try:
            self.sock = host_socket(req, mark, sockets)
            self.req = req
        except KernelError:
            pass        # EMFILE and the like: answered the slow way next time

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None


def host_socket(req: tuple[int, int, int], mark: int,
                sockets: ksock.HostSockets) -> _socket.socket:
    """The host socket that answers socket() request `req` (socket_request):
    close-on-exec on our side, the application's SOCK_NONBLOCK, the
    container's socket uid, mark and guard tag."""
    family, typ, proto = req
    return sockets.make(family, (typ & SOCK_TYPE_MASK) | socket.SOCK_CLOEXEC
                        | (typ & socket.SOCK_NONBLOCK), proto, mark)


def answer_socket(listener: seccomp.Listener, nid: int, tid: int, args: tuple[int, ...],
                  mark: int, sockets: ksock.HostSockets) -> int | None:
    """Answer socket() (notification nid of thread tid, registers args) with
    a host socket of the container of `mark` (`sockets` makes it), installed
    and returned in one step (ADDFD_FLAG_SEND). Reads only the registers: no
    target memory, no pidfd.
    Returns None after letting an unsupported socket() continue, or after
    failing one the host refuses (EMFILE, EAFNOSUPPORT...) with its errno.
    Raises NotFound if the target went away. This is the one per-connection
    cost of socket mode: nothing here that could wait until after the answer.
    Returns the answer as `pack_answer` packs it."""
    req = socket_request(args[0], args[1], args[2])
    if req is None:
        listener.continue_(nid)
        return None
    try:
        host = host_socket(req, mark, sockets)
    except KernelError as exc:      # HostSockets translates OSError
        listener.respond(nid, error=exc.errno or errno.EIO)
        return None
    return install(listener, nid, tid, host, req[1])


def install(listener: seccomp.Listener, nid: int, tid: int, host: _socket.socket,
            typ: int) -> int:
    """Install host as the answer to socket() notification nid (type
    register typ) and return it packed; our copy of host is closed."""
    try:
        hfd = host.fileno()
        fd = listener.addfd(nid, hfd, cloexec=bool(typ & socket.SOCK_CLOEXEC), send=True)
        return pack_answer(tid, fd, os.fstat(hfd).st_ino,
                           typ & SOCK_TYPE_MASK != graft.SOCK_STREAM)
    finally:
        host.close()


@dataclass(frozen=True)
class ThreadFailed:
    """A notifier thread ended while its session still runs (an unexpected
    error): the loop takes over the session's notifications."""
    thread: str
    error: str


class Inbox:
    """What notifier threads hand to the agent's loop: answered sockets
    (counted and listed; drained whenever the loop runs, no wake-up),
    notifications the loop must handle and thread failures (these two wake
    it through a pipe)."""

    def __init__(self) -> None:
        self._items: collections.deque = collections.deque()
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def fileno(self) -> int:
        return self._r

    def answered(self, key: int, packed: int) -> None:
        self._items.append((key, packed))     # deque.append is atomic: no lock

    def forward(self, key: int, n: "seccomp.Notification | ThreadFailed") -> None:
        self._items.append((key, n))
        self.wake()

    def wake(self) -> None:
        """Make the loop run a turn (its end-of-turn work)."""
        try:
            os.write(self._w, b"\0")
        except BlockingIOError:
            pass        # the pipe is full: the loop is awake anyway

    def waiting(self) -> bool:
        return bool(self._items)

    def drain(self) -> list[tuple[int, object]]:
        try:
            while os.read(self._r, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        items = self._items
        while items:
            out.append(items.popleft())
        return out

    def close(self) -> None:
        for fd in (self._r, self._w):
            if fd >= 0:
                os.close(fd)
        self._r = self._w = -1


def _ignore_wake(*_: object) -> None:
    pass


def install_wake_handler() -> bool:
    """A no-op handler for WAKE_SIGNAL (CPython installs it without
    SA_RESTART, so a blocked NOTIF_RECV fails with EINTR). Only possible from
    the main thread; False elsewhere unless it is already installed (then no
    notifier threads are used: the default action of the signal would kill
    the agent)."""
    if signal.getsignal(WAKE_SIGNAL) is _ignore_wake:
        return True
    try:
        signal.signal(WAKE_SIGNAL, _ignore_wake)
        return True
    except ValueError:
        return False


NATIVE_MODES = ("auto", "on", "off")


def choose_native(mode: str) -> bool:
    """--native: answer socket() in native code? auto: when the module is
    built (said once if not); on: refuse to start without it; off: never."""
    if mode not in NATIVE_MODES:
        raise AgentError(f"native mode {mode!r} unknown; accepted: {', '.join(NATIVE_MODES)}")
    if mode == "off":
        return False
    if native is None:
        if mode == "on":
            raise AgentError(f"--native on: the native answer loop is not built "
                             f"({NATIVE_ERROR}); reinstall with a C compiler and the Python "
                             f"headers, or use --native auto")
        log.warning("socket() of socket-mode containers is answered in Python: the native "
                    "answer loop is not built (%s)", NATIVE_ERROR)
        return False
    return True


def native_usable(sockets: ksock.HostSockets) -> bool:
    """Can the native loop answer for these host sockets: the module is built
    and, when the kernel guards run, it can tag sockets itself."""
    return native is not None and sockets.native_tag(0) is not None


class Notifiers:
    """The threads answering one socket-mode listener: in native code
    (`native`, a Table of this session's configuration and counters shared
    by the threads' Workers) or in Python."""

    def __init__(self, listener_fd: int, mark: int, container: str, inbox: Inbox,
                 *, threads: int = 2, enabled: Callable[[], bool] = lambda: True,
                 sockets: ksock.HostSockets | None = None, native_loop: bool = False,
                 serve: Callable[[int, seccomp.Notification, seccomp.Listener], bool]
                 | None = None,
                 connects: Callable[[], dict | None] = lambda: None,
                 splice_map: Callable[[], int] = lambda: -1) -> None:
        """serve(key, notification, listener): answer a call that is not a
        grafted socket() in this thread, through this thread's listener (the
        agent's loop lock taken inside); False: the thread lets it go on. connects(): the native loop's
        parameters for grafting connect() itself (Table.configure keywords:
        eg4_fd, eg6_fd, egress_gen, sndbuf, rcvbuf), None: it does not.
        splice_map(): sg_splice's fd when the session traps splice() (the
        native loop continues every splice not out of a spliced socket), -1."""
        self.key = listener_fd      # what the loop knows the session by
        self.mark = mark
        self.serve = serve
        self.connects = connects
        self.splice_map = splice_map
        self.sockets = sockets if sockets is not None else ksock.HostSockets()
        self.container = container
        self.inbox = inbox
        self.enabled = enabled
        self.table = None
        if native_loop and native_usable(self.sockets):
            self.table = native.Table()
            self.refresh()
        self._harvested: dict[str, int] = {}
        if not install_wake_handler():
            raise AgentError("notifier threads need the wake-up signal handler, which only "
                             "the main thread can install")
        self._stop = False
        self.failures = 0
        self._threads: list[threading.Thread] = []
        self._fds: list[int] = []
        try:
            for _ in range(threads):
                self._fds.append(os.dup(listener_fd))
        except OSError as exc:
            for fd in self._fds:
                os.close(fd)
            raise KernelError("dup(seccomp listener)", exc.errno or errno.EMFILE) from None
        old = threading.stack_size()
        try:
            threading.stack_size(THREAD_STACK)
            for i, fd in enumerate(self._fds):
                t = threading.Thread(target=self._supervised, args=(fd,), daemon=True,
                                     name=f"notify-{container}-{i}")
                t.start()
                self._threads.append(t)
        finally:
            threading.stack_size(old)

    @property
    def alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def refresh(self) -> None:
        """Give the native loop the session's configuration now in force (on/off,
        mark, socket uid, guard map and generation); swapped atomically. The
        loop calls it after every change of policy state (sync_bpf)."""
        if self.table is None:
            return
        tag = self.sockets.native_tag(self.mark)
        tag_fd, gen = tag if tag is not None else (-1, 0)
        connects = self.connects() if tag is not None else None
        self.table.configure(enabled=bool(self.enabled()) and tag is not None, mark=self.mark,
                             uid=ksock.fsuid_for(self.mark), tag_fd=tag_fd, gen=gen,
                             born_fd=self.sockets.native_born() if tag_fd >= 0 else -1,
                             splice_fd=self.splice_map(),
                             **({"connect": True, **connects} if connects else {}))

    def harvest(self) -> dict[str, int]:
        """What the native loop did since the last harvest: {tcp, udp,
        refused, ...} increments (the loop turns them into counters)."""
        if self.table is None:
            return {}
        now = self.table.counters()
        delta = {k: v - self._harvested.get(k, 0) for k, v in now.items()}
        self._harvested = now
        return delta

    def _supervised(self, fd: int) -> None:
        """A thread's life: it ends quietly when asked to or when every
        filtered task exited; any other end is reported to the loop, which
        then serves the listener itself (nothing stays unanswered)."""
        error = "the thread returned"
        try:
            if self._run(fd):
                return
        except BaseException as exc:        # noqa: BLE001 - reported, then the loop serves
            error = f"{type(exc).__name__}: {exc}"
            log.exception("%s: notifier thread failed", self.container)
        if self._stop:
            return
        self.failures += 1
        log.error("%s: notifier thread %s ended (%s); the agent's loop answers this "
                  "container's calls from now on", self.container,
                  threading.current_thread().name, error)
        self.inbox.forward(self.key, ThreadFailed(threading.current_thread().name, error))

    def _run(self, fd: int) -> bool:
        """Serve until stopped (True) or every filtered task exited (True);
        False or an exception: the thread failed."""
        try:
            # SCHED_BATCH: normal weight, but no wakeup preemption. When its
            # ADDFD completes, this thread must not preempt the task it just
            # answered (on the same CPU) for its bookkeeping.
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except OSError:
            pass
        if self.table is not None:
            return self._run_native(fd)
        listener = seccomp.Listener(fd)
        spare = Spare()
        recv = listener.recv_raw
        answered, other = self.inbox.answered, self._other
        key, mark, enabled, sockets = self.key, self.mark, self.enabled, self.sockets
        sys_socket, arch = seccomp.SYS_SOCKET, seccomp.AUDIT_ARCH_X86_64
        try:
            while not self._stop:
                try:
                    v = recv()
                except InterruptedError:
                    continue
                except NotFound:
                    if listener.poll(0) & select.POLLHUP:
                        return True     # every filtered task exited
                    continue            # the target died between wake-up and recv
                except KernelError as exc:
                    log.warning("%s: NOTIF_RECV failed: %s", self.container, exc)
                    return False
                if v[3] != sys_socket or v[4] != arch or not enabled():
                    other(seccomp.notif_of(v), listener)
                    continue
                req = (v[6] & 0xFFFFFFFF, v[7] & 0xFFFFFFFF, v[8] & 0xFFFFFFFF)
                try:
                    host = spare.take(req)
                    if host is not None:        # the common case: no socket to make
                        a = install(listener, v[0], v[1], host, req[1])
                    else:
                        a = answer_socket(listener, v[0], v[1], req, mark, sockets)
                        if a is None:
                            continue
                    answered(key, a)
                    spare.refill(req, mark, sockets)
                except NotificationGone:
                    continue
                except KernelError as exc:
                    log.warning("%s pid %d socket: %s", self.container, v[1], exc)
                    _answer_quietly(listener, v[0], exc.errno or errno.EIO)
                except Exception:
                    _answer_quietly(listener, v[0], errno.EIO)   # (then reported)
                    raise
        finally:
            spare.close()
            listener.close()
        return True                     # stopped

    def _run_native(self, fd: int) -> bool:
        """The native loop (Worker.serve, GIL released) answers socket();
        what it returns is for the agent's loop."""
        worker = native.Worker(fd, self.table)      # its own dup of the listener
        listener = seccomp.Listener(fd)             # (answers what nobody else will)
        other = self._other
        try:
            while not self._stop:
                r = worker.serve()
                if type(r) is tuple:
                    other(seccomp.notif_of(r), listener)
                elif r == -errno.ENOENT:
                    if _hung_up(worker):
                        return True     # every filtered task exited
                elif r != 0:            # 0: a signal (stop) interrupted NOTIF_RECV
                    log.warning("%s: NOTIF_RECV failed: %s", self.container,
                                os.strerror(-r))
                    return False
        finally:
            worker.close()
            listener.close()
        return True                     # stopped

    def _other(self, n: seccomp.Notification, listener: seccomp.Listener) -> None:
        """A call that is not a grafted socket(): answered here when the agent
        lets threads serve (woken on the trapping task's CPU, no second
        wake-up of the loop), else by the loop. Once the session is being
        dropped (these threads stopped, or the agent refuses: it stops, or
        the session is gone) nobody else will answer it - the kernel hands
        a notification out once, not again to the next agent - so the
        thread lets the kernel go on with it (CONTINUE: the container's own
        call; a grafted socket's is judged by the kernel guards) - except a
        trapped socket ioctl, which no guard judges: refused (ENOTTY)."""
        if not self._stop:
            if self.serve is None:
                self.inbox.forward(self.key, n)
                return
            try:
                if self.serve(self.key, n, listener):
                    return
            except Exception:           # noqa: BLE001 - answered below, then reported
                log.exception("%s pid %d: answering call %d failed", self.container, n.pid,
                              n.nr)
                _answer_quietly(listener, n.id, errno.EIO)
                raise
        _answer_quietly(listener, n.id, errno.ENOTTY if _unjudged(n) else 0)

    def stop(self, timeout: float = 2.0) -> None:
        """Interrupt the threads and join them for up to `timeout` s (each
        closes its own fd; 0: wake them and return - the agent's loop never
        waits for them)."""
        self._stop = True
        if self.table is not None:
            # from now on the native loop makes no socket (the agent may close
            # the guard map next): what it still receives goes to the loop
            self.table.configure(enabled=False, mark=self.mark, uid=-1)
        self._wake()
        if timeout > 0:
            self.join(time.monotonic() + timeout)

    def _wake(self) -> None:
        for t in self._threads:
            if t.is_alive():
                try:
                    signal.pthread_kill(t.ident, WAKE_SIGNAL)
                except ProcessLookupError:
                    pass

    def join(self, deadline: float) -> bool:
        """Wait (until the CLOCK_MONOTONIC `deadline`) for stopped threads to
        end, waking them again every 50 ms (a wake-up that lands outside
        NOTIF_RECV is not seen). A thread still answering a call finishes
        it first. True: all ended."""
        for t in self._threads:
            while t.is_alive() and time.monotonic() < deadline:
                self._wake()
                t.join(0.05)
            if t.is_alive():
                log.warning("%s: notifier thread %s did not stop", self.container, t.name)
        return self.alive == 0


def _unjudged(n: seccomp.Notification) -> bool:
    """A trapped call no kernel guard judges if the kernel runs it: a socket
    ioctl (model/ioctl.py) - never CONTINUEd."""
    return n.nr == seccomp.SYS_IOCTL and mioctl.trapped(n.args[1])


def _answer_quietly(listener: seccomp.Listener, nid: int, error: int = 0) -> None:
    """CONTINUE (error 0) or fail a call; nothing if it is gone meanwhile."""
    try:
        if error:
            listener.respond(nid, error=error)
        else:
            listener.continue_(nid)
    except KernelError:
        pass


def _hung_up(worker) -> bool:
    """Has the listener of a native worker reported POLLHUP (no task left)?"""
    return bool(ksock.ready(worker) & select.POLLHUP)
