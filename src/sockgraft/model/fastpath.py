"""The packet fast path's desired state: which container interfaces carry
the tc programs, which container each belongs to (its policy), and which
addresses lead straight into which container.

Pure: the interfaces the node shows (kernel/ports.py) in, map contents
(model/bpfmaps.py layouts) and the reasons for what was left out, out. The
agent (agent/fastpath.py) writes the difference.

Rules:
- A port's container is known from the CNI registration of its namespace,
  or from a named namespace (`sg-<lab>-<container>` for a lab's agent, the
  namespace name otherwise); an interface in an unnamed namespace forwards
  but is not judged (no policy to judge it by).
- An address claimed by two ports leads nowhere fast (both take the normal
  path, which resolves it as it always did): reported as a conflict.
- Link-local, loopback, multicast and unspecified addresses are never fast
  path destinations.
- A container address:port a grafted server's DNAT takes (model/redirect.py,
  "container address") is delivered the normal way, through that DNAT.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address, ip_address, ip_network
from typing import Iterable, Mapping

from . import bpfmaps


@dataclass(frozen=True)
class Port:
    """One container interface as seen from the node."""
    ifindex: int                    # host-side veth
    ifname: str
    container: str | None           # whose it is, when known
    mac: bytes                      # the container-side interface's MAC
    addrs: tuple[IPv4Address | IPv6Address, ...] = ()
    gw: bytes = bytes(6)            # its bridge's MAC


@dataclass
class Plan:
    ports: dict[bytes, bytes] = field(default_factory=dict)      # sg_fast_ports
    addrs: dict[bytes, bytes] = field(default_factory=dict)      # sg_fast_addrs
    conflicts: list[str] = field(default_factory=list)
    judged: dict[int, str] = field(default_factory=dict)         # ifindex -> container
    redirects: dict[bytes, bytes] = field(default_factory=dict)  # sg_fast_redirects
    link_locals: dict[bytes, bytes] = field(default_factory=dict)  # sg_fast_ll


def container_of(netns_path: str, *, lab: str | None,
                 cni: Mapping[str, str]) -> str | None:
    """The container a namespace belongs to: CNI registration (netns path ->
    container), then the namespace's name."""
    if netns_path in cni:
        return cni[netns_path]
    prefix = "/run/netns/"
    if not netns_path.startswith(prefix):
        return None
    name = netns_path[len(prefix):]
    if lab is not None:
        lab_prefix = f"sg-{lab}-"
        return name[len(lab_prefix):] if name.startswith(lab_prefix) else None
    return name or None


def eui64_link_local(mac: bytes) -> IPv6Address:
    """The link-local address the kernel gives an interface of this MAC by
    default (addr_gen_mode eui64, RFC 4291 appendix A)."""
    iid = bytes([mac[0] ^ 2, mac[1], mac[2], 0xff, 0xfe, mac[3], mac[4], mac[5]])
    return IPv6Address(b"\xfe\x80" + bytes(6) + iid)


def _routable(a: IPv4Address | IPv6Address) -> bool:
    return not (a.is_link_local or a.is_loopback or a.is_multicast or a.is_unspecified)


def plan(ports: Iterable[Port], marks: Mapping[str, int],
         slots: Mapping[int, int] | None = None, redirects: Iterable = (),
         node_link_locals: Iterable[IPv6Address] = ()) -> Plan:
    """marks: container -> the mark of its policy entry (configured
    containers only); slots: ifindex -> its counters' slot (default: the
    order of the interfaces); redirects: model/redirect.Redirect of this
    node (those to a container address keep their packets on the normal
    path); node_link_locals: the bridges' own link-local addresses (a
    bridge's MAC follows its ports', its address does not)."""
    out = Plan()
    redirected: set = set()
    for r in redirects:
        if r.daddr is not None and r.why == "container address":
            out.redirects[bpfmaps.redirect_key(r.proto, r.daddr, r.dport)] = b"\1"
            redirected.add(r.daddr)
    owners: dict[bytes, list[Port]] = {}
    mark_of: dict[int, int] = {}
    slot_of: dict[int, int] = {}
    # whose default link-local address is whose: a policed container claims
    # none of another's (the bridges' belong to the node: 0); a MAC two
    # interfaces share names no owner
    lls: dict[bytes, set[int]] = {}
    gws: set[bytes] = set()
    for i, port in enumerate(sorted(ports, key=lambda p: p.ifindex)):
        mark = mark_of[port.ifindex] = marks.get(port.container or "", 0)
        slot = slots[port.ifindex] if slots is not None else i
        own = [a for a in port.addrs if _routable(a)]
        out.ports[bpfmaps.fast_port_key(port.ifindex)] = bpfmaps.fast_port_val(
            mark, slot, own, port.gw if len(port.gw) == 6 else bytes(6),
            port.mac if len(port.mac) == 6 else bytes(6))
        slot_of[port.ifindex] = slot
        if mark:
            out.judged[port.ifindex] = port.container or ""
        if len(port.gw) == 6 and port.gw != bytes(6):
            gws.add(port.gw)
        if len(port.mac) != 6:
            continue
        lls.setdefault(eui64_link_local(port.mac).packed, set()).add(port.ifindex)
        for a in port.addrs:
            if _routable(a):
                owners.setdefault(bpfmaps.fast_addr_key(a), []).append(port)
    for key, claimed in lls.items():
        if len(claimed) > 1:
            out.conflicts.append(f"{ip_address(key)} (one MAC) is claimed by "
                                 f"{len(claimed)} interfaces: any of them may use it")
    # the node's own (the gateway on the link) are always the node's
    for a in [eui64_link_local(gw) for gw in gws] + list(node_link_locals):
        lls[a.packed] = {0}
    out.link_locals = {k: bpfmaps.fast_ll_val(next(iter(v))) for k, v in lls.items()
                       if len(v) == 1}
    for key, claimed in owners.items():
        if len(claimed) == 1:
            p = claimed[0]
            out.addrs[key] = bpfmaps.fast_addr_val(p.ifindex, p.mac, mark_of[p.ifindex],
                                                   p.gw if len(p.gw) == 6 else bytes(6),
                                                   slot_of[p.ifindex],
                                                   _addr_of(key) in redirected)
        else:
            addr = _addr_of(key)
            out.conflicts.append(f"{addr} is claimed by "
                                 f"{', '.join(p.ifname for p in claimed)}: normal path")
    return out


@dataclass(frozen=True)
class Overlay:
    """One VXLAN device and what the kernel's tables say about it (see
    kernel/ports.Vxlan)."""
    ifindex: int
    ifname: str
    vni: int
    dport: int
    local: str
    underlay: int
    mac: bytes
    routes: tuple = ()          # ((network, gateway), ...)
    neighbours: tuple = ()      # ((ip, mac), ...) on the device
    fdb: tuple = ()             # ((mac, remote host address), ...)
    next_hops: tuple = ()       # ((remote address, oif, next-hop mac, oif mac), ...)
    mtu: int = 1450             # the device's: larger packets take the normal path


@dataclass
class RemotePlan:
    remote: dict[bytes, bytes] = field(default_factory=dict)     # sg_fast_remote
    tunnels: dict[bytes, bytes] = field(default_factory=dict)    # sg_fast_tunnels
    peers: dict[bytes, bytes] = field(default_factory=dict)      # sg_fast_peers
    waiting: list[str] = field(default_factory=list)   # routes left to the normal path


def plan_remote(overlays: Iterable[Overlay], sports: tuple[int, int]) -> RemotePlan:
    """The encapsulation cache: for every route through a VXLAN device whose
    gateway the device's neighbour table maps to a MAC, which the FDB maps
    to a remote host, which the underlay's neighbour table maps to a next
    hop - the outer headers the device itself would write. Anything not
    (yet) resolved is left to the normal path, which resolves it; only
    IPv4 underlays (outer IPv6 is not built)."""
    out = RemotePlan()
    for ov in overlays:
        try:
            local = ip_address(ov.local) if ov.local else None
        except ValueError:
            local = None
        if not isinstance(local, IPv4Address) or len(ov.mac) != 6:
            out.waiting.append(f"{ov.ifname}: no IPv4 local address: normal path")
            continue
        neigh = {str(ip_address(ip)): mac for ip, mac in ov.neighbours if len(mac) == 6}
        fdb = {mac: remote for mac, remote in ov.fdb}
        hops = {remote: (oif, mac, oif_mac) for remote, oif, mac, oif_mac in ov.next_hops}
        underlays = set()
        for net_text, gw_text in ov.routes:
            net = ip_network(net_text)
            vtep_mac = neigh.get(str(ip_address(gw_text)))
            remote = fdb.get(vtep_mac) if vtep_mac else None
            hop = hops.get(remote) if remote else None
            if hop is None or len(hop[1]) != 6 or len(hop[2]) != 6:
                what = ("no neighbour for its gateway" if vtep_mac is None else
                        "no FDB entry for its gateway's MAC" if remote is None else
                        "the underlay next hop is not resolved yet")
                out.waiting.append(f"{net} via {ov.ifname}: {what}: normal path")
                continue
            rip = ip_address(remote)
            if not isinstance(rip, IPv4Address):
                out.waiting.append(f"{net} via {ov.ifname}: IPv6 underlay: normal path")
                continue
            oif, hop_mac, oif_mac = hop
            out.remote[bpfmaps.remote_key(net)] = bpfmaps.remote_val(
                oif, local, rip, ov.vni, ov.dport, hop_mac, oif_mac, vtep_mac, ov.mac, sports,
                ov.mtu)
            out.peers[bpfmaps.peer_key(rip)] = b"\1"
            underlays.add(oif)
        for remote in fdb.values():
            rip = ip_address(remote)
            if isinstance(rip, IPv4Address):
                out.peers[bpfmaps.peer_key(rip)] = b"\1"
        for oif in underlays | ({ov.underlay} if ov.underlay else set()):
            out.tunnels[bpfmaps.fast_port_key(oif)] = bpfmaps.tunnel_val(ov.vni, local,
                                                                          ov.dport, ov.mac)
    return out


def _addr_of(key: bytes) -> IPv4Address | IPv6Address:
    family, raw = bpfmaps.FAST_ADDR_KEY.unpack(key)
    return IPv4Address(raw[:4]) if family == 4 else IPv6Address(raw)


def diff(old: Mapping[bytes, bytes], new: Mapping[bytes, bytes]
         ) -> tuple[dict[bytes, bytes], list[bytes]]:
    """(entries to write, keys to delete) to turn map `old` into `new`."""
    writes = {k: v for k, v in new.items() if old.get(k) != v}
    return writes, [k for k in old if k not in new]


def moved(old: Mapping[bytes, bytes], new: Mapping[bytes, bytes]
          ) -> set[IPv4Address | IPv6Address]:
    """Addresses that went away or now lead into another interface: flow
    verdicts about them must go (another container may hold them now)."""
    return {_addr_of(k) for k, v in old.items() if new.get(k) != v}


__all__ = ["Port", "Plan", "Overlay", "RemotePlan", "container_of", "plan", "plan_remote",
           "diff", "moved"]
