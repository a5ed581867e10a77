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
"""

from __future__ import annotations

from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address
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


@dataclass
class Plan:
    ports: dict[bytes, bytes] = field(default_factory=dict)      # sg_fast_ports
    addrs: dict[bytes, bytes] = field(default_factory=dict)      # sg_fast_addrs
    conflicts: list[str] = field(default_factory=list)
    judged: dict[int, str] = field(default_factory=dict)         # ifindex -> container


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


def _routable(a: IPv4Address | IPv6Address) -> bool:
    return not (a.is_link_local or a.is_loopback or a.is_multicast or a.is_unspecified)


def plan(ports: Iterable[Port], marks: Mapping[str, int],
         slots: Mapping[int, int] | None = None) -> Plan:
    """marks: container -> the mark of its policy entry (configured
    containers only); slots: ifindex -> its counters' slot (default: the
    order of the interfaces)."""
    out = Plan()
    owners: dict[bytes, list[Port]] = {}
    mark_of: dict[int, int] = {}
    for i, port in enumerate(sorted(ports, key=lambda p: p.ifindex)):
        mark = mark_of[port.ifindex] = marks.get(port.container or "", 0)
        slot = slots[port.ifindex] if slots is not None else i
        own = [a for a in port.addrs if _routable(a)]
        out.ports[bpfmaps.fast_port_key(port.ifindex)] = bpfmaps.fast_port_val(mark, slot,
                                                                                own)
        if mark:
            out.judged[port.ifindex] = port.container or ""
        if len(port.mac) != 6:
            continue
        for a in port.addrs:
            if _routable(a):
                owners.setdefault(bpfmaps.fast_addr_key(a), []).append(port)
    for key, claimed in owners.items():
        if len(claimed) == 1:
            p = claimed[0]
            out.addrs[key] = bpfmaps.fast_addr_val(p.ifindex, p.mac, mark_of[p.ifindex])
        else:
            addr = _addr_of(key)
            out.conflicts.append(f"{addr} is claimed by "
                                 f"{', '.join(p.ifname for p in claimed)}: normal path")
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


__all__ = ["Port", "Plan", "container_of", "plan", "diff", "moved"]
