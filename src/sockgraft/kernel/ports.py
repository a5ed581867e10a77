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


def veths() -> list[Veth]:
    """Every veth of this namespace that is a bridge port and whose peer is
    in another namespace: the containers' interfaces (bridge, Docker's
    docker0, CNI's bridge plugin). An underlay veth with an address of its
    own is not a bridge port."""
    out = []
    try:
        with IPRoute() as ipr:
            links = ipr.get_links()
            bridges = {link["index"] for link in links
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
                out.append(Veth(link["index"], link.get_attr("IFLA_IFNAME"), nsid, peer))
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
