"""The cluster directory: a grafted server's overlay address is published, and
grafted clients on other hosts connect straight to the host address its
socket listens on - no VXLAN - with the embedded directory and with a real
etcd; faults (etcd down, agents killed, conflicting publications)."""

import os
import shutil
import signal
import subprocess
import time

import pytest

from grafting import PROBE, GraftLab, read_json_line
from nettools import EchoServer

pytestmark = pytest.mark.priv

SERVER = """
container = "{c}"
[endpoints.ep-http]
type = "ipv4"
addr = "198.18.0.2"
port = {port}
[rules]
ingress = ["0.0.0.0:80=ep-http"]
"""

CLIENT = """
container = "h1-c1"
graft_at = "{mode}"
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[rules]
egress = ["198.19.0.0/16=ep-out", "198.18.0.0/24=ep-out"]
"""


def _dlab(lab, state_dir, *agent_args):
    g = GraftLab(lab, state_dir)
    for h in lab.hosts:
        g.start_agent(h.name, *agent_args)
    return g


@pytest.fixture
def dlab(lab, state_dir):
    g = _dlab(lab, state_dir, "--directory-ttl", "2")
    try:
        yield g
    finally:
        g.close()


def vx_tx(g, host="h1"):
    return g.counters(host)["sg-vx0"]["tx_bytes"]


def _one(svcs, overlay="198.19.2.2", port=80):
    return [s for s in svcs if s["overlay"] == overlay and s["port"] == port]


def start_server(g, container="h2-c1", port=8081, netns=None):
    g.configure(container, SERVER.format(c=container, port=port))
    opts = ("--netns", netns) if netns else ()
    p = g.spawn(container, PROBE + ["echo-server", "0.0.0.0", "80"], options=opts)
    ready = read_json_line(p)
    assert ready["ready"] and ready["local"] == ["198.18.0.2", port]
    return p


@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_client_reaches_remote_container_ip_without_vxlan(dlab, mode):
    srv = start_server(dlab)
    got = dlab.wait_services(lambda s: _one(s))
    rec = _one(got["services"])[0]
    assert (rec["host_addr"], rec["host_port"], rec["node"], rec["container"], rec["proto"]) \
        == ("198.18.0.2", 8081, "h2", "h2-c1", "tcp")
    dlab.configure("h1-c1", CLIENT.format(mode=mode))
    vx, ul = vx_tx(dlab), dlab.counters("h1")["sg-ul0"]["tx_bytes"]
    r = dlab.probe("h1-c1", "tcp-client", "198.19.2.2", 80)
    assert r["connect_errno"] == 0 and r["echo"] == "ping"
    assert read_json_line(srv)["accepted"][0] == "198.18.0.1"   # came over the underlay
    assert vx_tx(dlab) - vx < 200                                 # no VXLAN packet
    assert dlab.counters("h1")["sg-ul0"]["tx_bytes"] - ul > 200
    if mode == "socket":
        assert r["peer"] == ["198.19.2.2", 80]    # getpeername shows what it connected to
    else:
        assert r["peer"] == ["198.18.0.2", 8081]  # documented: the real peer


def test_unknown_destinations_take_the_overlay(dlab):
    dlab.configure("h1-c1", CLIENT.format(mode="syscall"))
    c2 = dlab.plan.node("h2-c2")
    vx = vx_tx(dlab)
    with EchoServer(c2.netns, "0.0.0.0", 7400) as srv:      # a plain, unpublished server
        r = dlab.probe("h1-c1", "tcp-client", "198.19.2.3", 7400)
        assert srv.peer() is not None
    assert r["echo"] == "ping" and vx_tx(dlab) - vx > 100


def test_records_go_with_the_socket_and_conflicts_are_refused(dlab):
    srv = start_server(dlab)
    assert _one(dlab.wait_services(lambda s: _one(s))["services"])
    # a second container claiming the same overlay address (same netns, other name)
    ns = dlab.plan.node("h2-c1").netns
    other = start_server(dlab, container="h2-c2", port=8082, netns=ns)
    deadline = time.monotonic() + 5
    while True:
        audit = [a for a in dlab.audit("h2") if a["verdict"] == "conflict"]
        if audit or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert audit and audit[0]["container"] == "h2-c2"
    assert "already published by h2/h2-c1" in audit[0]["rule"]
    rec = _one(dlab.services()["services"])
    assert len(rec) == 1 and rec[0]["container"] == "h2-c1"
    os.killpg(other.pid, signal.SIGKILL)
    os.killpg(srv.pid, signal.SIGKILL)
    got = dlab.wait_services(lambda s: not _one(s), timeout=5)
    assert not _one(got["services"])


def test_killed_agent_records_are_republished_or_expire(dlab):
    srv = start_server(dlab)
    dlab.wait_services(lambda s: _one(s))
    dlab.stop_agent("h2", signal.SIGKILL)       # a crash: nothing withdrawn
    dlab.start_agent("h2", "--directory-ttl", "2")
    time.sleep(3)                               # longer than the lease
    rec = _one(dlab.services()["services"])
    assert len(rec) == 1, "the restarted agent re-publishes a live socket"
    dlab.stop_agent("h2", signal.SIGKILL)
    os.killpg(srv.pid, signal.SIGKILL)          # the server dies while no agent runs
    got = dlab.wait_services(lambda s: not _one(s), timeout=6)
    assert not _one(got["services"]), "the record expired with its lease"
    dlab.start_agent("h2", "--directory-ttl", "2")
    time.sleep(0.5)
    assert not _one(dlab.services("h2")["services"]), "no stale record after restart"


# --- etcd ------------------------------------------------------------------------

ETCD_CLIENT = "http://198.18.0.1:23790"


class Etcd:
    """A real etcd, on lab host h1's underlay address (reachable from every
    lab host), data kept across restarts."""

    def __init__(self, plan, data_dir):
        self.ns = plan.node("h1").netns
        self.data_dir = str(data_dir)
        self.proc = None

    def start(self):
        from sockgraft.kernel import netns
        log = open(os.path.join(os.path.dirname(self.data_dir), "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [shutil.which("etcd"), "--name", "sg", "--data-dir", self.data_dir,
             "--listen-client-urls", ETCD_CLIENT, "--advertise-client-urls", ETCD_CLIENT,
             "--listen-peer-urls", "http://198.18.0.1:23800",
             "--initial-advertise-peer-urls", "http://198.18.0.1:23800",
             "--initial-cluster", "sg=http://198.18.0.1:23800"],
            preexec_fn=lambda: netns.enter(self.ns), stdout=log, stderr=log)
        log.close()
        from sockgraft.kernel.netns import run_in
        deadline = time.monotonic() + 20
        while run_in(self.ns, _healthy) is not True:
            assert self.proc.poll() is None, "etcd exited"
            assert time.monotonic() < deadline, "etcd did not become healthy"
            time.sleep(0.2)

    def stop(self):
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


def _healthy():
    import http.client
    try:
        c = http.client.HTTPConnection("198.18.0.1", 23790, timeout=1)
        c.request("GET", "/health")
        return c.getresponse().status == 200
    except OSError:
        return False


@pytest.fixture
def etcd_lab(lab, state_dir, tmp_path):
    if shutil.which("etcd") is None:
        pytest.fail("etcd is not installed (./run installs etcd-server)")
    etcd = Etcd(lab, tmp_path / "etcd-data")
    etcd.start()
    g = None
    try:
        g = _dlab(lab, state_dir, "--directory", "etcd://198.18.0.1:23790",
                  "--directory-ttl", "3")
        yield g, etcd
    finally:
        if g is not None:
            g.close()
        etcd.stop()


def test_etcd_bypass_and_outage(etcd_lab):
    g, etcd = etcd_lab
    srv = start_server(g)
    rec = _one(g.wait_services(lambda s: _one(s))["services"])
    assert rec and rec[0]["node"] == "h2"
    g.configure("h1-c1", CLIENT.format(mode="socket"))
    chat = g.spawn("h1-c1", PROBE + ["chat", "198.19.2.2", "80"])
    hello = read_json_line(chat)
    assert hello["connect_errno"] == 0 and hello["peer"] == ["198.19.2.2", 80]

    def say(word):
        chat.stdin.write(word + "\n")
        chat.stdin.flush()
        return read_json_line(chat).get("echo")

    assert say("before") == "before"

    etcd.stop()
    got = g.wait_services(lambda s: not s, timeout=5)
    assert not got["services"]          # unreachable: nothing to bypass with
    vx = vx_tx(g)
    r = g.probe("h1-c1", "tcp-client", "198.19.2.2", 80)
    # the overlay path reaches the container itself, where nothing listens on 80
    # (the grafted server's socket is on the host): refused, not hung, not wrong
    assert r["connect_errno"] == "ECONNREFUSED" and vx_tx(g) - vx > 40
    assert say("during") == "during"    # the established connection never noticed

    etcd.start()
    got = g.wait_services(lambda s: _one(s), timeout=15)
    assert _one(got["services"]), f"bypass did not resume: {got}"
    vx = vx_tx(g)
    r = g.probe("h1-c1", "tcp-client", "198.19.2.2", 80)
    assert r["connect_errno"] == 0 and r["echo"] == "ping" and vx_tx(g) - vx < 200
    assert say("after") == "after"
    os.killpg(chat.pid, signal.SIGKILL)
    os.killpg(srv.pid, signal.SIGKILL)


@pytest.mark.parametrize("mode, denied", [("syscall", "EACCES"), ("socket", "EPERM")])
def test_policy_is_judged_on_the_overlay_address(dlab, mode, denied):
    """An allowlist naming only the overlay: the bypass to the server's host
    address works (nftables does not judge the rewritten packets again), a
    direct connect to that host address is refused."""
    srv = start_server(dlab)
    dlab.wait_services(lambda s: _one(s))
    dlab.configure("h1-c1", CLIENT.format(mode=mode) +
                   '[policy]\nallow = ["allow tcp 198.19.0.0/16"]\n')
    r = dlab.probe("h1-c1", "tcp-client", "198.19.2.2", 80)
    assert r["connect_errno"] == 0 and r["echo"] == "ping"
    r = dlab.probe("h1-c1", "tcp-client", "198.18.0.2", 8081)
    assert r["connect_errno"] == denied
    os.killpg(srv.pid, signal.SIGKILL)


def test_udp_by_container_ip_and_replies_from_the_overlay_address(dlab):
    """A grafted UDP server published in the directory; a socket-mode client
    sends to the container IP, its datagrams go to the host address, and the
    replies read as coming from the overlay address (cgroup/recvmsg4)."""
    dlab.configure("h2-c1", SERVER.format(c="h2-c1", port=8081))
    srv = dlab.spawn("h2-c1", PROBE + ["udp-server", "0.0.0.0", "80", "--count", "2"])
    assert read_json_line(srv)["local"] == ["198.18.0.2", 8081]
    dlab.wait_services(lambda s: [r for r in s if r["proto"] == "udp"])
    dlab.configure("h1-c1", CLIENT.format(mode="socket"))
    vx = vx_tx(dlab)
    r = dlab.probe("h1-c1", "udp-client", "198.19.2.2", 80, "--count", "2")
    assert r["replies"] == 2 and r["peer"] == ["198.19.2.2", 80]
    assert read_json_line(srv)["from"][0] == "198.18.0.1"
    assert vx_tx(dlab) - vx < 200
