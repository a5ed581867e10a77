"""model/nftpolicy.py: the nftables rendering of per-container policies.

Golden text and ordering checks, then the important one: a tiny evaluator of
the rendered chain (the small nft subset the renderer uses) is run against
`policy.decide` on hand-picked and random (seeded) policies and destinations,
for IPv4, IPv6 and IPv4-mapped destinations (judged as the IPv4 packet the
kernel really emits). The in-kernel check of the same text is
tests/priv/test_nft_enforcement.py.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from ipaddress import (IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address,
                       ip_network)

import pytest

from sockgraft.model.graft import MARK_BASE
from sockgraft.model.nftpolicy import chain_name, plan_chain, plan_ruleset
from sockgraft.model.policy import BUILTIN_DENIES, Policy, PolicyRule, decide, parse_policy_rule
from sockgraft.model.sockaddr import InetAddr

pytestmark = pytest.mark.unit

MAPPED = IPv6Network("::ffff:0:0/96")


def P(*rules: str, builtin: bool = True) -> Policy:
    parsed = [parse_policy_rule(r) for r in rules]
    return Policy(tuple(r for r in parsed if r.action == "allow"),
                  tuple(r for r in parsed if r.action == "deny"), builtin)


# ---------------------------------------------------------------- golden text

SMALL = P("allow tcp 10.0.0.0/8 80-443", "allow any 127.0.0.1 8080",
          "allow udp [fd00::/8] 53", "deny tcp any 25")

SMALL_GOLDEN = """\
add table inet sockgraft
delete table inet sockgraft
table inet sockgraft {
  chain output {
    type filter hook output priority filter; policy accept;
    meta mark & 0xffff0000 != 0x53470000 accept
    ct state established,related accept
    meta mark vmap { 0x53470001 : jump c_0001 }
    counter reject
  }
  chain c_0001 {
    meta l4proto tcp th dport 25 counter reject
    ip daddr 169.254.169.254/32 counter reject
    ip6 daddr fd00:ec2::254/128 counter reject
    ip daddr 127.0.0.1/32 meta l4proto { tcp, udp } th dport 8080 accept
    ip daddr 127.0.0.0/8 counter reject
    ip6 daddr ::1/128 counter reject
    ip daddr 169.254.0.0/16 counter reject
    ip6 daddr fe80::/10 counter reject
    ip daddr 0.0.0.0/8 counter reject
    ip6 daddr ::/128 counter reject
    ip daddr 224.0.0.0/4 counter reject
    ip6 daddr ff00::/8 counter reject
    ip daddr 255.255.255.255/32 counter reject
    meta nfproto ipv4 fib daddr type broadcast counter reject
    ip daddr 10.0.0.0/8 meta l4proto tcp th dport 80-443 accept
    ip6 daddr fd00::/8 meta l4proto udp th dport 53 accept
    counter reject
  }
}
"""


def test_golden_small_policy():
    assert plan_ruleset({0x53470001: SMALL}) == SMALL_GOLDEN


def test_forged_sources_from_the_containers_bridges_are_dropped_before_conntrack():
    """The antispoof chain names the bridges the containers are on (never
    every bridge: the node's own address may live on one, where a reply may
    come back another way than its request left), and exists only while
    containers are registered."""
    out = plan_ruleset({0x53470001: SMALL}, bridges=["sg-br1", "sg-br0", "sg-br0"])
    assert ("  chain antispoof {\n"
            "    type filter hook prerouting priority raw; policy accept;\n"
            '    iifname { "sg-br0", "sg-br1" } fib daddr type local fib saddr . iif oif '
            "missing counter drop\n  }\n") in out
    assert "antispoof" not in plan_ruleset({0x53470001: SMALL})
    assert "antispoof" not in plan_ruleset({}, bridges=["sg-br0"])


def test_golden_no_policies():
    assert plan_ruleset({}) == """\
add table inet sockgraft
delete table inet sockgraft
table inet sockgraft {
  chain output {
    type filter hook output priority filter; policy accept;
    meta mark & 0xffff0000 != 0x53470000 accept
    ct state established,related accept
    counter reject
  }
}
"""


def test_a_private_loopback_is_delivered_to_its_owner_only():
    """A socket-mode container's private loopback: packets to it reach
    sockets with its mark only (not a host service on 0.0.0.0 or ::) - the
    rest get a closed port's answer at once; the rest of the ranges reach
    sockgraft sockets only. No socket-mode container: no input chain (no
    need of the kernel's nft_socket)."""
    from sockgraft.model.graft import private_loopback
    text = plan_ruleset({0x53470007: Policy()}, None, (),
                        {0x53470007: private_loopback(0x53470007)})
    for t in ("ip daddr 127.83.0.7 socket mark != 0x53470007",
              "ip6 daddr fd53:4c4f::7 socket mark != 0x53470007"):
        assert f"    {t} meta l4proto tcp reject with tcp reset\n" in text
        assert f"    {t} reject with icmpx type port-unreachable\n" in text
    assert text.index("127.83.0.7 socket") < text.index("127.83.0.0/16 socket")
    assert "chain input" not in plan_ruleset({0x53470007: Policy()})


@pytest.mark.parametrize("policy, chain", [
    (Policy(builtin_denies=False), ["accept"]),
    (P("allow any any", builtin=False), ["accept", "counter reject"]),
    (P("deny udp any", builtin=False), ["meta l4proto udp counter reject", "accept"]),
    (P("deny any any 1-1024", builtin=False),
     ["meta l4proto { tcp, udp } th dport 1-1024 counter reject", "accept"]),
    (P("allow udp [2001:db8::1] 53", builtin=False),
     ["ip6 daddr 2001:db8::1/128 meta l4proto udp th dport 53 accept", "counter reject"]),
])
def test_golden_chains(policy, chain):
    assert plan_chain(policy) == chain


# ---------------------------------------------------------------- structure

def test_ruleset_starts_by_replacing_the_table():
    text = plan_ruleset({0x53470001: SMALL})
    # add (so delete never fails on the first load) then delete then define:
    # one `nft -f` transaction that replaces any previous version.
    assert text.splitlines()[:3] == ["add table inet sockgraft", "delete table inet sockgraft",
                                     "table inet sockgraft {"]
    assert text.count("table inet sockgraft") == 3
    assert text.endswith("}\n")


@pytest.mark.parametrize("mark, name", [(0x53470001, "c_0001"), (0x5347000a, "c_000a"),
                                        (0x5347abcd, "c_abcd"), (0x5347ffff, "c_ffff")])
def test_chain_name(mark, name):
    assert chain_name(mark) == name


def test_one_chain_per_mark_and_vmap_dispatch():
    marks = {0x5347000b: P("allow tcp 10.0.0.0/8"), 0x53470002: Policy(),
             0x53470100: P("deny any 192.0.2.0/24")}
    text = plan_ruleset(marks)
    lines = [line.strip() for line in text.splitlines()]
    assert [line for line in lines if line.startswith("chain c_")] == [
        "chain c_0002 {", "chain c_000b {", "chain c_0100 {"]
    assert ("meta mark vmap { 0x53470002 : jump c_0002, 0x5347000b : jump c_000b, "
            "0x53470100 : jump c_0100 }") in lines
    # each chain holds its own policy
    body = text.split("chain c_0100 {\n", 1)[1].split("  }\n", 1)[0]
    assert [b.strip() for b in body.splitlines()] == plan_chain(marks[0x53470100])


def test_output_chain_order():
    lines = [line.strip() for line in plan_ruleset({0x53470001: SMALL}).splitlines()]
    start = lines.index("chain output {")
    out = lines[start + 1:lines.index("}", start)]
    assert out == [
        "type filter hook output priority filter; policy accept;",
        f"meta mark & 0xffff0000 != 0x{MARK_BASE:08x} accept",   # not ours: untouched
        "ct state established,related accept",                  # replies always pass
        "meta mark vmap { 0x53470001 : jump c_0001 }",
        "counter reject",                                         # our range, no chain
    ]


ORDERED = P(
    "allow tcp 0.0.0.0/0 443",              # generic
    "deny udp 10.0.0.0/8",
    "allow any 127.0.0.1 8080",             # names loopback
    "allow udp [fe80::/64] 546",            # names link-local
    "allow tcp 169.254.169.254 80",         # names metadata (and link-local)
    "allow udp 169.254.0.0/16 67",          # names link-local
    "deny any [fd00::/8]",
    "allow udp [2001:db8::/32] 53",         # generic
)


def _index(lines: list[str], needle: str) -> int:
    hits = [i for i, line in enumerate(lines) if line.startswith(needle)]
    assert len(hits) == 1, (needle, lines)
    return hits[0]


def test_chain_order_deny_category_allows_builtin_drops_generic_allows():
    lines = plan_chain(ORDERED)
    ix = lambda needle: _index(lines, needle)  # noqa: E731
    deny = [ix("ip daddr 10.0.0.0/8 meta l4proto udp counter reject"),
            ix("ip6 daddr fd00::/8 counter reject")]
    meta_allow = ix("ip daddr 169.254.169.254/32 meta l4proto tcp th dport 80 accept")
    meta_drop = [ix("ip daddr 169.254.169.254/32 counter reject"),
                 ix("ip6 daddr fd00:ec2::254/128 counter reject")]
    loop_allow = ix("ip daddr 127.0.0.1/32 meta l4proto { tcp, udp } th dport 8080 accept")
    loop_drop = [ix("ip daddr 127.0.0.0/8 counter reject"), ix("ip6 daddr ::1/128 counter reject")]
    ll_allow = [ix("ip6 daddr fe80::/64 meta l4proto udp th dport 546 accept"),
                ix("ip daddr 169.254.0.0/16 meta l4proto udp th dport 67 accept")]
    ll_drop = [ix("ip daddr 169.254.0.0/16 counter reject"), ix("ip6 daddr fe80::/10 counter reject")]
    unspec_drop = [ix("ip daddr 0.0.0.0/8 counter reject"), ix("ip6 daddr ::/128 counter reject")]
    generic = [ix("ip daddr 0.0.0.0/0 meta l4proto tcp th dport 443 accept"),
               ix("ip6 daddr 2001:db8::/32 meta l4proto udp th dport 53 accept")]
    # denies first, in their order
    assert deny == [0, 1]
    # each category: its named allows, then its ranges; categories most specific first
    stages = [[meta_allow], meta_drop, [loop_allow], loop_drop, ll_allow, ll_drop,
              unspec_drop, generic]
    for earlier, later in zip(stages, stages[1:]):
        assert max(earlier) < min(later), (earlier, later, lines)
    # allow rules keep their relative order inside a stage
    assert ll_allow == sorted(ll_allow) and generic == sorted(generic)
    assert lines[-1] == "counter reject" and len(lines) == generic[-1] + 2


def test_builtin_categories_follow_policy_table():
    # the renderer emits every built-in range, in BUILTIN_DENIES order
    drops = [line for line in plan_chain(Policy()) if line.endswith("counter reject")]
    assert drops == [f"{'ip' if n.version == 4 else 'ip6'} daddr {n} counter reject"
                     for _, nets in BUILTIN_DENIES for n in nets] + [
        "meta nfproto ipv4 fib daddr type broadcast counter reject"]    # (after the last)


def test_without_builtin_denies_no_category_drops_and_allows_keep_order():
    policy = P(*[r for r in (str(r) for r in ORDERED.deny + ORDERED.allow)], builtin=False)
    lines = plan_chain(policy)
    assert not any("169.254.169.254/32 counter reject" in line or "127.0.0.0/8" in line
                   for line in lines)
    allows = [line for line in lines if line.endswith("accept")]
    assert len(allows) == len(ORDERED.allow)
    assert allows[0].startswith("ip daddr 0.0.0.0/0 meta l4proto tcp th dport 443")
    assert allows[-1].startswith("ip6 daddr 2001:db8::/32")


@pytest.mark.parametrize("policy, last", [
    (Policy(), "accept"), (P("deny any any"), "accept"),
    (P("allow tcp 10.0.0.0/8"), "counter reject"),
    (P("allow tcp 127.0.0.1 80"), "counter reject"),   # an allow list, even a loopback one
    (P("allow any any", builtin=False), "counter reject"),
])
def test_final_verdict_drop_iff_allow_list(policy, last):
    assert plan_chain(policy)[-1] == last
    assert (last == "counter reject") == bool(policy.allow)


@pytest.mark.parametrize("rule, extra", [
    ("deny any [::/0]", "ip daddr 0.0.0.0/0 counter reject"),
    ("deny udp [::/0] 53", "ip daddr 0.0.0.0/0 meta l4proto udp th dport 53 counter reject"),
    ("deny tcp [::/64] 22", "ip daddr 0.0.0.0/0 meta l4proto tcp th dport 22 counter reject"),
    ("deny any [::/1]", "ip daddr 0.0.0.0/0 counter reject"),
    ("deny any [::/80]", "ip daddr 0.0.0.0/0 counter reject"),
])
def test_v6_deny_never_touches_ipv4(rule, extra):
    # a mapped destination leaves as IPv4; IPv6 deny rules judge IPv6 only
    lines = plan_chain(P(rule))
    v6 = str(parse_policy_rule(rule).network)
    assert lines[0].startswith(f"ip6 daddr {v6} ")
    assert extra not in lines and not any(line.startswith("ip daddr 0.0.0.0/0")
                                          for line in lines)


@pytest.mark.parametrize("rule", ["deny any [fd00::/8]", "deny any [::/96]",
                                  "deny any [::1]", "deny any [64:ff9b::/96]"])
def test_v6_deny_has_no_ipv4_form(rule):
    lines = plan_chain(P(rule))
    assert lines[0] == f"ip6 daddr {parse_policy_rule(rule).network} counter reject"
    assert lines[1:] == plan_chain(Policy())


@pytest.mark.parametrize("rule", ["allow any [::/0]", "allow tcp [::/64] 80"])
def test_v6_allow_never_opens_ipv4(rule):
    # allow rules see only the IPv4 form of a mapped destination
    assert not any(line.startswith("ip daddr") and line.endswith("accept")
                   for line in plan_chain(P(rule)))


# ---------------------------------------------------------------- the evaluator

@dataclass(frozen=True)
class Packet:
    family: int               # 4 or 6: the IP header the kernel really emits
    proto: str                # "tcp" | "udp"
    daddr: IPv4Address | IPv6Address
    dport: int


_TOKEN = re.compile(r"\{[^}]*\}|\S+")


def parse_line(line: str) -> tuple[list[tuple], bool]:
    """One chain line -> ([matches], accept?). Anything outside the subset
    the renderer is meant to use raises, so new syntax cannot slip by."""
    toks = _TOKEN.findall(line)
    matches: list[tuple] = []
    i = 0
    while True:
        rest = toks[i:]
        if rest == ["accept"]:
            return matches, True
        if rest == ["counter", "reject"]:
            return matches, False
        if rest[:7] == ["meta", "nfproto", "ipv4", "fib", "daddr", "type", "broadcast"]:
            # a subnet's broadcast address: the route knows, not the policy
            # (decide() neither) - no address the evaluator is given is one
            matches.append(("broadcast", None))
            i += 7
            continue
        if len(rest) >= 3 and rest[0] in ("ip", "ip6") and rest[1] == "daddr":
            net = ip_network(rest[2])   # strict: host bits set would raise
            if net.version != (4 if rest[0] == "ip" else 6):
                raise ValueError(f"{rest[0]} daddr {net}: wrong family in {line!r}")
            matches.append(("daddr", net))
        elif len(rest) >= 3 and rest[:2] == ["meta", "l4proto"]:
            protos = {"tcp": {"tcp"}, "udp": {"udp"}, "{ tcp, udp }": {"tcp", "udp"}}
            if rest[2] not in protos:
                raise ValueError(f"l4proto {rest[2]!r} in {line!r}")
            matches.append(("proto", frozenset(protos[rest[2]])))
        elif len(rest) >= 3 and rest[:2] == ["th", "dport"]:
            m = re.fullmatch(r"(\d+)(?:-(\d+))?", rest[2])
            if not m:
                raise ValueError(f"dport {rest[2]!r} in {line!r}")
            lo = int(m[1])
            hi = int(m[2]) if m[2] else lo
            if not 0 <= lo <= hi <= 65535 or (m[2] and lo == hi):
                raise ValueError(f"dport {rest[2]!r} in {line!r}")
            # nft needs the l4 protocol pinned before a transport header match
            if not any(k == "proto" for k, _ in matches):
                raise ValueError(f"th dport without l4proto in {line!r}")
            matches.append(("dport", (lo, hi)))
        else:
            raise ValueError(f"outside the evaluator's subset: {line!r} at {rest!r}")
        i += 3


def _hit(match: tuple, pkt: Packet) -> bool:
    kind, arg = match
    if kind == "daddr":
        return arg.version == pkt.family and pkt.daddr in arg
    if kind == "proto":
        return pkt.proto in arg
    if kind == "broadcast":
        return False
    lo, hi = arg
    return lo <= pkt.dport <= hi


def evaluate(lines: list[str] | list[tuple[list[tuple], bool]], pkt: Packet) -> bool:
    """The chain's verdict for pkt (True = accept); lines as text or already
    parsed. The chain must decide."""
    for line in lines:
        matches, accept = parse_line(line) if isinstance(line, str) else line
        if all(_hit(m, pkt) for m in matches):
            return accept
    raise AssertionError(f"chain fell through without a verdict: {lines}")


def emitted(dest: InetAddr, proto: str) -> Packet:
    """The packet the kernel sends for a socket talking to dest: a v6 socket
    sending to ::ffff:a.b.c.d emits IPv4 to a.b.c.d."""
    d = dest.unmapped()
    return Packet(d.ip.version, proto, d.ip, d.port)


def test_evaluator_reads_the_subset():
    lines = ["ip daddr 10.0.0.0/8 meta l4proto { tcp, udp } th dport 80-90 counter reject",
             "ip6 daddr fd00::/8 meta l4proto udp accept",
             "meta l4proto tcp th dport 22 accept",
             "counter reject"]
    v4 = lambda ip, proto, port: Packet(4, proto, IPv4Address(ip), port)  # noqa: E731
    v6 = lambda ip, proto, port: Packet(6, proto, IPv6Address(ip), port)  # noqa: E731
    assert evaluate(lines, v4("10.1.1.1", "tcp", 22)) is True
    assert evaluate(lines, v4("10.1.1.1", "udp", 22)) is False
    assert evaluate(lines, v4("10.1.1.1", "tcp", 85)) is False
    assert evaluate(lines, v4("10.1.1.1", "udp", 91)) is False
    assert evaluate(lines, v6("fd00::1", "udp", 85)) is True
    assert evaluate(lines, v6("fd00::1", "tcp", 85)) is False
    assert evaluate(lines, v4("11.1.1.1", "tcp", 22)) is True
    assert evaluate(["ip daddr 0.0.0.0/0 accept", "counter reject"],
                    v6("::ffff:1.2.3.4", "tcp", 1)) is False   # ip never matches v6
    with pytest.raises(AssertionError, match="without a verdict"):
        evaluate(["ip daddr 10.0.0.0/8 accept"], v4("11.0.0.1", "tcp", 1))


@pytest.mark.parametrize("line", [
    "ip saddr 10.0.0.0/8 accept", "ip daddr 10.0.0.1/8 accept", "ip6 daddr 10.0.0.0/8 accept",
    "meta l4proto sctp accept", "th dport 80 accept", "meta l4proto tcp th dport 0-0 accept",
    "drop", "counter accept", "ip daddr 10.0.0.0/8 jump x", "reject",
])
def test_evaluator_rejects_unknown_syntax(line):
    with pytest.raises(ValueError):
        parse_line(line)


def test_emitted_packet_of_mapped_destination_is_ipv4():
    assert emitted(InetAddr.of("::ffff:10.0.0.1", 53), "udp") == Packet(
        4, "udp", IPv4Address("10.0.0.1"), 53)
    assert emitted(InetAddr.of("fd00::1", 53), "tcp") == Packet(
        6, "tcp", IPv6Address("fd00::1"), 53)


# ---------------------------------------------------------------- equivalence

def _covers_mapped(r: PolicyRule) -> bool:
    return r.network is not None and r.network.version == 6 and r.network.overlaps(MAPPED)


def check_equivalent(policy: Policy, dests, protos=("tcp", "udp")) -> int:
    lines = plan_chain(policy)
    parsed = [parse_line(line) for line in lines]
    n = 0
    for dest in dests:
        for proto in protos:
            want = decide(policy, proto, dest)
            got = evaluate(parsed, emitted(dest, proto))
            assert got == want.allowed, (
                f"chain says {'accept' if got else 'drop'}, decide says {want} for "
                f"{proto} {dest}\npolicy allow={[str(r) for r in policy.allow]} "
                f"deny={[str(r) for r in policy.deny]} builtin={policy.builtin_denies}\n"
                + "\n".join(lines))
            n += 1
    return n


HAND_POLICIES = {
    "default": Policy(),
    "default-no-builtin": Policy(builtin_denies=False),
    "small": SMALL,
    "ordered": ORDERED,
    "ordered-no-builtin": P(*(str(r) for r in ORDERED.deny + ORDERED.allow), builtin=False),
    "allow-all-v4": P("allow any 0.0.0.0/0"),
    "allow-any-any": P("allow any any"),
    "allow-any-any-ports": P("allow any any 1-1024"),
    "allow-v6-all": P("allow any [::/0]"),            # must not open mapped destinations
    "metadata-opened": P("allow tcp 169.254.169.254 80", "allow any 0.0.0.0/0"),
    "link-local-opened": P("allow any 169.254.0.0/16"),  # does not open metadata
    "metadata-v6-opened": P("allow any [fd00:ec2::254]", "allow any [fe80::/10]"),
    "loopback-port": P("allow tcp 127.0.0.1 8080", "allow udp 127.0.0.0/8 53"),
    "loopback-v6": P("allow udp [::1] 53"),
    "unspecified-opened": P("allow any 0.0.0.0/8", "allow any [::]"),
    "deny-then-allow": P("deny tcp 10.1.0.0/16 443", "allow tcp 10.0.0.0/8"),
    "deny-port-any": P("deny any any 25", "deny udp any 1-52"),
    "deny-loopback-allowed": P("deny tcp 127.0.0.1 8080", "allow tcp 127.0.0.1 8080"),
    "deny-v6-fd00": P("deny any [fd00::/8]"),
    "udp-only": P("allow udp any"),
}

DESTS = [InetAddr.of(ip, port) for ip in [
    "10.0.0.1", "10.1.2.3", "192.0.2.1", "8.8.8.8", "127.0.0.1", "127.9.9.9",
    "169.254.169.254", "169.254.169.253", "169.254.1.1", "0.0.0.0", "0.1.2.3",
    "255.255.255.255", "::1", "fe80::1", "fe80::1:0:0:1", "fd00::1", "fd00:ec2::254",
    "fd00:ec2::253", "::", "::2", "2001:db8::1", "2606:4700::1", "::127.0.0.1",
    "::ffff:10.0.0.1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:169.254.1.1",
    "::ffff:0.0.0.0", "::ffff:8.8.8.8", "64:ff9b::a00:1",
] for port in (0, 1, 22, 25, 52, 53, 80, 443, 546, 1024, 1025, 8080, 65535)]


@pytest.mark.parametrize("name", sorted(HAND_POLICIES))
def test_chain_judges_like_decide_hand_picked(name):
    assert check_equivalent(HAND_POLICIES[name], DESTS) == len(DESTS) * 2


V6_DENY_POLICIES = {
    "deny-v6-all": P("deny any [::/0]"),
    "deny-v6-all-udp-53": P("deny udp [::/0] 53", "allow udp any"),
    "deny-v6-low-half": P("deny tcp [::/1]", "allow tcp 10.0.0.0/8"),
}


@pytest.mark.parametrize("name", sorted(V6_DENY_POLICIES))
def test_v6_deny_covering_mapped_space_judges_v6_and_mapped_like_decide(name):
    # native IPv4 destinations are left out on purpose: see the xfail below
    dests = [d for d in DESTS if d.family != 2]
    assert check_equivalent(V6_DENY_POLICIES[name], dests) == len(dests) * 2


@pytest.mark.parametrize("name", sorted(V6_DENY_POLICIES))
def test_v6_deny_covering_mapped_space_spares_native_ipv4(name):
    dests = [d for d in DESTS if d.family == 2]
    check_equivalent(V6_DENY_POLICIES[name], dests)


# ---- random policies, fixed seed

_SEED4 = ["10.0.0.0", "10.1.2.3", "127.0.0.1", "169.254.169.254", "169.254.3.4", "0.0.0.0",
          "198.18.5.1", "8.8.8.8", "255.255.255.255"]
_SEED6 = ["::1", "fe80::1", "fd00::1", "fd00:ec2::254", "::", "2001:db8::1", "::127.0.0.1",
          "64:ff9b::1"]


def _rand_net(rng: random.Random) -> IPv4Network | IPv6Network | None:
    if rng.random() < 0.1:
        return None
    if rng.random() < 0.5:
        base = int(IPv4Address(rng.choice(_SEED4)))
        if rng.random() < 0.5:
            base ^= rng.getrandbits(32) >> rng.randint(0, 32)
        plen = rng.choice([0, 1, 8, 16, 24, 31, 32, rng.randint(0, 32)])
        return IPv4Network((base, plen), strict=False)
    while True:
        base = int(IPv6Address(rng.choice(_SEED6)))
        if rng.random() < 0.5:
            base ^= rng.getrandbits(128) >> rng.randint(0, 128)
        plen = rng.choice([0, 1, 10, 32, 64, 96, 127, 128, rng.randint(0, 128)])
        net = IPv6Network((base, plen), strict=False)
        if not net.subnet_of(MAPPED):        # the rule syntax rejects mapped prefixes
            return net


def _rand_rule(rng: random.Random, action: str) -> PolicyRule:
    proto = rng.choice(["tcp", "udp", "any"])
    lo = rng.choice([0, 0, 1, 22, 53, 80, 1000, rng.randint(1, 65535)])
    hi = 65535 if lo == 0 else min(65535, rng.choice([lo, lo, lo + rng.randint(0, 2000),
                                                      65535]))
    return PolicyRule(action, _rand_net(rng), lo, hi, proto)


def _rand_dest(rng: random.Random, policy: Policy) -> InetAddr:
    nets = [r.network for r in policy.allow + policy.deny if r.network is not None]
    nets += [n for _, ns in BUILTIN_DENIES for n in ns]
    c = rng.random()
    if c < 0.55:        # inside (or at the edge of) a rule or a built-in range
        net = rng.choice(nets)
        off = rng.choice([0, net.num_addresses - 1, rng.randrange(net.num_addresses)])
        ip = net.network_address + off
    elif c < 0.75:
        ip = ip_address(rng.choice(_SEED4 + _SEED6))
    else:
        ip = (IPv4Address(rng.getrandbits(32)) if rng.random() < 0.5
              else IPv6Address(rng.getrandbits(128)))
    if ip.version == 4 and rng.random() < 0.3:
        ip = IPv6Address("::ffff:" + str(ip))
    ports = [0, 1, 22, 53, 80, 1000, 2000, 65535, rng.randint(0, 65535)]
    for r in policy.allow + policy.deny:       # port range edges matter
        ports += [r.port_lo, r.port_hi, max(0, r.port_lo - 1), min(65535, r.port_hi + 1)]
    return InetAddr.of(ip, rng.choice(ports))


def _rand_policy(rng: random.Random, *, v6_deny_over_mapped: bool) -> Policy:
    deny = [_rand_rule(rng, "deny") for _ in range(rng.randint(0, 3))]
    if not v6_deny_over_mapped:
        deny = [r for r in deny if not _covers_mapped(r)]
    allow = [_rand_rule(rng, "allow") for _ in range(rng.randint(0, 5))]
    return Policy(tuple(allow), tuple(deny), rng.random() < 0.8)


@pytest.mark.parametrize("seed", [1, 2, 3, 20240611])
def test_chain_judges_like_decide_random(seed):
    rng = random.Random(seed)
    checked = 0
    verdicts = set()
    for _ in range(600):
        policy = _rand_policy(rng, v6_deny_over_mapped=False)
        dests = [_rand_dest(rng, policy) for _ in range(12)]
        checked += check_equivalent(policy, dests)
        verdicts |= {decide(policy, "tcp", d).rule.split("[")[0] for d in dests}
    assert checked == 600 * 12 * 2
    # the sample really exercised every branch of decide
    assert verdicts >= {"deny", "allow", "builtin:metadata", "builtin:loopback",
                        "builtin:link-local", "builtin:unspecified", "default:allowlist",
                        "default:allow"}


@pytest.mark.parametrize("seed", [4, 5])
def test_v6_deny_over_mapped_random_agrees_on_v6_and_mapped(seed):
    rng = random.Random(seed)
    for _ in range(400):
        policy = _rand_policy(rng, v6_deny_over_mapped=True)
        dests = [d for d in (_rand_dest(rng, policy) for _ in range(12)) if d.family != 2]
        check_equivalent(policy, dests)


def test_directory_services_are_accepted_only_in_the_chains_of_containers_sent_there():
    """Each container's chain accepts the host addresses the directory may
    send it to, first; another container's chain does not."""
    from ipaddress import ip_address
    a, b = 0x53470001, 0x53470002
    text = plan_ruleset({a: Policy(), b: Policy()},
                        {a: (("tcp", ip_address("198.18.0.2"), 8081),
                             ("udp", ip_address("fd00::1"), 53))})
    lines = [line.strip() for line in text.splitlines()]
    v4 = lines.index("meta l4proto . ip daddr . th dport { tcp . 198.18.0.2 . 8081 } accept")
    v6 = lines.index("meta l4proto . ip6 daddr . th dport { udp . fd00::1 . 53 } accept")
    assert lines.index(f"chain {chain_name(a)} {{") == v4 - 1 and v6 == v4 + 1
    assert lines.count("meta l4proto . ip daddr . th dport { tcp . 198.18.0.2 . 8081 } accept") == 1
    assert lines.index(f"chain {chain_name(b)} {{") > v6
    assert "th dport {" not in plan_ruleset({a: Policy()})
