"""The agent's handles on trapped threads: one cache per thread id of its
pidfd (to copy its fds) and its /proc/TID/mem reader (to read the sockaddr
it passed), bounded, forgotten together when the thread exits.

Errors: EBADF from a target fd is the application's (`dup_socket` returns the
errno the kernel would answer); a target that is gone raises NotFound."""

from __future__ import annotations

import errno
import os
import socket

from ..errors import KernelError, NotFound
from ..kernel import seccomp
from ..kernel import sockets as ksock

MAX_THREADS = 256


class Targets:
    def __init__(self, max_threads: int = MAX_THREADS) -> None:
        self.max_threads = max_threads
        self.mem = seccomp.TargetMemory(max_entries=max_threads)
        self.pidfds: dict[int, int] = {}                # tid -> pidfd (small LRU)

    def pidfd(self, tid: int) -> int:
        pidfd = self.pidfds.get(tid)
        if pidfd is not None:
            return pidfd
        if len(self.pidfds) >= self.max_threads:
            self._close_pidfd(next(iter(self.pidfds)))
        pidfd = seccomp.pidfd_open(tid)
        self.pidfds[tid] = pidfd
        return pidfd

    def getfd(self, tid: int, fd: int) -> int:
        """A copy of the thread's fd (pidfd_getfd). Raises KernelError (EBADF:
        no such fd) or NotFound (the thread is gone)."""
        for attempt in (1, 2):
            pidfd = self.pidfd(tid)
            try:
                return seccomp.pidfd_getfd(pidfd, fd)
            except KernelError as exc:
                if exc.errno == errno.EBADF:
                    raise
                self._close_pidfd(tid)
                # ESRCH from a cached pidfd: that task exited and its tid now
                # belongs to the task that trapped (id_valid said it waits): retry
                # once with a fresh pidfd. ESRCH again: the target is gone.
                if exc.errno != errno.ESRCH:
                    raise
                if attempt == 2:
                    raise NotFound("pidfd_getfd", exc.errno, f"tid {tid}") from None
        raise AssertionError("unreachable")

    def dup_socket(self, tid: int, fd: int) -> socket.socket | int:
        """The thread's socket at fd, or the errno the kernel would answer
        (EBADF: no such fd, ENOTSOCK: not a socket)."""
        try:
            newfd = self.getfd(tid, fd)
        except KernelError as exc:
            if exc.errno == errno.EBADF:
                return errno.EBADF
            raise
        try:
            return ksock.adopt(newfd)
        except OSError:
            os.close(newfd)
            return errno.ENOTSOCK

    def read(self, tid: int, ptr: int, size: int) -> bytes:
        return self.mem.read(tid, ptr, size)

    def forget(self, tid: int) -> None:
        self.mem.forget(tid)
        self._close_pidfd(tid)

    def exited(self, tids: set[int]) -> list[int]:
        """Those of tids whose cached pidfd says the thread exited, or whose
        pidfd left the cache (forgotten: a container churning threads must
        not grow the set its session keeps)."""
        untracked = [t for t in tids if t not in self.pidfds and not self.mem.holds(t)]
        gone = [t for t in tids if t in self.pidfds and
                ksock.ready(self.pidfds[t])]
        for t in gone:
            self.forget(t)
        return gone + untracked

    def _close_pidfd(self, tid: int) -> None:
        pidfd = self.pidfds.pop(tid, None)
        if pidfd is not None:
            os.close(pidfd)

    def close(self) -> None:
        for pidfd in self.pidfds.values():
            os.close(pidfd)
        self.pidfds.clear()
        self.mem.close()
