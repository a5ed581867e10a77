"""Property-based tests (hypothesis) of the decision core, beyond the
hand-picked tables (issue 18):

- sockaddr: pack -> parse is the identity; for random bytes and lengths the
  parser refuses exactly what the kernel's own bind() refuses as EINVAL
  (a throwaway UDP socket, no traffic);
- policy: decide() equals the first match of its linearized list, which the
  nftables chains and the cgroup programs evaluate;
- graft: no decision grafts a destination the policy denies.

The same random policies evaluated by the kernel (the nftables rendering and
the BPF policy map): tests/priv/test_properties_kernel.py.
"""

from __future__ import annotations

import ctypes
import errno
import socket

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from strategies import dests, policies

from sockgraft.model import graftconfig as gc
from sockgraft.model.graft import (SOCK_DGRAM, SOCK_STREAM, ConnectGrafted, GraftConnect,
                                   GraftSend, SockInfo, decide_connect, decide_sendto)
from sockgraft.model.policy import decide, linearize
from sockgraft.model.sockaddr import (AF_INET, AF_INET6, InetAddr, SockaddrError,
                                      pack_sockaddr, parse_sockaddr)

pytestmark = pytest.mark.unit


def _linear(policy, proto, dest):
    """What the kernel enforcers evaluate: first match of linearize()."""
    ip = dest.unmapped().ip
    rules_, final = linearize(policy)
    for r in rules_:
        if r.proto != "any" and r.proto != proto:
            continue
        if not r.port_lo <= dest.port <= r.port_hi:
            continue
        if r.network is not None and (r.network.version != ip.version or ip not in r.network):
            continue
        return r.allow, r.label
    return final.allow, final.label


# --- policy ----------------------------------------------------------------------------

@settings(max_examples=600, deadline=None)
@given(policies, st.sampled_from(["tcp", "udp"]), dests)
def test_decide_is_the_first_match_of_its_linearized_list(policy, proto, dest):
    d = decide(policy, proto, dest)
    assert (d.allowed, d.rule) == _linear(policy, proto, dest)


# --- graft -----------------------------------------------------------------------------

BASE = gc.load_config('''
container = "p"
[endpoints.ep]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[endpoints.ep6]
type = "ipv6"
addr = "fd53::1"
port = "dynamic"
[rules]
egress = ["0.0.0.0/0=ep", "[::/0]=ep6"]
''', "properties")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(policies, dests, st.sampled_from([SOCK_STREAM, SOCK_DGRAM]), st.booleans())
def test_no_decision_grafts_a_destination_the_policy_denies(policy, dest, type_, grafted):
    cfg = gc.with_policy(BASE, policy)
    sock = SockInfo(dest.family, type_, grafted)
    proto = "tcp" if type_ == SOCK_STREAM else "udp"
    for action in (decide_connect(cfg, sock, dest), decide_sendto(cfg, sock, dest)):
        if isinstance(action, (GraftConnect, ConnectGrafted, GraftSend)):
            assert decide(policy, proto, dest.unmapped()).allowed, (action, policy)


# --- sockaddr --------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(dests, st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1))
def test_pack_then_parse_is_the_identity(dest, flowinfo, scope):
    if dest.family == AF_INET6:
        dest = InetAddr(AF_INET6, dest.ip, dest.port, flowinfo, scope)
    raw = pack_sockaddr(dest)
    assert parse_sockaddr(raw, len(raw)) == dest


_libc = ctypes.CDLL(None, use_errno=True)


def _kernel_bind(family, data: bytes, addrlen: int) -> int:
    """The kernel's answer to bind() of these bytes on a throwaway UDP socket."""
    buf = ctypes.create_string_buffer(data, max(len(data), 1))
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        rc = _libc.bind(s.fileno(), buf, addrlen)
        return 0 if rc == 0 else ctypes.get_errno()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from([AF_INET, AF_INET6]), st.binary(min_size=0, max_size=40),
       st.integers(0, 40))
def test_the_parser_refuses_what_the_kernel_refuses(family, body, addrlen):
    """Same family as the socket (a family mismatch is the decision layer's):
    the parser raises EINVAL exactly where the kernel's bind() does."""
    data = family.to_bytes(2, "little") + body[:max(0, addrlen - 2)]
    data = data.ljust(addrlen, b"\0")[:max(addrlen, 2)]
    if family == AF_INET6 and addrlen >= 24:
        # bind()'s own EINVAL for an address that needs a scope (link-local
        # unicast, interface- and link-local multicast) given none: no
        # format error but a rule of bind (connect/sendto judge it otherwise)
        a = data[8:24]
        scope = int.from_bytes(data[24:28], "little") if addrlen >= 28 else 0
        assume(not (scope == 0 and ((a[0] == 0xfe and a[1] & 0xc0 == 0x80) or
                                    (a[0] == 0xff and a[1] & 0x0f in (1, 2)))))
    try:
        parse_sockaddr(data, addrlen)
        ours = 0
    except SockaddrError as exc:
        ours = exc.errno
    kernel = _kernel_bind(family, data, addrlen)
    assert (ours == errno.EINVAL) == (kernel == errno.EINVAL), (ours, kernel, data, addrlen)
