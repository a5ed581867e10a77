"""Test helpers: real TCP/UDP traffic between lab namespaces, from forked
children; throwaway namespaces with local addresses."""

import contextlib
import os
import secrets
import select
import shutil
import socket
import subprocess

import pytest

from sockgraft.kernel import netns


def _family(addr):
    return socket.AF_INET6 if ":" in addr else socket.AF_INET


class EchoServer:
    """A one-connection TCP echo server in a child that entered `ns`. Reports the
    peer address it saw. Use as a context manager."""

    def __init__(self, ns, addr, port, proto="tcp"):
        self.ns, self.addr, self.port, self.proto = ns, addr, port, proto

    def __enter__(self):
        r, w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(r)
                netns.enter(self.ns)
                kind = socket.SOCK_STREAM if self.proto == "tcp" else socket.SOCK_DGRAM
                s = socket.socket(_family(self.addr), kind)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((self.addr, self.port))
                if self.proto == "tcp":
                    s.listen(1)
                    os.write(w, b"R")
                    s.settimeout(15)
                    c, peer = s.accept()
                    data = c.recv(65536)
                    c.sendall(data)
                    c.close()
                else:
                    os.write(w, b"R")
                    s.settimeout(15)
                    data, peer = s.recvfrom(65536)
                    s.sendto(data, peer)
                os.write(w, ("P" + peer[0]).encode())
            finally:
                os._exit(0)
        os.close(w)
        self.r = r
        ready, _, _ = select.select([r], [], [], 10)
        assert ready and os.read(r, 1) == b"R", "server did not start"
        return self

    def peer(self, timeout=15):
        ready, _, _ = select.select([self.r], [], [], timeout)
        data = os.read(self.r, 200) if ready else b""
        return data[1:].decode() if data.startswith(b"P") else None

    def __exit__(self, *exc):
        try:
            os.kill(self.pid, 9)
        except ProcessLookupError:
            pass
        os.waitpid(self.pid, 0)
        os.close(self.r)


def _echo(addr, port, payload, proto, timeout=5):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(_family(addr), kind) as s:
        s.settimeout(timeout)
        s.connect((addr, port))
        s.sendall(payload)
        return s.recv(65536)


def echo(ns, addr, port, payload=b"hello sockgraft", proto="tcp", timeout=5):
    """Connect from inside `ns`, send payload, return the echoed bytes."""
    return netns.run_in(ns, _echo, addr, port, payload, proto, timeout)


def udp_got(port, timeout):
    """The first datagram to this namespace's UDP port within timeout
    (data, peer), or None. Run in a namespace with netns.run_in."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("0.0.0.0", port))
        s.settimeout(timeout)
        try:
            return s.recvfrom(2048)
        except TimeoutError:
            return None


def http_get(ip, port):
    """GET / over HTTP/1.0 from this namespace; the whole answer as text."""
    with socket.create_connection((ip, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return data.decode(errors="replace")


def full_backlog_server():
    """A loopback listener whose accept queue is full: a new connect to it
    stays in progress (its SYN waits for a retransmission). Returns the
    listener and the sockets filling it (close them all)."""
    srv = socket.create_server(("127.0.0.1", 0), backlog=0)
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(srv.getsockname())
        fillers.append(f)
    return srv, fillers


def _lo_up():
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")


def ip_in(ns, *args):
    proc = subprocess.run(["ip", "-n", ns, *args], capture_output=True, text=True)
    assert proc.returncode == 0, f"ip -n {ns} {' '.join(args)}: {proc.stderr.strip()}"


@contextlib.contextmanager
def scratch_ns(prefix, v4=(), v6=(), default_routes=False):
    """A throwaway network namespace named prefix + 6 hex: loopback up and a
    veth pair with both ends inside, sgt0 holding the local addresses v4 (/24)
    and v6 (/64) - this kernel has no dummy interface. default_routes: every
    destination routes out of sgt0 (packets go nowhere: the peer end is
    inside and nothing answers). Deleted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (CAP_NET_ADMIN) for network namespaces")
    if not shutil.which("ip"):
        pytest.skip("needs the ip tool (iproute2)")
    name = prefix + secrets.token_hex(3)
    netns.create(name)
    try:
        netns.run_in(name, _lo_up)
        ip_in(name, "link", "add", "sgt0", "type", "veth", "peer", "name", "sgt1")
        for a in v4:
            ip_in(name, "addr", "add", f"{a}/24", "dev", "sgt0")
        for a in v6:
            ip_in(name, "addr", "add", f"{a}/64", "dev", "sgt0", "nodad")
        ip_in(name, "link", "set", "sgt1", "up")
        ip_in(name, "link", "set", "sgt0", "up")
        if default_routes:
            ip_in(name, "route", "add", "default", "dev", "sgt0")
            ip_in(name, "-6", "route", "add", "default", "dev", "sgt0")
        yield name
    finally:
        netns.delete(name)
    assert not netns.exists(name)
