import ipaddress

import pytest

from sockgraft.errors import ConfigError
from sockgraft.model.paths import PathSpec, plan_paths
from sockgraft.model.topology import (IFNAMSIZ, default_text, parse_topology, plan_nat_ruleset,
                                      plan_to_dict)

pytestmark = pytest.mark.unit


def test_default_plan_is_two_hosts_of_two_containers():
    plan = parse_topology(default_text())
    assert plan.name == "demo"
    assert [h.name for h in plan.hosts] == ["h1", "h2"]
    assert [c.name for c in plan.containers] == ["h1-c1", "h1-c2", "h2-c1", "h2-c2"]
    h1, h2 = plan.hosts
    assert str(h1.underlay) == "198.18.0.1/24" and str(h2.underlay) == "198.18.0.2/24"
    assert str(h2.subnet4) == "198.19.2.0/24" and str(h2.subnet6) == "fd53:6700:0:2::/64"
    c = plan.node("h2-c2")
    assert str(c.ipv4) == "198.19.2.3/24" and str(c.ipv6) == "fd53:6700:0:2::3/64"
    assert str(c.gateway4) == "198.19.2.1"
    assert plan.namespaces[0] == "sg-demo-fabric"
    assert set(plan.namespaces) == {"sg-demo-fabric", "sg-demo-h1", "sg-demo-h2",
                                    "sg-demo-h1-c1", "sg-demo-h1-c2", "sg-demo-h2-c1",
                                    "sg-demo-h2-c2"}


def test_names_are_deterministic_and_fit_ifnamsiz():
    text = "[[hosts]]\nname='hostaaaaaaa'\ncontainers=['ctraaaaaaaa']\n"
    a = parse_topology(text, name="labxxxxxxxxx")
    b = parse_topology(text, name="labxxxxxxxxx")
    assert a == b
    for h in a.hosts:
        assert len(h.fabric_port) <= IFNAMSIZ
        for c in h.containers:
            assert len(c.veth_host) <= IFNAMSIZ
    assert all(n.startswith("sg-labxxxxxxxxx-") for n in a.namespaces)


def test_vtep_addresses_and_macs_distinct():
    text = "".join(f"[[hosts]]\nname='h{i}'\n" for i in range(1, 6))
    plan = parse_topology(text)
    assert len({h.vtep_mac for h in plan.hosts}) == 5
    assert len({h.vtep6 for h in plan.hosts}) == 5
    for h in plan.hosts:
        assert h.vtep4 == h.subnet4.network_address
        assert h.vtep6 in plan.container_v6
        assert not any(h.vtep6 in other.subnet6 for other in plan.hosts)


BAD = [
    ("not toml [", None, "not valid TOML"),
    ("hosts = []", "hosts", "non-empty"),
    ("color = 1\n[[hosts]]\nname='h1'", "color", "unknown key"),
    ("underlay = '10.0.0.1/24'\n[[hosts]]\nname='h1'", "underlay", "no host bits"),
    ("underlay = 'fd00::/64'\n[[hosts]]\nname='h1'", "underlay", "IPv4"),
    ("container_v4 = '198.18.0.0/16'\n[[hosts]]\nname='h1'", "container_v4", "overlap"),
    ("container_v4 = '198.19.0.0/20'\n[[hosts]]\nname='h1'", "container_v4", "at most /16"),
    ("mtu = 100\n[[hosts]]\nname='h1'", "mtu", "1280..9000"),
    ("vxlan_id = true\n[[hosts]]\nname='h1'", "vxlan_id", "integer"),
    ("[[hosts]]\nname='H1'", "hosts[0].name", "lowercase"),
    ("[[hosts]]\nname='fabric'", "hosts[0].name", "fabric"),
    ("[[hosts]]\nname='h1'\n[[hosts]]\nname='h1'", "hosts[1].name", "duplicate"),
    ("[[hosts]]\nname='h1'\ncontainers=['h1']", "hosts[0].containers[0].name", "duplicate"),
    ("[[hosts]]\nname='h1'\ncontainers=['averyveryverylongname']",
     "hosts[0].containers[0].name", "up to 10"),
    ("[[hosts]]\nname='h1'\ncontainers='c1'", "hosts[0].containers", "array"),
    ("[[hosts]]\nname='h1'\ncontainers=[{name='c1', publish=['80']}]",
     "hosts[0].containers[0].publish[0]", "HOSTPORT:CONTAINERPORT"),
    ("[[hosts]]\nname='h1'\ncontainers=[{name='c1', publish=['70000:80']}]",
     "hosts[0].containers[0].publish[0]", "1..65535"),
    ("[[hosts]]\nname='h1'\ncontainers=[{name='c1', publish=['80:80']},"
     "{name='c2', publish=['80:81']}]", "hosts[0].containers[1].publish[0]", "already published"),
    ("[[hosts]]\nname='h1'\ncontainers=[{name='c1', port=1}]", "hosts[0].containers[0].port",
     "unknown key"),
]


@pytest.mark.parametrize("text,field,fragment", BAD)
def test_bad_topology_names_file_field_and_value(text, field, fragment):
    with pytest.raises(ConfigError) as err:
        parse_topology(text, "bad.toml")
    msg = str(err.value)
    assert msg.startswith("bad.toml: ")
    assert fragment in msg
    if field:
        assert err.value.field == field
        assert f"{field}: " in msg


def test_nat_ruleset_masquerades_and_publishes():
    plan = parse_topology(default_text())
    h2 = plan.hosts[1]
    rules = plan_nat_ruleset(plan, h2)
    assert "ip saddr 198.19.2.0/24 ip daddr != 198.19.0.0/16 oifname \"sg-ul0\" masquerade" in rules
    assert "ip daddr 198.18.0.2 tcp dport 8080 dnat to 198.19.2.2:80" in rules
    assert "udp dport 8472 iifname != \"sg-ul0\" drop" in rules   # the overlay's port
    assert "dnat" not in plan_nat_ruleset(plan, plan.hosts[0])


def test_paths_avoid_published_ports_and_explain_missing_ones():
    plan = parse_topology(default_text())
    paths = plan_paths(plan, port=5201)
    underlay = paths["host-underlay"]
    assert isinstance(underlay, PathSpec)
    assert underlay.target_port != 5201  # 5201 is published on h2 and would be DNATed away
    nat = paths["nat"]
    assert (nat.target, nat.target_port, nat.server_port) == ("198.18.0.2", 8080, 80)
    assert paths["vxlan"].target == "198.19.2.3"
    single = parse_topology("[[hosts]]\nname='h1'\ncontainers=['a']")
    p = plan_paths(single)
    assert p["vxlan"] == "needs two hosts" and "two containers" in p["bridge"]


def test_plan_to_dict_lists_addresses():
    d = plan_to_dict(parse_topology(default_text()))
    c = d["hosts"][1]["containers"][0]
    assert c == {"name": "h2-c1", "netns": "sg-demo-h2-c1", "ipv4": "198.19.2.2",
                 "ipv6": "fd53:6700:0:2::2", "publish": ["8080:80/tcp", "5201:5201/tcp"]}
    ipaddress.ip_network(d["container_v6"])
