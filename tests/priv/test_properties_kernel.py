"""Property tests of the decision core's kernel renderings (issue 18): for
random policies and destinations (tests/strategies.py, a bounded sample) the
nftables table that nftpolicy.plan_ruleset renders and the policy entry that
bpfmaps.policy_entry encodes give policy.decide's verdict when the kernel
itself evaluates them.

- nftables: the ruleset loaded into a throwaway namespace whose every
  destination routes out of a veth (nothing answers); one TCP SYN or UDP
  datagram per case from a socket carrying the container's mark. Two probe
  chains of the test's own table, before and after sockgraft's output chain
  (priorities -200 and +200), put each packet's (protocol, address, port)
  into a "seen" and a "passed" set: the verdict is read from the kernel's
  sets, not from errnos, ICMP answers or timing. A case the kernel never
  emitted (a broadcast without SO_BROADCAST, a TCP connect to multicast) is
  not evaluated, and most cases must be.
- BPF: the cgroup programs loaded and attached to a test cgroup, the policy
  and egress entries written as the agent writes them (enforce.sync_bpf),
  sockets created inside that cgroup and tagged for the container, then
  connect() from outside it (the agent's own calls are not judged): EACCES
  exactly where decide() denies, and the ring buffer's event names the rule
  decide() names. Any other outcome (in progress, ENETUNREACH from routing)
  is an allowed connect.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import shutil
import socket
from ipaddress import IPv6Address

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nettools import scratch_ns
from strategies import dests, policies
from sockgraft.kernel import netns, nft
from sockgraft.model import bpfmaps
from sockgraft.model import graftconfig as gc
from sockgraft.model.nftpolicy import plan_ruleset
from sockgraft.model.policy import Policy, decide
from sockgraft.model.sockaddr import AF_INET, AF_INET6, InetAddr

pytestmark = pytest.mark.priv

MARK = 0x53470007
SO_MARK = getattr(socket, "SO_MARK", 36)
V4_LOCAL, V6_LOCAL = "198.18.5.1", "fd53:5447::1"
EXAMPLES = 40             # random policies per kernel property
CASES = st.lists(st.tuples(dests, st.sampled_from(["tcp", "udp"])), min_size=8, max_size=24)
SETTINGS = settings(max_examples=EXAMPLES, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


def _evaluable(dest: InetAddr) -> bool:
    """Connecting to the unspecified address means this host: the packet
    leaves with another destination. Everything else is sent as asked."""
    return not dest.unmapped().ip.is_unspecified


def _sock(dest: InetAddr, proto: str) -> socket.socket:
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(socket.AF_INET6 if dest.family == AF_INET6 else socket.AF_INET, kind)
    s.setblocking(False)
    return s


def _sockaddr(dest: InetAddr) -> tuple:
    return (str(dest.ip), dest.port) if dest.family == AF_INET else (str(dest.ip), dest.port, 0, 0)


# --- nftables ------------------------------------------------------------------------

PROBE_TABLE = "sgprobe"


def _probe_ruleset() -> str:
    sets, chains = [], []
    for kind, prio in (("seen", -200), ("passed", 200)):
        body = []
        for v, kw, typ in ((4, "ip", "ipv4_addr"), (6, "ip6", "ipv6_addr")):
            sets.append(f"  set {kind}{v} {{ type inet_proto . {typ} . inet_service; "
                        f"flags dynamic; size 65535; }}")
            body.append(f"    meta mark 0x{MARK:08x} meta nfproto ipv{v} meta l4proto "
                        f"{{ tcp, udp }} add @{kind}{v} {{ meta l4proto . {kw} daddr . "
                        f"th dport }}")
        chains.append(f"  chain {kind} {{\n    type filter hook output priority {prio}; "
                      f"policy accept;\n" + "\n".join(body) + "\n  }")
    return (f"add table inet {PROBE_TABLE}\ndelete table inet {PROBE_TABLE}\n"
            f"table inet {PROBE_TABLE} {{\n" + "\n".join(sets + chains) + "\n}\n")


def _set_elements(ns: str, name: str) -> set[tuple[str, str, int]]:
    out = json.loads(nft.run(ns, ["-j", "list", "set", "inet", PROBE_TABLE, name]))
    elems = set()
    for item in out["nftables"]:
        for e in item.get("set", {}).get("elem", []) or []:
            val = e["elem"]["val"] if isinstance(e, dict) and "elem" in e else e
            proto, addr, port = val["concat"]
            proto = {6: "tcp", 17: "udp"}.get(proto, proto)
            elems.add((proto, str(addr), int(port)))
    return elems


def _send_marked(cases: list[tuple[InetAddr, str]]) -> None:
    """Inside the namespace: one SYN or datagram per case."""
    for dest, proto in cases:
        with _sock(dest, proto) as s:
            s.setsockopt(socket.SOL_SOCKET, SO_MARK, MARK)
            try:
                if proto == "tcp":
                    s.connect_ex(_sockaddr(dest))
                else:
                    s.sendto(b"x", _sockaddr(dest))
            except OSError:
                pass        # refused by the rules or by the stack: the sets tell which


@pytest.fixture(scope="module")
def nft_ns():
    if not (shutil.which("nft") or os.path.exists("/usr/sbin/nft")):
        pytest.skip("needs the nft tool (apt-get install nftables)")
    with scratch_ns("sg-tprp", [V4_LOCAL], [V6_LOCAL], default_routes=True) as name:
        nft.apply(name, _probe_ruleset())
        yield name


NFT_TALLY = {"evaluated": 0, "skipped": 0}


@SETTINGS
@given(policy=policies, cases=CASES)
def test_nftables_rendering_gives_decides_verdict(nft_ns, policy, cases):
    cases = [(d, p) for d, p in cases if _evaluable(d)]
    nft.apply(nft_ns, plan_ruleset({MARK: policy}))
    for kind in ("seen", "passed"):
        for v in (4, 6):
            nft.run(nft_ns, ["flush", "set", "inet", PROBE_TABLE, f"{kind}{v}"])
    netns.run_in(nft_ns, _send_marked, cases)
    seen = _set_elements(nft_ns, "seen4") | _set_elements(nft_ns, "seen6")
    passed = _set_elements(nft_ns, "passed4") | _set_elements(nft_ns, "passed6")
    verdicts: dict[tuple, bool] = {}
    for dest, proto in cases:
        d = dest.unmapped()                  # a mapped destination leaves as IPv4
        key = (proto, str(d.ip), d.port)
        want = decide(policy, proto, d).allowed
        assert verdicts.setdefault(key, want) == want     # one key, one verdict
        if key not in seen:
            NFT_TALLY["skipped"] += 1
            continue
        NFT_TALLY["evaluated"] += 1
        assert (key in passed) == want, \
            f"{proto} {d}: nftables {'accepted' if key in passed else 'rejected'}, " \
            f"decide() {decide(policy, proto, d)}\npolicy: {policy}"


def test_nftables_sample_was_mostly_evaluated():
    """The property above judged real packets, not an empty sample."""
    total = NFT_TALLY["evaluated"] + NFT_TALLY["skipped"]
    if total == 0:
        pytest.skip("the nftables property did not run")
    print(f"nftables property: {NFT_TALLY}")
    assert NFT_TALLY["evaluated"] >= 0.8 * total, NFT_TALLY


# --- BPF -----------------------------------------------------------------------------

BPF_CFG = gc.load_config(f'''
container = "prop"
[endpoints.ep]
type = "ipv4"
addr = "{V4_LOCAL}"
port = "dynamic"
[endpoints.ep6]
type = "ipv6"
addr = "{V6_LOCAL}"
port = "dynamic"
[rules]
egress = ["0.0.0.0/0=ep", "[::/0]=ep6"]
''', "properties")


@pytest.fixture(scope="module")
def bpf_env():
    from sockgraft.errors import BpfUnavailable
    from sockgraft.kernel import bpf as kbpf
    name = "tprop-" + secrets.token_hex(3)
    progs = kbpf.Programs(name)
    try:
        progs.load(join=False)
    except BpfUnavailable as exc:
        pytest.fail(f"the graft programs do not load here: {exc}")
    outside = os.path.join(kbpf.cgroup2_mount(), "sockgraft", name + "-probe")
    os.makedirs(outside, exist_ok=True)
    try:
        progs.set_gen(MARK, 1)
        progs.attach()
        with scratch_ns("sg-tprb", [V4_LOCAL], [V6_LOCAL], default_routes=True) as ns:
            yield progs, ns, outside
    finally:
        progs.close()
        os.rmdir(outside)
        kbpf.remove(name)
    assert not kbpf.leftovers(name)


def _connect_tagged(progs, outside: str,
                    cases: list[tuple[InetAddr, str]]) -> list[tuple[int, int]]:
    """Inside the namespace, in a child: create and tag one socket per case in
    the programs' cgroup (as the agent creates grafted sockets), plus an
    untagged twin (the programs leave it alone: the kernel's own answer),
    move to another cgroup (the container's calls are judged, the agent's are
    not), connect each. Returns (errno of the tagged connect, errno of its
    twin) per case (0: connected or in progress)."""
    with open(os.path.join(progs.cgroup, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    socks = [(_sock(dest, proto), _sock(dest, proto)) for dest, proto in cases]
    for s, _ in socks:
        progs.tag(s.fileno(), MARK)
    with open(os.path.join(outside, "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
    out = []
    for (s, twin), (dest, _) in zip(socks, cases):
        got = []
        for sock in (s, twin):
            rc = sock.connect_ex(_sockaddr(dest))
            got.append(0 if rc in (0, errno.EINPROGRESS) else rc)
            sock.close()
        out.append(tuple(got))
    return out


def _judged(dest: InetAddr) -> str:
    """The address as a denial event names it (the judged, unmapped form)."""
    d = dest.unmapped()
    return f"{d.ip}:{d.port}" if d.family == AF_INET else f"[{d.ip}]:{d.port}"


@SETTINGS
@given(policy=policies, cases=CASES, socket_mode=st.booleans())
@example(policy=Policy((), (), False), socket_mode=False,     # found here: the kernel's
         cases=[(InetAddr(AF_INET6, IPv6Address("::ffff:127.255.255.255"), 0), "udp")])  # EACCES
def test_bpf_policy_map_gives_decides_verdict(bpf_env, policy, cases, socket_mode):
    progs, ns, outside = bpf_env
    cases = [(d, p) for d, p in cases if _evaluable(d)]
    if socket_mode:     # a socket-mode container's loopback is its private one
        cases = [(d, p) for d, p in cases if not d.unmapped().ip.is_loopback]
    entry = bpfmaps.policy_entry(policy, 1, socket_mode=socket_mode)
    cfg = gc.with_policy(BPF_CFG, policy)
    v4, v6, _ = bpfmaps.egress_entries(cfg, MARK, 1)
    for k, v in v4:
        progs.update("sg_egress4", k, v)
    for k, v in v6:
        progs.update("sg_egress6", k, v)
    progs.update("sg_policy", bpfmaps.policy_key(MARK), entry.value)
    progs.drain()
    errs = netns.run_in(ns, _connect_tagged, progs, outside, cases)
    events = [bpfmaps.decode_event(raw) for raw in progs.drain()]
    denials = iter(e for e in events if e.kind == bpfmaps.EV_DENY_POLICY)
    kept = iter(e for e in events if e.kind == bpfmaps.EV_DENY_KEPT)
    for (dest, proto), (err, kernel_err) in zip(cases, errs):
        want = decide(policy, proto, dest.unmapped())
        what = f"{proto} connect {dest}: {errno.errorcode.get(err, err)} (untagged: " \
               f"{errno.errorcode.get(kernel_err, kernel_err)}), decide() {want}\n" \
               f"policy: {policy}"
        if want.allowed and not socket_mode and dest.unmapped().ip.is_loopback:
            # a syscall-mode container's own loopback (the egress rule is
            # 0.0.0.0/0) stays in the container: a grafted socket is refused it
            assert err == errno.EACCES, what
            ev = next(kept, None)
            assert ev is not None and ev.address == _judged(dest), (what, ev)
            continue
        if want.allowed:
            # the kernel's own EACCES (a broadcast address without SO_BROADCAST)
            # is the only EACCES an allowed connect may meet
            assert err != errno.EACCES or kernel_err == errno.EACCES, what
            continue
        assert err == errno.EACCES, what
        ev = next(denials, None)        # events come in the order of the refusals
        assert ev is not None and ev.address == _judged(dest), (what, ev)
        assert entry.labels[ev.label] == want.rule, (ev, want)
        assert ev.op == "connect" and ev.proto == proto
    assert next(denials, None) is None, "a denial event without a refused connect"
    assert next(kept, None) is None, "a loopback refusal without a refused connect"
