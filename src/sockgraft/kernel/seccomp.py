"""seccomp user notification: installing a filter, and the listener fd.
(Building the filter - pure - is kernel/seccomp_filter.py.)

Owns the kernel side of trapping socket syscalls (x86_64 only):

* `install_filter`: prctl(NO_NEW_PRIVS) + seccomp(SET_MODE_FILTER), meant for
  a freshly forked child right before it execs (or runs) the workload.
* `Listener`: the notify fd - recv, id_valid, respond, continue_, addfd.
* `pidfd_open` / `pidfd_getfd` and `TargetMemory` (reads a trapped thread's
  memory through /proc/TID/mem).

Must not: decide anything about sockaddrs, endpoints or policy (model/ and
agent/ do), log, start threads, or loop on a listener whose tasks are gone
(NOTIF_RECV answers ENOENT forever then; callers watch POLLHUP).

Errors: OSError is translated here into the tree of `sockgraft.errors`
(ENOENT/ESRCH = target gone -> NotFound). Spec mistakes raise ConfigError.

Struct layouts mirror include/uapi/linux/seccomp.h and
include/uapi/linux/filter.h (checked numbers: /work/shared/FACTS.md section 6).
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import os
import select
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import NamedTuple

from ..errors import KernelError, NotFound, NotificationGone, from_oserror

# Around ADDFD with send every signal is blocked: libc's pthread_sigmask on
# a full set (Python's signal.pthread_sigmask builds a set of 64 enum members
# for the old mask each call: ~70 us per socket()); _libc is below
_SIGSET_BYTES = 128
_ALL_SIGNALS = ctypes.create_string_buffer(b"\xff" * _SIGSET_BYTES, _SIGSET_BYTES)
_SIG_BLOCK, _SIG_SETMASK = 0, 2


def _block_signals() -> ctypes.Array:
    old = ctypes.create_string_buffer(_SIGSET_BYTES)
    _libc.pthread_sigmask(_SIG_BLOCK, _ALL_SIGNALS, old)
    return old


def _restore_signals(old: ctypes.Array) -> None:
    _libc.pthread_sigmask(_SIG_SETMASK, old, None)

# --- syscall numbers (x86_64) -------------------------------------------------
SYS_IOCTL = 16
SYS_SOCKET = 41
SYS_CONNECT = 42
SYS_SENDTO = 44
SYS_BIND = 49
SYS_LISTEN = 50
SYS_SPLICE = 275
SYS_EPOLL_CREATE = 213
SYS_EPOLL_CREATE1 = 291
SYS_SECCOMP = 317
SYS_PIDFD_SEND_SIGNAL = 424
SYS_IO_URING_SETUP = 425
SYS_IO_URING_ENTER = 426
SYS_IO_URING_REGISTER = 427
SYS_PIDFD_OPEN = 434
SYS_PIDFD_GETFD = 438

PR_SET_NO_NEW_PRIVS = 38

# --- seccomp(2) ---------------------------------------------------------------
SECCOMP_SET_MODE_FILTER = 1
SECCOMP_GET_NOTIF_SIZES = 3

SECCOMP_FILTER_FLAG_TSYNC = 1 << 0
SECCOMP_FILTER_FLAG_LOG = 1 << 1
SECCOMP_FILTER_FLAG_SPEC_ALLOW = 1 << 2
SECCOMP_FILTER_FLAG_NEW_LISTENER = 1 << 3
SECCOMP_FILTER_FLAG_TSYNC_ESRCH = 1 << 4
SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV = 1 << 5

SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_KILL_THREAD = 0x00000000
SECCOMP_RET_TRAP = 0x00030000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SECCOMP_RET_TRACE = 0x7FF00000
SECCOMP_RET_LOG = 0x7FFC0000
SECCOMP_RET_ALLOW = 0x7FFF0000
SECCOMP_RET_ACTION_FULL = 0xFFFF0000
SECCOMP_RET_DATA = 0x0000FFFF

AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
# An x32 syscall is an x86_64 syscall (same arch word) whose nr has this bit.
X32_SYSCALL_BIT = 0x40000000
# epoll_create and epoll_create1 as every ABI of this machine numbers them
# (x86_64, x32, i386): an OCI profile naming them traps all the ABIs its
# "architectures" list; the agent lets each through, whatever its ABI
EPOLL_CREATES = frozenset({
    (AUDIT_ARCH_X86_64, SYS_EPOLL_CREATE), (AUDIT_ARCH_X86_64, SYS_EPOLL_CREATE1),
    (AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | SYS_EPOLL_CREATE),
    (AUDIT_ARCH_X86_64, X32_SYSCALL_BIT | SYS_EPOLL_CREATE1),
    (AUDIT_ARCH_I386, 254), (AUDIT_ARCH_I386, 329)})
MAX_ERRNO = 4095

# struct seccomp_data offsets (nr, arch, instruction_pointer, args[6]); the
# low word of args[i] comes first on little endian.
SECCOMP_DATA_NR = 0
SECCOMP_DATA_ARCH = 4
SECCOMP_DATA_IP = 8
SECCOMP_DATA_ARGS = 16

# --- notify ioctls and flags ----------------------------------------------------
SECCOMP_IOCTL_NOTIF_RECV = 0xC0502100
SECCOMP_IOCTL_NOTIF_SEND = 0xC0182101
SECCOMP_IOCTL_NOTIF_ID_VALID = 0x40082102
SECCOMP_IOCTL_NOTIF_ADDFD = 0x40182103
SECCOMP_IOCTL_NOTIF_SET_FLAGS = 0x40082104

SECCOMP_USER_NOTIF_FLAG_CONTINUE = 1
SECCOMP_ADDFD_FLAG_SETFD = 1
SECCOMP_ADDFD_FLAG_SEND = 2
# NOTIF_SET_FLAGS (6.6+): wake the target on the replying CPU.
SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP = 1

PIDFD_THREAD = os.O_EXCL

# --- struct layouts (include/uapi/linux/seccomp.h, filter.h) ------------------
# struct seccomp_notif { u64 id; u32 pid; u32 flags; struct seccomp_data data; }
# struct seccomp_data { int nr; u32 arch; u64 instruction_pointer; u64 args[6]; }
NOTIF_STRUCT = struct.Struct("=QIIiIQ6Q")
# struct seccomp_notif_resp { u64 id; s64 val; s32 error; u32 flags; }
RESP_STRUCT = struct.Struct("=QqiI")
# struct seccomp_notif_addfd { u64 id; u32 flags; u32 srcfd; u32 newfd; u32 newfd_flags; }
ADDFD_STRUCT = struct.Struct("=QIIII")
# struct seccomp_notif_sizes { u16 seccomp_notif; u16 seccomp_notif_resp; u16 seccomp_data; }
SIZES_STRUCT = struct.Struct("=HHH")
_U64 = struct.Struct("=Q")
# struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
SOCK_FILTER_STRUCT = struct.Struct("=HBBI")
BPF_MAXINSNS = 4096


# --- pure struct codecs (used by Listener, golden-tested) --------------------

@dataclass(frozen=True, slots=True)
class Notification:
    """One struct seccomp_notif. `pid` is the trapped *thread* id, in the
    receiver's pid namespace."""

    id: int
    pid: int
    flags: int
    nr: int
    arch: int
    ip: int
    args: tuple[int, ...]


def parse_notif(buf: bytes | bytearray | memoryview) -> Notification:
    return notif_of(NOTIF_STRUCT.unpack_from(buf))


def notif_of(v: tuple[int, ...]) -> Notification:
    """A Notification from the raw fields (id, pid, flags, nr, arch, ip, args[6])."""
    return Notification(v[0], v[1], v[2], v[3], v[4], v[5], v[6:12])


def pack_resp(buf: bytearray, id: int, *, val: int = 0, error: int = 0, flags: int = 0) -> None:
    """Fill a seccomp_notif_resp. error is a positive errno; the kernel puts
    resp.error as-is into the return register, so it is stored negated."""
    if not 0 <= error <= MAX_ERRNO:
        raise ValueError(f"error must be a positive errno (0..{MAX_ERRNO}), got {error}")
    RESP_STRUCT.pack_into(buf, 0, id, val, -error, flags)


def pack_addfd(buf: bytearray, id: int, srcfd: int, *, newfd: int | None = None,
               cloexec: bool = False, send: bool = False) -> None:
    flags = (SECCOMP_ADDFD_FLAG_SETFD if newfd is not None else 0) | \
            (SECCOMP_ADDFD_FLAG_SEND if send else 0)
    ADDFD_STRUCT.pack_into(buf, 0, id, flags, srcfd, newfd if newfd is not None else 0,
                           os.O_CLOEXEC if cloexec else 0)


# --- syscalls -----------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
_libc.prctl.restype = ctypes.c_int
_c_long = ctypes.c_long


class _SockFprog(ctypes.Structure):
    # struct sock_fprog { unsigned short len; struct sock_filter *filter; }
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


def _syscall(op: str, *args: int | ctypes._SimpleCData | ctypes.Structure) -> int:
    ret = _libc.syscall(*args)
    if ret < 0:
        err = ctypes.get_errno()
        raise from_oserror(op, OSError(err, os.strerror(err)))
    return ret


def install_filter(prog: bytes, *, listener: bool = True, flags: int = 0) -> int | None:
    """Set NO_NEW_PRIVS and install prog on the calling thread.

    Returns the listener fd (close-on-exec) when listener, else None. Safe in
    a freshly forked child: plain ctypes calls, no threads, no logging. A
    second listener in one filter chain fails with EBUSY (KernelError).
    """
    if not prog or len(prog) % SOCK_FILTER_STRUCT.size or \
            len(prog) // SOCK_FILTER_STRUCT.size > BPF_MAXINSNS:
        raise ValueError(f"prog must be 1..{BPF_MAXINSNS} sock_filter insns, got {len(prog)} bytes")
    if _libc.prctl(ctypes.c_int(PR_SET_NO_NEW_PRIVS), _c_long(1), _c_long(0), _c_long(0),
                   _c_long(0)) != 0:
        err = ctypes.get_errno()
        raise KernelError("prctl(PR_SET_NO_NEW_PRIVS)", err)
    insns = ctypes.create_string_buffer(prog, len(prog))
    fprog = _SockFprog(len(prog) // SOCK_FILTER_STRUCT.size, ctypes.addressof(insns))
    if listener:
        flags |= SECCOMP_FILTER_FLAG_NEW_LISTENER
    ret = _syscall("seccomp(SET_MODE_FILTER)", _c_long(SYS_SECCOMP),
                   _c_long(SECCOMP_SET_MODE_FILTER), _c_long(flags),
                   ctypes.c_void_p(ctypes.addressof(fprog)))
    return ret if flags & SECCOMP_FILTER_FLAG_NEW_LISTENER else None


class NotifSizes(NamedTuple):
    notif: int
    resp: int
    data: int


@functools.cache
def notif_sizes() -> NotifSizes:
    """The kernel's struct sizes (seccomp(SECCOMP_GET_NOTIF_SIZES))."""
    buf = ctypes.create_string_buffer(SIZES_STRUCT.size)
    _syscall("seccomp(GET_NOTIF_SIZES)", _c_long(SYS_SECCOMP), _c_long(SECCOMP_GET_NOTIF_SIZES),
             _c_long(0), ctypes.c_void_p(ctypes.addressof(buf)))
    return NotifSizes(*SIZES_STRUCT.unpack(buf.raw))


def pidfd_open(tid: int) -> int:
    """A pidfd for tid: a process pidfd for a thread-group leader, else a
    thread pidfd (PIDFD_THREAD, 6.9+). pidfd_open(tid, 0) of a non-leader
    fails (ENOENT here, EINVAL on older kernels), hence the retry."""
    ret = _libc.syscall(_c_long(SYS_PIDFD_OPEN), _c_long(tid), _c_long(0))
    if ret >= 0:
        return ret
    err = ctypes.get_errno()
    if err not in (errno.ENOENT, errno.EINVAL):
        raise from_oserror("pidfd_open", OSError(err, ""), f"tid {tid}")
    return _syscall(f"pidfd_open(tid {tid}, PIDFD_THREAD)", _c_long(SYS_PIDFD_OPEN),
                    _c_long(tid), _c_long(PIDFD_THREAD))


def pidfd_getfd(pidfd: int, targetfd: int) -> int:
    """Duplicate the target's fd targetfd into this process (close-on-exec)."""
    return _syscall("pidfd_getfd", _c_long(SYS_PIDFD_GETFD), _c_long(pidfd),
                    _c_long(targetfd), _c_long(0))


# --- the listener -------------------------------------------------------------

def _notif_error(op: str, exc: OSError, id: int) -> KernelError:
    """ENOENT from SEND/ADDFD: the notification is no longer valid (target
    died, syscall interrupted): NotificationGone, the one error after which a
    trapped call is not answered. Anything else is an error to answer."""
    if exc.errno == errno.ENOENT:
        return NotificationGone(op, exc.errno, f"id {id:#x}")
    return from_oserror(op, exc, f"id {id:#x}")


class Listener:
    """Owns one seccomp notify fd. Buffers are preallocated; one ioctl per call.

    recv() blocks: poll() first. After every filtered task has exited (and
    been reaped), poll() reports POLLHUP and recv() raises NotFound forever.
    """

    __slots__ = ("_fd", "_rbuf", "_rzero", "_sbuf", "_abuf", "_ibuf", "_poller")

    def __init__(self, fd: int, *, sizes: NotifSizes | None = None) -> None:
        sizes = sizes or notif_sizes()
        self._fd = fd
        # The kernel rejects a RECV buffer that is not all zero (EINVAL).
        self._rbuf = bytearray(max(sizes.notif, NOTIF_STRUCT.size))
        self._rzero = bytes(len(self._rbuf))
        self._sbuf = bytearray(max(sizes.resp, RESP_STRUCT.size))
        self._abuf = bytearray(ADDFD_STRUCT.size)
        self._ibuf = bytearray(_U64.size)
        self._poller = select.poll()
        self._poller.register(fd, select.POLLIN)

    def fileno(self) -> int:
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def poll(self, timeout_ms: int | None = None) -> int:
        """revents of the fd (POLLIN: a notification waits; POLLHUP: no task
        uses the filter any more); 0 on timeout."""
        for _, ev in self._poller.poll(timeout_ms):
            return ev
        return 0

    def recv(self) -> Notification:
        """One notification; blocks until one arrives (the GIL is released)."""
        while True:
            try:
                return notif_of(self.recv_raw())
            except InterruptedError:
                continue

    def recv_raw(self) -> tuple[int, ...]:
        """recv() as the bare fields (id, pid, flags, nr, arch, ip, args[6]),
        for the per-connection fast path; a signal raises InterruptedError."""
        buf = self._rbuf
        buf[:] = self._rzero
        try:
            fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_RECV, buf, True)
        except InterruptedError:
            raise
        except OSError as exc:
            # ENOENT: the target died between wake-up and recv, or no
            # task uses the filter any more (then POLLHUP is set).
            raise from_oserror("seccomp NOTIF_RECV", exc) from None
        return NOTIF_STRUCT.unpack_from(buf)

    def id_valid(self, id: int) -> bool:
        """Is the notification still pending (target alive and still blocked)?"""
        _U64.pack_into(self._ibuf, 0, id)
        try:
            fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_ID_VALID, self._ibuf, True)
        except OSError as exc:
            if exc.errno == errno.ENOENT:
                return False
            raise from_oserror("seccomp NOTIF_ID_VALID", exc) from None
        return True

    def respond(self, id: int, *, val: int = 0, error: int = 0) -> None:
        """Finish the syscall: it returns val, or fails with errno `error` (> 0)."""
        pack_resp(self._sbuf, id, val=val, error=error)
        self._send(id)

    def continue_(self, id: int) -> None:
        """Let the kernel run the syscall as if it had not been trapped
        (re-reads user memory: a check-then-continue is racy by nature)."""
        RESP_STRUCT.pack_into(self._sbuf, 0, id, 0, 0, SECCOMP_USER_NOTIF_FLAG_CONTINUE)
        self._send(id)

    def _send(self, id: int) -> None:
        while True:
            try:
                fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_SEND, self._sbuf, True)
                return
            except InterruptedError:
                continue        # (the filter's lock is taken interruptibly: nothing sent)
            except OSError as exc:
                raise _notif_error("seccomp NOTIF_SEND", exc, id) from None

    def addfd(self, id: int, srcfd: int, *, newfd: int | None = None,
              cloexec: bool = False, send: bool = False) -> int:
        """Install a copy of our srcfd in the target; returns its fd number.

        newfd: install exactly there (replacing what is there, like dup2).
        send: also answer the syscall with that fd number, atomically (5.14+);
        then no respond() follows. Blocks until the target installed the fd.
        """
        pack_addfd(self._abuf, id, srcfd, newfd=newfd, cloexec=cloexec, send=send)
        # With send the kernel marks the call answered before it waits for
        # the target: a signal interrupting that wait withdraws the fd but
        # not the answer (the call would return 0). No signal interrupts it.
        # (Without send an interrupted request is withdrawn: retried.)
        old = _block_signals() if send else None
        try:
            while True:
                try:
                    return fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_ADDFD, self._abuf, True)
                except InterruptedError:
                    continue
                except OSError as exc:
                    raise _notif_error("seccomp NOTIF_ADDFD", exc, id) from None
        finally:
            if old is not None:
                _restore_signals(old)

    def set_flags(self, flags: int) -> None:
        """NOTIF_SET_FLAGS, e.g. SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP (6.6+).

        Despite the _IOW(u64) in its number, the kernel takes the flags as the
        ioctl argument by value, not through a pointer."""
        try:
            fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_SET_FLAGS, flags)
        except OSError as exc:
            raise from_oserror("seccomp NOTIF_SET_FLAGS", exc) from None

    def close(self) -> None:
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            try:
                self._poller.unregister(fd)
            except (KeyError, ValueError):
                pass
            os.close(fd)

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- target memory ------------------------------------------------------------

class _MemEntry(NamedTuple):
    memfd: int
    pidfd: int
    alive: select.poll  # POLLIN on pidfd = the thread exited, its tid is reusable


class TargetMemory:
    """Reads trapped threads' memory with pread on cached /proc/TID/mem fds.

    A cache entry holds the mem fd and a thread pidfd of the same task, opened
    pidfd first. Before a cached fd is used, a zero-timeout poll of the pidfd
    checks the thread has not exited: tids are reused (pid_max may be 32768),
    and a stale mem fd of an exited thread whose process lives on would read
    the wrong process. If the mm behind a fd is gone (exec, exit), pread
    returns 0 bytes; the entry is reopened once. At most max_entries entries
    (2 fds each) are kept, least recently used evicted.

    Not covered: a task that execs while its old mm stays alive through
    another task (vfork/CLONE_VM sharers) keeps reading the old mm until
    forget(tid). The agent must still re-check id_valid after reading.

    Errors: target gone -> NotFound; address not readable (EIO, short read)
    -> KernelError with errno EFAULT, which is also the right errno to answer
    the trapped syscall with (EIO is *not* "gone": the mm is alive).
    """

    def __init__(self, max_entries: int = 128) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self._max = max_entries
        self._cache: OrderedDict[int, _MemEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._cache)

    def _open(self, tid: int) -> _MemEntry:
        try:
            pidfd = _syscall("pidfd_open", _c_long(SYS_PIDFD_OPEN), _c_long(tid),
                             _c_long(PIDFD_THREAD))
        except KernelError as exc:
            if exc.errno in (errno.ESRCH, errno.ENOENT, errno.EINVAL):
                raise NotFound(exc.op, exc.errno, f"tid {tid}") from None
            raise
        try:
            memfd = os.open(f"/proc/{tid}/mem", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(pidfd)
            raise from_oserror("open /proc/TID/mem", exc, f"tid {tid}") from None
        alive = select.poll()
        alive.register(pidfd, select.POLLIN)
        entry = _MemEntry(memfd, pidfd, alive)
        self._cache[tid] = entry
        while len(self._cache) > self._max:
            _, old = self._cache.popitem(last=False)
            _close_entry(old)
        return entry

    def read(self, tid: int, addr: int, n: int) -> bytes:
        """Exactly n bytes at addr in tid's address space."""
        if n < 0 or addr < 0 or addr + n > 1 << 63:
            raise KernelError("read target memory", errno.EFAULT, f"tid {tid} addr {addr:#x}")
        if n == 0:
            return b""
        entry = self._cache.get(tid)
        if entry is not None:
            if entry.alive.poll(0):
                self.forget(tid)
                entry = None
            else:
                self._cache.move_to_end(tid)
        reopened = entry is None
        if entry is None:
            entry = self._open(tid)
        while True:
            try:
                data = os.pread(entry.memfd, n, addr)
            except OSError as exc:
                if exc.errno == errno.EIO:
                    raise KernelError("read target memory", errno.EFAULT,
                                      f"tid {tid} addr {addr:#x}") from None
                raise from_oserror("read target memory", exc, f"tid {tid}") from None
            if data or reopened:
                break
            # 0 bytes: the mm this fd pinned is gone (exit or exec); retry once.
            self.forget(tid)
            entry = self._open(tid)
            reopened = True
        if not data:
            self.forget(tid)
            raise NotFound("read target memory", errno.ESRCH, f"tid {tid}: no mm")
        if len(data) != n:
            raise KernelError("read target memory", errno.EFAULT,
                              f"tid {tid} addr {addr:#x}: {len(data)} of {n} bytes")
        return data

    def holds(self, tid: int) -> bool:
        return tid in self._cache

    def forget(self, tid: int) -> None:
        entry = self._cache.pop(tid, None)
        if entry is not None:
            _close_entry(entry)

    def close(self) -> None:
        while self._cache:
            _, entry = self._cache.popitem()
            _close_entry(entry)

    def __enter__(self) -> TargetMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _close_entry(entry: _MemEntry) -> None:
    os.close(entry.memfd)
    os.close(entry.pidfd)
