"""Carry a target's epoll registrations over to the socket that replaces one.

An application may add a socket to epoll *before* connect()/bind() (nginx does
for upstream connections). Replacing the fd with SECCOMP_IOCTL_NOTIF_ADDFD
releases the old file and with it every epoll item on it; the new host socket
would never be watched. This module finds the target's epoll instances that
watch the fd (from /proc/TID/fdinfo, before the swap) and, after the swap,
adds the new socket to each with the same events and data.

An epoll item is keyed by (file, fd number): for the application's later
EPOLL_CTL_MOD/DEL to find it, it must be added under the application's fd
number. The agent's own fd table cannot offer that number, so a short-lived
forked child does it: it dup2()s the host socket to that number in its own
(disposable) table and calls epoll_ctl on a pidfd_getfd copy of the target's
epoll fd. Costs a fork, so only sockets that were really registered pay it.
"""

from __future__ import annotations

import ctypes
import os
import struct
import time

from . import seccomp

EPOLL_CTL_ADD = 1
_EVENT = struct.Struct("=IQ")        # struct epoll_event is packed on x86_64
_EVENTPOLL = "anon_inode:[eventpoll]"

_libc = ctypes.CDLL(None, use_errno=True)
_libc.epoll_ctl.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_char_p]


class EpollIndex:
    """Which fds of a process are epoll instances, cached per process for a
    second (listing /proc/PID/fd costs one readlink per fd)."""

    def __init__(self, ttl: float = 1.0, max_procs: int = 1024) -> None:
        self.ttl = ttl
        self.max_procs = max_procs
        self._cache: dict[int, tuple[float, tuple[int, ...]]] = {}

    def epoll_fds(self, tid: int) -> tuple[int, ...]:
        now = time.monotonic()
        hit = self._cache.get(tid)
        if hit and now - hit[0] < self.ttl:
            return hit[1]
        found = []
        try:
            names = os.listdir(f"/proc/{tid}/fd")
        except OSError:
            names = []
        for name in names:
            try:
                if os.readlink(f"/proc/{tid}/fd/{name}") == _EVENTPOLL:
                    found.append(int(name))
            except OSError:
                continue
        if len(self._cache) >= self.max_procs:
            self._cache.clear()
        self._cache[tid] = (now, tuple(found))
        return tuple(found)

    def forget(self, tid: int) -> None:
        self._cache.pop(tid, None)


def watchers(tid: int, fd: int, index: EpollIndex) -> list[tuple[int, int, int]]:
    """(epoll fd, events, data) of every epoll instance of tid's process
    that watches fd. Must be read before the fd is replaced."""
    out = []
    for epfd in index.epoll_fds(tid):
        try:
            with open(f"/proc/{tid}/fdinfo/{epfd}", "rb") as f:
                text = f.read()
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


def reregister(pidfd: int, sock_fd: int, app_fd: int,
               items: list[tuple[int, int, int]]) -> bool:
    """Add sock_fd, under the number app_fd, to each target epoll instance."""
    if not items:
        return True
    pid = os.fork()
    if pid == 0:   # disposable child: its fd table may be rearranged freely
        code = 0
        try:
            for epfd, events, data in items:
                ep = seccomp.pidfd_getfd(pidfd, epfd)
                if ep == app_fd:
                    ep = os.dup(ep)
                if sock_fd != app_fd:
                    os.dup2(sock_fd, app_fd, inheritable=False)
                if _libc.epoll_ctl(ep, EPOLL_CTL_ADD, app_fd, _EVENT.pack(events, data)) != 0:
                    code = 1
        except BaseException:  # noqa: BLE001 - report through the exit status
            code = 2
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 0
