"""One container's graft configuration: endpoints, conversion rules, policy.

Owns: the immutable `GraftConfig`, its consistency rules, the two lookups the
agent makes per trapped call (`match_ingress` for bind, `match_egress` for
connect/sendto), pure edits returning new configs, and the TOML file format.

Must not: read or write files, touch sockets, or decide access (that is
`policy.decide`; the agent calls both). `load_config` takes text, `dump_config`
returns text; where the text lives is the caller's business.

Matching rules (the engine relies on these):

  ingress, for a bind to A:P (A first unmapped: a v6 socket binding
  ::ffff:a.b.c.d is an IPv4 bind, ::ffff:0.0.0.0 the IPv4 wildcard):
    1. a rule for exactly A whose port range covers P;
    2. else, unless A is the wildcard or a loopback address, the wildcard rule
       of A's family (0.0.0.0 for IPv4, :: for IPv6) covering P.
    A bind to :: (dual-stack) matches only `::` rules, never 0.0.0.0 ones; an
    IPv4 bind never matches `::` rules. Loopback binds are grafted only by a
    rule naming the loopback address: moving a 127.0.0.1 listener onto a host
    address would expose it and break local clients in the container.
    Port 0 (ephemeral) binds never match (rule ports are 1-65535).
    Host port: a dynamic endpoint binds port 0; otherwise
    endpoint.port + (P - rule.port_lo), see `ingress_host_port`.

  egress, for a destination A:P (A first unmapped, so v4-mapped
  destinations match IPv4 prefixes): longest prefix wins; at equal length a
  rule for port P beats a portless rule; a prefix whose port-specific rules
  miss P and has no portless rule falls through to shorter prefixes.

Consistency (checked on every construction):
  * the container id matches [A-Za-z0-9][A-Za-z0-9_.+-]{0,127};
  * endpoints are keyed by their own name;
  * every rule names an existing endpoint, and it is an ipv4/ipv6 one;
  * ingress: IPv4 address -> ipv4 endpoint; IPv6 address -> ipv6 endpoint;
    the `::` wildcard -> ipv4 or ipv6; a fixed endpoint port must leave room
    for the whole range (port + (hi - lo) <= 65535);
  * ingress: no two rules for the same address with overlapping port ranges;
  * egress: IPv4 prefix -> ipv4 endpoint, IPv6 prefix -> ipv6 endpoint; no
    two rules with the same prefix and port.

TOML schema (version 1)::

    version = 1                      # optional; only 1 is accepted
    container = "h1-c1"              # required
    graft_at = "syscall"             # optional: "syscall" (default) | "socket"
    splice = true                    # optional: false keeps this container's TCP
                                     # connections out of sockmap splicing

    [endpoints.ep-http]              # one table per endpoint; key = name
    type = "ipv4"                    # "ipv4" | "ipv6" | "unix"
    addr = "198.18.0.1"              # ipv4/ipv6 only: an address string
    port = 8080                      # ipv4/ipv6 only: 1-65535 or "dynamic"

    [endpoints.ep-sock]
    type = "unix"
    path = "/run/sockgraft/h1-c1.sock"   # unix only: absolute, <= 107 bytes

    [rules]                          # optional; both keys optional
    ingress = ["0.0.0.0:80=ep-http"]     # parse_ingress syntax
    egress = ["198.18.0.0/24=ep-out"]    # parse_egress syntax

    [policy]                         # optional; all keys optional
    allow = ["allow tcp 198.18.0.0/24"]  # policy rule syntax (ACTION optional)
    deny = []
    builtin_denies = true

Unknown keys anywhere are errors naming the key and the accepted ones.

graft_at: "syscall" grafts a socket when its bind()/connect() is trapped (the
container keeps its own loopback and every destination no rule covers);
"socket" grafts every TCP/UDP socket at socket() time and leaves connect and
sendmsg to the in-kernel programs (bpf/sockgraft.bpf.c): the fastest setup,
for containers whose whole INET traffic goes through the host - a
destination no egress rule covers is refused (EPERM), and the container's
loopback is the host's (denied unless the policy opens it).

splice: an agent started with --sockmap splices a connection whose two ends
are grafted sockets on one node (docs/architecture.md lists what an
application sees differently); false keeps every connection of this
container on TCP.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field, replace as _dc_replace
from ipaddress import IPv4Address, IPv6Address
from types import MappingProxyType
from typing import Any, Mapping, NoReturn

from sockgraft.errors import ConfigError
from sockgraft.model.endpoint import (EgressRule, Endpoint, IngressRule, make_endpoint,
                                      parse_egress, parse_ingress)
from sockgraft.model.policy import Policy, PolicyRule, parse_policy_rule
from sockgraft.model.sockaddr import InetAddr

__all__ = [
    "GraftConfig", "Rule", "SCHEMA_VERSION",
    "check_config", "match_ingress", "match_egress", "ingress_host_port",
    "with_endpoint", "without_endpoint", "with_rule", "without_rule",
    "with_policy", "with_policy_rule", "without_policy_rule", "with_graft_at", "GRAFT_AT",
    "load_config", "dump_config", "config_from_dict",
]

SCHEMA_VERSION = 1
Rule = IngressRule | EgressRule

_CONTAINER_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,127}")
_CONTAINER_ACCEPTED = "1-128 characters from A-Z a-z 0-9 _ . + -, starting with a letter or digit"
_V4_ANY = IPv4Address(0)
_V6_ANY = IPv6Address(0)


def _fail(message: str, source: str | None, field_: str | None, value: object) -> NoReturn:
    raise ConfigError(message, source=source, field=field_, value=value)


# --------------------------------------------------------------------------
# the config


def check_config(container: object, endpoints: Mapping[str, Endpoint],
                 ingress: tuple[IngressRule, ...], egress: tuple[EgressRule, ...],
                 policy: Policy, *, source: str | None = None) -> None:
    """Raise ConfigError (naming `source` and the field) if inconsistent."""
    if not isinstance(container, str) or not _CONTAINER_RE.fullmatch(container):
        _fail(f"container id {container!r} invalid; accepted: {_CONTAINER_ACCEPTED}",
              source, "container", container)
    for key, ep in endpoints.items():
        if not isinstance(ep, Endpoint):
            _fail(f"endpoint {key!r} is not an Endpoint: {ep!r}", source,
                  f"endpoints.{key}", ep)
        if key != ep.name:
            _fail(f"endpoint keyed {key!r} is named {ep.name!r}; the key must be the name",
                  source, f"endpoints.{key}", ep.name)

    def endpoint_for(rule: Rule, fld: str) -> Endpoint:
        ep = endpoints.get(rule.endpoint)
        if ep is None:
            known = ", ".join(sorted(endpoints)) or "none defined"
            _fail(f"rule {str(rule)!r} names endpoint {rule.endpoint!r}, which does not "
                  f"exist; defined endpoints: {known}", source, fld, str(rule))
        if ep.kind == "unix":
            _fail(f"rule {str(rule)!r} names unix endpoint {ep.name!r}; rules need an "
                  f"ipv4 or ipv6 endpoint", source, fld, str(rule))
        return ep

    seen_in: dict[IPv4Address | IPv6Address, list[tuple[int, IngressRule]]] = {}
    for i, r in enumerate(ingress):
        fld = f"rules.ingress[{i}]"
        if not isinstance(r, IngressRule):
            _fail(f"not an ingress rule: {r!r}", source, fld, r)
        ep = endpoint_for(r, fld)
        if r.addr.version == 4 and ep.kind != "ipv4":
            _fail(f"rule {str(r)!r}: an IPv4 address needs an ipv4 endpoint, "
                  f"{ep.name!r} is {ep.kind}", source, fld, str(r))
        if r.addr.version == 6 and r.addr != _V6_ANY and ep.kind != "ipv6":
            _fail(f"rule {str(r)!r}: an IPv6 address needs an ipv6 endpoint, "
                  f"{ep.name!r} is {ep.kind} (only the :: wildcard may use either)",
                  source, fld, str(r))
        if ep.port is not None and ep.port + (r.port_hi - r.port_lo) > 65535:
            _fail(f"rule {str(r)!r}: {r.port_hi - r.port_lo + 1} ports starting at "
                  f"endpoint port {ep.port} run past 65535", source, fld, str(r))
        for j, other in seen_in.get(r.addr, ()):
            if r.port_lo <= other.port_hi and other.port_lo <= r.port_hi:
                _fail(f"rule {str(r)!r} overlaps rule {str(other)!r} "
                      f"(rules.ingress[{j}]) on the same address", source, fld, str(r))
        seen_in.setdefault(r.addr, []).append((i, r))

    seen_out: dict[tuple[object, int | None], int] = {}
    for i, r in enumerate(egress):
        fld = f"rules.egress[{i}]"
        if not isinstance(r, EgressRule):
            _fail(f"not an egress rule: {r!r}", source, fld, r)
        ep = endpoint_for(r, fld)
        want = "ipv4" if r.network.version == 4 else "ipv6"
        if ep.kind != want:
            _fail(f"rule {str(r)!r}: an IPv{r.network.version} prefix needs an {want} "
                  f"endpoint, {ep.name!r} is {ep.kind}", source, fld, str(r))
        key = (r.network, r.port)
        if key in seen_out:
            j = seen_out[key]
            _fail(f"rule {str(r)!r} duplicates rule {str(egress[j])!r} "
                  f"(rules.egress[{j}]): same prefix and port", source, fld, str(r))
        seen_out[key] = i

    if not isinstance(policy, Policy):
        _fail(f"policy is not a Policy: {policy!r}", source, "policy", policy)


@dataclass(frozen=True)
class GraftConfig:
    """Immutable; build edited copies with the with_*/without_* functions."""

    container: str
    endpoints: Mapping[str, Endpoint] = field(default_factory=dict)
    ingress: tuple[IngressRule, ...] = ()
    egress: tuple[EgressRule, ...] = ()
    policy: Policy = field(default_factory=Policy)
    graft_at: str = "syscall"
    splice: bool = True
    _in_idx: dict = field(init=False, repr=False, compare=False)
    _out_idx: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "endpoints", MappingProxyType(dict(self.endpoints)))
        set_(self, "ingress", tuple(self.ingress))
        set_(self, "egress", tuple(self.egress))
        check_config(self.container, self.endpoints, self.ingress, self.egress, self.policy)
        if self.graft_at not in GRAFT_AT:
            _fail(f"graft_at {self.graft_at!r} unknown; accepted: {', '.join(GRAFT_AT)}",
                  f"container {self.container}", "graft_at", self.graft_at)

        in_idx: dict[IPv4Address | IPv6Address, tuple[IngressRule, ...]] = {}
        for r in self.ingress:
            in_idx[r.addr] = in_idx.get(r.addr, ()) + (r,)
        set_(self, "_in_idx", in_idx)

        # version -> [(prefixlen, {network >> hostbits: (portless, {port: rule})})],
        # longest prefix first.
        by_len: dict[int, dict[int, dict[int, tuple]]] = {4: {}, 6: {}}
        for r in self.egress:
            n = r.network
            bits = n.max_prefixlen - n.prefixlen
            table = by_len[n.version].setdefault(n.prefixlen, {})
            portless, ports = table.get(int(n.network_address) >> bits, (None, {}))
            if r.port is None:
                portless = r
            else:
                ports = {**ports, r.port: r}
            table[int(n.network_address) >> bits] = (portless, ports)
        out_idx = {v: tuple(sorted(t.items(), key=lambda kv: -kv[0]))
                   for v, t in by_len.items()}
        set_(self, "_out_idx", out_idx)

    def match_ingress(self, addr: InetAddr) -> tuple[IngressRule, Endpoint] | None:
        return match_ingress(self, addr)

    def match_egress(self, addr: InetAddr) -> tuple[EgressRule, Endpoint] | None:
        return match_egress(self, addr)

    def __hash__(self) -> int:
        return hash((self.container, tuple(sorted(self.endpoints.items())),
                     self.ingress, self.egress, self.policy, self.graft_at, self.splice))


def match_ingress(cfg: GraftConfig, addr: InetAddr) -> tuple[IngressRule, Endpoint] | None:
    """The rule and endpoint a bind to `addr` is grafted onto, or None."""
    a = addr.unmapped()
    port = a.port
    ip = a.ip
    for r in cfg._in_idx.get(ip, ()):
        if r.port_lo <= port <= r.port_hi:
            return r, cfg.endpoints[r.endpoint]
    if ip.is_unspecified or ip.is_loopback:
        return None
    for r in cfg._in_idx.get(_V4_ANY if ip.version == 4 else _V6_ANY, ()):
        if r.port_lo <= port <= r.port_hi:
            return r, cfg.endpoints[r.endpoint]
    return None


def match_egress(cfg: GraftConfig, addr: InetAddr) -> tuple[EgressRule, Endpoint] | None:
    """The rule and endpoint a connect/sendto to `addr` leaves from, or None."""
    a = addr.unmapped()
    ip = int(a.ip)
    maxlen = 32 if a.ip.version == 4 else 128
    port = a.port
    for plen, table in cfg._out_idx[a.ip.version]:
        hit = table.get(ip >> (maxlen - plen))
        if hit is not None:
            portless, ports = hit
            r = ports.get(port) or portless
            if r is not None:
                return r, cfg.endpoints[r.endpoint]
    return None


def ingress_host_port(rule: IngressRule, endpoint: Endpoint, port: int) -> int:
    """Host port for a container bind to `port` under `rule`: 0 if dynamic,
    else endpoint.port shifted by the offset of `port` in the rule's range."""
    if not rule.port_lo <= port <= rule.port_hi:
        raise ValueError(f"port {port} not in rule {rule}")
    if endpoint.port is None:
        return 0
    return endpoint.port + (port - rule.port_lo)


# --------------------------------------------------------------------------
# edits


def _rebuild(cfg: GraftConfig, **changes: Any) -> GraftConfig:
    parts = dict(container=cfg.container, endpoints=cfg.endpoints, ingress=cfg.ingress,
                 egress=cfg.egress, policy=cfg.policy, graft_at=cfg.graft_at,
                 splice=cfg.splice)
    parts.update(changes)
    check_config(parts["container"], parts["endpoints"], parts["ingress"], parts["egress"],
                 parts["policy"], source=_src(cfg))
    return GraftConfig(**parts)


def with_graft_at(cfg: GraftConfig, graft_at: str) -> GraftConfig:
    if graft_at not in GRAFT_AT:
        _fail(f"graft_at {graft_at!r} unknown; accepted: {', '.join(GRAFT_AT)}", _src(cfg),
              "graft_at", graft_at)
    return _rebuild(cfg, graft_at=graft_at)


def _src(cfg: GraftConfig) -> str:
    return f"container {cfg.container}"


def with_endpoint(cfg: GraftConfig, ep: Endpoint, *, replace: bool = False) -> GraftConfig:
    """Add `ep`; with replace=True an existing one of that name is replaced
    (the rules using it are re-checked against the new definition)."""
    if ep.name in cfg.endpoints and not replace:
        _fail(f"endpoint {ep.name!r} already exists ({cfg.endpoints[ep.name]}); "
              f"remove it first or replace it", _src(cfg), f"endpoints.{ep.name}", ep.name)
    return _rebuild(cfg, endpoints={**cfg.endpoints, ep.name: ep})


def without_endpoint(cfg: GraftConfig, name: str) -> GraftConfig:
    """Remove endpoint `name`; refused while a rule uses it."""
    if name not in cfg.endpoints:
        _fail(f"endpoint {name!r} does not exist; defined endpoints: "
              f"{', '.join(sorted(cfg.endpoints)) or 'none'}", _src(cfg),
              f"endpoints.{name}", name)
    for kind, rules in (("ingress", cfg.ingress), ("egress", cfg.egress)):
        for i, r in enumerate(rules):
            if r.endpoint == name:
                _fail(f"endpoint {name!r} is used by {kind} rule {str(r)!r} "
                      f"(rules.{kind}[{i}]); remove the rule first", _src(cfg),
                      f"endpoints.{name}", name)
    return _rebuild(cfg, endpoints={k: v for k, v in cfg.endpoints.items() if k != name})


def with_rule(cfg: GraftConfig, rule: Rule) -> GraftConfig:
    """Append an ingress or egress rule (checked like any config)."""
    if isinstance(rule, IngressRule):
        if rule in cfg.ingress:
            _fail(f"ingress rule {str(rule)!r} already exists", _src(cfg),
                  "rules.ingress", str(rule))
        return _rebuild(cfg, ingress=cfg.ingress + (rule,))
    if isinstance(rule, EgressRule):
        return _rebuild(cfg, egress=cfg.egress + (rule,))
    raise TypeError(f"not a rule: {rule!r}")


def without_rule(cfg: GraftConfig, rule: Rule) -> GraftConfig:
    if isinstance(rule, IngressRule):
        kind, rules = "ingress", cfg.ingress
    elif isinstance(rule, EgressRule):
        kind, rules = "egress", cfg.egress
    else:
        raise TypeError(f"not a rule: {rule!r}")
    if rule not in rules:
        listed = ", ".join(repr(str(r)) for r in rules) or "none"
        _fail(f"{kind} rule {str(rule)!r} does not exist; {kind} rules: {listed}",
              _src(cfg), f"rules.{kind}", str(rule))
    return _rebuild(cfg, **{kind: tuple(r for r in rules if r != rule)})


def with_policy(cfg: GraftConfig, policy: Policy) -> GraftConfig:
    return _rebuild(cfg, policy=policy)


def with_policy_rule(cfg: GraftConfig, rule: PolicyRule) -> GraftConfig:
    """Append to the allow or deny list (by rule.action)."""
    p = cfg.policy
    lst = p.allow if rule.action == "allow" else p.deny
    if rule in lst:
        _fail(f"policy rule {str(rule)!r} already exists", _src(cfg),
              f"policy.{rule.action}", str(rule))
    return _rebuild(cfg, policy=_dc_replace(p, **{rule.action: lst + (rule,)}))


def without_policy_rule(cfg: GraftConfig, rule: PolicyRule) -> GraftConfig:
    p = cfg.policy
    lst = p.allow if rule.action == "allow" else p.deny
    if rule not in lst:
        _fail(f"policy rule {str(rule)!r} does not exist", _src(cfg),
              f"policy.{rule.action}", str(rule))
    return _rebuild(cfg, policy=_dc_replace(
        p, **{rule.action: tuple(r for r in lst if r != rule)}))


# --------------------------------------------------------------------------
# TOML

_TOP_KEYS = ("version", "container", "graft_at", "splice", "endpoints", "rules", "policy")
GRAFT_AT = ("syscall", "socket")
_EP_KEYS = ("type", "addr", "port", "path")
_RULES_KEYS = ("ingress", "egress")
_POLICY_KEYS = ("allow", "deny", "builtin_denies")


def _check_keys(table: Mapping[str, Any], accepted: tuple[str, ...], where: str,
                source: str) -> None:
    for k in table:
        if k not in accepted:
            fld = f"{where}.{k}" if where else k
            _fail(f"unknown key {k!r}{' in [' + where + ']' if where else ''}; accepted: "
                  f"{', '.join(accepted)}", source, fld, k)


def _table(value: object, fld: str, source: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        _fail(f"{fld} must be a table, got {value!r}", source, fld, value)
    return value


def _str_list(value: object, fld: str, source: str) -> list[str]:
    if not isinstance(value, list):
        _fail(f"{fld} must be an array of strings, got {value!r}", source, fld, value)
    for i, item in enumerate(value):
        if not isinstance(item, str):
            _fail(f"{fld}[{i}] must be a string, got {item!r}", source, f"{fld}[{i}]", item)
    return value


def load_config(text: str, source: str) -> GraftConfig:
    """Parse the TOML text of one container's config. `source` names it in errors."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        _fail(f"not valid TOML: {e}", source, None, None)
    return config_from_dict(data, source)


def config_from_dict(data: object, source: str) -> GraftConfig:
    """The same schema as a table (TOML parsed, or JSON such as a CNI
    network configuration's `graft` object)."""
    if not isinstance(data, dict):
        _fail(f"configuration must be a table/object, got {data!r}", source, None, data)
    _check_keys(data, _TOP_KEYS, "", source)

    version = data.get("version", SCHEMA_VERSION)
    if isinstance(version, bool) or version != SCHEMA_VERSION:
        _fail(f"schema version {version!r} unsupported; accepted: {SCHEMA_VERSION}",
              source, "version", version)
    if "container" not in data:
        _fail("missing required key 'container' (the container id)", source,
              "container", None)
    container = data["container"]
    graft_at = data.get("graft_at", "syscall")
    if graft_at not in GRAFT_AT:
        _fail(f"graft_at {graft_at!r} unknown; accepted: {', '.join(GRAFT_AT)}", source,
              "graft_at", graft_at)
    splice = data.get("splice", True)
    if not isinstance(splice, bool):
        _fail(f"splice must be true or false, got {splice!r}", source, "splice", splice)

    endpoints: dict[str, Endpoint] = {}
    for name, body in _table(data.get("endpoints", {}), "endpoints", source).items():
        prefix = f"endpoints.{name}."
        body = _table(body, f"endpoints.{name}", source)
        _check_keys(body, _EP_KEYS, f"endpoints.{name}", source)
        if "type" not in body:
            _fail(f"endpoint {name!r} has no 'type'; accepted: ipv4, ipv6, unix",
                  source, prefix + "type", None)
        endpoints[name] = make_endpoint(name, body["type"], addr=body.get("addr"),
                                        port=body.get("port"), path=body.get("path"),
                                        source=source, prefix=prefix)

    rules = _table(data.get("rules", {}), "rules", source)
    _check_keys(rules, _RULES_KEYS, "rules", source)
    ingress = tuple(parse_ingress(t, source=source, field=f"rules.ingress[{i}]")
                    for i, t in enumerate(_str_list(rules.get("ingress", []),
                                                    "rules.ingress", source)))
    egress = tuple(parse_egress(t, source=source, field=f"rules.egress[{i}]")
                   for i, t in enumerate(_str_list(rules.get("egress", []),
                                                   "rules.egress", source)))

    pol = _table(data.get("policy", {}), "policy", source)
    _check_keys(pol, _POLICY_KEYS, "policy", source)
    lists = {}
    for action in ("allow", "deny"):
        fld = f"policy.{action}"
        lists[action] = tuple(
            parse_policy_rule(t, action=action, source=source, field=f"{fld}[{i}]")
            for i, t in enumerate(_str_list(pol.get(action, []), fld, source)))
    builtin = pol.get("builtin_denies", True)
    if not isinstance(builtin, bool):
        _fail(f"builtin_denies must be true or false, got {builtin!r}", source,
              "policy.builtin_denies", builtin)
    policy = Policy(lists["allow"], lists["deny"], builtin)

    check_config(container, endpoints, ingress, egress, policy, source=source)
    return GraftConfig(container, endpoints, ingress, egress, policy, graft_at, splice)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _toml_str(s: str) -> str:
    out = ['"']
    for ch in s:
        if ch == '"' or ch == "\\":
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04X}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def _toml_key(s: str) -> str:
    return s if _BARE_KEY.fullmatch(s) else _toml_str(s)


def _toml_list(items: list[str]) -> str:
    if not items:
        return "[]"
    return "[\n" + "".join(f"  {_toml_str(i)},\n" for i in items) + "]"


def dump_config(cfg: GraftConfig) -> str:
    """TOML text that load_config turns back into an equal GraftConfig."""
    lines = [f"# sockgraft graft configuration, schema version {SCHEMA_VERSION}",
             f"version = {SCHEMA_VERSION}",
             f"container = {_toml_str(cfg.container)}"]
    if cfg.graft_at != "syscall":
        lines.append(f"graft_at = {_toml_str(cfg.graft_at)}")
    if not cfg.splice:
        lines.append("splice = false")
    for name in sorted(cfg.endpoints):
        ep = cfg.endpoints[name]
        lines += ["", f"[endpoints.{_toml_key(name)}]", f"type = {_toml_str(ep.kind)}"]
        if ep.kind == "unix":
            assert ep.path is not None
            lines.append(f"path = {_toml_str(ep.path)}")
        else:
            lines.append(f"addr = {_toml_str(str(ep.addr))}")
            lines.append(f"port = {ep.port}" if ep.port is not None else 'port = "dynamic"')
    lines += ["", "[rules]",
              f"ingress = {_toml_list([str(r) for r in cfg.ingress])}",
              f"egress = {_toml_list([str(r) for r in cfg.egress])}",
              "", "[policy]",
              f"allow = {_toml_list([str(r) for r in cfg.policy.allow])}",
              f"deny = {_toml_list([str(r) for r in cfg.policy.deny])}",
              f"builtin_denies = {'true' if cfg.policy.builtin_denies else 'false'}"]
    return "\n".join(lines) + "\n"
