"""The real thing: runc containers (busybox-static rootfs) networked by the
reference bridge + host-local CNI plugins chained with sockgraft-cni, started
with the profile `sockgraft oci-profile` writes. The runtime hands the
seccomp listener to the lab host's agent; nobody runs `sockgraft run`."""

import json
import os
import select
import socket
import subprocess
import sys
import time

import pytest

from nettools import http_get
from runtime import Cni, CniFailed, RuncEnv, conflist
from sockgraft.kernel import netns
from sockgraft.lab.traffic import wait_listening

pytestmark = pytest.mark.priv

WEB_ANN = {"sockgraft/endpoints": "ep-http=ipv4:198.18.0.1:8081",
           "sockgraft/ingress": "0.0.0.0:80=ep-http,[::]:80=ep-http"}
CLI_ANN = {"sockgraft/endpoints": "ep-out=ipv4:198.18.0.1:dynamic",
           "sockgraft/egress": "198.18.0.0/24=ep-out",
           "sockgraft/policy": "deny tcp 198.18.0.2 9"}


@pytest.fixture
def rt(glab, tmp_path):
    env = RuncEnv(glab, tmp_path)
    try:
        yield env
    finally:
        env.close()


def _stats(g, container):
    out = json.loads(g.sg("stats", "--json", "--agent", g.agent_socket("h1")).stdout)
    rows = [c for r in out.values() for c in r["containers"] if c["container"] == container]
    return rows[0] if rows else None


def _wait(pred, timeout=10, what="condition"):
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_runc_server_and_client_grafted_by_annotations(rt):
    g = rt.g
    res = rt.start("web", ["/bin/httpd", "-f", "-p", "80", "-h", "/www"], WEB_ANN)
    assert res["ips"][0]["address"].startswith("198.19.101.")
    wait_listening(rt.h1.netns, 8081)      # the container's bind(:80) is a host socket
    body = netns.run_in(rt.h1.netns, http_get, "198.18.0.1", 8081)
    assert "hello from a grafted runc container" in body
    socks = json.loads(g.sg("sockets", "--json").stdout)
    assert any(s["container"] == "web" and s["kind"] == "ingress" and
               s["local"] in ("198.18.0.1:8081", "[::ffff:198.18.0.1]:8081") for s in socks)

    script = ("wget -q -O - http://198.18.0.1:8081/; echo wget-rc=$?; "
              "nc -w 2 198.18.0.2 9 </dev/null; echo nc-rc=$?; sleep 30")
    rt.start("cli", ["/bin/sh", "-c", script], CLI_ANN)
    _wait(lambda: "nc-rc=" in rt.output("cli"), what="the client container's output")
    out = rt.output("cli")
    assert "hello from a grafted runc container" in out and "wget-rc=0" in out
    assert "Permission denied" in out or "nc-rc=1" in out
    st = _stats(g, "cli")
    assert st is not None and st["grafted"] >= 1 and st["denied"] >= 1
    assert any(a["container"] == "cli" and a["rule"] == "deny[0]" and
               a["address"] == "198.18.0.2:9" for a in g.audit("h1"))

    # stop and removal: the session goes, the holder exits, CNI state is gone
    assert rt.stop("cli") == [] and rt.stop("web") == []
    _wait(lambda: _stats(g, "web") is None and _stats(g, "cli") is None,
          what="sessions of stopped containers to go")
    _wait(lambda: not [p for p in os.listdir("/proc") if p.isdigit() and
                       b"oci-hold" in _cmdline(p)], what="holders to exit")
    assert not os.listdir(os.path.join(g.state_dir, "cni"))
    assert not [s for s in json.loads(g.sg("sockets", "--json").stdout)
                if s["container"] in ("web", "cli")]


def _cmdline(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def test_agent_restart_keeps_oci_containers(rt):
    g = rt.g
    rt.start("web", ["/bin/httpd", "-f", "-p", "80", "-h", "/www"], WEB_ANN)
    wait_listening(rt.h1.netns, 8081)
    g.stop_agent("h1")
    assert "hello" in netns.run_in(rt.h1.netns, http_get, "198.18.0.1", 8081)
    g.start_agent("h1")
    _wait(lambda: _stats(g, "web") is not None, what="the holder to re-register")
    assert "hello" in netns.run_in(rt.h1.netns, http_get, "198.18.0.1", 8081)


def test_bad_annotations_are_rejected_and_the_container_still_runs(rt):
    g = rt.g
    bad = {"sockgraft/endpoints": "ep=ipv4:not-an-address:80",
           "sockgraft/ingress": "0.0.0.0:80=ep"}
    rt.start("bad", ["/bin/sh", "-c", "nc -l -p 7000 -w 1 </dev/null; echo bound-rc=$?; "
                                      "sleep 30"], bad)
    _wait(lambda: "bound-rc=" in rt.output("bad"), what="the container's output")
    assert "bound-rc=" in rt.output("bad")            # its syscalls were answered
    assert any(a["container"] == "bad" and a["verdict"] == "reject" and
               "not-an-address" in a["rule"] for a in g.audit("h1"))


def _handoff(path, payload, fds=()):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        if fds:
            socket.send_fds(s, [payload], list(fds))
        else:
            s.sendall(payload)
    except OSError:
        pass
    s.close()


def test_hostile_handoffs_are_rejected_without_leaks(rt):
    g = rt.g
    path = rt.listener
    base = g.agent_fds("h1")
    r, w = os.pipe()
    state = {"ociVersion": "1.0.2", "fds": ["seccompFd"], "pid": 1,
             "state": {"id": "x", "pid": 1, "bundle": "/", "annotations": {}}}
    try:
        _handoff(path, b"{not json", [r])
        _handoff(path, json.dumps(state).encode())                     # no fd
        _handoff(path, json.dumps({**state, "fds": ["seccompFd", "x"]}).encode(), [r])
        _handoff(path, json.dumps(state).encode(), [r, w])             # two fds, one named
        _handoff(path, b"[1,2,3]", [r])
        _handoff(path, json.dumps({**state, "pid": -5}).encode(), [r])
        big = b'{"x": "' + b"a" * (2 << 20) + b'"}'
        _handoff(path, big, [r])
    finally:
        os.close(r)
        os.close(w)
    _wait(lambda: g.agent_fds("h1") == base, what="the agent to close every fd it got")
    # and the agent still serves
    g.sg("stats", "--agent", g.agent_socket("h1"))
    log = g.agent_log("h1")
    for why in ("not JSON", "fd(s) but", "larger than", "pid"):
        assert why in log, f"no log line for {why!r}"


def test_cni_plugin_spec_behaviour(rt, tmp_path):
    """VERSION, a failed ADD leaves nothing, DEL is idempotent and works
    without an agent, CHECK."""
    g = rt.g
    exe = os.path.join(os.path.dirname(os.sys.executable), "sockgraft-cni")
    env = {"CNI_COMMAND": "VERSION", "PATH": os.environ["PATH"]}
    v = json.loads(subprocess.run([exe], env=env, capture_output=True, text=True,
                                  input="{}").stdout)
    assert "1.0.0" in v["supportedVersions"]

    graft = {"endpoints": {"ep": {"type": "ipv4", "addr": "198.18.0.1", "port": 8088}},
             "rules": {"ingress": ["0.0.0.0:88=ep"]}}
    # an invalid graft config: error code 7, nothing written
    bad = Cni(conflist(g.state_dir, tmp_path / "ipam2", subnet="198.19.102.0/24",
                       bridge="sgcni1", graft={"rules": {"ingress": ["0.0.0.0:88=nope"]}},
                       agentSocket=g.agent_socket("h1")), rt.h1.netns)
    ns = f"sg-{g.plan.name}-cnix"
    netns.create(ns)
    try:
        with pytest.raises(CniFailed) as exc:
            bad.add("c-bad", netns.path(ns))
        assert exc.value.plugin == "sockgraft-cni", exc.value.output
        assert json.loads(exc.value.output.splitlines()[0])["code"] == 7
        assert "nope" in exc.value.output
        bad.delete("c-bad", netns.path(ns))
        assert not os.path.exists(os.path.join(g.state_dir, "cni", "c-bad-eth0.json"))
        # agent down: ADD fails with "try again later" and leaves nothing
        good = Cni(conflist(g.state_dir, tmp_path / "ipam3", subnet="198.19.103.0/24",
                            bridge="sgcni2", graft=graft, container="c-good",
                            agentSocket=g.agent_socket("h1")), rt.h1.netns)
        g.stop_agent("h1")
        with pytest.raises(CniFailed) as exc:
            good.add("c-good", netns.path(ns))
        assert exc.value.plugin == "sockgraft-cni", exc.value.output
        assert json.loads(exc.value.output.splitlines()[0])["code"] == 11
        good.delete("c-good", netns.path(ns))
        assert not os.path.exists(os.path.join(g.state_dir, "containers", "c-good.toml"))
        assert not os.listdir(os.path.join(g.state_dir, "cni"))
        g.start_agent("h1")
        res = good.add("c-good", netns.path(ns))
        assert os.path.exists(os.path.join(g.state_dir, "containers", "c-good.toml"))
        assert all(p.returncode == 0 for p in good.check("c-good", netns.path(ns), res))
        g.stop_agent("h1")                       # DEL while the agent is away
        assert good.delete("c-good", netns.path(ns), res) == []
        assert good.delete("c-good", netns.path(ns), res) == []      # and again
        g.start_agent("h1")
        assert not os.path.exists(os.path.join(g.state_dir, "containers", "c-good.toml"))
        assert not os.listdir(os.path.join(g.state_dir, "cni"))
    finally:
        netns.delete(ns)


def test_cni_names_the_container_and_carries_its_graft_config(glab, tmp_path):
    """No annotations at all: the conflist's `graft` object (written to the
    store under the name CNI registered) grafts the runc container."""
    graft = {"endpoints": {"ep-http": {"type": "ipv4", "addr": "198.18.0.1", "port": 8085}},
             "rules": {"ingress": ["0.0.0.0:80=ep-http", "[::]:80=ep-http"]}}
    env = RuncEnv(glab, tmp_path)
    env.cni = Cni(conflist(glab.state_dir, tmp_path / "ipam", graft=graft,
                           container="pods.web", agentSocket=glab.agent_socket("h1")),
                  env.h1.netns)
    try:
        env.start("c0ffee", ["/bin/httpd", "-f", "-p", "80", "-h", "/www"], {})
        wait_listening(env.h1.netns, 8085)
        assert "hello" in netns.run_in(env.h1.netns, http_get, "198.18.0.1", 8085)
        assert _stats(glab, "pods.web") is not None
    finally:
        env.close()
    assert not os.path.exists(os.path.join(glab.state_dir, "containers", "pods.web.toml"))


def test_a_new_socket_mode_container_sends_its_first_packets(glab, tmp_path, attack_bin):
    """A runc container's first datagram and first SYN, sent the moment it
    starts, are not refused or dropped: nothing of a container is answered
    before nftables and the BPF maps enforce its policy (issue 14, item 4).
    Five containers, each a first try."""
    server = _h2_server(glab, 7700)
    env = RuncEnv(glab, tmp_path, graft_at="socket", extra_files={"attack": attack_bin})
    try:
        for i in range(5):
            cid = f"first{i}"
            env.start(cid, ["/bin/attack", "sock", "udp4", "send", "198.18.0.2:7701",
                            "sock", "tcp4", "connect", "198.18.0.2:7700"], CLI_ANN)
            _wait(lambda: '"done"' in env.output(cid), what=f"{cid}'s output")
            steps = [json.loads(line) for line in env.output(cid).splitlines()
                     if line.startswith("{")]
            send = next(s for s in steps if s.get("op") == "send")
            conn = next(s for s in steps if s.get("op") == "connect")
            assert send["ret"] == 1, (cid, send)
            assert conn["ret"] == 0 and conn["ms"] < 500, (cid, conn)
            assert env.stop(cid) == []
    finally:
        env.close()
        server.kill()
        server.wait()


def _h2_server(glab, port):
    """A TCP listener on h2 (connections complete in its backlog)."""
    h2 = glab.plan.node("h2")
    p = subprocess.Popen(["ip", "netns", "exec", h2.netns, sys.executable, "-c",
                          "import socket, time\n"
                          f"s = socket.create_server(('198.18.0.2', {port}), backlog=64)\n"
                          "time.sleep(120)"])
    wait_listening(h2.netns, port)
    return p


def test_a_foreground_runc_run_hands_its_listener_over(glab, tmp_path, attack_bin):
    """runc before 1.4 never closes its connection to the listener socket when
    it runs in the foreground: the agent takes the hand-off as soon as the
    message is whole (issue 14, item 5), not after a 5 s wait that ends in
    a rejection and ENOSYS for every trapped call."""
    server = _h2_server(glab, 7702)
    env = RuncEnv(glab, tmp_path, extra_files={"attack": attack_bin})
    try:
        env.start("fg", ["/bin/attack", "sock", "tcp4", "connect", "198.18.0.2:7702",
                         "sleep", "30"], CLI_ANN, foreground=True)
        _wait(lambda: '"connect"' in env.output("fg"), timeout=15, what="fg's connect")
        conn = next(json.loads(line) for line in env.output("fg").splitlines()
                    if '"connect"' in line)
        assert conn["ret"] == 0 and conn["ms"] < 3000, conn
        st = _stats(glab, "fg")
        assert st is not None and st["grafted"] >= 1
        assert env.stop("fg") == []
    finally:
        env.close()
        server.kill()
        server.wait()


def test_an_epoll_made_just_before_a_connect_keeps_its_registration_under_runc(
        glab, tmp_path, attack_bin):
    """The OCI profile traps epoll_create(1) in syscall mode: a runc
    container that connects (the agent reads its epoll instances), then makes
    a new epoll instance and registers a non-blocking socket with it before
    connect() (nginx's order) gets EPOLLOUT of the grafted socket. Without
    the trap the agent's list, read a moment before, is a second old: the
    socket is swapped under the new instance and no event ever comes."""
    server = _h2_server(glab, 7703)
    env = RuncEnv(glab, tmp_path, extra_files={"attack": attack_bin})
    try:
        steps = ["nbconnect", "198.18.0.2:7703"] * 6 + ["sleep", "0.2"] + \
            ["epconnect", "198.18.0.2:7703"] * 3
        env.start("ep", ["/bin/attack", *steps, "sleep", "30"], CLI_ANN)
        _wait(lambda: env.output("ep").count('"epconnect"') == 3, timeout=20,
              what="ep's connects")
        out = [json.loads(line) for line in env.output("ep").splitlines()
               if line.startswith("{") and '"op"' in line]
        nb = [o for o in out if o["op"] == "nbconnect"]
        ep = [o for o in out if o["op"] == "epconnect"]
        assert all(o["mark"] != 0 and o["so_error"] == 0 for o in nb), nb
        # EPOLLOUT of the connected host socket; not nothing (the registration
        # stayed with the container's own socket)
        assert [o["events"] for o in ep] == [select.EPOLLOUT] * 3, ep
        assert all(o["mark"] != 0 and o["so_error"] == 0 for o in ep), ep
        assert env.stop("ep") == []
    finally:
        env.close()
        server.kill()
        server.wait()


def test_a_grafted_runc_server_stays_reachable_at_its_ip_and_published_port(glab, tmp_path):
    """CNI portMappings (runtimeConfig, as the portmap plugin receives them)
    reach sockgraft-cni too: the published port and the container's own IP
    lead to the grafted listener on the host (issue 14, item 1)."""
    from runtime import conflist as make_conflist
    conf = make_conflist(glab.state_dir, tmp_path / "ipam", portmap=True,
                         agentSocket=glab.agent_socket("h1"))
    env = RuncEnv(glab, tmp_path, conf=conf)
    try:
        res = env.start("web", ["/bin/httpd", "-f", "-p", "80", "-h", "/www"], WEB_ANN,
                        runtime={"portMappings": [{"hostPort": 8090, "containerPort": 80,
                                                   "protocol": "tcp"}]})
        ip = res["ips"][0]["address"].split("/")[0]
        wait_listening(env.h1.netns, 8081)
        h2 = glab.plan.node("h2").netns
        deadline = time.monotonic() + 5
        while True:
            try:
                body = netns.run_in(h2, http_get, "198.18.0.1", 8090)   # published, from h2
                break
            except OSError:
                assert time.monotonic() < deadline, "published port never reached the server"
                time.sleep(0.2)
        assert "hello from a grafted runc container" in body
        assert "hello from a grafted runc container" in \
            netns.run_in(env.h1.netns, http_get, ip, 80)                # its IP, from h1
        assert env.stop("web") == []
    finally:
        env.close()


def test_busybox_httpd_dual_stack_bind_is_grafted_by_an_ipv4_rule(rt):
    """busybox httpd -p 80 binds [::]:80 dual-stack; the only rule is
    0.0.0.0:80: it is grafted, reachable at the IPv4 endpoint (issue 14,
    item 2), and at the container's address (item 1)."""
    ann = {"sockgraft/endpoints": "ep-http=ipv4:198.18.0.1:8086",
           "sockgraft/ingress": "0.0.0.0:80=ep-http"}
    res = rt.start("dual", ["/bin/httpd", "-f", "-p", "80", "-h", "/www"], ann)
    wait_listening(rt.h1.netns, 8086)
    assert "hello from a grafted runc container" in \
        netns.run_in(rt.h1.netns, http_get, "198.18.0.1", 8086)
    ip = res["ips"][0]["address"].split("/")[0]
    deadline = time.monotonic() + 5
    while True:
        try:
            body = netns.run_in(rt.h1.netns, http_get, ip, 80)
            break
        except OSError:
            assert time.monotonic() < deadline, "the container address never reached httpd"
            time.sleep(0.2)
    assert "hello from a grafted runc container" in body
    assert rt.stop("dual") == []


def test_a_pod_neither_takes_another_name_nor_grants_itself(glab, tmp_path):
    """Kubernetes-like: CNI ran for the pod's sandbox (another id than the
    application container's, which names it in the runtime's annotation) and
    registered `pods.attacker`; the agent runs with `--annotations ignore`.
    A pod annotating itself as another container gets neither that
    container's stored configuration (its endpoint stays unbound) nor the
    grants its own config annotations ask for; both refusals are audited and
    the container runs, named by its sandbox's registration."""
    glab.configure("pods.victim", """
container = "pods.victim"
[endpoints.ep-v]
type = "ipv4"
addr = "198.18.0.1"
port = 8087
[rules]
ingress = ["0.0.0.0:80=ep-v"]
""")
    glab.stop_agent("h1")
    glab.start_agent("h1", "--annotations", "ignore")
    env = RuncEnv(glab, tmp_path)
    env.cni = Cni(conflist(glab.state_dir, tmp_path / "ipam", container="pods.attacker",
                           agentSocket=glab.agent_socket("h1")), env.h1.netns)
    ann = {"sockgraft/container": "pods.victim", "io.kubernetes.cri.sandbox-id": "attsandbox",
           "sockgraft/endpoints": "ep=ipv4:198.18.0.1:8088", "sockgraft/ingress": "0.0.0.0:80=ep"}
    try:
        env.start("att", ["/bin/sh", "-c", "nc -l -p 80 </dev/null & sleep 1; "
                                           "echo listening; sleep 30"], ann, cni_id="attsandbox")
        _wait(lambda: _stats(glab, "pods.attacker") is not None, what="the registration")
        _wait(lambda: "listening" in env.output("att"), what="the container's output")
        assert _stats(glab, "pods.victim") is None
        for port in (8087, 8088):           # neither the victim's grant nor its own
            assert not _listening(env.h1.netns, port), port
        rejects = [a["rule"] for a in glab.audit("h1") if a["verdict"] == "reject"]
        assert any("container='pods.victim' ignored: the container is 'pods.attacker'" in r
                   for r in rejects), rejects
        assert any("--annotations ignore" in r for r in rejects), rejects
    finally:
        env.close()


def _listening(ns, port):
    def probe():
        s = socket.socket()
        s.settimeout(1.0)
        try:
            return s.connect_ex(("198.18.0.1", port)) == 0
        finally:
            s.close()
    return netns.run_in(ns, probe)
