"""The cluster directory: a grafted server's overlay address is published, and
grafted clients on other hosts connect straight to the host address its
socket listens on - no VXLAN - with the embedded directory and with a real
etcd; faults (etcd down, agents killed, conflicting publications)."""

import base64
import json
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

    URL = ETCD_CLIENT

    def args(self):
        """Flags beyond the cluster basics (the TLS variant adds its own)."""
        return []

    def healthy(self):
        from sockgraft.kernel.netns import run_in
        return run_in(self.ns, _healthy) is True

    def start(self):
        from sockgraft.kernel import netns
        log = open(os.path.join(os.path.dirname(self.data_dir), "etcd.log"), "ab")
        self.proc = subprocess.Popen(
            [shutil.which("etcd"), "--name", "sg", "--data-dir", self.data_dir,
             "--listen-client-urls", self.URL, "--advertise-client-urls", self.URL,
             *self.args(),
             "--listen-peer-urls", "http://198.18.0.1:23800",
             "--initial-advertise-peer-urls", "http://198.18.0.1:23800",
             "--initial-cluster", "sg=http://198.18.0.1:23800"],
            preexec_fn=lambda: netns.enter(self.ns), stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 20
        while not self.healthy():
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
    # the overlay path reaches the container address, which the server's node
    # redirects to its grafted listener (issue 14, item 1): slower, not broken
    assert r["connect_errno"] == 0 and r["echo"] == "ping" and vx_tx(g) - vx > 40, r
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


@pytest.mark.parametrize("mode, denied", [("syscall", "EACCES"), ("socket", "EACCES")])
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


# --- attacks on the directory (issue 12) ------------------------------------------

def _poison(g, owner, node, records, mode=0o600, uid=None):
    """Write a directory file as somebody with access to the embedded
    backend's files would: a node document and records of its choosing."""
    d = os.path.join(g.state_dir, f"directory-{g.plan.name}")
    path = os.path.join(d, f"{owner}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"owner": owner, "expires_at": time.time() + 3600, "node": node,
                   "records": records}, f)
    os.chmod(tmp, mode)
    if uid is not None:
        os.chown(tmp, uid, uid)
    os.replace(tmp, path)
    return path


def _evil_record(overlay, port, host, host_port, owner="evil", since=0.0):
    return {"overlay": overlay, "port": port, "proto": "tcp", "host_addr": host,
            "host_port": host_port, "node": owner, "owner": owner, "container": "evil-c1",
            "since": since}


def _wait_rejected(g, n, host="h1", timeout=5):
    deadline = time.monotonic() + timeout
    while True:
        got = g.services(host)
        rej = got.get("rejected", [])
        if len(rej) >= n or time.monotonic() > deadline:
            return got


def _rejections(g, host="h1"):
    return [a for a in g.audit(host) if a["verdict"] == "reject"]


@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_poisoned_records_never_send_a_client_to_loopback_metadata_or_a_foreign_host(
        dlab, mode):
    """A writer of the directory publishes records for a plain container's
    address (198.19.2.3:7401) pointing at h1's loopback, at the metadata
    address and at a server of its own on h2's address. The client takes the
    overlay to the real server; nothing arrives at the attacker's sockets;
    each record is refused with an audit line."""
    from sentinel import Sentinel
    h1, h2 = dlab.plan.node("h1").netns, dlab.plan.node("h2").netns
    subprocess.run(["ip", "-n", h1, "addr", "replace", "169.254.169.254/32", "dev", "lo"],
                   check=True)
    dlab.configure("h1-c1", CLIENT.format(mode=mode))
    targets = [("127.0.0.1", 7402, h1), ("169.254.169.254", 7403, h1),
               ("198.18.0.2", 7404, h2)]
    node = {"node": "evil", "owner": "evil", "overlay": ["198.19.2.3"],
            "addresses": ["127.0.0.1", "169.254.169.254", "198.18.0.2"]}
    c2 = dlab.plan.node("h2-c2")
    for i, (addr, port, ns) in enumerate(targets):
        _poison(dlab, "evil", node, [_evil_record("198.19.2.3", 7401, addr, port)])
        got = _wait_rejected(dlab, 1)
        assert got["rejected"] and "evil" in got["rejected"][0], got
        assert not [s for s in got["services"] if s["owner"] == "evil"]
        with Sentinel(ns, addr, port, "tcp") as trap, \
                EchoServer(c2.netns, "0.0.0.0", 7401) as real:
            r = dlab.probe("h1-c1", "tcp-client", "198.19.2.3", 7401)
            assert r["connect_errno"] == 0 and r["echo"] == "ping", r
            assert real.peer() is not None
        assert trap.received == [], f"the client followed a record to {addr}:{port}"
    lines = _rejections(dlab)
    assert len(lines) >= 3 and all(a["syscall"] == "directory" for a in lines)
    assert any("loopback" in a["rule"] for a in lines)
    assert any("metadata" in a["rule"] for a in lines)
    assert any("belongs to" in a["rule"] and "198.18.0.2" in a["rule"] for a in lines)


def test_a_takeover_attempt_leaves_the_rightful_record_in_place(dlab):
    """An impostor claims h2-c1's published overlay 198.19.2.2:80 with an old
    `since`: the rightful record stays, h2's agent does not withdraw it, the
    client still reaches the real server, and the impostor is audited."""
    srv = start_server(dlab)
    dlab.wait_services(lambda s: _one(s))
    node = {"node": "evil", "owner": "evil", "overlay": ["198.19.2.2"],
            "addresses": ["198.18.0.9"]}
    _poison(dlab, "evil", node, [_evil_record("198.19.2.2", 80, "198.18.0.9", 9, since=0.0)])
    for host in ("h1", "h2"):
        got = _wait_rejected(dlab, 1, host)
        assert any("belongs to" in r for r in got["rejected"]), got
        rec = _one(got["services"])
        assert len(rec) == 1 and rec[0]["owner"] != "evil" and rec[0]["container"] == "h2-c1"
    time.sleep(1)
    assert _one(dlab.services("h2")["services"])[0]["container"] == "h2-c1"
    dlab.configure("h1-c1", CLIENT.format(mode="syscall"))
    r = dlab.probe("h1-c1", "tcp-client", "198.19.2.2", 80)
    assert r["connect_errno"] == 0 and r["echo"] == "ping"
    assert read_json_line(srv)["accepted"][0] == "198.18.0.1"
    assert _rejections(dlab, "h1") and _rejections(dlab, "h2")
    os.killpg(srv.pid, signal.SIGKILL)


@pytest.mark.parametrize("how", ["world-writable", "other-owner"])
def test_directory_files_that_others_could_write_are_ignored(dlab, how):
    """Otherwise acceptable records in a file somebody else owns or could
    have written are not read at all (and the agent says why)."""
    node = {"node": "intruder", "owner": "intruder", "overlay": ["198.19.2.3"],
            "addresses": ["198.18.0.9"]}
    path = _poison(dlab, "intruder", node,
                   [_evil_record("198.19.2.3", 7401, "198.18.0.9", 9, owner="intruder")],
                   **({"mode": 0o666} if how == "world-writable" else {"uid": 65534}))
    time.sleep(1)
    assert not [s for s in dlab.services()["services"] if s["owner"] == "intruder"]
    assert f"ignoring {path}" in dlab.agent_log("h1")
    # the same file written safely is read (the check above is the file's, not the record's)
    os.chmod(path, 0o600)
    os.chown(path, 0, 0)
    os.utime(path)
    got = dlab.wait_services(lambda s: [x for x in s if x["owner"] == "intruder"])
    assert [s for s in got["services"] if s["owner"] == "intruder"]


def test_etcd_poisoned_records_and_takeover_are_refused(etcd_lab):
    """Anybody who can write to an unauthenticated etcd (the lab setup): a
    record to loopback and a claim on a published service are both refused."""
    import base64
    import http.client
    from sockgraft.kernel.netns import run_in
    g, _etcd = etcd_lab
    srv = start_server(g)
    g.wait_services(lambda s: _one(s))

    def put(key, value):
        c = http.client.HTTPConnection("198.18.0.1", 23790, timeout=5)
        b = lambda s: base64.b64encode(s.encode()).decode()   # noqa: E731
        c.request("POST", "/v3/kv/put", json.dumps({"key": b(key), "value": b(value)}))
        return c.getresponse().status

    node = {"node": "evil", "owner": "evil", "overlay": ["198.19.2.2", "198.19.2.3"],
            "addresses": ["127.0.0.1", "198.18.0.9"]}
    assert run_in(g.plan.node("h1").netns, put, "/sockgraft/nodes/evil/node",
                  json.dumps(node)) == 200
    for r in (_evil_record("198.19.2.3", 7401, "127.0.0.1", 7402),
              _evil_record("198.19.2.2", 80, "198.18.0.9", 9, since=0.0)):
        key = f"/sockgraft/nodes/evil/svc/tcp/{r['overlay']}/{r['port']}"
        assert run_in(g.plan.node("h1").netns, put, key, json.dumps(r)) == 200
    got = _wait_rejected(g, 2)
    assert len(got["rejected"]) == 2, got
    rec = _one(got["services"])
    assert len(rec) == 1 and rec[0]["container"] == "h2-c1"
    assert not [s for s in got["services"] if s["owner"] == "evil"]
    assert len(_rejections(g)) >= 2
    os.killpg(srv.pid, signal.SIGKILL)


# --- etcd over TLS with client certificates and user/role auth ----------------------

ETCDS = "https://198.18.0.1:23790"


def _certs(d):
    """deploy/etcd/make-certs.sh: a CA, etcd's server certificate (for
    198.18.0.1) and the agents' client certificate (no CommonName: etcd's
    JSON gateway refuses one that has a CN once auth is enabled)."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "deploy", "etcd",
                          "make-certs.sh")
    subprocess.run(["bash", script, d, "198.18.0.1"], check=True, capture_output=True)
    return {n: os.path.join(d, n) for n in ("ca.pem", "server.pem", "server.key",
                                            "client.pem", "client.key")}


def _tls_call(certs, path, body, token=None, client_cert=True):
    import http.client
    import ssl
    ctx = ssl.create_default_context(cafile=certs["ca.pem"])
    if client_cert:
        ctx.load_cert_chain(certs["client.pem"], certs["client.key"])
    c = http.client.HTTPSConnection("198.18.0.1", 23790, timeout=5, context=ctx)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = token
    c.request("POST", path, json.dumps(body), headers)
    resp = c.getresponse()
    raw = resp.read()
    try:
        return resp.status, json.loads(raw or b"{}")
    except ValueError:
        return resp.status, {"raw": raw.decode(errors="replace")}


class EtcdTLS(Etcd):
    def __init__(self, plan, data_dir, certs):
        super().__init__(plan, data_dir)
        self.certs = certs

    URL = ETCDS

    def args(self):
        c = self.certs
        return ["--cert-file", c["server.pem"], "--key-file", c["server.key"],
                "--client-cert-auth", "--trusted-ca-file", c["ca.pem"],
                "--auth-token", "simple", "--auth-token-ttl", "3"]

    def healthy(self):
        from sockgraft.kernel.netns import run_in
        try:
            return run_in(self.ns, _tls_call, self.certs, "/v3/maintenance/status", {})[0] == 200
        except (OSError, RuntimeError):
            return False

    def enable_auth(self, password):
        """root, and a role that may touch /sockgraft/ only, for the agents."""
        from sockgraft.kernel.netns import run_in
        b = lambda s: base64.b64encode(s.encode()).decode()   # noqa: E731
        steps = [("/v3/auth/user/add", {"name": "root", "password": "root-pw"}),
                 ("/v3/auth/user/grant", {"user": "root", "role": "root"}),
                 ("/v3/auth/role/add", {"name": "sockgraft"}),
                 ("/v3/auth/role/grant", {"name": "sockgraft", "perm": {
                     "permType": "READWRITE", "key": b("/sockgraft/"),
                     "range_end": b("/sockgraft0")}}),
                 ("/v3/auth/user/add", {"name": "sgnode", "password": password}),
                 ("/v3/auth/user/grant", {"user": "sgnode", "role": "sockgraft"}),
                 ("/v3/auth/enable", {})]
        for path, body in steps:
            status, out = run_in(self.ns, _tls_call, self.certs, path, body)
            assert status == 200, (path, status, out)



@pytest.fixture
def etcds_lab(lab, state_dir, tmp_path):
    certs = _certs(str(tmp_path))
    etcd = EtcdTLS(lab, tmp_path / "etcd-data", certs)
    etcd.start()
    etcd.enable_auth("node-pw")
    pw = tmp_path / "etcd-password"
    pw.write_text("node-pw\n")
    os.chmod(pw, 0o600)
    g = None
    try:
        g = _dlab(lab, state_dir, "--directory", "etcds://198.18.0.1:23790",
                  "--directory-ca", certs["ca.pem"], "--directory-cert", certs["client.pem"],
                  "--directory-key", certs["client.key"], "--directory-user", "sgnode",
                  "--directory-password-file", str(pw), "--directory-ttl", "3")
        yield g, etcd
    finally:
        if g is not None:
            g.close()
        etcd.stop()


def test_etcd_over_tls_with_auth_refuses_strangers_and_serves_the_agents(etcds_lab):
    """Without the client certificate nothing gets through; with it but
    without a token (or with a wrong password) writing is refused; the agents
    (user with a role limited to /sockgraft/, tokens that expire every 3 s)
    publish and follow records."""
    import ssl
    from sockgraft.kernel.netns import run_in
    g, etcd = etcds_lab
    ns = g.plan.node("h1").netns
    b = lambda s: base64.b64encode(s.encode()).decode()   # noqa: E731
    put = ("/v3/kv/put", {"key": b("/sockgraft/nodes/evil/node"), "value": b("{}")})
    with pytest.raises((ssl.SSLError, ConnectionError, OSError, RuntimeError)):
        run_in(ns, _tls_call, etcd.certs, *put, None, False)
    status, out = run_in(ns, _tls_call, etcd.certs, *put)
    assert status == 403 and "permission denied" in str(out), out
    status, out = run_in(ns, _tls_call, etcd.certs, "/v3/auth/authenticate",
                         {"name": "sgnode", "password": "wrong"})
    assert status != 200 and "token" not in out
    # an agent's credentials write /sockgraft/ only
    status, out = run_in(ns, _tls_call, etcd.certs, "/v3/auth/authenticate",
                         {"name": "sgnode", "password": "node-pw"})
    assert status == 200 and "token" in out, (status, out)
    token = out["token"]
    status, out = run_in(ns, _tls_call, etcd.certs, "/v3/kv/put",
                         {"key": b("/registry/secret"), "value": b("x")}, token)
    assert status == 403 and "permission denied" in str(out), out

    srv = start_server(g)
    rec = _one(g.wait_services(lambda s: _one(s), timeout=15)["services"])
    assert rec and rec[0]["node"] == "h2"
    time.sleep(4)                        # past the token TTL: the agents authenticate again
    g.configure("h1-c1", CLIENT.format(mode="syscall"))
    vx = vx_tx(g)
    r = g.probe("h1-c1", "tcp-client", "198.19.2.2", 80)
    assert r["connect_errno"] == 0 and r["echo"] == "ping" and vx_tx(g) - vx < 200
    assert _one(g.services("h2")["services"]), g.services("h2")
    assert "plain HTTP" not in g.agent_log("h1")
    os.killpg(srv.pid, signal.SIGKILL)


@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_a_client_is_sent_only_where_its_own_policy_lets_it_go(dlab, mode):
    """The client's policy denies the service's host address: the directory
    does not send it there (agent, cgroup programs and nftables agree); it
    takes the overlay like any unpublished destination."""
    srv = start_server(dlab)
    dlab.wait_services(lambda s: _one(s))
    dlab.configure("h1-c1", CLIENT.format(mode=mode) +
                   '[policy]\ndeny = ["deny tcp 198.18.0.2 8081"]\n')
    vx = vx_tx(dlab)
    r = dlab.probe("h1-c1", "tcp-client", "198.19.2.2", 80)
    # over the overlay to the container address, like a plain client (the
    # server's node redirects it to the listener): never straight to the
    # host address its policy denies
    assert r["connect_errno"] == 0 and vx_tx(dlab) - vx > 40, r
    os.killpg(srv.pid, signal.SIGKILL)


def test_an_idle_etcd_watch_keeps_the_view(etcd_lab):
    """Nothing changes for several leases (etcd sends progress notifications
    only every ten minutes): the watch goes quiet, the view must not."""
    g, _etcd = etcd_lab
    srv = start_server(g)
    g.wait_services(lambda s: _one(s))
    from sockgraft.agent import control
    deadline = time.monotonic() + 3 * 3 + 1          # three leases of 3 s
    samples = 0
    while time.monotonic() < deadline:
        # straight to the agent (a CLI process per sample is too slow on a
        # loaded machine to see a half-second gap)
        got = control.request(g.agent_socket("h1"), {"op": "services"}, timeout=5)
        assert _one(got["records"]), f"the view went empty while etcd was idle: {got}"
        assert got["reachable"] is True
        samples += 1
        time.sleep(0.1)
    assert samples > 20
    os.killpg(srv.pid, signal.SIGKILL)


def _etcd_call(g, path, body):
    """One call of the lab etcd's JSON gateway, from h1 (anybody who reaches it)."""
    import http.client
    from sockgraft.kernel.netns import run_in

    def call():
        c = http.client.HTTPConnection("198.18.0.1", 23790, timeout=5)
        c.request("POST", path, json.dumps(body))
        return json.loads(c.getresponse().read())
    return run_in(g.plan.node("h1").netns, call)


def _b64(text):
    return base64.b64encode(text.encode()).decode()


def _etcd_value(g, key):
    kvs = _etcd_call(g, "/v3/kv/range", {"key": _b64(key)})
    return json.loads(base64.b64decode(kvs["kvs"][0]["value"])) if kvs.get("kvs") else None


def _own_key(rec, port):
    return f"/sockgraft/nodes/{rec['owner']}/svc/tcp/{rec['overlay']}/{port}"


def test_etcd_a_forged_overwrite_of_a_record_is_put_back(etcd_lab):
    """A PUT to an existing key keeps its create revision - the rank the
    directory's first-come rule reads - so an overwrite of h2's own record
    (pointing its service at another host) would keep the record's place.
    The owner sees the change in its watch and puts its record back."""
    g, _etcd = etcd_lab
    srv = start_server(g)
    rec = _one(g.wait_services(lambda s: _one(s))["services"])[0]
    key = _own_key(rec, rec["port"])
    rightful = _etcd_value(g, key)
    assert rightful is not None and rightful["host_addr"] != "198.18.0.9", rightful
    _etcd_call(g, "/v3/kv/put", {"key": _b64(key), "value": _b64(json.dumps(
        {**rightful, "host_addr": "198.18.0.9"}))})
    deadline = time.monotonic() + 5
    while _etcd_value(g, key) != rightful:
        assert time.monotonic() < deadline, f"the forged record stayed: {_etcd_value(g, key)}"
        time.sleep(0.1)
    assert "was written by somebody else; putting it back" in g.agent_log("h2")
    os.killpg(srv.pid, signal.SIGKILL)


def test_etcd_a_forged_record_under_our_prefix_is_deleted(etcd_lab):
    """A record somebody else puts under an agent's own prefix (no lease:
    it would outlive the agent) is deleted by that agent at once."""
    g, _etcd = etcd_lab
    srv = start_server(g)
    rec = _one(g.wait_services(lambda s: _one(s))["services"])[0]
    key = _own_key(rec, 8099)
    _etcd_call(g, "/v3/kv/put", {"key": _b64(key), "value": _b64(json.dumps(
        {**rec, "port": 8099}))})
    deadline = time.monotonic() + 5
    while _etcd_value(g, key) is not None:
        assert time.monotonic() < deadline, "the forged record stayed"
        time.sleep(0.1)
    assert "deleting it" in g.agent_log("h2")
    os.killpg(srv.pid, signal.SIGKILL)
