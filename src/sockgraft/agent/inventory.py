"""What the agent has done, for `sockgraft stats`, `sockgraft sockets` and
the audit log: counters per container and in total, one record per grafted
socket (cheap to make on the hot path; its process and addresses are read
from the kernel when somebody lists them), and the audit writer.

Touched only by the loop thread (the notifier threads hand their answers
over through the inbox; `socket_answered` turns them into records here)."""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass

from ..errors import KernelError
from ..kernel import seccomp
from ..kernel import sockets as ksock
from . import notifiers
from .audit import AuditLog
from .procfs import netns_of, pids_in_netns, socket_fds, socket_open, tgid

log = logging.getLogger("sockgraft.agent")

MAX_RECORDS = 65536     # grafted sockets recorded for `sockgraft sockets` before pruning


@dataclass
class Counters:
    grafted: int = 0
    passed: int = 0
    denied: int = 0
    errors: int = 0
    notifier_failures: int = 0              # notifier threads that ended unexpectedly
    by_native: int = 0                      # of grafted: by the native loop (socket, connect)

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(slots=True)
class GraftedSocket:
    container: str
    pid: int
    fd: int
    inode: int
    proto: str
    kind: str            # "ingress" | "egress" | "sendto" | "socket"
    endpoint: str
    local: str
    remote: str
    since: float


class Inventory:
    def __init__(self) -> None:
        self.totals = Counters()
        self.grafted: dict[tuple[int, int], GraftedSocket] = {}   # (tid, fd) -> record
        self.audit: AuditLog | None = None
        self.denials: dict[tuple[str, str, str], int] = {}   # (syscall, rule, where) -> n

    # --- counters ----------------------------------------------------------------

    def count(self, sess, what: str) -> None:
        """One more `what` (a Counters field) for the session and in total."""
        self.add(sess, what, 1)

    def add(self, sess, what: str, n: int) -> None:
        """n more `what` at once (the native loop's counts, harvested)."""
        if n:
            setattr(sess.counters, what, getattr(sess.counters, what) + n)
            setattr(self.totals, what, getattr(self.totals, what) + n)

    def deny(self, sess, syscall: str, rule: str, where: str = "agent") -> None:
        """One denial: counted for the session (None: its container is not
        registered here) and by rule (the metrics' labels: rule names only)."""
        if sess is not None:
            self.count(sess, "denied")
        else:
            self.totals.denied += 1
        key = (syscall, rule, where)
        self.denials[key] = self.denials.get(key, 0) + 1

    def graft(self, sess, record: GraftedSocket | None) -> None:
        self.count(sess, "grafted")
        if record is not None:
            self.grafted[(record.pid, record.fd)] = record

    def socket_answered(self, sess, packed: int) -> None:
        """A socket() a notifier thread answered (notifiers.pack_answer)."""
        a = notifiers.unpack_answer(packed)
        self.graft(sess, GraftedSocket(sess.container, a.tid, a.fd, a.inode, a.proto,
                                       "socket", "", "", "", time.time()))

    @staticmethod
    def record(container: str, tid: int, fd: int, proto: str, kind: str, endpoint: str,
               host: socket.socket, remote: str) -> GraftedSocket:
        """What `sockgraft sockets` shows. Cheap on purpose (one fstat): the
        process id and the addresses are resolved when somebody lists them."""
        return GraftedSocket(container, tid, fd, os.fstat(host.fileno()).st_ino, proto, kind,
                             endpoint, "", remote, time.time())

    # --- the audit log ------------------------------------------------------------

    def write_audit(self, container: str, pid: int, name: str, addr: object, verdict: str,
                    rule: str, errno_: int = 0, where: str = "agent") -> None:
        if self.audit is not None:
            self.audit.write(container, pid, name, addr, verdict, rule, errno_, where)

    # --- records ------------------------------------------------------------------

    def forget_exited(self, container: str) -> None:
        """Drop the records of a container's processes that exited."""
        for key in [k for k, g in self.grafted.items() if g.container == container
                    and not os.path.exists(f"/proc/{g.pid}")]:
            del self.grafted[key]

    def prune(self, limit: int = MAX_RECORDS) -> int:
        """Past `limit` records (a container grafting sockets at ever new fd
        numbers grows the table until somebody lists it): the records of
        sockets closed since go, then the oldest down to 90% of the limit.
        Returns how many went."""
        if len(self.grafted) <= limit:
            return 0
        before = len(self.grafted)
        for key, g in list(self.grafted.items()):
            if not socket_open(tgid(g.pid), g.fd, g.inode):
                del self.grafted[key]
        keep = limit * 9 // 10      # (room: not a walk of them all at every sweep)
        if len(self.grafted) > keep:
            log.warning("more than %d grafted sockets open: the oldest records leave "
                        "`sockgraft sockets`", keep)
            for key in list(self.grafted)[:len(self.grafted) - keep]:
                del self.grafted[key]
        return before - len(self.grafted)

    def compact(self) -> None:
        if len(self.grafted) < 64:
            self.grafted = dict(self.grafted)   # a dict never shrinks in place

    def list_sockets(self, native: dict[int, tuple[str, int]] | None = None) -> list[dict]:
        """Grafted sockets still open in their process (checked now via /proc),
        with their process id and current addresses. native: {mark:
        (container, pid)} of sessions whose socket() the native loop answers -
        it keeps no record per socket: theirs are found now (native_sockets)."""
        out = self._recorded()
        if native:
            out += native_sockets(native, {row["inode"] for row in out})
        return out

    def _recorded(self) -> list[dict]:
        out = []
        for key, g in list(self.grafted.items()):
            pid = tgid(g.pid)
            if not socket_open(pid, g.fd, g.inode):
                del self.grafted[key]
                continue
            row = {f: getattr(g, f) for f in g.__slots__}
            row["pid"] = pid
            row["local"], peer = addresses(pid, g.fd)
            row["remote"] = g.remote or peer
            out.append(row)
        return out


def native_sockets(native: dict[int, tuple[str, int]], known: set[int]) -> list[dict]:
    """The rows of sockets the native loop made (it keeps no record): every
    socket of a process in the container's network namespace whose copy
    carries the container's mark. native: {mark: (container, a pid of it)}."""
    by_ns: dict[int, dict[int, str]] = {}
    for mark, (container, pid) in native.items():
        ino = netns_of(pid)
        if ino is not None:
            by_ns.setdefault(ino, {})[mark] = container
    rows: list[dict] = []
    seen = set(known)
    for pid, ino in pids_in_netns(set(by_ns), skip=os.getpid()).items():
        marks = by_ns[ino]
        fds = {fd: i for fd, i in socket_fds(pid).items() if i not in seen}
        if not fds:
            continue
        try:
            pidfd = seccomp.pidfd_open(pid)
        except KernelError:
            continue
        try:
            for fd, inode in fds.items():
                row = _native_row(pidfd, pid, fd, inode, marks)
                if row is not None:
                    seen.add(inode)
                    rows.append(row)
        finally:
            os.close(pidfd)
    return rows


def _native_row(pidfd: int, pid: int, fd: int, inode: int,
                marks: dict[int, str]) -> dict | None:
    try:
        with ksock.adopt(seccomp.pidfd_getfd(pidfd, fd)) as s:
            mark = s.getsockopt(socket.SOL_SOCKET, ksock.SO_MARK)
            if mark not in marks or s.family not in (socket.AF_INET, socket.AF_INET6):
                return None
            try:
                local = fmt(s.getsockname())
            except OSError:
                local = ""
            try:
                remote = fmt(s.getpeername())
            except OSError:
                remote = ""
            proto = "tcp" if s.type == socket.SOCK_STREAM else "udp"
    except (KernelError, OSError):
        return None
    return {"container": marks[mark], "pid": pid, "fd": fd, "inode": inode, "proto": proto,
            "kind": "socket", "endpoint": "", "local": local, "remote": remote, "since": 0.0}


def addresses(pid: int, fd: int) -> tuple[str, str]:
    """Local and peer address of a process's socket ("" where none)."""
    try:
        pidfd = seccomp.pidfd_open(pid)
    except KernelError:
        return "", ""
    try:
        with ksock.adopt(seccomp.pidfd_getfd(pidfd, fd)) as s:
            local = fmt(s.getsockname())
            try:
                peer = fmt(s.getpeername())
            except OSError:
                peer = ""
            return local, peer
    except (KernelError, OSError):
        return "", ""
    finally:
        os.close(pidfd)


def fmt(addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"
