"""Containers' interfaces as this namespace sees them (the packet fast path's
inputs): the veths whose other end lives in another network namespace, which
namespace that is, and the MAC and addresses of the other end.

A thin adapter over pyroute2 (netlink). Must not: decide which interfaces
get programs or which container an interface belongs to (agent/fastpath.py
and model/fastpath.py do).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Iterable

from pyroute2 import IPRoute, NetNS
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import from_oserror

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

def veths() -> list[Veth]:
    """Every veth of this namespace that is a bridge port and whose peer is
    in another namespace: the containers' interfaces (bridge, Docker's
    docker0, CNI's bridge plugin). An underlay veth with an address of its
    own is not a bridge port."""
    out = []
    try:
        with IPRoute() as ipr:
            links = ipr.get_links()
            bridges = {link["index"]: _mac(link.get_attr("IFLA_ADDRESS")) for link in links
                       if (info := link.get_attr("IFLA_LINKINFO")) is not None
                       and info.get_attr("IFLA_INFO_KIND") == "bridge"}
            for link in links:
                if link.get_attr("IFLA_MASTER") not in bridges:
                    continue
                info = link.get_attr("IFLA_LINKINFO")
                if info is None or info.get_attr("IFLA_INFO_KIND") != "veth":
                    continue
                nsid = link.get_attr("IFLA_LINK_NETNSID")
                peer = link.get_attr("IFLA_LINK")
                if nsid is None or nsid < 0 or not peer:
                    continue
                out.append(Veth(link["index"], link.get_attr("IFLA_IFNAME"), nsid, peer,
                                bridges[link.get_attr("IFLA_MASTER")]))
    except (OSError, NetlinkError) as exc:
        raise from_oserror("link dump", exc, "veths") from exc
    return out


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


def peer_facts(netns_path: str, ifindex: int) -> tuple[bytes, tuple]:
    """(MAC, global addresses) of interface `ifindex` in the namespace at
    netns_path. Link-local and tentative addresses are left out."""
    try:
        ns = NetNS(netns_path)
    except (OSError, NetlinkError) as exc:
        raise from_oserror("netlink open", exc, netns_path) from exc
    try:
        links = ns.get_links(ifindex)
        if not links:
            return b"", ()
        mac = links[0].get_attr("IFLA_ADDRESS") or ""
        addrs = []
        for a in ns.get_addr(index=ifindex):
            if a["scope"] != RT_SCOPE_UNIVERSE or a["flags"] & 0x40:    # IFA_F_TENTATIVE
                continue
            text = a.get_attr("IFA_ADDRESS")
            if text:
                addrs.append(ipaddress.ip_address(text))
        return bytes.fromhex(mac.replace(":", "")), tuple(addrs)
    except (OSError, NetlinkError) as exc:
        raise from_oserror("address dump", exc, netns_path) from exc
    finally:
        ns.close()


def ifindexes() -> set[int]:
    """The interface indexes of this namespace now."""
    try:
        with IPRoute() as ipr:
            return {link["index"] for link in ipr.get_links()}
    except (OSError, NetlinkError) as exc:
        raise from_oserror("link dump", exc, "ifindexes") from exc


def vxlans() -> list[Vxlan]:
    """The VXLAN devices of this namespace with their routes, neighbours and
    FDB entries, and how each remote VTEP is reached on the underlay (the
    next hop's MAC only once the kernel resolved it)."""
    out = []
    try:
        with IPRoute() as ipr:
            links = ipr.get_links()
            macs = {link["index"]: _mac(link.get_attr("IFLA_ADDRESS")) for link in links}
            for link in links:
                info = link.get_attr("IFLA_LINKINFO")
                if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
                    continue
                data = info.get_attr("IFLA_INFO_DATA")
                idx = link["index"]
                routes = []
                for fam in (2, 10):
                    for r in ipr.get_routes(family=fam, oif=idx, table=254):
                        gw = r.get_attr("RTA_GATEWAY")
                        dst = r.get_attr("RTA_DST")
                        if dst is None or gw is None:
                            continue
                        routes.append((f"{dst}/{r['dst_len']}", gw))
                neigh = tuple((n.get_attr("NDA_DST"), _mac(n.get_attr("NDA_LLADDR")))
                              for fam in (2, 10)
                              for n in ipr.get_neighbours(family=fam, ifindex=idx)
                              if n["state"] & NUD_USABLE and n.get_attr("NDA_LLADDR"))
                fdb = tuple((_mac(n.get_attr("NDA_LLADDR")), n.get_attr("NDA_DST"))
                            for n in ipr.fdb("dump", ifindex=idx)
                            if n["ifindex"] == idx and n.get_attr("NDA_DST"))
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
                            hops.append((remote, oif, _mac(n.get_attr("NDA_LLADDR")),
                                         macs.get(oif, b"")))
                            break
                out.append(Vxlan(idx, link.get_attr("IFLA_IFNAME"),
                                 data.get_attr("IFLA_VXLAN_ID") or 0,
                                 data.get_attr("IFLA_VXLAN_PORT") or 4789,
                                 data.get_attr("IFLA_VXLAN_LOCAL") or "",
                                 data.get_attr("IFLA_VXLAN_LINK") or 0, macs[idx],
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
