"""The bytes of sockgraft's BPF maps: one container's policy, egress rules and
the directory's services, laid out exactly as bpf/sockgraft.bpf.c reads them.

Pure: GraftConfig / Policy in, (key bytes, value bytes) out; events decoded
from the ring buffer's raw records. kernel/bpf.py writes the bytes; the agent
decides which containers get entries (those grafted at socket() time).

Egress entries carry a generation number: the agent writes a container's new
rule set under gen+1, then flips the generation in its policy entry (a
single atomic map update), then deletes the old generation. A connect in
flight sees either the old or the new rule set, never a mix.

Layouts (little endian host order unless noted; addresses and ports of
sockaddrs are network order, as the kernel hands them to the program):

  sg_policy      key u32 mark -> struct policy (flags, nrules, default verdict
                 and label, gen, 64 x struct rule)
  sg_egress4/6   LPM key {prefixlen = 64 + plen, mark, gen, port(be), addr}
                 -> {plen, label, src[4], src_port(be), src_family}
  sg_services(_rev) {addr[4], port(be), family, proto} -> {addr[4], port(be), family}
  sg_sources     {mark, family, pad[3], addr[4]} -> u8: the source addresses a
                 container's packets may carry (its endpoints; all-zero addr =
                 an endpoint on the wildcard address)
  sg_sock        socket-local storage {mark, flags}: kernel/bpf.Programs.tag
  sg_fast_ports  u32 ifindex (a container's host-side veth) -> {mark, slot,
                 addr4, addr6[4], gw[6], pad}: its policy, counters slot, own
                 addresses, its bridge's MAC
  sg_fast_addrs  {family, pad[3], addr[4]} -> {ifindex, mac[6], gw[6], mark, slot u16,
                 flags u16 (FA_REDIRECTS)}
  sg_fast_redirects {family, proto, port(be), addr[4]} -> u8: a grafted server's
                 DNAT takes these (never delivered around it)
  sg_fast_ll     addr[16] (an EUI-64 link-local address) -> u32 its owner's port
                 ifindex, 0: a bridge's (claimed by no policed container)
  sg_fast_remote LPM {32 + plen, family, pad[3], addr[4]} -> struct remote (the
                 outer headers towards another host's containers)
  sg_fast_tunnels u32 underlay ifindex -> {vni, local addr, dport(be), vtep mac}
  sg_fast_peers  u32 remote VTEP address (be) -> u8
  sg_fast_flows  {ifindex, family, proto, lport(be), rport(be), kind, raddr[4]}
                 -> {gen, verdict, origin, label}: the per-flow verdict cache;
                 kind FK_FRAGS: a datagram's fragments (lport:rport its
                 identification), the verdict of its first fragment
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Iterable

from ..errors import ConfigError
from .graft import LOOPBACK4_NET, LOOPBACK6_NET
from .graftconfig import GraftConfig
from .policy import LinearRule, Policy, linearize

MAX_RULES = 1024         # struct policy's rules[] (bpf/sockgraft.bpf.c)
F_SOCKET_MODE = 1
F_NO_SPLICE = 2          # the container's config says splice = false
V_DENY, V_ALLOW = 0, 1
IPPROTO_TCP, IPPROTO_UDP = 6, 17
PROTO_NUM = {"any": 0, "tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
PROTO_NAME = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp", 1: "icmp", 58: "icmpv6"}

EV_DENY_POLICY, EV_DENY_NO_EGRESS, EV_BIND_FAILED = 1, 2, 3
EV_DENY_BIND, EV_DENY_SOCKOPT, EV_DENY_SOURCE, EV_DENY_MARK = 4, 5, 6, 7
EV_DENY_LISTEN, EV_DENY_UNKNOWN = 8, 9
EV_SPLICE_LEAVE = 10     # not a denial: sg_splice_leave names sockets to unsplice
EV_DENY_KEPT = 11        # syscall mode: the container's own loopback / "this host"
EV_DENY_SPOOF = 12       # fast path: a spoofed packet (label: what), sampled 1, 2, 4, 8...
EV_DENY_IPOPTS = 13      # a grafted socket's packet with IPv4 options / IPv6 routing headers
EV_DENY_PRIORITY = 14    # a grafted socket's packet with a priority above 6 (label: it)
PRIO_UNPRIVILEGED = 6    # TC_PRIO_INTERACTIVE: the highest SO_PRIORITY without a capability
EV_DENY_OWNER = 15       # a packet of a grafted socket whose owner (sk_uid) changed (label: it)
EV_DENY_GROUP = 16       # a packet for a grafted socket in another's SO_REUSEPORT group
SPOOF_WHAT = {1: "spoof:source", 2: "spoof:arp", 3: "spoof:nd-target", 4: "spoof:nd-malformed",
              5: "spoof:router-advertisement", 6: "spoof:fragment", 7: "spoof:mac"}
OP_SETSOCKOPT = 4
OP_NAMES = {1: "connect", 2: "sendmsg", 3: "bind", 4: "setsockopt", 5: "send", 6: "listen",
            7: "packet"}

# The options the setsockopt guard refuses (bpf/sockgraft.bpf.c option_refused),
# by (level, optname): names for audit lines; the C list must match (tested).
SOL_SOCKET, SOL_IP, SOL_TCP, SOL_UDP, SOL_IPV6 = 1, 0, 6, 17, 41
REFUSED_OPTIONS: dict[tuple[int, int], str] = {
    (SOL_SOCKET, 36): "SO_MARK", (SOL_SOCKET, 25): "SO_BINDTODEVICE",
    (SOL_SOCKET, 62): "SO_BINDTOIFINDEX", (SOL_SOCKET, 5): "SO_DONTROUTE",
    (SOL_SOCKET, 73): "SO_RESERVE_MEM", (SOL_SOCKET, 51): "SO_ATTACH_REUSEPORT_CBPF",
    (SOL_SOCKET, 52): "SO_ATTACH_REUSEPORT_EBPF", (SOL_SOCKET, 68): "SO_DETACH_REUSEPORT_BPF",
    (SOL_IP, 4): "IP_OPTIONS", (SOL_IP, 15): "IP_FREEBIND", (SOL_IP, 16): "IP_IPSEC_POLICY",
    (SOL_IP, 17): "IP_XFRM_POLICY", (SOL_IP, 19): "IP_TRANSPARENT",
    (SOL_IP, 35): "IP_ADD_MEMBERSHIP", (SOL_IP, 39): "IP_ADD_SOURCE_MEMBERSHIP",
    (SOL_IP, 41): "IP_MSFILTER", (SOL_IP, 42): "MCAST_JOIN_GROUP",
    (SOL_IP, 46): "MCAST_JOIN_SOURCE_GROUP", (SOL_IP, 48): "MCAST_MSFILTER",
    (SOL_IP, 50): "IP_UNICAST_IF", (SOL_IP, 51): "IP_LOCAL_PORT_RANGE",
    (SOL_IPV6, 1): "IPV6_ADDRFORM", (SOL_IPV6, 2): "IPV6_2292PKTINFO",
    (SOL_IPV6, 3): "IPV6_2292HOPOPTS", (SOL_IPV6, 4): "IPV6_2292DSTOPTS",
    (SOL_IPV6, 5): "IPV6_2292RTHDR", (SOL_IPV6, 6): "IPV6_2292PKTOPTIONS",
    (SOL_IPV6, 20): "IPV6_ADD_MEMBERSHIP", (SOL_IPV6, 34): "IPV6_IPSEC_POLICY",
    (SOL_IPV6, 35): "IPV6_XFRM_POLICY", (SOL_IPV6, 42): "MCAST_JOIN_GROUP",
    (SOL_IPV6, 46): "MCAST_JOIN_SOURCE_GROUP", (SOL_IPV6, 48): "MCAST_MSFILTER",
    (SOL_IPV6, 50): "IPV6_PKTINFO", (SOL_IPV6, 54): "IPV6_HOPOPTS",
    (SOL_IPV6, 55): "IPV6_RTHDRDSTOPTS", (SOL_IPV6, 57): "IPV6_RTHDR",
    (SOL_IPV6, 59): "IPV6_DSTOPTS", (SOL_IPV6, 75): "IPV6_TRANSPARENT",
    (SOL_IPV6, 76): "IPV6_UNICAST_IF", (SOL_IPV6, 78): "IPV6_FREEBIND",
    (SOL_TCP, 19): "TCP_REPAIR", (SOL_TCP, 20): "TCP_REPAIR_QUEUE",
    (SOL_TCP, 21): "TCP_QUEUE_SEQ", (SOL_TCP, 22): "TCP_REPAIR_OPTIONS",
    (SOL_TCP, 29): "TCP_REPAIR_WINDOW", (SOL_UDP, 100): "UDP_ENCAP",
}

# struct rule: addr[4], mask[4] (network order words), port_lo, port_hi,
# family, proto, verdict, pad, label
RULE = struct.Struct("=4I4IHHBBBBI")
POLICY_HEAD = struct.Struct("=IIIIHHI")
POLICY_SIZE = POLICY_HEAD.size + MAX_RULES * RULE.size
EGRESS4_KEY = struct.Struct("=IIHH4s")
EGRESS6_KEY = struct.Struct("=IIHH16s")
EGRESS_VAL = struct.Struct("=II16sHBB")
SVC_KEY = struct.Struct("=16sHBBI")
SVC_VAL = struct.Struct("=16sHBB")
EVENT = struct.Struct("=IIII16sHBBI")
SRC_KEY = struct.Struct("=IB3x16s")


def _words(packed: bytes) -> tuple[int, int, int, int]:
    """Network-order address bytes (padded to 16) as the four u32 words the
    program compares (in host order, as loaded from memory)."""
    return struct.unpack("=4I", packed.ljust(16, b"\0"))


# Rules the fast path skips (RULE_HOST_ONLY): a host socket's datagram to a
# group or the broadcast address reaches a host link; what a container sends
# from its own network stack reaches its own link (DHCP, mDNS, IGMP).
RULE_HOST_ONLY = 1
HOST_ONLY_LABELS = frozenset({"builtin:multicast", "builtin:broadcast"})


def _rule_bytes(r: LinearRule, label: int) -> bytes:
    if r.network is None:
        addr = mask = (0, 0, 0, 0)
        family = 0
    else:
        addr = _words(r.network.network_address.packed)
        mask = _words(r.network.netmask.packed)
        family = r.network.version
    return RULE.pack(*addr, *mask, r.port_lo, r.port_hi, family, PROTO_NUM[r.proto],
                     V_ALLOW if r.allow else V_DENY,
                     RULE_HOST_ONLY if r.label in HOST_ONLY_LABELS else 0, label)


@dataclass(frozen=True)
class PolicyEntry:
    value: bytes
    labels: tuple[str, ...]     # label index -> rule name for audit lines


def policy_key(mark: int) -> bytes:
    """sg_policy's key: the container's mark, a u32 in host order."""
    return mark.to_bytes(4, "little")


def policy_entry(policy: Policy, gen: int, *, socket_mode: bool = True,
                 splice: bool = True) -> PolicyEntry:
    rules, final = linearize(policy)
    if len(rules) > MAX_RULES:
        raise ConfigError(f"policy compiles to {len(rules)} rules; the in-kernel enforcer "
                          f"holds at most {MAX_RULES} (built-in categories count 11)",
                          field="policy", value=len(rules))
    labels = tuple(r.label for r in rules) + (final.label,)
    body = b"".join(_rule_bytes(r, i) for i, r in enumerate(rules))
    body = body.ljust(MAX_RULES * RULE.size, b"\0")
    flags = (F_SOCKET_MODE if socket_mode else 0) | (0 if splice else F_NO_SPLICE)
    head = POLICY_HEAD.pack(flags, len(rules),
                            V_ALLOW if final.allow else V_DENY, len(rules), gen & 0xFFFF, 0, 0)
    return PolicyEntry(head + body, labels)


LOCAL_KEY = struct.Struct("=I16s")


def local_keys(addrs: Iterable[IPv4Address | IPv6Address]) -> set[bytes]:
    """sg_local's keys: the node's own addresses (a grafted client enters the
    splice map only when its server may be on this node). Loopback and the
    private loopbacks the program knows itself."""
    return {LOCAL_KEY.pack(a.version, a.packed) for a in addrs
            if not a.is_loopback and not a.is_unspecified}


SPLICE_KEY = struct.Struct("=I16s16sII")       # family, local ip, remote ip, ports (host order)
AF_INET, AF_INET6 = 2, 10


def splice_key(local: str, lport: int, remote: str, rport: int) -> bytes:
    """sg_splice's key of a connection as its own end sees it (getsockname /
    getpeername): a v4-mapped pair is keyed as IPv4, as the program's
    key_unmap does."""
    lip, rip = ip_address(local.split("%")[0]), ip_address(remote.split("%")[0])
    if isinstance(lip, IPv6Address) and lip.ipv4_mapped and \
            isinstance(rip, IPv6Address) and rip.ipv4_mapped:
        lip, rip = lip.ipv4_mapped, rip.ipv4_mapped
    if lip.version != rip.version:
        raise ConfigError(f"splice key of {local} and {remote}: two families", value=local)
    fam = AF_INET if lip.version == 4 else AF_INET6
    return SPLICE_KEY.pack(fam, lip.packed.ljust(16, b"\0"), rip.packed.ljust(16, b"\0"),
                           lport, rport)


def _be16(port: int) -> int:
    """A port in network order, as the u16 the program loads."""
    return struct.unpack("=H", struct.pack("!H", port))[0]


def egress_entries(cfg: GraftConfig, mark: int, gen: int
                   ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], list[str]]:
    """(v4 entries, v6 entries, labels) for the container's egress rules under
    generation `gen`. label index i names cfg.egress rule i."""
    v4: list[tuple[bytes, bytes]] = []
    v6: list[tuple[bytes, bytes]] = []
    labels = []
    for i, rule in enumerate(cfg.egress):
        ep = cfg.endpoints[rule.endpoint]
        labels.append(f"egress {rule}")
        net = rule.network
        port_be = _be16(rule.port) if rule.port is not None else 0
        src = ep.addr
        assert src is not None
        val = EGRESS_VAL.pack(net.prefixlen, i, src.packed.ljust(16, b"\0"),
                              _be16(ep.port or 0), src.version, 0)
        if net.version == 4:
            key = EGRESS4_KEY.pack(64 + net.prefixlen, mark, gen & 0xFFFF, port_be,
                                   net.network_address.packed)
            v4.append((key, val))
        else:
            key = EGRESS6_KEY.pack(64 + net.prefixlen, mark, gen & 0xFFFF, port_be,
                                   net.network_address.packed)
            v6.append((key, val))
    return v4, v6, labels


def source_keys(cfg: GraftConfig, mark: int, own: Iterable[str] = ()) -> list[bytes]:
    """sg_sources keys: the addresses of the container's inet endpoints, the
    only sources its packets may carry (an IPv4 endpoint of a dual-stack
    socket sends IPv4 packets: family 4). The wildcard address packs as
    all-zero, the program's "any address of this family" key.

    own: the container's own addresses. A grafted server's replies to a
    client redirected from the container's address (model/redirect.py) leave
    with that address as their source once conntrack undoes the DNAT; the
    container may use its own address anyway, so it is no one else's."""
    keys = {SRC_KEY.pack(mark, ep.addr.version, ep.addr.packed.ljust(16, b"\0"))
            for ep in cfg.endpoints.values() if ep.is_inet and ep.addr is not None}
    for a in own:
        try:
            ip = ip_address(a)
        except ValueError:
            continue
        private = ip in LOOPBACK4_NET or ip in LOOPBACK6_NET   # graft.private_loopback
        if private or not (ip.is_unspecified or ip.is_loopback or ip.is_multicast):
            keys.add(SRC_KEY.pack(mark, ip.version, ip.packed.ljust(16, b"\0")))
    return sorted(keys)


def svc_key(addr: IPv4Address | IPv6Address, port: int, proto: str, mark: int = 0) -> bytes:
    """sg_services: mark = the client container allowed to follow the record;
    sg_services_rev: 0."""
    return SVC_KEY.pack(addr.packed.ljust(16, b"\0"), _be16(port), addr.version,
                        PROTO_NUM[proto], mark)


def svc_val(addr: IPv4Address | IPv6Address, port: int) -> bytes:
    return SVC_VAL.pack(addr.packed.ljust(16, b"\0"), _be16(port), addr.version, 0)


FAST_PORT = struct.Struct("=II4s16s6s6s")
FAST_ADDR_KEY = struct.Struct("=B3x16s")
FAST_ADDR_VAL = struct.Struct("=I6s6sIHH")
FA_REDIRECTS = 1
REDIRECT_KEY = struct.Struct("=BBH16s")
REMOTE_KEY = struct.Struct("=IB3x16s")
REMOTE_VAL = struct.Struct("=I4s4sIH6s6s6s6sHHH")
TUNNEL_VAL = struct.Struct("=I4sH6s")
FLOW_KEY = struct.Struct("=IBBHHH16s")


def fast_port_key(ifindex: int) -> bytes:
    return ifindex.to_bytes(4, "little")


def fast_port_identity(val: bytes) -> bytes:
    """What of a sg_fast_ports value its flow records depend on: the policy
    mark and the addresses (not the counters' slot, not the MACs)."""
    return val[0:4] + val[8:28]


def fast_port_val(mark: int, slot: int, addrs: Iterable[IPv4Address | IPv6Address] = (),
                  gw: bytes = bytes(6), mac: bytes = bytes(6)) -> bytes:
    """mark 0: a container without a policy entry (forwarded, not judged).
    slot: its counters' index. addrs: its own addresses; the first of each
    family is kept here (the program compares it in place), the others are
    found in sg_fast_addrs. mac: its interface's (a policed container's
    frames must come from it; all 0: not known, not checked)."""
    v4 = next((a for a in addrs if a.version == 4), None)
    v6 = next((a for a in addrs if a.version == 6), None)
    return FAST_PORT.pack(mark, slot, v4.packed if v4 else bytes(4),
                          v6.packed if v6 else bytes(16), _mac6(gw), _mac6(mac))


def _mac6(mac: bytes) -> bytes:
    if len(mac) != 6:
        raise ConfigError(f"a MAC address has 6 bytes, got {len(mac)}", field="mac",
                          value=mac.hex(":"))
    return mac


def fast_addr_key(addr: IPv4Address | IPv6Address) -> bytes:
    return FAST_ADDR_KEY.pack(addr.version, addr.packed.ljust(16, b"\0"))


def fast_addr_val(ifindex: int, mac: bytes, mark: int = 0, gw: bytes = bytes(6),
                  slot: int = 0, redirects: bool = False) -> bytes:
    """mark: the owner's policy key (0: not judged; its replies need no
    record); gw: its bridge's MAC; slot: its counters; redirects: a grafted
    server of it is redirected (sg_fast_redirects says which ports)."""
    return FAST_ADDR_VAL.pack(ifindex, _mac6(mac), _mac6(gw), mark, slot,
                              FA_REDIRECTS if redirects else 0)


def fast_ll_val(ifindex: int) -> bytes:
    """sg_fast_ll (key: the 16 address bytes): the owner's port, 0: a bridge."""
    return ifindex.to_bytes(4, "little")


def redirect_key(proto: str, addr: IPv4Address | IPv6Address, port: int) -> bytes:
    return REDIRECT_KEY.pack(addr.version, PROTO_NUM[proto], _be16(port),
                             addr.packed.ljust(16, b"\0"))


def remote_key(net: IPv4Network | IPv6Network) -> bytes:
    return REMOTE_KEY.pack(32 + net.prefixlen, net.version,
                           net.network_address.packed.ljust(16, b"\0"))


def remote_val(ifindex: int, saddr: IPv4Address, daddr: IPv4Address, vni: int, dport: int,
               outer_dmac: bytes, outer_smac: bytes, inner_dmac: bytes, inner_smac: bytes,
               sports: tuple[int, int], mtu: int = 1450) -> bytes:
    return REMOTE_VAL.pack(ifindex, saddr.packed, daddr.packed, vni, _be16(dport),
                           _mac6(outer_dmac), _mac6(outer_smac), _mac6(inner_dmac),
                           _mac6(inner_smac), sports[0], sports[1], mtu)


def tunnel_val(vni: int, local: IPv4Address, dport: int, vtep_mac: bytes) -> bytes:
    return TUNNEL_VAL.pack(vni, local.packed, _be16(dport), _mac6(vtep_mac))


def peer_key(addr: IPv4Address) -> bytes:
    return addr.packed


def flow_is_flow(key: bytes) -> bool:
    """A flow's record, not a fragmented datagram's (kind FK_FRAGS)."""
    return key[10:12] == b"\0\0"


def flow_matcher(addrs: Iterable[IPv4Address | IPv6Address]):
    """A test of a flow key (raw bytes, a full cache's worth per call):
    is its remote end one of these addresses?"""
    remotes = {bytes([a.version]) + a.packed.ljust(16, b"\0") for a in addrs}
    return lambda key: (key[4:5] + key[12:28]) in remotes


FLOW_VAL = struct.Struct("=HBBI")       # gen, verdict, origin, label
FL_OUT, FL_IN = 1, 2                     # started by the port's container / by the remote


def flow_judged(val: bytes) -> bool:
    """A verdict the policy made (a flow the container started), not a reply
    permission: it holds only under its generation."""
    return FLOW_VAL.unpack(val[:FLOW_VAL.size])[2] == FL_OUT


@dataclass(frozen=True)
class Event:
    kind: int
    mark: int
    op: str
    label: int
    address: str
    proto: str
    pid: int

    @property
    def reason(self) -> str:
        if self.kind == EV_DENY_SPOOF:
            return SPOOF_WHAT.get(self.label, f"spoof:{self.label}")
        return {EV_DENY_POLICY: "policy", EV_DENY_NO_EGRESS: "egress:no-rule",
                EV_BIND_FAILED: "egress:bind-failed", EV_DENY_BIND: "bind:no-endpoint",
                EV_DENY_SOCKOPT: "sockopt:refused", EV_DENY_SOURCE: "source:not-granted",
                EV_DENY_MARK: "mark:forged", EV_DENY_LISTEN: "listen:no-endpoint",
                EV_DENY_UNKNOWN: "container:no-policy",
                EV_DENY_KEPT: "loopback:container-own",
                EV_DENY_IPOPTS: "ip-options:refused",
                EV_DENY_PRIORITY: "priority:refused",
                EV_DENY_OWNER: "owner:changed",
                EV_DENY_GROUP: "reuseport:foreign-group"}.get(self.kind, f"kind {self.kind}")

    @property
    def errno(self) -> int:
        """What the application got: EACCES for a policy denial (as the agent
        answers it in syscall mode), a bind the guard refused and a container
        without policy; ENETUNREACH with no egress rule; EADDRNOTAVAIL when
        the endpoint address could not be bound; EPERM for the other guards
        (options, forged sources and marks, listeners: the kernel's own errno
        for a refused setsockopt or a dropped packet)."""
        return {EV_DENY_POLICY: 13, EV_DENY_BIND: 13, EV_DENY_UNKNOWN: 13, EV_DENY_KEPT: 13,
                EV_DENY_NO_EGRESS: 101, EV_BIND_FAILED: 99}.get(self.kind, 1)


# Options the guard judges by their value (sg_setsockopt): TCP_ULP other than "tls",
# SO_PRIORITY outside 0..PRIO_UNPRIVILEGED.
VALUE_CHECKED_OPTIONS = {(SOL_TCP, 31): "TCP_ULP", (SOL_SOCKET, 12): "SO_PRIORITY"}


def option_name(level: int, opt: int) -> str:
    return (REFUSED_OPTIONS.get((level, opt)) or VALUE_CHECKED_OPTIONS.get((level, opt))
            or f"level {level} option {opt}")


def decode_event(raw: bytes) -> Event:
    if len(raw) < EVENT.size:
        raise ValueError(f"event of {len(raw)} bytes, expected {EVENT.size}")
    kind, mark, op, label, addr, port_, family, proto, pid = EVENT.unpack_from(raw)
    if op == OP_SETSOCKOPT:
        a = option_name(port_, label)
    elif kind in (EV_DENY_SOURCE, EV_DENY_MARK, EV_DENY_PRIORITY) or (
            kind == EV_DENY_OWNER and op != 6):         # (a send: its source; a receive: port)
        a = str(IPv4Address(addr[:4]) if family == 4 else IPv6Address(addr))
    elif family == 4:
        a = f"{IPv4Address(addr[:4])}:{port_}"
    else:
        a = f"[{IPv6Address(addr)}]:{port_}"
    return Event(kind, mark, OP_NAMES.get(op, str(op)), label, a,
                 PROTO_NAME.get(proto, str(proto)), pid)


__all__ = ["MAX_RULES", "PolicyEntry", "policy_key", "policy_entry", "egress_entries",
           "source_keys", "svc_key", "svc_val", "Event", "decode_event", "POLICY_SIZE",
           "REFUSED_OPTIONS", "option_name", "fast_port_key", "fast_port_val",
           "fast_addr_key", "fast_addr_val", "fast_port_identity", "flow_matcher", "flow_is_flow", "flow_judged", "splice_key", "remote_key",
           "remote_val", "tunnel_val", "peer_key", "redirect_key"]
