"""The seccomp filters sockgraft installs, as a pure classic-BPF compiler:
`build_filter` turns a `FilterSpec` (which syscalls to trap, under which
argument condition, which to deny with an errno) into the `struct
sock_filter` array of a `sock_fprog`; `default_graft_filter` and
`socket_graft_filter` are the two graft modes' specs. No kernel calls:
kernel/seccomp.py installs the result.

Layouts mirror include/uapi/linux/filter.h and seccomp.h (x86_64)."""

from __future__ import annotations

import errno
from dataclasses import dataclass, field

from ..errors import ConfigError
from .seccomp import (AUDIT_ARCH_X86_64, BPF_MAXINSNS, SOCK_FILTER_STRUCT, MAX_ERRNO, SECCOMP_DATA_ARCH, SECCOMP_DATA_ARGS,
                      SECCOMP_DATA_NR, SECCOMP_RET_ALLOW, SECCOMP_RET_ERRNO,
                      SECCOMP_RET_USER_NOTIF, SYS_BIND, SYS_CONNECT, SYS_IO_URING_ENTER,
                      SYS_IO_URING_REGISTER, SYS_IO_URING_SETUP, SYS_LISTEN, SYS_SENDTO,
                      SYS_SOCKET, SYS_SPLICE, SYS_EPOLL_CREATE, SYS_EPOLL_CREATE1,
                      SYS_IOCTL, X32_SYSCALL_BIT)
from ..model import ioctl as mioctl


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
BPF_ALU = 0x04
BPF_AND = 0x50

_LD_W_ABS = BPF_LD | BPF_W | BPF_ABS
_JEQ_K = BPF_JMP | BPF_JEQ | BPF_K
_JSET_K = BPF_JMP | BPF_JSET | BPF_K
_JA = BPF_JMP | BPF_JA
_AND_K = BPF_ALU | BPF_AND | BPF_K
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


@dataclass(frozen=True)
class ArgMasked:
    """Trap when (low 32 bits of args[arg_index]) & mask is one of values,
    unless the low 32 bits are one of `allow` (let through untrapped).
    Low word only, as ArgMatch: the arguments tested are ints."""

    arg_index: int
    mask: int
    values: frozenset[int]
    allow: frozenset[int] = frozenset()


@dataclass
class FilterSpec:
    """What the filter does; anything not named here is allowed.

    foreign_arch_errno: verdict errno for a syscall whose arch word is not
    x86_64 (i386 `int 0x80`); x32_errno: for x86_64 syscalls with the x32 bit.
    Both default to ENOSYS - see `build_filter`.
    """

    trap: dict[int, ArgMatch | ArgMasked | None] = field(default_factory=dict)
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
    if isinstance(match, ArgMasked):
        return _masked_handler(match, fld)
    if not isinstance(match, ArgMatch):
        raise ConfigError("must be an ArgMatch, ArgMasked or None", source=_SPEC, field=fld,
                          value=match)
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


def _u32s(values: object, fld: str) -> list[int]:
    out = sorted(values) if isinstance(values, (set, frozenset)) else None
    if out is None or not all(isinstance(v, int) and not isinstance(v, bool)
                              and 0 <= v <= 0xFFFFFFFF for v in out):
        raise ConfigError("must be a set of 32-bit unsigned ints", source=_SPEC, field=fld,
                          value=values)
    return out


def _masked_handler(m: ArgMasked, fld: str) -> list[bytes]:
    """LD arg ; per allowed value JEQ v, 0, 1 ; RET ALLOW ; AND mask ;
    per value JEQ v, 0, 1 ; RET NOTIF ; RET ALLOW (1-step jumps only)."""
    if not isinstance(m.arg_index, int) or not 0 <= m.arg_index <= 5:
        raise ConfigError("arg_index must be 0..5", source=_SPEC, field=f"{fld}.arg_index",
                          value=m.arg_index)
    values = _u32s(m.values, f"{fld}.values")
    allow = _u32s(m.allow, f"{fld}.allow")
    if not values:
        raise ConfigError("values must not be empty (the syscall would never trap)",
                          source=_SPEC, field=f"{fld}.values", value=m.values)
    mask = _u32s(frozenset({m.mask}) if isinstance(m.mask, int) else m.mask, f"{fld}.mask")[0]
    if any(v & ~mask for v in values):
        raise ConfigError("a value has bits outside the mask (it would never match)",
                          source=_SPEC, field=f"{fld}.values", value=m.values)
    out = [_insn(_LD_W_ABS, 0, 0, SECCOMP_DATA_ARGS + 8 * m.arg_index)]
    for v in allow:
        out += [_insn(_JEQ_K, 0, 1, v), _insn(_RET_K, 0, 0, SECCOMP_RET_ALLOW)]
    out.append(_insn(_AND_K, 0, 0, mask))
    for v in values:
        out += [_insn(_JEQ_K, 0, 1, v), _insn(_RET_K, 0, 0, SECCOMP_RET_USER_NOTIF)]
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
# the socket ioctls answered from the namespace a socket belongs to (the
# host's, for a grafted one): model/ioctl.py
SOCKET_IOCTLS = ArgMasked(1, mioctl.IOC_TYPE_MASK, frozenset(mioctl.SOCK_IOC_TYPES),
                          mioctl.PER_SOCKET)


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
    ioctl: the interface, address and ARP commands (socket ioctl types 0x89
    and 0x8B, less those acting on the socket itself), which the kernel would
    answer from a grafted socket's namespace, the host's (model/ioctl.py).
    io_uring would issue connect/bind without a syscall: ENOSYS makes
    libraries (liburing users, tokio, libuv) fall back to plain syscalls.
    """
    trap: dict[int, ArgMatch | ArgMasked | None] = {
        SYS_BIND: None,
        SYS_CONNECT: ArgMatch(2, _ADDRLEN_IN_IN6_STORAGE),
        SYS_LISTEN: None,
        SYS_IOCTL: SOCKET_IOCTLS,
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


def with_splice(spec: FilterSpec) -> FilterSpec:
    """Trap splice() as well: for containers of an agent that splices local
    grafted pairs (--sockmap). The kernel's splice out of a TCP socket reads
    its TCP queue only, never the psock queue a spliced socket's data waits
    in: the agent hands that over to the pipe first and takes the socket
    out of the map (Grafter._on_splice). Every splice() of the container
    then costs a round trip to the agent; its other calls nothing."""
    spec.trap[SYS_SPLICE] = None
    return spec


def with_epoll(spec: FilterSpec) -> FilterSpec:
    """Trap epoll_create and epoll_create1 as well (syscall mode, an agent
    that says so): the agent lets the kernel make the instance and learns
    that one exists. Before grafting a non-blocking connect() it must know
    whether an epoll instance of the process watches the socket (the swap
    would drop that registration); its list of the process's instances is
    then kept until the next one is made, instead of a second during which
    a new one went unseen. One round trip per epoll instance made."""
    spec.trap[SYS_EPOLL_CREATE] = None
    spec.trap[SYS_EPOLL_CREATE1] = None
    return spec


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


