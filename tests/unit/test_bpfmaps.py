"""The BPF map bytes (model/bpfmaps.py): decoded here by a Python twin of the
C program's judge() and LPM lookups, then compared with the pure decisions
(`policy.decide`, `GraftConfig.match_egress`) over many destinations, so an
encoding or ordering slip fails here, not in the kernel."""

from __future__ import annotations

import random
import struct
from ipaddress import IPv4Address, IPv6Address, ip_address

import pytest

from sockgraft.errors import ConfigError
from sockgraft.model import bpfmaps
from sockgraft.model.graftconfig import load_config
from sockgraft.model.policy import Policy, decide, parse_policy_rule
from sockgraft.model.sockaddr import InetAddr

pytestmark = pytest.mark.unit


def P(*rules: str, builtin: bool = True) -> Policy:
    parsed = [parse_policy_rule(r) for r in rules]
    return Policy(tuple(r for r in parsed if r.action == "allow"),
                  tuple(r for r in parsed if r.action == "deny"), builtin)


def _words(ip) -> tuple[int, ...]:
    return struct.unpack("=4I", ip.packed.ljust(16, b"\0"))


def judge(value: bytes, proto: str, dest: InetAddr) -> tuple[bool, int]:
    """What sg_connect4/6 compute from the policy value (mapped -> IPv4 first)."""
    flags, n, default_verdict, default_label, _gen, _, _ = bpfmaps.POLICY_HEAD.unpack_from(value)
    ip = dest.ip
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    fam = ip.version
    a = _words(ip)
    pnum = bpfmaps.PROTO_NUM[proto]
    for i in range(n):
        f = bpfmaps.RULE.unpack_from(value, bpfmaps.POLICY_HEAD.size + i * bpfmaps.RULE.size)
        addr, mask, lo, hi, rfam, rproto, verdict, _pad, label = \
            f[0:4], f[4:8], f[8], f[9], f[10], f[11], f[12], f[13], f[14]
        if rfam and rfam != fam:
            continue
        if rproto and rproto != pnum:
            continue
        if not lo <= dest.port <= hi:
            continue
        words = 1 if fam == 4 else 4
        if any(a[w] & mask[w] != addr[w] for w in range(words)):
            continue
        return verdict == bpfmaps.V_ALLOW, label
    return default_verdict == bpfmaps.V_ALLOW, default_label


POLICIES = [
    P(),
    P(builtin=False),
    P("allow tcp 198.18.0.0/24 80-443"),
    P("deny tcp 198.18.0.2 7399", "deny udp 198.18.0.2 7398"),
    P("allow tcp 127.0.0.1 8080", "allow any 0.0.0.0/0"),
    P("allow any 169.254.169.254", "deny any 10.0.0.0/8", "allow udp [fd00::/8] 53"),
    P("deny any ::/0", "allow any any"),
    P("allow tcp any 1-1024", "deny tcp any 25"),
]

DESTS = ["198.18.0.2:80", "198.18.0.2:7399", "198.18.0.2:7398", "127.0.0.1:8080",
         "127.0.0.1:22", "169.254.169.254:80", "169.254.1.1:80", "10.1.2.3:443",
         "[fd00::1]:53", "[fd00::1]:54", "[::1]:80", "[fe80::1]:80", "[::ffff:127.0.0.1]:8080",
         "[::ffff:198.18.0.2]:7399", "0.0.0.0:80", "[2001:db8::1]:25", "8.8.8.8:25"]


def A(text: str) -> InetAddr:
    host, _, port = text.rpartition(":")
    return InetAddr.of(host.strip("[]"), int(port))


@pytest.mark.parametrize("policy", POLICIES)
def test_encoded_policy_decides_like_decide(policy):
    entry = bpfmaps.policy_entry(policy, gen=3)
    assert len(entry.value) == bpfmaps.POLICY_SIZE
    for proto in ("tcp", "udp"):
        for d in DESTS:
            want = decide(policy, proto, A(d))
            allowed, label = judge(entry.value, proto, A(d))
            assert allowed == want.allowed, (str(policy), proto, d, want)
            assert entry.labels[label] == want.rule, (proto, d)


def test_random_policies_agree_with_decide():
    rnd = random.Random(7)
    nets4 = ["10.0.0.0/8", "10.1.0.0/16", "127.0.0.1", "169.254.0.0/16", "169.254.169.254",
             "198.18.0.0/15", "0.0.0.0/0", "any"]
    nets6 = ["[fd00::/8]", "[::1]", "[fe80::/10]", "[::/0]"]
    for _ in range(300):
        rules = []
        for _ in range(rnd.randint(0, 6)):
            act = rnd.choice(["allow", "deny"])
            proto = rnd.choice(["tcp", "udp", "any"])
            net = rnd.choice(nets4 + nets6)
            ports = rnd.choice(["", " 80", " 1-1000", " 25"])
            rules.append(f"{act} {proto} {net}{ports}")
        pol = P(*dict.fromkeys(rules), builtin=rnd.random() < 0.8)
        entry = bpfmaps.policy_entry(pol, gen=1)
        for _ in range(20):
            if rnd.random() < 0.6:
                ip = IPv4Address(rnd.choice([0x0A000001, 0x0A010203, 0x7F000001, 0xA9FE0101,
                                             0xA9FEA9FE, 0xC6120002, 0x08080808]))
                if rnd.random() < 0.3:
                    ip = IPv6Address("::ffff:" + str(ip))
            else:
                ip = rnd.choice([IPv6Address("fd00::5"), IPv6Address("::1"),
                                 IPv6Address("fe80::9"), IPv6Address("2001:db8::2")])
            d = InetAddr(10 if ip.version == 6 else 2, ip, rnd.choice([25, 80, 443, 5000]))
            proto = rnd.choice(["tcp", "udp"])
            want = decide(pol, proto, d)
            got, label = judge(entry.value, proto, d)
            assert (got, entry.labels[label]) == (want.allowed, want.rule), (rules, d, proto)


def test_too_many_rules_is_a_clear_error():
    many = P(*[f"deny tcp 10.{i // 256}.{i % 256}.0/24" for i in range(1020)])
    with pytest.raises(ConfigError, match="at most 1024"):
        bpfmaps.policy_entry(many, gen=1)


CFG = load_config("""
container = "c1"
graft_at = "socket"
[endpoints.a]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[endpoints.b]
type = "ipv4"
addr = "198.18.0.9"
port = 4000
[endpoints.v6]
type = "ipv6"
addr = "fd53:6700:0:1::1"
port = "dynamic"
[rules]
egress = ["0.0.0.0/0=a", "198.18.0.0/24:80=b", "198.18.0.0/16=a", "198.18.0.7/32=b",
          "fd53:6700::/48=v6"]
""", "test")


def lpm(entries, key_struct, mark, gen, dest: InetAddr):
    """The C egress4/egress6: longest match among port-specific and portless keys."""
    ip = dest.ip.ipv4_mapped or dest.ip if dest.ip.version == 6 else dest.ip
    bits = int(ip)
    maxlen = ip.max_prefixlen
    best = {}
    for key, val in entries:
        plen_total, kmark, kgen, kport, kaddr = key_struct.unpack(key)
        if (kmark, kgen) != (mark, gen):
            continue
        plen = plen_total - 64
        net = int.from_bytes(kaddr, "big") >> (maxlen - plen) if plen else 0
        if (bits >> (maxlen - plen) if plen else 0) != net:
            continue
        for want_port in (bpfmaps._be16(dest.port), 0):
            if kport == want_port:
                cur = best.get(want_port)
                if cur is None or plen > cur[0]:
                    best[want_port] = (plen, val)
    wp, pl = best.get(bpfmaps._be16(dest.port)), best.get(0)
    if wp and (not pl or wp[0] >= pl[0]):
        return wp[1]
    return pl[1] if pl else None


@pytest.mark.parametrize("dest", ["198.18.0.5:80", "198.18.0.5:81", "198.18.3.3:80",
                                  "198.18.0.7:22", "8.8.8.8:53", "[fd53:6700:0:2::3]:80",
                                  "[::ffff:198.18.0.5]:80", "[2001:db8::1]:80"])
def test_egress_entries_match_like_match_egress(dest):
    mark, gen = 0x53470007, 9
    v4, v6, labels = bpfmaps.egress_entries(CFG, mark, gen)
    d = A(dest)
    unm = d.unmapped()
    entries, ks = (v4, bpfmaps.EGRESS4_KEY) if unm.ip.version == 4 else (v6, bpfmaps.EGRESS6_KEY)
    got = lpm(entries, ks, mark, gen, unm)
    want = CFG.match_egress(d)
    if want is None:
        assert got is None
        return
    plen, label, src, src_port, fam, _ = bpfmaps.EGRESS_VAL.unpack(got)
    rule, ep = want
    assert labels[label] == f"egress {rule}"
    assert ip_address(src[:4] if fam == 4 else src) == ep.addr
    assert struct.unpack("!H", struct.pack("=H", src_port))[0] == (ep.port or 0)
    # another generation never matches: an update is atomic per container
    assert lpm(entries, ks, mark, gen + 1, unm) is None


def test_event_decoding():
    raw = bpfmaps.EVENT.pack(1, 0x53470002, 1, 4, IPv4Address("198.18.0.2").packed.ljust(16, b"\0"),
                             7399, 4, 6, 1234)
    ev = bpfmaps.decode_event(raw)
    assert (ev.op, ev.address, ev.proto, ev.pid, ev.reason) == \
        ("connect", "198.18.0.2:7399", "tcp", 1234, "policy")
    raw6 = bpfmaps.EVENT.pack(2, 1, 2, 0, IPv6Address("fd00::1").packed, 53, 6, 17, 1)
    assert bpfmaps.decode_event(raw6).address == "[fd00::1]:53"
    with pytest.raises(ValueError):
        bpfmaps.decode_event(b"\0" * 10)


def test_service_key_layout():
    k = bpfmaps.svc_key(IPv4Address("198.19.2.2"), 80, "tcp", 0x53470007)
    assert len(k) == 24 and k[:4] == bytes([198, 19, 2, 2]) and k[16:18] == b"\0\x50"
    assert k[18:20] == bytes([4, 6]) and k[20:] == (0x53470007).to_bytes(4, "little")
    assert bpfmaps.svc_key(IPv4Address("198.19.2.2"), 80, "tcp")[20:] == b"\0" * 4


# --- the guards (bpf/sockgraft.bpf.c) ----------------------------------------------

def _c_source() -> str:
    from importlib import resources
    return resources.files("sockgraft.bpf").joinpath("sockgraft.bpf.c").read_text()


def test_refused_options_are_the_ones_the_c_guard_refuses():
    """option_refused() in the C program and REFUSED_OPTIONS (audit names,
    the documented list) must be the same set, option for option."""
    import re
    src = _c_source()
    body = src[src.index("static __always_inline int option_refused"):]
    body = body[:body.index("\n}\n")]
    levels = {"SOL_SOCKET": 1, "IPPROTO_IP": 0, "SOL_IPV6": 41, "SOL_TCP": 6, "IPPROTO_UDP": 17}
    found = {}
    for case in re.split(r"\tcase ", body)[1:]:
        level = levels[case.split(":", 1)[0]]
        for opt, name in re.findall(r"opt == (\d+) /\* (\w+)", case):
            found[(level, int(opt))] = name
    assert found == bpfmaps.REFUSED_OPTIONS


def test_the_priority_bound_is_one_number_in_every_language():
    """TC_PRIO_INTERACTIVE (6): the BPF guard, the native copier and the
    Python copier refuse / skip the same priorities."""
    import re
    from importlib import resources
    from sockgraft.kernel import sockets as ksock
    answer = resources.files("sockgraft").joinpath("_answer.c").read_text()
    for src in (_c_source(), answer):
        assert int(re.search(r"#define PRIO_UNPRIVILEGED (\d+)", src).group(1)) == 6
    assert bpfmaps.PRIO_UNPRIVILEGED == ksock.PRIO_UNPRIVILEGED == 6


def test_source_keys_are_the_endpoint_addresses():
    cfg = load_config('''
        container = "c"
        [endpoints.a]
        type = "ipv4"
        addr = "198.18.0.1"
        port = "dynamic"
        [endpoints.b]
        type = "ipv4"
        addr = "198.18.0.1"
        port = 8080
        [endpoints.c]
        type = "ipv6"
        addr = "fd00::1"
        port = 80
        [endpoints.any]
        type = "ipv6"
        addr = "::"
        port = "dynamic"
        [endpoints.u]
        type = "unix"
        path = "/run/x.sock"
    ''', "test")
    keys = bpfmaps.source_keys(cfg, 0x53470007)
    decoded = {bpfmaps.SRC_KEY.unpack(k) for k in keys}
    assert decoded == {(0x53470007, 4, IPv4Address("198.18.0.1").packed + bytes(12)),
                       (0x53470007, 6, IPv6Address("fd00::1").packed),
                       (0x53470007, 6, bytes(16))}       # the wildcard: any address
    assert len(keys) == 3 and bpfmaps.SRC_KEY.size == 24
    # the container's own addresses: reply sources of redirected flows; never
    # loopback, the wildcard or garbage
    own = bpfmaps.source_keys(cfg, 0x53470007, ["198.19.2.2", "fd53::2", "127.0.0.1", "::",
                                                "not an address"])
    extra = {bpfmaps.SRC_KEY.unpack(k) for k in own} - decoded
    assert extra == {(0x53470007, 4, IPv4Address("198.19.2.2").packed + bytes(12)),
                     (0x53470007, 6, IPv6Address("fd53::2").packed)}


@pytest.mark.parametrize("kind, op, label, port, family, addr, want_addr, rule, err", [
    (bpfmaps.EV_DENY_SOCKOPT, 4, 36, 1, 4, b"", "SO_MARK", "sockopt:refused", 1),
    (bpfmaps.EV_DENY_SOCKOPT, 4, 75, 41, 4, b"", "IPV6_TRANSPARENT", "sockopt:refused", 1),
    (bpfmaps.EV_DENY_SOCKOPT, 4, 999, 7, 4, b"", "level 7 option 999", "sockopt:refused", 1),
    (bpfmaps.EV_DENY_SOCKOPT, 4, 12, 1, 4, b"", "SO_PRIORITY", "sockopt:refused", 1),
    (bpfmaps.EV_DENY_PRIORITY, 5, 7, 0, 4, bytes([198, 18, 0, 1]), "198.18.0.1",
     "priority:refused", 1),
    (bpfmaps.EV_DENY_OWNER, 5, 0, 0, 4, bytes([198, 18, 0, 1]), "198.18.0.1",
     "owner:changed", 1),
    (bpfmaps.EV_DENY_OWNER, 6, 0, 8080, 4, b"", "0.0.0.0:8080", "owner:changed", 1),
    (bpfmaps.EV_DENY_GROUP, 6, 0, 8080, 4, b"", "0.0.0.0:8080", "reuseport:foreign-group", 1),
    (bpfmaps.EV_DENY_BIND, 3, 0, 7100, 4, bytes([127, 0, 0, 1]), "127.0.0.1:7100",
     "bind:no-endpoint", 13),
    (bpfmaps.EV_DENY_SOURCE, 5, 0x53470001, 0, 4, bytes([198, 19, 1, 1]), "198.19.1.1",
     "source:not-granted", 1),
    (bpfmaps.EV_DENY_MARK, 5, 0, 0, 6, IPv6Address("fd00::1").packed, "fd00::1",
     "mark:forged", 1),
    (bpfmaps.EV_DENY_LISTEN, 6, 0, 41414, 4, b"", "0.0.0.0:41414", "listen:no-endpoint", 1),
    (bpfmaps.EV_DENY_UNKNOWN, 1, 0, 0, 4, b"", "0.0.0.0:0", "container:no-policy", 13),
    (bpfmaps.EV_DENY_POLICY, 1, 0, 80, 4, bytes([10, 0, 0, 1]), "10.0.0.1:80", "policy", 13),
    (bpfmaps.EV_DENY_NO_EGRESS, 1, 0, 80, 4, bytes([10, 0, 0, 1]), "10.0.0.1:80",
     "egress:no-rule", 101),
    (bpfmaps.EV_BIND_FAILED, 1, 0, 80, 4, bytes([10, 0, 0, 1]), "10.0.0.1:80",
     "egress:bind-failed", 99),
])
def test_guard_event_decoding(kind, op, label, port, family, addr, want_addr, rule, err):
    raw = bpfmaps.EVENT.pack(kind, 0x53470001, op, label, addr.ljust(16, b"\0"), port, family,
                             0, 42)
    ev = bpfmaps.decode_event(raw)
    assert (ev.address, ev.reason, ev.errno, ev.pid) == (want_addr, rule, err, 42)


def test_policy_flags_say_socket_mode_and_splice_opt_out():
    head = bpfmaps.POLICY_HEAD
    flags = lambda **kw: head.unpack_from(bpfmaps.policy_entry(Policy(), 1, **kw).value)[0]
    assert flags() == bpfmaps.F_SOCKET_MODE
    assert flags(socket_mode=False) == 0
    assert flags(socket_mode=False, splice=False) == bpfmaps.F_NO_SPLICE
    assert flags(splice=False) == bpfmaps.F_SOCKET_MODE | bpfmaps.F_NO_SPLICE


def test_local_keys_leave_loopback_to_the_program():
    keys = bpfmaps.local_keys([ip_address("198.18.0.1"), ip_address("127.0.0.1"),
                               ip_address("::1"), ip_address("fd53:6700:0:1::1"),
                               ip_address("0.0.0.0")])
    assert keys == {struct.pack("=I16s", 4, ip_address("198.18.0.1").packed),
                    struct.pack("=I16s", 6, ip_address("fd53:6700:0:1::1").packed)}
    assert all(len(k) == 20 for k in keys)


def test_splice_key_is_the_programs():
    """KEY_OF + key_unmap: family, addresses (IPv4 in the first word), ports
    in host order; a v4-mapped pair keyed as IPv4."""
    from sockgraft.model.bpfmaps import SPLICE_KEY, splice_key
    k = splice_key("::ffff:198.18.0.1", 40000, "::ffff:198.18.0.2", 80)
    assert k == splice_key("198.18.0.1", 40000, "198.18.0.2", 80)
    fam, lip, rip, lport, rport = SPLICE_KEY.unpack(k)
    assert (fam, lip[:4], rip[:4], lport, rport) == (2, bytes([198, 18, 0, 1]),
                                                     bytes([198, 18, 0, 2]), 40000, 80)
    assert lip[4:] == rip[4:] == bytes(12) and len(k) == 44
    assert SPLICE_KEY.unpack(splice_key("fd53::1", 1, "fd53::2", 2))[0] == 10
    with pytest.raises(ConfigError):
        splice_key("1.2.3.4", 1, "fd53::2", 2)
