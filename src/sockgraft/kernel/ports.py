"""Containers' interfaces as this namespace sees them (the packet fast path's
inputs): the veths whose other end lives in another network namespace, which
namespace that is, and the MAC and addresses of the other end.

A thin adapter over pyroute2 (netlink). Must not: decide which interfaces
get programs or which container an interface belongs to (agent/fastpath.py
and model/fastpath.py do).
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import threading
from dataclasses import dataclass
from typing import Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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


def scan() -> tuple[list[Veth], list[int]]:
    """One link dump: the containers' interfaces, and the VXLAN devices'
    indexes (what vxlans() asks about).

    The containers' interfaces: every veth of this namespace that is a
    bridge port and whose peer is in another namespace (bridge, Docker's
    docker0, CNI's bridge plugin). An underlay veth with an address of its
    own is not a bridge port."""
    try:
        with IPRoute() as ipr:
            links = ipr.get_links()
    except (OSError, NetlinkError) as exc:
        raise from_oserror("link dump", exc, "links") from exc
    bridges = {link["index"]: _mac(link.get_attr("IFLA_ADDRESS")) for link in links
               if _kind(link) == "bridge"}
    veths = []
    for link in links:
        master = link.get_attr("IFLA_MASTER")
        if master not in bridges or _kind(link) != "veth":
            continue
        nsid = link.get_attr("IFLA_LINK_NETNSID")
        peer = link.get_attr("IFLA_LINK")
        if nsid is None or nsid < 0 or not peer:
            continue
        veths.append(Veth(link["index"], link.get_attr("IFLA_IFNAME"), nsid, peer,
                          bridges[master]))
    return veths, [link["index"] for link in links if _kind(link) == "vxlan"]


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
    """The VXLAN devices of this namespace (`indexes`: those scan() found when
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
