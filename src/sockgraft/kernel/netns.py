"""Network namespaces: create, delete, enter in a child, find the processes inside.

Owns the named namespaces under /run/netns (the `ip netns` convention, so
`ip netns list` and `nsenter --net=/run/netns/X` see them too). Creation and
deletion go through pyroute2's netns helpers; entering is done with setns(2)
only in a freshly forked child or right before exec, never in a long-lived
(possibly threaded) process: setns in a threaded process moves one thread only.

Must not: decide names (model/topology does) or configure links (kernel/links).
"""

from __future__ import annotations

import ctypes
import errno
import os
import pickle
import signal
import struct
import time
from typing import Any, Callable


from ..errors import KernelError, from_oserror

NETNS_RUN_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000

_libc = ctypes.CDLL(None, use_errno=True)
_libc.setns.argtypes = [ctypes.c_int, ctypes.c_int]


def path(name: str) -> str:
    return os.path.join(NETNS_RUN_DIR, name)


def exists(name: str) -> bool:
    return os.path.exists(path(name))


def list_names() -> list[str]:
    try:
        return sorted(os.listdir(NETNS_RUN_DIR))
    except FileNotFoundError:
        return []


def create(name: str) -> None:
    """Create a named namespace; EEXIST if one of that name exists."""
    if exists(name):
        raise KernelError("netns create", errno.EEXIST, name)
    try:
        from pyroute2 import netns as _pr_netns   # not at import: every CLI command loads this
        _pr_netns.create(name)
    except OSError as exc:
        raise from_oserror("netns create", exc, name) from exc


def delete(name: str) -> bool:
    """Delete a named namespace (idempotent). Returns True if it existed."""
    if not exists(name):
        return False
    try:
        from pyroute2 import netns as _pr_netns
        _pr_netns.remove(name)
    except OSError as exc:
        if exc.errno in (errno.ENOENT, errno.EINVAL):
            return False
        raise from_oserror("netns delete", exc, name) from exc
    return True


def inode(name_or_path: str) -> int:
    p = name_or_path if name_or_path.startswith("/") else path(name_or_path)
    return os.stat(p).st_ino


def pids(name: str) -> list[int]:
    """Processes whose network namespace is this one (like `ip netns pids`)."""
    try:
        target = inode(name)
    except FileNotFoundError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.stat(f"/proc/{entry}/ns/net").st_ino == target:
                found.append(int(entry))
        except OSError:
            continue
    return found


def kill_pids(name: str, timeout: float = 3.0) -> int:
    """SIGTERM then SIGKILL every process inside the namespace. Returns how many."""
    victims = [p for p in pids(name) if p != os.getpid()]
    for p in victims:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in victims):
        time.sleep(0.05)
    for p in victims:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return len(victims)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def enter(name_or_path: str) -> None:
    """setns(2) the calling thread into a namespace. Only for a child about to
    exec or exit, or a single-threaded short-lived command right before exec."""
    p = name_or_path if name_or_path.startswith("/") else path(name_or_path)
    fd = os.open(p, os.O_RDONLY | os.O_CLOEXEC)
    try:
        setns_fd(fd, p)
    finally:
        os.close(fd)


def setns_fd(fd: int, what: str) -> None:
    """setns(2) the calling thread into the network namespace open at fd
    (what: its name, for the error)."""
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        raise KernelError("setns", ctypes.get_errno(), what)


def run_in(name: str, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
    """Run fn(*args) in a forked child that entered the namespace; return its
    result (pickled back over a pipe) or re-raise its exception here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            os.close(r)
            try:
                enter(name)
                payload = pickle.dumps((True, fn(*args)))
            except BaseException as exc:  # noqa: BLE001 - shipped to the parent
                try:
                    payload = pickle.dumps((False, exc))
                except Exception:
                    payload = pickle.dumps((False, RuntimeError(repr(exc))))
            os.write(w, struct.pack("=Q", len(payload)))
            view = memoryview(payload)
            while view:
                view = view[os.write(w, view):]
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(w)
    try:
        data = _read_all(r, timeout)
    finally:
        os.close(r)
        _reap(pid, timeout)
    if len(data) < 8:
        raise KernelError("run_in netns", errno.ECHILD, f"{name}: child died")
    ok, value = pickle.loads(data[8:])
    if ok:
        return value
    raise value


def _read_all(fd: int, timeout: float) -> bytes:
    import select
    chunks = []
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise KernelError("run_in netns", errno.ETIMEDOUT)
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            return b"".join(chunks)
        chunks.append(chunk)


def _reap(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            return
        time.sleep(0.002)


def write_sysctls(name: str, values: dict[str, str]) -> None:
    """Set net.* sysctls inside a namespace (/proc/sys/net is per-netns of the
    task that opens it, hence the child)."""
    run_in(name, _write_sysctls, values)


def _write_sysctls(values: dict[str, str]) -> None:
    for key, val in values.items():
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(val)
