"""Small helpers for the agent's single epoll loop."""

from __future__ import annotations

import os
import select
import socket


def unregister(ep: select.epoll, fd: int) -> None:
    """Forget fd in ep; fine if it was never registered or is already closed."""
    try:
        ep.unregister(fd)
    except (KeyError, ValueError, OSError):
        pass


def listen_unix(path: str, backlog: int = 128) -> socket.socket:
    """A fresh non-blocking unix stream server socket at path, reachable by
    its owner (root) only; a stale socket file is replaced."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                        | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        srv.bind(path)
    finally:
        os.umask(old)
    srv.listen(backlog)
    return srv
