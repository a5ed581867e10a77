"""A container mark handed to a new container (the node churned through
its mark space) never lets a socket of the old container act as the new
one: the mark moves to a new generation, and sockets tagged in the old one
are refused everything (issue 13, defect 3). Its own module: its agent
runs with a mark space of one."""

import errno
import json
import os
import signal
import time

import pytest

from grafting import read_json_line, steal_socket
from sentinel import Sentinel

pytestmark = pytest.mark.security

CONFIG = """
container = "{c}"
graft_at = "socket"
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[rules]
egress = ["198.18.0.0/24=ep-out"]
"""


def _sessions(g):
    st = json.loads(g.sg("stats", "--json", "--agent", g.agent_socket("h1")).stdout)
    (one,) = st.values()
    return [c["container"] for c in one["containers"]]


def test_a_reused_mark_refuses_the_old_holders_sockets(seclab, attack_bin):
    g = seclab
    g.stop_agent("h1")
    g.env["SOCKGRAFT_MARK_SPACE"] = "1"
    g.start_agent("h1")
    g.configure("h1-c1", CONFIG.format(c="h1-c1"))
    old = g.spawn("h1-c1", [attack_bin, "sock", "tcp4", "sock", "udp4", "sleep", "60"],
                  options=["--graft-at", "socket"])
    tcp_fd = read_json_line(old)["ret"]
    udp_fd = read_json_line(old)["ret"]
    tcp, udp = steal_socket(old, tcp_fd), steal_socket(old, udp_fd)   # now held outside the container
    os.killpg(old.pid, signal.SIGKILL)
    old.wait(timeout=10)
    deadline = time.monotonic() + 10
    while "h1-c1" in _sessions(g) and time.monotonic() < deadline:
        time.sleep(0.1)
    g.sg("config", "del", "--container", "h1-c1")         # its mark is released
    g.configure("h1-c2", CONFIG.format(c="h1-c2"))
    h2 = g.plan.node("h2").netns
    with Sentinel(h2, "198.18.0.2", 7530, "tcp") as trap_tcp, \
            Sentinel(h2, "198.18.0.2", 7531, "udp") as trap_udp:
        rc, lines, err = g.run("h1-c2", [attack_bin, "sock", "tcp4", "connect",
                                         "198.18.0.2:7530"], options=["--graft-at", "socket"])
        assert [s["errno"] for s in lines[:-1]] == ["0", "0"], (lines, err)
        stats = json.loads(g.sg("stats", "--json", "--agent", g.agent_socket("h1")).stdout)
        (st,) = stats.values()
        (new,) = [c for c in st["containers"] if c["container"] == "h1-c2"] or [None]
        with tcp, udp:
            tcp.settimeout(3)
            with pytest.raises(OSError) as e:
                tcp.connect(("198.18.0.2", 7530))
            assert e.value.errno == errno.EACCES          # refused like an unknown container
            with pytest.raises(OSError) as e:
                udp.sendto(b"x", ("198.18.0.2", 7531))
            assert e.value.errno == errno.EPERM
        time.sleep(0.3)
    # the new container got the only mark there is, in a new generation
    marks = json.load(open(os.path.join(g.state_dir, "containers", "marks.json")))
    assert marks["h1-c2"] == 1 and marks[".gen"] == {"1": 1}
    assert len(trap_tcp.received) == 1            # the new container's connect only
    assert trap_udp.received == []
    assert new is None or new["mark"] == 0x53470001
