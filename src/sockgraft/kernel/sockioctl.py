"""The kernel side of answering a container's socket ioctls
(model/ioctl.py decides which, agent/ioctls.py answers): a socket's network
namespace, a socket made in another namespace, one ioctl with a buffer,
SIOCGIFCONF, and writing the answer into the caller's memory.

Must not: decide which commands run, or for whom.
Errors: OSError from the kernel is translated into `sockgraft.errors`; the
ioctl itself returns its errno (the caller's answer), it does not raise."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import threading

from ..errors import KernelError, NotificationGone, from_oserror
from . import netns

SIOCGSKNS = 0x894C

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p]
_libc.ioctl.restype = ctypes.c_int
_libc.syscall.restype = ctypes.c_long


class _Ifconf(ctypes.Structure):
    _fields_ = [("ifc_len", ctypes.c_int), ("ifc_buf", ctypes.c_void_p)]


def _inode_of_returned_fd(fd: int, request: int, op: str) -> int:
    """The inode of the namespace whose fd ioctl(fd, request) returns (the
    returned fd closed again)."""
    try:
        got = fcntl.ioctl(fd, request)
    except OSError as exc:
        raise from_oserror(op, exc) from None
    try:
        return os.fstat(got).st_ino
    finally:
        os.close(got)


def netns_inode(fd: int) -> int:
    """The inode of the network namespace a socket belongs to (SIOCGSKNS:
    the agent has CAP_NET_ADMIN over every namespace it serves)."""
    return _inode_of_returned_fd(fd, SIOCGSKNS, "SIOCGSKNS")


NS_GET_USERNS = 0xB701


def userns_owner(nsfd: int) -> int:
    """The inode of the user namespace that owns the namespace open at nsfd."""
    return _inode_of_returned_fd(nsfd, NS_GET_USERNS, "NS_GET_USERNS")


_LINUX_CAPABILITY_VERSION_3 = 0x20080522
_SYS_CAPGET, _SYS_CAPSET = 125, 126


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


def _capcall(nr: int, data) -> None:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    if _libc.syscall(nr, ctypes.byref(hdr), data) != 0:
        raise KernelError("capget" if nr == _SYS_CAPGET else "capset", ctypes.get_errno(),
                          "this thread")


@contextlib.contextmanager
def effective_caps(caps: int):
    """Within: the calling thread's effective capabilities are `caps` (and
    what it holds of them), so the kernel's checks in an ioctl - dev_load()'s
    module loading by interface name among them - judge the container's
    capabilities, not the agent's. Capabilities are per thread; the
    permitted set is kept, and the effective set is put back on the way out
    (also when the body raises)."""
    data = (_CapData * 2)()
    _capcall(_SYS_CAPGET, data)
    saved = [(d.effective, d.permitted, d.inheritable) for d in data]
    low = (_CapData * 2)()
    for i in (0, 1):
        low[i].effective = caps >> (32 * i) & saved[i][1]
        low[i].permitted, low[i].inheritable = saved[i][1], saved[i][2]
    try:
        _capcall(_SYS_CAPSET, low)
        yield
    finally:
        back = (_CapData * 2)()
        for i in (0, 1):
            back[i].effective, back[i].permitted, back[i].inheritable = saved[i]
        _capcall(_SYS_CAPSET, back)


def socket_in(nsfd: int, family: int, what: str) -> socket.socket:
    """A datagram socket of `family` in the network namespace open at nsfd,
    made by a short-lived thread that enters it (setns moves that thread
    only, and it ends there: no agent thread is left in a container's
    namespace). Raises KernelError (EAFNOSUPPORT: no such family there)."""
    out: list = []

    def work() -> None:
        try:
            netns.setns_fd(nsfd, what)
            out.append(socket.socket(family, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC))
        except KernelError as exc:
            out.append(exc)
        except OSError as exc:
            out.append(from_oserror("socket", exc, what))

    t = threading.Thread(target=work, name="sockgraft-nssock")
    t.start()
    t.join()
    got = out[0] if out else KernelError("socket", errno.EIO, what)
    if isinstance(got, Exception):
        raise got
    return got


def run(fd: int, cmd: int, buf: bytearray) -> int:
    """ioctl(fd, cmd, buf) in place; 0 or the errno the kernel answered."""
    try:
        fcntl.ioctl(fd, cmd, buf, True)
    except OSError as exc:
        return exc.errno or errno.EIO
    return 0


def ifconf(fd: int, length: int, want_records: bool) -> tuple[int, int, bytes]:
    """SIOCGIFCONF on fd: (errno, ifc_len, records). want_records False:
    the kernel's "how many bytes" form (a NULL buffer)."""
    buf = ctypes.create_string_buffer(max(length, 1))
    ifc = _Ifconf(length if want_records else 0, ctypes.addressof(buf) if want_records else None)
    if _libc.ioctl(fd, 0x8912, ctypes.byref(ifc)) != 0:
        return ctypes.get_errno() or errno.EIO, 0, b""
    n = max(0, min(ifc.ifc_len, length)) if want_records else 0
    return 0, ifc.ifc_len, buf.raw[:n]


def write_target(tid: int, addr: int, data: bytes, still_trapped) -> None:
    """Write data at addr in tid's memory, the answer to the call it is
    trapped in. The mem fd is opened first and `still_trapped()` (id_valid)
    asked after: a valid notification proves the task behind tid was the
    caller when the fd pinned its memory (a tid freed by a killed caller and
    reused must not be written to). Raises NotificationGone (not waiting
    any more), KernelError EFAULT (not writable)."""
    if not data:
        return
    try:
        fd = os.open(f"/proc/{tid}/mem", os.O_WRONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror("open /proc/TID/mem", exc, f"tid {tid}") from None
    try:
        if not still_trapped():
            raise NotificationGone("write target memory", errno.ENOENT, f"tid {tid}")
        try:
            n = os.pwrite(fd, data, addr)
        except OSError as exc:
            if exc.errno in (errno.EIO, errno.EFAULT):
                raise KernelError("write target memory", errno.EFAULT,
                                  f"tid {tid} addr {addr:#x}") from None
            raise from_oserror("write target memory", exc, f"tid {tid}") from None
        if n != len(data):
            raise KernelError("write target memory", errno.EFAULT,
                              f"tid {tid} addr {addr:#x}: {n} of {len(data)} bytes")
    finally:
        os.close(fd)
