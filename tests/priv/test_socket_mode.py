"""graft_at = "socket": every TCP/UDP socket of the container is a host socket
from socket() on (ADDFD_FLAG_SEND), and connect()/sendmsg() are judged by the
cgroup programs in the kernel, with no round trip to the agent."""

import json
import os
import socket
import time

import pytest

from grafting import PROBE, read_json_line
from nettools import EchoServer, echo

pytestmark = pytest.mark.priv

MARK_MASK, MARK_BASE = 0xFFFF0000, 0x53470000

SOCKET_MODE = """
container = "h1-c1"
graft_at = "socket"
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[endpoints.ep-out6]
type = "ipv6"
addr = "fd53:6700:0:1::1"
port = "dynamic"
[endpoints.ep-http]
type = "ipv4"
addr = "198.18.0.1"
port = 8081
[rules]
ingress = ["0.0.0.0:80=ep-http"]
egress = ["198.18.0.0/24=ep-out", "fd53:6700:0:1::/64=ep-out6"]
[policy]
deny = ["deny tcp 198.18.0.2 7399", "deny udp 198.18.0.2 7398"]
"""


def _grafted(mark):
    return mark & MARK_MASK == MARK_BASE


@pytest.fixture
def slab(glab):
    stats = glab.sg("stats", "--json", "--agent", glab.agent_socket("h1")).stdout
    if '"kernel": null' in stats.replace(" ", "").replace('"kernel":null', '"kernel": null'):
        pytest.fail(f"the agent has no in-kernel programs: {stats}\n{glab.agent_log('h1')}")
    glab.configure("h1-c1", SOCKET_MODE)
    return glab


def test_tcp_egress_is_a_host_socket_from_birth(slab):
    h2 = slab.plan.node("h2")
    before = slab.veth_rx("h1-c1")
    with EchoServer(h2.netns, "0.0.0.0", 7300) as srv:
        r = slab.probe("h1-c1", "tcp-client", "198.18.0.2", 7300)
        assert srv.peer() == "198.18.0.1"          # bpf_bind() put it on the endpoint
    assert r["connect_errno"] == 0 and r["echo"] == "ping"
    assert _grafted(r["mark"]) and not r["replaced"]   # grafted at socket(): nothing swapped
    assert r["local"][0] == "198.18.0.1" and r["peer"] == ["198.18.0.2", 7300]
    assert slab.veth_rx("h1-c1") - before < 400


def test_nonblocking_threaded_and_ipv6_connects(slab):
    h1, h2 = slab.plan.node("h1"), slab.plan.node("h2")
    with EchoServer(h2.netns, "0.0.0.0", 7301):
        r = slab.probe("h1-c1", "tcp-client", "198.18.0.2", 7301, "--nonblock", "--thread")
    assert r["connect_errno"] == "EINPROGRESS" and r["so_error"] == 0 and r["echo"] == "ping"
    with EchoServer(h1.netns, "::", 7302) as srv:
        r = slab.probe("h1-c1", "tcp-client", "fd53:6700:0:1::1", 7302)
        assert srv.peer() == "fd53:6700:0:1::1"
    assert r["echo"] == "ping" and _grafted(r["mark"])
    with EchoServer(h2.netns, "0.0.0.0", 7303) as srv:
        r = slab.probe("h1-c1", "tcp-client", "::ffff:198.18.0.2", 7303)
        assert srv.peer() == "198.18.0.1"
    assert r["echo"] == "ping" and r["peer"][0] == "::ffff:198.18.0.2"


def test_kernel_denials_answer_like_the_agent_and_audit(slab):
    """One errno for a policy denial in both modes (EACCES, as the agent
    answers in syscall mode); no egress rule: ENETUNREACH (issue 14, item 7)."""
    r = slab.probe("h1-c1", "tcp-client", "198.18.0.2", 7399)       # deny[0]
    assert r["connect_errno"] == "EACCES"
    r = slab.probe("h1-c1", "tcp-client", "127.0.0.1", 7398)        # its own loopback:
    assert r["connect_errno"] == "ECONNREFUSED"                      # nothing listens there
    r = slab.probe("h1-c1", "tcp-client", "198.19.1.3", 7397)       # no egress rule covers it
    assert r["connect_errno"] == "ENETUNREACH"
    r = slab.probe("h1-c1", "udp-client", "198.18.0.2", 7398)       # every datagram judged
    assert r["sent"] == 0 and r["errors"] == ["EACCES"]
    deadline = time.monotonic() + 5
    want = {("connect", "198.18.0.2:7399", "deny[0]", "EACCES"),
            ("connect", "198.19.1.3:7397", "egress:no-rule", "ENETUNREACH"),
            ("sendmsg", "198.18.0.2:7398", "deny[1]", "EACCES")}
    while True:
        got = {(a["syscall"], a["address"], a["rule"], a["errno"]) for a in slab.audit("h1")
               if a.get("by") == "kernel"}
        if got >= want or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert got >= want
    assert all(a["container"] == "h1-c1" for a in slab.audit("h1") if a.get("by") == "kernel")


def test_udp_unconnected_and_connected(slab):
    h2 = slab.plan.node("h2")
    with EchoServer(h2.netns, "0.0.0.0", 7310, proto="udp") as srv:
        r = slab.probe("h1-c1", "udp-client", "198.18.0.2", 7310)
        assert srv.peer() == "198.18.0.1"         # the source rewritten to the endpoint
    assert r["replies"] == 1 and _grafted(r["mark"])
    with EchoServer(h2.netns, "0.0.0.0", 7311, proto="udp") as srv:
        r = slab.probe("h1-c1", "udp-client", "198.18.0.2", 7311, "--connect")
        assert srv.peer() == "198.18.0.1"
    assert r["replies"] == 1 and r["local"][0] == "198.18.0.1"
    # a control message on the connected socket (the hook sees no address)
    for dst in ("198.18.0.2", "fd53:6700:0:1::1"):
        node = h2 if ":" not in dst else slab.plan.node("h1")
        with EchoServer(node.netns, "::" if ":" in dst else "0.0.0.0", 7312, proto="udp"):
            r = slab.probe("h1-c1", "udp-client", dst, 7312, "--connect", "--tos-cmsg")
        assert r["replies"] == 1 and not r["errors"], (dst, r)


def test_server_binds_through_ingress_and_unclaimed_binds_are_refused(slab):
    p = slab.spawn("h1-c1", PROBE + ["tcp-server", "0.0.0.0", "80"])
    ready = read_json_line(p)
    assert ready["ready"] and ready["local"] == ["198.18.0.1", 8081]
    h1 = slab.plan.node("h1")
    assert echo(h1.netns, "198.18.0.1", 8081, b"hi") == b"hi"
    assert read_json_line(p)["accepted"][0] == "198.18.0.1"
    r = slab.probe("h1-c1", "tcp-server", "0.0.0.0", 9099)          # no ingress rule
    assert r == {"bind_errno": "EACCES"}
    lines = [a for a in slab.audit("h1") if a["syscall"] == "bind"]
    assert any(a["rule"] == "bind:no-endpoint" and a["address"] == "0.0.0.0:9099"
               for a in lines)


def test_listen_without_a_granted_bind_is_refused(slab):
    r = slab.probe("h1-c1", "listen-unbound")
    assert r == {"listen_errno": "EACCES"}
    assert any(a["syscall"] == "listen" and a["rule"] == "listen:no-endpoint"
               for a in slab.audit("h1"))
    p = slab.spawn("h1-c1", PROBE + ["tcp-server", "0.0.0.0", "80"])   # bound by a rule
    assert read_json_line(p)["ready"]


def test_policy_edits_apply_to_the_next_connect(slab):
    h2 = slab.plan.node("h2")
    slab.sg("policy", "add", "--container", "h1-c1", "deny", "tcp", "198.18.0.2", "7320")
    r = slab.probe("h1-c1", "tcp-client", "198.18.0.2", 7320)
    assert r["connect_errno"] == "EACCES"
    slab.sg("policy", "del", "--container", "h1-c1", "deny", "tcp", "198.18.0.2", "7320")
    with EchoServer(h2.netns, "0.0.0.0", 7320):
        r = slab.probe("h1-c1", "tcp-client", "198.18.0.2", 7320)
    assert r["connect_errno"] == 0 and r["echo"] == "ping"


def test_agent_restart_keeps_kernel_judging_and_grafting(slab):
    h2 = slab.plan.node("h2")
    fds_before = slab.agent_fds("h1")
    r = slab.probe("h1-c1", "loop", "198.18.0.1", 9, 50)       # 50 sockets, refused connects
    assert r == {"ok": 0}
    assert slab.agent_fds("h1") == fds_before                   # no fd kept per socket
    srv = slab.spawn("h1-c1", PROBE + ["tcp-server", "0.0.0.0", "80", "--count", "2"])
    assert read_json_line(srv)["ready"]
    slab.stop_agent("h1")
    # no agent: the pinned programs still judge connects of grafted sockets
    h1 = slab.plan.node("h1")
    assert echo(h1.netns, "198.18.0.1", 8081, b"one") == b"one"  # grafted listener serves on
    # back without notifier threads: the agent's loop answers socket() itself
    slab.start_agent("h1", "--notifier-threads", "0")
    with EchoServer(h2.netns, "0.0.0.0", 7330):
        r = slab.probe("h1-c1", "tcp-client", "198.18.0.2", 7330)
    assert r["connect_errno"] == 0 and r["echo"] == "ping" and _grafted(r["mark"])
    r = slab.probe("h1-c1", "tcp-client", "198.18.0.2", 7399)
    assert r["connect_errno"] == "EACCES"
    assert echo(h1.netns, "198.18.0.1", 8081, b"two") == b"two"


@pytest.mark.parametrize("server, target", [("fd53:6700:0:1::1", "fd53:6700:0:1::1"),
                                            ("0.0.0.0", "::ffff:198.18.0.1")])
def test_every_datagram_leaves_from_the_endpoint(slab, server, target):
    """sendmsg6 rewrites the source of each datagram, also after the kernel
    autobound the socket on the first one (IPv6 and v4-mapped)."""
    srv = slab.spawn_plain("h1", PROBE + ["udp-server", server, "7312", "--count", "3"])
    assert read_json_line(srv)["ready"]
    r = slab.probe("h1-c1", "udp-client", target, 7312, "--count", "3")
    assert r["replies"] == 3 and _grafted(r["mark"])
    froms = [read_json_line(srv)["from"][0] for _ in range(3)]
    want = "fd53:6700:0:1::1" if ":" in server else "198.18.0.1"
    assert froms == [want] * 3


def test_uninstall_removes_pins_and_cgroup_only_when_stopped(tmp_path):
    """An agent in the test's own (root) namespace: --no-nft, so it never
    installs a policy table where the rest of the suite runs."""
    import subprocess
    import sys

    from sockgraft.kernel import bpf
    env = dict(os.environ, SOCKGRAFT_STATE_DIR=str(tmp_path))
    sg = [sys.executable, "-m", "sockgraft.cli.main", "agent"]
    name = "uninst-test"
    agent = subprocess.Popen(sg + ["--directory", "off", "--socket",
                                   str(tmp_path / "a.sock"), "--oci-socket", "off",
                                   "--no-nft", "--node", name], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while not bpf.leftovers("default") and time.monotonic() < deadline:
            time.sleep(0.1)
        assert bpf.leftovers("default"), "the agent attached nothing"
        p = subprocess.run(sg + ["--uninstall", "--socket", str(tmp_path / "a.sock")], env=env,
                           capture_output=True, text=True, timeout=30)
        assert p.returncode == 1 and "still running" in p.stderr
    finally:
        agent.terminate()
        agent.wait(timeout=10)
    p = subprocess.run(sg + ["--uninstall", "--socket", str(tmp_path / "a.sock")], env=env,
                       capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "removed" in p.stdout
    assert bpf.leftovers("default") == []
    from sockgraft.kernel import nft
    assert "sockgraft" not in nft.list_tables(None, "inet")


@pytest.mark.parametrize("answer", ["native", "python"])
def test_sockets_answered_by_notifier_threads_are_counted_and_listed(slab, answer):
    """socket() answered by the container's two notifier threads, in the
    native loop or in Python (--native off): `stats` shows them and counts
    every socket, `sockets` lists the open ones (the Python threads hand
    records to the agent's loop; the native loop's are found on demand, by
    mark, in the container's processes), and both forget them at exit."""
    import json
    import subprocess
    import sys
    if answer == "python":
        slab.stop_agent("h1")
        slab.start_agent("h1", "--native", "off")
    hold = ("import socket, sys\n"
            "s = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(40)]\n"
            "c = socket.socket(); c.connect(('198.18.0.1', 8082))\n"
            "print('ready', len(s), flush=True)\nsys.stdin.read()\n")
    srv = slab.spawn_plain("h1", [sys.executable, "-c",
                                  "import socket, time; s = socket.create_server(('198.18.0.1',"
                                  " 8082)); print('up', flush=True); c = s.accept(); "
                                  "time.sleep(60)"])
    assert srv.stdout.readline().strip() == "up"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sockgraft.cli.main", "run", "--container", "h1-c1", "--lab",
         slab.plan.name, "--graft-at", "socket", "--", sys.executable, "-c", hold],
        env=slab.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True)
    slab.procs.append(proc)
    assert proc.stdout.readline().strip() == "ready 40"
    agent = slab.agent_socket("h1")
    def containers():
        (stats,) = json.loads(slab.sg("stats", "--json", "--agent", agent).stdout).values()
        return [c for c in stats["containers"] if c["container"] == "h1-c1"]

    mine = containers()
    assert len(mine) == 1 and mine[0]["graft_at"] == "socket"
    assert mine[0]["native"] is (answer == "native")
    assert mine[0]["notifier_threads"] == 2 and mine[0]["grafted"] >= 41
    rows = [r for r in json.loads(slab.sg("sockets", "--json", "--agent", agent).stdout)
            if r["container"] == "h1-c1"]
    assert len(rows) == 41 and {r["kind"] for r in rows} == {"socket"}
    assert len({r["inode"] for r in rows}) == 41
    assert sorted(r["proto"] for r in rows) == ["tcp"] + ["udp"] * 40
    assert all(os.readlink(f"/proc/{r['pid']}/fd/{r['fd']}") == f"socket:[{r['inode']}]"
               for r in rows)                             # the holder's own fd numbers
    (tcp,) = [r for r in rows if r["proto"] == "tcp"]
    assert tcp["remote"] == "198.18.0.1:8082" and tcp["local"].startswith("198.18.0.1:")
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0
    deadline = time.monotonic() + 10
    while containers() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not containers()
    rows = json.loads(slab.sg("sockets", "--json", "--agent", agent).stdout)
    assert not [r for r in rows if r["container"] == "h1-c1"]


# --- a socket-mode container's loopback is its own (issue 14, item 3) ------------

def test_the_containers_processes_talk_over_their_own_loopback(slab):
    """A server bound to 127.0.0.1 and ::1 in a socket-mode container is
    reached by the container's own clients at 127.0.0.1 / ::1 (both see
    loopback addresses), not by another container's, and not by a host
    process; its sockets live on the container's private loopback on the
    host (127.83.0.ID, fd53:4c4f::ID)."""
    slab.configure("h1-c2", SOCKET_MODE.replace("h1-c1", "h1-c2"))
    for host, port in (("127.0.0.1", 7410), ("::1", 7411)):
        srv = slab.spawn("h1-c1", PROBE + ["tcp-server", host, str(port), "--count", "1"])
        ready = read_json_line(srv)
        assert ready["local"] == [host, port], ready          # what the application sees
        r = slab.probe("h1-c1", "tcp-client", host, port)
        assert r["connect_errno"] == 0 and r["echo"] == "ping", r
        assert r["peer"] == [host, port] and r["local"][0] == host and _grafted(r["mark"])
        assert read_json_line(srv)["accepted"][0] == host
        assert srv.wait(timeout=10) == 0
        # another socket-mode container's loopback is its own: nothing listens there
        srv = slab.spawn("h1-c1", PROBE + ["tcp-server", host, str(port), "--count", "1"])
        assert read_json_line(srv)["ready"]
        r = slab.probe("h1-c2", "tcp-client", host, port)
        assert r["connect_errno"] == "ECONNREFUSED", r
        # a host process reaching for the private address gets nothing
        stats = json.loads(slab.sg("stats", "--json", "--agent",
                                   slab.agent_socket("h1")).stdout)
        (mark,) = {c["mark"] for st in stats.values() for c in st["containers"]
                   if c["container"] == "h1-c1"}
        v4, v6 = _private(mark)
        h1 = slab.plan.node("h1").netns
        with pytest.raises(OSError):
            echo(h1, v4 if ":" not in host else v6, port, b"x", timeout=2)
        srv.kill()
        srv.wait()


def test_go_runtime_loopback_probes_bind(slab):
    """Go's start-up probe binds [::1]:0 and [::ffff:127.0.0.1]:0: both work,
    without audit lines (before: two denials per process)."""
    before = len([a for a in slab.audit("h1") if a["syscall"] == "bind"])
    r = slab.probe("h1-c1", "bind-probe", "::1", "::ffff:127.0.0.1")
    assert r == {"::1": 0, "::ffff:127.0.0.1": 0}, r
    assert len([a for a in slab.audit("h1") if a["syscall"] == "bind"]) == before


def test_udp_over_the_containers_own_loopback(slab):
    srv = slab.spawn("h1-c1", PROBE + ["udp-server", "127.0.0.1", "7412", "--count", "1"])
    assert read_json_line(srv)["ready"]
    r = slab.probe("h1-c1", "udp-client", "127.0.0.1", 7412)
    assert r["replies"] == 1, r
    assert read_json_line(srv)["from"][0] == "127.0.0.1"


def _private(mark):
    from sockgraft.model.graft import private_loopback
    v4, v6 = private_loopback(mark)
    return str(v4), str(v6)


@pytest.mark.parametrize("host,listen", [("127.0.0.1", "0.0.0.0"), ("::1", "::")])
def test_the_containers_loopback_never_reaches_a_host_wildcard_listener(slab, host, listen):
    """A host service listening on every address (sshd on 0.0.0.0:22, a
    syslog on [::]:514) accepts packets to any local address - the private
    loopback addresses too: what a socket-mode container sends to its own
    loopback must not reach it (nothing of the container listens there).
    TCP was safe (the cgroup ingress guard drops the handshake's answer);
    a datagram reached the host's service (nftables input chain now)."""
    from sentinel import Sentinel
    from sockgraft.kernel import netns
    h1 = slab.plan.node("h1").netns
    own_lo = "::1" if ":" in host else "127.0.0.1"
    with Sentinel(h1, listen, 7420, "tcp") as tcp_s, Sentinel(h1, listen, 7421, "udp") as udp_s:
        t0 = time.monotonic()
        r = slab.probe("h1-c1", "tcp-client", host, 7420)
        assert r["connect_errno"] == "ECONNREFUSED", r
        assert time.monotonic() - t0 < 5, "a dropped SYN is no refusal"
        slab.probe("h1-c1", "udp-client", host, 7421)
        netns.run_in(h1, _udp_send_to, own_lo, 7421)    # the control: it does arrive
    assert tcp_s.received == [], tcp_s.received
    assert udp_s.received == [own_lo] or udp_s.received == [f"::ffff:{own_lo}"], \
        udp_s.received


def _udp_send_to(addr, port):
    with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET,
                       socket.SOCK_DGRAM) as s:
        s.sendto(b"control", (addr, port))
    return True
