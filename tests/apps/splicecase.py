"""An unmodified TCP application for the splice tests: one connection, one
case, both ends, each printing one JSON line of what the socket API told it.
Run once with the agent splicing and once without, the two ends must see the
same thing (except where docs/architecture.md says otherwise).

  splicecase.py server PORT CASE [--blocking|--blocking-server]   (one connection)
  splicecase.py client HOST PORT CASE [--blocking]

Sockets are non-blocking and every call waits in poll() first, as in an
event loop (nginx, Go, redis); --blocking uses plain blocking sockets.

CASES: bulk bidir halfclose peek waitall sendfile splicein spliceout rcvlowat
       epoll nonblock unreadclose peerdies oob
"""

import errno
import hashlib
import json
import os
import select
import socket
import sys
import tempfile
import threading
import time

MB = 1 << 20


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def pattern(n, seed=7):
    """n bytes both ends can produce without sending them."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048     # 64 KiB
    return (block * (n // len(block) + 1))[:n]


class Evented:
    """A non-blocking socket used as an event loop uses it: each call waits
    for readiness in poll(), then makes the call; EAGAIN means wait again."""

    def __init__(self, sock):
        self.sock = sock
        sock.setblocking(False)

    def fileno(self):
        return self.sock.fileno()

    def _wait(self, ev, timeout=20):
        p = select.poll()
        p.register(self.sock, ev)
        if not p.poll(timeout * 1000):
            raise TimeoutError("no readiness in 20 s")

    def _retry(self, ev, fn):
        while True:
            self._wait(ev)
            try:
                return fn()
            except BlockingIOError:
                continue

    def recv(self, n, flags=0):
        return self._retry(select.POLLIN, lambda: self.sock.recv(n, flags))

    def send(self, data, flags=0):
        return self._retry(select.POLLOUT, lambda: self.sock.send(data, flags))

    def sendall(self, data):
        view, off = memoryview(data), 0
        while off < len(data):
            off += self.send(view[off:off + 262144])

    def __getattr__(self, name):
        return getattr(self.sock, name)


def read_all(s, chunk=997):
    h, n = hashlib.sha256(), 0
    while True:
        b = s.recv(chunk)
        if not b:
            return h.hexdigest(), n
        h.update(b)
        n += len(b)


def read_exact(s, n):
    buf = bytearray()
    while len(buf) < n:
        b = s.recv(n - len(buf))
        if not b:
            break
        buf += b
    return bytes(buf)


def err_name(fn):
    try:
        r = fn()
        return r if not isinstance(r, bytes) else r.decode(errors="replace")
    except OSError as e:
        return errno.errorcode.get(e.errno, str(e.errno))


def sha(data):
    return hashlib.sha256(data).hexdigest()


# --- each case: (server side, client side) ---------------------------------------

def s_bulk(c):
    digest, n = read_all(c)
    c.sendall(digest.encode())
    return {"got": n, "sha_ok": digest == sha(pattern(8 * MB))}


def c_bulk(s):
    s.sendall(pattern(8 * MB))
    s.shutdown(socket.SHUT_WR)
    return {"reply_ok": read_exact(s, 64).decode() == sha(pattern(8 * MB))}


def _duplex(s, seed_out, seed_in):
    t = threading.Thread(target=s.sendall, args=(pattern(4 * MB, seed_out),))
    t.start()
    got = read_exact(s, 4 * MB)
    t.join()
    return {"in_ok": got == pattern(4 * MB, seed_in)}


def s_bidir(c):
    return _duplex(c, 2, 1)


def c_bidir(s):
    return _duplex(s, 1, 2)


def s_halfclose(c):
    req = read_exact(c, 3)
    eof = c.recv(10)
    c.sendall(b"resp")
    return {"req": req.decode(), "eof": eof.decode()}


def c_halfclose(s):
    s.sendall(b"req")
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.05)
    return {"resp": read_exact(s, 4).decode(), "eof": s.recv(10).decode()}


def s_peek(c):
    time.sleep(0.1)
    peeked = c.recv(3, socket.MSG_PEEK)
    rest = read_exact(c, 6)
    c.sendall(b"k")
    return {"peek": peeked.decode(), "read": rest.decode()}


def c_peek(s):
    s.sendall(b"abcdef")
    return {"ack": s.recv(1).decode()}


def s_waitall(c):
    got = c.recv(50, socket.MSG_WAITALL)
    return {"waitall_len": len(got)}


def c_waitall(s):
    for i in range(5):
        s.sendall(str(i).encode() * 10)
        time.sleep(0.03)
    return {}


def s_sendfile(c):
    digest, n = read_all(c, 65536)
    return {"got": n, "sha_ok": digest == sha(pattern(3 * MB, 3))}


def c_sendfile(s):
    with tempfile.TemporaryFile() as f:
        f.write(pattern(3 * MB, 3))
        f.flush()
        sent = 0
        while sent < 3 * MB:
            try:
                sent += os.sendfile(s.fileno(), f.fileno(), sent, 3 * MB - sent)
            except BlockingIOError:
                select.select([], [s], [], 20)
    s.shutdown(socket.SHUT_WR)
    return {"sent": sent}


s_splicein = s_sendfile


def c_splicein(s):
    data = pattern(3 * MB, 3)
    r, w = os.pipe()
    off = 0
    while off < len(data):
        n = os.write(w, data[off:off + 65536])
        off += n
        moved = 0
        while moved < n:
            try:
                moved += os.splice(r, s.fileno(), n - moved)
            except BlockingIOError:
                select.select([], [s], [], 20)
    s.shutdown(socket.SHUT_WR)
    return {"sent": off}


def s_spliceout(c):
    """splice(2) from the socket into a pipe, as Go's io.Copy between two
    TCP connections does. The client sends only after this end is accept()ed
    (before that, its sends take TCP: the peer is not in the map yet)."""
    c.sendall(b"g")
    r, w = os.pipe()
    got = bytearray()
    deadline = time.monotonic() + 3
    while len(got) < 100000 and time.monotonic() < deadline:
        select.select([c], [], [], 0.2)
        try:
            n = os.splice(c.fileno(), w, 65536, flags=2)   # SPLICE_F_NONBLOCK
        except BlockingIOError:
            continue
        if n == 0:
            break
        got += os.read(r, n)
    return {"spliced": len(got), "ok": bytes(got) == pattern(100000, 5)[:len(got)]}


def c_spliceout(s):
    s.recv(1)
    s.sendall(pattern(100000, 5))
    time.sleep(0.5)
    return {}


def s_rcvlowat(c):
    c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 100)
    c.sendall(b"g")
    p = select.poll()
    p.register(c, select.POLLIN)
    time.sleep(0.1)
    early = [e for _, e in p.poll(100)]
    c.sendall(b"h")
    late = [e for _, e in p.poll(3000)]
    return {"early": early, "late": bool(late), "got": len(read_exact(c, 100))}


def c_rcvlowat(s):
    s.recv(1)
    s.sendall(b"x" * 10)
    s.recv(1)
    s.sendall(b"y" * 90)
    return {}


def s_epoll(c):
    ep = select.epoll()
    ep.register(c, select.EPOLLIN | select.EPOLLRDHUP)
    first = ep.poll(3)
    data = c.recv(100)
    second = ep.poll(3)
    return {"first": [e & (select.EPOLLIN | select.EPOLLRDHUP) for _, e in first],
            "data": data.decode(),
            "rdhup": bool(second and second[0][1] & select.EPOLLRDHUP)}


def c_epoll(s):
    time.sleep(0.1)
    s.sendall(b"wake")
    time.sleep(0.1)
    s.shutdown(socket.SHUT_WR)
    time.sleep(0.1)
    return {}


def s_nonblock(c):
    raw = getattr(c, "sock", c)
    raw.setblocking(False)
    empty = err_name(lambda: raw.recv(10))
    c.sendall(b"g")
    time.sleep(0.5)        # the sender fills what the path holds
    digest, n = read_all(c, 65536)
    return {"empty": empty, "got": n, "sha_ok": digest == sha(pattern(32 * MB, 9))}


def c_nonblock(s):
    data = pattern(32 * MB, 9)
    s.recv(1)
    raw = getattr(s, "sock", s)
    raw.setblocking(False)
    off = 0
    try:
        while off < len(data):
            off += raw.send(data[off:off + 65536])
    except BlockingIOError:
        pass
    before = off
    s.sendall(data[off:])
    s.shutdown(socket.SHUT_WR)
    return {"bounded": before < 16 * MB, "eagain": before < len(data)}


def s_unreadclose(c):
    c.sendall(b"g")
    time.sleep(0.2)
    c.close()
    return {}


def c_unreadclose(s):
    s.recv(1)
    s.sendall(b"never read" * 10)
    time.sleep(0.4)
    return {"recv": err_name(lambda: s.recv(10))}


def s_peerdies(c):
    first = c.recv(1)
    c.close()
    return {"first": first.decode()}


def c_peerdies(s):
    s.sendall(b"a")
    time.sleep(0.2)
    outcomes = []
    for _ in range(3):
        outcomes.append(err_name(lambda: s.send(b"b")))
        time.sleep(0.1)
    return {"sends": [o if isinstance(o, str) else "ok" for o in outcomes]}


def s_slow(c):
    digest, n = read_all(c, 65536)
    c.sendall(digest.encode())
    return {"got": n, "sha_ok": digest == sha(pattern(4 * MB, 11))}


def c_slow(s):
    """4 MiB in 64 KiB pieces over about 3 s (an agent restart in between)."""
    data = pattern(4 * MB, 11)
    for off in range(0, len(data), 65536):
        s.sendall(data[off:off + 65536])
        time.sleep(0.05)
    s.shutdown(socket.SHUT_WR)
    return {"reply_ok": read_exact(s, 64).decode() == sha(data)}


def s_oob(c):
    c.sendall(b"g")
    time.sleep(0.3)
    raw = getattr(c, "sock", c)
    urgent = err_name(lambda: raw.recv(1, socket.MSG_OOB | socket.MSG_DONTWAIT))
    return {"urgent": urgent, "inline": read_exact(c, 2).decode()}


def c_oob(s):
    s.recv(1)
    s.sendall(b"ab")
    s.send(b"!", socket.MSG_OOB)
    time.sleep(0.5)
    return {}


CASES = [n[2:] for n in dir() if n.startswith("s_")]


def main(argv):
    role = argv[1]
    blocking = "--blocking" in argv
    if role == "server":
        port, case = int(argv[2]), argv[3]
        ls = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(("0.0.0.0", port))
        if not blocking and "--blocking-server" not in argv:
            ls.setblocking(False)       # an event loop's listener
        ls.listen(4)
        out({"listening": port})
        select.select([ls], [], [], 30)
        c, _ = ls.accept()
        if not blocking and "--blocking-server" not in argv:
            c = Evented(c)
        res = globals()["s_" + case](c)
        try:
            c.close()
        except OSError:
            pass
        out({"side": "server", "case": case, **res})
    else:
        host, port, case = argv[2], int(argv[3]), argv[4]
        if blocking:
            s = socket.create_connection((host, port), timeout=20)
            s.settimeout(None)
        else:       # connected non-blocking, as an event loop does
            s = Evented(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            if s.connect_ex((host, port)) not in (0, errno.EINPROGRESS):
                raise OSError("connect failed")
            s._wait(select.POLLOUT)
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        res = globals()["c_" + case](s)
        s.close()
        out({"side": "client", "case": case, **res})


if __name__ == "__main__":
    main(sys.argv)
