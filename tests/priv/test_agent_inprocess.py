"""The agent driven in-process (no subprocess), for cases that need to reach
into its state: a cached pidfd whose tid was reused, and the notify loop's
handling of a target that dies mid-notification."""

import os
import select
import socket
import struct
import time

import pytest

from sockgraft.agent.engine import Agent
from sockgraft.agent.store import ConfigStore
from sockgraft.kernel import seccomp
from sockgraft.kernel import seccomp_filter
from sockgraft.lab import grafts
from sockgraft.model import graftconfig as gc
from sockgraft.model.graft import MARK_BASE, MARK_MASK
from sockgraft.model.policy import parse_policy_rule
from nettools import full_backlog_server

pytestmark = pytest.mark.priv


@pytest.fixture
def agent(tmp_path):
    store = ConfigStore(str(tmp_path / "store"))
    cfg = grafts.egress_via("inproc", "127.0.0.1", "127.0.0.0/8")
    store.save(gc.with_policy_rule(cfg, parse_policy_rule("allow tcp 127.0.0.1")))
    a = Agent(str(tmp_path / "agent.sock"), store, name="t", manage_nft=False)
    a.start()
    yield a
    a.close()


def _child_connect(sp, port, report_w):
    """In the forked child: filter, hand the listener over, wait for go, connect."""
    try:
        prog = seccomp_filter.build_filter(seccomp_filter.default_graft_filter(False))
        listener = seccomp.install_filter(prog)
        socket.send_fds(sp, [b"L"], [listener])
        os.close(listener)
        sp.recv(1)
        s = socket.socket()
        err = s.connect_ex(("127.0.0.1", port))
        mark = s.getsockopt(socket.SOL_SOCKET, 36)
        os.write(report_w, struct.pack("ii", err, mark))
    finally:
        os._exit(0)


def _drive(agent, until, timeout=10):
    deadline = time.monotonic() + timeout
    while not until() and time.monotonic() < deadline:
        for fd, ev in agent.ep.poll(0.05):
            agent.dispatch(fd, ev)
        agent.end_turn()
    assert until(), "timed out"


def _start_child(agent, port):
    parent_sp, child_sp = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        parent_sp.close()
        os.close(r)
        _child_connect(child_sp, port, w)
    child_sp.close()
    os.close(w)
    _, fds, _, _ = socket.recv_fds(parent_sp, 16, 1)
    agent._register(None, {"op": "register", "container": "inproc", "pid": pid}, fds)
    return pid, parent_sp, r


def test_stale_cached_pidfd_of_a_reused_tid_is_replaced(agent):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)
    port = srv.getsockname()[1]
    pid, sp, r = _start_child(agent, port)
    # a pidfd of a process that has exited, cached under the child's tid, as
    # if the child's tid had belonged to that process before
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    stale = seccomp.pidfd_open(dead)
    os.waitpid(dead, 0)
    agent.targets.pidfds[pid] = stale
    sp.send(b"G")
    _drive(agent, lambda: select.select([r], [], [], 0)[0])
    err, mark = struct.unpack("ii", os.read(r, 8))
    os.waitpid(pid, 0)
    assert err == 0
    assert mark & MARK_MASK == MARK_BASE          # grafted in spite of the stale pidfd
    assert agent.inventory.totals.grafted == 1 and agent.inventory.totals.errors == 0
    srv.close()
    sp.close()
    os.close(r)


def test_target_killed_while_its_connect_is_pending(agent):
    # nothing answers on 127.0.0.1:1? the kernel refuses at once; use a full
    # backlog instead so that the connect stays pending
    srv, fillers = full_backlog_server()
    port = srv.getsockname()[1]
    base_fds = len(os.listdir("/proc/self/fd"))
    pid, sp, r = _start_child(agent, port)
    sp.send(b"G")
    pending = agent.grafter.connects.pending
    _drive(agent, lambda: bool(pending) or bool(select.select([r], [], [], 0)[0]))
    if pending:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        _drive(agent, lambda: (agent.sweep(time.monotonic()), not pending)[1])
    else:
        os.waitpid(pid, 0)
        pytest.skip("the kernel completed the connect at once; no pending state to test")
    _drive(agent, lambda: not agent.sessions)      # POLLHUP: every task gone
    # sp and r (closed below); the session's notifier threads close their
    # listener copies as they end, just after
    _drive(agent, lambda: len(os.listdir("/proc/self/fd")) <= base_fds + 2, timeout=5)
    sp.close()
    os.close(r)
    for f in fillers:
        f.close()
    srv.close()
