"""What a container can make the agent keep is bounded: the thread ids a
session remembers follow the pidfd cache (a container churning threads
grows nothing), and the table of grafted-socket records is pruned past its
limit (closed sockets first, then the oldest)."""

import os
import socket
import threading
import time

from sockgraft.agent.inventory import GraftedSocket, Inventory
from sockgraft.agent.targets import Targets


def test_a_session_forgets_threads_the_pidfd_cache_forgot():
    t = Targets(max_threads=4)
    ids = []
    for _ in range(10):                   # ten threads that lived and ended
        th = threading.Thread(target=lambda: ids.append(threading.get_native_id()))
        th.start()
        th.join()
    me = threading.get_native_id()
    t.pidfd(me)                           # one cached, alive
    tids = set(ids) | {me}
    tids.difference_update(t.exited(tids))
    assert tids == {me}
    t.close()


def test_the_record_table_is_pruned_past_its_limit():
    inv = Inventory()
    live = [socket.socket() for _ in range(3)]
    try:
        pid = os.getpid()
        for n in range(50):               # records of sockets closed since
            inv.grafted[(pid, 10000 + n)] = GraftedSocket("c1", pid, 10000 + n, 1, "tcp",
                                                          "egress", "", "", "", time.time())
        for s in live:
            ino = os.fstat(s.fileno()).st_ino
            inv.grafted[(pid, s.fileno())] = GraftedSocket("c1", pid, s.fileno(), ino, "tcp",
                                                           "egress", "", "", "", time.time())
        assert inv.prune(limit=100) == 0 and len(inv.grafted) == 53
        assert inv.prune(limit=10) == 50
        assert set(inv.grafted) == {(pid, s.fileno()) for s in live}
        assert inv.prune(limit=2) == 2 and set(inv.grafted) == {(pid, live[-1].fileno())}
    finally:
        for s in live:
            s.close()


def test_thread_exits_are_seen_through_pidfds_past_fd_1023():
    from sockgraft.kernel import sockets as ksock
    """An agent serving many containers holds fds past select()'s 1023: the
    checks on its pidfds (and on its helpers' sockets) poll instead of
    raising ValueError in the loop."""
    t = Targets(max_threads=4)
    ended, go = [], threading.Event()
    th = threading.Thread(target=lambda: (ended.append(threading.get_native_id()), go.wait()))
    th.start()
    while not ended:
        time.sleep(0.001)
    me = threading.get_native_id()
    high = []
    try:
        used = {int(f) for f in os.listdir("/proc/self/fd")}
        free = (n for n in range(1500, 4000) if n not in used)
        for tid in (me, ended[0]):
            fd = t.pidfd(tid)
            t.pidfds[tid] = os.dup2(fd, next(free), inheritable=False)
            high.append(t.pidfds[tid])
            os.close(fd)
        go.set()
        th.join()
        # (join returns a moment before the kernel's thread has exited)
        assert ksock.ready(t.pidfds[ended[0]], timeout=2.0)
        assert min(high) > 1023
        assert t.exited({me, ended[0]}) == [ended[0]]
        assert ended[0] not in t.pidfds and me in t.pidfds
    finally:
        t.close()


def test_the_agent_raises_its_open_file_limit_to_the_hard_one():
    """`sockgraft agent` starts with its soft RLIMIT_NOFILE at the hard limit
    (a unit's default 1024 would run out serving a few dozen containers)."""
    import resource
    import subprocess
    import sys
    code = ("import resource; from sockgraft.cli.graft_cmd import raise_fd_limit; "
            "print(*raise_fd_limit(), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    low = min(256, hard)
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard)))
    before, after, soft, hard_after = map(int, out.stdout.split())
    want = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else 1 << 20
    assert (before, after, soft, hard_after) == (low, want, want, hard)


def _lingering_copy():
    """The agent's copy of a socket whose close waits: connected, its peer
    reads nothing, its send queue full, SO_LINGER {1, 30}; the application
    has closed its fd, so the copy is the last reference."""
    import struct
    from sockgraft.kernel import sockets as ksock
    srv = socket.create_server(("127.0.0.1", 0))
    app = socket.create_connection(srv.getsockname())
    peer, _ = srv.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    app.setblocking(False)
    try:
        while True:
            app.send(b"x" * 65536)
    except BlockingIOError:
        pass
    app.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 30))
    copy = ksock.adopt(os.dup(app.fileno()))
    app.close()
    return srv, peer, copy


def test_the_loop_never_waits_for_a_containers_linger():
    """A copy closed by the loop (not a notifier thread) that may linger goes
    to a closer thread: the loop goes on at once, the fd is closed there
    (once its linger is over - here, once the peer is gone)."""
    from types import SimpleNamespace
    from sockgraft.agent.engine import Agent
    from sockgraft.agent.loop import Closer
    from sockgraft.kernel import sockets as ksock
    srv, peer, copy = _lingering_copy()
    assert ksock.may_linger(copy)
    me = SimpleNamespace(_in_notifier=threading.local(), closer=Closer())
    old = ksock.TargetSocket.around_close
    ksock.TargetSocket.around_close = lambda s, close: Agent._close_outside_lock(me, s, close)
    try:
        t0 = time.monotonic()
        copy.close()
        assert time.monotonic() - t0 < 0.5 and copy.fileno() == -1
        time.sleep(0.2)
        assert me.closer.closed == 0                 # its thread waits in close()
        plain = ksock.adopt(os.dup(srv.fileno()))   # not lingering: closed at once
        plain.close()
        peer.close()                                 # the linger ends (RST from the peer)
        deadline = time.monotonic() + 5
        while me.closer.closed < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert me.closer.closed == 1
    finally:
        ksock.TargetSocket.around_close = old
        srv.close()


def test_a_close_that_lingers_past_the_limit_is_cut_short():
    """A container cannot keep the closer threads (and every fd queued behind
    them) for its SO_LINGER time: past the limit the sweep interrupts the
    close (a pending signal ends the kernel's linger wait)."""
    from sockgraft.agent import notifiers
    from sockgraft.agent.loop import Closer
    assert notifiers.install_wake_handler()          # (the agent's: a no-op handler)
    srv, peer, copy = _lingering_copy()
    closer = Closer(threads=1, limit=0.3, wake=notifiers.WAKE_SIGNAL)
    try:
        closer.close(copy.detach())
        plain = socket.socket()
        closer.close(plain.detach())                 # queued behind the lingering one
        time.sleep(0.5)
        assert closer.closed == 0                    # both wait (the peer reads nothing)
        closer.sweep(time.monotonic())
        deadline = time.monotonic() + 5
        while closer.closed < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert closer.closed == 2 and closer.interrupted >= 1
    finally:
        peer.close()
        srv.close()
