"""Links, addresses, routes, neighbours and FDB entries via pyroute2 (netlink).

A thin adapter: every function takes an open pyroute2 handle bound to one
namespace (`open_ns`) and does one netlink thing. Errors are translated into
the sockgraft tree here. Must not: choose names or addresses (model/topology).
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from typing import Iterator

from pyroute2 import NetNS
from pyroute2.netlink.exceptions import NetlinkError

from ..errors import from_oserror

NUD_PERMANENT = 0x80
RTNH_F_ONLINK = 4


@contextlib.contextmanager
def open_ns(netns: str) -> Iterator[NetNS]:
    try:
        handle = NetNS(netns)
    except (OSError, NetlinkError) as exc:
        raise from_oserror("netlink open", exc, netns) from exc
    try:
        yield handle
    finally:
        handle.close()


def _call(op: str, detail: str, fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except (OSError, NetlinkError) as exc:
        raise from_oserror(op, exc, detail) from exc


def index(ns: NetNS, ifname: str) -> int:
    found = _call("link lookup", ifname, ns.link_lookup, ifname=ifname)
    if not found:
        from ..errors import NotFound
        import errno
        raise NotFound("link lookup", errno.ENODEV, ifname)
    return found[0]


def set_up(ns: NetNS, ifname: str, mtu: int | None = None) -> None:
    kw = {"state": "up"}
    if mtu:
        kw["mtu"] = mtu
    _call("link set up", ifname, ns.link, "set", index=index(ns, ifname), **kw)


def add_bridge(ns: NetNS, ifname: str, mtu: int | None = None) -> None:
    _call("bridge add", ifname, ns.link, "add", ifname=ifname, kind="bridge")
    set_up(ns, ifname, mtu)


def add_veth(ns: NetNS, ifname: str, peer: str, peer_netns: str, mtu: int | None = None) -> None:
    """Create a veth pair whose peer end is created directly in another namespace."""
    _call("veth add", f"{ifname}<->{peer_netns}/{peer}", ns.link, "add", ifname=ifname,
          kind="veth", peer={"ifname": peer, "net_ns_fd": peer_netns})
    if mtu:
        _call("link set mtu", ifname, ns.link, "set", index=index(ns, ifname), mtu=mtu)


def add_vxlan(ns: NetNS, ifname: str, vni: int, local: str, port: int, dev: str,
              mac: str, mtu: int) -> None:
    _call("vxlan add", ifname, ns.link, "add", ifname=ifname, kind="vxlan",
          vxlan_id=vni, vxlan_local=local, vxlan_port=port, vxlan_learning=0,
          vxlan_link=index(ns, dev), address=mac)
    set_up(ns, ifname, mtu)


def enslave(ns: NetNS, ifname: str, master: str) -> None:
    _call("link set master", f"{ifname}->{master}", ns.link, "set",
          index=index(ns, ifname), master=index(ns, master))


def add_addr(ns: NetNS, ifname: str, iface: ipaddress.IPv4Interface | ipaddress.IPv6Interface,
             ) -> None:
    kw = {}
    if iface.version == 6:
        kw["flags"] = 0x02  # IFA_F_NODAD: no duplicate address detection delay in the lab
    _call("addr add", f"{ifname} {iface}", ns.addr, "add", index=index(ns, ifname),
          address=str(iface.ip), prefixlen=iface.network.prefixlen, **kw)


def add_route(ns: NetNS, dst: str, gateway: str | None = None, dev: str | None = None,
              onlink: bool = False) -> None:
    kw: dict = {"dst": dst}
    if gateway:
        kw["gateway"] = gateway
    if dev:
        kw["oif"] = index(ns, dev)
    if onlink:
        kw["flags"] = RTNH_F_ONLINK
    _call("route add", f"{dst} via {gateway} dev {dev}", ns.route, "add", **kw)


def add_neigh(ns: NetNS, dev: str, ip: str, mac: str) -> None:
    _call("neigh add", f"{ip} {mac} dev {dev}", ns.neigh, "add", dst=ip, lladdr=mac,
          ifindex=index(ns, dev), state=NUD_PERMANENT)


def add_fdb(ns: NetNS, dev: str, mac: str, dst: str) -> None:
    _call("fdb append", f"{mac} dst {dst} dev {dev}", ns.fdb, "append",
          ifindex=index(ns, dev), lladdr=mac, dst=dst)


def counters(ns: NetNS) -> dict[str, dict[str, int]]:
    """Byte/packet counters per interface name."""
    out = {}
    for link in _call("link dump", "", ns.get_links):
        stats = link.get("IFLA_STATS64") or {}
        out[link.get("ifname")] = {k: stats.get(k, 0) for k in
                                   ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets")}
    return out


def addresses(ns: NetNS) -> list[tuple[str, str]]:
    idx = {link["index"]: link.get("ifname") for link in _call("link dump", "", ns.get_links)}
    return [(idx.get(a["index"], "?"), f"{a.get('address')}/{a['prefixlen']}")
            for a in _call("addr dump", "", ns.get_addr)]


def _addresses_here(keep, **match) -> list:
    """The addresses of the calling thread's namespace that `keep` accepts
    (one netlink dump; match: pyroute2 filters such as index=)."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        raw = [a.get("address") for a in _call("addr dump", str(match), ipr.get_addr, **match)]
    out = []
    for a in raw:
        try:
            ip = ipaddress.ip_address(a)
        except (TypeError, ValueError):
            continue
        if keep(ip):
            out.append(ip)
    return out


def bridges_toward(addrs) -> list[str]:
    """The bridges of the calling thread's namespace that its routes to
    `addrs` (containers' addresses) leave through, sorted by name: where
    those containers' packets come in. Addresses without a route, or routed
    elsewhere (a VXLAN device, a veth without a bridge, the bridge of the
    default route), name nothing."""
    from pyroute2 import IPRoute
    out: set[str] = set()
    with _call("netlink open", "", IPRoute) as ipr:
        kinds = {}
        for link in _call("link dump", "", ipr.get_links):
            info = link.get_attr("IFLA_LINKINFO")
            kinds[link["index"]] = (link.get_attr("IFLA_IFNAME"),
                                    info.get_attr("IFLA_INFO_KIND") if info else None)
        # a bridge the node's default route leaves through is its uplink
        # (the node's own address on br0): replies may come back there
        # another way than their requests left - never checked
        uplinks = set()
        for fam in (socket.AF_INET, socket.AF_INET6):
            for r in _call("route dump", "default", ipr.get_default_routes, family=fam):
                uplinks.add(r.get_attr("RTA_OIF"))
        for a in addrs:
            a = str(a).split("/")[0]
            try:
                ipaddress.ip_address(a)
                routes = ipr.route("get", dst=a)
            except (ValueError, OSError, NetlinkError):
                continue
            for r in routes:
                oif = r.get_attr("RTA_OIF")
                name, kind = kinds.get(oif, (None, None))
                if kind == "bridge" and name and oif not in uplinks:
                    out.add(name)
    return sorted(out)


def own_addresses() -> list[str]:
    """Global unicast addresses of the calling thread's network namespace
    (no loopback, no link-local): what a container is reachable at."""
    return [str(ip) for ip in _addresses_here(
        lambda ip: not (ip.is_loopback or ip.is_link_local or ip.is_multicast or
                        ip.is_unspecified))]


def set_loopback_address(ip: ipaddress.IPv6Address, present: bool) -> None:
    """Add (present) or remove a /128 on `lo` of the calling thread's
    namespace (a socket-mode container's private IPv6 loopback); idempotent."""
    import errno
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = index(ipr, "lo")
        try:
            ipr.addr("add" if present else "del", index=idx, address=str(ip), prefixlen=128,
                     flags=0x02)     # IFA_F_NODAD: usable at once
        except NetlinkError as exc:
            if (present and exc.code == errno.EEXIST) or \
                    (not present and exc.code in (errno.EADDRNOTAVAIL, errno.ENOENT)):
                return
            raise from_oserror("loopback address", exc, str(ip)) from exc


def loopback_addresses(net: ipaddress.IPv6Network) -> list[ipaddress.IPv6Address]:
    """The addresses inside `net` on `lo` of the calling thread's namespace."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        idx = index(ipr, "lo")
    return _addresses_here(lambda ip: ip in net, index=idx)
