"""kernel/sockioctl.py and agent/ioctls.py against the real kernel: a
container's socket ioctl runs with only the capabilities it was given (the
kernel's checks - and its module loading by interface name - judge the
caller, not the agent), and the agent's thread gets its own back; a socket
made in another namespace stays there and leaves the agent's thread where
it was; the O_PATH fd of a socket inode is no socket."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading

import pytest

from sockgraft.agent.targets import Targets
from sockgraft.kernel import sockioctl

pytestmark = pytest.mark.priv

NET_ADMIN = 1 << 12


def _capeff() -> int:
    with open("/proc/thread-self/status") as f:
        return next(int(line.split()[1], 16) for line in f if line.startswith("CapEff:"))


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def scratch_ns():
    name = f"sg-ioctl-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "-n", name, "link", "add", "sgx0", "type", "veth", "peer",
                        "name", "sgx1"], check=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            yield name, fd
        finally:
            os.close(fd)
    finally:
        subprocess.run(["ip", "netns", "del", name], check=True)


@pytest.mark.parametrize("caps", [0, NET_ADMIN])
def test_the_ioctl_runs_with_only_the_callers_capabilities(caps):
    before, fds = _capeff(), _fds()
    assert before & NET_ADMIN and before & 1 << 16          # the agent's: NET_ADMIN, SYS_MODULE
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        with sockioctl.effective_caps(caps):
            assert _capeff() == caps
            # what the kernel then says to a set: EPERM without NET_ADMIN
            mtu = bytearray(b"lo".ljust(16, b"\0") + (65536).to_bytes(4, "little") + bytes(20))
            assert sockioctl.run(s.fileno(), 0x8922, mtu) == (0 if caps else errno.EPERM)
        assert _capeff() == before
        with pytest.raises(RuntimeError):
            with sockioctl.effective_caps(0):
                raise RuntimeError("the body fails")
    assert _capeff() == before and _fds() == fds            # put back, also after a raise


def test_a_socket_made_in_another_namespace_stays_there(scratch_ns):
    name, nsfd = scratch_ns
    home = os.stat("/proc/thread-self/ns/net").st_ino
    fds = _fds()
    req = bytearray(b"sgx0".ljust(16, b"\0") + bytes(24))
    with sockioctl.socket_in(nsfd, socket.AF_INET, name) as s:
        assert sockioctl.netns_inode(s.fileno()) == os.fstat(nsfd).st_ino != home
        with sockioctl.effective_caps(0):
            assert sockioctl.run(s.fileno(), 0x8933, req) == 0      # SIOCGIFINDEX there
    # here (the agent's namespace) sgx0 does not exist
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert sockioctl.netns_inode(s.fileno()) == home
        assert sockioctl.run(s.fileno(), 0x8933, req) == errno.ENODEV
    assert os.stat("/proc/thread-self/ns/net").st_ino == home and _fds() == fds


def test_an_o_path_fd_of_a_socket_is_no_socket(tmp_path):
    """What ioctls.answer copies a target's fd with (Targets.dup_socket):
    an O_PATH fd of a socket inode is ENOTSOCK (answered ENOTTY), and the
    copy does not leak."""
    targets = Targets()
    tid = threading.get_native_id()
    path = str(tmp_path / "s")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.bind(path)
            fd = os.open(path, os.O_PATH)
            try:
                targets.pidfd(tid)
                fds = _fds()
                for _ in range(20):
                    assert targets.dup_socket(tid, fd) == errno.ENOTSOCK
                assert _fds() == fds                                # nothing leaked
                with targets.dup_socket(tid, s.fileno()) as copy:
                    assert copy.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN) == \
                        socket.AF_UNIX
            finally:
                os.close(fd)
    finally:
        targets.close()
