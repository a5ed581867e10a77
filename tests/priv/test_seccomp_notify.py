"""Privileged tests of sockgraft.kernel.seccomp against the real kernel.

Each test forks a child that installs a filter and hands the listener fd back
over a socketpair; the parent (this process) services the trapped calls. The
child reports what it saw as JSON lines on a pipe. Every wait is bounded and
the `spawn` fixture SIGKILLs and reaps any child left behind; `fd_guard`
checks that no test leaks an fd in this process.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import mmap
import os
import select
import signal
import socket
import struct
import threading
import time
from typing import Callable

import pytest

from sockgraft.errors import KernelError, NotFound
from sockgraft.kernel import seccomp as sc
from sockgraft.kernel import seccomp_filter as scf

pytestmark = pytest.mark.priv

if os.geteuid() != 0:
    pytest.skip("needs root (seccomp notify, /proc/PID/mem of other processes)",
                allow_module_level=True)

LOOPBACK = "127.0.0.1"
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


# --- harness --------------------------------------------------------------------

class Blocked(Exception):
    """A call that must return at once blocked (raised by SIGALRM)."""


@contextlib.contextmanager
def deadline(seconds: float):
    def on_alarm(*_):
        raise Blocked(f"still blocked after {seconds}s")
    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Child:
    def __init__(self, pid: int, listener: sc.Listener, rfd: int) -> None:
        self.pid = pid
        self.listener = listener
        self.rfd = rfd
        self.status: int | None = None
        self._buf = b""

    def expect(self, timeout: float = 5.0, *, quiet: bool = False) -> dict:
        """Next report of the child. quiet: fail if a notification shows up
        while waiting (the child must not be trapped meanwhile)."""
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise AssertionError(f"child {self.pid} did not report within {timeout}s")
            fds = [self.rfd] + ([self.listener.fileno()] if quiet else [])
            ready, _, _ = select.select(fds, [], [], left)
            if quiet and self.listener.poll(0) & select.POLLIN:
                raise AssertionError(f"unexpected notification {self.listener.recv()}")
            if self.rfd in ready:
                chunk = os.read(self.rfd, 65536)
                if not chunk:
                    raise AssertionError(f"child {self.pid} ended without reporting")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        rep = json.loads(line)
        if "exception" in rep:
            raise AssertionError(f"child {self.pid} failed: {rep['exception']}")
        return rep

    def notif(self, timeout: float = 5.0) -> sc.Notification:
        ev = self.listener.poll(int(timeout * 1000))
        assert ev & select.POLLIN, f"no notification within {timeout}s (revents {ev:#x})"
        return self.listener.recv()

    def wait(self, timeout: float = 5.0) -> int:
        """Reap the child; returns its exit code (fails on a signal death)."""
        end = time.monotonic() + timeout
        while self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                break
            if time.monotonic() > end:
                self.kill()
                raise AssertionError(f"child {self.pid} did not exit within {timeout}s")
            time.sleep(0.002)
        assert os.WIFEXITED(self.status), f"child died: status {self.status:#x}"
        return os.WEXITSTATUS(self.status)

    def kill(self) -> None:
        if self.status is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGKILL)
        end = time.monotonic() + 10
        while time.monotonic() < end:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = status
                return
            time.sleep(0.002)
        raise AssertionError(f"child {self.pid} survived SIGKILL")

    def close(self) -> None:
        try:
            self.kill()
        finally:
            self.listener.close()
            if self.rfd >= 0:
                os.close(self.rfd)
                self.rfd = -1


Report = Callable[..., None]


def fork_child(body: Callable[[Report], None], spec: scf.FilterSpec | None = None) -> Child:
    prog = scf.build_filter(spec or scf.default_graft_filter())  # built before fork
    psock, csock = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            psock.close()
            os.close(rfd)

            def report(**kw) -> None:
                os.write(wfd, (json.dumps(kw) + "\n").encode())

            try:
                lfd = sc.install_filter(prog)
                socket.send_fds(csock, [b"L"], [lfd])  # sendmsg: not trapped
                os.close(lfd)
                csock.close()
                body(report)
                code = 0
            except BaseException as exc:  # noqa: BLE001 - shipped to the parent
                report(exception=repr(exc))
        finally:
            os._exit(code)
    csock.close()
    os.close(wfd)
    try:
        psock.settimeout(5)
        _, fds, _, _ = socket.recv_fds(psock, 16, 1)
    except BaseException:
        os.close(rfd)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise
    finally:
        psock.close()
    if len(fds) != 1:
        for fd in fds:
            os.close(fd)
        os.close(rfd)
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"child sent {len(fds)} fds, expected the listener")
    return Child(pid, sc.Listener(fds[0]), rfd)


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def fd_guard():
    before = fd_count()
    yield
    assert fd_count() == before, f"fd leak: {before} fds before the test, {fd_count()} after"


@pytest.fixture
def spawn(fd_guard):
    children: list[Child] = []

    def _spawn(body, spec=None) -> Child:
        c = fork_child(body, spec)
        children.append(c)
        return c

    yield _spawn
    for c in children:
        c.close()


@pytest.fixture
def mem(fd_guard):
    m = sc.TargetMemory()
    yield m
    m.close()


@pytest.fixture
def tcp_server(fd_guard):
    srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.bind((LOOPBACK, 0))
    srv.listen(16)
    srv.settimeout(5)
    yield srv
    srv.close()


def parse_sin(raw: bytes) -> tuple[int, str, int]:
    family, port, addr = struct.unpack("=H2s4s8x", raw)
    return family, socket.inet_ntoa(addr), int.from_bytes(port, "big")


def fdinfo_flags(pid: int, fd: int) -> int:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return int(line.split()[1], 8)
    raise AssertionError("no flags line")


def fdinfo_field(pid: int, fd: int, name: str) -> str:
    with open(f"/proc/{pid}/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith(name + ":"):
                return line.split(":", 1)[1].strip()
    raise AssertionError(f"no {name} line")


# --- (a) deny with EACCES after reading the sockaddr -----------------------------

def _connect_port1(report: Report) -> None:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    report(fd=s.fileno())
    try:
        s.connect((LOOPBACK, 1))
        report(result="connected")
    except OSError as exc:
        report(errno=exc.errno)


def test_connect_trapped_and_denied(spawn, mem):
    child = spawn(_connect_port1)
    fd = child.expect()["fd"]
    n = child.notif()
    assert (n.nr, n.arch, n.pid) == (sc.SYS_CONNECT, sc.AUDIT_ARCH_X86_64, child.pid)
    assert n.args[0] == fd and n.args[2] == 16
    assert parse_sin(mem.read(n.pid, n.args[1], n.args[2])) == (socket.AF_INET, LOOPBACK, 1)
    assert child.listener.id_valid(n.id)
    child.listener.respond(n.id, error=errno.EACCES)
    assert not child.listener.id_valid(n.id)
    assert child.expect() == {"errno": errno.EACCES}
    assert child.wait() == 0


# --- (b) CONTINUE -------------------------------------------------------------------

def test_continue_lets_connect_through(spawn, mem, tcp_server):
    addr = tcp_server.getsockname()

    def body(report):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.connect(addr)
        s.sendall(b"via-continue")
        report(sockname=s.getsockname())

    child = spawn(body)
    n = child.notif()
    assert n.nr == sc.SYS_CONNECT
    assert parse_sin(mem.read(n.pid, n.args[1], 16)) == (socket.AF_INET, *addr)
    child.listener.continue_(n.id)
    conn, peer = tcp_server.accept()
    with conn:
        conn.settimeout(5)
        assert conn.recv(100) == b"via-continue"
    assert tuple(child.expect()["sockname"]) == peer
    assert child.wait() == 0


# --- (c) ADDFD replaces the child's socket ---------------------------------------------

def test_addfd_replaces_socket_at_same_fd(spawn, mem, tcp_server):
    srv_addr = tcp_server.getsockname()

    def body(report):
        socks = [socket.socket(socket.AF_INET, socket.SOCK_STREAM) for _ in range(2)]
        report(fds=[s.fileno() for s in socks])
        for s in socks:
            try:
                s.connect((LOOPBACK, 9))  # nothing listens: only grafting makes this work
            except OSError as exc:
                report(errno=exc.errno)
                continue
            s.sendall(b"grafted-%d" % s.fileno())
            report(peer=s.getpeername())

    child = spawn(body)
    fds = child.expect()["fds"]
    for fd, cloexec in zip(fds, (True, False)):
        n = child.notif()
        assert n.nr == sc.SYS_CONNECT and n.args[0] == fd
        assert parse_sin(mem.read(n.pid, n.args[1], 16)) == (socket.AF_INET, LOOPBACK, 9)
        # Python opens sockets close-on-exec: clearing it proves newfd_flags is used
        assert fdinfo_flags(child.pid, fd) & os.O_CLOEXEC
        with socket.create_connection(srv_addr, timeout=5) as host:
            conn, _ = tcp_server.accept()
            with conn:
                conn.settimeout(5)
                assert child.listener.addfd(n.id, host.fileno(), newfd=fd, cloexec=cloexec) == fd
                assert bool(fdinfo_flags(child.pid, fd) & os.O_CLOEXEC) is cloexec
                assert os.stat(f"/proc/{child.pid}/fd/{fd}").st_ino == os.fstat(host.fileno()).st_ino
                child.listener.respond(n.id)
                assert tuple(child.expect()["peer"]) == srv_addr
                assert conn.recv(100) == b"grafted-%d" % fd
    assert child.wait() == 0


def test_addfd_send_answers_with_the_new_fd(spawn, tcp_server):
    srv_addr = tcp_server.getsockname()

    def body(report):
        libc = ctypes.CDLL(None, use_errno=True)
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sa = struct.pack("=H2s4s8x", socket.AF_INET, (9).to_bytes(2, "big"),
                         socket.inet_aton(LOOPBACK))
        ret = libc.connect(s.fileno(), sa, len(sa))
        report(ret=ret, fd=s.fileno(), errno=ctypes.get_errno())
        if ret > 0:
            os.write(ret, b"sent-via-SEND")

    child = spawn(body)
    n = child.notif()
    with socket.create_connection(srv_addr, timeout=5) as host:
        conn, _ = tcp_server.accept()
        with conn:
            conn.settimeout(5)
            newfd = child.listener.addfd(n.id, host.fileno(), send=True)
            assert not child.listener.id_valid(n.id)  # SEND answered it
            rep = child.expect()
            assert rep["ret"] == newfd and newfd not in (rep["fd"], -1)
            assert conn.recv(100) == b"sent-via-SEND"
    assert child.wait() == 0


# --- (d) unix and netlink sockets are never trapped ------------------------------------

def test_unix_and_netlink_not_trapped(spawn, tmp_path):
    path = str(tmp_path / "u.sock")
    assert len(path) < 108
    usrv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    go_r, go_w = os.pipe()
    try:
        usrv.bind(path)
        usrv.listen(4)
        usrv.settimeout(5)

        def body(report):
            libc = ctypes.CDLL(None, use_errno=True)
            u = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sun = struct.pack("=H108s", socket.AF_UNIX, path.encode())
            assert len(sun) == 110
            ret = libc.connect(u.fileno(), sun, 110)  # full sizeof(sockaddr_un)
            report(step="unix", ret=ret, errno=ctypes.get_errno())
            ud = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            ret = libc.sendto(ud.fileno(), b"x", 1, 0, sun, 110)
            report(step="unix-sendto", ret=ret, errno=ctypes.get_errno())
            nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            snl = struct.pack("=HHII", socket.AF_NETLINK, 0, 0, 0)
            libc.connect(nl.fileno(), snl, 12)  # addrlen 12 (every bind is trapped)
            report(step="netlink", pid=nl.getsockname()[0])
            # positive control: an inet connect is trapped, and it is the first
            # notification, so nothing above was
            os.read(go_r, 1)
            _connect_port1(report)

        child = spawn(body)
        rep = child.expect(quiet=True)
        assert rep == {"step": "unix", "ret": 0, "errno": rep["errno"]}
        usrv.accept()[0].close()
        rep = child.expect(quiet=True)
        # a stream listener refuses datagrams: the kernel ran it, untrapped
        assert rep["step"] == "unix-sendto" and rep["ret"] == -1 and rep["errno"] != 0
        rep = child.expect(quiet=True)
        assert rep["step"] == "netlink" and rep["pid"] > 0
        assert child.listener.poll(0) == 0
        os.write(go_w, b"g")
        assert "fd" in child.expect()
        n = child.notif()
        assert n.nr == sc.SYS_CONNECT and n.args[2] == 16
        child.listener.respond(n.id, error=errno.EACCES)
        assert child.expect() == {"errno": errno.EACCES}
        assert child.wait() == 0
    finally:
        usrv.close()
        os.close(go_r)
        os.close(go_w)


# --- (e) io_uring, x32 and foreign-arch verdicts ------------------------------------------

def _io_uring_calls() -> list[tuple[int, int]]:
    params = ctypes.create_string_buffer(120)
    out = []
    for nr, args in ((sc.SYS_IO_URING_SETUP, (4, ctypes.addressof(params))),
                     (sc.SYS_IO_URING_ENTER, (1000, 0, 0, 0, 0, 0)),
                     (sc.SYS_IO_URING_REGISTER, (1000, 0, 0, 0))):
        ret = _libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args))
        out.append((ret, ctypes.get_errno()))
        if ret >= 0:
            os.close(ret)
    return out


def test_io_uring_denied_with_enosys(spawn):
    # without the filter this kernel must answer otherwise, or ENOSYS proves nothing
    here = _io_uring_calls()
    if here[0][0] == -1 and here[0][1] == errno.ENOSYS:
        pytest.skip("kernel without io_uring: io_uring_setup is ENOSYS even unfiltered")
    assert here[0][0] >= 0 or here[0][1] != errno.ENOSYS
    assert here[1] != (-1, errno.ENOSYS)  # EBADF on fd 1000

    child = spawn(lambda report: report(calls=_io_uring_calls()))
    assert child.expect(quiet=True)["calls"] == [[-1, errno.ENOSYS]] * 3
    assert child.wait() == 0


_X32_GETPID = 0x40000000 | 39
# mov eax, 20 (i386 getpid) ; int 0x80 ; ret
_I386_GETPID = bytes.fromhex("b814000000" "cd80" "c3")


def _int80_getpid() -> int:
    m = mmap.mmap(-1, mmap.PAGESIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                  prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    m.write(_I386_GETPID)
    fn = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(m)))
    return fn()  # the fork child exits right after; the mapping is not freed


def _arch_probe(report):
    ret = _libc.syscall(ctypes.c_long(_X32_GETPID))
    report(x32=[ret, ctypes.get_errno()], i386=_int80_getpid())


def _i386_works() -> bool:
    # probe in a throwaway child: int 0x80 kills the caller where IA32 is off
    pid = os.fork()
    if pid == 0:
        os._exit(0 if _int80_getpid() == os.getpid() else 1)
    end = time.monotonic() + 5
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
        if time.monotonic() > end:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return False
        time.sleep(0.002)


@pytest.mark.parametrize("foreign,x32", [(errno.ENOSYS, errno.ENOSYS), (errno.EACCES, errno.EPERM)])
def test_foreign_arch_and_x32_denied(spawn, foreign, x32):
    if not _i386_works():
        pytest.skip("IA32 emulation is off: int 0x80 cannot be probed")
    spec = scf.default_graft_filter()
    spec.foreign_arch_errno = foreign
    spec.x32_errno = x32
    child = spawn(_arch_probe, spec)
    rep = child.expect(quiet=True)
    assert rep["x32"] == [-1, x32]
    assert rep["i386"] == -foreign  # raw int 0x80 returns -errno in eax
    assert child.wait() == 0


# --- (f) the end of the filtered tasks ----------------------------------------------------

def test_listener_hangs_up_after_child_exit(spawn):
    child = spawn(_connect_port1)
    child.expect()
    n = child.notif()
    child.listener.respond(n.id, error=errno.ECONNREFUSED)
    assert child.expect() == {"errno": errno.ECONNREFUSED}
    assert child.wait() == 0
    ev = child.listener.poll(2000)
    assert ev & select.POLLHUP, f"revents {ev:#x}"
    with deadline(2):
        for _ in range(3):  # and stays so, without blocking
            with pytest.raises(NotFound):
                child.listener.recv()


def test_target_killed_while_trapped(spawn, mem):
    child = spawn(_connect_port1)
    child.expect()
    n = child.notif()
    child.kill()
    assert not child.listener.id_valid(n.id)
    with pytest.raises(NotFound):
        child.listener.respond(n.id, error=errno.EACCES)
    with socket.socket() as s, pytest.raises(NotFound):
        child.listener.addfd(n.id, s.fileno(), newfd=n.args[0])
    with pytest.raises(NotFound):
        mem.read(n.pid, n.args[1], 16)


def test_closed_listener_means_enosys(spawn):
    go_r, go_w = os.pipe()
    try:
        def body(report):
            os.read(go_r, 1)
            _connect_port1(report)

        child = spawn(body)
        child.listener.close()
        os.write(go_w, b"g")
        child.expect()
        assert child.expect() == {"errno": errno.ENOSYS}
        assert child.wait() == 0
    finally:
        os.close(go_r)
        os.close(go_w)


# --- (g) a non-leader thread --------------------------------------------------------------

def test_notification_from_non_leader_thread(spawn, mem):
    def body(report):
        def run():
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            report(tid=threading.get_native_id(), fd=s.fileno())
            try:
                s.connect((LOOPBACK, 1))
                report(result="connected")
            except OSError as exc:
                report(errno=exc.errno)

        t = threading.Thread(target=run)
        t.start()
        t.join(30)

    child = spawn(body)
    rep = child.expect()
    tid, fd = rep["tid"], rep["fd"]
    n = child.notif()
    assert n.pid == tid != child.pid
    pidfd = sc.pidfd_open(tid)
    try:
        assert fdinfo_field(os.getpid(), pidfd, "Pid") == str(tid)
        assert fdinfo_flags(os.getpid(), pidfd) & sc.PIDFD_THREAD  # needed the retry
        dup = sc.pidfd_getfd(pidfd, n.args[0])
        with socket.socket(fileno=dup) as s:
            assert (s.family, s.type) == (socket.AF_INET, socket.SOCK_STREAM)
            assert os.fstat(dup).st_ino == os.stat(f"/proc/{child.pid}/fd/{fd}").st_ino
    finally:
        os.close(pidfd)
    assert parse_sin(mem.read(n.pid, n.args[1], 16)) == (socket.AF_INET, LOOPBACK, 1)
    assert len(mem) == 1
    assert child.listener.id_valid(n.id)
    child.listener.respond(n.id, error=errno.EACCES)
    assert child.expect() == {"errno": errno.EACCES}
    assert child.wait() == 0


def test_pidfd_open_leader_is_a_process_pidfd(spawn):
    child = spawn(lambda report: time.sleep(30))
    pidfd = sc.pidfd_open(child.pid)
    try:
        assert fdinfo_field(os.getpid(), pidfd, "Pid") == str(child.pid)
        assert not fdinfo_flags(os.getpid(), pidfd) & sc.PIDFD_THREAD
    finally:
        os.close(pidfd)
    child.kill()
    with pytest.raises(NotFound):
        sc.pidfd_open(child.pid)


# --- TargetMemory cache -----------------------------------------------------------------

def test_target_memory_lru_and_thread_exit(mem):
    data = ctypes.create_string_buffer(b"sockgraft-memory", 16)
    addr = ctypes.addressof(data)
    stop = threading.Event()
    tids: list[int] = []
    lock = threading.Lock()

    def park():
        with lock:
            tids.append(threading.get_native_id())
        stop.wait(30)

    threads = [threading.Thread(target=park) for _ in range(6)]
    small = sc.TargetMemory(max_entries=4)
    try:
        for t in threads:
            t.start()
        end = time.monotonic() + 5
        while len(tids) < 6 and time.monotonic() < end:
            time.sleep(0.001)
        before = fd_count()
        for tid in tids:
            assert small.read(tid, addr, 16) == b"sockgraft-memory"
        assert len(small) == 4
        assert fd_count() == before + 8  # mem fd + pidfd per entry, bounded
        small.forget(tids[-1])
        assert len(small) == 3 and fd_count() == before + 6
        with pytest.raises(KernelError) as info:
            small.read(tids[2], 4096, 8)  # unmapped page: a fault, not "gone"
        assert info.value.errno == errno.EFAULT and not isinstance(info.value, NotFound)
        # a thread that exits is noticed through its pidfd, not read stale
        stop.set()
        for t in threads:
            t.join(5)
        # join() returns when Python's thread state is done, a moment before
        # the kernel task is gone: wait for the task itself
        end = time.monotonic() + 5
        while os.path.exists(f"/proc/self/task/{tids[3]}") and time.monotonic() < end:
            time.sleep(0.005)
        with pytest.raises(NotFound):
            small.read(tids[3], addr, 16)
        assert len(small) == 2
    finally:
        stop.set()
        small.close()
    assert len(small) == 0
