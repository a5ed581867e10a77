"""The graft decision: what the agent does with one trapped bind/connect/sendto/listen.

Pure: takes the parsed sockaddr, what the agent learned about the target's
socket (family, type, whether it is already a grafted host socket) and the
container's GraftConfig, and returns an Action. The agent (agent/engine.py)
carries the action out; nothing here touches a socket or the notify fd.

Actions:
  Continue        let the kernel run the syscall unchanged in the container's
                  own namespace (nothing grafted, nothing to check), or on an
                  already grafted socket where the kernel's per-packet nftables
                  policy (keyed by the socket mark) still applies (UDP sendto)
  Fail(errno)     answer the syscall with this errno (what the kernel would
                  answer for a malformed sockaddr, or a config mismatch)
  Deny(errno)     refused by policy; audited
  GraftBind       create a host socket bound to `local`, inject it at the fd
  GraftConnect    create a host socket bound to `local`, connect it to `dest`
                  (the address that was checked: never re-read), inject it
  ConnectGrafted  the fd already is a host socket: connect it to `dest` ourselves
  GraftSend       create a host UDP socket bound to `local`, inject it, then let
                  the kernel send (its nftables policy checks every datagram)
  BindGrafted     the fd is a host socket grafted at socket() time and not yet
                  bound: bind it to `local` ourselves (never the app's buffer);
                  endpoint None (an ephemeral wildcard bind): answer success and
                  bind nothing - connect()/sendmsg() bind the endpoint later
  BindLoopback    a socket-mode socket's loopback bind: bound to the container's
                  private loopback address on the host (its own loopback)
  Listen          the agent calls listen() on its own duplicate of the socket
                  (never the fd number the kernel would look up again)

A grafted socket is never handed back to the kernel for bind or listen: it
binds only what an ingress rule grants (the kernel guards refuse any bind
the agent did not make) and listens only once bound through one.

Race freedom: every action that moves traffic onto the host carries the
address the decision was made on; the agent acts on that copy only.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass
from typing import Mapping
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from .endpoint import Endpoint
from .graftconfig import GraftConfig, ingress_host_port
from .policy import decide
from .sockaddr import (AF_INET, AF_INET6, InetAddr, OtherAddr, Sockaddr, SockaddrError,
                       UnixAddr, UnspecAddr, parse_sockaddr)

SOCK_STREAM = 1
SOCK_DGRAM = 2
# the protocol of each type that is grafted (0 in a socket() call means it)
INET_PROTO = {SOCK_STREAM: 6, SOCK_DGRAM: 17}
MSG_FASTOPEN = 0x20000000

MARK_MASK = 0xFFFF0000
MARK_BASE = 0x53470000  # "SG": every grafted socket carries MARK_BASE | container id


@dataclass(frozen=True, slots=True)
class SockInfo:
    family: int
    type: int          # SOCK_STREAM / SOCK_DGRAM / other
    grafted: bool      # already a host socket (tagged by the agent)
    bound: bool = True  # has a local address or port (a fresh socket has neither)
    ingress: bool = False  # bound by the agent through an ingress rule
    v6only: bool = False  # IPV6_V6ONLY (an AF_INET6 socket that takes no IPv4)
    protocol: int = 0   # SO_PROTOCOL (0: the type's own)

    @property
    def inet(self) -> bool:
        """TCP or UDP: the only sockets grafted. Others of the same types
        (MPTCP, UDP-Lite, SCTP, ICMP "ping" sockets) stay the container's:
        the host's guards judge the connects and sends of TCP and UDP only
        (an MPTCP connect runs on a subflow the tag is not on)."""
        want = INET_PROTO.get(self.type)
        return want is not None and self.protocol in (0, want)

    @property
    def proto(self) -> str:
        if not self.inet:
            return "other"
        return "tcp" if self.type == SOCK_STREAM else "udp"


@dataclass(frozen=True, slots=True)
class Continue:
    reason: str
    note: bool = False      # a bind a rule could have meant: the agent logs the reason


@dataclass(frozen=True, slots=True)
class Fail:
    errno: int
    reason: str


@dataclass(frozen=True, slots=True)
class Deny:
    errno: int
    rule: str
    dest: InetAddr


@dataclass(frozen=True, slots=True)
class GraftBind:
    endpoint: Endpoint
    local: InetAddr      # host address to bind (in the socket's family)
    requested: InetAddr
    rule: str


@dataclass(frozen=True, slots=True)
class GraftConnect:
    endpoint: Endpoint
    local: InetAddr
    dest: InetAddr                  # what the host socket connects to
    rule: str
    overlay: InetAddr | None = None     # the overlay address asked for (directory bypass)


@dataclass(frozen=True, slots=True)
class ConnectGrafted:
    dest: InetAddr
    rule: str


@dataclass(frozen=True, slots=True)
class GraftSend:
    endpoint: Endpoint
    local: InetAddr
    dest: InetAddr
    rule: str


@dataclass(frozen=True, slots=True)
class BindGrafted:
    endpoint: Endpoint | None    # None: an ephemeral wildcard bind, done as asked
    local: InetAddr
    requested: InetAddr
    rule: str


@dataclass(frozen=True, slots=True)
class BindLoopback:
    """A socket-mode socket's bind to loopback: the agent binds it to the
    container's private loopback address (`private_loopback`), where only
    the container's own sockets reach it."""
    local: InetAddr
    requested: InetAddr
    rule: str = "bind:private-loopback"


@dataclass(frozen=True, slots=True)
class Listen:
    rule: str


Action = (Continue | Fail | Deny | GraftBind | GraftConnect | ConnectGrafted | GraftSend
          | BindGrafted | BindLoopback | Listen)


def is_grafted_mark(mark: int) -> bool:
    return mark & MARK_MASK == MARK_BASE


LOOPBACK4_NET = IPv4Network("127.83.0.0/16")     # mirrored by the BPF programs
LOOPBACK6_NET = IPv6Network("fd53:4c4f::/96")


def private_loopback(mark: int) -> tuple[IPv4Address, IPv6Address]:
    """A socket-mode container's private loopback addresses on the host:
    127.83.H.L and fd53:4c4f::HL, HL = the mark's id."""
    i = mark & 0xFFFF
    return (IPv4Address(int(LOOPBACK4_NET.network_address) | i),
            IPv6Address(int(LOOPBACK6_NET.network_address) | i))


def _private_local(sock: SockInfo, addr: InetAddr, loopback) -> InetAddr:
    v4, v6 = loopback
    a = addr.unmapped()
    if sock.family == AF_INET:
        return InetAddr(AF_INET, v4, a.port)
    if a.ip.version == 4:
        return InetAddr(AF_INET6, IPv6Address("::ffff:" + str(v4)), a.port)
    return InetAddr(AF_INET6, v6, a.port)


def parse_trapped(data: bytes, addrlen: int) -> Sockaddr | Fail:
    try:
        return parse_sockaddr(data, addrlen)
    except SockaddrError as exc:
        return Fail(exc.errno, str(exc))


def local_for(ep: Endpoint, family: int, port: int | None = None) -> InetAddr | Fail:
    """The endpoint's host address expressed in the socket's family."""
    assert ep.addr is not None
    p = (ep.port or 0) if port is None else port
    if family == AF_INET:
        if not isinstance(ep.addr, IPv4Address):
            return Fail(errno.EAFNOSUPPORT, f"endpoint {ep.name} is IPv6 but the socket is IPv4")
        return InetAddr(AF_INET, ep.addr, p)
    if isinstance(ep.addr, IPv4Address):
        return InetAddr(AF_INET6, IPv6Address("::ffff:" + str(ep.addr)), p)
    return InetAddr(AF_INET6, ep.addr, p)


def _family_ok(sock: SockInfo, addr: InetAddr) -> bool:
    return sock.family == addr.family


def _keeps_loopback(rule, addr: InetAddr) -> bool:
    """A container's loopback is its own (sidecars, local services): a broad
    egress rule such as 0.0.0.0/0 (or none: rule None) never moves it onto
    the host's loopback. Only a rule whose prefix lies inside the loopback
    range grafts it. connect() to 0.0.0.0 / :: means "this host" to Linux:
    the container's own."""
    ip = addr.unmapped().ip
    if ip.is_unspecified:
        return True
    if not ip.is_loopback:
        return False
    return rule is None or not rule.network.subnet_of(IPv4Network("127.0.0.0/8") if ip.version == 4
                                      else IPv6Network("::1/128"))


def unclaimed_host_bind(addr: InetAddr, host_addrs: frozenset) -> bool:
    """A bind to one of the host's own addresses that no ingress rule grants:
    an attempt to take a host address, refused (EACCES) and audited. Loopback
    and wildcards are the container's own."""
    ip = addr.unmapped().ip
    return not ip.is_unspecified and not ip.is_loopback and ip in host_addrs


_V4_ANY = IPv4Address(0)


def match_bind(cfg: GraftConfig, sock: SockInfo, addr: InetAddr):
    """The ingress rule and endpoint for a bind, dual-stack aware: a bind to
    [::]:P on an AF_INET6 socket that takes IPv4 too (IPV6_V6ONLY off, as Go,
    Node and busybox servers do) is covered by a rule for 0.0.0.0:P when no
    IPv6 rule is: users write IPv4 rules, and the server must not stay
    inside the container silently. Its host socket is bound to the IPv4
    endpoint as a mapped address (IPv4 only, as the rule said)."""
    hit = cfg.match_ingress(addr)
    if hit is None and _dual_stack_any(sock, addr):
        hit = cfg.match_ingress(InetAddr(AF_INET, _V4_ANY, addr.port))
    return hit


def _dual_stack_any(sock: SockInfo, addr: InetAddr) -> bool:
    return sock.family == AF_INET6 and not sock.v6only and addr.family == AF_INET6 and \
        addr.ip.is_unspecified


def unmatched_bind_note(cfg: GraftConfig, sock: SockInfo, addr: InetAddr) -> str | None:
    """Why a bind no rule matched was probably meant by one, or None: a rule
    for the same port in the other family, or for the wildcard when the
    application bound loopback."""
    a = addr.unmapped()
    port = a.port
    if a.ip.is_loopback:
        hit = cfg.match_ingress(InetAddr(a.family, a.ip.__class__(0), port))
        if hit is not None:
            return (f"bind {addr} stays in the container: rule {hit[0]} covers the "
                    "wildcard, and a container's loopback is its own")
        return None
    if not a.ip.is_unspecified:
        return None
    if a.family == AF_INET6:
        hit = cfg.match_ingress(InetAddr(AF_INET, _V4_ANY, port))
        if hit is not None:
            return (f"bind {addr} stays in the container: the socket is IPv6-only "
                    f"(IPV6_V6ONLY) and rule {hit[0]} is IPv4; add [::]:{port}=ENDPOINT")
        return None
    v6 = cfg.match_ingress(InetAddr(AF_INET6, IPv6Address(0), port))
    if v6 is not None:
        return (f"bind {addr} stays in the container: rule {v6[0]} is IPv6 and the "
                f"socket IPv4; add 0.0.0.0:{port}=ENDPOINT")
    return None


def decide_bind(cfg: GraftConfig | None, sock: SockInfo, addr: Sockaddr,
                host_addrs: frozenset = frozenset(), loopback=None,
                reserved: tuple[tuple[int, int], ...] = ()) -> Action:
    """loopback: a socket-mode container's private loopback addresses
    (`private_loopback`), where its loopback binds go; None otherwise.
    reserved: port ranges the host's own services keep (a private loopback
    is a host address: a bind there would take a port from a host service's
    later wildcard bind) - refused to loopback binds."""
    if sock.grafted and not sock.bound:
        return _bind_fresh_host_socket(cfg, sock, addr, loopback, reserved)
    if sock.grafted:
        # Bound on the host before (by the agent), perhaps disconnected since
        # (connect(AF_UNSPEC) releases the port): it never binds again.
        if not isinstance(addr, InetAddr) or not _family_ok(sock, addr):
            return Fail(errno.EAFNOSUPPORT, "not an address of the socket's family")
        if cfg is not None and match_bind(cfg, sock, addr) is not None:
            return Fail(errno.EINVAL, "socket is already bound on the host")
        return Deny(errno.EACCES, "bind:no-endpoint", addr)
    if not isinstance(addr, InetAddr) or cfg is None or not _family_ok(sock, addr):
        return Continue("not an inet bind of a configured container")
    hit = match_bind(cfg, sock, addr)
    if hit is None:
        if unclaimed_host_bind(addr, host_addrs):
            return Deny(errno.EACCES, "bind:no-endpoint", addr)
        note = unmatched_bind_note(cfg, sock, addr)
        return Continue(note, note=True) if note else Continue("no ingress rule")
    rule, ep = hit
    if not sock.inet:
        return Continue("not a TCP or UDP socket")
    port = 0 if ep.is_dynamic else ingress_host_port(rule, ep, addr.unmapped().port)
    local = local_for(ep, sock.family, port)
    if isinstance(local, Fail):
        return local
    return GraftBind(ep, local, addr, f"ingress {rule}")


def _bind_fresh_host_socket(cfg: GraftConfig | None, sock: SockInfo,
                            addr: Sockaddr, loopback=None,
                            reserved: tuple[tuple[int, int], ...] = ()) -> Action:
    """A socket grafted at socket() lives on the host already: a bind either
    follows an ingress rule, or is an ephemeral wildcard bind (a client
    choosing no address: nothing is bound, so the socket later leaves from
    its egress endpoint and can never listen on every host address), or
    takes a host address nobody granted (denied). The kernel never binds it
    from the application's buffer."""
    if not isinstance(addr, InetAddr) or not _family_ok(sock, addr):
        return Fail(errno.EAFNOSUPPORT, "not an address of the socket's family")
    if not sock.inet:
        return Fail(errno.EOPNOTSUPP, "not a TCP or UDP socket")
    hit = match_bind(cfg, sock, addr) if cfg is not None else None
    if hit is not None:
        rule, ep = hit
        port = 0 if ep.is_dynamic else ingress_host_port(rule, ep, addr.unmapped().port)
        local = local_for(ep, sock.family, port)
        if isinstance(local, Fail):
            return local
        return BindGrafted(ep, local, addr, f"ingress {rule}")
    if addr.unmapped().ip.is_unspecified and addr.port == 0:
        return BindGrafted(None, addr, addr, "bind:ephemeral")
    if loopback is not None and addr.unmapped().ip.is_loopback:
        if any(lo <= addr.port <= hi for lo, hi in reserved):
            return Deny(errno.EACCES, "bind:host-reserved-port", addr)
        return BindLoopback(_private_local(sock, addr, loopback), addr)
    return Deny(errno.EACCES, "bind:no-endpoint", addr)


# (proto, overlay ip, port) -> (host ip, host port): the cluster directory's view
Services = Mapping[tuple[str, IPv4Address | IPv6Address, int],
                   tuple[IPv4Address | IPv6Address, int]]


def via_directory(services: Services, proto: str, addr: InetAddr,
                  family: int) -> InetAddr | None:
    """The published host address of the grafted server behind overlay `addr`,
    in the socket's family (IPv4 in a v6 socket: mapped), or None."""
    a = addr.unmapped()
    hit = services.get((proto, a.ip, a.port))
    if hit is None:
        return None
    ip, port = hit
    if family == AF_INET:
        return InetAddr(AF_INET, ip, port) if ip.version == 4 else None
    if ip.version == 4:
        return InetAddr(AF_INET6, IPv6Address("::ffff:" + str(ip)), port)
    return InetAddr(AF_INET6, ip, port)


def may_follow(policy, proto: str, host: InetAddr) -> bool:
    """May a client whose policy allowed an overlay destination be sent to
    the host address:port the directory names for it? Its explicit deny rules
    and built-in categories judge the host address too (a record can never
    send a client to loopback or metadata it may not reach itself); the allow
    list is judged on the address the application asked for (the client
    allowed the service, not the node it happens to run on)."""
    verdict = decide(policy, proto, host.unmapped())
    return verdict.allowed or verdict.rule == "default:allowlist"


def followable(policy, services: Services) -> Services:
    """The part of the directory a container with `policy` may be sent
    through: its overlay destination allowed, its host address not refused
    (may_follow). What the nftables and BPF exceptions are built from."""
    out = {}
    for (proto, ov, port), (hip, hport) in services.items():
        if decide(policy, proto, InetAddr(AF_INET if ov.version == 4 else AF_INET6, ov,
                                          port)).allowed and \
                may_follow(policy, proto, InetAddr(AF_INET if hip.version == 4 else AF_INET6,
                                                   hip, hport)):
            out[(proto, ov, port)] = (hip, hport)
    return out


def decide_connect(cfg: GraftConfig | None, sock: SockInfo, addr: Sockaddr,
                   services: Services | None = None) -> Action:
    if isinstance(addr, (UnixAddr, UnspecAddr, OtherAddr)) or cfg is None:
        return Continue("not an inet destination of a configured container")
    if not _family_ok(sock, addr):
        return Continue("address family differs from the socket's; the kernel decides")
    if not sock.inet:
        return Continue("not a TCP or UDP socket")
    hit = cfg.match_egress(addr)
    if sock.grafted:
        # Already on the host (bound through an ingress rule, or a UDP socket
        # reconnecting): the destination is checked and connected by the agent.
        # The container's loopback (and "this host") is not the host's: a
        # host socket reaches the host's own loopback only where an egress
        # rule names it, as for any other socket - a policy that allows
        # 127.0.0.1:8080 means the container's sidecar, never the node's
        # service on that port (the kernel's guard refuses it the same way
        # after a continue: loopback:container-own)
        if _keeps_loopback(hit[0] if hit is not None else None, addr):
            return Deny(errno.EACCES, "loopback:container-own", addr)
        verdict = decide(cfg.policy, sock.proto, addr.unmapped())
        if not verdict.allowed:
            return Deny(verdict.errno, verdict.rule, addr)
        return ConnectGrafted(addr, verdict.rule)
    if hit is None:
        return Continue("no egress rule")
    rule, ep = hit
    if _keeps_loopback(rule, addr):
        return Continue("container loopback stays in the container")
    verdict = decide(cfg.policy, sock.proto, addr.unmapped())
    if not verdict.allowed:
        return Deny(verdict.errno, verdict.rule, addr)
    local = local_for(ep, sock.family, 0 if ep.is_dynamic else ep.port)
    if isinstance(local, Fail):
        return local
    if services:
        # Judged above on the overlay address the application asked for; the
        # host socket goes straight to where the server's graft listens.
        via = via_directory(services, sock.proto, addr, sock.family)
        if via is not None and may_follow(cfg.policy, sock.proto, via):
            return GraftConnect(ep, local, via, f"egress {rule} via directory", overlay=addr)
    return GraftConnect(ep, local, addr, f"egress {rule}")


def decide_sendto(cfg: GraftConfig | None, sock: SockInfo, addr: Sockaddr,
                  flags: int = 0) -> Action:
    if not isinstance(addr, InetAddr) or cfg is None or not _family_ok(sock, addr):
        return Continue("not an inet destination of a configured container")
    if sock.grafted:
        return Continue("grafted socket: nftables checks each datagram")
    hit = cfg.match_egress(addr)
    if hit is None:
        return Continue("no egress rule")
    rule, ep = hit
    if _keeps_loopback(rule, addr):
        return Continue("container loopback stays in the container")
    if not sock.inet:
        return Continue("not a TCP or UDP socket")
    if sock.type == SOCK_STREAM:
        if flags & MSG_FASTOPEN:
            return Fail(errno.EOPNOTSUPP, "TCP fast open to a grafted destination")
        return Continue("sendto on a stream socket ignores the address")
    verdict = decide(cfg.policy, "udp", addr.unmapped())
    if not verdict.allowed:
        return Deny(verdict.errno, verdict.rule, addr)
    local = local_for(ep, sock.family, 0 if ep.is_dynamic else ep.port)
    if isinstance(local, Fail):
        return local
    return GraftSend(ep, local, addr, f"egress {rule}")


def prefilter(call: str, cfg: GraftConfig, addr: Sockaddr) -> Action | None:
    """An answer to a trapped bind/connect/sendto ("call") of a configured
    container that cannot depend on the target's socket, so the agent does
    not copy it; None: decide_<call> needs the socket. Agrees with the
    decide_* functions wherever it answers (table-tested against them):
    connect/sendto to a non-inet address is the kernel's to judge, and a
    sendto with no egress rule starts no graft (a grafted socket's datagrams
    are judged in the kernel). A bind always needs the socket: a grafted
    one is never handed back to the kernel."""
    if call == "bind":
        return None
    if not isinstance(addr, InetAddr):
        return Continue("not an inet address: the kernel decides")
    if call == "sendto" and cfg.match_egress(addr) is None:
        return Continue("no egress rule")
    return None


def decide_malformed(sock: SockInfo | None, fail: Fail) -> Action:
    """A sockaddr the kernel would refuse (`fail`: its errno). On a container
    socket (or no socket) the kernel gives its own, exact errno: Continue; on
    a grafted host socket the agent answers, so the kernel never re-reads a
    buffer nobody checked."""
    if sock is not None and sock.grafted:
        return fail
    return Continue("malformed sockaddr on a container socket: the kernel answers")


def decide_listen(sock: SockInfo | None) -> Action:
    """listen() on fd. sock None: not a socket (the agent answers the
    kernel's errno itself). A grafted socket listens only if the agent bound
    it through an ingress rule: a never-bound one would be autobound to an
    ephemeral port on every host address, a disconnected client socket would
    listen on its endpoint address, neither of which any rule granted.
    Everything else (the container's own sockets) listens as asked - done by
    the agent on its own duplicate, so a racing dup2() cannot swap a grafted
    socket in under the fd number after the check."""
    if sock is not None and sock.grafted and not sock.ingress:
        return Deny(errno.EACCES, "listen:no-endpoint",
                    InetAddr(sock.family, IPv4Address(0) if sock.family == AF_INET
                             else IPv6Address(0), 0))
    return Listen("listen")
