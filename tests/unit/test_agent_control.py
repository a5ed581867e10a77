"""The agent's control requests, driven in-process without root: every
malformed request gets an answer, and every fd it carried is closed exactly
once (issue 13, defect 1)."""

from __future__ import annotations

import errno
import os
import socket

import pytest

from sockgraft.agent import control
from sockgraft.agent.engine import Agent
from sockgraft.agent.store import ConfigStore
from sockgraft.errors import NotFound, NotificationGone, from_oserror

pytestmark = pytest.mark.unit


@pytest.fixture
def agent(tmp_path):
    a = Agent(str(tmp_path / "a.sock"), ConfigStore(str(tmp_path)), notifier_threads=0,
              manage_nft=False, bpf="off")
    yield a


def _closes(monkeypatch):
    closed: list[int] = []
    real = os.close

    def close(fd):
        closed.append(fd)
        real(fd)
    monkeypatch.setattr(os, "close", close)
    return closed


@pytest.mark.parametrize("msg, nfds, error", [
    ({"op": "register"}, 1, "container name and a pid"),
    ({"op": "register", "container": "c", "pid": "1"}, 1, "container name and a pid"),
    ({"op": "register", "container": "c", "pid": 1, "graft_at": "nowhere"}, 1, "graft_at"),
    ({"op": "register", "container": "c", "pid": 1, "buffers": {"sndbuf": "big"}}, 1,
     "buffers"),
    ({"op": "register", "container": "c", "pid": 1, "buffers": "big"}, 1, "buffers"),
    ({"op": "register", "container": "c", "pid": 1, "inline_config": "not = [toml"}, 1,
     "annotations of c"),
    ({"op": "register", "container": "c", "pid": 1}, 2, "exactly one listener fd"),
    ({"op": "register", "container": "c", "pid": 1}, 0, "exactly one listener fd"),
    ({"op": "reload", "container": "c"}, 1, None),
])
def test_a_bad_request_is_answered_and_closes_each_fd_once(agent, monkeypatch, msg, nfds,
                                                           error):
    ours, theirs = socket.socketpair()
    fds = []
    for _ in range(nfds):
        r, w = os.pipe()
        os.close(w)
        fds.append(r)
    closed = _closes(monkeypatch)
    agent._handle_request(ours, msg, list(fds))
    monkeypatch.undo()
    for fd in fds:
        assert closed.count(fd) == 1, (fd, closed)
        with pytest.raises(OSError):
            os.fstat(fd)
    reply = control.recv_reply(theirs)
    if error is None:
        assert reply["ok"] is True
    else:
        assert reply["ok"] is False and error in reply["error"], reply
    ours.close()
    theirs.close()


# --- every trapped call is answered unless its notification is gone (defect 5) ---

class FakeListener:
    def __init__(self, gone=False):
        self.answers = []
        self.gone = gone

    def respond(self, nid, *, val=0, error=0):
        if self.gone:
            from sockgraft.errors import NotificationGone
            raise NotificationGone("seccomp NOTIF_SEND", errno.ENOENT)
        self.answers.append((nid, val, error))

    def continue_(self, nid):
        self.answers.append((nid, "continue"))


def _session(listener):
    from sockgraft.agent.sessions import Session
    return Session("c", 1, listener, 0x53470001, None, {})


def _notif():
    from sockgraft.kernel import seccomp
    return seccomp.Notification(7, 1234, 0, seccomp.SYS_CONNECT, seccomp.AUDIT_ARCH_X86_64,
                                0, (3, 0, 16, 0, 0, 0))


@pytest.mark.parametrize("raised, answered", [
    (lambda: from_oserror("bind endpoint", OSError(errno.EADDRNOTAVAIL, "")), errno.EADDRNOTAVAIL),
    (lambda: from_oserror("host socket", OSError(errno.EMFILE, "")), errno.EMFILE),
    (lambda: from_oserror("read target memory", OSError(errno.ESRCH, "")), errno.ESRCH),
    (lambda: from_oserror("x", OSError(errno.ENOENT, "")), errno.ENOENT),
    (lambda: ValueError("a bug"), errno.EIO),
    (lambda: NotificationGone("seccomp NOTIF_ADDFD", errno.ENOENT), None),
])
def test_every_failure_but_a_gone_notification_is_answered(agent, monkeypatch, raised, answered):
    fake = FakeListener()
    sess = _session(fake)

    def boom(*_a):
        raise raised()
    monkeypatch.setattr(agent.grafter, "_handle", boom)
    agent.grafter.handle(sess, _notif())
    assert fake.answers == ([] if answered is None else [(7, 0, answered)])


def test_answering_a_target_that_went_away_is_not_an_error(agent, monkeypatch):
    sess = _session(FakeListener(gone=True))
    monkeypatch.setattr(agent.grafter, "_handle", lambda *_a: (_ for _ in ()).throw(
        from_oserror("read target memory", OSError(errno.ESRCH, ""))))
    agent.grafter.handle(sess, _notif())          # does not raise


def test_seccomp_adapter_maps_only_enoent_of_send_and_addfd_to_gone():
    from sockgraft.kernel.seccomp import _notif_error
    assert isinstance(_notif_error("seccomp NOTIF_SEND", OSError(errno.ENOENT, ""), 1),
                      NotificationGone)
    e = _notif_error("seccomp NOTIF_ADDFD", OSError(errno.EMFILE, ""), 1)
    assert not isinstance(e, NotificationGone) and e.errno == errno.EMFILE
    assert not isinstance(from_oserror("bind", OSError(errno.EADDRNOTAVAIL, "")), NotFound)


# --- notifier threads are supervised (defect 4) -----------------------------------

def test_a_failing_notifier_thread_hands_its_listener_to_the_loop(agent, tmp_path):
    """Threads serving a listener that fails (here: not a seccomp fd, so
    NOTIF_RECV errors at once) report it; the loop then receives the
    listener's notifications itself and counts the failure in stats."""
    import select
    import time
    from sockgraft.agent import notifiers
    if not notifiers.install_wake_handler():
        pytest.skip("not the main thread")
    r, w = os.pipe()
    sess = _session(FakeListener())
    threads = notifiers.Notifiers(r, sess.mark, "c", agent.inbox, threads=2)
    agent.sessions.add(r, sess, threads)
    agent.ep.register(r, 0)
    deadline = time.monotonic() + 5
    while threads.alive and time.monotonic() < deadline:
        time.sleep(0.01)
    assert threads.alive == 0 and threads.failures == 2
    os.write(w, b"x")                      # the listener "has a notification"
    assert agent.ep.poll(0) == []          # nobody in the loop would hear it...
    agent.drain_inbox()
    assert sess.loop_serves
    assert [fd for fd, ev in agent.ep.poll(0) if ev & select.EPOLLIN] == [r]   # ...now it does
    st = agent.stats()
    assert st["counters"]["notifier_failures"] == 2
    assert st["containers"][0]["notifier_failures"] == 2
    assert st["containers"][0]["notifier_threads"] == 0
    threads.stop()
    agent.ep.unregister(r)
    os.close(r)
    os.close(w)
