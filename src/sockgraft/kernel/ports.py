"""Containers' interfaces as this namespace sees them (the packet fast path's
inputs): the veths whose other end lives in another network namespace, which
namespace that is, and the MAC and addresses of the other end.

A thin adapter over pyroute2 (netlink). Must not: decide which interfaces
get programs or which container an interface belongs to (agent/fastpath.py
and model/fastpath.py do).
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import subprocess
import threading
from dataclasses import dataclass
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.marshal import MarshalRtnl

from ..errors import KernelError, from_oserror
from . import netns

RT_SCOPE_UNIVERSE = 0


@dataclass(frozen=True)
class Veth:
    ifindex: int            # the host-side end, in this namespace
    ifname: str
    nsid: int               # the namespace of the other end, as this one numbers it
    peer_ifindex: int       # the other end's index in its namespace
    bridge_mac: bytes = b""  # the bridge it is a port of


NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80   # REACHABLE STALE DELAY PROBE PERMANENT


@dataclass(frozen=True)
class Vxlan:
    """One VXLAN device of this namespace and what its tables say."""
    ifindex: int
    ifname: str
    vni: int
    dport: int
    local: str                      # this host's VTEP address ("" = none set)
    underlay: int                   # IFLA_VXLAN_LINK
    mac: bytes
    routes: tuple                   # ((network text, gateway text or ""), ...)
    neighbours: tuple               # ((ip text, mac bytes), ...) on the device
    fdb: tuple                      # ((mac bytes, remote ip text), ...)
    next_hops: tuple                # ((remote ip, oif, next-hop mac, oif mac), ...)
    mtu: int = 1450


def _mac(text: str | None) -> bytes:
    return bytes.fromhex(text.replace(":", "")) if text else b""


def _kind(link) -> str | None:
    """A link message's IFLA_INFO_KIND (veth, bridge, vxlan...), or None."""
    info = link.get_attr("IFLA_LINKINFO")
    return None if info is None else info.get_attr("IFLA_INFO_KIND")


@dataclass(frozen=True)
class Link:
    """What the fast path needs of one link message - a dump's or a netlink
    event's (the kernel sends the whole link in both)."""
    ifindex: int
    ifname: str
    kind: str | None            # IFLA_INFO_KIND: veth, bridge, vxlan... or None
    master: int | None          # IFLA_MASTER: the bridge it is a port of
    nsid: int | None            # IFLA_LINK_NETNSID: the peer's namespace
    peer: int | None            # IFLA_LINK: the peer's index there
    mac: bytes


AF_UNSPEC = 0


def link_of(msg) -> Link | None:
    """A link message as a Link; None for one that is not about a link of
    this namespace as such (AF_BRIDGE port messages: the same change comes
    as an AF_UNSPEC message too)."""
    if msg["family"] != AF_UNSPEC:
        return None
    return Link(msg["index"], msg.get_attr("IFLA_IFNAME") or "", _kind(msg),
                msg.get_attr("IFLA_MASTER"), msg.get_attr("IFLA_LINK_NETNSID"),
                msg.get_attr("IFLA_LINK"), _mac(msg.get_attr("IFLA_ADDRESS")))


def dump_links() -> dict[int, Link]:
    """One link dump of this namespace: ifindex -> Link (~0.1-0.2 s with 200
    containers: pyroute2 parses every attribute; the fast path keeps the
    table up to date from link events instead of dumping again)."""
    try:
        with IPRoute() as ipr:
            links = ipr.get_links()
    except (OSError, NetlinkError) as exc:
        raise from_oserror("link dump", exc, "links") from exc
    return {link.ifindex: link for link in map(link_of, links) if link is not None}


def veths_of(links: Iterable[Link]) -> tuple[list[Veth], list[int]]:
    """The containers' interfaces, and the VXLAN devices' indexes (what
    vxlans() asks about), among a namespace's links.

    The containers' interfaces: every veth of this namespace that is a
    bridge port and whose peer is in another namespace (bridge, Docker's
    docker0, CNI's bridge plugin). An underlay veth with an address of its
    own is not a bridge port."""
    links = sorted(links, key=lambda link: link.ifindex)
    bridges = {link.ifindex: link.mac for link in links if link.kind == "bridge"}
    veths = [Veth(link.ifindex, link.ifname, link.nsid, link.peer, bridges[link.master])
             for link in links
             if link.kind == "veth" and link.master in bridges and link.nsid is not None
             and link.nsid >= 0 and link.peer]
    return veths, [link.ifindex for link in links if link.kind == "vxlan"]


class Events:
    """This namespace's rtnetlink notifications of `groups` (RTMGRP_* bits),
    read without blocking until none is left. A socket of our own, parsed
    by pyroute2's marshal: IPRoute.get() hands out one datagram per call
    and keeps what else it read in a queue that epoll cannot see."""

    NETLINK_ROUTE = 0

    def __init__(self, groups: int, rcvbuf: int = 4 << 20) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_NONBLOCK
                                  | socket.SOCK_CLOEXEC, self.NETLINK_ROUTE)
        try:
            try:    # a node starting many containers sends bursts
                self.sock.setsockopt(socket.SOL_SOCKET, 33, rcvbuf)   # SO_RCVBUFFORCE
            except OSError:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
            self.sock.bind((0, groups))
        except OSError:
            self.sock.close()
            raise
        self.marshal = MarshalRtnl()

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self) -> tuple[list, bool]:
        """(the messages queued, whether some were lost: the socket overflowed)."""
        msgs: list = []
        lost = False
        while True:
            try:
                data = self.sock.recv(1 << 17)
            except BlockingIOError:
                return msgs, lost
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    lost = True
                    continue
                raise from_oserror("netlink events", exc, "rtnetlink") from exc
            msgs.extend(self.marshal.parse(data))

    def close(self) -> None:
        self.sock.close()


def netns_ids(paths: Iterable[str]) -> dict[int, str]:
    """nsid -> path for the namespace files given (bind mounts such as
    /run/netns/NAME, or /proc/PID/ns/net) that this namespace has an id for.
    Unreadable or vanished files are skipped."""
    out: dict[int, str] = {}
    seen: set[tuple[int, int]] = set()
    with IPRoute() as ipr:
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                got = ipr.get_netnsid(fd=fd)
            except (OSError, NetlinkError):
                continue
            finally:
                os.close(fd)
            nsid = got.get("nsid") if isinstance(got, dict) else None
            if isinstance(nsid, int) and nsid >= 0:
                out.setdefault(nsid, path)
    return out


def named_netns(run_dir: str = "/run/netns") -> list[str]:
    try:
        return [os.path.join(run_dir, n) for n in sorted(os.listdir(run_dir))]
    except OSError:
        return []


def process_netns() -> list[str]:
    """/proc/PID/ns/net of every process (the namespaces of containers that
    have no name: Docker's, runc's without CNI)."""
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            out.append(f"/proc/{pid}/ns/net")
    return out


def _facts_here(ifindex: int) -> tuple[bytes, tuple]:
    with IPRoute() as ipr:
        links = ipr.get_links(ifindex)
        if not links:
            return b"", ()
        mac = links[0].get_attr("IFLA_ADDRESS") or ""
        addrs = []
        for a in ipr.get_addr(index=ifindex):
            if a["scope"] != RT_SCOPE_UNIVERSE or a["flags"] & 0x40:    # IFA_F_TENTATIVE
                continue
            text = a.get_attr("IFA_ADDRESS")
            if text:
                addrs.append(ipaddress.ip_address(text))
        return _mac(mac), tuple(addrs)


def link_locals(ifindexes: Iterable[int]) -> list[ipaddress.IPv6Address]:
    """The IPv6 link-local addresses of these interfaces of this namespace
    (the bridges: the containers' gateway on the link), tentative ones too."""
    out = []
    with IPRoute() as ipr:
        for ifindex in ifindexes:
            try:
                for a in ipr.get_addr(family=socket.AF_INET6, index=ifindex):
                    text = a.get_attr("IFA_ADDRESS")
                    if text and ipaddress.ip_address(text).is_link_local:
                        out.append(ipaddress.ip_address(text))
            except NetlinkError:
                continue            # gone meanwhile
    return out


def peers_facts(wanted: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[bytes, tuple]]:
    """(MAC, global addresses) of interface ifindex in the namespace at each
    netns path (link-local and tentative addresses left out). One helper
    thread enters each namespace in turn (setns on itself only) and asks
    there - about 2 ms a namespace, where a pyroute2 NetNS (a process each)
    takes 15-40. Namespaces that cannot be entered or asked are left out."""
    out: dict[tuple[str, int], tuple[bytes, tuple]] = {}

    def work() -> None:
        home = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        try:
            for path, ifindex in wanted:
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except OSError:
                    continue
                try:
                    netns.setns_fd(fd, path)
                    try:
                        out[(path, ifindex)] = _facts_here(ifindex)
                    except (OSError, NetlinkError):
                        pass
                except KernelError:
                    continue
                finally:
                    os.close(fd)
                    netns.setns_fd(home, "home")
        finally:
            os.close(home)

    t = threading.Thread(target=work, name="sockgraft-ports")
    t.start()
    t.join()
    return out


def _fdb(ifname: str) -> tuple:
    """((mac, remote address), ...) of a VXLAN device's FDB, from `bridge -j
    fdb show dev` (the kernel filters by device there; a netlink dump
    through pyroute2 parses every bridge port's entries: 60 ms with 200
    containers)."""
    try:
        p = subprocess.run(["bridge", "-j", "fdb", "show", "dev", ifname], capture_output=True,
                           text=True, timeout=10)
        rows = json.loads(p.stdout or "[]") if p.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return ()
    return tuple((_mac(r["mac"]), r["dst"]) for r in rows
                 if isinstance(r, dict) and r.get("dst") and r.get("mac"))


def _ip_json(*args: str) -> list:
    try:
        p = subprocess.run(["ip", "-j", *args], capture_output=True, text=True, timeout=10)
        out = json.loads(p.stdout or "[]") if p.returncode == 0 else []
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return []
    return [r for r in out if isinstance(r, dict)]


def _routes(ifname: str) -> tuple:
    """((destination prefix, gateway), ...) of the main table's routes via a
    device, from `ip -j route show dev` (the kernel filters by device; a
    pyroute2 dump parses every route of the node: 150 ms for IPv6 with 200
    containers' link-local routes)."""
    out = []
    for fam in ("-4", "-6"):
        for r in _ip_json(fam, "route", "show", "dev", ifname, "table", "main"):
            dst, gw = r.get("dst"), r.get("gateway")
            if not dst or not gw or dst == "default":
                continue
            if "/" not in dst:
                dst += "/32" if fam == "-4" else "/128"
            out.append((dst, gw))
    return tuple(out)


def vxlans(indexes: list[int]) -> list[Vxlan]:
    """The VXLAN devices of this namespace (`indexes`: those veths_of() found when
    the links last changed) with their routes, neighbours and FDB entries,
    and how each remote VTEP is reached on the underlay (the next hop's MAC
    only once the kernel resolved it). Only requests about those devices:
    cheap however many containers the node has."""
    out = []
    try:
        with IPRoute() as ipr:
            for idx in indexes:
                try:
                    (link,) = ipr.get_links(idx)
                except (NetlinkError, ValueError):
                    continue            # gone since
                if _kind(link) != "vxlan":
                    continue
                data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
                routes = _routes(link.get_attr("IFLA_IFNAME"))
                neigh = tuple((n.get_attr("NDA_DST"), _mac(n.get_attr("NDA_LLADDR")))
                              for fam in (2, 10)
                              for n in ipr.get_neighbours(family=fam, ifindex=idx)
                              if n["state"] & NUD_USABLE and n.get_attr("NDA_LLADDR"))
                fdb = _fdb(link.get_attr("IFLA_IFNAME"))
                hops = []
                for _mac_, remote in fdb:
                    try:
                        got = ipr.route("get", dst=remote)
                    except NetlinkError:
                        continue
                    if not got:
                        continue
                    oif = got[0].get_attr("RTA_OIF")
                    via = got[0].get_attr("RTA_GATEWAY") or remote
                    for n in ipr.get_neighbours(family=2, ifindex=oif, dst=via):
                        if n["state"] & NUD_USABLE and n.get_attr("NDA_LLADDR"):
                            (olink,) = ipr.get_links(oif)
                            hops.append((remote, oif, _mac(n.get_attr("NDA_LLADDR")),
                                         _mac(olink.get_attr("IFLA_ADDRESS"))))
                            break
                out.append(Vxlan(idx, link.get_attr("IFLA_IFNAME"),
                                 data.get_attr("IFLA_VXLAN_ID") or 0,
                                 data.get_attr("IFLA_VXLAN_PORT") or 4789,
                                 data.get_attr("IFLA_VXLAN_LOCAL") or "",
                                 data.get_attr("IFLA_VXLAN_LINK") or 0,
                                 _mac(link.get_attr("IFLA_ADDRESS")),
                                 tuple(routes), neigh, fdb, tuple(hops),
                                 link.get_attr("IFLA_MTU") or 1450))
    except (OSError, NetlinkError) as exc:
        raise from_oserror("overlay dump", exc, "vxlan") from exc
    return out


def local_port_range() -> tuple[int, int]:
    """net.ipv4.ip_local_port_range: the VXLAN device's outer source ports."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            lo, hi = (int(v) for v in f.read().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999
