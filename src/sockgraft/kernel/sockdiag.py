"""Which socket marks are carried by sockets of this network namespace
(NETLINK_SOCK_DIAG through pyroute2's DiagSocket). The agent asks before it
hands a released container mark to a new container: a mark is an identity,
and a socket that still carries it (held by a process of the old container,
or passed on) must not gain the new container's grants.

Needs CAP_NET_ADMIN (the kernel reports INET_DIAG_MARK only then); without
it every mark counts as in use, which only means released marks are not
reused."""

from __future__ import annotations

import socket
from typing import Iterator, NamedTuple

from ..errors import from_oserror

_PROTOS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP)
_ALL_STATES = 0xFFF


class DiagEntry(NamedTuple):
    mark: int          # -1: not reported (no CAP_NET_ADMIN)
    inode: int
    proto: str         # "tcp" | "udp"
    local: str
    remote: str        # "" when not connected


def _fmt(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def dump() -> Iterator[DiagEntry]:
    """Every TCP and UDP socket (IPv4 and IPv6) of this netns that the
    kernel's tables hold (bound or connected: a socket that is neither is in
    no table). Raises KernelError if the dump fails."""
    from pyroute2 import DiagSocket
    try:
        with DiagSocket() as ds:
            ds.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                for proto in _PROTOS:
                    for msg in ds.get_sock_stats(family=family, protocol=proto,
                                                 states=_ALL_STATES):
                        raw = msg.get_attr("INET_DIAG_MARK")
                        mark = -1 if raw is None else \
                            int.from_bytes(bytes.fromhex(raw.replace(":", "")), "little")
                        dport = msg["idiag_dport"]
                        yield DiagEntry(mark, msg["idiag_inode"],
                                        "tcp" if proto == socket.IPPROTO_TCP else "udp",
                                        _fmt(msg["idiag_src"], msg["idiag_sport"]),
                                        _fmt(msg["idiag_dst"], dport) if dport else "")
    except OSError as exc:
        raise from_oserror("sock_diag dump", exc) from None


def marks_in_use() -> set[int]:
    """The marks of every TCP and UDP socket (IPv4 and IPv6) in this netns
    (-1 among them: some mark not reported, assume everything)."""
    return {e.mark for e in dump()}
