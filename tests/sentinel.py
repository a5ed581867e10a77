"""Sentinels: sockets in a lab namespace where nothing may arrive. Each one
runs in a forked child that entered the namespace, counts what arrives
(datagrams with their source, accepted connections with their peer) until
closed, and reports it."""

import json
import os
import select
import signal
import socket

from sockgraft.kernel import netns


class Sentinel:
    def __init__(self, ns, addr, port, proto="udp", reuseport=False):
        self.ns, self.addr, self.port, self.proto = ns, addr, port, proto
        self.reuseport = reuseport      # a root service with SO_REUSEPORT

    def __enter__(self):
        r, w = os.pipe()
        ready_r, ready_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:
            try:
                os.close(r)
                os.close(ready_r)
                netns.enter(self.ns)
                fam = socket.AF_INET6 if ":" in self.addr else socket.AF_INET
                kind = socket.SOCK_DGRAM if self.proto in ("udp", "udplite") \
                    else socket.SOCK_STREAM
                s = socket.socket(fam, kind, 136 if self.proto == "udplite" else 0)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if self.reuseport:
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                s.bind((self.addr, self.port))
                if kind == socket.SOCK_STREAM:
                    s.listen(16)
                got = []
                stop = {"now": False}
                signal.signal(signal.SIGTERM, lambda *_: stop.update(now=True))
                os.write(ready_w, b"R")
                while not stop["now"]:
                    try:
                        ok, _, _ = select.select([s], [], [], 0.1)
                    except InterruptedError:
                        continue
                    if not ok:
                        continue
                    if kind == socket.SOCK_DGRAM:
                        _, peer = s.recvfrom(65536)
                    else:
                        c, peer = s.accept()
                        c.close()
                    got.append(peer[0])
                os.write(w, json.dumps(got).encode())
            finally:
                os._exit(0)
        os.close(w)
        os.close(ready_w)
        self.r = r
        ok, _, _ = select.select([ready_r], [], [], 10)
        assert ok and os.read(ready_r, 1) == b"R", "sentinel did not start"
        os.close(ready_r)
        self.received = None
        return self

    def __exit__(self, *exc):
        os.kill(self.pid, signal.SIGTERM)
        os.waitpid(self.pid, 0)
        self.received = json.loads(os.read(self.r, 65536) or b"[]")
        os.close(self.r)
