"""kernel/sockets.py OptionCopier with real sockets: what an application set
on its own socket goes onto the host socket, except what the container may
set only inside its own namespace."""

import os
import socket

import pytest

from sockgraft.kernel import sockets as ksock

pytestmark = pytest.mark.unit


@pytest.mark.skipif(os.geteuid() != 0, reason="SO_PRIORITY above 6 needs CAP_NET_RAW")
@pytest.mark.parametrize("prio, carried", [(0, 0), (5, 5), (6, 6), (7, 0), (0x10001, 0)])
def test_a_priority_only_a_capability_allows_is_not_carried_over(prio, carried):
    copier = ksock.OptionCopier()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as app, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
        app.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, prio)
        app.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 9)
        copier.copy(app, host, socket.AF_INET, socket.SOCK_DGRAM, 0)
        assert host.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY) == carried
        assert host.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 9   # the rest goes
