"""Endpoint token syntax and the ingress/egress rule syntax."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from sockgraft.errors import ConfigError
from sockgraft.model.endpoint import (EgressRule, Endpoint, IngressRule, make_endpoint,
                                      parse_egress, parse_endpoint_args, parse_ingress)
from sockgraft.model.sockaddr import InetAddr, UnixAddr

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("name, tokens, expect", [
    ("ep-http", "type ipv4 addr 198.18.0.1 port 8080",
     Endpoint("ep-http", "ipv4", IPv4Address("198.18.0.1"), 8080)),
    ("ep-out", "port dynamic addr 198.18.0.1 type ipv4",
     Endpoint("ep-out", "ipv4", IPv4Address("198.18.0.1"), None)),
    ("e6", "type ipv6 addr 2001:db8::5 port 65535",
     Endpoint("e6", "ipv6", IPv6Address("2001:db8::5"), 65535)),
    ("any4", "type ipv4 addr 0.0.0.0 port 1", Endpoint("any4", "ipv4", IPv4Address(0), 1)),
    ("sock", "type unix path /run/app.sock", Endpoint("sock", "unix", path="/run/app.sock")),
    ("a.b_c-9", "path /" + "x" * 106 + " type unix",
     Endpoint("a.b_c-9", "unix", path="/" + "x" * 106)),
    ("x" * 32, "type ipv4 addr 1.2.3.4 port 1", Endpoint("x" * 32, "ipv4", IPv4Address("1.2.3.4"), 1)),
])
def test_parse_endpoint_ok(name: str, tokens: str, expect: Endpoint) -> None:
    ep = parse_endpoint_args(name, tokens.split())
    assert ep == expect
    assert parse_endpoint_args(ep.name, ep.args()) == ep


@pytest.mark.parametrize("name, tokens, field, needle", [
    ("Ep", "type ipv4 addr 1.2.3.4 port 80", "name", "accepted"),
    ("-ep", "type ipv4 addr 1.2.3.4 port 80", "name", "'-ep'"),
    ("x" * 33, "type ipv4 addr 1.2.3.4 port 80", "name", "1-32"),
    ("ep\n", "type ipv4 addr 1.2.3.4 port 80", "name", "invalid"),
    ("ep", "addr 1.2.3.4 port 80", "type", "required"),
    ("ep", "type ipv5 addr 1.2.3.4 port 80", "type", "ipv4, ipv6, unix"),
    ("ep", "type ipv4 addr 1.2.3.4 port 80 port 81", "port", "twice"),
    ("ep", "type ipv4 addr 1.2.3.4 port", "port", "needs a value"),
    ("ep", "type ipv4 addr 1.2.3.4 prot 80", "arguments", "'prot'"),
    ("ep", "type ipv4 addr 1.2.3.4", "port", "needs 'port"),
    ("ep", "type ipv4 port 80", "addr", "needs 'addr"),
    ("ep", "type ipv4 addr 2001:db8::1 port 80", "addr", "IPv6"),
    ("ep", "type ipv6 addr 10.0.0.1 port 80", "addr", "IPv4"),
    ("ep", "type ipv6 addr ::ffff:10.0.0.1 port 80", "addr", "IPv4-mapped"),
    ("ep", "type ipv6 addr fe80::1%eth0 port 80", "addr", "zone"),
    ("ep", "type ipv4 addr 010.0.0.1 port 80", "addr", "not an IPv4"),
    ("ep", "type ipv4 addr 1.2.3.4 port 0", "port", "1-65535"),
    ("ep", "type ipv4 addr 1.2.3.4 port 65536", "port", "1-65535"),
    ("ep", "type ipv4 addr 1.2.3.4 port -1", "port", "not a number"),
    ("ep", "type ipv4 addr 1.2.3.4 port 0x50", "port", "not a number"),
    ("ep", "type ipv4 addr 1.2.3.4 port 80 path /x", "path", "only to type unix"),
    ("ep", "type unix path relative.sock", "path", "not absolute"),
    ("ep", "type unix path /a\0b", "path", "NUL"),
    ("ep", "type unix path /" + "x" * 107, "path", "107 bytes"),
    ("ep", "type unix path /\udcff", "path", "UTF-8"),
    ("ep", "type unix", "path", "needs 'path"),
    ("ep", "type unix path /x port 80", "port", "does not apply"),
])
def test_parse_endpoint_errors(name: str, tokens: str, field: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_endpoint_args(name, tokens.split(" "), source="cli")
    assert ei.value.source == "cli"
    assert ei.value.field == field
    assert needle in str(ei.value)


def test_unix_path_limit_counts_bytes() -> None:
    # 53 two-byte characters + "/" = 107 bytes: fits; one more does not.
    assert parse_endpoint_args("u", ["type", "unix", "path", "/" + "é" * 53]).path
    with pytest.raises(ConfigError):
        parse_endpoint_args("u", ["type", "unix", "path", "/" + "é" * 53 + "x"])


def test_make_endpoint_toml_types() -> None:
    assert make_endpoint("e", "ipv4", addr="1.2.3.4", port=80).port == 80
    with pytest.raises(ConfigError) as ei:
        make_endpoint("e", "ipv4", addr="1.2.3.4", port=True, source="f.toml",
                      prefix="endpoints.e.")
    assert ei.value.field == "endpoints.e.port"


@pytest.mark.parametrize("ep, sa", [
    (Endpoint("e", "ipv4", IPv4Address("1.2.3.4"), None), InetAddr.of("1.2.3.4", 0)),
    (Endpoint("e", "ipv6", IPv6Address("::1"), 9), InetAddr.of("::1", 9)),
    (Endpoint("e", "unix", path="/run/s"), UnixAddr(b"/run/s")),
])
def test_endpoint_sockaddr(ep: Endpoint, sa) -> None:
    assert ep.sockaddr() == sa


def test_endpoint_constructor_validates() -> None:
    with pytest.raises(ConfigError):
        Endpoint("e", "ipv4", IPv6Address("::1"), 80)
    with pytest.raises(ConfigError):
        Endpoint("e", "unix", path="rel")
    with pytest.raises(ConfigError):
        Endpoint("e", "ipv4", IPv4Address("1.1.1.1"), 0)


# ---------------------------------------------------------------- ingress

@pytest.mark.parametrize("text, rule", [
    ("0.0.0.0:80=ep-http", IngressRule(IPv4Address(0), 80, 80, "ep-http")),
    ("10.0.0.1:8000-8010=ep", IngressRule(IPv4Address("10.0.0.1"), 8000, 8010, "ep")),
    ("[::]:443=e6", IngressRule(IPv6Address(0), 443, 443, "e6")),
    ("[2001:db8::1]:1-65535=e6", IngressRule(IPv6Address("2001:db8::1"), 1, 65535, "e6")),
])
def test_parse_ingress_round_trip(text: str, rule: IngressRule) -> None:
    assert parse_ingress(text) == rule
    assert str(rule) == text
    assert parse_ingress(f"  {text} ") == rule


@pytest.mark.parametrize("text, needle", [
    ("0.0.0.0:80", "not of the form"),
    ("0.0.0.0:80=", "endpoint name"),
    ("0.0.0.0:80=ep=x", "not of the form"),
    ("0.0.0.0=ep", "no :PORT"),
    ("0.0.0.0:0=ep", "1-65535"),
    ("0.0.0.0:65536=ep", "1-65535"),
    ("0.0.0.0:90-80=ep", "reversed"),
    ("0.0.0.0:80-=ep", "1-65535"),
    ("0.0.0.0:http=ep", "1-65535"),
    ("::1:80=ep", "brackets"),
    ("[::1]80=ep", "expected [IPV6ADDR]:PORT"),
    ("[10.0.0.1]:80=ep", "is an IPv4 address; accepted: an IPv6 address"),
    ("[::ffff:10.0.0.1]:80=ep", "IPv4-mapped"),
    ("[fe80::1%eth0]:80=ep", "zone"),
    ("10.0.0.256:80=ep", "not an IPv4"),
    ("10.0.0.1:80=EP", "endpoint name"),
])
def test_parse_ingress_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_ingress(text, source="cli", field="rules.ingress[0]")
    assert needle in str(ei.value), str(ei.value)
    assert str(ei.value).startswith(f"cli: rules.ingress[0]: ingress rule {text!r}: ")
    assert ei.value.source == "cli" and ei.value.field == "rules.ingress[0]"


# ---------------------------------------------------------------- egress

@pytest.mark.parametrize("text, rule, canonical", [
    ("198.18.0.0/24=ep-out", EgressRule(IPv4Network("198.18.0.0/24"), None, "ep-out"), None),
    ("10.0.0.0/8:443=ep", EgressRule(IPv4Network("10.0.0.0/8"), 443, "ep"), None),
    ("0.0.0.0/0=ep", EgressRule(IPv4Network("0.0.0.0/0"), None, "ep"), None),
    ("10.1.2.3/32:53=ep", EgressRule(IPv4Network("10.1.2.3/32"), 53, "ep"), None),
    ("fd00::/8=e6", EgressRule(IPv6Network("fd00::/8"), None, "e6"), None),
    ("[fd00::/8]:443=e6", EgressRule(IPv6Network("fd00::/8"), 443, "e6"), None),
    ("[fd00::/8]=e6", EgressRule(IPv6Network("fd00::/8"), None, "e6"), "fd00::/8=e6"),
    ("::/0=e6", EgressRule(IPv6Network("::/0"), None, "e6"), None),
])
def test_parse_egress_round_trip(text: str, rule: EgressRule, canonical: str | None) -> None:
    assert parse_egress(text) == rule
    assert str(rule) == (canonical or text)
    assert parse_egress(str(rule)) == rule


@pytest.mark.parametrize("text, needle", [
    ("10.0.0.1/8=ep", "host bits set; write the network 10.0.0.0/8 or the single host 10.0.0.1/32"),
    ("fd00::1/8=ep", "host bits"),
    ("10.0.0.5=ep", "no /LEN"),
    ("10.0.0.5:80=ep", "no /LEN"),
    ("10.0.0.0/33=ep", "not an IPv4 or IPv6 prefix"),
    ("10.0.0.0/255.0.0.0=ep", "not a decimal"),
    ("10.0.0.0/x=ep", "not a decimal"),
    ("10.0.0.0/8:0=ep", "1-65535"),
    ("10.0.0.0/8:65536=ep", "1-65535"),
    ("10.0.0.0/8:80-90=ep", "not a number"),
    ("fd00::/8:443=ep", "needs brackets"),
    ("[10.0.0.0/8]:443=ep", "brackets are for IPv6"),
    ("[fd00::/8]443=ep", "expected [PREFIX/LEN]"),
    ("::ffff:0:0/96=ep", "IPv4-mapped prefix; write the IPv4 form 0.0.0.0/0"),
    ("[::ffff:10.0.0.0/104]:80=ep", "10.0.0.0/8"),
    ("10.0.0.0/8", "not of the form"),
])
def test_parse_egress_errors(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_egress(text)
    assert needle in str(ei.value), str(ei.value)
    # the message quotes the whole rule; value is the offending token
    assert repr(text) in str(ei.value)
    assert str(ei.value.value) in text


def test_rule_constructors_validate() -> None:
    with pytest.raises(ConfigError):
        IngressRule("0.0.0.0", 80, 80, "ep")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        IngressRule(IPv4Address(0), 0, 80, "ep")
    with pytest.raises(ConfigError):
        IngressRule(IPv4Address(0), 81, 80, "ep")
    with pytest.raises(ConfigError):
        EgressRule(IPv4Network("10.0.0.0/8"), 0, "ep")
    with pytest.raises(ConfigError):
        EgressRule(IPv6Network("::ffff:0:0/96"), None, "ep")
