"""Small lookups the agent makes about target processes (/proc) and about
its own host (netlink, libc)."""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger("sockgraft.agent")


def socket_open(pid: int, fd: int, inode: int) -> bool:
    """Does fd in process pid still hold that socket (and not a reused number)?"""
    try:
        return os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]"
    except OSError:
        return False


def netns_of(pid: int) -> int | None:
    """The inode of a process's network namespace (None if it is gone)."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


def pids_in_netns(inodes: set[int], skip: int | None = None) -> dict[int, int]:
    """{pid: netns inode} of every process in one of these namespaces (a scan
    of /proc: for on-demand listings, not a hot path). skip: a pid left out."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) != skip:
            ino = netns_of(int(entry.name))
            if ino in inodes:
                out[int(entry.name)] = ino
    return out


def socket_fds(pid: int) -> dict[int, int]:
    """{fd: socket inode} of a process's sockets."""
    out = {}
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return out
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            out[int(fd)] = int(link[8:-1])
    return out


def tgid(tid: int) -> int:
    """The process (thread group) a thread id belongs to; tid itself if gone."""
    value = _status_field(tid, b"Tgid:")
    return int(value) if value is not None else tid


def host_addresses() -> frozenset:
    """Addresses of the namespace the agent serves (refreshed on reload):
    one netlink dump, no subprocess."""
    import ipaddress
    from pyroute2 import IPRoute
    try:
        with IPRoute() as ipr:
            return frozenset(ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
                             for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS"))
    except (OSError, ValueError) as exc:
        log.warning("cannot list host addresses: %s", exc)
        return frozenset()


def host_reserved_ports() -> tuple[tuple[int, int], ...]:
    """The ports of this host's network namespace that its own services keep:
    below net.ipv4.ip_unprivileged_port_start (sshd, DNS, ...) and those in
    net.ipv4.ip_local_reserved_ports (where an operator lists its services'
    ports). A socket-mode container's private loopback is a host address: a
    bind there takes the port from a host service's later wildcard bind."""
    def read(name: str) -> str:
        try:
            with open(f"/proc/sys/net/ipv4/{name}") as f:
                return f.read()
        except OSError:
            return ""
    return kept_ports(read("ip_unprivileged_port_start"), read("ip_local_reserved_ports"))


def kept_ports(unprivileged_start: str, reserved: str) -> tuple[tuple[int, int], ...]:
    """The two sysctls' text as port ranges (a start that does not parse is
    the kernel's default, 1024; reserved: "8080,30000-32767")."""
    out = []
    try:
        start = int(unprivileged_start.strip() or 1024)
    except ValueError:
        start = 1024
    if start > 1:
        out.append((1, min(start, 65536) - 1))
    for part in reserved.split(","):
        lo, _, hi = part.strip().partition("-")
        try:
            lo_n, hi_n = int(lo), int(hi or lo)
        except ValueError:
            continue
        if 0 < lo_n <= hi_n <= 65535:
            out.append((lo_n, hi_n))
    return tuple(out)


def malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def caps_effective(tid: int) -> int | None:
    """A thread's effective capability bits (CapEff in /proc/TID/status;
    None if it is gone or unreadable)."""
    value = _status_field(tid, b"CapEff:")
    return int(value, 16) if value is not None else None


def _status_field(tid: int, name: bytes) -> bytes | None:
    """The value of one field of /proc/TID/status (None: gone, unreadable,
    or no such field)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            for line in f:
                if line.startswith(name):
                    parts = line.split()
                    return parts[1] if len(parts) > 1 else None
    except OSError:
        return None
    return None
