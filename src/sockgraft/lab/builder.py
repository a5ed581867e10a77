"""Apply a LabPlan to the kernel (`lab up`) and tear it down (`lab down`).

Every kernel object of the lab lives in the lab's own namespaces, so the only
resources acquired in the root namespace are the namespaces themselves. Each
is registered for rollback as it is created; an error anywhere in `up` unwinds
in reverse order and removes the state file, leaving the machine as it was.
Must not: parse or validate topology (model/topology does that first, before
anything is created).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable

from ..errors import LabError, SockgraftError
from ..kernel import bpf as kbpf
from ..kernel import links, netns, nft
from ..model.topology import (BRIDGE, CONTAINER_IF, FABRIC_BRIDGE, NAT_TABLE, UNDERLAY_PORT,
                              VXLAN, ContainerPlan, HostPlan, LabPlan, plan_host_sysctls,
                              plan_nat_ruleset)
from . import state as lab_state

log = logging.getLogger("sockgraft.lab")

Progress = Callable[[str], None]


def _quiet(_msg: str) -> None:
    pass


def up(plan: LabPlan, topology_text: str, source: str, progress: Progress = _quiet) -> None:
    if lab_state.read(plan.name) is not None:
        raise LabError(f"lab {plan.name!r} is already up; run `sockgraft lab down"
                       f"{'' if plan.name == 'demo' else ' --name ' + plan.name}` first")
    clash = [n for n in plan.namespaces if netns.exists(n)]
    if clash:
        raise LabError(f"namespaces already exist that the lab would create: {', '.join(clash)}"
                       " (not created by a known lab; remove them with `ip netns del`)")
    lab_state.write(lab_state.LabState(plan.name, "creating", source, topology_text,
                                       list(plan.namespaces)))
    with contextlib.ExitStack() as undo:
        undo.callback(lab_state.remove, plan.name)
        for name in plan.namespaces:
            progress(f"netns {name}")
            netns.create(name)
            undo.callback(_delete_ns, name)
            netns.write_sysctls(name, plan_host_sysctls(any(h.netns == name for h in plan.hosts)))
        _build_fabric(plan)
        for host in plan.hosts:
            progress(f"host {host.name}: underlay, bridge, containers")
            _build_host(plan, host)
        for host in plan.hosts:
            progress(f"host {host.name}: vxlan overlay, nat")
            _build_overlay(plan, host)
            nft.apply(host.netns, plan_nat_ruleset(plan, host))
        lab_state.write(lab_state.LabState(plan.name, "up", source, topology_text,
                                           list(plan.namespaces)))
        undo.pop_all()
    log.info("lab %s up: %d hosts, %d containers", plan.name, len(plan.hosts),
             len(plan.containers))


def _delete_ns(name: str) -> None:
    netns.kill_pids(name)
    netns.delete(name)


def _build_fabric(plan: LabPlan) -> None:
    with links.open_ns(plan.fabric_netns) as ns:
        links.set_up(ns, "lo")
        links.add_bridge(ns, FABRIC_BRIDGE)
        for host in plan.hosts:
            links.add_veth(ns, host.fabric_port, UNDERLAY_PORT, host.netns)
            links.enslave(ns, host.fabric_port, FABRIC_BRIDGE)
            links.set_up(ns, host.fabric_port)


def _build_host(plan: LabPlan, host: HostPlan) -> None:
    with links.open_ns(host.netns) as ns:
        links.set_up(ns, "lo")
        links.add_addr(ns, UNDERLAY_PORT, host.underlay)
        links.set_up(ns, UNDERLAY_PORT)
        links.add_bridge(ns, BRIDGE, plan.mtu)
        links.add_addr(ns, BRIDGE, host.bridge4)
        links.add_addr(ns, BRIDGE, host.bridge6)
        for c in host.containers:
            links.add_veth(ns, c.veth_host, CONTAINER_IF, c.netns, plan.mtu)
            links.enslave(ns, c.veth_host, BRIDGE)
            links.set_up(ns, c.veth_host)
            _build_container(plan, c)


def _build_container(plan: LabPlan, c: ContainerPlan) -> None:
    with links.open_ns(c.netns) as ns:
        links.set_up(ns, "lo")
        links.add_addr(ns, CONTAINER_IF, c.ipv4)
        links.add_addr(ns, CONTAINER_IF, c.ipv6)
        links.set_up(ns, CONTAINER_IF, plan.mtu)
        links.add_route(ns, "0.0.0.0/0", gateway=str(c.gateway4))
        links.add_route(ns, "::/0", gateway=str(c.gateway6))


def _build_overlay(plan: LabPlan, host: HostPlan) -> None:
    """flannel's vxlan backend: one VTEP per host, static routes, ARP/NDP and
    FDB entries for every other host (no learning, no multicast)."""
    with links.open_ns(host.netns) as ns:
        links.add_vxlan(ns, VXLAN, plan.vxlan_id, str(host.underlay.ip), plan.vxlan_port,
                        UNDERLAY_PORT, host.vtep_mac, plan.mtu)
        links.add_addr(ns, VXLAN, _iface(host.vtep4, 32))
        links.add_addr(ns, VXLAN, _iface(host.vtep6, 128))
        for peer in plan.hosts:
            if peer is host:
                continue
            links.add_neigh(ns, VXLAN, str(peer.vtep4), peer.vtep_mac)
            links.add_neigh(ns, VXLAN, str(peer.vtep6), peer.vtep_mac)
            links.add_fdb(ns, VXLAN, peer.vtep_mac, str(peer.underlay.ip))
            links.add_route(ns, str(peer.subnet4), gateway=str(peer.vtep4), dev=VXLAN, onlink=True)
            links.add_route(ns, str(peer.subnet6), gateway=str(peer.vtep6), dev=VXLAN, onlink=True)


def _iface(ip, prefix: int):
    import ipaddress
    return ipaddress.ip_interface(f"{ip}/{prefix}")


def down(lab: str, progress: Progress = _quiet) -> bool:
    """Remove exactly what `up` created for this lab. Idempotent: False if the
    lab was not up."""
    st = lab_state.read(lab)
    if st is None:
        return False
    for name in reversed(st.namespaces):
        if netns.exists(name):
            progress(f"delete netns {name}")
            _delete_ns(name)
    for host in st.plan().hosts:
        # the agents' in-kernel programs: pinned links and their cgroups
        for path in kbpf.remove(f"{lab}-{host.name}"):
            progress(f"removed {path}")
    lab_state.remove(lab)
    log.info("lab %s down", lab)
    return True


def status(lab: str) -> dict:
    st = lab_state.read(lab)
    if st is None:
        raise LabError(f"lab {lab!r} is not up (known labs: "
                       f"{', '.join(lab_state.list_labs()) or 'none'})")
    from ..model.topology import plan_to_dict
    plan = st.plan()
    out = plan_to_dict(plan)
    out["status"] = st.status
    for h, hp in zip(out["hosts"], plan.hosts):
        h["present"] = netns.exists(h["netns"])
        counters = _counters_or_empty(h["netns"]) if h["present"] else {}
        h["underlay_bytes"] = _rx_tx(counters.get(UNDERLAY_PORT))
        for c, cp in zip(h["containers"], hp.containers):
            c["present"] = netns.exists(c["netns"])
            c["host"] = h["name"]
            # the host side of the veth: rx = what the container sent, tx = what
            # it was sent; grafted traffic never crosses it
            c["veth"] = cp.veth_host
            c["veth_bytes"] = _rx_tx(counters.get(cp.veth_host))
    return out


def _counters_or_empty(netns_name: str) -> dict[str, dict[str, int]]:
    try:
        return interface_counters(netns_name)
    except SockgraftError:
        return {}


def _rx_tx(c: dict[str, int] | None) -> dict[str, int] | None:
    """{"from": bytes received from the node, "to": bytes sent to it} or None."""
    return None if c is None else {"from": c["rx_bytes"], "to": c["tx_bytes"]}


def interface_counters(netns_name: str) -> dict[str, dict[str, int]]:
    with links.open_ns(netns_name) as ns:
        return links.counters(ns)


__all__ = ["up", "down", "status", "interface_counters", "NAT_TABLE"]
