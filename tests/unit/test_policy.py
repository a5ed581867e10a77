"""Policy rule syntax and `decide`, including IPv4-mapped bypass attempts."""

from __future__ import annotations

import errno
from ipaddress import IPv4Network, IPv6Network

import pytest

from sockgraft.errors import ConfigError
from sockgraft.model.policy import Decision, Policy, PolicyRule, decide, parse_policy_rule
from sockgraft.model.sockaddr import InetAddr

pytestmark = pytest.mark.unit


def P(*rules: str, builtin: bool = True) -> Policy:
    parsed = [parse_policy_rule(r) for r in rules]
    return Policy(tuple(r for r in parsed if r.action == "allow"),
                  tuple(r for r in parsed if r.action == "deny"), builtin)


def A(text: str) -> InetAddr:
    host, _, port = text.rpartition(":")
    return InetAddr.of(host.strip("[]"), int(port))


# ---------------------------------------------------------------- syntax

@pytest.mark.parametrize("text, rule, canonical", [
    ("allow tcp 10.0.0.0/8 80-443",
     PolicyRule("allow", IPv4Network("10.0.0.0/8"), 80, 443, "tcp"), None),
    ("deny any 192.168.0.0/16", PolicyRule("deny", IPv4Network("192.168.0.0/16")), None),
    ("allow udp [fd00::/8] 53", PolicyRule("allow", IPv6Network("fd00::/8"), 53, 53, "udp"), None),
    ("allow udp fd00::/8 53", PolicyRule("allow", IPv6Network("fd00::/8"), 53, 53, "udp"),
     "allow udp [fd00::/8] 53"),
    ("deny tcp any 25", PolicyRule("deny", None, 25, 25, "tcp"), None),
    ("allow any 10.0.0.1", PolicyRule("allow", IPv4Network("10.0.0.1/32")), None),
    ("allow any 10.0.0.1/32", PolicyRule("allow", IPv4Network("10.0.0.1/32")), "allow any 10.0.0.1"),
    ("allow any [::1]", PolicyRule("allow", IPv6Network("::1/128")), None),
    ("  deny   udp  0.0.0.0/0   1-65535 ", PolicyRule("deny", IPv4Network("0.0.0.0/0"), 1, 65535, "udp"),
     "deny udp 0.0.0.0/0 1-65535"),
])
def test_parse_round_trip(text: str, rule: PolicyRule, canonical: str | None) -> None:
    assert parse_policy_rule(text) == rule
    assert str(rule) == (canonical or text)
    assert parse_policy_rule(str(rule)) == rule


@pytest.mark.parametrize("text, needle, value", [
    ("allow tcp", "has 2 words", "allow tcp"),
    ("allow tcp 10.0.0.0/8 80 extra", "has 5 words", "allow tcp 10.0.0.0/8 80 extra"),
    ("permit tcp 10.0.0.0/8", "action 'permit' unknown; accepted: allow, deny", "permit"),
    ("allow icmp 10.0.0.0/8", "protocol 'icmp' unknown; accepted: tcp, udp, any", "icmp"),
    ("allow TCP 10.0.0.0/8", "protocol 'TCP'", "TCP"),
    ("allow tcp 10.0.0.1/8", "host bits set; write the network 10.0.0.0/8", "10.0.0.1/8"),
    ("allow tcp [10.0.0.0/8]", "brackets are for IPv6", "[10.0.0.0/8]"),
    ("allow tcp ::ffff:127.0.0.1", "IPv4-mapped prefix; write the IPv4 form 127.0.0.1/32",
     "::ffff:127.0.0.1"),
    ("allow tcp 10.0.0.0/8 0", "out of range", "0"),
    ("allow tcp 10.0.0.0/8 65536", "out of range", "65536"),
    ("allow tcp 10.0.0.0/8 443-80", "reversed", "443-80"),
    ("allow tcp 10.0.0.0/8 http", "not a number", "http"),
    ("allow tcp nowhere", "not an IPv4 or IPv6 prefix", "nowhere"),
])
def test_parse_errors(text: str, needle: str, value: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_policy_rule(text, source="cli", field="policy.allow[0]")
    msg = str(ei.value)
    assert needle in msg, msg
    assert msg.startswith(f"cli: policy.allow[0]: policy rule {text!r}: ")
    assert value in str(ei.value.value)


@pytest.mark.parametrize("text, action, expect", [
    ("tcp 10.0.0.0/8", "allow", "allow tcp 10.0.0.0/8"),
    ("allow tcp 10.0.0.0/8", "allow", "allow tcp 10.0.0.0/8"),
    ("any any", "deny", "deny any any"),
])
def test_parse_with_list_action(text: str, action: str, expect: str) -> None:
    assert str(parse_policy_rule(text, action=action)) == expect


def test_parse_with_wrong_list_action() -> None:
    with pytest.raises(ConfigError, match="is a 'deny' rule in the 'allow' list"):
        parse_policy_rule("deny tcp any", action="allow")


def test_policy_rejects_rule_in_wrong_list() -> None:
    with pytest.raises(ConfigError, match="deny rule in the allow list"):
        Policy(allow=(parse_policy_rule("deny tcp any"),))
    with pytest.raises(ConfigError):
        Policy(builtin_denies=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- decide

DEFAULT = Policy()

DECIDE = [
    # built-in denies with an empty policy
    (DEFAULT, "tcp", "127.0.0.1:80", False, "builtin:loopback"),
    (DEFAULT, "udp", "127.255.255.254:53", False, "builtin:loopback"),
    (DEFAULT, "tcp", "[::1]:80", False, "builtin:loopback"),
    (DEFAULT, "tcp", "169.254.169.254:80", False, "builtin:metadata"),
    (DEFAULT, "tcp", "[fd00:ec2::254]:80", False, "builtin:metadata"),
    (DEFAULT, "tcp", "169.254.1.1:80", False, "builtin:link-local"),
    (DEFAULT, "tcp", "[fe80::1]:80", False, "builtin:link-local"),
    (DEFAULT, "tcp", "[febf::1]:80", False, "builtin:link-local"),
    (DEFAULT, "tcp", "0.0.0.0:80", False, "builtin:unspecified"),
    (DEFAULT, "tcp", "0.1.2.3:80", False, "builtin:unspecified"),
    (DEFAULT, "tcp", "[::]:80", False, "builtin:unspecified"),
    # IPv4-mapped bypass attempts: the IPv4 form decides
    (DEFAULT, "tcp", "[::ffff:127.0.0.1]:80", False, "builtin:loopback"),
    (DEFAULT, "udp", "[::ffff:127.1.2.3]:53", False, "builtin:loopback"),
    (DEFAULT, "tcp", "[::ffff:169.254.169.254]:80", False, "builtin:metadata"),
    (DEFAULT, "tcp", "[::ffff:169.254.0.1]:80", False, "builtin:link-local"),
    (DEFAULT, "tcp", "[::ffff:0.0.0.0]:80", False, "builtin:unspecified"),
    # ordinary destinations
    (DEFAULT, "tcp", "8.8.8.8:443", True, "default:allow"),
    (DEFAULT, "tcp", "[2001:db8::1]:443", True, "default:allow"),
    (DEFAULT, "tcp", "[::ffff:8.8.8.8]:443", True, "default:allow"),
    (DEFAULT, "tcp", "[fe00::1]:80", True, "default:allow"),        # just outside fe80::/10
    (DEFAULT, "tcp", "[fd00:ec2::253]:80", True, "default:allow"),
    # built-ins off
    (Policy(builtin_denies=False), "tcp", "127.0.0.1:80", True, "default:allow"),
    (Policy(builtin_denies=False), "tcp", "[::ffff:169.254.169.254]:80", True, "default:allow"),
    # a broad allow does not name the built-in categories
    (P("allow tcp 0.0.0.0/0"), "tcp", "127.0.0.1:80", False, "builtin:loopback"),
    (P("allow tcp 0.0.0.0/0"), "tcp", "[::ffff:169.254.169.254]:80", False, "builtin:metadata"),
    (P("allow any any"), "tcp", "[::1]:80", False, "builtin:loopback"),
    (P("allow tcp 0.0.0.0/0"), "tcp", "8.8.8.8:80", True, "allow[0]"),
    (P("allow tcp 0.0.0.0/0"), "udp", "8.8.8.8:53", False, "default:allowlist"),
    (P("allow tcp 0.0.0.0/0"), "tcp", "[2001:db8::1]:80", False, "default:allowlist"),
    # an allow naming the built-in destination opens exactly that
    (P("allow tcp 127.0.0.1 8080"), "tcp", "127.0.0.1:8080", True, "allow[0]"),
    (P("allow tcp 127.0.0.1 8080"), "tcp", "[::ffff:127.0.0.1]:8080", True, "allow[0]"),
    (P("allow tcp 127.0.0.1 8080"), "tcp", "127.0.0.1:8081", False, "builtin:loopback"),
    (P("allow tcp 127.0.0.1 8080"), "udp", "127.0.0.1:8080", False, "builtin:loopback"),
    (P("allow any 169.254.0.0/16"), "tcp", "169.254.1.1:80", True, "allow[0]"),
    (P("allow any 169.254.0.0/16"), "tcp", "169.254.169.254:80", False, "builtin:metadata"),
    (P("allow any 169.254.169.254"), "tcp", "169.254.169.254:80", True, "allow[0]"),
    (P("allow any [::1]"), "tcp", "[::1]:22", True, "allow[0]"),
    (P("allow tcp 0.0.0.0/0", "allow tcp 127.0.0.0/8"), "tcp", "127.0.0.1:1", True, "allow[1]"),
    # mapped destinations: allow rules see only the IPv4 form ...
    (P("allow any ::/0"), "tcp", "[::ffff:8.8.8.8]:80", False, "default:allowlist"),
    (P("allow any ::/0"), "tcp", "[2001:db8::1]:80", True, "allow[0]"),
    (P("allow tcp 8.8.8.0/24"), "tcp", "[::ffff:8.8.8.8]:80", True, "allow[0]"),
    # ... and so do deny rules: on the wire a mapped destination is IPv4
    (P("deny any ::/0"), "tcp", "[::ffff:8.8.8.8]:80", True, "default:allow"),
    (P("deny any ::/0"), "tcp", "[2001:db8::1]:80", False, "deny[0]"),
    (P("deny tcp 10.0.0.0/8"), "tcp", "[::ffff:10.9.9.9]:80", False, "deny[0]"),
    # deny beats allow, including allows that name a built-in
    (P("allow tcp 10.0.0.0/8", "deny tcp 10.1.0.0/16 443"), "tcp", "10.1.2.3:443", False, "deny[0]"),
    (P("allow tcp 10.0.0.0/8", "deny tcp 10.1.0.0/16 443"), "tcp", "10.1.2.3:80", True, "allow[0]"),
    (P("allow tcp 127.0.0.1", "deny any 127.0.0.0/8"), "tcp", "127.0.0.1:80", False, "deny[0]"),
    # lowest matching deny index is reported
    (P("deny udp any", "deny any 10.0.0.0/8", "deny tcp 10.0.0.0/8"), "tcp", "10.0.0.1:1",
     False, "deny[1]"),
    # protocol matching
    (P("deny udp any 53"), "tcp", "8.8.8.8:53", True, "default:allow"),
    (P("deny udp any 53"), "udp", "8.8.8.8:53", False, "deny[0]"),
    (P("deny tcp any"), "sctp", "8.8.8.8:1", True, "default:allow"),
    (P("deny any any"), "sctp", "8.8.8.8:1", False, "deny[0]"),
    # port bounds are inclusive; omitted ports include 0
    (P("deny tcp any 80-90"), "tcp", "1.1.1.1:80", False, "deny[0]"),
    (P("deny tcp any 80-90"), "tcp", "1.1.1.1:90", False, "deny[0]"),
    (P("deny tcp any 80-90"), "tcp", "1.1.1.1:91", True, "default:allow"),
    (P("deny tcp any 80-90"), "tcp", "1.1.1.1:79", True, "default:allow"),
    (P("deny udp 1.1.1.1"), "udp", "1.1.1.1:0", False, "deny[0]"),
    # longest-looking rule is irrelevant: order within a list, not length
    (P("allow tcp 10.0.0.0/8", "allow tcp 10.1.0.0/16"), "tcp", "10.1.0.1:1", True, "allow[0]"),
]


@pytest.mark.parametrize("policy, proto, dest, allowed, rule", DECIDE)
def test_decide(policy: Policy, proto: str, dest: str, allowed: bool, rule: str) -> None:
    d = decide(policy, proto, A(dest))
    assert d == Decision(allowed, rule, 0 if allowed else errno.EACCES)


def test_decision_str() -> None:
    assert str(decide(DEFAULT, "tcp", A("127.0.0.1:1"))) == "deny by builtin:loopback"


def test_policy_equality_ignores_compiled_state() -> None:
    assert P("allow tcp 10.0.0.0/8") == P("allow tcp 10.0.0.0/8")
    assert P("allow tcp 10.0.0.0/8") != P("allow udp 10.0.0.0/8")
