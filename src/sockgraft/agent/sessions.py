"""The session table: one session per registered process tree (one seccomp
listener), found by its key (the listener fd) or by its container mark, and
the notifier threads that serve a session's listener, owned here with it.

Touched only by the loop thread; the notifier threads read a session's
attributes (never the table)."""

from __future__ import annotations

import logging
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Iterator

from ..kernel import seccomp
from ..model import graft
from ..model.redirect import PortMap
from . import notifiers
from .inventory import Counters

log = logging.getLogger("sockgraft.agent")


@dataclass
class Session:
    """One registered process tree (one seccomp listener)."""
    container: str
    pid: int
    listener: seccomp.Listener
    mark: int
    config: graft.GraftConfig | None
    buffers: dict[int, int]                 # container defaults of SO_SNDBUF/SO_RCVBUF
    conn: socket.socket | None = None       # the launcher's control connection
    counters: Counters = field(default_factory=Counters)
    tids: set[int] = field(default_factory=set)   # threads we cached pidfd/mem fds for
    graft_at: str = "syscall"               # what the process's filter traps
    addresses: tuple[str, ...] = ()         # the container's own (overlay) addresses
    inline: graft.GraftConfig | None = None  # from OCI annotations (the store wins)
    loop_serves: bool = True                # the loop receives its notifications (False
                                            # while notifier threads alone do)
    ports: tuple[PortMap, ...] = ()         # its published ports (lab, CNI portMappings)
    traps_splice: bool = False              # its filter traps splice(): may be spliced
    epoll_made_ns: int = 0                  # its last one the Python grafter answered
    native_table: object | None = None      # its native loop's Table (which notes its own)
    # sockets the agent made in its network namespace(s) to answer socket
    # ioctls of grafted sockets: (netns inode, family) -> socket; closed
    # with the session (agent/ioctls.py)
    ioctl_socks: dict = field(default_factory=dict)

    def note_epoll_made(self) -> None:
        """The session made an epoll instance: the lists of its processes'
        epoll fds read before are old (the native loop's too)."""
        self.epoll_made_ns = time.monotonic_ns()
        if self.native_table is not None:
            self.native_table.note_epoll_made()

    def epoll_made(self) -> int:
        """CLOCK_MONOTONIC ns of its last epoll_create(1) (0: none, or its
        filter does not trap them)."""
        t = self.native_table
        return max(self.epoll_made_ns, t.epoll_made_ns() if t is not None else 0)


def _count(inventory, sess: Session, delta: dict[str, int]) -> None:
    """A native loop's counts since the last harvest, into the inventory."""
    if delta:
        inventory.add(sess, "grafted", delta["tcp"] + delta["udp"])
        inventory.add(sess, "by_native", delta["tcp"] + delta["udp"])
        inventory.add(sess, "passed", delta["continued"])
        inventory.add(sess, "errors", delta["refused"])


class SessionTable:
    def __init__(self) -> None:
        self._by_key: dict[int, Session] = {}
        self._threads: dict[int, notifiers.Notifiers] = {}
        # threads of sessions that ended, still finishing (stop() does not
        # wait): what they answered last is counted once they are done
        self._ending: list[tuple[Session, notifiers.Notifiers]] = []

    def add(self, key: int, sess: Session,
            threads: notifiers.Notifiers | None = None) -> None:
        self._by_key[key] = sess
        if threads is not None:
            self._threads[key] = threads
            sess.loop_serves = False

    def set_threads(self, key: int, threads: notifiers.Notifiers) -> None:
        self._threads[key] = threads
        self._by_key[key].loop_serves = False

    def pop(self, key: int) -> tuple[Session, notifiers.Notifiers | None]:
        """Take a session (and its threads, still running) out of the table."""
        sess, threads = self._by_key.pop(key), self._threads.pop(key, None)
        if threads is not None and threads.table is not None:
            self._ending.append((sess, threads))
        return sess, threads

    def get(self, key: int) -> Session | None:
        return self._by_key.get(key)

    def __getitem__(self, key: int) -> Session:
        return self._by_key[key]

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def __iter__(self) -> Iterator[int]:
        return iter(self._by_key)

    def __len__(self) -> int:
        return len(self._by_key)

    def keys(self) -> list[int]:
        return list(self._by_key)

    def values(self):
        return self._by_key.values()

    def items(self):
        return self._by_key.items()

    def by_mark(self, mark: int) -> Session | None:
        return next((s for s in self._by_key.values() if s.mark == mark), None)

    def holds(self, mark: int) -> bool:
        """Does a live session carry this mark (its config may be deleted while
        it runs)? Such a mark is not handed to another container."""
        return self.by_mark(mark) is not None

    def all_threads(self) -> list[notifiers.Notifiers]:
        """Every session's notifier threads, those of ended sessions still
        finishing included."""
        return list(self._threads.values()) + [t for _, t in self._ending]

    def threads_of(self, key: int) -> notifiers.Notifiers | None:
        return self._threads.get(key)

    def native(self, key: int) -> bool:
        """Does the native loop answer this session's socket()?"""
        threads = self._threads.get(key)
        return threads is not None and threads.table is not None

    def threads_alive(self, key: int) -> int:
        threads = self._threads.get(key)
        return threads.alive if threads is not None else 0

    def takeover(self, key: int, ep, inventory, failed: notifiers.ThreadFailed) -> None:
        """A notifier thread of this session ended unexpectedly: the loop
        receives the listener's notifications too (the surviving threads keep
        going; each notification goes to one receiver), so none waits."""
        sess = self._by_key[key]
        inventory.count(sess, "notifier_failures")
        if not sess.loop_serves:
            sess.loop_serves = True
            try:
                ep.modify(key, select.EPOLLIN)
            except OSError as exc:
                log.error("%s: cannot serve the listener from the loop: %s", sess.container,
                          exc)
                return
            log.warning("%s: the loop now answers this container's notifications (%s: %s)",
                        sess.container, failed.thread, failed.error)

    # --- the native answer loop --------------------------------------------------

    def refresh_native(self) -> None:
        """Every native loop takes its session's configuration now in force."""
        for threads in self._threads.values():
            threads.refresh()

    def natively_served(self) -> dict[int, tuple[str, int]]:
        """{mark: (container, pid)} of sessions whose socket() the native loop
        answers: their sockets have no record (found on demand)."""
        return {self._by_key[k].mark: (self._by_key[k].container, self._by_key[k].pid)
                for k, t in self._threads.items() if t.table is not None and k in self._by_key}

    def harvest(self, inventory) -> None:
        """Count what the native loops answered since the last harvest."""
        for key, threads in self._threads.items():
            sess = self._by_key.get(key)
            if sess is not None:
                _count(inventory, sess, threads.harvest())
        # a native answer's count comes after the answer: the application may
        # have exited and its session ended before it (seen: a graft missing
        # from the totals); the threads are harvested until they are done
        ending, self._ending = self._ending, []
        for sess, threads in ending:
            done = threads.alive == 0
            _count(inventory, sess, threads.harvest())
            if not done:
                self._ending.append((sess, threads))
