"""The pure parts of the socket() fast path: which socket() calls get a host
socket, and the hand-over box between notifier threads and the loop."""

import os
import select
import socket

import pytest

from sockgraft.agent import notifiers
from sockgraft.kernel import seccomp

NB, CX = socket.SOCK_NONBLOCK, socket.SOCK_CLOEXEC


@pytest.mark.parametrize("args,want", [
    ((2, 1, 0), (2, 1, 0)),                     # AF_INET SOCK_STREAM
    ((10, 2, 0), (10, 2, 0)),                   # AF_INET6 SOCK_DGRAM
    ((2, 1, 6), (2, 1, 6)),                     # explicit IPPROTO_TCP
    ((2, 2, 17), (2, 2, 17)),                   # explicit IPPROTO_UDP
    ((2, 1 | NB | CX, 0), (2, 1 | NB | CX, 0)),  # flags are kept
    ((2, 1, 17), None),                         # stream with UDP: the kernel's EPROTONOSUPPORT
    ((2, 1, 132), None),                        # SCTP
    ((2, 3, 1), None),                          # raw ICMP
    ((2, 5, 0), None),                          # SOCK_SEQPACKET
    ((2, 1 | 0x100, 0), None),                  # unknown type flag
    ((1, 1, 0), None),                          # AF_UNIX is never trapped, but refused anyway
    ((2 | (1 << 32), 1 | (7 << 32), 0), (2, 1, 0)),   # upper register halves are ignored
])
def test_which_socket_calls_get_a_host_socket(args, want):
    assert notifiers.socket_request(*args) == want


@pytest.mark.parametrize("tid,fd,inode,udp", [
    (1, 0, 0, False), (4194304, 1048575, 0xFFFFFFFF, True), (123456, 3, 987654321, False),
    (2**31, 2**31, 2**31, True)])
def test_answers_pack_into_one_int_and_back(tid, fd, inode, udp):
    packed = notifiers.pack_answer(tid, fd, inode, udp)
    assert isinstance(packed, int)
    assert notifiers.unpack_answer(packed) == (tid, fd, inode, "udp" if udp else "tcp")


def test_inbox_wakes_the_loop_only_for_forwarded_notifications():
    box = notifiers.Inbox()
    try:
        poller = select.poll()
        poller.register(box.fileno(), select.POLLIN)
        box.answered(7, notifiers.pack_answer(100, 5, 1234, False))
        assert box.waiting()
        assert poller.poll(0) == []             # answered sockets wait for the next turn
        n = seccomp.Notification(1, 100, 0, seccomp.SYS_BIND, seccomp.AUDIT_ARCH_X86_64, 0,
                                 (3, 0, 16, 0, 0, 0))
        box.forward(7, n)
        assert poller.poll(0)                   # a forwarded one wakes the loop
        items = box.drain()
        assert items == [(7, notifiers.pack_answer(100, 5, 1234, False)), (7, n)]
        assert not box.waiting() and poller.poll(0) == []
        for i in range(100_000):                # a full pipe never blocks a thread
            box.forward(1, n)
        assert len(box.drain()) == 100_000
    finally:
        box.close()
    assert box.fileno() == -1


def test_notifier_thread_count_is_bounded(tmp_path):
    from sockgraft.agent.engine import Agent
    from sockgraft.agent.store import ConfigStore
    from sockgraft.errors import AgentError
    with pytest.raises(AgentError, match="0..16"):
        Agent(str(tmp_path / "a.sock"), ConfigStore(str(tmp_path)), notifier_threads=17)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(AgentError):
        Agent(str(tmp_path / "a.sock"), ConfigStore(str(tmp_path)), notifier_threads=-1)
    assert len(os.listdir("/proc/self/fd")) == fds


def test_native_mode_choice_and_its_words_when_the_module_is_missing(monkeypatch, caplog):
    from sockgraft.errors import AgentError
    monkeypatch.setattr(notifiers, "native", None)
    monkeypatch.setattr(notifiers, "NATIVE_ERROR", "No module named 'sockgraft._answer'")
    assert notifiers.choose_native("off") is False
    with pytest.raises(AgentError, match="--native on: the native answer loop is not built"):
        notifiers.choose_native("on")
    assert notifiers.choose_native("auto") is False
    assert "answered in Python: the native answer loop is not built" in caplog.text
    with pytest.raises(AgentError, match="native mode 'fast' unknown"):
        notifiers.choose_native("fast")


def test_the_native_loop_is_used_only_where_it_can_tag_like_python():
    """With kernel guards, a tagger that cannot name its map (a test double)
    keeps the Python path: an untagged host socket would escape the guards."""
    from sockgraft.kernel import sockets as ksock
    if notifiers.native is None:
        pytest.fail(f"the native answer loop is not built: {notifiers.NATIVE_ERROR}")
    assert notifiers.native_usable(ksock.HostSockets())
    assert not notifiers.native_usable(ksock.HostSockets(tag=lambda fd, mark, flags: None))

    class Progs:
        def tag(self, fd, mark, flags=0):
            pass

        def tag_params(self, mark):
            return 7, 3
    hs = ksock.HostSockets(tag=Progs().tag)
    assert notifiers.native_usable(hs) and hs.native_tag(0x53470001) == (7, 3)
    assert ksock.HostSockets().native_tag(1) == (-1, 0)
    assert ksock.HostSockets(tag=lambda fd, mark, flags: None).native_tag(1) is None


def test_the_native_loop_copies_the_one_option_list():
    """The native connect path takes kernel/sockets.py OPTIONS itself (no
    second list in C): every entry, families and types as bit masks."""
    import socket
    from sockgraft.kernel import sockets as ksock
    got = notifiers.native_options()
    assert len(got) == len(ksock.OPTIONS)
    for (level, opt, size, fams, types), (l2, o2, s2, fmask, tmask) in zip(ksock.OPTIONS, got):
        assert (level, opt, size) == (l2, o2, s2)
        assert fmask == (0 if fams is None else
                         (1 if socket.AF_INET in fams else 0) | (2 if socket.AF_INET6 in fams
                                                                 else 0))
        assert tmask == (0 if types is None else
                         (1 if socket.SOCK_STREAM in types else 0) |
                         (2 if socket.SOCK_DGRAM in types else 0))
    assert notifiers.native_options([(0, 1, 0, (socket.AF_INET,), (socket.SOCK_DGRAM,))]) == \
        [(0, 1, 0, 1, 2)]
