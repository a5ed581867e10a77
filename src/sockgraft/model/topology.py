"""Lab topology: parse and validate the TOML file, then plan every kernel object.

Pure: turns text into a `LabPlan` that names every namespace, link and address
deterministically from the ids in the file. No I/O besides reading the packaged
default; the lab builder (lab/builder.py) applies the plan.

Schema (all keys optional except hosts; defaults shown):

    name = "demo"                      # lab name, part of every netns name
    underlay = "198.18.0.0/24"         # RFC 2544 benchmark range; host i gets .i
    container_v4 = "198.19.0.0/16"     # host i gets 198.19.i.0/24
    container_v6 = "fd53:6700::/48"    # host i gets fd53:6700:0:i::/64
    mtu = 1450                         # container/overlay MTU (flannel's default)
    vxlan_id = 42
    vxlan_port = 8472                  # flannel's VXLAN port

    [[hosts]]
    name = "h1"
    containers = ["h1-c1", { name = "h1-c2", publish = ["8080:80/tcp"] }]

Naming (netns): `sg-<lab>-<node>`, the fabric `sg-<lab>-fabric`. Inside a host
namespace: bridge `sg-br0`, VXLAN `sg-vx0`, underlay port `sg-ul0`, one veth
`sgv-<container>` per container; inside a container: `eth0`; inside the fabric:
bridge `sg-fab0` and one port `sgu-<host>` per host. Everything lives in the
lab's own namespaces, so the root namespace is never touched and the lab's
addresses are never routed out of it.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from .. import PREFIX
from ..errors import ConfigError

IFNAMSIZ = 15
NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,10}$")   # 11 chars: "sgv-" + name fits IFNAMSIZ
LAB_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
PUBLISH_RE = re.compile(r"^(\d{1,5}):(\d{1,5})(?:/(tcp|udp))?$")

TOP_KEYS = {"name", "underlay", "container_v4", "container_v6", "mtu",
            "vxlan_id", "vxlan_port", "hosts"}
HOST_KEYS = {"name", "containers"}
CONTAINER_KEYS = {"name", "publish"}

BRIDGE = "sg-br0"
VXLAN = "sg-vx0"
UNDERLAY_PORT = "sg-ul0"
FABRIC_BRIDGE = "sg-fab0"
CONTAINER_IF = "eth0"


@dataclass(frozen=True)
class Publish:
    host_port: int
    container_port: int
    proto: str = "tcp"

    def __str__(self) -> str:
        return f"{self.host_port}:{self.container_port}/{self.proto}"


@dataclass(frozen=True)
class ContainerPlan:
    name: str
    host: str
    netns: str
    index: int                     # 1-based within its host
    veth_host: str                 # in the host namespace
    ipv4: ipaddress.IPv4Interface
    ipv6: ipaddress.IPv6Interface
    gateway4: ipaddress.IPv4Address
    gateway6: ipaddress.IPv6Address
    publish: tuple[Publish, ...] = ()


@dataclass(frozen=True)
class HostPlan:
    name: str
    netns: str
    index: int                     # 1-based
    underlay: ipaddress.IPv4Interface
    fabric_port: str               # its veth end in the fabric namespace
    subnet4: ipaddress.IPv4Network
    subnet6: ipaddress.IPv6Network
    bridge4: ipaddress.IPv4Interface
    bridge6: ipaddress.IPv6Interface
    vtep4: ipaddress.IPv4Address   # on sg-vx0, flannel style (.0 of the subnet)
    vtep6: ipaddress.IPv6Address
    vtep_mac: str
    containers: tuple[ContainerPlan, ...] = ()


@dataclass(frozen=True)
class LabPlan:
    name: str
    fabric_netns: str
    underlay: ipaddress.IPv4Network
    container_v4: ipaddress.IPv4Network
    container_v6: ipaddress.IPv6Network
    mtu: int
    vxlan_id: int
    vxlan_port: int
    hosts: tuple[HostPlan, ...] = field(default=())

    @property
    def containers(self) -> tuple[ContainerPlan, ...]:
        return tuple(c for h in self.hosts for c in h.containers)

    @property
    def namespaces(self) -> tuple[str, ...]:
        """Every namespace of the lab, fabric first (creation order)."""
        return (self.fabric_netns,) + tuple(
            n for h in self.hosts for n in (h.netns, *(c.netns for c in h.containers)))

    def node(self, name: str) -> HostPlan | ContainerPlan:
        for h in self.hosts:
            if h.name == name:
                return h
            for c in h.containers:
                if c.name == name:
                    return c
        raise ConfigError(f"no host or container named {name!r} in lab {self.name!r}; "
                          f"known: {', '.join(self.node_names())}")

    def node_names(self) -> list[str]:
        return [n for h in self.hosts for n in (h.name, *(c.name for c in h.containers))]

    def host_of(self, container: ContainerPlan) -> HostPlan:
        return next(h for h in self.hosts if h.name == container.host)


def default_text() -> str:
    return resources.files("sockgraft").joinpath("data/default-lab.toml").read_text()


def parse_topology(text: str, source: str = "<default>", *, name: str | None = None) -> LabPlan:
    """Parse and validate a topology file, returning the full plan."""
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"not valid TOML: {exc}", source=source) from exc
    return plan_lab(doc, source, name_override=name)


def _err(msg: str, source: str, fld: str, value: Any) -> ConfigError:
    return ConfigError(f"{msg} (got {value!r})", source=source, field=fld, value=value)


def _unknown(d: dict, allowed: set[str], source: str, where: str) -> None:
    extra = sorted(set(d) - allowed)
    if extra:
        raise _err(f"unknown key; accepted keys: {', '.join(sorted(allowed))}",
                   source, f"{where}{extra[0]}", extra[0])


def _net(doc: dict, key: str, default: str, version: int, source: str, max_prefix: int):
    raw = doc.get(key, default)
    try:
        if not isinstance(raw, str):
            raise ValueError
        net = ipaddress.ip_network(raw, strict=True)
    except ValueError:
        raise _err(f"expected an IPv{version} network in CIDR form with no host bits",
                   source, key, raw) from None
    if net.version != version:
        raise _err(f"expected an IPv{version} network", source, key, raw)
    if net.prefixlen > max_prefix:
        raise _err(f"prefix too small for the lab; at most /{max_prefix}", source, key, raw)
    return net


def _int(doc: dict, key: str, default: int, lo: int, hi: int, source: str) -> int:
    raw = doc.get(key, default)
    if not isinstance(raw, int) or isinstance(raw, bool) or not lo <= raw <= hi:
        raise _err(f"expected an integer in {lo}..{hi}", source, key, raw)
    return raw


def _publish(raw: Any, source: str, fld: str) -> Publish:
    m = PUBLISH_RE.match(raw) if isinstance(raw, str) else None
    if not m:
        raise _err("expected HOSTPORT:CONTAINERPORT[/tcp|/udp], e.g. \"8080:80/tcp\"",
                   source, fld, raw)
    hp, cp = int(m.group(1)), int(m.group(2))
    for p in (hp, cp):
        if not 1 <= p <= 65535:
            raise _err("ports are 1..65535", source, fld, raw)
    return Publish(hp, cp, m.group(3) or "tcp")


def plan_lab(doc: dict, source: str = "<default>", *, name_override: str | None = None) -> LabPlan:
    _unknown(doc, TOP_KEYS, source, "")
    lab = name_override if name_override is not None else doc.get("name", "demo")
    if not isinstance(lab, str) or not LAB_RE.match(lab):
        raise _err("lab name: lowercase letter then up to 11 letters/digits", source, "name", lab)
    underlay = _net(doc, "underlay", "198.18.0.0/24", 4, source, 29)
    cv4 = _net(doc, "container_v4", "198.19.0.0/16", 4, source, 16)
    cv6 = _net(doc, "container_v6", "fd53:6700::/48", 6, source, 48)
    if underlay.overlaps(cv4):
        raise _err("underlay and container_v4 must not overlap", source, "container_v4", str(cv4))
    mtu = _int(doc, "mtu", 1450, 1280, 9000, source)
    vni = _int(doc, "vxlan_id", 42, 1, 2**24 - 1, source)
    vport = _int(doc, "vxlan_port", 8472, 1, 65535, source)

    hosts_raw = doc.get("hosts")
    if not isinstance(hosts_raw, list) or not hosts_raw:
        raise _err("expected a non-empty array of [[hosts]] tables", source, "hosts", hosts_raw)
    max_hosts = min(underlay.num_addresses - 2, 254, 2 ** (24 - cv4.prefixlen) - 1)
    if len(hosts_raw) > max_hosts:
        raise _err(f"at most {max_hosts} hosts fit the configured ranges", source, "hosts",
                   len(hosts_raw))

    seen: set[str] = set()
    ports_used: set[tuple[str, int, str]] = set()
    hosts: list[HostPlan] = []
    for hi, h in enumerate(hosts_raw, start=1):
        where = f"hosts[{hi - 1}]"
        if not isinstance(h, dict):
            raise _err("expected a table", source, where, h)
        _unknown(h, HOST_KEYS, source, where + ".")
        hname = h.get("name")
        if not isinstance(hname, str) or not NAME_RE.match(hname) or hname == "fabric":
            raise _err("host name: lowercase letter then up to 10 of [a-z0-9-], not 'fabric'",
                       source, where + ".name", hname)
        if hname in seen:
            raise _err("duplicate node name", source, where + ".name", hname)
        seen.add(hname)
        subnet4 = ipaddress.IPv4Network((int(cv4.network_address) + (hi << 8), 24))
        subnet6 = ipaddress.IPv6Network((int(cv6.network_address) + (hi << 64), 64))
        vtep6_net = ipaddress.IPv6Network((int(cv6.network_address) + (0xFFFF << 64), 64))
        craw = h.get("containers", [])
        if not isinstance(craw, list):
            raise _err("expected an array of names or tables", source, where + ".containers", craw)
        if len(craw) > 250:
            raise _err("at most 250 containers per host", source, where + ".containers", len(craw))
        containers: list[ContainerPlan] = []
        for ci, c in enumerate(craw, start=1):
            cwhere = f"{where}.containers[{ci - 1}]"
            if isinstance(c, str):
                c = {"name": c}
            if not isinstance(c, dict):
                raise _err("expected a name or a table", source, cwhere, c)
            _unknown(c, CONTAINER_KEYS, source, cwhere + ".")
            cname = c.get("name")
            if not isinstance(cname, str) or not NAME_RE.match(cname) or cname == "fabric":
                raise _err("container name: lowercase letter then up to 10 of [a-z0-9-]",
                           source, cwhere + ".name", cname)
            if cname in seen:
                raise _err("duplicate node name", source, cwhere + ".name", cname)
            seen.add(cname)
            pubs_raw = c.get("publish", [])
            if not isinstance(pubs_raw, list):
                raise _err("expected an array of strings", source, cwhere + ".publish", pubs_raw)
            pubs = []
            for pi, p in enumerate(pubs_raw):
                pub = _publish(p, source, f"{cwhere}.publish[{pi}]")
                key = (hname, pub.host_port, pub.proto)
                if key in ports_used:
                    raise _err(f"host port already published on host {hname}", source,
                               f"{cwhere}.publish[{pi}]", p)
                ports_used.add(key)
                pubs.append(pub)
            containers.append(ContainerPlan(
                name=cname, host=hname, netns=f"{PREFIX}-{lab}-{cname}", index=ci,
                veth_host=f"sgv-{cname}",
                ipv4=ipaddress.IPv4Interface(f"{subnet4[ci + 1]}/24"),
                ipv6=ipaddress.IPv6Interface(f"{subnet6[ci + 1]}/64"),
                gateway4=subnet4[1], gateway6=subnet6[1], publish=tuple(pubs)))
        hosts.append(HostPlan(
            name=hname, netns=f"{PREFIX}-{lab}-{hname}", index=hi,
            underlay=ipaddress.IPv4Interface(f"{underlay[hi]}/{underlay.prefixlen}"),
            fabric_port=f"sgu-{hname}",
            subnet4=subnet4, subnet6=subnet6,
            bridge4=ipaddress.IPv4Interface(f"{subnet4[1]}/24"),
            bridge6=ipaddress.IPv6Interface(f"{subnet6[1]}/64"),
            vtep4=subnet4[0], vtep6=vtep6_net[hi],
            vtep_mac="02:53:47:00:%02x:%02x" % (hi >> 8, hi & 0xFF),
            containers=tuple(containers)))
    return LabPlan(name=lab, fabric_netns=f"{PREFIX}-{lab}-fabric", underlay=underlay,
                   container_v4=cv4, container_v6=cv6, mtu=mtu, vxlan_id=vni,
                   vxlan_port=vport, hosts=tuple(hosts))


def plan_to_dict(plan: LabPlan) -> dict:
    """JSON-ready description (used by the state file and `lab status --json`)."""
    return {
        "name": plan.name,
        "fabric_netns": plan.fabric_netns,
        "underlay": str(plan.underlay),
        "container_v4": str(plan.container_v4),
        "container_v6": str(plan.container_v6),
        "hosts": [{
            "name": h.name, "netns": h.netns, "underlay_ip": str(h.underlay.ip),
            "subnet_v4": str(h.subnet4), "subnet_v6": str(h.subnet6),
            "containers": [{
                "name": c.name, "netns": c.netns, "ipv4": str(c.ipv4.ip),
                "ipv6": str(c.ipv6.ip), "publish": [str(p) for p in c.publish],
            } for c in h.containers],
        } for h in plan.hosts],
    }


NAT_TABLE = "sockgraft_lab"


def plan_host_sysctls(is_host: bool) -> dict[str, str]:
    """Per-namespace sysctls: no DAD wait anywhere; hosts route and forward."""
    # tcp_tw_reuse=1: connection-rate loops must not stall on TIME_WAIT ports
    # (the kernel default reuses them on loopback only).
    values = {"net.ipv6.conf.all.accept_dad": "0", "net.ipv6.conf.default.accept_dad": "0",
              "net.ipv4.tcp_tw_reuse": "1"}
    if is_host:
        values.update({"net.ipv4.ip_forward": "1", "net.ipv6.conf.all.forwarding": "1"})
    return values


def plan_nat_ruleset(plan: LabPlan, host: HostPlan) -> str:
    """docker0-style NAT for one host: masquerade container traffic that leaves
    through the underlay to anything but the overlay, and DNAT published ports
    arriving on the underlay address (like `docker run -p`). And the
    overlay's own port only from the underlay: the kernel's VXLAN socket
    listens on every address of the host, so a container could otherwise
    send a frame into the overlay - an inner packet with any source, to any
    container, around every check of its own packets."""
    lines = [
        f"table ip {NAT_TABLE} {{",
        "  chain input {",
        "    type filter hook input priority filter; policy accept;",
        f"    udp dport {plan.vxlan_port} iifname != \"{UNDERLAY_PORT}\" drop",
        "  }",
        "  chain postrouting {",
        "    type nat hook postrouting priority srcnat; policy accept;",
        f"    ip saddr {host.subnet4} ip daddr != {plan.container_v4} "
        f"oifname \"{UNDERLAY_PORT}\" masquerade",
        "  }",
        "  chain prerouting {",
        "    type nat hook prerouting priority dstnat; policy accept;",
    ]
    for c in host.containers:
        for p in c.publish:
            lines.append(f"    ip daddr {host.underlay.ip} {p.proto} dport {p.host_port} "
                         f"dnat to {c.ipv4.ip}:{p.container_port}")
    lines += ["  }", "}", ""]
    return "\n".join(lines)
