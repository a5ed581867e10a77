"""Carry a target's epoll registrations over to the socket that replaces one.

An application may add a socket to epoll *before* connect()/bind() (nginx does
for upstream connections). Replacing the fd with SECCOMP_IOCTL_NOTIF_ADDFD
releases the old file and with it every epoll item on it; the new host socket
would never be watched. This module finds the target's epoll instances that
watch the fd (from /proc/TID/fdinfo, before the swap) and, after the swap,
adds the new socket to each with the same events and data.

An epoll item is keyed by (file, fd number): for the application's later
EPOLL_CTL_MOD/DEL to find it, it must be added under the application's fd
number. The agent's own fd table cannot offer that number, so a helper
process does it (`Reregistrar`): the agent sends it the host socket and
pidfd_getfd copies of the target's epoll fds over a SOCK_SEQPACKET pair; it
dup2()s the socket to that number in its own, otherwise empty fd table,
calls epoll_ctl, closes everything it got and answers one byte. The helper
is spawned once (a small `python -I -S` process, never a fork of the
threaded agent) and respawned if it dies; one re-registration costs the
agent a round trip of about 50 us instead of a fork + waitpid of the whole
agent (~1 ms and rising with its size).
"""

from __future__ import annotations

import array
import logging
import os
import socket
import struct
import subprocess
import sys
import time

from ..errors import KernelError
from . import seccomp, sockets

log = logging.getLogger("sockgraft.epollfix")

_EVENT = struct.Struct("=IQ")        # struct epoll_event is packed on x86_64
_EVENTPOLL = "anon_inode:[eventpoll]"


SETTLE_NS = 50_000_000       # the instance is made after the agent's CONTINUE
# bounds of one look (under the agent's lock): fds listed, epoll instances
# read, bytes of one instance's fdinfo (about 80 a watched fd)
SCAN_MAX = 16384
MAX_EPOLLS = 64
FDINFO_MAX = 1 << 20


class EpollIndex:
    """Which fds of a process are epoll instances, cached per process for a
    second (listing /proc/PID/fd costs one readlink per fd), and never
    across an epoll_create(1) of its session (made_ns: Session.epoll_made; a
    list read within SETTLE_NS after one is used once, not kept: the kernel
    may not have made the instance yet)."""

    def __init__(self, ttl: float = 1.0, max_procs: int = 1024) -> None:
        self.ttl = ttl
        self.max_procs = max_procs
        self._cache: dict[int, tuple[float, tuple[int, ...]]] = {}

    def epoll_fds(self, tid: int, made: int = 0) -> tuple[int, ...]:
        now = time.monotonic()
        hit = self._cache.get(tid)
        if hit and now - hit[0] < self.ttl and hit[0] * 1e9 > made + SETTLE_NS:
            return hit[1]
        found = []
        try:
            with os.scandir(f"/proc/{tid}/fd") as it:
                for n, entry in enumerate(it):
                    if n >= SCAN_MAX or len(found) >= MAX_EPOLLS:
                        # a process with more (one that hopes to hold the
                        # agent's loop with a scan): what was found so far
                        log.info("pid %d: more than %d fds or %d epoll instances: "
                                    "epoll registrations beyond them are not carried "
                                    "over a graft", tid, SCAN_MAX, MAX_EPOLLS)
                        break
                    try:
                        if os.readlink(entry.path) == _EVENTPOLL:
                            found.append(int(entry.name))
                    except (OSError, ValueError):
                        continue
        except OSError:
            pass
        if len(self._cache) >= self.max_procs:
            self._cache.clear()
        if now * 1e9 > made + SETTLE_NS:
            self._cache[tid] = (now, tuple(found))
        else:
            self._cache.pop(tid, None)
        return tuple(found)

    def forget(self, tid: int) -> None:
        self._cache.pop(tid, None)


def watchers(tid: int, fd: int, index: EpollIndex,
             made: int = 0) -> list[tuple[int, int, int]]:
    """(epoll fd, events, data) of every epoll instance of tid's process
    that watches fd (made: its session's last epoll_create, CLOCK_MONOTONIC
    ns). Must be read before the fd is replaced."""
    out = []
    for epfd in index.epoll_fds(tid, made):
        try:
            with open(f"/proc/{tid}/fdinfo/{epfd}", "rb") as f:
                text = f.read(FDINFO_MAX)
        except OSError:
            continue
        for line in text.splitlines():
            if not line.startswith(b"tfd:"):
                continue
            parts = line.split()
            # tfd: N events: HEX data: HEX pos:.. ino:.. sdev:..
            try:
                if int(parts[1]) == fd:
                    out.append((epfd, int(parts[3], 16), int(parts[5], 16)))
            except (IndexError, ValueError):
                continue
    return out


_HEADER = struct.Struct("=iI")      # app fd, number of epoll items
MAX_ITEMS = 32                      # epoll instances of one process watching one fd
REPLY_TIMEOUT = 2.0

# The helper's whole program. Its fd table holds its end of the pair (moved
# out of the way when a request needs its number) and, per request, what the
# request carried; nothing else, so any application fd number can be used.
_HELPER = r"""
import array, ctypes, fcntl, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p]
HEADER, EVENT = struct.Struct("=iI"), struct.Struct("=IQ")
ctl = socket.socket(fileno=int(sys.argv[1]))

def away(fd, number):
    if fd != number:
        return fd
    moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, number + 1)
    os.close(fd)
    return moved

while True:
    try:
        msg, anc, _, _ = ctl.recvmsg(4096, socket.CMSG_SPACE(4 * 64))
    except OSError:
        break
    if not msg:
        break                      # the agent is gone
    fds = array.array("i")
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
    fds = list(fds)
    ok = 1
    try:
        app, n = HEADER.unpack_from(msg)
        if len(fds) == n + 1 and len(msg) == HEADER.size + n * EVENT.size and app >= 0:
            if ctl.fileno() == app:
                ctl = socket.socket(fileno=away(ctl.detach(), app))
            fds = [away(fd, app) for fd in fds]
            if fds[0] != app:
                os.dup2(fds[0], app, inheritable=False)
            ok = 0
            for i, ep in enumerate(fds[1:]):
                if libc.epoll_ctl(ep, 1, app, msg[HEADER.size + i * EVENT.size:
                                                  HEADER.size + (i + 1) * EVENT.size]) != 0:
                    ok = 1
            os.close(app)
    except (OSError, struct.error):
        ok = 1
    for fd in fds:
        try:
            os.close(fd)
        except OSError:
            pass
    ctl.send(bytes([ok]))
"""


class Reregistrar:
    """The agent's side of the helper process (spawned on first use)."""

    def __init__(self) -> None:
        self._proc: subprocess.Popen | None = None
        self._sock: socket.socket | None = None
        self.spawned = 0
        self.helper_fd = -1         # the helper's end's number (the same in its table)

    def _spawn(self) -> socket.socket:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.helper_fd = theirs.fileno()
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HELPER, str(theirs.fileno())],
                pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL, close_fds=True)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        self.spawned += 1
        return ours

    def warm(self) -> None:
        """Spawn the helper now (the agent's start), not on the first use."""
        if self._sock is None:
            self._spawn()

    def reregister(self, pidfd: int, sock_fd: int, app_fd: int,
                   items: list[tuple[int, int, int]]) -> bool:
        """Add sock_fd, under the number app_fd, to each of the target's
        epoll instances in `items` ((epoll fd, events, data) as `watchers`
        found them). False if any could not be added."""
        if not items:
            return True
        if len(items) > MAX_ITEMS:
            return False
        eps: list[int] = []
        try:
            for epfd, _, _ in items:
                eps.append(seccomp.pidfd_getfd(pidfd, epfd))
            msg = _HEADER.pack(app_fd, len(items)) + b"".join(
                _EVENT.pack(events, data) for _, events, data in items)
            sock = self._sock or self._spawn()
            sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                  array.array("i", [sock_fd, *eps]))])
            if not sockets.ready(sock, timeout=REPLY_TIMEOUT):
                raise TimeoutError("epoll helper did not answer")
            reply = sock.recv(16)
            if not reply:
                raise ConnectionError("epoll helper exited")
            return reply == b"\0"
        except KernelError as exc:
            log.info("epoll re-registration: %s", exc)     # the target's epoll fd is gone
            return False
        except OSError as exc:
            log.warning("epoll helper failed, starting a new one: %s", exc)
            self.close()
            return False
        finally:
            for fd in eps:
                os.close(fd)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()      # the helper reads EOF and exits
            self._sock = None
        if self._proc is not None:
            try:
                self._proc.wait(1)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
            self._proc = None
