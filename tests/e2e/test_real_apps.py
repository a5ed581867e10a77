"""Real, unmodified applications grafted end to end: iperf3 (TCP and UDP),
nginx (master + forked worker), the static busybox httpd and a static Go
program (raw syscalls, non-blocking connect, epoll).

Each test asserts something only the grafted path produces: the peer address
a server sees is the graft endpoint, a listener exists on the host side at
the endpoint's address, and the container's veth stays quiet while the
application moves real data. Every wait is bounded; every process is started
through the harness (`spawn`/`spawn_plain`), which kills it at teardown.
"""

import http.client
import json
import os
import secrets
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

from grafting import build_go, read_json_line
from sockgraft.kernel import netns
from sockgraft.lab import builder

pytestmark = pytest.mark.e2e

# While a container's sockets are grafted none of their traffic crosses its
# veth; what is left there is stray ND/MLD/ARP at most.
VETH_QUIET = 64 * 1024


# --- helpers -------------------------------------------------------------------

def _need(tool, package):
    if not shutil.which(tool):
        pytest.skip(f"{tool} is not installed (apt-get install {package})")


def _listeners(proto):
    """(address, port) of the TCP listeners / bound UDP sockets of the calling
    process's network namespace, read from /proc/net (per netns)."""
    state = "0A" if proto == "tcp" else "07"
    out = []
    for fam in ("", "6"):
        try:
            with open(f"/proc/net/{proto}{fam}") as f:
                rows = f.read().splitlines()[1:]
        except FileNotFoundError:
            continue
        for row in rows:
            fields = row.split()
            if fields[3] != state:
                continue
            hexaddr, hexport = fields[1].split(":")
            raw = bytes.fromhex(hexaddr)
            if len(raw) == 4:
                addr = socket.inet_ntop(socket.AF_INET, raw[::-1])
            else:   # four host-order 32-bit words
                addr = socket.inet_ntop(socket.AF_INET6, b"".join(
                    struct.pack("=I", struct.unpack(">I", raw[i:i + 4])[0])
                    for i in range(0, 16, 4)))
            out.append((addr, int(hexport, 16)))
    return out


def wait_listening(ns, port, proto="tcp", timeout=10.0, procs=()):
    """Poll until something in `ns` listens on `port`; returns its address."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for addr, p in netns.run_in(ns, _listeners, proto, timeout=5):
            if p == port:
                return addr
        for proc in procs:
            if proc.poll() is not None:
                raise AssertionError(f"{proc.args} exited {proc.returncode} before listening: "
                                     f"{_drain(proc)}")
        time.sleep(0.05)
    raise AssertionError(f"nothing listens on {proto} port {port} in {ns} after {timeout}s")


def _drain(proc, timeout=5):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "(still running)"
    return f"{(out or '')[-1500:]}{(err or '')[-1500:]}"


def _http_get(host, port, path):
    conn = http.client.HTTPConnection(host, port, timeout=5)   # no proxy from the env
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def http_get(ns, host, port, path="/"):
    return netns.run_in(ns, _http_get, host, port, path, timeout=15)


def veth(glab, container):
    """rx+tx byte counters of the container's host-side veth."""
    c = glab.plan.node(container)
    cnt = builder.interface_counters(glab.plan.node(c.host).netns)[c.veth_host]
    return cnt["rx_bytes"], cnt["tx_bytes"]


def finish(proc, timeout):
    """Wait for a spawned process with a bound; returns (rc, stdout, stderr)."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{proc.args} did not finish within {timeout}s")
    return proc.returncode, out, err


def _iperf_json(out, err):
    try:
        data = json.loads(out)
    except ValueError:
        pytest.fail(f"iperf3 printed no JSON: {out[-1000:]} {err[-1000:]}")
    assert "error" not in data, data["error"]
    return data


# --- iperf3 TCP ---------------------------------------------------------------

EGRESS_H1C1 = """
container = "h1-c1"
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[rules]
egress = ["198.18.0.0/24=ep-out"]
"""


def _iperf_server(glab, port):
    srv = glab.spawn_plain("h2", ["iperf3", "-s", "-1", "-p", port, "-J"])
    wait_listening(glab.plan.node("h2").netns, port, procs=[srv])
    return srv


def test_iperf3_tcp_grafted_bypasses_the_container_veth(glab):
    _need("iperf3", "iperf3")
    glab.configure("h1-c1", EGRESS_H1C1)

    srv = _iperf_server(glab, 5301)
    rx0 = glab.veth_rx("h1-c1")
    cli = glab.spawn("h1-c1", ["iperf3", "-c", "198.18.0.2", "-p", "5301", "-t", "1", "-J"])
    rc, out, err = finish(cli, 20)
    grafted_delta = glab.veth_rx("h1-c1") - rx0
    assert rc == 0, f"grafted iperf3 failed: {out[-1000:]} {err[-1000:]}"
    data = _iperf_json(out, err)
    moved = data["end"]["sum_received"]["bytes"]
    # the client's sockets are host sockets bound at the endpoint
    assert data["start"]["connected"][0]["local_host"] == "198.18.0.1"
    srv_rc, srv_out, _ = finish(srv, 10)
    assert srv_rc == 0
    assert _iperf_json(srv_out, "")["start"]["connected"][0]["remote_host"] == "198.18.0.1"
    assert moved > 100 * 1024 * 1024, f"only {moved} bytes in 1 s"
    assert grafted_delta < VETH_QUIET, f"{grafted_delta} bytes crossed the veth while grafted"

    # The same client without sockgraft: every byte crosses the veth (and is
    # masqueraded on h1), which is what the assertion above rules out.
    srv = _iperf_server(glab, 5302)
    rx0 = glab.veth_rx("h1-c1")
    cli = glab.spawn_plain("h1-c1", ["iperf3", "-c", "198.18.0.2", "-p", "5302", "-t", "1",
                                     "-J"])
    rc, out, err = finish(cli, 20)
    plain_delta = glab.veth_rx("h1-c1") - rx0
    assert rc == 0, f"plain iperf3 failed: {out[-1000:]} {err[-1000:]}"
    data = _iperf_json(out, err)
    assert data["start"]["connected"][0]["local_host"] == "198.19.1.2"
    sent = data["end"]["sum_sent"]["bytes"]
    assert sent > 10 * 1024 * 1024
    # Headers make the veth count exceed `sent`, but the veth's stats and
    # iperf3's byte count are read at slightly different moments (seen 0.2%
    # short): the point is the order of magnitude against VETH_QUIET.
    assert plain_delta > 0.9 * sent, (plain_delta, sent)
    finish(srv, 10)


# --- iperf3 UDP ---------------------------------------------------------------

def test_iperf3_udp_grafted(glab):
    _need("iperf3", "iperf3")
    glab.configure("h1-c1", EGRESS_H1C1)
    srv = _iperf_server(glab, 5303)
    rx0 = glab.veth_rx("h1-c1")
    cli = glab.spawn("h1-c1", ["iperf3", "-u", "-b", "50M", "-t", "1", "-c", "198.18.0.2",
                               "-p", "5303", "-J"])
    rc, out, err = finish(cli, 20)
    delta = glab.veth_rx("h1-c1") - rx0
    assert rc == 0, f"grafted iperf3 -u failed: {out[-1000:]} {err[-1000:]}"
    data = _iperf_json(out, err)
    assert data["start"]["connected"][0]["local_host"] == "198.18.0.1"
    srv_rc, srv_out, _ = finish(srv, 10)
    assert srv_rc == 0
    srv_data = _iperf_json(srv_out, "")
    assert srv_data["start"]["connected"][0]["remote_host"] == "198.18.0.1"
    got = srv_data["end"]["sum_received"]      # what the plain server really received
    assert got["packets"] > 1000, got          # 50 Mbit/s for 1 s: ~4300 datagrams
    assert got["bytes"] > 1024 * 1024, got
    assert got["lost_percent"] < 20, got
    assert delta < VETH_QUIET, f"{delta} bytes crossed the veth while grafted"


# --- nginx --------------------------------------------------------------------

NGINX_CFG = """
worker_processes 1;
master_process on;
user root;              # tmp_path is 0700: a `nobody` worker could not read it
pid {d}/nginx.pid;
error_log {d}/error.log info;
events {{ worker_connections 64; }}
http {{
    log_format sg '$remote_addr $pid "$request" $status $body_bytes_sent';
    access_log {d}/access.log sg;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    server {{
        listen 80;
        root {d}/www;
        location /up/ {{
            proxy_pass http://198.18.0.1:{up_port}/;
            proxy_connect_timeout 2s;
            proxy_send_timeout 2s;
            proxy_read_timeout 2s;
        }}
    }}
}}
"""

NGINX_GRAFT = """
container = "h2-c1"
[endpoints.ep-http]
type = "ipv4"
addr = "198.18.0.2"
port = 8088
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.2"
port = "dynamic"
[rules]
ingress = ["0.0.0.0:80=ep-http"]
egress = ["198.18.0.1/32=ep-out"]
"""


def _start_nginx(glab, tmp_path, up_port=7480):
    """nginx grafted in h2-c1, serving tmp_path/www; returns (proc, token)."""
    if not shutil.which("nginx"):
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    glab.configure("h2-c1", NGINX_GRAFT)
    token = "sg-nginx-" + secrets.token_hex(8)
    (tmp_path / "www").mkdir()
    (tmp_path / "www" / "index.html").write_text(f"<p>{token}</p>\n")
    conf = tmp_path / "nginx.conf"
    conf.write_text(NGINX_CFG.format(d=tmp_path, up_port=up_port))
    ngx = glab.spawn("h2-c1", ["nginx", "-c", str(conf), "-e", str(tmp_path / "early.log"),
                               "-g", "daemon off;"])
    # The master's bind was grafted: the listener is on the host, at the endpoint.
    assert wait_listening(glab.plan.node("h2").netns, 8088, procs=[ngx]) == "198.18.0.2"
    inside = netns.run_in(glab.plan.node("h2-c1").netns, _listeners, "tcp")
    assert not [p for _, p in inside if p == 80], f"nginx listens in the container: {inside}"
    return ngx, token


def _access_log(tmp_path, needle, timeout=5.0):
    path = tmp_path / "access.log"
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            break
        time.sleep(0.05)
    return [line for line in text.splitlines() if needle in line]


def test_nginx_master_binds_grafted_and_its_worker_serves(glab, tmp_path):
    ngx, token = _start_nginx(glab, tmp_path)
    v0 = veth(glab, "h2-c1")
    status, body = http_get(glab.plan.node("h1").netns, "198.18.0.2", 8088, "/")
    assert status == 200 and token.encode() in body
    assert sum(veth(glab, "h2-c1")) - sum(v0) < VETH_QUIET
    # The request was served by the forked worker (a child of the master that
    # `sockgraft run` started), on the grafted listener it inherited; nginx saw
    # h1's underlay address, with no NAT in between.
    lines = _access_log(tmp_path, '"GET / ')
    assert lines, "nginx logged no request"
    client, pid = lines[-1].split()[:2]
    assert client == "198.18.0.1", lines
    workers = _children_of(ngx.pid)
    master = int((tmp_path / "nginx.pid").read_text())
    assert master in workers and int(pid) in workers and int(pid) != master, \
        (lines, master, workers)
    assert ngx.poll() is None


# nginx adds its upstream socket to epoll before connect(): the graft must carry
# that registration over to the host socket (kernel/epollfix.py).
def test_nginx_worker_proxies_to_an_upstream_through_an_egress_graft(glab, tmp_path):
    h1 = glab.plan.node("h1").netns
    up_dir = tmp_path / "upstream"
    up_dir.mkdir()
    big = secrets.token_bytes(1 << 20)
    (up_dir / "big.bin").write_bytes(big)
    up = glab.spawn_plain("h1", [sys.executable, "-m", "http.server", "--bind", "198.18.0.1",
                                 "--directory", up_dir, "7480"])
    wait_listening(h1, 7480, procs=[up])
    ngx, _ = _start_nginx(glab, tmp_path, up_port=7480)
    v0 = veth(glab, "h2-c1")
    status, body = http_get(h1, "198.18.0.2", 8088, "/up/big.bin")
    v1 = veth(glab, "h2-c1")
    assert (status, len(body)) == (200, len(big)), (status, body[:200])
    assert body == big
    # The worker's connect() was grafted: the MiB never crossed h2-c1's veth,
    # and the upstream saw the endpoint address.
    assert sum(v1) - sum(v0) < VETH_QUIET, (v0, v1)
    os.killpg(up.pid, 15)
    _, _, up_log = finish(up, 10)
    assert "198.18.0.2 - - " in up_log and "GET /big.bin" in up_log, up_log


def _children_of(pid):
    """Every descendant pid of `pid` (via /proc/*/stat ppid)."""
    parent = {}
    for e in os.listdir("/proc"):
        if e.isdigit():
            try:
                with open(f"/proc/{e}/stat") as f:
                    parent[int(e)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError):
                pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


# --- busybox httpd (static) --------------------------------------------------------

def _elf_has_interp(path):
    """True if the ELF file has a PT_INTERP program header (dynamically linked)."""
    with open(path, "rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF" or head[4] != 2:
            raise AssertionError(f"{path} is not a 64-bit ELF")
        phoff, = struct.unpack_from("<Q", head, 0x20)
        phentsize, phnum = struct.unpack_from("<HH", head, 0x36)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    return any(struct.unpack_from("<I", table, i * phentsize)[0] == 3 for i in range(phnum))


BUSYBOX_GRAFT = """
container = "h2-c2"
[endpoints.ep-bb]
type = "ipv4"
addr = "198.18.0.2"
port = 8089
[endpoints.ep-bb6]
type = "ipv4"
addr = "198.18.0.2"
port = 8189
[rules]
ingress = ["0.0.0.0:80=ep-bb", "[::]:80=ep-bb6"]
"""


@pytest.mark.parametrize("listen,host_port", [("0.0.0.0:80", 8089), ("80", 8189)],
                         ids=["ipv4", "dual-stack"])
def test_static_busybox_httpd_grafted(glab, tmp_path, listen, host_port):
    bb = "/bin/busybox"
    if not os.path.exists(bb):
        pytest.skip("/bin/busybox is missing (apt-get install busybox-static)")
    if _elf_has_interp(bb):
        pytest.skip("/bin/busybox is dynamically linked (apt-get install busybox-static)")
    glab.configure("h2-c2", BUSYBOX_GRAFT)
    token = "sg-busybox-" + secrets.token_hex(8)
    www = tmp_path / "www"
    www.mkdir()
    (www / "file.txt").write_text(token + "\n")
    # With a bare port busybox binds the dual-stack [::]:80, which by design
    # only a `[::]:80` rule grafts, never `0.0.0.0:80` (graftconfig docstring).
    srv = glab.spawn("h2-c2", [bb, "httpd", "-f", "-p", listen, "-h", str(www)])
    where = wait_listening(glab.plan.node("h2").netns, host_port, procs=[srv])
    assert where in ("198.18.0.2", "::ffff:198.18.0.2"), where
    status, body = http_get(glab.plan.node("h1").netns, "198.18.0.2", host_port, "/file.txt")
    assert status == 200 and body.decode().strip() == token
    assert srv.poll() is None


# --- a static Go program ------------------------------------------------------------

GO_SRC = r"""
package main

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"time"
)

func out(v map[string]string) {
	b, _ := json.Marshal(v)
	fmt.Println(string(b))
}

func fail(what string, err error) {
	out(map[string]string{"error": what + ": " + err.Error()})
	os.Exit(1)
}

func main() {
	switch os.Args[1] {
	case "server": // server ADDR: one connection, echo, report the peer
		ln, err := net.Listen("tcp4", os.Args[2])
		if err != nil {
			fail("listen", err)
		}
		out(map[string]string{"listening": ln.Addr().String()})
		ln.(*net.TCPListener).SetDeadline(time.Now().Add(15 * time.Second))
		c, err := ln.Accept()
		if err != nil {
			fail("accept", err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		buf := make([]byte, 4096)
		n, err := c.Read(buf)
		if err != nil {
			fail("read", err)
		}
		c.Write(buf[:n])
		c.Close()
		out(map[string]string{"peer": c.RemoteAddr().String(), "got": string(buf[:n])})
	case "client": // client ADDR MSG
		d := net.Dialer{Timeout: 5 * time.Second}
		c, err := d.Dial("tcp", os.Args[2])
		if err != nil {
			fail("dial", err)
		}
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := c.Write([]byte(os.Args[3])); err != nil {
			fail("write", err)
		}
		buf := make([]byte, 4096)
		n, err := c.Read(buf)
		if err != nil {
			fail("read", err)
		}
		out(map[string]string{"local": c.LocalAddr().String(),
			"remote": c.RemoteAddr().String(), "echo": string(buf[:n])})
	}
}
"""


@pytest.fixture
def go_prog(tmp_path):
    prog = build_go(tmp_path, GO_SRC, "sgecho")
    assert not _elf_has_interp(prog), "CGO_ENABLED=0 should give a static binary"
    return prog


GO_GRAFT_IN = """
container = "h2-c1"
[endpoints.ep-go]
type = "ipv4"
addr = "198.18.0.2"
port = 8090
[rules]
ingress = ["0.0.0.0:7600=ep-go"]
"""


def test_static_go_client_and_server_grafted(glab, go_prog):
    glab.configure("h1-c1", EGRESS_H1C1)
    glab.configure("h2-c1", GO_GRAFT_IN)
    h2 = glab.plan.node("h2").netns
    msg = "go-" + secrets.token_hex(6)

    # Go client grafted (egress), plain Go server on h2.
    srv = glab.spawn_plain("h2", [go_prog, "server", "198.18.0.2:7500"])
    assert read_json_line(srv)["listening"] == "198.18.0.2:7500"
    rx0 = glab.veth_rx("h1-c1")
    cli = glab.spawn("h1-c1", [go_prog, "client", "198.18.0.2:7500", msg])
    rc, out, err = finish(cli, 15)
    assert rc == 0, f"grafted Go client failed: {out} {err}"
    r = json.loads(out.splitlines()[-1])
    assert r["echo"] == msg
    assert r["local"].startswith("198.18.0.1:"), r      # getsockname: the host socket
    seen = read_json_line(srv)
    assert seen["got"] == msg and seen["peer"].startswith("198.18.0.1:"), seen
    assert glab.veth_rx("h1-c1") - rx0 < 4096

    # Go server grafted (ingress), plain Go client on h1.
    gsrv = glab.spawn("h2-c1", [go_prog, "server", "0.0.0.0:7600"])
    ready = read_json_line(gsrv)
    assert ready["listening"] == "198.18.0.2:8090", ready   # Go's getsockname after bind
    assert wait_listening(h2, 8090, procs=[gsrv]) == "198.18.0.2"
    gcli = glab.spawn_plain("h1", [go_prog, "client", "198.18.0.2:8090", msg])
    rc, out, err = finish(gcli, 15)
    assert rc == 0, f"plain Go client failed: {out} {err}"
    assert json.loads(out.splitlines()[-1])["echo"] == msg
    seen = read_json_line(gsrv)
    assert seen["peer"].startswith("198.18.0.1:"), seen
