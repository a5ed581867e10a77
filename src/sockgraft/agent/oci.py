"""The agent's OCI socket: where runc/crun hand over a container's seccomp
listener (the profile's `listenerPath`), and the holder that keeps it.

  runtime --connect--> OCI socket: JSON state + seccompFd (SCM_RIGHTS), close
         (runc before 1.4 in the foreground never closes)
  agent: read until the JSON object is complete or EOF (<= 1 MiB, <= 5 s,
         <= 4 fds), parse (model/oci.py);
         anything malformed: close every fd that came, log, count - nothing
         else is touched
  agent: spawn `sockgraft oci-hold` with the listener (pass_fds), which
         registers it over the control socket like `sockgraft run` does and
         then holds it: an agent restart never leaves the container's trapped
         syscalls without a listener (they wait in the kernel queue)
  holder exits when every task of the container is gone (listener POLLHUP)

Only root may connect (SO_PEERCRED), as on the control socket.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from ..errors import ConfigError, SockgraftError
from ..model import oci as moci
from ..model.graftconfig import dump_config
from . import control
from .loop import listen_unix, unregister

log = logging.getLogger("sockgraft.oci")

MAX_FDS = 4
READ_TIMEOUT = 5.0
MAX_PENDING = 64


@dataclass
class _Conn:
    sock: socket.socket
    data: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    deadline: float = 0.0


class OciServer:
    def __init__(self, path: str, ep: select.epoll,
                 on_handoff: Callable[[moci.Handoff, int], None]) -> None:
        self.path = path
        self.ep = ep
        self.on_handoff = on_handoff
        self.conns: dict[int, _Conn] = {}
        self.rejected = 0
        self.accepted = 0
        srv = listen_unix(path, 64)
        self.server = srv
        ep.register(srv.fileno(), select.EPOLLIN)

    def owns(self, fd: int) -> bool:
        return fd == self.server.fileno() or fd in self.conns

    def dispatch(self, fd: int) -> None:
        if fd == self.server.fileno():
            self._accept()
        else:
            self._read(fd)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except (BlockingIOError, InterruptedError):
                return
            if not control.peer_is_root(conn) or len(self.conns) >= MAX_PENDING:
                log.warning("OCI socket: refused a hand-off (not root, or too many pending)")
                self.rejected += 1
                conn.close()
                continue
            conn.setblocking(False)
            self.conns[conn.fileno()] = _Conn(conn, deadline=time.monotonic() + READ_TIMEOUT)
            self.ep.register(conn.fileno(), select.EPOLLIN)

    def _read(self, fd: int) -> None:
        c = self.conns[fd]
        while True:
            try:
                data, fds, flags, _ = socket.recv_fds(c.sock, 65536, MAX_FDS)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                self._reject(fd, f"read failed: {exc}")
                return
            c.fds.extend(fds)
            if flags & socket.MSG_CTRUNC:
                self._reject(fd, f"more than {MAX_FDS} fds attached")
                return
            if not data:
                self._finish(fd)
                return
            c.data += data
            if len(c.data) > moci.MAX_HANDOFF:
                self._reject(fd, f"message larger than {moci.MAX_HANDOFF} bytes")
                return
            if moci.message_complete(c.data):
                self._finish(fd)
                return

    def _finish(self, fd: int) -> None:
        c = self._pop(fd)
        try:
            h = moci.parse_handoff(bytes(c.data), len(c.fds))
        except ConfigError as exc:
            self._close_fds(c.fds)
            self.rejected += 1
            log.warning("OCI hand-off rejected: %s", exc)
            return
        listener = c.fds[h.fd_index]
        self._close_fds([f for i, f in enumerate(c.fds) if i != h.fd_index])
        self.accepted += 1
        try:
            self.on_handoff(h, listener)
        except (SockgraftError, OSError) as exc:
            log.error("OCI hand-off of %s failed: %s", h.container_id, exc)
        finally:
            os.close(listener)

    def _reject(self, fd: int, why: str) -> None:
        c = self._pop(fd)
        self._close_fds(c.fds)
        self.rejected += 1
        log.warning("OCI hand-off rejected: %s", why)

    def _pop(self, fd: int) -> _Conn:
        c = self.conns.pop(fd)
        unregister(self.ep, fd)
        c.sock.close()
        return c

    @staticmethod
    def _close_fds(fds: list[int]) -> None:
        for f in fds:
            try:
                os.close(f)
            except OSError:
                pass

    def sweep(self, now: float) -> None:
        for fd in [fd for fd, c in self.conns.items() if now > c.deadline]:
            self._reject(fd, f"no complete message within {READ_TIMEOUT:g} s")

    def close(self) -> None:
        for fd in list(self.conns):
            self._reject(fd, "agent stopping")
        try:
            self.ep.unregister(self.server.fileno())
        except (KeyError, ValueError, OSError):
            pass
        self.server.close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def start_holder(agent_path: str, store, h: moci.Handoff, listener: int,
                 audit: Callable, *, trust_annotations: bool = True) -> subprocess.Popen | None:
    """A runtime handed over a container's listener: find its name and
    config (the store first, then its annotations), its CNI addresses and
    published ports, and start its holder. None: the hand-off is refused."""
    from .. import cni
    from ..paths import state_dir
    regs = cni.registrations(state_dir(), h.container_id)
    sandbox = moci.sandbox_id(h)
    conflict = moci.sandbox_conflict(h)
    if conflict:
        log.warning("OCI container %s: %s", h.container_id, conflict)
        audit(h.container_id, h.pid, "oci", h.container_id, "reject", conflict)
    if not regs and sandbox:
        # an application container of a pod: its network is its sandbox's
        regs = cni.registrations(state_dir(), sandbox)
    cni_name = regs[0].get("container") if regs else None
    try:
        container = moci.container_name(h, cni_name, trusted=trust_annotations)
    except SockgraftError as exc:
        log.error("OCI container %s rejected: %s", h.container_id, exc)
        return None
    refused = moci.name_refused(h, container)
    if refused:
        log.warning("container %s (%s): %s", container, h.container_id, refused)
        audit(container, h.pid, "oci", h.container_id, "reject", refused)
    cfg_text = None
    if store.load(container) is None:
        try:
            cfg = moci.config_from_annotations(container, h.annotations,
                                               trusted=trust_annotations)
        except SockgraftError as exc:
            log.error("container %s: annotations rejected, served without grafting: %s",
                      container, exc)
            audit(container, h.pid, "oci", h.container_id, "reject", str(exc))
            cfg = None
        cfg_text = dump_config(cfg) if cfg is not None else None
    addresses = [ip for r in regs for ip in r.get("ips", []) if isinstance(ip, str)]
    ports = [p for r in regs for p in (r.get("ports") or []) if isinstance(p, dict)]
    holder = spawn_holder(agent_path, h, listener, container, cfg_text, addresses, ports)
    log.info("OCI container %s (%s, pid %d, graft_at %s): holder started", container,
             h.container_id, h.pid, h.graft_at)
    return holder


def spawn_holder(agent_path: str, h: moci.Handoff, listener: int, container: str,
                 config_toml: str | None, addresses: list[str],
                 ports: list[dict] | None = None) -> subprocess.Popen:
    """Start `sockgraft oci-hold` with the listener; it registers and holds."""
    info = {"agent": agent_path, "container": container, "id": h.container_id,
            "pid": h.pid, "bundle": h.bundle, "graft_at": h.graft_at,
            "config": config_toml, "cni_addresses": addresses, "cni_ports": ports or []}
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "sockgraft.cli.main", "oci-hold",
                             "--fd", str(listener), "--info-fd", str(r)],
                            pass_fds=(listener, r), stdin=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
    os.close(r)
    with os.fdopen(w, "w") as f:
        json.dump(info, f)
    return proc
