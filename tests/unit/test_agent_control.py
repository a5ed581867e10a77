"""The agent's control requests, driven in-process without root: every
malformed request gets an answer, and every fd it carried is closed exactly
once (issue 13, defect 1)."""

from __future__ import annotations

import os
import socket

import pytest

from sockgraft.agent import control
from sockgraft.agent.engine import Agent
from sockgraft.agent.store import ConfigStore

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
