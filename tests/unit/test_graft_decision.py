"""The pure graft decision (model/graft.py): one trapped bind/connect/sendto in,
one Action out. Configs are built with `load_config` from small TOML texts so
the tests read like what an operator writes."""

from __future__ import annotations

import errno
import textwrap
from ipaddress import IPv4Address, IPv6Address

import pytest

from sockgraft.model.endpoint import Endpoint
from sockgraft.model.graft import (MSG_FASTOPEN, SOCK_DGRAM, SOCK_STREAM, ConnectGrafted,
                                   Continue, Deny, Fail, GraftBind, GraftConnect, GraftSend,
                                   SockInfo, decide_bind, decide_connect, decide_sendto,
                                   is_grafted_mark, local_for, parse_trapped)
from sockgraft.model.graftconfig import load_config
from sockgraft.model.policy import decide
from sockgraft.model.sockaddr import (AF_INET, AF_INET6, AF_UNIX, InetAddr, OtherAddr,
                                      UnixAddr, UnspecAddr, pack_sockaddr)

pytestmark = pytest.mark.unit

SOCK_RAW = 3
SOCK_SEQPACKET = 5

ENDPOINTS = '''
    [endpoints.ep-http]
    type = "ipv4"
    addr = "198.18.0.1"
    port = 8080
    [endpoints.ep-range]
    type = "ipv4"
    addr = "198.18.0.1"
    port = 9000
    [endpoints.ep-dyn]
    type = "ipv4"
    addr = "198.18.0.2"
    port = "dynamic"
    [endpoints.ep-v6]
    type = "ipv6"
    addr = "fd53::1"
    port = 8443
    [endpoints.ep-out]
    type = "ipv4"
    addr = "198.18.0.3"
    port = "dynamic"
    [endpoints.ep-fixed]
    type = "ipv4"
    addr = "198.18.0.4"
    port = 4000
    [endpoints.ep-out6]
    type = "ipv6"
    addr = "fd53::3"
    port = "dynamic"
'''


def config(body: str):
    return load_config(textwrap.dedent('container = "c1"\n' + ENDPOINTS + body), "test.toml")


# A container with specific rules and a small deny list (default allow).
MAIN = config('''
    [rules]
    ingress = ["0.0.0.0:80=ep-http", "0.0.0.0:8000-8010=ep-range", "10.0.0.5:53=ep-dyn",
               "[::]:443=ep-v6", "[::]:80=ep-http", "127.0.0.1:9090=ep-http"]
    egress = ["10.0.0.0/8=ep-out", "10.1.0.0/16:5432=ep-fixed", "[fd00::/8]=ep-out6",
              "169.254.169.254/32=ep-out"]
    [policy]
    deny = ["deny tcp 10.9.0.0/16"]
''')

# Everything leaves through the host (broad rules), default policy.
BROAD = config('''
    [rules]
    egress = ["0.0.0.0/0=ep-out", "[::/0]=ep-out6"]
''')

# Loopback explicitly grafted; one loopback port opened by the policy.
LOOP = config('''
    [rules]
    egress = ["127.0.0.0/8=ep-out", "[::1/128]=ep-out6"]
    [policy]
    allow = ["allow tcp 127.0.0.1 8080", "allow udp 127.0.0.0/8 53"]
''')

# The policy opens a loopback port (the container's sidecar), no egress rule
# names loopback: a broad rule, or none.
SIDECAR = config('''
    [rules]
    egress = ["0.0.0.0/0=ep-out", "[::/0]=ep-out6"]
    [policy]
    allow = ["allow tcp 127.0.0.1 8080", "allow tcp [::1] 8080", "allow tcp 0.0.0.0 8080"]
''')
SIDECAR_NO_EGRESS = config('''
    [policy]
    allow = ["allow tcp 127.0.0.1 8080"]
''')

# An allow list: only 10.1.0.0/16 tcp 443.
ALLOWLIST = config('''
    [rules]
    egress = ["10.0.0.0/8=ep-out"]
    [policy]
    allow = ["allow tcp 10.1.0.0/16 443"]
''')


def A(text: str, **kw) -> InetAddr:
    """'10.0.0.1:80' or '[fd00::1]:80' (a mapped '[::ffff:a.b.c.d]:P' stays AF_INET6)."""
    host, _, port = text.rpartition(":")
    addr = InetAddr.of(host.strip("[]"), int(port))
    return InetAddr(addr.family, addr.ip, addr.port, **kw) if kw else addr


def EP(cfg, name: str) -> Endpoint:
    return cfg.endpoints[name]


TCP4 = SockInfo(AF_INET, SOCK_STREAM, False)
FRESH4 = SockInfo(AF_INET, SOCK_STREAM, grafted=True, bound=False)
FRESH6 = SockInfo(AF_INET6, SOCK_STREAM, grafted=True, bound=False)
UDP4 = SockInfo(AF_INET, SOCK_DGRAM, False)
TCP6 = SockInfo(AF_INET6, SOCK_STREAM, False)
UDP6 = SockInfo(AF_INET6, SOCK_DGRAM, False)
G_TCP4 = SockInfo(AF_INET, SOCK_STREAM, True)
G_UDP4 = SockInfo(AF_INET, SOCK_DGRAM, True)
G_TCP6 = SockInfo(AF_INET6, SOCK_STREAM, True)
RAW4 = SockInfo(AF_INET, SOCK_RAW, False)
V6ONLY = SockInfo(AF_INET6, SOCK_STREAM, False, v6only=True)
SEQ6 = SockInfo(AF_INET6, SOCK_SEQPACKET, False)
# the same types, other protocols: MPTCP (262), UDP-Lite (136) - not grafted
MPTCP4 = SockInfo(AF_INET, SOCK_STREAM, False, protocol=262)
LITE6 = SockInfo(AF_INET6, SOCK_DGRAM, False, protocol=136)

def BIND(c, s, a):
    return decide_bind(c, s, a)


def never_continues_grafted_bind(decider, sock, action) -> bool:
    """A grafted socket's bind is never handed back to the kernel: the agent
    answers (Deny/Fail) or binds itself."""
    return decider is BIND and sock.grafted


ALL_DECIDERS = [
    pytest.param(BIND, id="bind"),
    pytest.param(lambda c, s, a: decide_connect(c, s, a), id="connect"),
    pytest.param(lambda c, s, a: decide_sendto(c, s, a, 0), id="sendto"),
]


# ---------------------------------------------------------------- small helpers

def test_sockinfo_proto():
    assert TCP4.proto == "tcp" and UDP6.proto == "udp" and RAW4.proto == "other"
    assert SockInfo(AF_INET, SOCK_STREAM, False, protocol=6).proto == "tcp"
    assert MPTCP4.proto == "other" and LITE6.proto == "other"
    assert not MPTCP4.inet and not LITE6.inet and TCP4.inet


@pytest.mark.parametrize("mark, grafted", [
    (0x53470000, True), (0x53470001, True), (0x5347FFFF, True),
    (0, False), (1, False), (0x53460001, False), (0x53480001, False),
    (0x00005347, False), (0xFFFF0001, False),
])
def test_is_grafted_mark(mark, grafted):
    assert is_grafted_mark(mark) is grafted


def test_parse_trapped_returns_the_sockaddr():
    addr = A("10.0.0.1:80")
    assert parse_trapped(pack_sockaddr(addr), 16) == addr
    v6 = A("[fd00::1]:443", flowinfo=5, scope_id=2)
    assert parse_trapped(pack_sockaddr(v6), 28) == v6
    assert parse_trapped(pack_sockaddr(UnixAddr(b"/run/x")), 9) == UnixAddr(b"/run/x")


@pytest.mark.parametrize("data, addrlen, err", [
    (pack_sockaddr(InetAddr.of("10.0.0.1", 80)), 8, errno.EINVAL),      # AF_INET < 16
    (pack_sockaddr(InetAddr.of("10.0.0.1", 80))[:10], 16, errno.EFAULT),  # unreadable tail
    (pack_sockaddr(InetAddr.of("fd00::1", 80)), 20, errno.EINVAL),      # AF_INET6 < 24
    (b"\x02", 1, errno.EINVAL),                                         # no sa_family
    (bytes(200), 129, errno.EINVAL),                                    # > sockaddr_storage
    (bytes(200), -1, errno.EINVAL),
    (AF_UNIX.to_bytes(2, "little") + b"/x" * 60, 111, errno.EINVAL),    # > sockaddr_un
])
def test_parse_trapped_malformed_fails_with_kernel_errno(data, addrlen, err):
    action = parse_trapped(data, addrlen)
    assert isinstance(action, Fail)
    assert action.errno == err
    assert errno.errorcode[err] in action.reason


# ---------------------------------------------------------------- nothing to do

@pytest.mark.parametrize("decider", ALL_DECIDERS)
@pytest.mark.parametrize("addr", [A("10.0.0.1:80"), A("0.0.0.0:80"), A("[fd00::1]:443")],
                         ids=str)
def test_no_config_continues(decider, addr):
    sock = TCP4 if addr.family == AF_INET else TCP6
    assert isinstance(decider(None, sock, addr), Continue)
    grafted = SockInfo(sock.family, sock.type, True)
    action = decider(None, grafted, addr)
    if decider is BIND:     # config gone, socket still on the host: refused
        assert action == Deny(errno.EACCES, "bind:no-endpoint", addr)
    else:
        assert isinstance(action, Continue)


@pytest.mark.parametrize("decider", ALL_DECIDERS)
@pytest.mark.parametrize("addr", [UnixAddr(b"/run/x.sock"), UnixAddr(b"", False),
                                  UnixAddr(b"abs", True), UnspecAddr(), UnspecAddr(bytes(16)),
                                  OtherAddr(16, b"\x10\x00" + bytes(10))], ids=repr)
@pytest.mark.parametrize("grafted", [False, True])
def test_non_inet_addresses_continue(decider, addr, grafted):
    for cfg in (MAIN, BROAD):
        for sock in (SockInfo(AF_INET, SOCK_STREAM, grafted), SockInfo(AF_INET6, SOCK_DGRAM,
                                                                       grafted)):
            action = decider(cfg, sock, addr)
            if never_continues_grafted_bind(decider, sock, action):
                assert action == Fail(errno.EAFNOSUPPORT, action.reason)
            else:
                assert isinstance(action, Continue)


@pytest.mark.parametrize("decider", ALL_DECIDERS)
@pytest.mark.parametrize("sock, addr", [
    # v6 address on a v4 socket and the reverse: the kernel answers (EINVAL/EAFNOSUPPORT)
    pytest.param(TCP4, A("[fd00::1]:80"), id="v6-addr-v4-sock"),
    pytest.param(TCP6, A("10.0.0.1:80"), id="v4-addr-v6-sock"),
    pytest.param(UDP6, A("0.0.0.0:80"), id="v4-wildcard-v6-sock"),
    pytest.param(G_TCP4, A("[fd00::1]:80"), id="v6-addr-grafted-v4-sock"),
])
def test_family_mismatch_continues(decider, sock, addr):
    # every address here would match a rule of MAIN/BROAD in its own family
    for cfg in (MAIN, BROAD):
        action = decider(cfg, sock, addr)
        if never_continues_grafted_bind(decider, sock, action):
            assert isinstance(action, Fail) and action.errno == errno.EAFNOSUPPORT
        else:
            assert isinstance(action, Continue)


# ---------------------------------------------------------------- bind

BIND_CASES = [
    # (id, cfg, sock, addr, expected)
    ("wildcard-fixed-port", MAIN, TCP4, A("0.0.0.0:80"),
     GraftBind(EP(MAIN, "ep-http"), A("198.18.0.1:8080"), A("0.0.0.0:80"),
               "ingress 0.0.0.0:80=ep-http")),
    ("specific-addr-falls-back-to-wildcard", MAIN, UDP4, A("10.2.3.4:80"),
     GraftBind(EP(MAIN, "ep-http"), A("198.18.0.1:8080"), A("10.2.3.4:80"),
               "ingress 0.0.0.0:80=ep-http")),
    ("range-first-port", MAIN, TCP4, A("0.0.0.0:8000"),
     GraftBind(EP(MAIN, "ep-range"), A("198.18.0.1:9000"), A("0.0.0.0:8000"),
               "ingress 0.0.0.0:8000-8010=ep-range")),
    ("range-offset", MAIN, TCP4, A("0.0.0.0:8005"),
     GraftBind(EP(MAIN, "ep-range"), A("198.18.0.1:9005"), A("0.0.0.0:8005"),
               "ingress 0.0.0.0:8000-8010=ep-range")),
    ("range-last-port", MAIN, TCP4, A("0.0.0.0:8010"),
     GraftBind(EP(MAIN, "ep-range"), A("198.18.0.1:9010"), A("0.0.0.0:8010"),
               "ingress 0.0.0.0:8000-8010=ep-range")),
    ("dynamic-endpoint-port-0", MAIN, UDP4, A("10.0.0.5:53"),
     GraftBind(EP(MAIN, "ep-dyn"), A("198.18.0.2:0"), A("10.0.0.5:53"),
               "ingress 10.0.0.5:53=ep-dyn")),
    ("v6-wildcard-v6-endpoint", MAIN, TCP6, A("[::]:443"),
     GraftBind(EP(MAIN, "ep-v6"), A("[fd53::1]:8443"), A("[::]:443"),
               "ingress [::]:443=ep-v6")),
    ("v6-specific-falls-back-to-v6-wildcard", MAIN, TCP6, A("[fd00::7]:443"),
     GraftBind(EP(MAIN, "ep-v6"), A("[fd53::1]:8443"), A("[fd00::7]:443"),
               "ingress [::]:443=ep-v6")),
    # AF_INET6 socket binding :: with an ipv4 endpoint: the host socket keeps
    # the container's family, bound to the mapped form of the endpoint.
    ("v6-socket-v4-endpoint-mapped-local", MAIN, TCP6, A("[::]:80"),
     GraftBind(EP(MAIN, "ep-http"), A("[::ffff:198.18.0.1]:8080"), A("[::]:80"),
               "ingress [::]:80=ep-http")),
    # ::ffff:a.b.c.d binds are IPv4 binds (matched by the IPv4 rules)
    ("mapped-bind-v4-rule", MAIN, UDP6, A("[::ffff:10.0.0.5]:53"),
     GraftBind(EP(MAIN, "ep-dyn"), A("[::ffff:198.18.0.2]:0"), A("[::ffff:10.0.0.5]:53"),
               "ingress 10.0.0.5:53=ep-dyn")),
    ("mapped-v4-wildcard-range", MAIN, TCP6, A("[::ffff:0.0.0.0]:8003"),
     GraftBind(EP(MAIN, "ep-range"), A("[::ffff:198.18.0.1]:9003"),
               A("[::ffff:0.0.0.0]:8003"), "ingress 0.0.0.0:8000-8010=ep-range")),
    # a dual-stack [::]:P bind (Go, Node, busybox) is what a rule for
    # 0.0.0.0:P means when no IPv6 rule covers P (issue 14, item 2)
    ("dual-stack-covered-by-v4-wildcard", MAIN, TCP6, A("[::]:8000"),
     GraftBind(EP(MAIN, "ep-range"), A("[::ffff:198.18.0.1]:9000"), A("[::]:8000"),
               "ingress 0.0.0.0:8000-8010=ep-range")),
    ("dual-stack-udp-covered-by-v4-wildcard", MAIN, UDP6, A("[::]:8010"),
     GraftBind(EP(MAIN, "ep-range"), A("[::ffff:198.18.0.1]:9010"), A("[::]:8010"),
               "ingress 0.0.0.0:8000-8010=ep-range")),
    ("loopback-named-by-rule", MAIN, TCP4, A("127.0.0.1:9090"),
     GraftBind(EP(MAIN, "ep-http"), A("198.18.0.1:8080"), A("127.0.0.1:9090"),
               "ingress 127.0.0.1:9090=ep-http")),
    # no rule
    ("port-not-covered", MAIN, TCP4, A("0.0.0.0:81"), Continue),
    ("ephemeral-port-0", MAIN, TCP4, A("0.0.0.0:0"), Continue),
    ("loopback-not-by-wildcard", MAIN, TCP4, A("127.0.0.1:80"), Continue),
    ("v6-loopback-not-by-wildcard", MAIN, TCP6, A("[::1]:443"), Continue),
    ("v4-bind-never-matches-v6-wildcard", MAIN, TCP4, A("0.0.0.0:443"), Continue),
    ("v6only-never-matches-v4-wildcard", MAIN, V6ONLY, A("[::]:8000"), Continue),
    ("egress-only-config", BROAD, TCP4, A("0.0.0.0:80"), Continue),
    # not TCP/UDP
    ("raw-socket", MAIN, RAW4, A("0.0.0.0:80"), Continue),
    ("mptcp-socket", MAIN, MPTCP4, A("0.0.0.0:80"), Continue),
    ("seqpacket-socket", MAIN, SEQ6, A("[::]:443"), Continue),
]


@pytest.mark.parametrize("cfg, sock, addr, expected",
                         [pytest.param(*c[1:], id=c[0]) for c in BIND_CASES])
def test_decide_bind(cfg, sock, addr, expected):
    action = decide_bind(cfg, sock, addr)
    if expected is Continue:
        assert isinstance(action, Continue), action
    else:
        assert action == expected
        assert action.local.family == sock.family
        assert action.requested is addr


@pytest.mark.parametrize("sock, addr, note", [
    (V6ONLY, A("[::]:8000"), "IPv6-only (IPV6_V6ONLY) and rule 0.0.0.0:8000-8010=ep-range "
                              "is IPv4; add [::]:8000=ENDPOINT"),
    (TCP4, A("0.0.0.0:443"), "rule [::]:443=ep-v6 is IPv6 and the socket IPv4; "
                             "add 0.0.0.0:443=ENDPOINT"),
    (TCP4, A("127.0.0.1:80"), "rule 0.0.0.0:80=ep-http covers the wildcard, and a "
                              "container's loopback is its own"),
    (TCP6, A("[::1]:443"), "rule [::]:443=ep-v6 covers the wildcard"),
])
def test_a_bind_a_rule_could_have_meant_says_why_it_stays(sock, addr, note):
    """Not grafted, but not silent either: the agent logs the reason."""
    action = decide_bind(MAIN, sock, addr)
    assert isinstance(action, Continue) and action.note and note in action.reason, action


@pytest.mark.parametrize("sock, addr", [(TCP4, A("0.0.0.0:81")), (TCP6, A("[::]:81")),
                                        (TCP4, A("10.9.9.9:81")), (TCP4, A("127.0.0.1:81"))])
def test_a_bind_no_rule_names_is_passed_quietly(sock, addr):
    action = decide_bind(MAIN, sock, addr)
    assert isinstance(action, Continue) and not action.note


@pytest.mark.parametrize("sock, addr", [
    (G_TCP4, A("0.0.0.0:80")), (G_UDP4, A("10.0.0.5:53")), (G_TCP6, A("[::]:443")),
    (G_TCP4, A("0.0.0.0:8004")),
], ids=["tcp4", "udp4", "tcp6", "tcp4-range"])
def test_bind_on_grafted_socket_fails_einval(sock, addr):
    action = decide_bind(MAIN, sock, addr)
    assert isinstance(action, Fail) and action.errno == errno.EINVAL


@pytest.mark.parametrize("addr", ["0.0.0.0:81", "127.0.0.1:5000", "198.18.0.1:22", "0.0.0.0:0",
                                  "[::]:0", "[::1]:80", "[::ffff:127.0.0.1]:80"])
def test_bind_on_grafted_socket_without_rule_is_refused(addr):
    """A grafted socket bound before (and perhaps disconnected since with
    connect(AF_UNSPEC), which releases its port) never binds a host address
    again: the agent refuses instead of handing the bind to the kernel."""
    a = A(addr)
    sock = G_TCP4 if a.family == AF_INET else G_TCP6
    assert decide_bind(MAIN, sock, a) == Deny(errno.EACCES, "bind:no-endpoint", a)
    assert decide_bind(MAIN, SockInfo(sock.family, SOCK_DGRAM, True), a).errno == errno.EACCES


def test_listen_only_on_sockets_bound_through_an_ingress_rule():
    from sockgraft.model.graft import Listen, decide_listen
    assert isinstance(decide_listen(None), Listen)              # the kernel's errno
    assert isinstance(decide_listen(TCP4), Listen)              # the container's own
    assert isinstance(decide_listen(SockInfo(AF_INET, SOCK_STREAM, True, True, True)), Listen)
    for sock in (FRESH4, FRESH6, G_TCP4, G_TCP6, SockInfo(AF_INET, SOCK_STREAM, True, True)):
        d = decide_listen(sock)
        assert isinstance(d, Deny) and d.errno == errno.EACCES and d.rule == "listen:no-endpoint"


# ---------------------------------------------------------------- connect

CONNECT_CASES = [
    ("egress-dynamic-endpoint", MAIN, TCP4, A("10.2.3.4:80"),
     GraftConnect(EP(MAIN, "ep-out"), A("198.18.0.3:0"), A("10.2.3.4:80"),
                  "egress 10.0.0.0/8=ep-out")),
    ("udp-connect", MAIN, UDP4, A("10.2.3.4:53"),
     GraftConnect(EP(MAIN, "ep-out"), A("198.18.0.3:0"), A("10.2.3.4:53"),
                  "egress 10.0.0.0/8=ep-out")),
    ("longer-prefix-with-port-fixed-endpoint", MAIN, TCP4, A("10.1.2.3:5432"),
     GraftConnect(EP(MAIN, "ep-fixed"), A("198.18.0.4:4000"), A("10.1.2.3:5432"),
                  "egress 10.1.0.0/16:5432=ep-fixed")),
    ("port-rule-misses-falls-through", MAIN, TCP4, A("10.1.2.3:5433"),
     GraftConnect(EP(MAIN, "ep-out"), A("198.18.0.3:0"), A("10.1.2.3:5433"),
                  "egress 10.0.0.0/8=ep-out")),
    ("v6-dest", MAIN, TCP6, A("[fd00::5]:443"),
     GraftConnect(EP(MAIN, "ep-out6"), A("[fd53::3]:0"), A("[fd00::5]:443"),
                  "egress fd00::/8=ep-out6")),
    # flowinfo and scope id survive: the action carries the checked copy as is
    ("v6-dest-flowinfo-scope-kept", MAIN, TCP6, A("[fd00::5]:443", flowinfo=0x1234, scope_id=3),
     GraftConnect(EP(MAIN, "ep-out6"), A("[fd53::3]:0"),
                  A("[fd00::5]:443", flowinfo=0x1234, scope_id=3), "egress fd00::/8=ep-out6")),
    # a mapped destination matches the IPv4 rule, stays mapped, local is mapped
    ("mapped-dest-on-v6-socket", MAIN, TCP6, A("[::ffff:10.2.3.4]:80"),
     GraftConnect(EP(MAIN, "ep-out"), A("[::ffff:198.18.0.3]:0"), A("[::ffff:10.2.3.4]:80"),
                  "egress 10.0.0.0/8=ep-out")),
    ("broad-rule", BROAD, TCP4, A("93.184.216.34:443"),
     GraftConnect(EP(BROAD, "ep-out"), A("198.18.0.3:0"), A("93.184.216.34:443"),
                  "egress 0.0.0.0/0=ep-out")),
    ("allowlist-hit", ALLOWLIST, TCP4, A("10.1.9.9:443"),
     GraftConnect(EP(ALLOWLIST, "ep-out"), A("198.18.0.3:0"), A("10.1.9.9:443"),
                  "egress 10.0.0.0/8=ep-out")),
    # denied by policy
    ("explicit-deny", MAIN, TCP4, A("10.9.1.1:80"),
     Deny(errno.EACCES, "deny[0]", A("10.9.1.1:80"))),
    ("explicit-deny-mapped", MAIN, TCP6, A("[::ffff:10.9.1.1]:80"),
     Deny(errno.EACCES, "deny[0]", A("[::ffff:10.9.1.1]:80"))),
    ("metadata", MAIN, TCP4, A("169.254.169.254:80"),
     Deny(errno.EACCES, "builtin:metadata", A("169.254.169.254:80"))),
    ("metadata-broad-rule", BROAD, UDP4, A("169.254.169.254:80"),
     Deny(errno.EACCES, "builtin:metadata", A("169.254.169.254:80"))),
    ("metadata-mapped-on-v6-socket", BROAD, TCP6, A("[::ffff:169.254.169.254]:80"),
     Deny(errno.EACCES, "builtin:metadata", A("[::ffff:169.254.169.254]:80"))),
    ("metadata-v6", BROAD, TCP6, A("[fd00:ec2::254]:80"),
     Deny(errno.EACCES, "builtin:metadata", A("[fd00:ec2::254]:80"))),
    ("link-local", BROAD, TCP4, A("169.254.1.1:80"),
     Deny(errno.EACCES, "builtin:link-local", A("169.254.1.1:80"))),
    ("unspecified", BROAD, TCP4, A("0.0.0.1:80"),
     Deny(errno.EACCES, "builtin:unspecified", A("0.0.0.1:80"))),
    ("multicast", BROAD, UDP4, A("224.0.0.251:5353"),
     Deny(errno.EACCES, "builtin:multicast", A("224.0.0.251:5353"))),
    ("limited-broadcast", BROAD, UDP4, A("255.255.255.255:67"),
     Deny(errno.EACCES, "builtin:broadcast", A("255.255.255.255:67"))),
    ("allowlist-miss", ALLOWLIST, TCP4, A("10.1.9.9:80"),
     Deny(errno.EACCES, "default:allowlist", A("10.1.9.9:80"))),
    ("allowlist-wrong-proto", ALLOWLIST, UDP4, A("10.1.9.9:443"),
     Deny(errno.EACCES, "default:allowlist", A("10.1.9.9:443"))),
    # the container's own loopback is not moved by broad rules
    ("loopback-broad-rule", BROAD, TCP4, A("127.0.0.1:8080"), Continue),
    ("loopback-other-broad-rule", BROAD, UDP4, A("127.3.2.1:53"), Continue),
    ("loopback-mapped-broad-rule", BROAD, TCP6, A("[::ffff:127.0.0.1]:8080"), Continue),
    ("v6-loopback-broad-rule", BROAD, TCP6, A("[::1]:8080"), Continue),
    # ...but a rule inside the loopback range grafts it onto the host's loopback,
    # where the built-in loopback deny applies unless the policy names the port
    ("loopback-rule-allowed-port", LOOP, TCP4, A("127.0.0.1:8080"),
     GraftConnect(EP(LOOP, "ep-out"), A("198.18.0.3:0"), A("127.0.0.1:8080"),
                  "egress 127.0.0.0/8=ep-out")),
    ("loopback-rule-other-port", LOOP, TCP4, A("127.0.0.1:8081"),
     Deny(errno.EACCES, "builtin:loopback", A("127.0.0.1:8081"))),
    ("loopback-rule-other-addr", LOOP, TCP4, A("127.0.0.2:8080"),
     Deny(errno.EACCES, "builtin:loopback", A("127.0.0.2:8080"))),
    ("loopback-rule-udp", LOOP, UDP4, A("127.0.0.9:53"),
     GraftConnect(EP(LOOP, "ep-out"), A("198.18.0.3:0"), A("127.0.0.9:53"),
                  "egress 127.0.0.0/8=ep-out")),
    ("loopback-rule-mapped", LOOP, TCP6, A("[::ffff:127.0.0.1]:8081"),
     Deny(errno.EACCES, "builtin:loopback", A("[::ffff:127.0.0.1]:8081"))),
    ("v6-loopback-rule", LOOP, TCP6, A("[::1]:8080"),
     Deny(errno.EACCES, "builtin:loopback", A("[::1]:8080"))),
    # no rule
    ("no-egress-rule", MAIN, TCP4, A("192.0.2.1:80"), Continue),
    ("no-egress-rule-v6", MAIN, TCP6, A("[2001:db8::1]:80"), Continue),
    ("no-egress-rule-mapped", MAIN, TCP6, A("[::ffff:192.0.2.1]:80"), Continue),
    ("no-egress-ingress-only-config", config(""), TCP4, A("10.2.3.4:80"), Continue),
    # not TCP/UDP: nothing grafted, nothing checked (even if it would be denied)
    ("raw-socket", MAIN, RAW4, A("10.2.3.4:80"), Continue),
    ("raw-socket-denied-dest", BROAD, RAW4, A("169.254.169.254:80"), Continue),
    ("seqpacket-socket", MAIN, SEQ6, A("[fd00::5]:443"), Continue),
    # MPTCP's connect runs on a subflow the host socket's tag is not on, and
    # UDP-Lite has no connect hook: never on the host, whatever the rules
    ("mptcp-socket", MAIN, MPTCP4, A("10.2.3.4:80"), Continue),
    ("mptcp-socket-denied-dest", BROAD, MPTCP4, A("169.254.169.254:80"), Continue),
    ("udplite-socket", MAIN, LITE6, A("[fd00::5]:443"), Continue),
]


@pytest.mark.parametrize("cfg, sock, addr, expected",
                         [pytest.param(*c[1:], id=c[0]) for c in CONNECT_CASES])
def test_decide_connect(cfg, sock, addr, expected):
    action = decide_connect(cfg, sock, addr)
    if expected is Continue:
        assert isinstance(action, Continue), action
        return
    assert action == expected
    # the decision was made on this very object; the action carries it unchanged
    assert action.dest is addr
    if isinstance(action, GraftConnect):
        assert action.local.family == sock.family
    if isinstance(action, Deny):
        assert decide(cfg.policy, sock.proto, addr).rule == action.rule


GRAFTED_CONNECT_CASES = [
    # the socket is already on the host: policy only, no egress rule needed
    ("allowed-without-egress-rule", MAIN, G_TCP4, A("192.0.2.1:80"),
     ConnectGrafted(A("192.0.2.1:80"), "default:allow")),
    ("allowed-with-egress-rule", MAIN, G_UDP4, A("10.2.3.4:53"),
     ConnectGrafted(A("10.2.3.4:53"), "default:allow")),
    ("allowlist-hit", ALLOWLIST, G_TCP4, A("10.1.0.1:443"),
     ConnectGrafted(A("10.1.0.1:443"), "allow[0]")),
    ("allowlist-miss", ALLOWLIST, G_TCP4, A("192.0.2.1:443"),
     Deny(errno.EACCES, "default:allowlist", A("192.0.2.1:443"))),
    ("explicit-deny", MAIN, G_TCP4, A("10.9.0.1:80"),
     Deny(errno.EACCES, "deny[0]", A("10.9.0.1:80"))),
    # a host socket's 127.0.0.1 would be the host's loopback: refused
    # (no egress rule names loopback) before the policy's built-in deny
    ("loopback-is-the-hosts", BROAD, G_TCP4, A("127.0.0.1:8080"),
     Deny(errno.EACCES, "loopback:container-own", A("127.0.0.1:8080"))),
    ("loopback-opened-by-policy", LOOP, G_TCP4, A("127.0.0.1:8080"),
     ConnectGrafted(A("127.0.0.1:8080"), "allow[0]")),
    # ... but only where an egress rule names loopback: a policy that opens
    # 127.0.0.1:8080 means the container's sidecar, not the node's service
    ("sidecar-port-is-not-the-hosts", SIDECAR, G_TCP4, A("127.0.0.1:8080"),
     Deny(errno.EACCES, "loopback:container-own", A("127.0.0.1:8080"))),
    ("sidecar-port-v6", SIDECAR, G_TCP6, A("[::1]:8080"),
     Deny(errno.EACCES, "loopback:container-own", A("[::1]:8080"))),
    ("sidecar-port-mapped", SIDECAR, G_TCP6, A("[::ffff:127.0.0.1]:8080"),
     Deny(errno.EACCES, "loopback:container-own", A("[::ffff:127.0.0.1]:8080"))),
    ("this-host", SIDECAR, G_TCP4, A("0.0.0.0:8080"),
     Deny(errno.EACCES, "loopback:container-own", A("0.0.0.0:8080"))),
    ("sidecar-port-no-egress-rule", SIDECAR_NO_EGRESS, G_TCP4, A("127.0.0.2:8080"),
     Deny(errno.EACCES, "loopback:container-own", A("127.0.0.2:8080"))),
    ("metadata-mapped", MAIN, G_TCP6, A("[::ffff:169.254.169.254]:80"),
     Deny(errno.EACCES, "builtin:metadata", A("[::ffff:169.254.169.254]:80"))),
    ("v6-flowinfo-kept", MAIN, G_TCP6, A("[2001:db8::1]:80", flowinfo=9, scope_id=1),
     ConnectGrafted(A("[2001:db8::1]:80", flowinfo=9, scope_id=1), "default:allow")),
]


@pytest.mark.parametrize("cfg, sock, addr, expected",
                         [pytest.param(*c[1:], id=c[0]) for c in GRAFTED_CONNECT_CASES])
def test_decide_connect_on_grafted_socket(cfg, sock, addr, expected):
    action = decide_connect(cfg, sock, addr)
    assert action == expected
    assert action.dest is addr


def test_grafted_socket_with_other_type_is_left_alone():
    sock = SockInfo(AF_INET, SOCK_RAW, True)
    assert isinstance(decide_connect(BROAD, sock, A("169.254.169.254:80")), Continue)


# ---------------------------------------------------------------- sendto

SENDTO_CASES = [
    ("udp-egress", MAIN, UDP4, A("10.2.3.4:53"), 0,
     GraftSend(EP(MAIN, "ep-out"), A("198.18.0.3:0"), A("10.2.3.4:53"),
               "egress 10.0.0.0/8=ep-out")),
    ("udp-egress-fixed-endpoint", MAIN, UDP4, A("10.1.0.9:5432"), 0,
     GraftSend(EP(MAIN, "ep-fixed"), A("198.18.0.4:4000"), A("10.1.0.9:5432"),
               "egress 10.1.0.0/16:5432=ep-fixed")),
    ("udp-egress-v6", MAIN, UDP6, A("[fd00::9]:53"), 0,
     GraftSend(EP(MAIN, "ep-out6"), A("[fd53::3]:0"), A("[fd00::9]:53"),
               "egress fd00::/8=ep-out6")),
    ("udp-egress-mapped", MAIN, UDP6, A("[::ffff:10.2.3.4]:53"), 0,
     GraftSend(EP(MAIN, "ep-out"), A("[::ffff:198.18.0.3]:0"), A("[::ffff:10.2.3.4]:53"),
               "egress 10.0.0.0/8=ep-out")),
    ("udp-denied-metadata", BROAD, UDP4, A("169.254.169.254:53"), 0,
     Deny(errno.EACCES, "builtin:metadata", A("169.254.169.254:53"))),
    ("udp-denied-mapped-metadata", BROAD, UDP6, A("[::ffff:169.254.169.254]:53"), 0,
     Deny(errno.EACCES, "builtin:metadata", A("[::ffff:169.254.169.254]:53"))),
    ("udp-explicit-deny-is-tcp-only", MAIN, UDP4, A("10.9.0.1:53"), 0,
     GraftSend(EP(MAIN, "ep-out"), A("198.18.0.3:0"), A("10.9.0.1:53"),
               "egress 10.0.0.0/8=ep-out")),
    ("udp-allowlist-miss", ALLOWLIST, UDP4, A("10.1.0.1:443"), 0,
     Deny(errno.EACCES, "default:allowlist", A("10.1.0.1:443"))),
    ("udp-loopback-broad", BROAD, UDP4, A("127.0.0.1:53"), 0, Continue),
    ("udp-v6-loopback-broad", BROAD, UDP6, A("[::1]:53"), 0, Continue),
    ("udp-loopback-rule-allowed", LOOP, UDP4, A("127.0.0.1:53"), 0,
     GraftSend(EP(LOOP, "ep-out"), A("198.18.0.3:0"), A("127.0.0.1:53"),
               "egress 127.0.0.0/8=ep-out")),
    ("udp-loopback-rule-denied", LOOP, UDP4, A("127.0.0.1:54"), 0,
     Deny(errno.EACCES, "builtin:loopback", A("127.0.0.1:54"))),
    ("udp-no-rule", MAIN, UDP4, A("192.0.2.1:53"), 0, Continue),
    # grafted: nftables judges every datagram by the mark
    ("grafted-udp", MAIN, G_UDP4, A("10.2.3.4:53"), 0, Continue),
    ("grafted-udp-denied-dest", BROAD, G_UDP4, A("169.254.169.254:53"), 0, Continue),
    ("grafted-tcp-fastopen", BROAD, G_TCP4, A("10.2.3.4:80"), MSG_FASTOPEN, Continue),
    # stream sockets: the address is ignored, except for TCP fast open
    ("tcp-sendto-ignores-address", MAIN, TCP4, A("10.2.3.4:80"), 0, Continue),
    ("tcp-fastopen-no-rule", MAIN, TCP4, A("192.0.2.1:80"), MSG_FASTOPEN, Continue),
    ("tcp-fastopen-grafted-dest", MAIN, TCP4, A("10.2.3.4:80"), MSG_FASTOPEN,
     Fail(errno.EOPNOTSUPP, "")),
    ("tcp-fastopen-grafted-dest-v6", MAIN, TCP6, A("[fd00::1]:80"), MSG_FASTOPEN | 0x40,
     Fail(errno.EOPNOTSUPP, "")),
    ("raw-socket", MAIN, RAW4, A("10.2.3.4:80"), 0, Continue),
    ("mptcp-fastopen", MAIN, MPTCP4, A("10.2.3.4:80"), MSG_FASTOPEN, Continue),
    ("udplite-socket", MAIN, LITE6, A("[fd00::1]:80"), 0, Continue),
]


@pytest.mark.parametrize("cfg, sock, addr, flags, expected",
                         [pytest.param(*c[1:], id=c[0]) for c in SENDTO_CASES])
def test_decide_sendto(cfg, sock, addr, flags, expected):
    action = decide_sendto(cfg, sock, addr, flags)
    if expected is Continue:
        assert isinstance(action, Continue), action
    elif isinstance(expected, Fail):
        assert isinstance(action, Fail) and action.errno == expected.errno, action
    else:
        assert action == expected
        assert action.dest is addr


# ---------------------------------------------------------------- local_for

V4EP = Endpoint("e4", "ipv4", IPv4Address("198.18.0.9"), 7000)
V6EP = Endpoint("e6", "ipv6", IPv6Address("fd53::9"), 7000)
DYN4 = Endpoint("d4", "ipv4", IPv4Address("198.18.0.9"), None)


@pytest.mark.parametrize("ep, family, port, expected", [
    (V4EP, AF_INET, None, A("198.18.0.9:7000")),
    (V4EP, AF_INET, 7005, A("198.18.0.9:7005")),
    (V4EP, AF_INET6, None, A("[::ffff:198.18.0.9]:7000")),
    (V6EP, AF_INET6, 0, A("[fd53::9]:0")),
    (DYN4, AF_INET, None, A("198.18.0.9:0")),
    (Endpoint("w4", "ipv4", IPv4Address("0.0.0.0"), 80), AF_INET6, None,
     A("[::ffff:0.0.0.0]:80")),
])
def test_local_for(ep, family, port, expected):
    assert local_for(ep, family, port) == expected


def test_local_for_ipv6_endpoint_on_ipv4_socket_fails_eafnosupport():
    action = local_for(V6EP, AF_INET)
    assert isinstance(action, Fail) and action.errno == errno.EAFNOSUPPORT
    assert "e6" in action.reason


def test_ipv6_endpoint_on_ipv4_socket_reaches_the_caller_as_fail(monkeypatch):
    """The config rules make this unreachable from a loaded config (an IPv4
    prefix needs an ipv4 endpoint), so force the lookup to return an ipv6
    endpoint and check every decide_* passes the Fail through instead of
    building an action with a wrong-family local address."""
    rule_in = MAIN.ingress[0]
    rule_out = MAIN.egress[0]
    monkeypatch.setattr(type(MAIN), "match_ingress", lambda self, a: (rule_in, V6EP))
    monkeypatch.setattr(type(MAIN), "match_egress", lambda self, a: (rule_out, V6EP))
    for action in (decide_bind(MAIN, TCP4, A("0.0.0.0:80")),
                   decide_connect(MAIN, TCP4, A("10.2.3.4:80")),
                   decide_sendto(MAIN, UDP4, A("10.2.3.4:53"))):
        assert isinstance(action, Fail) and action.errno == errno.EAFNOSUPPORT, action


# ---------------------------------------------------------------- cross-checks

@pytest.mark.parametrize("cfg", [MAIN, BROAD, LOOP, ALLOWLIST], ids=["main", "broad", "loop",
                                                                      "allowlist"])
def test_connect_and_udp_sendto_agree(cfg):
    """A UDP connect and a UDP sendto to the same address take the same road:
    both graft (same endpoint/local), both deny (same rule), or both continue."""
    dests = ["10.2.3.4:53", "10.1.0.9:5432", "10.1.0.9:443", "10.9.0.1:53",
             "127.0.0.1:53", "127.0.0.1:8080", "169.254.169.254:53", "192.0.2.1:53",
             "[fd00::9]:53", "[::1]:53", "[::ffff:10.2.3.4]:53",
             "[::ffff:169.254.169.254]:53", "[::ffff:127.0.0.1]:53"]
    for text in dests:
        addr = A(text)
        sock = UDP4 if addr.family == AF_INET else UDP6
        c, s = decide_connect(cfg, sock, addr), decide_sendto(cfg, sock, addr)
        if isinstance(c, GraftConnect):
            assert isinstance(s, GraftSend), (text, c, s)
            assert (c.endpoint, c.local, c.dest, c.rule) == (s.endpoint, s.local, s.dest,
                                                               s.rule)
        elif isinstance(c, Continue):
            assert isinstance(s, Continue), (text, c, s)
        else:
            assert c == s, (text, c, s)


# ---------------------------------------------------------------- known bugs

V6DENY = config('''
    [rules]
    egress = ["10.0.0.0/8=ep-out"]
    [policy]
    deny = ["deny any [::/0]"]
''')


@pytest.mark.parametrize("sock, call", [
    pytest.param(TCP6, "connect", id="connect"),
    pytest.param(G_TCP6, "connect", id="connect-grafted"),
    pytest.param(UDP6, "sendto", id="sendto")])
def test_mapped_destination_is_judged_as_the_ipv4_packet_it_is(sock, call):
    # a v6 deny rule does not cover ::ffff:a.b.c.d: on the wire (and in the
    # kernel's nftables check) that is an IPv4 packet; agent and kernel agree
    addr = A("[::ffff:10.2.3.4]:80")
    verdict = decide(V6DENY.policy, sock.proto, addr)
    assert verdict.allowed and verdict.rule == "default:allow"
    action = (decide_connect if call == "connect" else decide_sendto)(V6DENY, sock, addr)
    assert not isinstance(action, Deny)
    v4only = config('''
    [rules]
    egress = ["10.0.0.0/8=ep-out"]
    [policy]
    deny = ["deny any 10.2.0.0/16"]
''')
    action = (decide_connect if call == "connect" else decide_sendto)(v4only, sock, addr)
    assert action == Deny(errno.EACCES, "deny[0]", addr)


def test_native_ipv4_destination_is_not_hit_by_v6_deny_rules():
    # the control for the xfail above: the same rule leaves native IPv4 alone
    addr = A("10.2.3.4:80")
    assert isinstance(decide_connect(V6DENY, TCP4, addr), GraftConnect)


@pytest.mark.parametrize("sock, text", [
    pytest.param(TCP4, "127.0.0.1:8080", id="v4"),
    pytest.param(TCP6, "[::1]:8080", id="v6"),
    pytest.param(TCP6, "[::ffff:127.0.0.1]:8080", id="mapped")])
def test_fastopen_to_container_loopback_is_not_grafted(sock, text):
    addr = A(text)
    assert isinstance(decide_connect(BROAD, sock, addr), Continue)
    assert isinstance(decide_sendto(BROAD, sock, addr, MSG_FASTOPEN), Continue)


# --- sockets grafted at socket() (graft_at = "socket") -------------------------

from sockgraft.model.graft import BindGrafted, via_directory  # noqa: E402



def test_fresh_host_socket_binds_through_ingress_rules():
    a = decide_bind(MAIN, FRESH4, A("0.0.0.0:80"))
    assert isinstance(a, BindGrafted) and a.local == A("198.18.0.1:8080")
    assert a.endpoint.name == "ep-http" and a.rule.startswith("ingress")
    a = decide_bind(MAIN, FRESH6, A("[::]:80"))
    assert isinstance(a, BindGrafted) and a.local.ip.ipv4_mapped == IPv4Address("198.18.0.1")


@pytest.mark.parametrize("addr", ["0.0.0.0:0", "[::ffff:0.0.0.0]:0"])
def test_fresh_host_socket_ephemeral_wildcard_binds_as_asked(addr):
    sock = FRESH4 if "[" not in addr else FRESH6
    a = decide_bind(MAIN, sock, A(addr))
    assert isinstance(a, BindGrafted) and a.endpoint is None and a.local == A(addr)


@pytest.mark.parametrize("addr", ["0.0.0.0:9999", "127.0.0.1:80", "198.18.0.1:22"])
def test_fresh_host_socket_unclaimed_binds_are_refused(addr):
    a = decide_bind(MAIN, FRESH4, A(addr))
    assert isinstance(a, Deny) and a.errno == errno.EACCES and a.rule == "bind:no-endpoint"


def test_fresh_host_socket_foreign_family_fails_instead_of_continuing():
    a = decide_bind(MAIN, FRESH4, A("[::]:80"))
    assert isinstance(a, Fail) and a.errno == errno.EAFNOSUPPORT
    a = decide_bind(MAIN, FRESH4, UnixAddr(b"/tmp/x", False))
    assert isinstance(a, Fail)


SERVICES = {("tcp", IPv4Address("198.19.2.2"), 80): (IPv4Address("198.18.0.2"), 8081)}


def test_directory_hit_redirects_a_grafted_connect():
    cfg = config('''
        [rules]
        egress = ["198.19.0.0/16=ep-out"]
    ''')
    sock = SockInfo(AF_INET, SOCK_STREAM, grafted=False)
    a = decide_connect(cfg, sock, A("198.19.2.2:80"), SERVICES)
    assert isinstance(a, GraftConnect) and a.dest == A("198.18.0.2:8081")
    assert a.overlay == A("198.19.2.2:80") and "via directory" in a.rule
    a = decide_connect(cfg, sock, A("198.19.2.2:81"), SERVICES)       # not published
    assert isinstance(a, GraftConnect) and a.dest == A("198.19.2.2:81") and a.overlay is None
    udp = SockInfo(AF_INET, SOCK_DGRAM, grafted=False)
    assert decide_connect(cfg, udp, A("198.19.2.2:80"), SERVICES).overlay is None


def test_directory_redirect_keeps_the_socket_family():
    v6 = via_directory(SERVICES, "tcp", A("[::ffff:198.19.2.2]:80"), AF_INET6)
    assert v6 == A("[::ffff:198.18.0.2]:8081")
    assert via_directory(SERVICES, "tcp", A("198.19.2.9:80"), AF_INET) is None


def test_directory_does_not_bypass_the_policy():
    cfg = config('''
        [rules]
        egress = ["198.19.0.0/16=ep-out"]
        [policy]
        deny = ["deny tcp 198.19.2.2 80"]
    ''')
    a = decide_connect(cfg, SockInfo(AF_INET, SOCK_STREAM, grafted=False), A("198.19.2.2:80"),
                       SERVICES)
    assert isinstance(a, Deny) and a.rule == "deny[0]"


# --- a sockaddr the kernel would refuse: who answers ------------------------------

from sockgraft.model.graft import decide_malformed  # noqa: E402


@pytest.mark.parametrize("sock, answered", [
    (None, False),                                              # not a socket: the kernel
    (SockInfo(AF_INET, SOCK_STREAM, grafted=False), False),     # a container socket
    (SockInfo(AF_INET, SOCK_STREAM, grafted=True), True),       # a grafted host socket
    (SockInfo(AF_INET6, SOCK_DGRAM, grafted=True), True),
])
def test_decide_malformed(sock, answered):
    fail = Fail(errno.EINVAL, "addrlen 7")
    action = decide_malformed(sock, fail)
    if answered:
        assert action is fail
    else:
        assert isinstance(action, Continue)


# ---------------------------------------------------------------- the prefilter

PREFILTER_ADDRS = [A("10.0.0.5:80"), A("10.9.0.1:80"), A("192.0.2.1:53"), A("127.0.0.1:8080"),
                   A("[fd00::1]:443"), A("[::ffff:10.0.0.1]:80"), A("0.0.0.0:0"),
                   UnixAddr(b"/run/x.sock"), UnspecAddr(), OtherAddr(16, bytes(12))]
PREFILTER_SOCKS = [TCP4, UDP4, TCP6, UDP6, G_TCP4, G_UDP4, G_TCP6, FRESH4, FRESH6, RAW4, SEQ6,
                   MPTCP4, LITE6]


@pytest.mark.parametrize("cfg", [MAIN, BROAD, LOOP, ALLOWLIST], ids=["main", "broad", "loop",
                                                                      "allowlist"])
@pytest.mark.parametrize("call", ["bind", "connect", "sendto"])
def test_the_prefilter_agrees_with_the_decision_on_every_socket(cfg, call):
    """Where the agent answers without copying the target's socket, every
    socket it could have copied gets the same answer from decide_<call>;
    and it does answer the common no-graft cases."""
    from sockgraft.model.graft import prefilter
    decide_ = {"bind": lambda s, a: decide_bind(cfg, s, a),
               "connect": lambda s, a: decide_connect(cfg, s, a),
               "sendto": lambda s, a: decide_sendto(cfg, s, a, 0)}[call]
    answered = 0
    for addr in PREFILTER_ADDRS:
        pre = prefilter(call, cfg, addr)
        if pre is None:
            continue
        answered += 1
        assert isinstance(pre, Continue)
        for sock in PREFILTER_SOCKS:
            assert isinstance(decide_(sock, addr), Continue), (call, addr, sock)
    assert (answered == 0) == (call == "bind")


# ---------------------------------------------------------------- private loopback

def test_private_loopback_addresses_are_per_mark():
    from sockgraft.model.graft import private_loopback
    assert [str(a) for a in private_loopback(0x53470001)] == ["127.83.0.1", "fd53:4c4f::1"]
    assert [str(a) for a in private_loopback(0x5347ABCD)] == ["127.83.171.205",
                                                              "fd53:4c4f::abcd"]


@pytest.mark.parametrize("sock, addr, local", [
    (FRESH4, A("127.0.0.1:8080"), A("127.83.0.7:8080")),
    (FRESH4, A("127.1.2.3:0"), A("127.83.0.7:0")),
    (FRESH6, A("[::1]:0"), A("[fd53:4c4f::7]:0")),
    (FRESH6, A("[::ffff:127.0.0.1]:0"), A("[::ffff:127.83.0.7]:0")),     # Go's probe
])
def test_a_socket_mode_loopback_bind_goes_to_the_private_loopback(sock, addr, local):
    from sockgraft.model.graft import BindLoopback, private_loopback
    action = decide_bind(MAIN, sock, addr, frozenset(), private_loopback(0x53470007))
    assert action == BindLoopback(local, addr)


def test_a_rule_naming_loopback_still_wins_and_syscall_mode_is_unchanged():
    from sockgraft.model.graft import BindGrafted, BindLoopback, private_loopback
    lo = private_loopback(0x53470007)
    assert isinstance(decide_bind(MAIN, FRESH4, A("127.0.0.1:9090"), frozenset(), lo),
                      BindGrafted)                      # "127.0.0.1:9090=ep-http"
    assert isinstance(decide_bind(MAIN, FRESH4, A("127.0.0.1:80"), frozenset(), None), Deny)
    assert not isinstance(decide_bind(MAIN, TCP4, A("127.0.0.1:80"), frozenset(), lo),
                          BindLoopback)                 # a container socket: the kernel's


@pytest.mark.parametrize("addr, refused", [
    ("127.0.0.1:22", True), ("[::1]:53", True), ("127.0.0.1:30080", True),
    ("127.0.0.1:8080", False), ("127.0.0.1:0", False), ("[::ffff:127.0.0.1]:1023", True),
])
def test_a_loopback_bind_never_takes_a_port_the_host_keeps(addr, refused):
    """A private loopback is a host address: a container's bind there would
    make a host service's later bind of that port on every address fail
    (EADDRINUSE). The ports the host keeps (privileged ones, the reserved
    list) are refused; others, and an ephemeral port, go as before."""
    from sockgraft.model.graft import BindLoopback, private_loopback
    a = A(addr)
    action = decide_bind(MAIN, FRESH6 if a.family == AF_INET6 else FRESH4, a, frozenset(),
                         private_loopback(0x53470007), ((1, 1023), (30000, 32767)))
    if refused:
        assert action == Deny(errno.EACCES, "bind:host-reserved-port", a)
    else:
        assert isinstance(action, BindLoopback)


@pytest.mark.parametrize("start, reserved, kept", [
    ("1024\n", "\n", ((1, 1023),)),
    ("0\n", "8080,30000-32767\n", ((8080, 8080), (30000, 32767))),
    ("80", "5-3,x,70000,22", ((1, 79), (22, 22))),        # nonsense parts skipped
    ("", "", ((1, 1023),)),                               # unreadable: the default
])
def test_the_ports_the_host_keeps_come_from_its_sysctls(start, reserved, kept):
    from sockgraft.agent.procfs import kept_ports
    assert kept_ports(start, reserved) == kept
