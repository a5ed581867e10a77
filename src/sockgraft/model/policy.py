"""Per-container destination access control: rules, policy, and `decide`.

Owns: the policy rule syntax, the built-in deny set, and the single function
that answers "may this container connect()/sendto() this destination?" with
the name of the rule that decided, for audit lines.

Must not: do I/O, log, or know about grafting (which endpoint a connection
leaves from is `graftconfig`'s business). `decide` runs on every trapped
connect/sendto, so it works on integers precomputed when the Policy is built.

Rule syntax (one rule per string; tokens separated by blanks)::

    ACTION PROTO DEST [PORTS]

    ACTION  allow | deny
    PROTO   tcp | udp | any
    DEST    any                      every IPv4 and IPv6 address
            ADDR                     one host (10.0.0.1, fd00::1, [fd00::1])
            ADDR/LEN                 a prefix (10.0.0.0/8, fd00::/8, [fd00::/8])
    PORTS   P | LO-HI (1-65535)      omitted: every port (0-65535)

    allow tcp 10.0.0.0/8 80-443
    deny any 192.168.0.0/16
    allow udp [fd00::/8] 53
    deny tcp any 25

Prefixes with host bits set (10.0.0.1/8) are rejected; IPv4-mapped IPv6
prefixes are rejected (write the IPv4 form).

Decision order for `decide(policy, proto, dest)`:

  1. explicit deny rules, lowest index first          -> "deny[i]"
  2. explicit allow rules, lowest index first         -> "allow[i]"
     but if the destination is in a built-in deny category, an allow rule
     counts only if it *names* that category: its DEST lies entirely inside
     the category's range. `allow tcp 0.0.0.0/0` does not open loopback or
     cloud metadata; `allow tcp 127.0.0.1 8080` opens that loopback port.
     169.254.169.254 is "metadata" (not just "link-local"), so opening it
     needs a rule inside 169.254.169.254/32.
  3. built-in denies (if builtin_denies)              -> "builtin:CATEGORY"
  4. allow list non-empty                             -> "default:allowlist"
  5. otherwise allowed                                -> "default:allow"

IPv4-mapped destinations (::ffff:a.b.c.d): a v6 socket sending there really
sends IPv4, so the IPv4 form is what allow rules and built-in categories see.
Deny and allow rules alike see only the IPv4 form: on the wire (and so in
the kernel's per-packet nftables enforcement) a mapped destination is an IPv4
packet, indistinguishable from one an AF_INET socket sends. `allow any ::/0`
therefore cannot reach IPv4 destinations, and `deny any ::/0` denies IPv6
only: write IPv4 rules for IPv4 traffic.

A `proto` other than tcp/udp (e.g. "sctp") is matched only by PROTO `any`.
"""

from __future__ import annotations

import errno as _errno
from dataclasses import dataclass, field
from ipaddress import IPv4Network, IPv6Network
from typing import Literal, NoReturn

from sockgraft.errors import ConfigError
from sockgraft.model.endpoint import parse_network, parse_port_range
from sockgraft.model.sockaddr import InetAddr

__all__ = [
    "PolicyRule", "Policy", "Decision", "decide", "parse_policy_rule",
    "BUILTIN_DENIES", "ACTIONS", "PROTOS", "RULE_SYNTAX", "LinearRule", "linearize",
]

Action = Literal["allow", "deny"]
Proto = Literal["tcp", "udp", "any"]
ACTIONS: tuple[str, ...] = ("allow", "deny")
PROTOS: tuple[str, ...] = ("tcp", "udp", "any")
RULE_SYNTAX = "ACTION PROTO DEST [PORTS], e.g. 'allow tcp 10.0.0.0/8 80-443'"

# Most specific first: the first category containing an address is its
# category (169.254.169.254 is metadata, not merely link-local).
BUILTIN_DENIES: tuple[tuple[str, tuple[IPv4Network | IPv6Network, ...]], ...] = (
    ("metadata", (IPv4Network("169.254.169.254/32"), IPv6Network("fd00:ec2::254/128"))),
    ("loopback", (IPv4Network("127.0.0.0/8"), IPv6Network("::1/128"))),
    ("link-local", (IPv4Network("169.254.0.0/16"), IPv6Network("fe80::/10"))),
    ("unspecified", (IPv4Network("0.0.0.0/8"), IPv6Network("::/128"))),
    # a host socket's datagrams to a group or the limited broadcast reach
    # every listener of a host link (the underlay, every bridge: the
    # interface is the sender's choice - IP_MULTICAST_IF, IP_PKTINFO, a
    # scope id)
    ("multicast", (IPv4Network("224.0.0.0/4"), IPv6Network("ff00::/8"))),
    ("broadcast", (IPv4Network("255.255.255.255/32"),)),
)


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """network None means `any` (both families). Ports are inclusive."""

    action: Action
    network: IPv4Network | IPv6Network | None
    port_lo: int = 0
    port_hi: int = 65535
    proto: Proto = "any"

    def __post_init__(self) -> None:
        if self.action not in ACTIONS:
            raise ConfigError(f"policy action {self.action!r} unknown; accepted: "
                              f"{', '.join(ACTIONS)}", field="policy rule", value=self.action)
        if self.proto not in PROTOS:
            raise ConfigError(f"policy protocol {self.proto!r} unknown; accepted: "
                              f"{', '.join(PROTOS)}", field="policy rule", value=self.proto)
        if self.network is not None:
            parse_network(str(self.network), field="policy rule")
        if not (0 <= self.port_lo <= self.port_hi <= 65535):
            raise ConfigError(f"policy ports {self.port_lo}-{self.port_hi} invalid; "
                              f"accepted: LO-HI with 0 <= LO <= HI <= 65535",
                              field="policy rule", value=(self.port_lo, self.port_hi))

    @property
    def all_ports(self) -> bool:
        return self.port_lo == 0 and self.port_hi == 65535

    def __str__(self) -> str:
        net = self.network
        if net is None:
            dest = "any"
        else:
            # a single host prints as a bare address (parsed back as /32, /128)
            dest = (str(net.network_address) if net.prefixlen == net.max_prefixlen
                    else str(net))
            if net.version == 6:
                dest = f"[{dest}]"
        parts = [self.action, self.proto, dest]
        if not self.all_ports:
            parts.append(str(self.port_lo) if self.port_lo == self.port_hi
                         else f"{self.port_lo}-{self.port_hi}")
        return " ".join(parts)


def parse_policy_rule(text: str, *, action: str | None = None,
                      source: str | None = "command line",
                      field: str | None = None) -> PolicyRule:
    """Parse `ACTION PROTO DEST [PORTS]`.

    With `action` given (a rule read from the TOML `allow`/`deny` list) the
    leading ACTION may be omitted; if present it must equal `action`.
    Errors quote the whole rule; their `value` is the offending word.
    """
    try:
        return _parse_policy_rule(text, action)
    except ConfigError as e:
        raise ConfigError(f"policy rule {text!r}: {e}", source=source, field=field,
                          value=e.value) from None


def _parse_policy_rule(text: str, action: str | None) -> PolicyRule:
    def fail(message: str, value: object) -> NoReturn:
        raise ConfigError(message, value=value)

    if not isinstance(text, str):
        fail(f"must be a string; accepted: {RULE_SYNTAX}", text)
    tokens = text.split()
    if action is not None and (not tokens or tokens[0] not in ACTIONS):
        tokens.insert(0, action)
    if not 3 <= len(tokens) <= 4:
        fail(f"has {len(tokens)} words, expected 3 or 4; accepted: {RULE_SYNTAX}", text)
    act, proto, dest = tokens[0], tokens[1], tokens[2]
    if act not in ACTIONS:
        fail(f"action {act!r} unknown; accepted: {', '.join(ACTIONS)}", act)
    if action is not None and act != action:
        fail(f"is a {act!r} rule in the {action!r} list; move it or drop the action word",
             act)
    if proto not in PROTOS:
        fail(f"protocol {proto!r} unknown; accepted: {', '.join(PROTOS)}", proto)
    network: IPv4Network | IPv6Network | None
    if dest == "any":
        network = None
    else:
        bracketed = dest.startswith("[") and dest.endswith("]")
        inner = dest[1:-1] if bracketed else dest
        network = parse_network(inner, field=None, require_len=False)
        if bracketed and network.version != 6:
            fail(f"brackets are for IPv6; write {inner}", dest)
    lo, hi = 0, 65535
    if len(tokens) == 4:
        lo, hi = parse_port_range(tokens[3], field=None)
    return PolicyRule(act, network, lo, hi, proto)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    rule: str
    errno: int = 0

    def __str__(self) -> str:
        return f"{'allow' if self.allowed else 'deny'} by {self.rule}"


# A compiled rule: (version or 0 for any, net int, mask int, lo, hi, proto,
# index, categories named). Plain tuples: decide() is on the hot path.
_Compiled = tuple[int, int, int, int, int, str, int, frozenset[str]]


def _mask(net: IPv4Network | IPv6Network) -> int:
    return int(net.netmask)


def _compile(rules: tuple[PolicyRule, ...]) -> tuple[_Compiled, ...]:
    out = []
    for i, r in enumerate(rules):
        if r.network is None:
            out.append((0, 0, 0, r.port_lo, r.port_hi, r.proto, i, frozenset()))
            continue
        named = frozenset(
            name for name, nets in BUILTIN_DENIES
            if any(n.version == r.network.version and r.network.subnet_of(n)  # type: ignore[arg-type]
                   for n in nets))
        out.append((r.network.version, int(r.network.network_address), _mask(r.network),
                    r.port_lo, r.port_hi, r.proto, i, named))
    return tuple(out)


_BUILTIN_COMPILED: tuple[tuple[str, int, int, int], ...] = tuple(
    (name, n.version, int(n.network_address), _mask(n))
    for name, nets in BUILTIN_DENIES for n in nets)


def builtin_category(version: int, ip: int) -> str | None:
    for name, v, net, mask in _BUILTIN_COMPILED:
        if v == version and ip & mask == net:
            return name
    return None


@dataclass(frozen=True)
class Policy:
    allow: tuple[PolicyRule, ...] = ()
    deny: tuple[PolicyRule, ...] = ()
    builtin_denies: bool = True
    _allow_c: tuple[_Compiled, ...] = field(init=False, repr=False, compare=False)
    _deny_c: tuple[_Compiled, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "allow", tuple(self.allow))
        object.__setattr__(self, "deny", tuple(self.deny))
        for listname, rules in (("allow", self.allow), ("deny", self.deny)):
            for i, r in enumerate(rules):
                if not isinstance(r, PolicyRule):
                    raise ConfigError(f"policy.{listname}[{i}] is not a PolicyRule: {r!r}",
                                      field=f"policy.{listname}[{i}]", value=r)
                if r.action != listname:
                    raise ConfigError(f"rule {str(r)!r} is a {r.action} rule in the "
                                      f"{listname} list", field=f"policy.{listname}[{i}]",
                                      value=str(r))
        if not isinstance(self.builtin_denies, bool):
            raise ConfigError(f"builtin_denies must be true or false, got "
                              f"{self.builtin_denies!r}", field="policy.builtin_denies",
                              value=self.builtin_denies)
        object.__setattr__(self, "_allow_c", _compile(self.allow))
        object.__setattr__(self, "_deny_c", _compile(self.deny))


def _first_match(compiled: tuple[_Compiled, ...], forms: tuple[tuple[int, int], ...],
                 port: int, proto: str, category: str | None = None) -> int:
    for version, net, mask, lo, hi, rproto, idx, named in compiled:
        if not lo <= port <= hi:
            continue
        if rproto != "any" and rproto != proto:
            continue
        if category is not None and category not in named:
            continue
        for v, ip in forms:
            if (version == 0 or version == v) and ip & mask == net:
                return idx
    return -1


def decide(policy: Policy, proto: str, dest: InetAddr) -> Decision:
    """May a container send to `dest` over `proto` ('tcp'/'udp')? See module doc."""
    ip = dest.ip
    port = dest.port
    mapped = ip.ipv4_mapped if ip.version == 6 else None
    if mapped is not None:
        effective = ((4, int(mapped)),)
    else:
        effective = ((ip.version, int(ip)),)

    i = _first_match(policy._deny_c, effective, port, proto)
    if i >= 0:
        return Decision(False, f"deny[{i}]", _errno.EACCES)

    category = builtin_category(*effective[0]) if policy.builtin_denies else None
    i = _first_match(policy._allow_c, effective, port, proto, category)
    if i >= 0:
        return Decision(True, f"allow[{i}]", 0)
    if category is not None:
        return Decision(False, f"builtin:{category}", _errno.EACCES)
    if policy.allow:
        return Decision(False, "default:allowlist", _errno.EACCES)
    return Decision(True, "default:allow", 0)


@dataclass(frozen=True, slots=True)
class LinearRule:
    """One entry of a first-match rule list equivalent to `decide`; what the
    kernel enforcers (nftables chains, the cgroup BPF programs) evaluate.
    network None matches every address of both families."""
    network: IPv4Network | IPv6Network | None
    proto: Proto
    port_lo: int
    port_hi: int
    allow: bool
    label: str          # the rule name `decide` reports: deny[i], allow[i], builtin:X

    @property
    def all_ports(self) -> bool:
        return self.port_lo == 0 and self.port_hi == 65535


def _first_category(r: PolicyRule) -> str | None:
    if r.network is None:
        return None
    for name, nets in BUILTIN_DENIES:
        if any(n.version == r.network.version and r.network.subnet_of(n)  # type: ignore[arg-type]
               for n in nets):
            return name
    return None


def linearize(policy: Policy) -> tuple[tuple[LinearRule, ...], LinearRule]:
    """`decide` as a first-match list plus the final verdict (network None,
    every port). Order: deny rules; per built-in category (most specific
    first) the allow rules that name it, then the category's ranges; the
    remaining allow rules; final: deny if the allow list is non-empty."""
    out: list[LinearRule] = []
    for i, r in enumerate(policy.deny):
        out.append(LinearRule(r.network, r.proto, r.port_lo, r.port_hi, False, f"deny[{i}]"))
    generic = list(enumerate(policy.allow))
    if policy.builtin_denies:
        for name, nets in BUILTIN_DENIES:
            for i, r in [(i, r) for i, r in generic if _first_category(r) == name]:
                out.append(LinearRule(r.network, r.proto, r.port_lo, r.port_hi, True,
                                      f"allow[{i}]"))
                generic.remove((i, r))
            for n in nets:
                out.append(LinearRule(n, "any", 0, 65535, False, f"builtin:{name}"))
    for i, r in generic:
        out.append(LinearRule(r.network, r.proto, r.port_lo, r.port_hi, True, f"allow[{i}]"))
    final = (LinearRule(None, "any", 0, 65535, False, "default:allowlist") if policy.allow
             else LinearRule(None, "any", 0, 65535, True, "default:allow"))
    return tuple(out), final
