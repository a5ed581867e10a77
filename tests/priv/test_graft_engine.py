"""The grafting engine on the real kernel: agents in lab hosts, unmodified
programs under `sockgraft run` in lab containers."""

import json
import os
import select
import signal
import sys
import time

import pytest

from grafting import PROBE, read_json_line
from nettools import EchoServer, echo

pytestmark = pytest.mark.priv

EGRESS_V4 = """
container = "h1-c1"
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[endpoints.ep-out6]
type = "ipv6"
addr = "fd53:6700:0:1::1"
port = "dynamic"
[rules]
egress = ["198.18.0.0/24=ep-out", "fd53:6700:0:1::1/128=ep-out6", "127.0.0.0/8=ep-out"]
[policy]
deny = ["deny tcp 198.18.0.2 7199"]
"""


def test_egress_tcp_is_grafted_and_skips_the_veth(glab):
    glab.configure("h1-c1", EGRESS_V4)
    h2 = glab.plan.node("h2")
    before = glab.veth_rx("h1-c1")
    with EchoServer(h2.netns, "0.0.0.0", 7100) as srv:
        r = glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7100)
        assert srv.peer() == "198.18.0.1"          # left from the endpoint, not the container
    assert r["connect_errno"] == 0 and r["echo"] == "ping"
    assert r["fd_same"] and r["replaced"]            # same fd number, now a host socket
    assert r["local"][0] == "198.18.0.1" and r["peer"] == ["198.18.0.2", 7100]
    assert glab.veth_rx("h1-c1") - before < 400      # nothing but stray ND/MLD at most


def test_plain_container_traffic_still_uses_the_container_network(glab):
    glab.configure("h1-c1", EGRESS_V4)
    c2 = glab.plan.node("h1-c2")
    before = glab.veth_rx("h1-c1")
    with EchoServer(c2.netns, "0.0.0.0", 7101) as srv:
        r = glab.probe("h1-c1", "tcp-client", "198.19.1.3", 7101)   # no egress rule
        assert srv.peer() == "198.19.1.2"
    assert r["echo"] == "ping" and not r["replaced"]
    assert glab.veth_rx("h1-c1") > before


def test_egress_ipv6_and_mapped(glab):
    glab.configure("h1-c1", EGRESS_V4)
    h1, h2 = glab.plan.node("h1"), glab.plan.node("h2")
    with EchoServer(h1.netns, "::", 7102) as srv:
        r = glab.probe("h1-c1", "tcp-client", "fd53:6700:0:1::1", 7102)
        assert srv.peer() == "fd53:6700:0:1::1"
    assert r["replaced"] and r["echo"] == "ping"
    with EchoServer(h2.netns, "0.0.0.0", 7103) as srv:
        r = glab.probe("h1-c1", "tcp-client", "::ffff:198.18.0.2", 7103)
        assert srv.peer() == "198.18.0.1"
    assert r["replaced"] and r["echo"] == "ping" and r["peer"][0] == "::ffff:198.18.0.2"


def test_denied_connect_gets_eacces_and_an_audit_line(glab):
    glab.configure("h1-c1", EGRESS_V4)
    r = glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7199)
    # (the native loop grafts, then the kernel guard refuses the connect: the
    # socket is a host socket by then; the Python path refuses before)
    assert r["connect_errno"] == "EACCES"
    r = glab.probe("h1-c1", "tcp-client", "127.0.0.1", 7198)   # grafted loopback: builtin
    assert r["connect_errno"] == "EACCES"
    time.sleep(1.5)                         # kernel denials are audited once a second
    lines = glab.audit("h1")
    assert {(a["syscall"], a["address"], a["rule"], a["verdict"]) for a in lines} >= {
        ("connect", "198.18.0.2:7199", "deny[0]", "deny"),
        ("connect", "127.0.0.1:7198", "builtin:loopback", "deny")}
    assert all(a["container"] == "h1-c1" for a in lines)


@pytest.mark.parametrize("answer", ["native", "python"])
def test_nonblocking_threaded_and_options(glab, answer):
    """The same connects answered by the native loop (blocking and
    non-blocking sockets) and with it off (the Python grafter):
    same fd, the application's options and close-on-exec, a destination
    without egress rule left to the container's own socket."""
    glab.set_native("h1", answer == "native")
    glab.configure("h1-c1", EGRESS_V4)
    h2 = glab.plan.node("h2")

    before = _native_count(glab)
    c12 = glab.plan.hosts[0].containers[1]
    with EchoServer(c12.netns, "0.0.0.0", 7107):               # no egress rule
        r = glab.probe("h1-c1", "tcp-client", str(c12.ipv4.ip), 7107)
    assert r["echo"] == "ping" and not r["replaced"] and r["mark"] == 0
    with EchoServer(h2.netns, "0.0.0.0", 7104):
        r = glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7104, "--nonblock")
    assert r["connect_errno"] in ("EINPROGRESS", 0) and r["so_error"] == 0
    assert r["replaced"] and r["echo"] == "ping"
    with EchoServer(h2.netns, "0.0.0.0", 7105):
        r = glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7105, "--thread", "--opts")
    assert r["thread"] and r["replaced"] and r["echo"] == "ping"
    assert r["opts"]["SO_REUSEADDR"] == 1 and r["opts"]["SO_KEEPALIVE"] == 1
    assert r["opts"]["TCP_NODELAY"] == 1 and r["opts"]["TCP_KEEPIDLE"] == 77
    assert r["opts"]["SO_SNDBUF"] == 131072           # the kernel doubles what was set
    assert r["cloexec"] is True
    with EchoServer(h2.netns, "0.0.0.0", 7106):
        r = glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7106, "--cloexec", "0")
    assert r["replaced"] and r["cloexec"] is False
    # the three grafts (non-blocking too: not in epoll) were the native loop's, or none was
    assert _native_count(glab) - before == (3 if answer == "native" else 0)


def _native_count(glab) -> int:
    """Connects the native loop grafted so far (stats' by_native)."""
    st = json.loads(glab.sg("stats", "--json", "--agent", glab.agent_socket("h1")).stdout)
    return list(st.values())[0]["counters"]["by_native"]


INGRESS = """
container = "h2-c1"
[endpoints.ep-http]
type = "ipv4"
addr = "198.18.0.2"
port = 8081
[endpoints.ep-udp]
type = "ipv4"
addr = "198.18.0.2"
port = 5353
[rules]
ingress = ["0.0.0.0:80=ep-http", "[::]:81=ep-http", "0.0.0.0:53=ep-udp"]
"""


def test_ingress_tcp_server_serves_host_clients(glab):
    glab.configure("h2-c1", INGRESS)
    h1 = glab.plan.node("h1")
    srv = glab.spawn("h2-c1", PROBE + ["tcp-server", "0.0.0.0", "80", "--count", "1"])
    ready = read_json_line(srv)
    assert ready["local"] == ["198.18.0.2", 8081]     # what getsockname shows: the host side
    assert echo(h1.netns, "198.18.0.2", 8081, b"hi") == b"hi"
    assert read_json_line(srv)["accepted"][0] == "198.18.0.1"
    assert srv.wait(timeout=10) == 0


def test_ingress_dual_stack_wildcard_with_ipv4_endpoint(glab):
    glab.configure("h2-c1", INGRESS)
    h1 = glab.plan.node("h1")
    srv = glab.spawn("h2-c1", PROBE + ["tcp-server", "::", "81", "--count", "1"])
    ready = read_json_line(srv)
    assert ready["local"] == ["::ffff:198.18.0.2", 8081]   # AF_INET6 host socket, v4 endpoint
    assert echo(h1.netns, "198.18.0.2", 8081, b"v4 to dual") == b"v4 to dual"
    assert read_json_line(srv)["accepted"][0] == "::ffff:198.18.0.1"


def test_a_dual_stack_server_is_grafted_by_an_ipv4_rule(glab):
    """Go's Listen("tcp", ":P"), Node's listen(P) and busybox httpd bind
    [::]:P dual-stack: the rule 0.0.0.0:P covers it (issue 14, item 2). An
    IPv6-only [::]:P bind stays in the container with a log line saying why."""
    glab.configure("h2-c1", INGRESS)
    h1 = glab.plan.node("h1")
    srv = glab.spawn("h2-c1", PROBE + ["tcp-server", "::", "80", "--v6only", "0",
                                       "--count", "1"])
    ready = read_json_line(srv)
    assert ready["local"] == ["::ffff:198.18.0.2", 8081]
    assert echo(h1.netns, "198.18.0.2", 8081, b"dual") == b"dual"
    assert read_json_line(srv)["accepted"][0] == "::ffff:198.18.0.1"
    assert srv.wait(timeout=10) == 0
    srv = glab.spawn("h2-c1", PROBE + ["tcp-server", "::", "80", "--v6only", "1",
                                       "--count", "0"])
    assert read_json_line(srv)["local"] == ["::", 80]          # the container's own
    deadline = time.monotonic() + 5
    while "IPV6_V6ONLY" not in glab.agent_log("h2") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "bind [::]:80 stays in the container: the socket is IPv6-only (IPV6_V6ONLY) and " \
           "rule 0.0.0.0:80=ep-http is IPv4" in glab.agent_log("h2")


def test_a_grafted_server_stays_reachable_where_it_was(glab):
    """Its container address from the same host (bridged) and across hosts
    (VXLAN), from the host itself, and its published port (the lab's DNAT
    8080 -> 80): every old address reaches the listener on the host (issue
    14, item 1). Before: ECONNREFUSED everywhere but the endpoint."""
    glab.configure("h2-c1", INGRESS)
    h1, h2 = glab.plan.node("h1"), glab.plan.node("h2")
    srv = glab.spawn("h2-c1", PROBE + ["tcp-server", "0.0.0.0", "80", "--count", "5"])
    assert read_json_line(srv)["local"] == ["198.18.0.2", 8081]
    _wait_redirect(glab, "h2", "198.19.2.2")
    assert echo(glab.plan.node("h2-c2").netns, "198.19.2.2", 80, b"same host") == \
        b"same host"
    assert read_json_line(srv)["accepted"][0] == "198.19.2.3"   # the client's own address
    assert echo(glab.plan.node("h1-c1").netns, "198.19.2.2", 80, b"across") == b"across"
    assert read_json_line(srv)["accepted"][0] == "198.19.1.2"
    assert echo(h1.netns, "198.18.0.2", 8080, b"published") == b"published"
    assert read_json_line(srv)["accepted"][0] == "198.18.0.1"
    assert echo(h2.netns, "198.19.2.2", 80, b"host") == b"host"
    assert echo(h2.netns, "198.18.0.2", 8081, b"endpoint") == b"endpoint"
    assert srv.wait(timeout=10) == 0
    # the server is gone: so are its redirects (the sweep, about a second)
    deadline = time.monotonic() + 5
    while "198.19.2.2" in _nft(h2.netns) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "dnat" not in _nft(h2.netns)


def _nft(ns):
    from sockgraft.lab.traffic import run_in
    return run_in(ns, ["nft", "list", "table", "inet", "sockgraft"], timeout=10).stdout


def _wait_redirect(glab, host, addr, timeout=5):
    ns = glab.plan.node(host).netns
    deadline = time.monotonic() + timeout
    while addr not in _nft(ns):
        assert time.monotonic() < deadline, _nft(ns)
        time.sleep(0.05)


def test_ingress_udp_server(glab):
    glab.configure("h2-c1", INGRESS)
    h1 = glab.plan.node("h1")
    srv = glab.spawn("h2-c1", PROBE + ["udp-server", "0.0.0.0", "53"])
    assert read_json_line(srv)["local"] == ["198.18.0.2", 5353]
    assert echo(h1.netns, "198.18.0.2", 5353, b"q", proto="udp") == b"q"
    assert read_json_line(srv)["from"][0] == "198.18.0.1"


UDP_CLIENT = """
container = "h1-c2"
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[rules]
egress = ["198.18.0.0/24=ep-out"]
[policy]
deny = ["deny udp 198.18.0.2 7301"]
"""


def test_udp_egress_graft_and_per_datagram_policy_in_the_kernel(glab):
    glab.configure("h1-c2", UDP_CLIENT)
    h2 = glab.plan.node("h2")
    with EchoServer(h2.netns, "0.0.0.0", 7300, proto="udp") as srv:
        r = glab.probe("h1-c2", "udp-client", "198.18.0.2", 7300, "--connect")
        assert srv.peer() == "198.18.0.1"
    assert r["replies"] == 1 and r["local"][0] == "198.18.0.1"
    # sendto an allowed destination grafts the socket; later datagrams to a
    # denied one are dropped by nftables (EPERM), with no agent round trip.
    code = (
        "import socket,errno,json\n"
        "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n"
        "s.sendto(b'a',('198.18.0.2',7300))\n"
        "try:\n s.sendto(b'b',('198.18.0.2',7301)); r='sent'\n"
        "except OSError as e: r=errno.errorcode[e.errno]\n"
        "print(json.dumps({'local':s.getsockname()[0],'second':r}))\n")
    import sys
    rc, lines, err = glab.run("h1-c2", [sys.executable, "-c", code], options=["--udp-sendto"])
    assert rc == 0, err
    assert lines[-1] == {"local": "198.18.0.1", "second": "EPERM"}
    # without --udp-sendto an unconnected sender stays on the container network
    rc, lines, err = glab.run("h1-c2", [sys.executable, "-c", code])
    assert rc == 0, err
    assert lines[-1]["local"] == "0.0.0.0"


HOSTILE = [
    (2, 128, "0200"),                          # sockaddr_storage-sized, port 0, 0.0.0.0
    (2, 16, "ffff" + "00" * 14),               # unknown family
    (2, 16, "0a00" + "00" * 14),               # AF_INET6 family on an AF_INET socket
    (10, 28, "0a00" + "00" * 26),              # AF_INET6 socket... of the wrong type
    (2, 28, "0200" + "1f90" + "c6120002" + "ff" * 20),   # grafted dest, junk tail
]


@pytest.mark.parametrize("family,addrlen,hexdata", HOSTILE)
def test_hostile_sockaddrs_get_the_kernels_errno_and_the_agent_keeps_serving(
        glab, family, addrlen, hexdata):
    glab.configure("h1-c1", EGRESS_V4)
    h2 = glab.plan.node("h2")
    grafted = glab.probe("h1-c1", "connect-raw", family, addrlen, hexdata)
    plain = glab.spawn_plain("h1-c2", PROBE + ["connect-raw", family, addrlen, hexdata])
    expected = read_json_line(plain)["errno"]      # what the kernel says without sockgraft
    assert grafted["errno"] == expected
    assert glab.probe("h1-c1", "connect-badptr")["errno"] == "EFAULT"
    with EchoServer(h2.netns, "0.0.0.0", 7107):
        assert glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7107)["echo"] == "ping"


def test_no_fd_leak_after_many_grafts(glab):
    glab.configure("h1-c1", EGRESS_V4)
    srv = glab.spawn_plain("h2", PROBE + ["tcp-server", "0.0.0.0", "7108", "--count", "100000"])
    read_json_line(srv)
    glab.probe("h1-c1", "loop", "198.18.0.2", 7108, 5)      # warm caches
    fds = glab.agent_fds("h1")
    r = glab.probe("h1-c1", "loop", "198.18.0.2", 7108, 300)
    assert r["ok"] == 300
    time.sleep(0.3)
    assert glab.agent_fds("h1") <= fds
    stats = glab.sg("stats", "--json").stdout
    assert '"grafted"' in stats


def test_sockets_lists_grafted_sockets(glab):
    glab.configure("h2-c1", INGRESS)
    srv = glab.spawn("h2-c1", PROBE + ["tcp-server", "0.0.0.0", "80", "--count", "1"])
    ready = read_json_line(srv)
    import json
    rows = json.loads(glab.sg("sockets", "--json").stdout)
    mine = [r for r in rows if r["container"] == "h2-c1"]
    assert len(mine) == 1
    assert mine[0]["pid"] == ready["pid"] and mine[0]["fd"] == ready["fd"]
    assert mine[0]["endpoint"] == "ep-http" and mine[0]["local"] == "198.18.0.2:8081"
    assert mine[0]["kind"] == "ingress" and mine[0]["proto"] == "tcp"
    table = glab.sg("sockets").stdout
    assert "ep-http" in table and "h2-c1" in table


HOLD = ("import json, os, socket, sys, time\n"
        "s = socket.create_connection((sys.argv[1], int(sys.argv[2])))\n"
        "print(json.dumps({'pid': os.getpid(), 'fd': s.fileno()}), flush=True)\n"
        "time.sleep(30)\n")


@pytest.mark.parametrize("answer", ["native", "python"])
def test_sockets_lists_grafted_clients(glab, answer):
    """A connection grafted at connect() is listed with its container, pid,
    fd and addresses whichever path grafted it (the native loop keeps no
    record: its sockets are found when asked, by the container's mark)."""
    import json
    import sys
    glab.set_native("h1", answer == "native")
    glab.configure("h1-c1", EGRESS_V4)
    with EchoServer(glab.plan.node("h2").netns, "0.0.0.0", 7120):
        p = glab.spawn("h1-c1", [sys.executable, "-c", HOLD, "198.18.0.2", "7120"])
        held = read_json_line(p)
        rows = json.loads(glab.sg("sockets", "--json").stdout)
        p.kill()
    mine = [r for r in rows if r["container"] == "h1-c1" and r["fd"] == held["fd"]]
    assert len(mine) == 1 and mine[0]["pid"] == held["pid"], rows
    assert mine[0]["local"].startswith("198.18.0.1:") and mine[0]["proto"] == "tcp"
    assert mine[0]["remote"] == "198.18.0.2:7120"


def test_bind_of_an_unclaimed_host_address_is_denied(glab):
    glab.configure("h1-c1", EGRESS_V4)
    r = glab.probe("h1-c1", "tcp-server", "198.18.0.1", 7500)
    assert r["bind_errno"] == "EACCES"
    assert any(a["syscall"] == "bind" and a["rule"] == "bind:no-endpoint" and
               a["address"] == "198.18.0.1:7500" for a in glab.audit("h1"))
    # the container's own addresses and wildcards are untouched
    srv = glab.spawn("h1-c1", PROBE + ["tcp-server", "198.19.1.2", "7501", "--count", "0"])
    assert read_json_line(srv)["local"] == ["198.19.1.2", 7501]


def test_a_blocking_connect_waits_in_the_kernel_not_in_the_agent(glab):
    """The agent installs the host socket and lets the kernel go on with the
    application's connect(): a connect that takes long (ARP for an absent
    address) waits in the application's thread, the agent holds nothing for
    it, and an application killed meanwhile leaves nothing behind."""
    import json
    glab.configure("h1-c1", EGRESS_V4)
    h2 = glab.plan.node("h2")
    with EchoServer(h2.netns, "0.0.0.0", 7401):
        glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7401)    # warm up
    time.sleep(1.2)                                              # let the sweep run
    fds = glab.agent_fds("h1")

    def stats():
        out = glab.sg("stats", "--json", "--agent", glab.agent_socket("h1")).stdout
        return list(json.loads(out).values())[0]
    grafted = stats()["counters"]["grafted"]
    # 198.18.0.99 does not exist: the blocking connect waits for ARP to fail
    p = glab.spawn("h1-c1", PROBE + ["tcp-client", "198.18.0.99", "7402"])
    deadline = time.monotonic() + 5
    while stats()["counters"]["grafted"] == grafted:
        assert time.monotonic() < deadline, "the connect was never grafted"
        time.sleep(0.05)
    time.sleep(0.5)
    assert p.poll() is None, "the connect should still be waiting for ARP"
    assert stats()["pending_connects"] == 0
    os.killpg(p.pid, signal.SIGKILL)
    p.wait(timeout=10)
    time.sleep(2.5)
    assert glab.agent_fds("h1") <= fds
    with EchoServer(h2.netns, "0.0.0.0", 7403):
        assert glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7403)["echo"] == "ping"


RESTART = INGRESS.replace('ingress = [', 'egress = ["198.18.0.1/32=ep-out"]\ningress = [') + """
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.2"
port = "dynamic"
"""


def test_agent_restart_keeps_grafted_sockets_and_queues_new_calls(glab):
    glab.configure("h2-c1", RESTART)
    h1 = glab.plan.node("h1")
    srv = glab.spawn("h2-c1", PROBE + ["tcp-server", "0.0.0.0", "80", "--count", "2"])
    assert read_json_line(srv)["local"] == ["198.18.0.2", 8081]
    # a client in the same container that connects only after the agent is gone
    late = glab.spawn("h2-c1", ["sh", "-c", "sleep 2; exec " + " ".join(
        PROBE + ["tcp-client", "198.18.0.1", "7404"])])
    import json
    deadline = time.monotonic() + 20       # both launchers registered before the kill
    while time.monotonic() < deadline:
        st = json.loads(glab.sg("stats", "--json", "--agent", glab.agent_socket("h2")).stdout)
        if sum(c["container"] == "h2-c1" for c in list(st.values())[0]["containers"]) == 2:
            break
        time.sleep(0.05)
    else:
        pytest.fail("the late client never registered")
    glab.stop_agent("h2", signal.SIGKILL)
    assert echo(h1.netns, "198.18.0.2", 8081, b"no agent") == b"no agent"   # still served
    with EchoServer(h1.netns, "0.0.0.0", 7404) as peer:
        time.sleep(3)                 # the late connect is trapped and waits in the kernel
        assert late.poll() is None
        glab.start_agent("h2")        # the holder re-registers; the call completes grafted
        r = read_json_line(late, timeout=15)
        assert peer.peer() == "198.18.0.2"
    assert r["connect_errno"] == 0 and r["replaced"] and r["echo"] == "ping"
    assert echo(h1.netns, "198.18.0.2", 8081, b"new agent") == b"new agent"


def test_thousand_sockets_in_several_containers_then_nothing_left(glab, tmp_path):
    import json
    import subprocess
    import sys
    from sockgraft.bench.engine import build_tools
    from sockgraft.kernel import netns
    holdsocks = build_tools(str(tmp_path / "bin"))["holdsocks"]
    ns_path = netns.path(glab.plan.node("h1-c2").netns)
    names = [f"many-{i}" for i in range(5)]
    for n in names:
        glab.configure(n, f'container = "{n}"\n[endpoints.ep]\ntype = "ipv4"\n'
                          f'addr = "198.18.0.1"\nport = "dynamic"\n[rules]\n'
                          f'ingress = ["0.0.0.0:30000-30199=ep"]\n')
    time.sleep(1.2)
    fds = glab.agent_fds("h1")
    procs = [subprocess.Popen(
        [sys.executable, "-m", "sockgraft.cli.main", "run", "--container", n, "--netns",
         ns_path, "--agent", glab.agent_socket("h1"), "--", holdsocks, "200", "30000"],
        env=glab.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        start_new_session=True) for n in names]
    glab.procs.extend(procs)
    assert [p.stdout.readline().strip() for p in procs] == ["ready 200"] * 5
    rows = json.loads(glab.sg("sockets", "--json", "--agent", glab.agent_socket("h1")).stdout)
    assert len([r for r in rows if r["container"].startswith("many-")]) == 1000
    assert len({r["local"] for r in rows if r["container"].startswith("many-")}) == 1000
    for p in procs:
        p.stdin.close()
    for p in procs:
        assert p.wait(timeout=30) == 0
    time.sleep(1.5)
    assert glab.agent_fds("h1") <= fds
    rows = json.loads(glab.sg("sockets", "--json", "--agent", glab.agent_socket("h1")).stdout)
    assert not [r for r in rows if r["container"].startswith("many-")]


@pytest.mark.parametrize("answer", ["native", "python"])
@pytest.mark.parametrize("when", ["before", "after"])
def test_epoll_registration_made_before_connect_survives_the_graft(glab, answer, when):
    """A non-blocking socket in epoll before its connect() (nginx) keeps its
    registration through the graft: the native loop sees the epoll item
    (kcmp) and hands it to Python, which carries it over. Registered after
    the connect (Go, libuv, asyncio), the native loop grafts it itself."""
    glab.set_native("h1", answer == "native")
    glab.configure("h1-c1", EGRESS_V4)
    h2 = glab.plan.node("h2")
    before = _native_count(glab)
    with EchoServer(h2.netns, "0.0.0.0", 7600):
        r = glab.probe("h1-c1", "epoll-client", "198.18.0.2", 7600, when)
    assert r["connect_errno"] == "EINPROGRESS"           # non-blocking, as asked
    assert r["local"][0] == "198.18.0.1"                 # grafted
    assert r["out"] and r["in"] and r["echo"] == "ping"   # events of the new socket arrive
    assert r["modify"] == "ok"                            # keyed by the app's fd number
    assert _native_count(glab) - before == (answer == "native" and when == "after")


CONNECT_LOOP = """
import json, socket, sys, threading, time
ok = plain = failed = 0
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(1), stop.set()), daemon=True).start()
sys.stdout.write("up\\n"); sys.stdout.flush()
deadline = time.monotonic() + 60
while not stop.is_set() and time.monotonic() < deadline:
    s = socket.socket()
    try:
        s.connect(("198.18.0.2", int(sys.argv[1])))
        if s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK): ok += 1
        else: plain += 1
    except OSError:
        failed += 1
    s.close()
print(json.dumps({"grafted": ok, "plain": plain, "failed": failed}), flush=True)
"""
ACCEPT_KEEP = ("import socket,sys\n"
               "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
               "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(512); print('up', flush=True)\n"
               "keep = []\n"
               "while True: keep.append(s.accept()[0])\n")
ACCEPT_CLOSE = ("import socket,sys\n"
                "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
                "s.bind(('0.0.0.0', int(sys.argv[1]))); s.listen(512); print('up', flush=True)\n"
                "while True: s.accept()[0].close()\n")


def test_connects_racing_policy_changes_are_all_grafted(glab):
    """A new egress generation while the native loop answers connects: each
    one is grafted under the old rules or the new (never left to the
    container's socket because the old generation's rules were gone before
    the loop took the new one)."""
    glab.configure("h1-c1", EGRESS_V4)
    srv = glab.spawn_plain("h2", ["python3", "-c", ACCEPT_CLOSE, "7110"])
    assert srv.stdout.readline().strip() == "up"
    app = glab.spawn("h1-c1", ["python3", "-c", CONNECT_LOOP, "7110"])
    assert app.stdout.readline().strip() == "up"
    two = EGRESS_V4.replace('deny = ["deny tcp 198.18.0.2 7199"]',
                            'deny = ["deny tcp 198.18.0.2 7199", "deny tcp 198.18.0.2 7198"]')
    assert two != EGRESS_V4
    for i in range(24):
        glab.configure("h1-c1", EGRESS_V4 if i % 2 else two)
    app.stdin.write("x")
    app.stdin.flush()
    got = json.loads(app.stdout.readline())
    assert got["plain"] == 0 and got["failed"] == 0 and got["grafted"] >= 100, got


EPOLL_LATE = """
import json, select, socket, sys, time
addr = (sys.argv[1], int(sys.argv[2]))
keep = []
for _ in range(8):              # the agent's threads read this process's epoll
    c = socket.socket(); c.setblocking(False)   # instances: none
    c.connect_ex(addr)
    select.select([], [c], [], 3)
    keep.append(c)
time.sleep(0.2)
for _ in range(3):
    ep = select.epoll()         # a new one, within the second the agent kept its list
    s = socket.socket(); s.setblocking(False)
    ep.register(s.fileno(), select.EPOLLOUT)     # watched before connect() (nginx's order)
    s.connect_ex(addr)
    ev = ep.poll(2)
    print(json.dumps({"events": ev[0][1] if ev else 0,
                      "so_error": s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR),
                      "mark": s.getsockopt(socket.SOL_SOCKET, socket.SO_MARK)}), flush=True)
    keep += [ep, s]
"""


@pytest.mark.parametrize("answer", ["native", "python"])
def test_an_epoll_made_just_before_a_connect_keeps_its_registration(glab, answer):
    """A process connects (the agent reads its epoll instances), then makes a
    new epoll instance and registers a non-blocking socket with it before
    connect(): the graft must carry that registration over (the instance is
    seen: `sockgraft run` traps epoll_create(1) and the agent's list is old
    from then on). Before, the list read a moment earlier was kept for a
    second and the socket was swapped under the epoll: no event ever came."""
    glab.set_native("h1", answer == "native")
    glab.configure("h1-c1", EGRESS_V4)
    srv = glab.spawn_plain("h2", ["python3", "-c", ACCEPT_KEEP, "7108"])
    assert srv.stdout.readline().strip() == "up"
    rc, out, err = glab.run("h1-c1", ["python3", "-c", EPOLL_LATE, "198.18.0.2", "7108"])
    assert rc == 0 and len(out) == 3, err
    # EPOLLOUT of the connected host socket (not EPOLLOUT|EPOLLHUP of the
    # unconnected container socket the registration stayed with, not nothing)
    assert [o["events"] for o in out] == [select.EPOLLOUT] * 3, out
    assert all(o["mark"] != 0 and o["so_error"] == 0 for o in out), out


def test_a_container_without_a_stored_config_gives_its_mark_back(glab):
    """A container with no stored configuration (`sockgraft run` of an
    unconfigured container; an OCI container configured by its annotations)
    holds a mark while it runs; when its last filtered task exits, the mark
    is free again (else every container ever started kept one: after 65,535
    no new one registered)."""
    from sockgraft.agent.store import ConfigStore, default_dir
    store = ConfigStore(default_dir())
    assert "h1-c2" not in store.marks() and store.load("h1-c2") is None
    proc = glab.spawn("h1-c2", [sys.executable, "-c",
                                "import socket, sys; socket.socket(); print('{}', flush=True); "
                                "sys.stdin.readline()"])
    assert read_json_line(proc, timeout=20) == {}
    assert "h1-c2" in store.marks()                  # held while it runs
    proc.stdin.close()
    proc.wait(timeout=10)
    deadline = time.monotonic() + 5
    while "h1-c2" in store.marks():
        assert time.monotonic() < deadline, "the mark stayed held after the container exited"
        time.sleep(0.1)


LINGER_APP = r"""
import json, socket, struct, sys
s = socket.create_connection(("198.18.0.2", 7101))
s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 5))
print(json.dumps({"connected": True}), flush=True)
sys.stdin.readline()
print(json.dumps({"linger": list(struct.unpack("ii", s.getsockopt(
    socket.SOL_SOCKET, socket.SO_LINGER, 8)))}), flush=True)
"""


def test_the_agents_look_at_a_socket_leaves_its_linger_alone(glab):
    """`sockgraft sockets` copies every grafted socket to read it; closing
    the copies changes nothing of the application's sockets (SO_LINGER is
    turned off only on a copy of a socket the agent has just replaced)."""
    glab.configure("h1-c1", EGRESS_V4)
    with EchoServer(glab.plan.node("h2").netns, "0.0.0.0", 7101):
        app = glab.spawn("h1-c1", [sys.executable, "-c", LINGER_APP])
        assert read_json_line(app, timeout=20)["connected"]
        listing = json.loads(glab.sg("sockets", "--json").stdout)
        assert any(s["container"] == "h1-c1" and s.get("remote", "").startswith("198.18.0.2")
                   for s in listing), listing
        app.stdin.write("\n")
        app.stdin.flush()
        assert read_json_line(app, timeout=20)["linger"] == [1, 5]
        app.wait(timeout=10)
