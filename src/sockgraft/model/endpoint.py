"""Named graft endpoints and the two conversion-rule kinds (AF_GRAFT style).

Owns:
  * `Endpoint`: a host-side address an operator names per container
    (`type ipv4|ipv6 addr ADDR port PORT|dynamic`, `type unix path PATH`);
  * `IngressRule` (`ADDR:PORT[-PORT]=EP`, `[ADDR]:PORT[-PORT]=EP`): a
    container bind() to that address/port becomes a host socket bound to EP;
  * `EgressRule` (`PREFIX/LEN[:PORT]=EP`, `[PREFIX/LEN]:PORT=EP`,
    `[PREFIX/LEN]=EP`): a container connect()/sendto() into the prefix leaves
    from EP's host address;
  * the text parsers for addresses, prefixes and ports shared with `policy`.

Must not: open sockets, look at the running system, or know how rules are
combined (that is `graftconfig`). Everything here is parse/validate/print.

Decisions:
  * Prefixes with host bits set (`10.0.0.1/8`) are rejected, not normalized:
    the operator may have meant /32, and guessing wrong widens a rule.
  * Egress prefixes must carry an explicit /LEN (so `10.0.0.5:80=ep` is
    never ambiguous between ingress and egress syntax).
  * IPv4-mapped IPv6 addresses/prefixes (::ffff:a.b.c.d) are rejected in
    endpoints and rules: write the IPv4 form; matching unmaps destinations.
  * IPv6 zone ids (`fe80::1%eth0`) are rejected: nothing here models
    interfaces.
  * An endpoint address may be the wildcard (0.0.0.0 / ::): the host socket
    is then bound to the wildcard (ingress) or left to the kernel's source
    selection (egress).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass
from ipaddress import (IPv4Address, IPv4Network, IPv6Address, IPv6Network,
                       ip_address, ip_network)
from typing import Literal, NoReturn

from sockgraft.errors import ConfigError
from sockgraft.model.sockaddr import AF_INET, AF_INET6, InetAddr, UnixAddr

__all__ = [
    "Endpoint", "EndpointKind", "IngressRule", "EgressRule",
    "ENDPOINT_KINDS", "ENDPOINT_KEYWORDS", "UNIX_PATH_MAX_BYTES",
    "parse_endpoint_args", "make_endpoint", "parse_ingress", "parse_egress",
    "check_endpoint_name", "parse_address", "parse_network", "parse_port",
    "parse_port_range",
]

EndpointKind = Literal["ipv4", "ipv6", "unix"]
ENDPOINT_KINDS: tuple[str, ...] = ("ipv4", "ipv6", "unix")
ENDPOINT_KEYWORDS: tuple[str, ...] = ("type", "addr", "port", "path")
# sun_path is 108 bytes; keep one for the terminating NUL so the path is a
# C string everywhere it travels.
UNIX_PATH_MAX_BYTES = 107
DYNAMIC = "dynamic"

_NAME_RE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")
_NAME_ACCEPTED = ("1-32 characters from a-z 0-9 _ . -, starting with a letter or digit")
_PORT_ACCEPTED = "a port number 1-65535"
_PORTS_ACCEPTED = "a port 1-65535 or a range LO-HI with 1 <= LO <= HI <= 65535"
_MAPPED_V6 = IPv6Network("::ffff:0:0/96")

IPAddr = IPv4Address | IPv6Address
IPNet = IPv4Network | IPv6Network


def _fail(message: str, source: str | None, field: str | None, value: object) -> NoReturn:
    raise ConfigError(message, source=source, field=field, value=value)


# --------------------------------------------------------------------------
# shared text parsers


def check_endpoint_name(name: object, *, source: str | None = None,
                        field: str | None = "name") -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        _fail(f"endpoint name {name!r} is invalid; accepted: {_NAME_ACCEPTED}",
              source, field, name)
    return name


def parse_address(text: str, *, source: str | None = None, field: str | None = "addr",
                  version: int | None = None) -> IPAddr:
    """An IPv4 or IPv6 address (no zone id, no IPv4-mapped form)."""
    want = {4: "an IPv4 address", 6: "an IPv6 address", None: "an IPv4 or IPv6 address"}[version]
    if not isinstance(text, str):
        _fail(f"address must be a string, got {text!r}; accepted: {want}", source, field, text)
    if "%" in text:
        _fail(f"address {text!r} has a zone id; zone ids are not supported, "
              f"accepted: {want} without %ZONE", source, field, text)
    try:
        ip = ip_address(text)
    except ValueError:
        _fail(f"{text!r} is not {want}", source, field, text)
    if version is not None and ip.version != version:
        _fail(f"{text!r} is an IPv{ip.version} address; accepted: {want}", source, field, text)
    if ip.version == 6 and ip.ipv4_mapped is not None:
        _fail(f"{text!r} is an IPv4-mapped IPv6 address; write the IPv4 form "
              f"{ip.ipv4_mapped} instead", source, field, text)
    return ip


def parse_network(text: str, *, source: str | None = None, field: str | None = "prefix",
                  require_len: bool = True) -> IPNet:
    """`ADDR/LEN` (LEN decimal). Host bits set is an error; see module doc.

    With require_len=False a bare address means a single host (/32, /128).
    """
    accepted = "a prefix ADDR/LEN such as 10.0.0.0/8 or fd00::/8"
    if not isinstance(text, str):
        _fail(f"prefix must be a string, got {text!r}; accepted: {accepted}", source, field, text)
    if "%" in text:
        _fail(f"prefix {text!r} has a zone id; accepted: {accepted}", source, field, text)
    addr_text, slash, len_text = text.partition("/")
    if not slash:
        if require_len:
            _fail(f"{text!r} has no /LEN; accepted: {accepted} "
                  f"(a single host is ADDR/32 or ADDR/128)", source, field, text)
    elif not (len_text.isascii() and len_text.isdigit()) or len(len_text) > 3:
        _fail(f"prefix length {len_text!r} in {text!r} is not a decimal number; "
              f"accepted: {accepted}", source, field, text)
    try:
        net = ip_network(text, strict=True)
    except ValueError:
        try:
            loose = ip_network(text, strict=False)
        except ValueError:
            _fail(f"{text!r} is not an IPv4 or IPv6 prefix; accepted: {accepted}",
                  source, field, text)
        host = "32" if loose.version == 4 else "128"
        _fail(f"{text!r} has host bits set; write the network {loose} "
              f"or the single host {addr_text}/{host}", source, field, text)
    if net.version == 6 and net.subnet_of(_MAPPED_V6):  # type: ignore[arg-type]
        v4 = IPv4Network((int(net.network_address) & 0xFFFFFFFF, net.prefixlen - 96))
        _fail(f"{text!r} is an IPv4-mapped prefix; write the IPv4 form {v4} instead "
              f"(IPv4-mapped destinations are matched against IPv4 prefixes)",
              source, field, text)
    return net


def parse_port(value: object, *, source: str | None = None, field: str | None = "port",
               allow_dynamic: bool = False) -> int | None:
    """A port 1-65535 as text or int; `dynamic` -> None when allowed."""
    accepted = _PORT_ACCEPTED + (" or 'dynamic'" if allow_dynamic else "")
    if allow_dynamic and value == DYNAMIC:
        return None
    if isinstance(value, bool):
        _fail(f"port {value!r} is not a number; accepted: {accepted}", source, field, value)
    if isinstance(value, int):
        port = value
    elif isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 5:
        port = int(value)
    else:
        _fail(f"port {value!r} is not a number; accepted: {accepted}", source, field, value)
    if not 1 <= port <= 65535:
        _fail(f"port {value!r} is out of range; accepted: {accepted}", source, field, value)
    return port


def parse_port_range(text: str, *, source: str | None = None,
                     field: str | None = "ports") -> tuple[int, int]:
    """`P` or `LO-HI`, both 1-65535, LO <= HI."""
    if not isinstance(text, str):
        _fail(f"ports {text!r} must be text; accepted: {_PORTS_ACCEPTED}", source, field, text)
    lo_text, dash, hi_text = text.partition("-")
    bounds = []
    for part in ((lo_text, hi_text) if dash else (lo_text,)):
        if not (part.isascii() and part.isdigit() and len(part) <= 5):
            _fail(f"port {part!r} in {text!r} is not a number; accepted: {_PORTS_ACCEPTED}",
                  source, field, text)
        if not 1 <= int(part) <= 65535:
            _fail(f"port {part!r} in {text!r} is out of range; accepted: {_PORTS_ACCEPTED}",
                  source, field, text)
        bounds.append(int(part))
    lo, hi = bounds[0], bounds[-1]
    if lo > hi:
        _fail(f"port range {text!r} is reversed; accepted: {_PORTS_ACCEPTED}",
              source, field, text)
    return lo, hi


# --------------------------------------------------------------------------
# endpoints


@dataclass(frozen=True, slots=True)
class Endpoint:
    """A named host-side address. port None means `dynamic` (ephemeral)."""

    name: str
    kind: EndpointKind
    addr: IPv4Address | IPv6Address | None = None
    port: int | None = None
    path: str | None = None

    def __post_init__(self) -> None:
        _validate_endpoint(self, source=None, prefix="")

    @property
    def is_inet(self) -> bool:
        return self.kind != "unix"

    @property
    def is_dynamic(self) -> bool:
        return self.kind != "unix" and self.port is None

    def sockaddr(self) -> InetAddr | UnixAddr:
        """The host address to bind; a dynamic port is 0 (kernel picks)."""
        if self.kind == "unix":
            assert self.path is not None
            return UnixAddr(self.path.encode())
        assert self.addr is not None
        return InetAddr(AF_INET if self.kind == "ipv4" else AF_INET6, self.addr,
                        self.port or 0)

    def args(self) -> list[str]:
        """Tokens for parse_endpoint_args (round trip)."""
        if self.kind == "unix":
            assert self.path is not None
            return ["type", "unix", "path", self.path]
        port = DYNAMIC if self.port is None else str(self.port)
        return ["type", self.kind, "addr", str(self.addr), "port", port]

    def __str__(self) -> str:
        return " ".join([self.name, *self.args()])


def _validate_endpoint(ep: Endpoint, *, source: str | None, prefix: str) -> None:
    """Checks shared by the constructor and the parsers (fields prefixed)."""
    check_endpoint_name(ep.name, source=source, field=f"{prefix}name" if prefix else "name")
    f = (lambda k: f"{prefix}{k}")
    if ep.kind not in ENDPOINT_KINDS:
        _fail(f"endpoint {ep.name}: type {ep.kind!r} is unknown; accepted: "
              f"{', '.join(ENDPOINT_KINDS)}", source, f("type"), ep.kind)
    if ep.kind == "unix":
        for key, val in (("addr", ep.addr), ("port", ep.port)):
            if val is not None:
                _fail(f"endpoint {ep.name}: '{key}' does not apply to type unix; "
                      f"accepted for unix: path", source, f(key), val)
        if ep.path is None:
            _fail(f"endpoint {ep.name}: type unix needs 'path PATH'", source, f("path"), None)
        _check_unix_path(ep.name, ep.path, source, f("path"))
        return
    if ep.path is not None:
        _fail(f"endpoint {ep.name}: 'path' applies only to type unix; accepted for "
              f"{ep.kind}: addr, port", source, f("path"), ep.path)
    want = 4 if ep.kind == "ipv4" else 6
    if ep.addr is None:
        _fail(f"endpoint {ep.name}: type {ep.kind} needs 'addr ADDR'", source, f("addr"), None)
    if not isinstance(ep.addr, (IPv4Address, IPv6Address)) or ep.addr.version != want:
        _fail(f"endpoint {ep.name}: addr {ep.addr} is not an IPv{want} address "
              f"(type {ep.kind})", source, f("addr"), ep.addr)
    parse_address(str(ep.addr), source=source, field=f("addr"), version=want)
    if ep.port is not None and (isinstance(ep.port, bool) or not isinstance(ep.port, int)
                                or not 1 <= ep.port <= 65535):
        _fail(f"endpoint {ep.name}: port {ep.port!r} is out of range; accepted: "
              f"{_PORT_ACCEPTED} or 'dynamic'", source, f("port"), ep.port)


def _check_unix_path(name: str, path: object, source: str | None, field: str) -> None:
    if not isinstance(path, str):
        _fail(f"endpoint {name}: path must be a string, got {path!r}", source, field, path)
    if "\0" in path:
        _fail(f"endpoint {name}: path {path!r} contains a NUL byte; accepted: an absolute "
              f"path without NUL (abstract sockets are not endpoints)", source, field, path)
    if not path.startswith("/"):
        _fail(f"endpoint {name}: path {path!r} is not absolute; accepted: a path "
              f"starting with /", source, field, path)
    try:
        size = len(path.encode("utf-8"))
    except UnicodeEncodeError:
        _fail(f"endpoint {name}: path {path!r} is not valid UTF-8; accepted: an absolute "
              f"UTF-8 path", source, field, path)
    if size > UNIX_PATH_MAX_BYTES:
        _fail(f"endpoint {name}: path is {size} bytes; accepted: at most "
              f"{UNIX_PATH_MAX_BYTES} bytes (sun_path)", source, field, path)


def make_endpoint(name: str, kind: object, *, addr: object = None, port: object = None,
                  path: object = None, source: str | None = None,
                  prefix: str = "") -> Endpoint:
    """Build an Endpoint from loosely typed values (text or TOML), with errors
    that name `source` and `prefix + key` (e.g. `endpoints.ep-http.port`).

    `port` may be an int, decimal text or 'dynamic'; None means "not given".
    """
    f = (lambda k: f"{prefix}{k}")
    check_endpoint_name(name, source=source, field=f("name") if prefix else "name")
    if kind not in ENDPOINT_KINDS:
        _fail(f"endpoint {name}: type {kind!r} is unknown; accepted: "
              f"{', '.join(ENDPOINT_KINDS)}", source, f("type"), kind)
    if kind == "unix":
        for key, val in (("addr", addr), ("port", port)):
            if val is not None:
                _fail(f"endpoint {name}: '{key}' does not apply to type unix; "
                      f"accepted for unix: path", source, f(key), val)
        if path is None:
            _fail(f"endpoint {name}: type unix needs 'path PATH'", source, f("path"), None)
        _check_unix_path(name, path, source, f("path"))
        ep = Endpoint(name, "unix", path=path)  # type: ignore[arg-type]
    else:
        if path is not None:
            _fail(f"endpoint {name}: 'path' applies only to type unix; accepted for "
                  f"{kind}: addr, port", source, f("path"), path)
        if addr is None:
            _fail(f"endpoint {name}: type {kind} needs 'addr ADDR'", source, f("addr"), None)
        if port is None:
            _fail(f"endpoint {name}: type {kind} needs 'port PORT' "
                  f"({_PORT_ACCEPTED} or 'dynamic')", source, f("port"), None)
        ip = parse_address(addr, source=source, field=f("addr"),  # type: ignore[arg-type]
                           version=4 if kind == "ipv4" else 6)
        p = parse_port(port, source=source, field=f("port"), allow_dynamic=True)
        ep = Endpoint(name, kind, addr=ip, port=p)  # type: ignore[arg-type]
    return ep


def parse_endpoint_args(name: str, tokens: list[str], source: str = "command line") -> Endpoint:
    """`type ipv4|ipv6 addr ADDR port PORT|dynamic` or `type unix path PATH`.

    Keywords may come in any order, each at most once.
    """
    check_endpoint_name(name, source=source)
    values: dict[str, str] = {}
    i = 0
    while i < len(tokens):
        kw = tokens[i]
        if kw not in ENDPOINT_KEYWORDS:
            _fail(f"endpoint {name}: unknown keyword {kw!r}; accepted: "
                  f"{', '.join(ENDPOINT_KEYWORDS)}", source, "arguments", kw)
        if kw in values:
            _fail(f"endpoint {name}: keyword {kw!r} given twice; each keyword may "
                  f"appear once", source, kw, tokens[i + 1] if i + 1 < len(tokens) else None)
        if i + 1 >= len(tokens):
            _fail(f"endpoint {name}: keyword {kw!r} needs a value", source, kw, None)
        values[kw] = tokens[i + 1]
        i += 2
    if "type" not in values:
        _fail(f"endpoint {name}: 'type' is required; accepted: type ipv4|ipv6 addr ADDR "
              f"port PORT|dynamic, or type unix path PATH", source, "type", None)
    return make_endpoint(name, values["type"], addr=values.get("addr"),
                         port=values.get("port"), path=values.get("path"), source=source)


# --------------------------------------------------------------------------
# rules


@contextmanager
def _in_rule(what: str, text: object, source: str | None, field: str | None):
    """Re-raise a token-level ConfigError with the whole rule as context.

    The inner parsers run with source/field None so their message is bare;
    `value` stays the offending token.
    """
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{what} {text!r}: {e}", source=source, field=field,
                          value=e.value) from None


def _split_rule(text: str, syntax: str) -> tuple[str, str]:
    if not isinstance(text, str):
        _fail(f"must be a string; accepted: {syntax}", None, None, text)
    body = text.strip()
    left, eq, ep = body.partition("=")
    if not eq or "=" in ep or not left:
        _fail(f"not of the form {syntax}", None, None, text)
    check_endpoint_name(ep, field=None)
    return left, ep


@dataclass(frozen=True, slots=True)
class IngressRule:
    """A bind to addr:port_lo..port_hi becomes a host socket bound to `endpoint`."""

    addr: IPv4Address | IPv6Address
    port_lo: int
    port_hi: int
    endpoint: str

    def __post_init__(self) -> None:
        if not isinstance(self.addr, (IPv4Address, IPv6Address)):
            raise ConfigError(f"ingress address {self.addr!r} is not an IP address",
                              field="ingress rule", value=self.addr)
        parse_address(str(self.addr), field="ingress rule")
        if not 1 <= self.port_lo <= self.port_hi <= 65535:
            raise ConfigError(f"ingress ports {self.port_lo}-{self.port_hi} invalid; "
                              f"accepted: {_PORTS_ACCEPTED}", field="ingress rule",
                              value=(self.port_lo, self.port_hi))
        check_endpoint_name(self.endpoint, field="ingress rule")

    @property
    def is_wildcard(self) -> bool:
        return self.addr.is_unspecified

    def covers(self, port: int) -> bool:
        return self.port_lo <= port <= self.port_hi

    def __str__(self) -> str:
        a = str(self.addr) if self.addr.version == 4 else f"[{self.addr}]"
        p = str(self.port_lo) if self.port_lo == self.port_hi else f"{self.port_lo}-{self.port_hi}"
        return f"{a}:{p}={self.endpoint}"


_INGRESS_SYNTAX = "ADDR:PORT[-PORT]=EP or [IPV6ADDR]:PORT[-PORT]=EP"


def parse_ingress(text: str, *, source: str | None = "command line",
                  field: str | None = None) -> IngressRule:
    """`ADDR:PORT[-PORT]=EP` or `[IPV6ADDR]:PORT[-PORT]=EP`."""
    with _in_rule("ingress rule", text, source, field):
        left, ep = _split_rule(text, _INGRESS_SYNTAX)
        if left.startswith("["):
            addr_text, close, rest = left[1:].partition("]")
            if not close or not rest.startswith(":"):
                _fail(f"expected [IPV6ADDR]:PORT; accepted: {_INGRESS_SYNTAX}",
                      None, None, left)
            ports_text = rest[1:]
            ip = parse_address(addr_text, field=None, version=6)
        else:
            addr_text, colon, ports_text = left.rpartition(":")
            if not colon:
                _fail(f"no :PORT; accepted: {_INGRESS_SYNTAX}", None, None, left)
            if ":" in addr_text:
                _fail(f"write an IPv6 address in brackets, e.g. "
                      f"[{addr_text}]:{ports_text}={ep}", None, None, left)
            ip = parse_address(addr_text, field=None, version=4)
        lo, hi = parse_port_range(ports_text, field=None)
        return IngressRule(ip, lo, hi, ep)


@dataclass(frozen=True, slots=True)
class EgressRule:
    """A connect()/sendto() into `network` (and `port`, if set) leaves from `endpoint`."""

    network: IPv4Network | IPv6Network
    port: int | None
    endpoint: str

    def __post_init__(self) -> None:
        if not isinstance(self.network, (IPv4Network, IPv6Network)):
            raise ConfigError(f"egress network {self.network!r} is not a prefix",
                              field="egress rule", value=self.network)
        parse_network(str(self.network), field="egress rule")
        if self.port is not None:
            parse_port(self.port, field="egress rule")
        check_endpoint_name(self.endpoint, field="egress rule")

    def __str__(self) -> str:
        if self.port is None:
            return f"{self.network}={self.endpoint}"
        n = str(self.network) if self.network.version == 4 else f"[{self.network}]"
        return f"{n}:{self.port}={self.endpoint}"


_EGRESS_SYNTAX = ("PREFIX/LEN[:PORT]=EP, or for IPv6 [PREFIX/LEN]:PORT=EP "
                  "or PREFIX/LEN=EP")


def parse_egress(text: str, *, source: str | None = "command line",
                 field: str | None = None) -> EgressRule:
    """`PREFIX/LEN[:PORT]=EP`, `[PREFIX/LEN]:PORT=EP`, `[PREFIX/LEN]=EP`."""
    with _in_rule("egress rule", text, source, field):
        left, ep = _split_rule(text, _EGRESS_SYNTAX)
        port_text: str | None = None
        if left.startswith("["):
            net_text, close, rest = left[1:].partition("]")
            if not close or (rest and not rest.startswith(":")):
                _fail(f"expected [PREFIX/LEN] or [PREFIX/LEN]:PORT; accepted: "
                      f"{_EGRESS_SYNTAX}", None, None, left)
            if rest:
                port_text = rest[1:]
            net = parse_network(net_text, field=None)
            if net.version != 6:
                _fail(f"brackets are for IPv6 prefixes; write "
                      f"{net_text}{':' + port_text if port_text is not None else ''}={ep}",
                      None, None, left)
        else:
            addr_text, slash, len_port = left.partition("/")
            if not slash:
                _fail(f"no /LEN; accepted: {_EGRESS_SYNTAX} "
                      f"(a single host is ADDR/32 or ADDR/128)", None, None, left)
            len_text, colon, port_part = len_port.partition(":")
            if colon:
                if ":" in addr_text:
                    _fail(f"an IPv6 prefix with a port needs brackets, e.g. "
                          f"[{addr_text}/{len_text}]:{port_part}={ep}", None, None, left)
                port_text = port_part
            net = parse_network(f"{addr_text}/{len_text}", field=None)
        port = None
        if port_text is not None:
            port = parse_port(port_text, field=None)
        return EgressRule(net, port, ep)
