"""The agent's control protocol: framed JSON over a unix stream socket, with
file descriptors passed by SCM_RIGHTS.

Frame: 4-byte big-endian length, then that many bytes of UTF-8 JSON (an
object with an "op" key). At most MAX_FDS descriptors ride on the first byte
of a frame. Frames over MAX_FRAME are refused and the connection dropped, so a
hostile peer cannot make the agent buffer without bound.

Ops (request -> reply, every reply has "ok" and on failure "error"):
  register   {container, pid, netns?} + listener fd  -> {ok}
  reload     {container?}                            -> {ok}  (config files changed)
  sockets    {}                                      -> {ok, sockets: [...]}
  stats      {}                                      -> {ok, counters: {...}, containers: [...]}
  ping       {}                                      -> {ok, pid}
Must not: decide anything about sockets (agent/engine does).
"""

from __future__ import annotations

import array
import errno
import json
import logging
import os
import socket
import struct

from ..errors import AgentError
from ..paths import state_dir

log = logging.getLogger("sockgraft.agent")

MAX_FRAME = 1 << 20
MAX_FDS = 4
_LEN = struct.Struct("!I")


def agent_name(host: str = "default", lab: str | None = None) -> str:
    """A lab host's agent is named by lab and host (two labs with the same
    topology never share a socket, a log or a directory); any other agent
    by its own name."""
    return f"{lab}-{host}" if lab else host


def default_socket_path(host: str = "default", lab: str | None = None) -> str:
    return os.path.join(state_dir(), f"agent-{agent_name(host, lab)}.sock")


def encode(msg: dict) -> bytes:
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise AgentError(f"control message too large ({len(body)} bytes)")
    return _LEN.pack(len(body)) + body


def send(sock: socket.socket, msg: dict, fds: list[int] | None = None) -> None:
    data = encode(msg)
    if fds:
        sent = socket.send_fds(sock, [data[:1]], fds)
        data = data[sent:]
    sock.sendall(data)


class FrameReader:
    """Incremental frame decoder for a (possibly non-blocking) connection."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fds: list[int] = []

    def feed(self, sock: socket.socket) -> bool:
        """Read what is available. False on EOF."""
        fds = array.array("i")
        try:
            data, ancdata, flags, _ = sock.recvmsg(65536, socket.CMSG_SPACE(MAX_FDS * 4))
        except (BlockingIOError, InterruptedError):
            return True
        for level, kind, cdata in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(cdata[: len(cdata) - (len(cdata) % fds.itemsize)])
        self.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            self.close_fds()
            raise AgentError("control message carried too many file descriptors")
        if not data:
            return False
        self.buf.extend(data)
        if len(self.buf) >= 4 and _LEN.unpack_from(self.buf)[0] > MAX_FRAME:
            self.close_fds()
            raise AgentError("control frame too large")
        return True

    def frames(self):
        """Yield (msg, fds) for each complete frame; fds attach to the first frame."""
        while len(self.buf) >= 4:
            n = _LEN.unpack_from(self.buf)[0]
            if len(self.buf) < 4 + n:
                return
            body = bytes(self.buf[4:4 + n])
            del self.buf[:4 + n]
            fds, self.fds = self.fds, []
            try:
                msg = json.loads(body)
                if not isinstance(msg, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                for fd in fds:
                    os.close(fd)
                raise AgentError(f"malformed control message: {exc}") from exc
            yield msg, fds

    def close_fds(self) -> None:
        for fd in self.fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self.fds = []


def connect(path: str, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        hint = " (is `sockgraft agent` running?)" if exc.errno in (
            errno.ENOENT, errno.ECONNREFUSED) else ""
        raise AgentError(f"cannot reach the agent at {path}: {exc.strerror}{hint}") from exc
    return sock


def recv_reply(sock: socket.socket) -> dict:
    reader = FrameReader()
    while True:
        for msg, fds in reader.frames():
            for fd in fds:
                os.close(fd)
            return msg
        try:
            if not reader.feed(sock):
                raise AgentError("the agent closed the connection")
        except socket.timeout as exc:
            raise AgentError("the agent did not answer in time") from exc


def request(path: str, msg: dict, fds: list[int] | None = None, timeout: float = 10.0) -> dict:
    """One request/reply exchange; raises AgentError on a failed reply."""
    with connect(path, timeout) as sock:
        try:
            send(sock, msg, fds)
            reply = recv_reply(sock)
        except OSError as exc:   # reset, broken pipe: the agent went away mid-request
            raise AgentError(f"the agent at {path} dropped the request: "
                             f"{exc.strerror or exc}") from exc
    if not reply.get("ok"):
        raise AgentError(reply.get("error", "the agent refused the request"))
    return reply


def peer_is_root(conn: socket.socket) -> bool:
    """Is the peer of a unix stream connection root (or our own uid)? Both the
    control socket and the OCI socket admit only those (SO_PEERCRED)."""
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return struct.unpack("3i", creds)[1] in (0, os.geteuid())


class Server:
    """The control socket's connections in the agent's epoll: accepts root
    peers only (at most max_clients), reassembles frames, and hands each
    request to handle(conn, msg, fds) - which owns the fds and replies with
    `reply` (now, or later for a deferred answer)."""

    def __init__(self, sock: socket.socket, ep, handle, max_clients: int = 256) -> None:
        import select
        self.sock = sock
        self.ep = ep
        self.handle = handle
        self.max_clients = max_clients
        self.clients: dict[int, tuple[socket.socket, FrameReader]] = {}
        ep.register(sock.fileno(), select.EPOLLIN)

    def owns(self, fd: int) -> bool:
        return fd == self.sock.fileno() or fd in self.clients

    def dispatch(self, fd: int) -> None:
        if fd == self.sock.fileno():
            self._accept()
        else:
            self._on_client(fd)

    def _accept(self) -> None:
        import select
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            if len(self.clients) >= self.max_clients:
                conn.close()
                log.warning("control: too many clients, refused one")
                continue
            if not peer_is_root(conn):
                log.warning("control: refused a client that is not root")
                conn.close()
                continue
            conn.setblocking(False)
            self.clients[conn.fileno()] = (conn, FrameReader())
            self.ep.register(conn.fileno(), select.EPOLLIN)

    def _on_client(self, fd: int) -> None:
        conn, reader = self.clients[fd]
        try:
            alive = reader.feed(conn)
            for msg, fds in reader.frames():
                self.handle(conn, msg, fds)
        except (AgentError, OSError) as exc:
            log.warning("control: dropping a client: %s", exc)
            alive = False
        if not alive:
            self.drop(fd)

    def drop(self, fd: int) -> None:
        conn, reader = self.clients.pop(fd)
        reader.close_fds()
        try:
            self.ep.unregister(fd)
        except (KeyError, ValueError, OSError):
            pass
        conn.close()

    def close(self) -> None:
        for fd in list(self.clients):
            self.drop(fd)
        try:
            self.ep.unregister(self.sock.fileno())
        except (KeyError, ValueError, OSError):
            pass
        self.sock.close()


def reply(conn: socket.socket, msg: dict) -> None:
    """Send one reply on a non-blocking control connection (blocking for up
    to 2 s while sending); a peer that went away is logged, not raised."""
    try:
        conn.setblocking(True)
        conn.settimeout(2.0)
        send(conn, msg)
    except OSError as exc:
        log.warning("control: reply failed: %s", exc)
    finally:
        try:
            conn.setblocking(False)
        except OSError:
            pass
