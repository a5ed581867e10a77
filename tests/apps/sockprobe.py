"""An unmodified socket application for the engine tests: it knows nothing of
sockgraft and reports, as one JSON line, what the socket API told it.

  sockprobe.py tcp-client HOST PORT [--nonblock] [--thread] [--opts] [--cloexec 0|1]
  sockprobe.py tcp-server ADDR PORT [--count N] [--family 4|6] [--v6only 0|1]
  sockprobe.py udp-client HOST PORT [--count N] [--connect]
  sockprobe.py udp-server ADDR PORT [--count N]
  sockprobe.py connect-raw FAMILY ADDRLEN HEX   (raw sockaddr bytes, hostile input)
  sockprobe.py connect-badptr
  sockprobe.py loop HOST PORT N                 (connect/close N times)
"""

import ctypes
import errno
import json
import os
import select
import socket
import sys
import threading


def out(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def fam(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def name(addr):
    return list(addr[:2]) if addr else None


def cloexec_of(fd):
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            if line.startswith("flags:"):
                return bool(int(line.split()[1], 8) & 0o2000000)
    return None


OPTS = [
    (socket.SOL_SOCKET, socket.SO_REUSEADDR, 1, "SO_REUSEADDR"),
    (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1, "SO_KEEPALIVE"),
    (socket.IPPROTO_TCP, socket.TCP_NODELAY, 1, "TCP_NODELAY"),
    (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 77, "TCP_KEEPIDLE"),
    (socket.SOL_SOCKET, socket.SO_SNDBUF, 65536, "SO_SNDBUF"),
]


def tcp_client(host, port, args):
    result = {}
    s = socket.socket(fam(host), socket.SOCK_STREAM)   # Python sets close-on-exec
    if "--cloexec" in args and args[args.index("--cloexec") + 1] == "0":
        os.set_inheritable(s.fileno(), True)
    if "--opts" in args:
        for lvl, opt, val, _ in OPTS:
            s.setsockopt(lvl, opt, val)
    fd = s.fileno()
    ino_before = os.fstat(fd).st_ino

    def do_connect():
        if "--nonblock" in args:
            s.setblocking(False)
            err = s.connect_ex((host, port))
            result["connect_errno"] = errno.errorcode.get(err, err)
            select.select([], [s], [], 10)
            result["so_error"] = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            s.setblocking(True)
        else:
            err = s.connect_ex((host, port))
            result["connect_errno"] = errno.errorcode.get(err, err)

    if "--thread" in args:
        t = threading.Thread(target=do_connect)
        t.start()
        t.join()
        result["thread"] = True
    else:
        do_connect()
    result["fd_same"] = s.fileno() == fd
    result["replaced"] = os.fstat(fd).st_ino != ino_before
    result["mark"] = s.getsockopt(socket.SOL_SOCKET, 36)    # SO_MARK: sockgraft's = a host socket
    result["cloexec"] = cloexec_of(fd)
    if result["connect_errno"] in (0, "EINPROGRESS") and result.get("so_error", 0) == 0:
        result["local"] = name(s.getsockname())
        result["peer"] = name(s.getpeername())
        s.settimeout(5)
        s.sendall(b"ping")
        result["echo"] = s.recv(100).decode()
        if "--opts" in args:
            result["opts"] = {n: s.getsockopt(lvl, opt) for lvl, opt, _, n in OPTS}
    out(result)


def tcp_server(addr, port, args):
    count = int(args[args.index("--count") + 1]) if "--count" in args else 1
    family = socket.AF_INET6 if (":" in addr or "--family" in args and
                                 args[args.index("--family") + 1] == "6") else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if "--v6only" in args:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY,
                     int(args[args.index("--v6only") + 1]))
    try:
        s.bind((addr, port))
    except OSError as exc:
        out({"bind_errno": errno.errorcode.get(exc.errno, exc.errno)})
        return
    s.listen(16)
    out({"ready": True, "local": name(s.getsockname()), "pid": os.getpid(), "fd": s.fileno()})
    for _ in range(count):
        c, peer = s.accept()
        data = c.recv(100)
        c.sendall(data)
        c.close()
        out({"accepted": name(peer)})


def udp_client(host, port, args):
    count = int(args[args.index("--count") + 1]) if "--count" in args else 1
    s = socket.socket(fam(host), socket.SOCK_DGRAM)
    s.settimeout(3)
    res = {"sent": 0, "errors": [], "replies": 0}
    if "--connect" in args:
        s.connect((host, port))
    for i in range(count):
        try:
            if "--connect" in args and "--tos-cmsg" in args:
                # an IP-level control message on a connected socket (QUIC
                # stacks send ECN marks so): the kernel runs the sendmsg
                # hooks with no address
                level, opt = ((socket.IPPROTO_IPV6, socket.IPV6_TCLASS) if ":" in host
                              else (socket.IPPROTO_IP, socket.IP_TOS))
                s.sendmsg([b"dgram%d" % i], [(level, opt, (0x02).to_bytes(4, "little"))])
            elif "--connect" in args:
                s.send(b"dgram%d" % i)
            else:
                s.sendto(b"dgram%d" % i, (host, port))
            res["sent"] += 1
            data, peer = s.recvfrom(100)
            res["replies"] += 1
            res["peer"] = name(peer)
        except OSError as exc:
            res["errors"].append(errno.errorcode.get(exc.errno, str(exc)))
    res["local"] = name(s.getsockname())
    res["mark"] = s.getsockopt(socket.SOL_SOCKET, 36)
    out(res)


def udp_server(addr, port, args):
    count = int(args[args.index("--count") + 1]) if "--count" in args else 1
    s = socket.socket(fam(addr), socket.SOCK_DGRAM)
    try:
        s.bind((addr, port))
    except OSError as exc:
        out({"bind_errno": errno.errorcode.get(exc.errno, exc.errno)})
        return
    out({"ready": True, "local": name(s.getsockname())})
    for _ in range(count):
        data, peer = s.recvfrom(100)
        s.sendto(data, peer)
        out({"from": name(peer)})


libc = ctypes.CDLL(None, use_errno=True)


def connect_raw(family, addrlen, hexdata):
    s = socket.socket(int(family), socket.SOCK_STREAM)
    raw = bytes.fromhex(hexdata)
    buf = ctypes.create_string_buffer(raw, max(len(raw), int(addrlen), 1))
    rc = libc.connect(s.fileno(), buf, int(addrlen))
    err = ctypes.get_errno() if rc != 0 else 0
    out({"rc": rc, "errno": errno.errorcode.get(err, err)})


def connect_badptr():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    rc = libc.connect(s.fileno(), ctypes.c_void_p(8), 16)   # unmapped page
    err = ctypes.get_errno() if rc != 0 else 0
    out({"rc": rc, "errno": errno.errorcode.get(err, err)})


def epoll_client(host, port, when="before"):
    """Registers with epoll BEFORE connect (as nginx does) - or after it
    (Go's netpoll, libuv, asyncio: `after`) -, then MODs the registration
    (which needs the item keyed by this fd number)."""
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    s.setblocking(False)
    ep = select.epoll()
    events = select.EPOLLOUT | select.EPOLLIN | select.EPOLLET
    if when == "before":
        ep.register(s.fileno(), events)
    err = s.connect_ex((host, int(port)))
    if when != "before":
        ep.register(s.fileno(), events)
    res = {"connect_errno": errno.errorcode.get(err, err)}
    res["out"] = bool(ep.poll(5))
    s.send(b"ping")
    try:
        ep.modify(s.fileno(), select.EPOLLIN)
        res["modify"] = "ok"
    except OSError as exc:
        res["modify"] = errno.errorcode.get(exc.errno, exc.errno)
    res["in"] = bool(ep.poll(5))
    res["echo"] = s.recv(100).decode() if res["in"] else None
    res["local"] = name(s.getsockname())
    out(res)


def loop(host, port, n):
    ok = 0
    for _ in range(int(n)):
        with socket.socket(fam(host), socket.SOCK_STREAM) as s:
            if s.connect_ex((host, int(port))) == 0:
                ok += 1
    out({"ok": ok})


def echo_server(addr, port):
    """Echo every connection until it closes (a thread each); reports peers."""
    s = socket.socket(fam(addr), socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(port)))
    s.listen(64)
    out({"ready": True, "local": name(s.getsockname())})

    def serve(c):
        with c:
            while True:
                data = c.recv(4096)
                if not data:
                    return
                c.sendall(data)

    while True:
        c, peer = s.accept()
        out({"accepted": name(peer)})
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def chat(host, port):
    """One long-lived connection: each stdin line is sent and its echo printed."""
    s = socket.socket(fam(host), socket.SOCK_STREAM)
    err = s.connect_ex((host, int(port)))
    out({"connect_errno": errno.errorcode.get(err, err),
         "peer": name(s.getpeername()) if err == 0 else None,
         "local": name(s.getsockname())})
    s.settimeout(5)
    for line in sys.stdin:
        try:
            s.sendall(line.strip().encode())
            out({"echo": s.recv(4096).decode()})
        except OSError as exc:
            out({"error": errno.errorcode.get(exc.errno, str(exc))})


def listen_unbound():
    """listen() on a socket nobody bound (the kernel would pick a port)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.listen(4)
        out({"listen_errno": 0, "local": name(s.getsockname())})
    except OSError as exc:
        out({"listen_errno": errno.errorcode.get(exc.errno, exc.errno)})


def bind_probe(*addrs):
    """Go's runtime start-up probe: an IPv6-only socket bound to [::1]:0, a
    dual-stack one bound to [::ffff:127.0.0.1]:0. {address: 0 or errno}."""
    res = {}
    for a in addrs:
        s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if "." in a else 1)
        try:
            s.bind((a, 0))
            res[a] = 0
        except OSError as exc:
            res[a] = errno.errorcode.get(exc.errno, exc.errno)
        s.close()
    out(res)


def main(argv):
    cmd, rest = argv[0], argv[1:]
    if cmd == "tcp-client":
        tcp_client(rest[0], int(rest[1]), rest[2:])
    elif cmd == "tcp-server":
        tcp_server(rest[0], int(rest[1]), rest[2:])
    elif cmd == "udp-client":
        udp_client(rest[0], int(rest[1]), rest[2:])
    elif cmd == "udp-server":
        udp_server(rest[0], int(rest[1]), rest[2:])
    elif cmd == "connect-raw":
        connect_raw(*rest)
    elif cmd == "connect-badptr":
        connect_badptr()
    elif cmd == "epoll-client":
        epoll_client(*rest)
    elif cmd == "echo-server":
        echo_server(*rest)
    elif cmd == "chat":
        chat(*rest)
    elif cmd == "listen-unbound":
        listen_unbound()
    elif cmd == "loop":
        loop(*rest)
    elif cmd == "bind-probe":
        bind_probe(*rest)
    else:
        sys.exit(f"unknown command {cmd}")


if __name__ == "__main__":
    main(sys.argv[1:])
