"""Test helpers: real TCP/UDP traffic between lab namespaces, from forked children."""

import os
import select
import socket

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
