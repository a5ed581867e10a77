"""GraftConfig: consistency, matching, edits, TOML round trips."""

from __future__ import annotations

import dataclasses
import textwrap

import pytest

from sockgraft.errors import ConfigError
from sockgraft.model.endpoint import (Endpoint, parse_egress, parse_endpoint_args,
                                      parse_ingress)
from sockgraft.model.graftconfig import (GraftConfig, dump_config, ingress_host_port,
                                         load_config, match_egress, match_ingress,
                                         with_endpoint, with_policy, with_policy_rule,
                                         with_rule, without_endpoint, without_policy_rule,
                                         without_rule)
from sockgraft.model.policy import Policy, decide, parse_policy_rule
from sockgraft.model.sockaddr import InetAddr

pytestmark = pytest.mark.unit

EXAMPLE = textwrap.dedent('''
    container = "h1-c1"
    [endpoints.ep-http]
    type = "ipv4"
    addr = "198.18.0.1"
    port = 8080
    [endpoints.ep-out]
    type = "ipv4"
    addr = "198.18.0.1"
    port = "dynamic"
    [rules]
    ingress = ["0.0.0.0:80=ep-http"]
    egress = ["198.18.0.0/24=ep-out"]
    [policy]
    allow = ["allow tcp 198.18.0.0/24 1-65535"]
    deny = []
    builtin_denies = true
''')


def EP(spec: str):
    name, *tokens = spec.split()
    return parse_endpoint_args(name, tokens)


def cfg(endpoints=(), ingress=(), egress=(), policy=Policy(), container="c1") -> GraftConfig:
    eps = {e.name: e for e in map(EP, endpoints)}
    return GraftConfig(container, eps, tuple(map(parse_ingress, ingress)),
                       tuple(map(parse_egress, egress)), policy)


V4 = "e4 type ipv4 addr 198.18.0.1 port 8080"
V4B = "e4b type ipv4 addr 198.18.0.2 port dynamic"
V6 = "e6 type ipv6 addr 2001:db8::1 port 8080"
V6B = "e6b type ipv6 addr 2001:db8::2 port dynamic"
UNIX = "sock type unix path /run/s.sock"
ALL = (V4, V4B, V6, V6B, UNIX)


def A(text: str) -> InetAddr:
    host, _, port = text.rpartition(":")
    return InetAddr.of(host.strip("[]"), int(port))


# ---------------------------------------------------------------- TOML

def test_load_brief_example() -> None:
    c = load_config(EXAMPLE, "h1-c1.toml")
    assert c.container == "h1-c1"
    assert c.endpoints["ep-out"].port is None
    assert str(c.ingress[0]) == "0.0.0.0:80=ep-http"
    assert str(c.policy.allow[0]) == "allow tcp 198.18.0.0/24 1-65535"
    assert load_config(dump_config(c), "again") == c


ROUND_TRIP = [
    cfg(container="minimal"),
    load_config(EXAMPLE, "x"),
    cfg(ALL,
        ingress=("0.0.0.0:80=e4", "198.18.0.9:80-89=e4b", "[::]:443=e4", "[2001:db8::9]:22=e6"),
        egress=("10.0.0.0/8=e4", "10.1.0.0/16:443=e4b", "fd00::/8=e6", "[fd00::/16]:53=e6b"),
        policy=Policy((parse_policy_rule("allow udp [fd00::/8] 53"),
                       parse_policy_rule("allow any 127.0.0.1")),
                      (parse_policy_rule("deny tcp any 25"),), builtin_denies=False)),
    GraftConfig("c.2+x_y", {
        "a.b": Endpoint("a.b", "unix", path='/run/"q"\\b\n\tc é\x7f'),
        "9": EP("9 type ipv6 addr :: port 1")}),
]


@pytest.mark.parametrize("config", ROUND_TRIP)
def test_dump_load_identity(config: GraftConfig) -> None:
    text = dump_config(config)
    again = load_config(text, "dumped.toml")
    assert again == config
    assert dump_config(again) == text


def test_dump_is_deterministic_in_endpoint_order() -> None:
    a = cfg((V4, V6))
    b = cfg((V6, V4))
    assert a == b and dump_config(a) == dump_config(b)


@pytest.mark.parametrize("toml, field, needle", [
    ('container = "c"\ncolour = 1', "colour",
     "unknown key 'colour'; accepted: version, container, graft_at, splice, endpoints, rules, policy"),
    ('container = "c"\n[endpoints.e]\ntype = "ipv4"\naddr = "1.2.3.4"\nport = 1\nprt = 2',
     "endpoints.e.prt", "accepted: type, addr, port, path"),
    ('container = "c"\n[rules]\ningres = []', "rules.ingres", "accepted: ingress, egress"),
    ('container = "c"\n[policy]\nallowed = []', "policy.allowed",
     "accepted: allow, deny, builtin_denies"),
    ('container = "c"\n[endpoints.e]\ntype = "ipv4"\naddr = "1.2.3.4"\nport = "abc"',
     "endpoints.e.port", "not a number"),
    ('container = "c"\n[endpoints.e]\ntype = "ipv4"\naddr = "1.2.3.4"\nport = true',
     "endpoints.e.port", "not a number"),
    ('container = "c"\n[endpoints.e]\ntype = "ipv4"\naddr = "1.2.3.4"\nport = 0',
     "endpoints.e.port", "out of range"),
    ('container = "c"\n[endpoints.e]\ntype = "ipv4"\naddr = "1.2.3.4"\nport = 65536',
     "endpoints.e.port", "out of range"),
    ('container = "c"\n[endpoints.e]\ntype = "ipv4"\naddr = 5\nport = 1',
     "endpoints.e.addr", "must be a string"),
    ('container = "c"\n[endpoints.e]\naddr = "1.2.3.4"\nport = 1', "endpoints.e.type", "no 'type'"),
    ('container = "c"\n[endpoints.E]\ntype = "unix"\npath = "/x"', "endpoints.E.name", "invalid"),
    ('container = "c"\n[endpoints.e]\ntype = "unix"\npath = "x"', "endpoints.e.path", "absolute"),
    ('container = "c"\n[endpoints.e]\ntype = "unix"\npath = "/a\\u0000b"', "endpoints.e.path", "NUL"),
    ('container = "c"\nendpoints = 5', "endpoints", "must be a table"),
    ('container = "c"\n[rules]\ningress = "0.0.0.0:80=e"', "rules.ingress", "array of strings"),
    ('container = "c"\n[rules]\negress = [1]', "rules.egress[0]", "must be a string"),
    ('container = "c"\n[rules]\negress = ["10.0.0.1/8=e"]', "rules.egress[0]", "host bits"),
    ('container = "c"\n[policy]\nallow = ["deny tcp any"]', "policy.allow[0]", "'allow' list"),
    ('container = "c"\n[policy]\nbuiltin_denies = "yes"', "policy.builtin_denies", "true or false"),
    ('version = 2\ncontainer = "c"', "version", "accepted: 1"),
    ('version = true\ncontainer = "c"', "version", "accepted: 1"),
    ('[rules]', "container", "missing required key 'container'"),
    ('container = ""', "container", "container id"),
    ('container = "a b"', "container", "container id"),
    ('container = "c"\n[rules]\ningress = ["0.0.0.0:80=nope"]', "rules.ingress[0]",
     "names endpoint 'nope', which does not exist"),
])
def test_load_errors(toml: str, field: str, needle: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(toml, "/etc/sockgraft/c.toml")
    e = ei.value
    assert e.source == "/etc/sockgraft/c.toml"
    assert e.field == field
    assert needle in str(e), str(e)
    assert str(e).startswith("/etc/sockgraft/c.toml: ")


@pytest.mark.parametrize("toml", ['container = "c', 'container = "c"\ncontainer = "d"',
                                  "\x00", 'container = "c"\n[endpoints\n'])
def test_corrupt_toml(toml: str) -> None:
    with pytest.raises(ConfigError) as ei:
        load_config(toml, "broken.toml")
    assert ei.value.source == "broken.toml"
    assert "not valid TOML" in str(ei.value)


# ---------------------------------------------------------------- consistency

@pytest.mark.parametrize("endpoints, ingress, egress, needle", [
    ((V4,), ("0.0.0.0:80=e6",), (), "does not exist; defined endpoints: e4"),
    ((UNIX,), ("0.0.0.0:80=sock",), (), "unix endpoint 'sock'"),
    ((UNIX, V4), (), ("10.0.0.0/8=sock",), "unix endpoint"),
    ((V6,), ("10.0.0.1:80=e6",), (), "IPv4 address needs an ipv4 endpoint"),
    ((V6,), ("0.0.0.0:80=e6",), (), "IPv4 address needs an ipv4 endpoint"),
    ((V4,), ("[2001:db8::5]:80=e4",), (), "IPv6 address needs an ipv6 endpoint"),
    ((V4,), ("0.0.0.0:80-90=e4", "0.0.0.0:90=e4"), (), "overlaps rule '0.0.0.0:80-90=e4'"),
    ((V6,), ("[::]:1-100=e6", "[::]:50-60=e6"), (), "overlaps"),
    ((V4,), ("0.0.0.0:80=e4", "0.0.0.0:80=e4"), (), "overlaps"),
    ((V4,), (), ("fd00::/8=e4",), "IPv6 prefix needs an ipv6 endpoint"),
    ((V6,), (), ("10.0.0.0/8=e6",), "IPv4 prefix needs an ipv4 endpoint"),
    ((V4,), (), ("10.0.0.0/8=e4", "10.0.0.0/8=e4"), "duplicates rule"),
    ((V4, V4B), (), ("10.0.0.0/8:53=e4", "10.0.0.0/8:53=e4b"), "same prefix and port"),
    (("big type ipv4 addr 1.1.1.1 port 65530",), ("0.0.0.0:100-110=big",), (), "run past 65535"),
])
def test_inconsistent(endpoints, ingress, egress, needle) -> None:
    with pytest.raises(ConfigError) as ei:
        cfg(endpoints, ingress, egress)
    assert needle in str(ei.value), str(ei.value)


@pytest.mark.parametrize("endpoints, ingress, egress", [
    ((V4,), ("[::]:80=e4",), ()),                        # :: may use an ipv4 endpoint
    ((V6,), ("[::]:80=e6",), ()),
    ((V4,), ("0.0.0.0:80=e4", "[::]:80=e4", "10.0.0.1:80=e4"), ()),  # different addresses
    ((V4,), ("0.0.0.0:80=e4", "0.0.0.0:81=e4"), ()),
    ((V4, V4B), (), ("10.0.0.0/8=e4", "10.0.0.0/8:53=e4b", "10.0.0.0/16=e4")),
    (("big type ipv4 addr 1.1.1.1 port 65525",), ("0.0.0.0:100-110=big",), ()),
    (("dyn type ipv4 addr 1.1.1.1 port dynamic",), ("0.0.0.0:1-65535=dyn",), ()),
])
def test_consistent(endpoints, ingress, egress) -> None:
    cfg(endpoints, ingress, egress)


def test_endpoint_key_must_be_name() -> None:
    with pytest.raises(ConfigError, match="the key must be the name"):
        GraftConfig("c", {"x": EP(V4)})


def test_immutable() -> None:
    c = cfg((V4,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.container = "d"  # type: ignore[misc]
    with pytest.raises(TypeError):
        c.endpoints["x"] = EP(V6)  # type: ignore[index]
    source = {"e4": EP(V4)}
    c2 = GraftConfig("c", source)
    source["e6"] = EP(V6)
    assert "e6" not in c2.endpoints
    assert hash(c2) == hash(GraftConfig("c", {"e4": EP(V4)}))


# ---------------------------------------------------------------- matching

INGRESS_CFG = cfg(
    ALL,
    ingress=("0.0.0.0:80=e4", "10.0.0.1:80=e4b", "0.0.0.0:8000-8009=e4",
             "[::]:443=e6", "[2001:db8::9]:443=e6b", "127.0.0.1:9000=e4", "[::]:53=e4"))


@pytest.mark.parametrize("bind, rule", [
    ("0.0.0.0:80", "0.0.0.0:80=e4"),
    ("10.0.0.1:80", "10.0.0.1:80=e4b"),                 # exact before wildcard
    ("10.0.0.2:80", "0.0.0.0:80=e4"),                   # wildcard as fallback
    ("0.0.0.0:8005", "0.0.0.0:8000-8009=e4"),
    ("0.0.0.0:8010", None),
    ("0.0.0.0:0", None),                                # ephemeral bind
    ("127.0.0.1:80", None),                             # loopback needs an exact rule
    ("127.0.0.1:9000", "127.0.0.1:9000=e4"),
    ("[::]:80", None),                                  # v6 :: never matches 0.0.0.0
    ("[::]:443", "[::]:443=e6"),
    ("[2001:db8::9]:443", "[2001:db8::9]:443=e6b"),
    ("[2001:db8::7]:443", "[::]:443=e6"),
    ("[::1]:443", None),                                # v6 loopback: no wildcard fallback
    ("0.0.0.0:443", None),                              # v4 never matches :: rules
    ("[::]:53", "[::]:53=e4"),
    ("[::ffff:0.0.0.0]:80", "0.0.0.0:80=e4"),           # mapped wildcard is the v4 wildcard
    ("[::ffff:10.0.0.1]:80", "10.0.0.1:80=e4b"),
    ("[::ffff:10.0.0.3]:80", "0.0.0.0:80=e4"),
    ("[::ffff:127.0.0.1]:80", None),
    ("[::ffff:10.0.0.1]:443", None),
])
def test_match_ingress(bind: str, rule: str | None) -> None:
    got = match_ingress(INGRESS_CFG, A(bind))
    assert INGRESS_CFG.match_ingress(A(bind)) == got
    if rule is None:
        assert got is None
    else:
        assert got is not None
        assert str(got[0]) == rule
        assert got[1] == INGRESS_CFG.endpoints[got[0].endpoint]


@pytest.mark.parametrize("endpoint, rule, port, host_port", [
    (V4, "0.0.0.0:80=e4", 80, 8080),
    (V4, "0.0.0.0:8000-8009=e4", 8003, 8083),
    (V4B, "0.0.0.0:8000-8009=e4b", 8003, 0),
])
def test_ingress_host_port(endpoint: str, rule: str, port: int, host_port: int) -> None:
    assert ingress_host_port(parse_ingress(rule), EP(endpoint), port) == host_port


EGRESS_CFG = cfg(
    ALL,
    egress=("0.0.0.0/0=e4", "10.0.0.0/8=e4", "10.0.0.0/8:443=e4b", "10.1.0.0/16:53=e4b",
            "10.2.3.4/32=e4b", "::/0=e6", "fd00::/8=e6b", "[fd00:1::/32]:443=e6"))


@pytest.mark.parametrize("dest, rule", [
    ("8.8.8.8:80", "0.0.0.0/0=e4"),
    ("10.9.9.9:80", "10.0.0.0/8=e4"),
    ("10.9.9.9:443", "10.0.0.0/8:443=e4b"),            # port-specific beats portless
    ("10.1.2.3:53", "10.1.0.0/16:53=e4b"),             # longer prefix
    ("10.1.2.3:54", "10.0.0.0/8=e4"),                  # /16 port miss falls through
    ("10.1.2.3:443", "10.0.0.0/8:443=e4b"),
    ("10.2.3.4:443", "10.2.3.4/32=e4b"),               # longer portless beats shorter port
    ("[::ffff:10.9.9.9]:443", "10.0.0.0/8:443=e4b"),   # mapped -> IPv4 rules
    ("[::ffff:8.8.8.8]:1", "0.0.0.0/0=e4"),
    ("[2001:db8::1]:80", "::/0=e6"),
    ("[fd00::1]:443", "fd00::/8=e6b"),
    ("[fd00:1::1]:443", "[fd00:1::/32]:443=e6"),
    ("[fd00:1::1]:444", "fd00::/8=e6b"),
])
def test_match_egress(dest: str, rule: str) -> None:
    got = match_egress(EGRESS_CFG, A(dest))
    assert got is not None and str(got[0]) == rule
    assert got[1] == EGRESS_CFG.endpoints[got[0].endpoint]
    assert EGRESS_CFG.match_egress(A(dest)) == got


@pytest.mark.parametrize("dest", ["8.8.8.8:80", "[2001:db8::1]:80", "[::ffff:10.0.0.1]:53",
                                  "11.0.0.1:443"])
def test_match_egress_none(dest: str) -> None:
    c = cfg(ALL, egress=("10.0.0.0/8:443=e4", "fd00::/8=e6"))
    assert match_egress(c, A(dest)) is None


def test_match_egress_host_route_and_default() -> None:
    c = cfg(ALL, egress=("0.0.0.0/0:53=e4", "192.0.2.1/32=e4b"))
    assert str(match_egress(c, A("192.0.2.1:53"))[0]) == "192.0.2.1/32=e4b"
    assert str(match_egress(c, A("192.0.2.2:53"))[0]) == "0.0.0.0/0:53=e4"
    assert match_egress(c, A("192.0.2.2:54")) is None


# ---------------------------------------------------------------- edits

def test_with_and_without_endpoint() -> None:
    c0 = cfg((V4,))
    c1 = with_endpoint(c0, EP(V6))
    assert set(c1.endpoints) == {"e4", "e6"} and set(c0.endpoints) == {"e4"}
    with pytest.raises(ConfigError, match="already exists") as ei:
        with_endpoint(c1, EP(V6))
    assert ei.value.source == "container c1"
    c2 = with_endpoint(c1, EP("e6 type ipv6 addr 2001:db8::5 port 1"), replace=True)
    assert c2.endpoints["e6"].port == 1
    assert without_endpoint(c2, "e6") == c0
    with pytest.raises(ConfigError, match="does not exist"):
        without_endpoint(c0, "e6")


def test_without_endpoint_refused_while_used() -> None:
    c = cfg((V4, V4B), ingress=("0.0.0.0:80=e4",), egress=("10.0.0.0/8=e4b",))
    with pytest.raises(ConfigError) as ei:
        without_endpoint(c, "e4b")
    assert "egress rule '10.0.0.0/8=e4b' (rules.egress[0])" in str(ei.value)
    with pytest.raises(ConfigError, match="ingress rule '0.0.0.0:80=e4'"):
        without_endpoint(c, "e4")
    c2 = without_rule(c, parse_egress("10.0.0.0/8=e4b"))
    assert set(without_endpoint(c2, "e4b").endpoints) == {"e4"}


def test_replace_endpoint_rechecks_rules() -> None:
    c = cfg((V4,), ingress=("10.0.0.1:80=e4",))
    with pytest.raises(ConfigError, match="needs an ipv4 endpoint"):
        with_endpoint(c, EP("e4 type ipv6 addr ::1 port 1"), replace=True)


def test_with_and_without_rule() -> None:
    c0 = cfg((V4,))
    r_in = parse_ingress("0.0.0.0:80=e4")
    r_out = parse_egress("10.0.0.0/8=e4")
    c1 = with_rule(with_rule(c0, r_in), r_out)
    assert c1.ingress == (r_in,) and c1.egress == (r_out,)
    assert c0.ingress == () and c0.egress == ()
    with pytest.raises(ConfigError, match="already exists"):
        with_rule(c1, r_in)
    with pytest.raises(ConfigError, match="duplicates"):
        with_rule(c1, r_out)
    with pytest.raises(ConfigError, match="overlaps"):
        with_rule(c1, parse_ingress("0.0.0.0:70-90=e4"))
    with pytest.raises(ConfigError, match="does not exist"):
        with_rule(c1, parse_ingress("0.0.0.0:81=nope"))
    assert without_rule(without_rule(c1, r_in), r_out) == c0
    with pytest.raises(ConfigError, match="does not exist; egress rules: none"):
        without_rule(c0, r_out)
    with pytest.raises(TypeError):
        with_rule(c0, "0.0.0.0:80=e4")  # type: ignore[arg-type]


def test_policy_edits() -> None:
    c0 = cfg((V4,))
    allow = parse_policy_rule("allow tcp 10.0.0.0/8 443")
    deny = parse_policy_rule("deny any 10.1.0.0/16")
    c1 = with_policy_rule(with_policy_rule(c0, allow), deny)
    assert c1.policy.allow == (allow,) and c1.policy.deny == (deny,)
    assert decide(c1.policy, "tcp", A("10.1.0.1:443")).rule == "deny[0]"
    assert decide(c1.policy, "tcp", A("10.2.0.1:443")).rule == "allow[0]"
    with pytest.raises(ConfigError, match="already exists"):
        with_policy_rule(c1, allow)
    assert without_policy_rule(without_policy_rule(c1, allow), deny) == c0
    with pytest.raises(ConfigError, match="does not exist"):
        without_policy_rule(c0, allow)
    assert with_policy(c0, Policy(builtin_denies=False)).policy.builtin_denies is False


def test_splice_opt_out_round_trips_and_is_checked():
    from sockgraft.model.graftconfig import load_config
    cfg = load_config('container = "c"\nsplice = false\n', 't')
    assert cfg.splice is False and "splice = false" in dump_config(cfg)
    assert load_config(dump_config(cfg), 't') == cfg
    assert load_config('container = "c"\n', 't').splice is True
    assert "splice" not in dump_config(load_config('container = "c"\n', 't'))
    with pytest.raises(ConfigError, match="splice must be true or false"):
        load_config('container = "c"\nsplice = "no"\n', 't')
