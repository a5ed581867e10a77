"""A grafted server stays reachable wherever it was reachable before.

Once a server's bind is grafted, its listener lives on the host, at its
endpoint address; nothing listens at the container's own address any more.
Clients that are not grafted (other containers, other hosts, the host
itself) still connect to the container IP:port, or to a published port that
the node's port mapping (the lab's DNAT, the CNI portmap plugin) sends to
the container IP:port. This module computes the redirects that take those
connections to the host listener:

  (proto, container address, port)   -> (endpoint address, endpoint port)
  (proto, published host address|any local address, host port)
                                     -> (endpoint address, endpoint port)

rendered as nftables DNAT (model/nftpolicy.py) at a priority before the
node's own port mappings (the first DNAT of a connection wins). Grafted
clients never take them: they are sent to the endpoint directly (the
directory, or their own egress rule).

Pure: port mappings in, redirects out.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Iterable

from ..errors import ConfigError

MAX_PORTS = 256
PROTOS = ("tcp", "udp")


@dataclass(frozen=True, slots=True)
class PortMap:
    """A published port: host_ip:host_port -> the container's container_port
    (host_ip None: every local address, like `docker run -p 8080:80`)."""
    proto: str
    host_port: int
    container_port: int
    host_ip: IPv4Address | IPv6Address | None = None


@dataclass(frozen=True, slots=True)
class Server:
    """A grafted server's listener: what the application bound (`ip` may be
    the wildcard) and where its host socket listens."""
    container: str
    proto: str
    ip: IPv4Address | IPv6Address
    port: int
    host_ip: IPv4Address | IPv6Address
    host_port: int


@dataclass(frozen=True, slots=True, order=True)
class Redirect:
    proto: str
    version: int                                # 4 or 6
    daddr: IPv4Address | IPv6Address | None     # None: any local address
    dport: int
    to_ip: IPv4Address | IPv6Address
    to_port: int
    why: str = ""                               # "container address" | "published"


def parse_ports(raw: object, source: str = "port mappings") -> tuple[PortMap, ...]:
    """Port mappings as a runtime hands them over: CNI runtimeConfig
    `portMappings` ({hostPort, containerPort, protocol, hostIP}) or the
    lab's publish entries ({host_port, container_port, proto})."""
    if raw is None:
        return ()
    if not isinstance(raw, list) or len(raw) > MAX_PORTS:
        raise ConfigError(f"expected a list of at most {MAX_PORTS} port mappings",
                          source=source, value=raw)
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise ConfigError(f"port mapping {i} is not an object", source=source, value=m)
        host = m.get("hostPort", m.get("host_port"))
        cont = m.get("containerPort", m.get("container_port"))
        proto = str(m.get("protocol", m.get("proto", "tcp"))).lower()
        hip = m.get("hostIP", m.get("host_ip")) or None
        for name, v in (("host port", host), ("container port", cont)):
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
                raise ConfigError(f"port mapping {i}: {name} {v!r} is not 1-65535",
                                  source=source, value=m)
        if proto not in PROTOS:
            raise ConfigError(f"port mapping {i}: protocol {proto!r}; accepted: tcp, udp",
                              source=source, value=m)
        try:
            ip = ip_address(hip) if hip is not None else None
        except (ValueError, TypeError):
            raise ConfigError(f"port mapping {i}: host IP {hip!r} is not an address",
                              source=source, value=m) from None
        if ip is not None and getattr(ip, "scope_id", None):
            raise ConfigError(f"port mapping {i}: host IP {hip!r} has a zone",
                              source=source, value=m)
        if ip is not None and ip.is_unspecified:
            ip = None
        out.append(PortMap(proto, host, cont, ip))
    return tuple(out)


def plan(servers: Iterable[Server], addresses: dict[str, Iterable[str]],
         ports: dict[str, Iterable[PortMap]]) -> list[Redirect]:
    """The redirects for a node. addresses: {container: its own addresses};
    ports: {container: its published ports}. A server reached in a family its
    host socket does not listen in (a v4 endpoint behind a v6 container
    address) gets no redirect: DNAT cannot change the family."""
    out: set[Redirect] = set()
    for s in servers:
        hv = s.host_ip.version
        own = []
        for a in addresses.get(s.container, ()):
            try:
                ip = ip_address(a)
            except ValueError:
                continue
            if not getattr(ip, "scope_id", None):      # (a zone is no container address)
                own.append(ip)
        for ip in own:
            if ip.version != hv or ip.is_loopback or ip.is_link_local:
                continue
            if s.ip.is_unspecified or s.ip == ip:
                out.add(Redirect(s.proto, hv, ip, s.port, s.host_ip, s.host_port,
                                 "container address"))
        if not (s.ip.is_unspecified or s.ip in own):
            continue       # bound to an address the port mapping does not lead to
        for m in ports.get(s.container, ()):
            if m.proto != s.proto or m.container_port != s.port:
                continue
            if m.host_ip is not None and m.host_ip.version != hv:
                continue
            out.add(Redirect(s.proto, hv, m.host_ip, m.host_port, s.host_ip, s.host_port,
                             "published"))
    return sorted(out, key=lambda r: (r.version, r.proto, str(r.daddr), r.dport))
