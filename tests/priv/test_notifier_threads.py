"""Notifier threads against real seccomp listeners: a child in its own network
namespace gets host sockets (this process's namespace) with the container's
mark; what the threads do not answer reaches the loop; the threads end when
the child is gone or when they are stopped, and leave no fd behind. Each
test runs with socket() answered in Python and in the native loop
(sockgraft._answer), which counts instead of handing over records."""

import ctypes
import fcntl
import os
import select
import socket
import struct
import subprocess
import sys
import time

import pytest

from sockgraft.agent import notifiers
from sockgraft.kernel import seccomp
from sockgraft.kernel import seccomp_filter

pytestmark = pytest.mark.priv

MARK = 0x53470042
SIOCGSKNS = 0x894C
CLONE_NEWNET = 0x40000000


@pytest.fixture(params=["python", "native"])
def native_loop(request):
    if request.param == "native" and notifiers.native is None:
        pytest.fail(f"the native answer loop is not built: {notifiers.NATIVE_ERROR}")
    return request.param == "native"


def _answered(threads, inbox):
    """[(key, proto)] of the sockets answered: the records the Python threads
    handed over, or the native loop's counts."""
    if threads.table is None:
        return sorted((k, notifiers.unpack_answer(a).proto) for k, a in inbox.drain())
    got = threads.harvest()
    return sorted([(threads.key, "tcp")] * got.get("tcp", 0) +
                  [(threads.key, "udp")] * got.get("udp", 0))


def _fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _spawn(body, trap_listen=False):
    """Fork a child that enters a new netns, installs a socket() (and maybe
    listen()) trap, hands the listener over, waits for go, runs body(w) and
    exits; returns (pid, listener fd, go socket, report pipe)."""
    parent_sp, child_sp = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            parent_sp.close()
            os.close(r)
            if ctypes.CDLL(None, use_errno=True).unshare(CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "unshare")
            trap = {seccomp.SYS_SOCKET: seccomp_filter.ArgMatch(0, frozenset({2, 10}))}
            if trap_listen:
                trap[seccomp.SYS_LISTEN] = None
            fd = seccomp.install_filter(seccomp_filter.build_filter(
                seccomp_filter.FilterSpec(trap=trap, deny_errno={})))
            socket.send_fds(child_sp, [b"L"], [fd])
            os.close(fd)
            child_sp.recv(1)
            body(w)
        except BaseException:  # noqa: BLE001 - report through the exit code
            code = 3
        finally:
            os._exit(code)
    child_sp.close()
    os.close(w)
    _, fds, _, _ = socket.recv_fds(parent_sp, 16, 1)
    return pid, fds[0], parent_sp, r


def _listen(w):
    """A child's body: listen() on a fresh socket, report what came of it."""
    s = socket.socket()
    try:
        s.listen(1)
        os.write(w, b"listened")
    except OSError as exc:
        os.write(w, str(exc.errno).encode())


def _read_all(r) -> bytes:
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    return out


def _wait_gone(threads, timeout=5.0):
    deadline = time.monotonic() + timeout
    while threads.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    return threads.alive


def test_socket_calls_get_marked_host_sockets_and_threads_end_with_the_child(native_loop):
    def body(w):
        out = []
        for family, typ in ((2, 1), (10, 2), (2, 1 | socket.SOCK_NONBLOCK)):
            s = socket.socket(family, typ)
            ns = os.fstat(fcntl.ioctl(s.fileno(), SIOCGSKNS)).st_ino
            out.append(struct.pack("QII", ns, s.getsockopt(socket.SOL_SOCKET, 36),
                                   bool(os.get_blocking(s.fileno()))))
            s.close()
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
        ns = os.fstat(fcntl.ioctl(raw.fileno(), SIOCGSKNS)).st_ino
        out.append(struct.pack("QII", ns, raw.getsockopt(socket.SOL_SOCKET, 36), 1))
        os.write(w, b"".join(out))

    before = _fds()
    inbox = notifiers.Inbox()
    pid, fd, sp, r = _spawn(body)
    threads = notifiers.Notifiers(fd, MARK, "t", inbox, threads=2, native_loop=native_loop)
    assert (threads.table is not None) == native_loop
    sp.send(b"g")
    data = _read_all(r)
    rows = [struct.unpack_from("QII", data, i) for i in range(0, len(data), 16)]
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    host_ns = os.stat("/proc/self/ns/net").st_ino
    assert [row[:2] for row in rows[:3]] == [(host_ns, MARK)] * 3
    assert [row[2] for row in rows[:3]] == [1, 1, 0]          # SOCK_NONBLOCK kept
    assert rows[3][0] != host_ns and rows[3][1] == 0           # raw: the child's own
    assert _wait_gone(threads) == 0, "threads outlived every filtered task"
    # two threads: the hand-over order is not the call order
    assert _answered(threads, inbox) == [(fd, "tcp"), (fd, "tcp"), (fd, "udp")]
    os.close(fd)
    sp.close()
    inbox.close()
    assert _fds() == before


def test_other_calls_reach_the_loop_which_answers_them(native_loop):
    inbox = notifiers.Inbox()
    pid, fd, sp, r = _spawn(_listen, trap_listen=True)
    threads = notifiers.Notifiers(fd, MARK, "t", inbox, threads=2, native_loop=native_loop)
    loop = seccomp.Listener(fd)
    sp.send(b"g")
    deadline = time.monotonic() + 5
    forwarded = []
    while not forwarded and time.monotonic() < deadline:
        forwarded = [n for _, n in inbox.drain() if isinstance(n, seccomp.Notification)]
        time.sleep(0.005)
    assert [n.nr for n in forwarded] == [seccomp.SYS_LISTEN]
    loop.respond(forwarded[0].id, error=13)
    assert _read_all(r) == b"13"
    os.waitpid(pid, 0)
    assert _wait_gone(threads) == 0
    loop.close()
    sp.close()
    inbox.close()


def test_disabled_threads_forward_socket_calls_too(native_loop):
    """enabled() false (a container without a config): socket() goes to the
    loop, which lets the child create its own socket."""
    def body(w):
        s = socket.socket()
        os.write(w, struct.pack("I", s.getsockopt(socket.SOL_SOCKET, 36)))

    inbox = notifiers.Inbox()
    pid, fd, sp, r = _spawn(body)
    threads = notifiers.Notifiers(fd, MARK, "t", inbox, threads=1, enabled=lambda: False,
                                  native_loop=native_loop)
    loop = seccomp.Listener(fd)
    sp.send(b"g")
    deadline = time.monotonic() + 5
    got = []
    while not got and time.monotonic() < deadline:
        got = inbox.drain()
        time.sleep(0.005)
    assert [n.nr for _, n in got] == [seccomp.SYS_SOCKET]
    loop.continue_(got[0][1].id)
    assert struct.unpack("I", _read_all(r)) == (0,)
    os.waitpid(pid, 0)
    threads.stop()
    loop.close()
    sp.close()
    inbox.close()


def test_stop_interrupts_threads_blocked_in_recv_and_closes_their_fds(native_loop):
    def body(w):
        time.sleep(30)

    notifiers.install_wake_handler()
    before = _fds()
    inbox = notifiers.Inbox()
    pid, fd, sp, r = _spawn(body)
    threads = notifiers.Notifiers(fd, MARK, "t", inbox, threads=3, native_loop=native_loop)
    sp.send(b"g")
    time.sleep(0.1)
    assert threads.alive == 3
    t0 = time.monotonic()
    threads.stop()
    assert threads.alive == 0 and time.monotonic() - t0 < 2
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(fd)
    os.close(r)
    sp.close()
    inbox.close()
    assert _fds() == before


def test_many_sockets_all_answered_without_leaks(native_loop):
    n = 3000

    def body(w):
        for _ in range(n):
            socket.socket().close()
        os.write(w, b"ok")

    before = _fds()
    inbox = notifiers.Inbox()
    pid, fd, sp, r = _spawn(body)
    threads = notifiers.Notifiers(fd, MARK, "t", inbox, threads=2, native_loop=native_loop)
    sp.send(b"g")
    assert _read_all(r) == b"ok"
    os.waitpid(pid, 0)
    assert _wait_gone(threads) == 0
    if native_loop:
        got = threads.harvest()
        assert got["tcp"] == n and got["refused"] == 0 and got["handed"] == 0
        assert not inbox.drain()
    else:
        answers = [notifiers.unpack_answer(a) for _, a in inbox.drain()]
        assert len(answers) == n and {a.tid for a in answers} == {pid}
        assert len({a.inode for a in answers}) > 1      # fresh host sockets, not one reused
    os.close(fd)
    sp.close()
    inbox.close()
    assert _fds() == before


# --- what only the native loop decides (the Python path: tests/unit/test_notifier_model.py)

def _plain_errno(family, typ, proto):
    try:
        socket.socket(family, typ, proto).close()
        return 0
    except OSError as exc:
        return exc.errno


HOSTILE = [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_UDP),     # proto mismatch
           (socket.AF_INET, socket.SOCK_STREAM | 0x4000, 0),              # unknown flag
           (socket.AF_INET6, socket.SOCK_SEQPACKET, 0),                   # not a graft kind
           (socket.AF_INET, 0xF, 0),                                      # type out of range
           (socket.AF_INET, socket.SOCK_DGRAM, 1 << 20)]                  # huge protocol


def test_native_loop_lets_the_kernel_answer_what_it_does_not_graft():
    """socket() calls the native loop does not graft continue in the kernel
    (the container's own answer, the same errno as an unfiltered process
    gets); nothing reaches the agent's loop, and the counts say so."""
    def body(w):
        out = []
        for family, typ, proto in HOSTILE:
            try:
                s = socket.socket(family, typ, proto)
                out.append(struct.pack("iI", 0, s.getsockopt(socket.SOL_SOCKET, 36)))
                s.close()
            except OSError as exc:
                out.append(struct.pack("iI", exc.errno, 0))
        os.write(w, b"".join(out))

    if notifiers.native is None:
        pytest.fail(f"the native answer loop is not built: {notifiers.NATIVE_ERROR}")
    inbox = notifiers.Inbox()
    pid, fd, sp, r = _spawn(body)
    threads = notifiers.Notifiers(fd, MARK, "t", inbox, threads=1, native_loop=True)
    sp.send(b"g")
    data = _read_all(r)
    os.waitpid(pid, 0)
    got = [struct.unpack_from("iI", data, i) for i in range(0, len(data), 8)]
    assert [e for e, _ in got] == [_plain_errno(*h) for h in HOSTILE]
    assert all(mark == 0 for _, mark in got)            # none is a host socket
    assert _wait_gone(threads) == 0
    counts = threads.harvest()
    assert counts["continued"] == len(HOSTILE) and counts["tcp"] == counts["udp"] == 0
    assert not inbox.drain()
    os.close(fd)
    sp.close()
    inbox.close()


def test_native_configuration_swaps_while_threads_wait():
    """refresh() after enabled() changed: the next socket() follows it."""
    state = {"on": True}

    def body(w):
        marks = []
        for _ in range(2):
            s = socket.socket()
            marks.append(s.getsockopt(socket.SOL_SOCKET, 36))
            s.close()
            time.sleep(0.3)         # the parent turns grafting off meanwhile
        os.write(w, struct.pack("II", *marks))

    if notifiers.native is None:
        pytest.fail(f"the native answer loop is not built: {notifiers.NATIVE_ERROR}")
    inbox = notifiers.Inbox()
    pid, fd, sp, r = _spawn(body)
    threads = notifiers.Notifiers(fd, MARK, "t", inbox, threads=1, native_loop=True,
                                  enabled=lambda: state["on"])
    loop = seccomp.Listener(fd)
    sp.send(b"g")
    time.sleep(0.1)
    state["on"] = False
    threads.refresh()
    deadline = time.monotonic() + 5
    got = []
    while not got and time.monotonic() < deadline:
        got = [n for _, n in inbox.drain()]
        time.sleep(0.005)
    assert [n.nr for n in got] == [seccomp.SYS_SOCKET]
    loop.continue_(got[0].id)
    assert struct.unpack("II", _read_all(r)) == (MARK, 0)
    os.waitpid(pid, 0)
    threads.stop()
    loop.close()
    sp.close()
    inbox.close()


def _in_cgroup(path):
    """Move this process into cgroup path; returns the path it was in."""
    with open("/proc/self/cgroup") as f:
        old = f.read().strip().split("::", 1)[1]
    from sockgraft.kernel import bpf as kbpf
    with open(os.path.join(path, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    return os.path.join(kbpf.cgroup2_mount(), old.lstrip("/"))


@pytest.mark.parametrize("program", ["attached", "missing"])
def test_native_host_sockets_are_born_marked_and_tagged(program):
    """With the guards, the native loop's host sockets get the container's
    mark and tag at birth (sg_born_sock, from the serving thread's sg_born
    entry) instead of an SO_MARK and a map update each: every socket the
    child gets carries the mark and the tag of the mark's generation. Without
    the program the first socket is seen unmarked and the loop marks and
    tags by hand from then on - the same result, nothing born counted."""
    import secrets
    from sockgraft.kernel import bpf as kbpf
    from sockgraft.kernel import sockets as ksock
    if notifiers.native is None:
        pytest.fail(f"the native answer loop is not built: {notifiers.NATIVE_ERROR}")

    def body(w):
        for family, typ in ((2, 1), (10, 1), (2, 2), (2, 1)):
            s = socket.socket(family, typ)
            socket.send_fds(w_sock, [b"s"], [s.fileno()])
            s.close()

    name = "tborn-" + secrets.token_hex(3)
    progs = kbpf.Programs(name)
    progs.load(join=False)
    back = None
    try:
        progs.attach()
        progs.set_gen(MARK, 7)
        if program == "missing":
            progs.born_detach()
        back = _in_cgroup(progs.cgroup)
        r_sock, w_sock = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        inbox = notifiers.Inbox()
        pid, fd, sp, r = _spawn(body)
        w_sock.close()
        threads = notifiers.Notifiers(fd, MARK, "t", inbox, threads=1, native_loop=True,
                                      sockets=ksock.HostSockets(tag=progs.tag))
        sp.send(b"g")
        got = []
        for _ in range(4):
            _, fds, _, _ = socket.recv_fds(r_sock, 16, 1)
            s = socket.socket(fileno=fds[0])
            got.append((s.getsockopt(socket.SOL_SOCKET, 36), progs.tag_of(s.fileno())))
            s.close()
        _read_all(r)
        os.waitpid(pid, 0)
        assert got == [(MARK, (MARK, kbpf.T_OWNED))] * 4, got     # (made under the mark's uid)
        born = threads.harvest().get("born", 0)
        # the first socket is the one the loop looks at; the spares after it
        assert (born >= 3) if program == "attached" else born == 0, born
        threads.stop()
        os.close(fd)
        sp.close()
        r_sock.close()
        inbox.close()
        assert not progs.keys("sg_born", 8), "the serving thread's entry outlived it"
    finally:
        if back:
            _in_cgroup(back)
        progs.close()
        kbpf.remove(name)
    assert not kbpf.leftovers(name)


def _cgroup_programs(path):
    """The names of the programs attached to cgroup path (bpftool)."""
    import json
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", path], capture_output=True,
                         text=True, check=True).stdout
    return {p["name"] for p in json.loads(out or "[]")}


def test_the_born_program_dies_with_its_agent():
    """sg_born_sock and its sg_born entries (thread id -> a container's tag)
    must not outlive the agent that wrote them: another process that got a
    crashed serving thread's ids would have its sockets marked as that
    container's. Killed with SIGKILL, the agent leaves the guards attached
    (pinned: the grafted sockets stay guarded) but not sg_born_sock."""
    import secrets
    from sockgraft.kernel import bpf as kbpf
    name = "tborn-" + secrets.token_hex(3)
    child = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time\n"
         "from sockgraft.kernel import bpf\n"
         "p = bpf.Programs(sys.argv[1]); p.load(join=False); p.attach()\n"
         "print(p.cgroup, flush=True); time.sleep(60)\n", name],
        stdout=subprocess.PIPE, text=True)
    try:
        cgroup = child.stdout.readline().strip()
        assert cgroup, "the agent stand-in did not attach"
        attached = _cgroup_programs(cgroup)
        assert {"sg_born_sock", "sg_connect4", "sg_egress"} <= attached, attached
        child.kill()
        child.wait()
        deadline = time.monotonic() + 5
        while "sg_born_sock" in (attached := _cgroup_programs(cgroup)) and \
                time.monotonic() < deadline:
            time.sleep(0.05)        # (the link goes with the last fd, maybe deferred)
        assert "sg_born_sock" not in attached, attached
        assert {"sg_connect4", "sg_egress"} <= attached, attached
    finally:
        child.kill()
        child.wait()
        kbpf.remove(name)
    assert not kbpf.leftovers(name)


def test_a_worker_that_failed_to_start_closes_none_of_the_agents_fds():
    """A native Worker whose __init__ fails (here: a bad listener fd; in the
    agent: EMFILE) is deallocated at once: its close must not close fd 0 -
    nor, once fd 0 is gone, whatever fd is opened there next - once for each
    of its fd fields."""
    if notifiers.native is None:
        pytest.fail(f"the native answer loop is not built: {notifiers.NATIVE_ERROR}")
    r, w = os.pipe()
    saved = os.dup(0)
    try:
        os.dup2(r, 0)
        want = os.fstat(0).st_ino
        for bad in (1 << 20, -1):
            with pytest.raises(OSError):
                notifiers.native.Worker(bad, notifiers.native.Table())
        with pytest.raises(TypeError):
            notifiers.native.Worker("not an fd", notifiers.native.Table())
        assert os.fstat(0).st_ino == want, "fd 0 was closed (or replaced)"
    finally:
        os.dup2(saved, 0)
        for fd in (saved, r, w):
            os.close(fd)


def test_a_call_received_while_the_agent_stops_is_answered_all_the_same(native_loop):
    """The agent refuses a thread's call (serve() false: it is stopping, or
    the session is gone): nobody else will answer it - the kernel hands a
    notification out once, also not to the next agent - so the thread lets
    the kernel go on with it (the child's own listen succeeds). It was
    forwarded to a loop that no longer ran: the call waited for good."""
    inbox = notifiers.Inbox()
    pid, fd, sp, r = _spawn(_listen, trap_listen=True)
    threads = notifiers.Notifiers(fd, MARK, "t", inbox, threads=2, native_loop=native_loop,
                                  serve=lambda key, n, listener: False)
    sp.send(b"g")
    ready = select.select([r], [], [], 5)[0]
    assert ready, "the trapped listen() was never answered"
    assert _read_all(r) == b"listened"
    assert not [n for _, n in inbox.drain() if isinstance(n, seccomp.Notification)]
    os.waitpid(pid, 0)
    assert _wait_gone(threads) == 0
    os.close(fd)
    sp.close()
    inbox.close()
