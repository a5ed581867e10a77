"""model/redirect.py: which connections to a grafted server's old addresses
are taken to its host listener, and how nftables says it (issue 14, item 1)."""

from ipaddress import ip_address as A

import pytest

from sockgraft.errors import ConfigError
from sockgraft.model import nftpolicy
from sockgraft.model.redirect import PortMap, Redirect, Server, parse_ports, plan

pytestmark = pytest.mark.unit

ADDRS = {"web": ["198.19.2.2", "fd53:6700:0:2::2", "127.0.0.1", "fe80::1"]}
PORTS = {"web": parse_ports([{"host_port": 8080, "container_port": 80, "proto": "tcp"},
                             {"hostPort": 5353, "containerPort": 53, "protocol": "UDP",
                              "hostIP": "198.18.0.2"},
                             {"hostPort": 8443, "containerPort": 443, "hostIP": "::"}])}


def S(ip, port, hip, hport, proto="tcp", container="web"):
    return Server(container, proto, A(ip), port, A(hip), hport)


@pytest.mark.parametrize("server, want", [
    # a wildcard IPv4 bind: its container address and its published port
    (S("0.0.0.0", 80, "198.18.0.2", 8081),
     {Redirect("tcp", 4, A("198.19.2.2"), 80, A("198.18.0.2"), 8081, "container address"),
      Redirect("tcp", 4, None, 8080, A("198.18.0.2"), 8081, "published")}),
    # a published port with a host address; UDP
    (S("0.0.0.0", 53, "198.18.0.2", 5353, "udp"),
     {Redirect("udp", 4, A("198.19.2.2"), 53, A("198.18.0.2"), 5353, "container address"),
      Redirect("udp", 4, A("198.18.0.2"), 5353, A("198.18.0.2"), 5353, "published")}),
    # bound to the container's address: the same
    (S("198.19.2.2", 80, "198.18.0.2", 8081),
     {Redirect("tcp", 4, A("198.19.2.2"), 80, A("198.18.0.2"), 8081, "container address"),
      Redirect("tcp", 4, None, 8080, A("198.18.0.2"), 8081, "published")}),
    # bound to another address (a rule for a specific IP): no published port leads there
    (S("10.9.9.9", 80, "198.18.0.2", 8081), set()),
    # an IPv6 endpoint: only the container's IPv6 address (DNAT keeps the family)
    (S("::", 443, "fd53::1", 8443),
     {Redirect("tcp", 6, A("fd53:6700:0:2::2"), 443, A("fd53::1"), 8443, "container address"),
      Redirect("tcp", 6, None, 8443, A("fd53::1"), 8443, "published")}),
    # a protocol or port no mapping names
    (S("0.0.0.0", 80, "198.18.0.2", 8081, "udp"),
     {Redirect("udp", 4, A("198.19.2.2"), 80, A("198.18.0.2"), 8081, "container address")}),
    # a container the node knows nothing about
    (S("0.0.0.0", 80, "198.18.0.2", 8081, container="other"), set()),
])
def test_redirects_of_a_server(server, want):
    assert set(plan([server], ADDRS, PORTS)) == want


def test_loopback_and_link_local_container_addresses_are_never_redirected():
    got = plan([S("0.0.0.0", 80, "198.18.0.2", 8081)], ADDRS, {})
    assert {str(r.daddr) for r in got} == {"198.19.2.2"}


@pytest.mark.parametrize("raw, msg", [
    ("8080:80", "list"),
    ([{"hostPort": 0, "containerPort": 80}], "host port"),
    ([{"hostPort": 8080, "containerPort": "80"}], "container port"),
    ([{"hostPort": 8080, "containerPort": 80, "protocol": "sctp"}], "protocol"),
    ([{"hostPort": 8080, "containerPort": 80, "hostIP": "a.b"}], "host IP"),
    ([{"hostPort": True, "containerPort": 80}], "host port"),
    ([[8080, 80]], "not an object"),
    ([{"hostPort": 1, "containerPort": 1}] * 300, "at most"),
])
def test_bad_port_mappings_are_refused(raw, msg):
    with pytest.raises(ConfigError, match=msg):
        parse_ports(raw)


def test_port_mappings_in_both_spellings():
    assert parse_ports(None) == ()
    assert parse_ports([{"hostPort": 80, "containerPort": 8080, "hostIP": "0.0.0.0"}]) == \
        (PortMap("tcp", 80, 8080, None),)
    assert parse_ports([{"host_port": 80, "container_port": 8080, "proto": "udp",
                         "host_ip": "fd00::1"}]) == (PortMap("udp", 80, 8080, A("fd00::1")),)


def test_the_ruleset_dnats_before_the_nodes_own_port_mappings():
    rs = nftpolicy.plan_ruleset({}, None, plan([S("0.0.0.0", 80, "198.18.0.2", 8081),
                                                S("::", 443, "fd53::1", 8443)], ADDRS, PORTS))
    assert "type nat hook prerouting priority -110;" in rs
    assert "type nat hook output priority -110;" in rs
    assert rs.count("ip daddr 198.19.2.2 tcp dport 80 counter dnat ip to 198.18.0.2:8081") == 2
    assert "meta nfproto ipv4 fib daddr type local tcp dport 8080 counter dnat ip to " \
           "198.18.0.2:8081" in rs
    assert "ip6 daddr fd53:6700:0:2::2 tcp dport 443 counter dnat ip6 to [fd53::1]:8443" in rs
    assert "redirect_pre" not in nftpolicy.plan_ruleset({}, None, ())


def test_a_wildcard_endpoint_is_reached_at_the_address_the_packet_came_to():
    r = Redirect("tcp", 4, A("198.19.2.2"), 80, A("0.0.0.0"), 8081)
    assert nftpolicy.redirect_line(r).endswith("redirect to :8081")


def test_a_published_host_address_must_be_the_nodes_own():
    """A pod's hostIP is written into a DNAT rule the node applies to every
    packet it routes or sends: only a local address may match (a hostIP of
    169.254.169.254 would take the metadata service's connections to the
    pod). A container address redirect names the container's own address."""
    pub = Redirect("tcp", 4, A("169.254.169.254"), 80, A("198.18.0.2"), 8081, "published")
    assert nftpolicy.redirect_line(pub).startswith(
        "ip daddr 169.254.169.254 fib daddr type local tcp dport 80 ")
    own = Redirect("tcp", 4, A("198.19.2.2"), 80, A("198.18.0.2"), 8081, "container address")
    assert "fib" not in nftpolicy.redirect_line(own)


def test_addresses_with_a_zone_never_reach_the_ruleset():
    """A zone id is free text to Python's parser (spaces, braces, newlines):
    refused in port mappings, skipped among a container's addresses."""
    with pytest.raises(ConfigError, match="zone"):
        parse_ports([{"hostPort": 80, "containerPort": 80,
                      "hostIP": "fe80::1%x } chain evil { type filter hook input priority 0"}])
    got = plan([S("::", 443, "fd53::1", 8443)], {"web": ["fd53:6700:0:2::2%eth0 }"]}, {})
    assert got == []
