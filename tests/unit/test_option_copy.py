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


@pytest.mark.parametrize("order", ["tos-then-priority", "priority-then-tos"])
def test_the_priority_and_the_tos_arrive_as_the_application_left_them(order):
    """IP_TOS sets the priority as well: the copy must end where the
    application's socket ended, whichever it set last."""
    copier = ksock.OptionCopier()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as app, \
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as host:
        steps = [(socket.IPPROTO_IP, socket.IP_TOS, 0x10), (socket.SOL_SOCKET,
                                                             socket.SO_PRIORITY, 2)]
        for level, opt, val in (steps if order == "tos-then-priority" else steps[::-1]):
            app.setsockopt(level, opt, val)
        copier.copy(app, host, socket.AF_INET, socket.SOCK_DGRAM, 0)
        for level, opt, _ in steps:
            assert host.getsockopt(level, opt) == app.getsockopt(level, opt), (level, opt)
