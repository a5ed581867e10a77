"""The agent's control framing, over real socketpairs (no agent needed)."""

import os
import socket

import pytest

from sockgraft.agent import control
from sockgraft.errors import AgentError

pytestmark = pytest.mark.unit


def _feed_all(reader, sock):
    out = []
    while True:
        if not reader.feed(sock):
            return out
        out.extend(reader.frames())


def test_frames_round_trip_with_fds():
    a, b = socket.socketpair()
    r, w = os.pipe()
    control.send(a, {"op": "register", "container": "c"}, [r])
    control.send(a, {"op": "ping"})
    a.close()
    frames = _feed_all(control.FrameReader(), b)
    assert [m["op"] for m, _ in frames] == ["register", "ping"]
    fds = frames[0][1]
    assert len(fds) == 1 and frames[1][1] == []
    os.write(w, b"x")
    assert os.read(fds[0], 1) == b"x"           # the very pipe, passed by SCM_RIGHTS
    for fd in (r, w, *fds):
        os.close(fd)


@pytest.mark.parametrize("payload", [b"\x00\x00\x00\x05[1,2]", b"\x00\x00\x00\x03{x}",
                                     b"\x00\x00\x00\x04null"])
def test_malformed_frames_are_refused(payload):
    a, b = socket.socketpair()
    a.sendall(payload)
    reader = control.FrameReader()
    reader.feed(b)
    with pytest.raises(AgentError, match="malformed"):
        list(reader.frames())


def test_a_huge_frame_is_refused_before_it_is_buffered():
    a, b = socket.socketpair()
    a.sendall((control.MAX_FRAME + 1).to_bytes(4, "big") + b"{")
    with pytest.raises(AgentError, match="too large"):
        control.FrameReader().feed(b)


def test_too_many_fds_are_closed_and_refused():
    a, b = socket.socketpair()
    pipes = [os.pipe() for _ in range(control.MAX_FDS + 2)]
    socket.send_fds(a, [control.encode({"op": "x"})], [p[0] for p in pipes])
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(AgentError, match="too many"):
        control.FrameReader().feed(b)
    assert len(os.listdir("/proc/self/fd")) <= before
    for r, w in pipes:
        os.close(r)
        os.close(w)


def test_request_to_a_missing_agent_says_so(tmp_path):
    with pytest.raises(AgentError, match="is `sockgraft agent` running"):
        control.request(str(tmp_path / "none.sock"), {"op": "ping"})


def test_request_to_an_agent_that_resets_is_an_agent_error(tmp_path):
    path = str(tmp_path / "rst.sock")
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    srv.listen(1)
    pid = os.fork()
    if pid == 0:
        c, _ = srv.accept()
        c.close()             # hang up without answering
        os._exit(0)
    try:
        with pytest.raises(AgentError):
            control.request(path, {"op": "ping"}, timeout=5)
    finally:
        os.waitpid(pid, 0)
        srv.close()
