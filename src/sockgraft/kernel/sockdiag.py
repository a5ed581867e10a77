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

from ..errors import from_oserror

_PROTOS = (socket.IPPROTO_TCP, socket.IPPROTO_UDP)
_ALL_STATES = 0xFFF


def marks_in_use() -> set[int]:
    """The marks of every TCP and UDP socket (IPv4 and IPv6) in this netns.
    Raises KernelError if the dump fails."""
    from pyroute2 import DiagSocket
    found: set[int] = set()
    try:
        with DiagSocket() as ds:
            ds.bind()
            for family in (socket.AF_INET, socket.AF_INET6):
                for proto in _PROTOS:
                    for msg in ds.get_sock_stats(family=family, protocol=proto,
                                                 states=_ALL_STATES):
                        raw = msg.get_attr("INET_DIAG_MARK")
                        if raw is None:
                            found.add(-1)           # not reported: assume everything
                            continue
                        found.add(int.from_bytes(bytes.fromhex(raw.replace(":", "")),
                                                 "little"))
    except OSError as exc:
        raise from_oserror("sock_diag dump", exc) from None
    return found
