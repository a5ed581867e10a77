"""The packet fast path's desired state (model/fastpath.py) and its map bytes
(model/bpfmaps.py): which interfaces are judged, which addresses lead where,
conflicts, and the differences the agent writes."""

from __future__ import annotations

import re
from ipaddress import ip_address

import pytest

from sockgraft.errors import ConfigError
from sockgraft.model import bpfmaps
from sockgraft.model import fastpath as mf

pytestmark = pytest.mark.unit

MAC1, MAC2, MAC3 = bytes.fromhex("020000000001"), bytes.fromhex("020000000002"), \
    bytes.fromhex("020000000003")


GW = bytes.fromhex("0200000000ff")


def port(ifindex, container, mac, *addrs):
    return mf.Port(ifindex, f"veth{ifindex}", container, mac,
                   tuple(ip_address(a) for a in addrs), GW)


def test_container_of_prefers_cni_then_the_lab_naming():
    cni = {"/var/run/netns/cni-1234": "default.web"}
    assert mf.container_of("/var/run/netns/cni-1234", lab=None, cni=cni) == "default.web"
    assert mf.container_of("/run/netns/sg-demo-h1-c1", lab="demo", cni={}) == "h1-c1"
    # another lab's namespace is no container of this one
    assert mf.container_of("/run/netns/sg-other-h1-c1", lab="demo", cni={}) is None
    assert mf.container_of("/run/netns/web", lab=None, cni={}) == "web"
    assert mf.container_of("/proc/123/ns/net", lab=None, cni={}) is None


def test_plan_judges_configured_containers_and_maps_their_addresses():
    ports = [port(7, "a", MAC1, "10.0.0.2", "fd00::2", "fe80::1"),
             port(9, "b", MAC2, "10.0.0.3"),
             port(11, None, MAC3, "10.0.0.4")]
    plan = mf.plan(ports, {"a": 0x53470001})
    assert plan.judged == {7: "a"}
    assert bpfmaps.FAST_PORT.unpack(plan.ports[bpfmaps.fast_port_key(7)]) == (
        0x53470001, 0, ip_address("10.0.0.2").packed, ip_address("fd00::2").packed, GW, MAC1)
    assert bpfmaps.FAST_PORT.unpack(plan.ports[bpfmaps.fast_port_key(9)]) == (
        0, 1, ip_address("10.0.0.3").packed, bytes(16), GW, MAC2)
    assert set(plan.ports) == {bpfmaps.fast_port_key(i) for i in (7, 9, 11)}
    got = {str(mf._addr_of(k)): bpfmaps.FAST_ADDR_VAL.unpack(v)
           for k, v in plan.addrs.items()}
    # link-local is never a fast destination; the owner's mark travels along
    assert got == {"10.0.0.2": (7, MAC1, GW, 0x53470001, 0, 0),
                   "fd00::2": (7, MAC1, GW, 0x53470001, 0, 0),
                   "10.0.0.3": (9, MAC2, GW, 0, 1, 0), "10.0.0.4": (11, MAC3, GW, 0, 2, 0)}
    # slots as the agent assigned them
    again = mf.plan(ports, {"a": 0x53470001}, {7: 5, 9: 0, 11: 1})
    assert bpfmaps.FAST_PORT.unpack(again.ports[bpfmaps.fast_port_key(7)])[1] == 5
    assert plan.conflicts == []


def test_an_address_claimed_twice_leads_nowhere_fast():
    plan = mf.plan([port(7, "a", MAC1, "10.0.0.2"), port(9, "b", MAC2, "10.0.0.2",
                                                        "10.0.0.3")], {})
    assert bpfmaps.fast_addr_key(ip_address("10.0.0.2")) not in plan.addrs
    assert bpfmaps.fast_addr_key(ip_address("10.0.0.3")) in plan.addrs
    assert len(plan.conflicts) == 1 and re.search(r"10\.0\.0\.2 .*veth7, veth9",
                                                  plan.conflicts[0])


def test_a_port_without_a_mac_forwards_nothing_to_it():
    plan = mf.plan([port(7, "a", b"", "10.0.0.2")], {})
    assert plan.addrs == {} and bpfmaps.fast_port_key(7) in plan.ports


def test_diff_and_moved_addresses():
    old = mf.plan([port(7, "a", MAC1, "10.0.0.2"), port(9, "b", MAC2, "10.0.0.3")], {})
    # b went away; a new container c took its address
    new = mf.plan([port(7, "a", MAC1, "10.0.0.2"), port(12, "c", MAC3, "10.0.0.3")], {})
    writes, deletes = mf.diff(old.ports, new.ports)
    assert set(writes) == {bpfmaps.fast_port_key(12)}
    assert deletes == [bpfmaps.fast_port_key(9)]
    writes, deletes = mf.diff(old.addrs, new.addrs)
    assert list(writes) == [bpfmaps.fast_addr_key(ip_address("10.0.0.3"))] and deletes == []
    assert mf.moved(old.addrs, new.addrs) == {ip_address("10.0.0.3")}
    assert mf.moved(new.addrs, new.addrs) == set()


def test_flow_key_layout_is_the_programs():
    key = bpfmaps.FLOW_KEY.pack(42, 6, 6, 0x5000, 0xbb01, 0, ip_address("fd00::9").packed)
    assert len(key) == 28
    key4 = bpfmaps.FLOW_KEY.pack(3, 4, 17, 1, 2, 0, ip_address("10.1.2.3").packed.ljust(16,
                                                                                       b"\0"))
    by_addr = bpfmaps.flow_matcher({ip_address("10.1.2.3")})
    assert by_addr(key4) and not by_addr(key)
    # the same 16 bytes under the other family are another address
    assert not bpfmaps.flow_matcher({ip_address("::a01:203")})(key4)
    assert bpfmaps.flow_matcher({ip_address("fd00::9")})(key)
    frags = bpfmaps.FLOW_KEY.pack(42, 6, 17, 0x1234, 0x5678, 1, ip_address("fd00::9").packed)
    assert bpfmaps.flow_is_flow(key) and not bpfmaps.flow_is_flow(frags)


def test_a_bad_mac_is_a_clear_error():
    with pytest.raises(ConfigError, match="6 bytes"):
        bpfmaps.fast_addr_val(3, b"\1\2")


def test_packet_denials_decode_as_packets():
    raw = bpfmaps.EVENT.pack(bpfmaps.EV_DENY_POLICY, 0x53470001, 7, 0,
                             ip_address("10.0.0.3").packed.ljust(16, b"\0"), 7120, 4, 6, 0)
    ev = bpfmaps.decode_event(raw)
    assert (ev.op, ev.address, ev.proto, ev.reason) == ("packet", "10.0.0.3:7120", "tcp",
                                                        "policy")


VX = bytes.fromhex("025347000001")
VX2 = bytes.fromhex("025347000002")
UL, HOP = bytes.fromhex("0a0000000001"), bytes.fromhex("0a0000000002")


def overlay(**kw):
    base = dict(ifindex=6, ifname="sg-vx0", vni=42, dport=8472, local="198.18.0.1",
                underlay=2, mac=VX,
                routes=(("198.19.2.0/24", "198.19.2.0"),
                        ("fd53:6700:0:2::/64", "fd53:6700:0:ffff::2")),
                neighbours=(("198.19.2.0", VX2), ("fd53:6700:0:ffff::2", VX2)),
                fdb=((VX2, "198.18.0.2"),),
                next_hops=(("198.18.0.2", 2, HOP, UL),))
    base.update(kw)
    return mf.Overlay(**base)


def test_remote_entries_are_the_outer_headers_the_vxlan_device_would_write():
    plan = mf.plan_remote([overlay()], (32768, 60999))
    assert plan.waiting == []
    v4 = bpfmaps.REMOTE_VAL.unpack(plan.remote[bpfmaps.remote_key(
        __import__("ipaddress").ip_network("198.19.2.0/24"))])
    assert v4 == (2, ip_address("198.18.0.1").packed, ip_address("198.18.0.2").packed, 42,
                  bpfmaps._be16(8472), HOP, UL, VX2, VX, 32768, 60999, 1450)
    assert len(plan.remote) == 2            # the IPv6 overlay route too (outer IPv4)
    assert list(plan.peers) == [ip_address("198.18.0.2").packed]
    assert bpfmaps.TUNNEL_VAL.unpack(plan.tunnels[bpfmaps.fast_port_key(2)]) == (
        42, ip_address("198.18.0.1").packed, bpfmaps._be16(8472), VX)
    # LPM key: 32 + prefix length, then family and address
    k = bpfmaps.REMOTE_KEY.unpack(bpfmaps.remote_key(
        __import__("ipaddress").ip_network("fd53:6700:0:2::/64")))
    assert k[:2] == (32 + 64, 6)


@pytest.mark.parametrize("change, reason", [
    (dict(next_hops=()), "not resolved yet"),
    (dict(fdb=()), "no FDB entry"),
    (dict(neighbours=()), "no neighbour"),
])
def test_an_unresolved_route_is_left_to_the_normal_path(change, reason):
    plan = mf.plan_remote([overlay(**change)], (32768, 60999))
    assert plan.remote == {}
    assert len(plan.waiting) == 2 and all(reason in w for w in plan.waiting)
    # the tunnel still decapsulates what the other host sends the fast way
    assert bpfmaps.fast_port_key(2) in plan.tunnels


def test_an_overlay_without_an_ipv4_local_address_is_left_alone():
    plan = mf.plan_remote([overlay(local="")], (32768, 60999))
    assert plan.remote == {} and plan.tunnels == {} and plan.waiting


def test_a_grafted_servers_dnat_keeps_its_packets_on_the_normal_path():
    """A container address:port that a grafted server's DNAT takes is listed
    (and its address flagged), so the programs never deliver around it;
    published-port redirects (the host's address) need nothing."""
    from sockgraft.model.redirect import Redirect
    reds = [Redirect("tcp", 4, ip_address("10.0.0.3"), 80, ip_address("198.18.0.1"), 9080,
                     "container address"),
            Redirect("tcp", 4, None, 8080, ip_address("198.18.0.1"), 9080, "published")]
    plan = mf.plan([port(7, "a", MAC1, "10.0.0.2"), port(9, "b", MAC2, "10.0.0.3")], {},
                   redirects=reds)
    assert list(plan.redirects) == [bpfmaps.redirect_key("tcp", ip_address("10.0.0.3"), 80)]
    flags = {str(mf._addr_of(k)): bpfmaps.FAST_ADDR_VAL.unpack(v)[5]
             for k, v in plan.addrs.items()}
    assert flags == {"10.0.0.2": 0, "10.0.0.3": bpfmaps.FA_REDIRECTS}
    k = bpfmaps.REDIRECT_KEY.unpack(plan_key := list(plan.redirects)[0])
    assert k[:3] == (4, 6, bpfmaps._be16(80)) and len(plan_key) == 20


def test_the_containers_interfaces_among_a_namespaces_links():
    """kernel/ports.veths_of: bridge ports that are veths with a peer in another
    namespace; VXLAN devices listed apart; everything else left out."""
    from sockgraft.kernel.ports import Link, Veth, veths_of
    br = Link(2, "br0", "bridge", None, None, None, b"\2" * 6)
    links = [
        Link(9, "c2", "veth", 2, 0, 7, b"\x09" * 6),
        Link(5, "c1", "veth", 2, 1, 3, b"\5" * 6),
        Link(6, "loose", "veth", None, 0, 4, b""),        # not a bridge port
        Link(7, "same-ns", "veth", 2, None, 8, b""),      # peer in this namespace
        Link(8, "minus", "veth", 2, -1, 8, b""),          # no id for the peer's namespace
        Link(10, "dummy", "dummy", 2, 0, 1, b""),         # a bridge port, not a veth
        Link(11, "vx0", "vxlan", None, None, None, b""),
        Link(12, "other-master", "veth", 6, 0, 1, b""),   # master is not a bridge
        br,
    ]
    veths, vxlans = veths_of(links)
    assert veths == [Veth(5, "c1", 1, 3, b"\2" * 6), Veth(9, "c2", 0, 7, b"\2" * 6)]
    assert vxlans == [11]
    assert veths_of([]) == ([], [])


def test_each_default_link_local_address_has_its_owner():
    """The EUI-64 link-local address of every container MAC names its port,
    the bridges' name the node (0); a MAC two interfaces share names none."""
    assert mf.eui64_link_local(bytes.fromhex("525400123456")) == \
        ip_address("fe80::5054:ff:fe12:3456")
    plan = mf.plan([port(7, "a", MAC1, "10.0.0.2"), port(9, "b", MAC2, "10.0.0.3"),
                    port(11, "c", MAC3), port(12, "d", MAC3), port(13, "e", GW)], {},
                   node_link_locals=[ip_address("fe80::1")])
    ll = {ip_address(k): int.from_bytes(v, "little") for k, v in plan.link_locals.items()}
    # the bridge's real address and its MAC's are the node's, whoever else has that MAC
    assert ll == {ip_address("fe80::ff:fe00:1"): 7, ip_address("fe80::ff:fe00:2"): 9,
                  ip_address("fe80::ff:fe00:ff"): 0, ip_address("fe80::1"): 0}
    assert [c for c in plan.conflicts if "fe80::ff:fe00:3" in c]     # MAC3: said
