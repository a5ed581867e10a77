"""Host sockets for grafting: inspect a target's socket (through a pidfd_getfd
duplicate), create its host twin, carry its options over.

Owns the option list that is copied, the reading of a target fd's flags, and
how a host socket is born (`HostSockets`): under its container's socket uid,
with its mark, tagged for the kernel guards before anybody else holds it.
Must not: decide whether to graft (model/graft) or talk to the notify fd.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import select
import socket
import stat
import struct
from typing import Callable

import _socket

from ..errors import from_oserror
from ..model.sockaddr import AF_INET, InetAddr

SOL_SOCKET = socket.SOL_SOCKET
SO_DOMAIN, SO_TYPE, SO_PROTOCOL, SO_MARK, SO_ERROR = 39, 3, 38, 36, 4
SO_SNDBUF, SO_RCVBUF = 7, 8
IPPROTO_IP, IPPROTO_TCP, IPPROTO_IPV6 = 0, 6, 41
IP_BIND_ADDRESS_NO_PORT = 24     # linux/in.h; also applies to AF_INET6 sockets
O_CLOEXEC = 0o2000000

# (level, option, size in bytes or 0 for int, families it applies to or None for all,
#  socket types or None for all). Options an application sets before connect()
# or bind() that change behaviour; each is copied only when it differs from a
# fresh host socket's value, so untouched defaults (and buffer autotuning) stay.
_I = 0
OPTIONS: tuple[tuple[int, int, int, tuple[int, ...] | None, tuple[int, ...] | None], ...] = (
    (SOL_SOCKET, 2, _I, None, None),            # SO_REUSEADDR
    (SOL_SOCKET, 15, _I, None, None),           # SO_REUSEPORT
    (SOL_SOCKET, 9, _I, None, None),            # SO_KEEPALIVE
    (SOL_SOCKET, 6, _I, None, (2,)),            # SO_BROADCAST
    # IP_TOS sets the priority too (rt_tos2priority): the TOS first, then
    # the priority the application ended up with
    (IPPROTO_IP, 1, _I, (socket.AF_INET,), None),     # IP_TOS
    (SOL_SOCKET, 12, _I, None, None),           # SO_PRIORITY
    (SOL_SOCKET, 10, _I, None, (1,)),           # SO_OOBINLINE
    (SOL_SOCKET, 13, 8, None, None),            # SO_LINGER (struct linger)
    (SOL_SOCKET, 18, _I, None, None),           # SO_RCVLOWAT
    (SOL_SOCKET, 20, 16, None, None),           # SO_RCVTIMEO_OLD (struct timeval)
    (SOL_SOCKET, 21, 16, None, None),           # SO_SNDTIMEO_OLD
    (SOL_SOCKET, SO_SNDBUF, _I, None, None),
    (SOL_SOCKET, SO_RCVBUF, _I, None, None),
    (IPPROTO_TCP, 1, _I, None, (1,)),           # TCP_NODELAY
    (IPPROTO_TCP, 4, _I, None, (1,)),           # TCP_KEEPIDLE
    (IPPROTO_TCP, 5, _I, None, (1,)),           # TCP_KEEPINTVL
    (IPPROTO_TCP, 6, _I, None, (1,)),           # TCP_KEEPCNT
    (IPPROTO_TCP, 18, _I, None, (1,)),          # TCP_USER_TIMEOUT
    (IPPROTO_TCP, 25, _I, None, (1,)),          # TCP_NOTSENT_LOWAT
    (IPPROTO_TCP, 9, _I, None, (1,)),           # TCP_DEFER_ACCEPT
    (IPPROTO_TCP, 13, 16, None, (1,)),          # TCP_CONGESTION (name)
    (IPPROTO_IP, 2, _I, (socket.AF_INET,), None),     # IP_TTL
    (IPPROTO_IP, 11, _I, (socket.AF_INET,), (2,)),    # IP_RECVERR
    (IPPROTO_IP, 8, _I, (socket.AF_INET,), (2,)),     # IP_PKTINFO
    (IPPROTO_IPV6, 26, _I, (socket.AF_INET6,), None),  # IPV6_V6ONLY
    (IPPROTO_IPV6, 67, _I, (socket.AF_INET6,), None),  # IPV6_TCLASS
    (IPPROTO_IPV6, 16, _I, (socket.AF_INET6,), None),  # IPV6_UNICAST_HOPS
    (IPPROTO_IPV6, 25, _I, (socket.AF_INET6,), (2,)),  # IPV6_RECVERR
    (IPPROTO_IPV6, 49, _I, (socket.AF_INET6,), (2,)),  # IPV6_RECVPKTINFO
)
_BUFFERS = {(SOL_SOCKET, SO_SNDBUF), (SOL_SOCKET, SO_RCVBUF)}
SO_PRIORITY = 12
# TC_PRIO_INTERACTIVE: the highest SO_PRIORITY a process may set without
# CAP_NET_RAW / CAP_NET_ADMIN. A container's root may set more on its own
# socket (its namespace, its veth: forwarding resets it); on the host socket
# the agent makes (as root) it would pick the host's egress traffic classes,
# so it is not carried over (the kernel guard refuses it on grafted sockets,
# bpf/sockgraft.bpf.c priority_allowed; _answer.c copies the same way).
PRIO_UNPRIVILEGED = 6


def _get(sock: socket.socket, level: int, opt: int, size: int):
    try:
        return sock.getsockopt(level, opt, size) if size else sock.getsockopt(level, opt)
    except OSError:
        return None


class OptionCopier:
    """Copies options that differ from a fresh socket's defaults. The options
    that apply to each (family, type, proto) and their defaults are computed
    once and cached: the per-graft cost is one getsockopt per applicable option."""

    def __init__(self) -> None:
        self._plans: dict[tuple[int, int, int], list[tuple[int, int, int, object]]] = {}

    def plan(self, family: int, type_: int, proto: int) -> list[tuple[int, int, int, object]]:
        key = (family, type_, proto)
        found = self._plans.get(key)
        if found is None:
            with socket.socket(family, type_, proto) as fresh:
                found = [(lvl, opt, size, _get(fresh, lvl, opt, size))
                         for lvl, opt, size, fams, types in OPTIONS
                         if (fams is None or family in fams) and (types is None or type_ in types)]
            self._plans[key] = found
        return found

    def copy(self, src: socket.socket, dst: socket.socket, family: int, type_: int,
             proto: int, container_buffers: dict[int, int] | None = None) -> int:
        """Returns how many options were set."""
        n = 0
        for lvl, opt, size, default in self.plan(family, type_, proto):
            val = _get(src, lvl, opt, size)
            if val is None or val == default:
                continue
            if (lvl, opt) == (SOL_SOCKET, SO_PRIORITY) and not 0 <= val <= PRIO_UNPRIVILEGED:
                continue
            if (lvl, opt) in _BUFFERS:
                # The kernel reports twice what was set; an unchanged container
                # default must not be pinned (that would disable autotuning).
                if container_buffers and container_buffers.get(opt) == val:
                    continue
                val //= 2
            try:
                dst.setsockopt(lvl, opt, val)
                n += 1
            except OSError:
                pass  # e.g. a congestion control not available on the host
        return n


_LINGER = struct.Struct("=ii")
_TCP_CLOSE, _TCP_LISTEN = 7, 10


def unlinger(sock: socket.socket) -> bool:
    """The agent's copy of a socket it has just replaced in the application
    (ADDFD over its fd): now likely the last reference. A TCP socket with
    SO_LINGER on whose close could wait (connected, data unsent) gets it
    off - its close would wait up to the linger time (INT_MAX seconds) in
    the agent's thread. The sockets the agent grafts are unconnected (never
    touched); a connected one is replaced only through calls that are
    errors on it (connect() again). True: turned off."""
    if not may_linger(sock):
        return False
    try:
        sock.setsockopt(SOL_SOCKET, socket.SO_LINGER, _LINGER.pack(0, 0))
        return True
    except OSError:
        return False            # not TCP, or gone: nothing waits


def may_linger(sock: socket.socket) -> bool:
    """Could a close of this socket wait (SO_LINGER on with a time, TCP not
    closed or listening)? Its close is the one to keep off the agent's loop."""
    try:
        on, secs = _LINGER.unpack(sock.getsockopt(SOL_SOCKET, socket.SO_LINGER, _LINGER.size))
        if not (on and secs):
            return False
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] not in (
            _TCP_CLOSE, _TCP_LISTEN)
    except OSError:
        return False


class TargetSocket(socket.socket):
    """The agent's copy of a target's socket (pidfd_getfd). Were the copy
    the last reference (the application closed its fd meanwhile), its
    close would wait for the application's SO_LINGER: the close goes through
    `around_close(sock, close)` (the agent: outside its loop lock in a
    notifier thread, in a closer thread for the loop), and a copy whose
    socket the agent replaced is unlingered first."""

    __slots__ = ()
    around_close: Callable[["TargetSocket", Callable[[], None]], None] | None = None

    def close(self) -> None:
        hook = TargetSocket.around_close
        if hook is None or self.fileno() < 0:
            super().close()
        else:
            hook(self, super().close)


def adopt(fd: int) -> socket.socket:
    """Wrap a copy of a target's socket fd we own (from pidfd_getfd) as a
    socket object (TargetSocket)."""
    return TargetSocket(fileno=fd)


def info(sock: socket.socket) -> tuple[int, int, int, int]:
    """(family, type, protocol, mark) of a socket."""
    return (sock.getsockopt(SOL_SOCKET, SO_DOMAIN), sock.getsockopt(SOL_SOCKET, SO_TYPE),
            sock.getsockopt(SOL_SOCKET, SO_PROTOCOL), sock.getsockopt(SOL_SOCKET, SO_MARK))


def v6only(sock: socket.socket) -> bool:
    """IPV6_V6ONLY of an AF_INET6 socket."""
    try:
        return bool(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY))
    except OSError:
        return False


def file_nonblocking(fd: int) -> bool:
    return bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)


def target_fd_cloexec(tid: int, fd: int) -> bool:
    """Close-on-exec is a per-fd-table flag, not visible through a dup: read
    it from /proc/<tid>/fdinfo/<fd> (its second line is "flags:\t0NNNNNN")."""
    try:
        f = os.open(f"/proc/{tid}/fdinfo/{fd}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        data = os.read(f, 256)
    finally:
        os.close(f)
    i = data.find(b"flags:")
    if i < 0:
        return False
    try:
        return bool(int(data[i + 6:data.index(b"\n", i)], 8) & O_CLOEXEC)
    except ValueError:
        return False


_LIBC = ctypes.CDLL(None, use_errno=True)
_AS_ROOT = os.geteuid() == 0


def fsuid_for(mark: int) -> int:
    """The fsuid to create a container's host sockets under, -1 when this
    process cannot switch (not root: its own uid owns them)."""
    return socket_uid(mark) if _AS_ROOT else -1


def socket_uid(mark: int) -> int:
    """The uid that owns a container's host sockets (sk_uid). The kernel joins
    sockets into one SO_REUSEPORT group only if they have the same owner: with
    one uid per container, no container shares a port with another container
    or with a root service of the host. The mark's value, so `ss -e` shows
    which container a socket belongs to."""
    return mark


class HostSockets:
    """Makes the host sockets of grafted containers. Each one is created under
    its container's socket uid (setfsuid: per thread, so the notifier threads
    and the loop never see each other's), carries the container's mark and,
    when the kernel guards run (`tag`, kernel/bpf.Programs.tag), is tagged
    before any container process can hold it. Thread-safe."""

    def __init__(self, tag: Callable[[int, int, int], None] | None = None) -> None:
        self.tag = tag

    def make(self, family: int, typ: int, proto: int, mark: int,
             flags: int = 0) -> _socket.socket:
        """typ may carry SOCK_NONBLOCK/SOCK_CLOEXEC; raises KernelError with
        the errno to answer (the socket is never half-made: closed on any
        failure)."""
        try:
            if _AS_ROOT:
                old = _LIBC.setfsuid(socket_uid(mark))
                try:
                    s = _socket.socket(family, typ, proto)
                finally:
                    _LIBC.setfsuid(old)
            else:
                s = _socket.socket(family, typ, proto)
        except OSError as exc:
            raise from_oserror("host socket", exc, f"family {family} type {typ:#x}") from None
        try:
            s.setsockopt(SOL_SOCKET, SO_MARK, mark)
            if self.tag is not None:
                self.tag(s.fileno(), mark, flags)
        except OSError as exc:
            s.close()
            raise from_oserror("mark host socket", exc, f"mark {mark:#x}") from None
        except BaseException:
            s.close()
            raise
        return s

    def native_tag(self, mark: int) -> tuple[int, int] | None:
        """(sg_sock map fd, generation of mark) for a tagger that is not
        Python (the native answer loop); (-1, 0) when no kernel guards run;
        None when the tagger cannot say (then nothing but `make` may create
        sockets)."""
        if self.tag is None:
            return -1, 0
        params = self._programs("tag_params")
        return params(mark) if params is not None else None

    def native_born(self) -> int:
        """The sg_born map fd a native loop may mark and tag its host sockets
        through at birth (kernel/bpf.Programs.born_fd), -1: none."""
        born = self._programs("born_fd")
        return born() if born is not None else -1

    def _programs(self, name: str):
        """Method `name` of the object whose bound method `tag` is (the
        loaded kernel/bpf.Programs), or None."""
        return getattr(getattr(self.tag, "__self__", None), name, None)

    def host_socket(self, family: int, type_: int, proto: int, mark: int,
                    flags: int = 0) -> socket.socket:
        """A non-blocking, close-on-exec host socket for the agent's loop."""
        s = self.make(family, type_ | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC, proto,
                      mark, flags)
        return socket.socket(fileno=s.detach())


_LIBC.listen.argtypes = [ctypes.c_int, ctypes.c_int]


def listen(sock: socket.socket, backlog_register: int) -> int:
    """listen() with the backlog exactly as the application passed it (the
    low 32 bits of its register, an int: the kernel caps it, negative
    included, at somaxconn; Python's listen() would turn a negative one into
    0). Returns 0 or the errno."""
    b = backlog_register & 0xFFFFFFFF
    if b >= 1 << 31:
        b -= 1 << 32
    if _LIBC.listen(sock.fileno(), b) == 0:
        return 0
    return ctypes.get_errno()


def sockaddr_tuple(addr: InetAddr) -> tuple:
    if addr.family == AF_INET:
        return (str(addr.ip), addr.port)
    return (str(addr.ip), addr.port, addr.flowinfo, addr.scope_id)


def set_blocking(sock: socket.socket, blocking: bool) -> None:
    flags = fcntl.fcntl(sock.fileno(), fcntl.F_GETFL)
    new = flags & ~os.O_NONBLOCK if blocking else flags | os.O_NONBLOCK
    if new != flags:
        fcntl.fcntl(sock.fileno(), fcntl.F_SETFL, new)


def so_error(sock: socket.socket) -> int:
    return sock.getsockopt(SOL_SOCKET, SO_ERROR)


def ready(fd, events: int = select.POLLIN, timeout: float = 0.0) -> int:
    """poll() one fd (a number or anything with fileno()): the events it
    reports within `timeout` seconds, 0 if none. (select.select refuses fds
    past 1023, which an agent serving many containers holds.)"""
    p = select.poll()
    p.register(fd, events)
    got = p.poll(max(0, int(timeout * 1000)))
    return got[0][1] if got else 0



FIONREAD = 0x541B           # = SIOCINQ
F_GETPIPE_SZ = 1032


def _fionread(fd: int) -> int:
    return int.from_bytes(fcntl.ioctl(fd, FIONREAD, b"\0\0\0\0"), "little", signed=True)


SO_COOKIE = 57


def cookie(sock: socket.socket) -> int:
    """The socket's cookie (SO_COOKIE: unique while the kernel runs; what
    a sockhash lookup from user space returns)."""
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")


def inq(sock: socket.socket) -> int:
    """Bytes waiting to be read (SIOCINQ; for a socket in a sockhash -
    tcp_bpf - the bytes in its psock queue only)."""
    return _fionread(sock.fileno())


def empty_pipe_room(fd: int) -> int | None:
    """The size of the pipe at fd when it holds nothing (0: it holds
    something), None when fd is no pipe."""
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        return None
    return 0 if _fionread(fd) else fcntl.fcntl(fd, F_GETPIPE_SZ)
