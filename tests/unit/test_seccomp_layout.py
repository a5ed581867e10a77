"""Pure tests of sockgraft.kernel.seccomp: struct layouts (golden bytes), ioctl
numbers, and the classic-BPF filter compiler, run through a small interpreter
that mirrors the kernel's seccomp checks. No syscalls are made here."""

from __future__ import annotations

import errno
import struct

import pytest

from sockgraft.errors import ConfigError
from sockgraft.kernel import seccomp as sc
from sockgraft.kernel import seccomp_filter as scf
from sockgraft.model import ioctl as mioctl

pytestmark = pytest.mark.unit

NOTIF = sc.SECCOMP_RET_USER_NOTIF
ALLOW = sc.SECCOMP_RET_ALLOW
ERRNO = sc.SECCOMP_RET_ERRNO
X86_64 = sc.AUDIT_ARCH_X86_64
I386 = sc.AUDIT_ARCH_I386


# --- a tiny classic-BPF interpreter (only what seccomp filters may use) -------

def decode(prog: bytes) -> list[tuple[int, int, int, int]]:
    assert len(prog) % 8 == 0 and prog
    return [sc.SOCK_FILTER_STRUCT.unpack_from(prog, i) for i in range(0, len(prog), 8)]


def check_program(insns) -> None:
    """What the kernel's bpf_check_classic + seccomp_check_filter reject."""
    assert 1 <= len(insns) <= sc.BPF_MAXINSNS
    for pc, (code, jt, jf, k) in enumerate(insns):
        if code == 0x20:  # LD W ABS
            assert k % 4 == 0 and k < 64, f"bad seccomp_data offset {k} at {pc}"
        elif code in (0x15, 0x35, 0x45):  # JEQ/JGE/JSET K
            assert pc + 1 + jt < len(insns) and pc + 1 + jf < len(insns), f"jump out at {pc}"
        elif code == 0x05:  # JA
            assert pc + 1 + k < len(insns), f"JA out at {pc}"
        elif code == 0x06:  # RET K
            pass
        elif code == 0x54:  # ALU AND K
            pass
        else:
            raise AssertionError(f"opcode {code:#x} not expected at {pc}")
    assert insns[-1][0] == 0x06, "last insn must be RET"


def seccomp_data(nr: int, arch: int = X86_64, args=(0,) * 6, ip: int = 0x401000) -> bytes:
    return struct.pack("=iIQ6Q", nr, arch, ip, *args)


def run(insns, data: bytes, loads: list[int] | None = None) -> int:
    a = 0
    pc = 0
    steps = 0
    while True:
        steps += 1
        assert steps <= len(insns), "loop"  # classic BPF only jumps forward
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == 0x20:
            a = struct.unpack_from("=I", data, k)[0]
            if loads is not None:
                loads.append(k)
        elif code == 0x15:
            pc += jt if a == k else jf
        elif code == 0x35:
            pc += jt if a >= k else jf
        elif code == 0x45:
            pc += jt if a & k else jf
        elif code == 0x05:
            pc += k
        elif code == 0x54:
            a &= k
        elif code == 0x06:
            return k
        else:
            raise AssertionError(f"bad opcode {code:#x}")


def verdict(prog: bytes, nr: int, **kw) -> int:
    insns = decode(prog)
    check_program(insns)
    return run(insns, seccomp_data(nr, **kw))


def test_interpreter_rejects_bad_jump():
    # The checker must be able to fail, or the 300-syscall test proves nothing.
    bad = [(0x20, 0, 0, 0), (0x15, 5, 0, 1), (0x06, 0, 0, ALLOW)]
    with pytest.raises(AssertionError):
        check_program(bad)


# --- struct layouts --------------------------------------------------------------

def test_struct_sizes_match_kernel_abi():
    assert sc.NOTIF_STRUCT.size == 80
    assert sc.RESP_STRUCT.size == 24
    assert sc.ADDFD_STRUCT.size == 24
    assert sc.SIZES_STRUCT.size == 6
    assert sc.SOCK_FILTER_STRUCT.size == 8


def _ioc(direction: int, nr: int, size: int) -> int:
    return (direction << 30) | (size << 16) | (ord("!") << 8) | nr


def test_ioctl_numbers_follow_from_struct_sizes():
    w, rw = 1, 3
    assert sc.SECCOMP_IOCTL_NOTIF_RECV == _ioc(rw, 0, sc.NOTIF_STRUCT.size) == 0xC0502100
    assert sc.SECCOMP_IOCTL_NOTIF_SEND == _ioc(rw, 1, sc.RESP_STRUCT.size) == 0xC0182101
    assert sc.SECCOMP_IOCTL_NOTIF_ID_VALID == _ioc(w, 2, 8) == 0x40082102
    assert sc.SECCOMP_IOCTL_NOTIF_ADDFD == _ioc(w, 3, sc.ADDFD_STRUCT.size) == 0x40182103
    assert sc.SECCOMP_IOCTL_NOTIF_SET_FLAGS == _ioc(w, 4, 8) == 0x40082104


def test_parse_notif_golden():
    raw = bytes.fromhex(
        "0807060504030201"  # id
        "44332211"          # pid (tid)
        "00000000"          # flags
        "2a000000"          # nr = 42
        "3e0000c0"          # arch = AUDIT_ARCH_X86_64
        "efcdab8967452301"  # instruction_pointer
        "0300000000000000"  # args[0] fd 3
        "00f0ffffff7f0000"  # args[1] pointer
        "1000000000000000"  # args[2] addrlen 16
        "ffffffffffffffff"
        "0000000001000000"
        "0600000000000000"
    )
    assert len(raw) == 80
    n = sc.parse_notif(raw)
    assert n == sc.Notification(
        id=0x0102030405060708, pid=0x11223344, flags=0, nr=42, arch=X86_64,
        ip=0x0123456789ABCDEF,
        args=(3, 0x7FFFFFFFF000, 16, 0xFFFFFFFFFFFFFFFF, 1 << 32, 6))
    # a larger kernel buffer (future kernels) parses the same prefix
    assert sc.parse_notif(bytearray(raw) + bytearray(16)) == n


def test_pack_resp_negates_errno():
    buf = bytearray(24)
    sc.pack_resp(buf, 5, error=errno.EACCES)
    assert bytes(buf) == bytes.fromhex("0500000000000000" "0000000000000000" "f3ffffff" "00000000")
    sc.pack_resp(buf, 0xFFFFFFFFFFFFFFFF, val=-2)
    assert bytes(buf) == bytes.fromhex("ffffffffffffffff" "feffffffffffffff" "00000000" "00000000")
    sc.pack_resp(buf, 1, flags=sc.SECCOMP_USER_NOTIF_FLAG_CONTINUE)
    assert bytes(buf) == bytes.fromhex("0100000000000000" "0000000000000000" "00000000" "01000000")


@pytest.mark.parametrize("bad", [-13, 4096])
def test_pack_resp_rejects_non_positive_errno(bad):
    with pytest.raises(ValueError):
        sc.pack_resp(bytearray(24), 1, error=bad)


def test_pack_addfd_golden():
    buf = bytearray(24)
    sc.pack_addfd(buf, 9, 5, newfd=7, cloexec=True)
    assert bytes(buf) == bytes.fromhex("0900000000000000" "01000000" "05000000" "07000000" "00000800")
    sc.pack_addfd(buf, 9, 5, send=True)
    assert bytes(buf) == bytes.fromhex("0900000000000000" "02000000" "05000000" "00000000" "00000000")
    sc.pack_addfd(buf, 9, 5, newfd=0)  # fd 0 is a valid target: SETFD must be set
    assert bytes(buf) == bytes.fromhex("0900000000000000" "01000000" "05000000" "00000000" "00000000")


def test_sock_filter_golden():
    assert sc.SOCK_FILTER_STRUCT.pack(0x15, 1, 2, 0xC000003E) == bytes.fromhex("1500" "01" "02" "3e0000c0")


def test_constants():
    assert sc.PIDFD_THREAD == 0o200
    assert sc.SECCOMP_FILTER_FLAG_NEW_LISTENER == 8
    assert sc.SECCOMP_FILTER_FLAG_WAIT_KILLABLE_RECV == 32
    assert (sc.SECCOMP_RET_USER_NOTIF, sc.SECCOMP_RET_ALLOW, sc.SECCOMP_RET_ERRNO) == \
        (0x7FC00000, 0x7FFF0000, 0x00050000)


# --- the filter compiler -------------------------------------------------------------

def test_small_filter_golden():
    spec = scf.FilterSpec(trap={42: scf.ArgMatch(2, frozenset({28, 16}))},
                         deny_errno={425: errno.ENOSYS})
    assert decode(scf.build_filter(spec)) == [
        (0x20, 0, 0, 4),                       # A = arch
        (0x15, 1, 0, X86_64),                  # x86_64? skip the RET
        (0x06, 0, 0, ERRNO | errno.ENOSYS),    # foreign arch
        (0x20, 0, 0, 0),                       # A = nr
        (0x45, 0, 1, 0x40000000),              # x32 bit?
        (0x06, 0, 0, ERRNO | errno.ENOSYS),
        (0x15, 0, 6, 42),                      # connect: 6-insn handler follows
        (0x20, 0, 0, 32),                      # A = low word of args[2]
        (0x15, 0, 1, 16),
        (0x06, 0, 0, NOTIF),
        (0x15, 0, 1, 28),
        (0x06, 0, 0, NOTIF),
        (0x06, 0, 0, ALLOW),
        (0x15, 0, 1, 425),                     # io_uring_setup
        (0x06, 0, 0, ERRNO | errno.ENOSYS),
        (0x06, 0, 0, ALLOW),
    ]


INET_LENS = (16, 28, 128)
OTHER_LENS = (0, 12, 110, 17, 27, 16 + (1 << 8))


@pytest.mark.parametrize("nr,argi", [(42, 2), (44, 5)])
def test_default_filter_traps_inet_sized_sockaddrs_only(nr, argi):
    prog = scf.build_filter(scf.default_graft_filter())
    for n in INET_LENS:
        args = [0] * 6
        args[argi] = n
        assert verdict(prog, nr, args=args) == NOTIF, (nr, n)
        args[argi] = n | (0xDEAD << 32)  # kernel truncates to int: still trapped
        assert verdict(prog, nr, args=args) == NOTIF, (nr, hex(args[argi]))
    for n in OTHER_LENS:
        args = [0] * 6
        args[argi] = n
        assert verdict(prog, nr, args=args) == ALLOW, (nr, n)
    # the other argument slots do not matter
    args = [16] * 6
    args[argi] = 110
    assert verdict(prog, nr, args=args) == ALLOW


@pytest.mark.parametrize("spec", [scf.default_graft_filter(), scf.default_graft_filter(False),
                                  scf.socket_graft_filter()], ids=["syscall", "no-sendto",
                                                                  "socket"])
@pytest.mark.parametrize("nr", [49, 50], ids=["bind", "listen"])
def test_every_bind_and_listen_is_trapped_whatever_its_arguments(spec, nr):
    """The kernel accepts inet bind lengths from 16 (IPv6: 24) to 128; the
    high word of an int register is ignored. No argument lets bind or
    listen slip past the agent."""
    prog = scf.build_filter(spec)
    for n in (*INET_LENS, *OTHER_LENS, 20, 24, 29, 32, 100, 127, (1 << 32) | 16, 2 ** 64 - 1):
        args = [3, 0x7FFF0000, n, 0, 0, 0]
        assert verdict(prog, nr, args=args) == NOTIF, (nr, hex(n))
        args[1] = n                                     # listen's backlog register
        assert verdict(prog, nr, args=args) == NOTIF, (nr, hex(n))


def test_socket_filter_compares_the_family_low_word_only():
    prog = scf.build_filter(scf.socket_graft_filter())
    for fam in (2, 10, (1 << 32) | 2, (0xFFFFFFFF << 32) | 10):
        assert verdict(prog, 41, args=(fam, 1, 0, 0, 0, 0)) == NOTIF, hex(fam)
    for fam in (1, 16, 17, (2 << 32) | 1):
        assert verdict(prog, 41, args=(fam, 1, 0, 0, 0, 0)) == ALLOW, hex(fam)


def test_default_filter_denies_io_uring_and_allows_the_rest():
    prog = scf.build_filter(scf.default_graft_filter())
    for nr in (425, 426, 427):
        assert verdict(prog, nr, args=(16,) * 6) == ERRNO | errno.ENOSYS
    for nr in (0, 1, 41, 43, 45, 46, 47, 48, 288, 424, 428, 434, 438, 500):
        assert verdict(prog, nr, args=(16,) * 6) == ALLOW, nr


def test_default_filter_foreign_arch_and_x32():
    prog = scf.build_filter(scf.default_graft_filter())
    # i386 socketcall(102) / connect(362) must not slip through untrapped
    for nr in (102, 362, 42, 1):
        assert verdict(prog, nr, arch=I386, args=(16,) * 6) == ERRNO | errno.ENOSYS
    assert verdict(prog, 42, arch=0xDEADBEEF, args=(16,) * 6) == ERRNO | errno.ENOSYS
    for nr in (0x40000000 | 42, 0x40000000 | 1, 0x40000000 | 519, -1):
        assert verdict(prog, nr, args=(16,) * 6) == ERRNO | errno.ENOSYS


def test_foreign_and_x32_verdicts_configurable():
    spec = scf.default_graft_filter()
    spec.foreign_arch_errno = errno.EPERM
    spec.x32_errno = errno.EAFNOSUPPORT
    prog = scf.build_filter(spec)
    assert verdict(prog, 102, arch=I386) == ERRNO | errno.EPERM
    assert verdict(prog, 0x40000000 | 42) == ERRNO | errno.EAFNOSUPPORT


def test_untrapped_syscalls_only_read_nr_and_arch():
    # lets the kernel's seccomp action cache mark them always-allowed
    insns = decode(scf.build_filter(scf.default_graft_filter()))
    for nr in (0, 1, 41, 51, 434):
        loads: list[int] = []
        assert run(insns, seccomp_data(nr, args=(16,) * 6), loads) == ALLOW
        assert set(loads) <= {0, 4}


def test_300_trapped_syscalls_jump_targets():
    trap: dict[int, scf.ArgMatch | None] = {}
    for nr in range(300):
        trap[nr] = None if nr % 7 == 0 else scf.ArgMatch(nr % 6, frozenset({16, 28, nr + 1000}))
    spec = scf.FilterSpec(trap=trap, deny_errno={425: errno.ENOSYS, 426: errno.ENOSYS,
                                                427: errno.ENOSYS, 1000: errno.EPERM})
    prog = scf.build_filter(spec)
    insns = decode(prog)
    assert len(insns) > 1000  # far past the 255 reach of one conditional jump
    check_program(insns)
    for nr in range(300):
        m = trap[nr]
        if m is None:
            assert run(insns, seccomp_data(nr, args=(5,) * 6)) == NOTIF
            continue
        for v in (16, 28, nr + 1000):
            args = [0] * 6
            args[m.arg_index] = v
            assert run(insns, seccomp_data(nr, args=args)) == NOTIF, (nr, v)
        args = [16] * 6
        args[m.arg_index] = 17
        assert run(insns, seccomp_data(nr, args=args)) == ALLOW, nr
    for nr in (425, 426, 427):
        assert run(insns, seccomp_data(nr)) == ERRNO | errno.ENOSYS
    assert run(insns, seccomp_data(1000)) == ERRNO | errno.EPERM
    for nr in (300, 301, 424, 428, 999, 1001):
        assert run(insns, seccomp_data(nr, args=(16,) * 6)) == ALLOW
    assert run(insns, seccomp_data(7, arch=I386)) == ERRNO | errno.ENOSYS
    assert run(insns, seccomp_data(0x40000000 | 7)) == ERRNO | errno.ENOSYS


def test_handler_longer_than_255_uses_ja():
    values = frozenset(range(100, 300))  # 2 + 2*200 = 402 insns
    spec = scf.FilterSpec(trap={42: scf.ArgMatch(2, values), 49: scf.ArgMatch(2, frozenset({16}))})
    insns = decode(scf.build_filter(spec))
    check_program(insns)
    assert (0x05, 0, 0, 402) in insns
    for v in (100, 200, 299):
        assert run(insns, seccomp_data(42, args=(0, 0, v, 0, 0, 0))) == NOTIF
    for v in (99, 300, 16):
        assert run(insns, seccomp_data(42, args=(0, 0, v, 0, 0, 0))) == ALLOW
    assert run(insns, seccomp_data(49, args=(0, 0, 16, 0, 0, 0))) == NOTIF
    assert run(insns, seccomp_data(49, args=(0, 0, 150, 0, 0, 0))) == ALLOW
    assert run(insns, seccomp_data(43, args=(0, 0, 150, 0, 0, 0))) == ALLOW


def test_empty_spec_allows_everything_native():
    insns = decode(scf.build_filter(scf.FilterSpec()))
    check_program(insns)
    assert run(insns, seccomp_data(42, args=(16,) * 6)) == ALLOW


@pytest.mark.parametrize("spec,fld", [
    (scf.FilterSpec(trap={42: None}, deny_errno={42: 1}), "trap/deny_errno"),
    (scf.FilterSpec(deny_errno={425: 0}), "deny_errno[425]"),
    (scf.FilterSpec(deny_errno={425: 5000}), "deny_errno[425]"),
    (scf.FilterSpec(trap={42: scf.ArgMatch(6, frozenset({16}))}), "trap[42].arg_index"),
    (scf.FilterSpec(trap={42: scf.ArgMatch(2, frozenset())}), "trap[42].values"),
    (scf.FilterSpec(trap={42: scf.ArgMatch(2, frozenset({1 << 32}))}), "trap[42].values"),
    (scf.FilterSpec(trap={0x40000000 | 42: None}), "trap/deny_errno[1073741866]"),
    (scf.FilterSpec(trap={-1: None}), "trap/deny_errno[-1]"),
    (scf.FilterSpec(foreign_arch_errno=0), "foreign_arch_errno"),
    (scf.FilterSpec(trap={nr: scf.ArgMatch(0, frozenset({1, 2, 3})) for nr in range(600)}), "trap"),
])
def test_bad_specs_say_where(spec, fld):
    with pytest.raises(ConfigError) as info:
        scf.build_filter(spec)
    assert info.value.field == fld


@pytest.mark.parametrize("spec", [scf.default_graft_filter, scf.socket_graft_filter],
                         ids=["syscall", "socket"])
def test_splice_is_trapped_only_when_asked(spec):
    """An agent that splices local pairs wants every splice() (out of a
    spliced socket the kernel would read nothing); other agents none."""
    args = (5, 0, 7, 0, 65536, 2)
    assert verdict(scf.build_filter(spec()), 275, args=args) == ALLOW
    assert verdict(scf.build_filter(scf.with_splice(spec())), 275, args=args) == NOTIF
    assert verdict(scf.build_filter(scf.with_splice(spec())), 276, args=args) == ALLOW   # tee


def test_epoll_create_is_trapped_only_when_asked():
    """A syscall-mode container of an agent that knows them traps
    epoll_create and epoll_create1 (the agent learns of each new epoll
    instance); epoll_ctl and epoll_wait never reach the agent."""
    plain = scf.build_filter(scf.default_graft_filter())
    asked = scf.build_filter(scf.with_epoll(scf.default_graft_filter()))
    for nr in (213, 291):                       # epoll_create, epoll_create1
        assert verdict(plain, nr, args=(0,) * 6) == ALLOW
        assert verdict(asked, nr, args=(0,) * 6) == NOTIF
    for nr in (233, 232, 281):                  # epoll_ctl, epoll_wait, epoll_pwait
        assert verdict(asked, nr, args=(0,) * 6) == ALLOW


# --- socket ioctls (model/ioctl.py) -------------------------------------------

@pytest.mark.parametrize("spec", [scf.default_graft_filter, scf.socket_graft_filter])
@pytest.mark.parametrize("cmd,trapped", [
    (0x8912, True),                 # SIOCGIFCONF
    (0x8933, True),                 # SIOCGIFINDEX
    (0x8946, True),                 # SIOCETHTOOL
    (0x8954, True),                 # SIOCGARP
    (0x894C, True),                 # SIOCGSKNS
    (0x8B01, True),                 # SIOCGIWNAME (wireless)
    (0xC0208933, True),             # type 0x89 with direction/size bits
    (0x8906, False),                # SIOCGSTAMP: the socket's own
    (0x80108906, False),            # SIOCGSTAMP_NEW
    (0x8905, False),                # SIOCATMARK
    (0x894B, False),                # SIOCOUTQNSD
    (0x541B, False),                # FIONREAD
    (0x5401, False),                # TCGETS
    (0x5421, False),                # FIONBIO
])
def test_socket_ioctls_are_trapped_and_the_sockets_own_are_not(spec, cmd, trapped):
    prog = scf.build_filter(spec())
    v = verdict(prog, sc.SYS_IOCTL, args=(3, cmd, 0x7000, 0, 0, 0))
    assert v == (NOTIF if trapped else ALLOW)
    # the kernel's cmd is an unsigned int: garbage in the high word changes nothing
    v_hi = verdict(prog, sc.SYS_IOCTL, args=(3, cmd | 0xDEAD << 32, 0x7000, 0, 0, 0))
    assert v_hi == v
    assert mioctl.trapped(cmd) == trapped


def test_masked_match_refuses_values_outside_its_mask():
    with pytest.raises(ConfigError, match="outside the mask"):
        scf.build_filter(scf.FilterSpec(trap={16: scf.ArgMasked(1, 0xFF00, frozenset({0x8901}))}))
    with pytest.raises(ConfigError, match="32-bit"):
        scf.build_filter(scf.FilterSpec(trap={16: scf.ArgMasked(1, 0xFF00, frozenset({-1}))}))
