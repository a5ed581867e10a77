"""Small helpers for the agent's single epoll loop."""

from __future__ import annotations

import logging
import os
import queue
import select
import signal
import socket
import threading
import time

log = logging.getLogger("sockgraft.agent")


def unregister(ep: select.epoll, fd: int) -> None:
    """Forget fd in ep; fine if it was never registered or is already closed."""
    try:
        ep.unregister(fd)
    except (KeyError, ValueError, OSError):
        pass


def listen_unix(path: str, backlog: int = 128) -> socket.socket:
    """A fresh non-blocking unix stream server socket at path, reachable by
    its owner (root) only; a stale socket file is replaced."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                        | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        srv.bind(path)
    finally:
        os.umask(old)
    srv.listen(backlog)
    return srv


class Closer:
    """Closes fds that may wait, in threads of its own: the agent's copy of a
    lingering socket whose application closed its fd meanwhile waits up to
    the SO_LINGER time in close(). A few threads (one waiting does not hold
    the next close), started when needed. A close that waits longer than
    `limit` seconds is interrupted (`wake` signal to its thread: the kernel's
    linger wait ends at a pending signal; the socket goes on closing as an
    orphan) - checked by sweep(), which the agent calls once a second - so a
    container cannot keep the threads, and the fds queued behind them,
    for good. Daemon threads: at the agent's exit the kernel closes what is
    left without lingering."""

    def __init__(self, threads: int = 4, *, limit: float = 2.0,
                 wake: int | None = None) -> None:
        self.max_threads = threads
        self.limit = limit
        self.wake = wake                  # a signal with a handler installed (None: never)
        self._q: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._threads = 0
        self._idle = 0
        self._busy: dict[int, float] = {}  # thread ident -> when its close began
        self.closed = 0                   # fds closed so far (for tests and stats)
        self.interrupted = 0              # closes cut short by the wake signal

    def close(self, fd: int) -> None:
        with self._lock:
            start = self._idle <= 0 and self._threads < self.max_threads
            if start:
                self._threads += 1
            else:
                self._idle -= 1           # an idle thread takes it, or it queues
            queued = -self._idle
        self._q.put(fd)
        if start:
            try:
                threading.Thread(target=self._run, name="sg-closer", daemon=True).start()
            except RuntimeError:          # (no thread to be had: close it here)
                with self._lock:
                    self._threads -= 1
                    self._idle -= 1
                self._take_one()
        elif queued > 0 and queued & (queued - 1) == 0:      # 1, 2, 4, ... queued
            log.warning("closer: %d threads wait in close() (SO_LINGER); %d fds queued",
                        self._threads, queued)

    def sweep(self, now: float) -> None:
        """Interrupt closes waiting longer than the limit."""
        if self.wake is None:
            return
        with self._lock:
            late = [t for t, since in self._busy.items() if now - since > self.limit]
        for ident in late:
            try:
                signal.pthread_kill(ident, self.wake)
                self.interrupted += 1
            except ProcessLookupError:
                pass

    def _take_one(self) -> None:
        fd = self._q.get()
        me = threading.get_ident()
        with self._lock:
            self._busy[me] = time.monotonic()
        try:
            os.close(fd)
        except OSError:
            pass
        finally:
            with self._lock:
                del self._busy[me]
                self.closed += 1
                self._idle += 1

    def _run(self) -> None:
        while True:
            self._take_one()
