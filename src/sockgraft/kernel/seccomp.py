"""seccomp user notification: filter building, installing, and the listener fd.

Owns the kernel side of trapping socket syscalls (x86_64 only):

* `build_filter` / `default_graft_filter`: a pure classic-BPF compiler from a
  `FilterSpec` (which syscalls to trap, under which argument condition, which
  to deny with an errno) to the `struct sock_filter` array of a `sock_fprog`.
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
from dataclasses import dataclass, field
from typing import NamedTuple

from ..errors import ConfigError, KernelError, NotFound, NotificationGone, from_oserror

# --- syscall numbers (x86_64) -------------------------------------------------
SYS_SOCKET = 41
SYS_CONNECT = 42
SYS_SENDTO = 44
SYS_BIND = 49
SYS_LISTEN = 50
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
# struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }
SOCK_FILTER_STRUCT = struct.Struct("=HBBI")
_U64 = struct.Struct("=Q")

BPF_MAXINSNS = 4096

# classic BPF opcodes (include/uapi/linux/bpf_common.h)
BPF_LD = 0x00
BPF_JMP = 0x05
BPF_RET = 0x06
BPF_W = 0x00
BPF_ABS = 0x20
BPF_JA = 0x00
BPF_JEQ = 0x10
BPF_JGE = 0x30
BPF_JSET = 0x40
BPF_K = 0x00

_LD_W_ABS = BPF_LD | BPF_W | BPF_ABS
_JEQ_K = BPF_JMP | BPF_JEQ | BPF_K
_JSET_K = BPF_JMP | BPF_JSET | BPF_K
_JA = BPF_JMP | BPF_JA
_RET_K = BPF_RET | BPF_K

_SPEC = "seccomp filter spec"


# --- the pure filter compiler -------------------------------------------------

@dataclass(frozen=True)
class ArgMatch:
    """Trap only when the low 32 bits of args[arg_index] equal one of values.

    Only the low word is compared on purpose: for int/socklen_t arguments the
    kernel itself truncates the register to 32 bits, so comparing the high
    word too would let a caller dodge the trap with garbage in it.
    """

    arg_index: int
    values: frozenset[int]


@dataclass
class FilterSpec:
    """What the filter does; anything not named here is allowed.

    foreign_arch_errno: verdict errno for a syscall whose arch word is not
    x86_64 (i386 `int 0x80`); x32_errno: for x86_64 syscalls with the x32 bit.
    Both default to ENOSYS - see `build_filter`.
    """

    trap: dict[int, ArgMatch | None] = field(default_factory=dict)
    deny_errno: dict[int, int] = field(default_factory=dict)
    foreign_arch_errno: int = errno.ENOSYS
    x32_errno: int = errno.ENOSYS


def _insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return SOCK_FILTER_STRUCT.pack(code, jt, jf, k)


def _check_errno(value: object, fld: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_ERRNO:
        raise ConfigError(f"errno must be an int in 1..{MAX_ERRNO}", source=_SPEC,
                          field=fld, value=value)
    return value


def _check_nr(nr: object, fld: str) -> int:
    if not isinstance(nr, int) or isinstance(nr, bool) or not 0 <= nr < X32_SYSCALL_BIT:
        raise ConfigError(f"syscall number must be an int in 0..{X32_SYSCALL_BIT - 1:#x} "
                          "(native x86_64, no x32 bit)", source=_SPEC, field=fld, value=nr)
    return nr


def _handler(nr: int, spec: FilterSpec) -> list[bytes]:
    """The instructions run once nr matched; every path ends in a RET."""
    if nr in spec.deny_errno:
        e = _check_errno(spec.deny_errno[nr], f"deny_errno[{nr}]")
        return [_insn(_RET_K, 0, 0, SECCOMP_RET_ERRNO | e)]
    match = spec.trap[nr]
    if match is None:
        return [_insn(_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF)]
    fld = f"trap[{nr}]"
    if not isinstance(match, ArgMatch):
        raise ConfigError("must be an ArgMatch or None", source=_SPEC, field=fld, value=match)
    if not isinstance(match.arg_index, int) or not 0 <= match.arg_index <= 5:
        raise ConfigError("arg_index must be 0..5", source=_SPEC, field=f"{fld}.arg_index",
                          value=match.arg_index)
    if not match.values:
        raise ConfigError("values must not be empty (the syscall would never trap)",
                          source=_SPEC, field=f"{fld}.values", value=match.values)
    out = [_insn(_LD_W_ABS, 0, 0, SECCOMP_DATA_ARGS + 8 * match.arg_index)]
    for v in sorted(match.values):
        if not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
            raise ConfigError("values must be 32-bit unsigned ints", source=_SPEC,
                              field=f"{fld}.values", value=v)
        # Each value is "JEQ v, 0, 1 ; RET NOTIF": only 1-step jumps, so any
        # number of values fits.
        out.append(_insn(_JEQ_K, 0, 1, v))
        out.append(_insn(_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF))
    out.append(_insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    return out


def build_filter(spec: FilterSpec) -> bytes:
    """Compile spec into a sock_fprog instruction array (8 bytes per insn).

    Layout (A is the accumulator):

        LD arch ; JEQ X86_64, 1, 0 ; RET ERRNO|foreign_arch_errno
        LD nr   ; JSET X32_BIT, 0, 1 ; RET ERRNO|x32_errno
        per syscall, ascending nr, one block:
            JEQ nr, 0, len(handler)          (handler <= 255 insns)
            JEQ nr, 1, 0 ; JA len(handler)   (longer handlers: JA has 32 bits)
            handler...                       (every path ends in RET)
        RET ALLOW

    Conditional jumps never go further than one block, so the program is
    correct for any number of syscalls (up to the kernel's 4096 insns). A
    block is only entered on a match and always returns, so A still holds nr
    at the next block's JEQ. Non-trapped syscalls touch only nr/arch, which
    lets the kernel's action cache (5.11+) skip the filter for them entirely.

    Foreign arch verdict: ERRNO|ENOSYS, not KILL_PROCESS (a container should
    not die with SIGSYS because one binary is i386) and not ALLOW (i386
    socketcall/connect would bypass the trap). ENOSYS is what a kernel built
    without IA32/x32 support answers, which libcs and runtimes already handle;
    x32 calls get the same. Both are configurable in FilterSpec.
    """
    overlap = set(spec.trap) & set(spec.deny_errno)
    if overlap:
        raise ConfigError("a syscall cannot be both trapped and denied", source=_SPEC,
                          field="trap/deny_errno", value=sorted(overlap))
    foreign = _check_errno(spec.foreign_arch_errno, "foreign_arch_errno")
    x32 = _check_errno(spec.x32_errno, "x32_errno")
    insns = [
        _insn(_LD_W_ABS, 0, 0, SECCOMP_DATA_ARCH),
        _insn(_JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        _insn(_RET_K, 0, 0, SECCOMP_RET_ERRNO | foreign),
        _insn(_LD_W_ABS, 0, 0, SECCOMP_DATA_NR),
        _insn(_JSET_K, 0, 1, X32_SYSCALL_BIT),
        _insn(_RET_K, 0, 0, SECCOMP_RET_ERRNO | x32),
    ]
    for nr in sorted({*spec.trap, *spec.deny_errno}):
        _check_nr(nr, f"trap/deny_errno[{nr!r}]")
        handler = _handler(nr, spec)
        if len(handler) <= 255:
            insns.append(_insn(_JEQ_K, 0, len(handler), nr))
        else:
            insns.append(_insn(_JEQ_K, 1, 0, nr))
            insns.append(_insn(_JA, 0, 0, len(handler)))
        insns.extend(handler)
    insns.append(_insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW))
    if len(insns) > BPF_MAXINSNS:
        raise ConfigError(f"filter has {len(insns)} instructions, the kernel accepts "
                          f"at most {BPF_MAXINSNS}", source=_SPEC, field="trap",
                          value=len(spec.trap))
    return b"".join(insns)


_ADDRLEN_IN_IN6_STORAGE = frozenset({16, 28, 128})  # sockaddr_in, _in6, _storage


def default_graft_filter(trap_sendto: bool = True) -> FilterSpec:
    """Trap connect/sendto carrying an inet-sized sockaddr, every bind and
    every listen; deny io_uring.

    trap_sendto=False leaves sendto alone: some programs (sockperf, for one)
    pass the peer address on every send of a connected TCP socket, which would
    cost a round trip to the agent per message. `sockgraft run` traps sendto
    only when asked (--udp-sendto) to graft unconnected UDP senders.

    connect/sendto: addrlen 16/28/128 (sockaddr_in, sockaddr_in6,
    sockaddr_storage) selects inet sockets without reading memory; unix
    (addrlen 110 or path-sized) and netlink (12) almost never match and so
    never reach the agent. A connect of a grafted socket with another length
    is judged by the kernel guards (bpf/sockgraft.bpf.c), not left alone.
    bind and listen are trapped whatever their arguments (the kernel accepts
    any inet address length from 16 to 128, and both are rare calls): the
    agent makes every bind and listen of a grafted socket itself.
    io_uring would issue connect/bind without a syscall: ENOSYS makes
    libraries (liburing users, tokio, libuv) fall back to plain syscalls.
    """
    trap: dict[int, ArgMatch | None] = {
        SYS_BIND: None,
        SYS_CONNECT: ArgMatch(2, _ADDRLEN_IN_IN6_STORAGE),
        SYS_LISTEN: None,
    }
    if trap_sendto:
        trap[SYS_SENDTO] = ArgMatch(5, _ADDRLEN_IN_IN6_STORAGE)
    return FilterSpec(
        trap=trap,
        deny_errno={
            SYS_IO_URING_SETUP: errno.ENOSYS,
            SYS_IO_URING_ENTER: errno.ENOSYS,
            SYS_IO_URING_REGISTER: errno.ENOSYS,
        },
    )


def socket_graft_filter() -> FilterSpec:
    """For containers grafted at socket() time (graft_at = "socket"): trap
    socket() for AF_INET/AF_INET6 (the agent answers with a host socket,
    ADDFD_FLAG_SEND; the low word of the register is compared, as the kernel
    reads an int), every bind() (ingress rules; the agent binds) and every
    listen() (only sockets bound through an ingress rule may listen; the
    agent listens itself). connect()/sendto() are not trapped: the cgroup
    programs judge them in the kernel. io_uring is denied as in
    `default_graft_filter`."""
    spec = default_graft_filter(trap_sendto=False)
    del spec.trap[SYS_CONNECT]
    spec.trap[SYS_SOCKET] = ArgMatch(0, frozenset({2, 10}))
    return spec


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
        try:
            fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_SEND, self._sbuf, True)
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
        while True:
            try:
                return fcntl.ioctl(self._fd, SECCOMP_IOCTL_NOTIF_ADDFD, self._abuf, True)
            except InterruptedError:
                # The kernel withdrew the request before returning EINTR.
                continue
            except OSError as exc:
                raise _notif_error("seccomp NOTIF_ADDFD", exc, id) from None

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
