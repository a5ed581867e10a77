"""Render the per-container policies as one nftables table, the in-kernel
per-packet enforcement for grafted sockets.

Every grafted socket carries SO_MARK = MARK_BASE | container id. The table's
output chain sends packets with a sockgraft mark to their container's chain,
which mirrors `policy.decide` rule for rule, so a UDP datagram sent on a
grafted socket (or anything else a grafted socket emits) is judged in the
kernel without a round trip to the agent. Replies on flows the other side
started (a grafted server answering a client) are `ct state established`.

Order inside a container chain, the same as `decide`:
  1. deny rules                              -> reject
  2. for each built-in category, most specific first (if builtin_denies):
     allow rules that name the category      -> accept
     the category's ranges                   -> reject
  3. the remaining allow rules               -> accept
  4. allow list non-empty ? reject : accept

A mark in sockgraft's range with no chain (unknown container) is rejected.
Reject, not drop: a refused TCP connect fails at once (ECONNREFUSED, the
ICMP answer is local) instead of retrying its SYN for two minutes; a UDP send
fails with EPERM.
Redirects (model/redirect.py): DNAT chains at prerouting and output, at a
priority before the node's own port mappings (dstnat - 10), take
connections to a grafted server's container address or published port to
the host address its listener really has.

Pure: returns text; kernel/nft.py loads it atomically.
"""

from __future__ import annotations

from ipaddress import IPv4Network, IPv6Network
from typing import Iterable, Mapping

from .graft import LOOPBACK4_NET, LOOPBACK6_NET, MARK_BASE, MARK_MASK
from .policy import LinearRule, Policy, linearize
from .redirect import Redirect

TABLE = "sockgraft"
FAMILY = "inet"


def chain_name(mark: int) -> str:
    return f"c_{mark & 0xFFFF:04x}"


def _proto_match(r: LinearRule) -> str:
    if r.proto == "any":
        return "" if r.all_ports else "meta l4proto { tcp, udp } "
    return f"meta l4proto {r.proto} "


def _ports(r: LinearRule) -> str:
    if r.all_ports:
        return ""
    return f"th dport {r.port_lo} " if r.port_lo == r.port_hi else \
        f"th dport {r.port_lo}-{r.port_hi} "


def _dest(net: IPv4Network | IPv6Network | None) -> str:
    """A mapped destination leaves as an IPv4 packet, which IPv4 rules judge
    (policy.decide judges it by its IPv4 form too)."""
    if net is None:
        return ""
    return f"{'ip' if net.version == 4 else 'ip6'} daddr {net} "


def plan_chain(policy: Policy) -> list[str]:
    rules, final = linearize(policy)
    lines = []
    for r in rules:
        lines.append(f"{_dest(r.network)}{_proto_match(r)}{_ports(r)}"
                     f"{'accept' if r.allow else 'counter reject'}".strip())
        if r.label == "builtin:broadcast":
            # a subnet's directed broadcast (SO_BROADCAST) reaches a host link
            # as the limited one does: the route says which it is
            lines.append("meta nfproto ipv4 fib daddr type broadcast counter reject")
    lines.append("accept" if final.allow else "counter reject")
    return lines


def _service_lines(services: Iterable[tuple]) -> list[str]:
    lines = []
    for version, kw in ((4, "ip"), (6, "ip6")):
        elems = sorted({f"{proto} . {ip} . {port}" for proto, ip, port in services
                        if ip.version == version})
        if elems:
            lines.append(f"meta l4proto . {kw} daddr . th dport {{ {', '.join(elems)} }} accept")
    return lines


def redirect_line(r: Redirect) -> str:
    kw = "ip" if r.version == 4 else "ip6"
    # A published port's host address (a pod's hostIP) is the node's own or
    # nothing: the rule runs for every packet the node routes or sends, and
    # would otherwise take connections to any address (the metadata
    # service, another pod, a Service IP) to the grafted server.
    local = "fib daddr type local " if r.why == "published" else ""
    match = f"{kw} daddr {r.daddr} {local}" if r.daddr is not None else \
        f"meta nfproto {'ipv4' if r.version == 4 else 'ipv6'} fib daddr type local "
    if r.to_ip.is_unspecified:        # a wildcard endpoint: the address it arrived at
        return f"{match}{r.proto} dport {r.dport} counter redirect to :{r.to_port}"
    to = f"{r.to_ip}:{r.to_port}" if r.version == 4 else f"[{r.to_ip}]:{r.to_port}"
    return f"{match}{r.proto} dport {r.dport} counter dnat {kw} to {to}"


def _private_lines(loopbacks: Mapping[int, tuple]) -> list[str]:
    """A socket-mode container's private loopback (graft.private_loopback)
    is a local address of the host: a host service listening on every
    address (0.0.0.0, ::) would take what the container sends to its own
    "loopback". Packets to those ranges reach the owner's sockets only; one
    the socket lookup finds another's socket for is answered as a closed
    port would be (a reset, port unreachable: no connect waits two minutes
    for its SYN); one with no socket gets that from the kernel itself."""
    out = ["  chain input {",
           "    type filter hook input priority filter; policy accept;",
           f"    ip daddr {LOOPBACK4_NET} jump private4",
           f"    ip6 daddr {LOOPBACK6_NET} jump private6",
           "  }"]
    for fam, i, net in (("ip", 0, LOOPBACK4_NET), ("ip6", 1, LOOPBACK6_NET)):
        out.append(f"  chain private{4 if i == 0 else 6} {{")
        tests = [f"{fam} daddr {addrs[i]} socket mark != 0x{mark:08x}"
                 for mark, addrs in sorted(loopbacks.items())]
        tests.append(f"{fam} daddr {net} socket mark & 0x{MARK_MASK:08x} != 0x{MARK_BASE:08x}")
        for t in tests:
            out.append(f"    {t} meta l4proto tcp reject with tcp reset")
            out.append(f"    {t} reject with icmpx type port-unreachable")
        out.append("  }")
    return out


# A grafted socket's datagrams to a peer are accepted as replies when
# conntrack holds a flow from that peer to its host address and port ("ct
# state established" comes before any container's policy). A container can
# forge such a "request" from its own network stack (a raw socket: Docker
# keeps CAP_NET_RAW) with the source it wants to reach. So a packet to the
# node's own addresses that comes in from a bridge the containers are on
# (their packets enter the host there) is dropped, before conntrack sees it,
# when its source does not route back through that bridge (strict reverse
# path). Those bridges only: over the underlay (even on a bridge the node's
# own address lives on) a reply may come back another way than its request
# left (a routed overlay out, the underlay back). Left to the CNI
# (docs/architecture.md): forged sources within the bridge's own subnet, and
# containers on routed veths without a bridge.
def antispoof_lines(bridges: Iterable[str]) -> list[str]:
    names = ", ".join(f'"{b}"' for b in sorted(set(bridges)))
    if not names:
        return []
    return ["  chain antispoof {",
            "    type filter hook prerouting priority raw; policy accept;",
            f"    iifname {{ {names} }} fib daddr type local fib saddr . iif oif missing "
            "counter drop",
            "  }"]


def plan_ruleset(policies: dict[int, Policy],
                 services: Mapping[int, Iterable[tuple]] | None = None,
                 redirects: Iterable[Redirect] = (),
                 loopbacks: Mapping[int, tuple] | None = None,
                 bridges: Iterable[str] = ()) -> str:
    """The whole table for a node: {mark: policy}. Loaded with `nft -f`, the
    leading add+delete makes it replace any previous version atomically.

    services: {mark: [(proto, host ip, port)]}, the grafted servers the
    directory may send that container's clients to (graft.followable). Their
    connect was judged on the overlay address the client asked for; the
    packets carry the host address, which that container's chain accepts
    first - and only that container's: no other container gains anything.

    bridges: those the containers' addresses route through (antispoof_lines)."""
    services = services or {}
    out = [f"add table {FAMILY} {TABLE}", f"delete table {FAMILY} {TABLE}",
           f"table {FAMILY} {TABLE} {{"]
    redirects = list(redirects)
    if redirects:
        for chain, hook in (("redirect_pre", "prerouting"), ("redirect_out", "output")):
            out.append(f"  chain {chain} {{")
            out.append(f"    type nat hook {hook} priority -110; policy accept;   # dstnat - 10")
            out += [f"    {redirect_line(r)}" for r in redirects]
            out.append("  }")
    if loopbacks:
        out += _private_lines(loopbacks)
    if policies:
        out += antispoof_lines(bridges)
    out.append("  chain output {")
    out.append("    type filter hook output priority filter; policy accept;")
    out.append(f"    meta mark & 0x{MARK_MASK:08x} != 0x{MARK_BASE:08x} accept")
    out.append("    ct state established,related accept")
    if policies:
        vmap = ", ".join(f"0x{m:08x} : jump {chain_name(m)}" for m in sorted(policies))
        out.append(f"    meta mark vmap {{ {vmap} }}")
    out.append("    counter reject")
    out.append("  }")
    for mark in sorted(policies):
        out.append(f"  chain {chain_name(mark)} {{")
        if loopbacks and mark in loopbacks:
            # a socket-mode container's own loopback (graft.private_loopback)
            v4, v6 = loopbacks[mark]
            out += [f"    ip daddr {v4} accept", f"    ip6 daddr {v6} accept"]
        out += [f"    {line}" for line in _service_lines(services.get(mark, ()))]
        out += [f"    {line}" for line in plan_chain(policies[mark])]
        out.append("  }")
    out.append("}")
    return "\n".join(out) + "\n"
