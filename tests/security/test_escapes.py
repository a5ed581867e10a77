"""The adversarial suite: a process inside a grafted container, root there,
with Docker's default capabilities (CAP_NET_RAW among them) or with none,
tries every way we know to make its grafted sockets do more than its
configuration grants. Both graft modes, both families, through `sockgraft
run` and through runc with the profile `sockgraft oci-profile` writes.
Each attack asserts what the application is told *and* that nothing reached
what the policy protects (sentinel sockets on the host's loopback and
addresses, connection attempts against anything that might listen)."""

import contextlib
import errno
import json
import os
import signal
import socket
import subprocess
import time

import pytest

from grafting import read_json_line, steal_socket
from sentinel import Sentinel
from sockgraft.kernel import netns

pytestmark = pytest.mark.security

MARK_BASE = 0x53470000
OTHER_MARK = MARK_BASE | 0xFFFE          # another container's identity

CONFIG = """
container = "{c}"
graft_at = "{mode}"
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[endpoints.ep-out6]
type = "ipv6"
addr = "fd53:6700:0:1::1"
port = "dynamic"
[endpoints.ep-http]
type = "ipv4"
addr = "198.18.0.1"
port = {http_port}
[rules]
ingress = ["0.0.0.0:80=ep-http"]
egress = ["198.18.0.0/24=ep-out", "fd53:6700:0:1::/64=ep-out6"]
[policy]
deny = ["deny tcp 198.18.0.2 7399"]
"""

# per family: an allowed peer (TCP + UDP), the host's loopback, a host address
# no endpoint grants, the wildcard, the family's syscall-mode-untrapped lengths
FAM = {
    4: dict(sock_tcp="tcp4", sock_udp="udp4", peer="198.18.0.2", peer_node="h2",
            lo="127.0.0.1", lo_alt="127.0.0.1", host="198.19.1.1", any="0.0.0.0",
            hostaddr="198.18.0.1", lens=(20, 100)),
    6: dict(sock_tcp="tcp6", sock_udp="udp6", peer="fd53:6700:0:1::1", peer_node="h1",
            lo="::1", lo_alt="::ffff:127.0.0.1", host="fd53:6700:0:ffff::1", any="::",
            hostaddr="fd53:6700:0:ffff::1", lens=(24, 29, 32, 100)),
}


def ap(ip, port):
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def configure(g, container, mode, http_port=8081):
    g.configure(container, CONFIG.format(c=container, mode=mode, http_port=http_port))


def attack(g, container, mode, caps, *steps, timeout=60, options=()):
    opts = (["--graft-at", "socket"] if mode == "socket" else []) + list(options)
    rc, lines, err = g.run(container, [g.attack_bin, "--caps", caps, *map(str, steps)],
                           timeout=timeout, options=opts)
    assert lines and lines[-1] == {"done": True}, f"attack did not finish (rc {rc}): {err}"
    return lines[:-1]


def refused(step):
    return step["ret"] < 0


def nothing_listens(ns, ip, port):
    """A TCP connect from inside ns to ip:port finds no listener (or a dead one)."""
    def probe():
        fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
        s = socket.socket(fam, socket.SOCK_STREAM)
        s.settimeout(1.0)
        try:
            return s.connect_ex((ip, port))
        except OSError as exc:
            return exc.errno
        finally:
            s.close()
    return netns.run_in(ns, probe) != 0


@pytest.fixture(scope="module")
def sec(seclab, attack_bin):
    seclab.attack_bin = attack_bin
    return seclab


def _ops(steps, op):
    return [s for s in steps if s["op"] == op]


@pytest.mark.parametrize("caps", ["docker", "none"])
@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_a_grafted_socket_cannot_undo_its_isolation(sec, mode, fam, caps):
    """Marks, re-binds after a disconnect, untrapped address lengths, socket
    options, forged sources and marks in control messages, connects the
    agent never sees: every one refused, nothing arrives where the policy
    says no."""
    f = FAM[fam]
    configure(sec, "h1-c1", mode)
    h1, peer_ns = sec.plan.node("h1").netns, sec.plan.node(f["peer_node"]).netns
    udp_peer, tcp_peer, lo = ap(f["peer"], 7500), ap(f["peer"], 7501), ap(f["lo"], 7502)
    steps = [
        # a grafted UDP socket: change its identity, reach the host's loopback
        "sock", f["sock_udp"], "connect", udp_peer,
        "setopt", 1, 36, 0,                              # SO_MARK 0: "not grafted"
        "setopt", 1, 36, OTHER_MARK,                     # borrow another container's
        "send", lo, "send", ap(f["lo_alt"], 7502),
        "sendmark", 0, lo,                               # SO_MARK control message
        "sendmark", 0, udp_peer,
        "sendopts", udp_peer,                            # per-packet IP options
        "sendpktinfo", f["host"], udp_peer,              # a source no endpoint grants
        "setopt", 0 if fam == 4 else 41, 19 if fam == 4 else 75, 1,   # *_TRANSPARENT
        "setopt", 0 if fam == 4 else 41, 15 if fam == 4 else 78, 1,   # *_FREEBIND
        "setopt", 1, 25, 0,                              # SO_BINDTODEVICE
        "setopt", 0 if fam == 4 else 41, 4 if fam == 4 else 57, 0,    # source routing
        "setopt", 1, 52, 0,                              # SO_ATTACH_REUSEPORT_EBPF
        "setopt", 1, 5, 1,                               # SO_DONTROUTE: past host routes
        "setopt", 1, 73, 1 << 20,                        # SO_RESERVE_MEM: agent's memcg
        "setopt", 0, 51, 7504 | 7504 << 16,              # IP_LOCAL_PORT_RANGE: pick a port
        # disconnect, then bind host addresses
        "disconnect",
        "bind", lo, "bind", ap(f["any"], 7503), "bind", ap(f["lo_alt"], 7503),
        "bind", ap(f["host"], 7503), "bind", ap(f["any"], 7503), f["lens"][0],
        # a grafted TCP socket: the same after a disconnect, plus listen()
        "sock", f["sock_tcp"], "connect", tcp_peer,
        "setopt", 1, 36, 0,
        # upper-layer protocols: only kTLS keeps the connection a TCP one
        "setulp", "smc", "setulp", "espintcp", "setulp", "tls",
        "setulp", "tls", 4097,                  # past a page: the kernel reads it again
        "disconnect",
        "bind", ap(f["lo"], 7504), "bind", ap(f["any"], 7504), f["lens"][-1],
        "bindhi", ap(f["host"], 7504),
        "listen",
        "connect", lo, f["lens"][0],                      # a length nobody traps
        "tfo", lo,                                        # TCP fast open
        # a fresh socket binding a host address with every length
        "sock", f["sock_tcp"],
        *[x for n in f["lens"] for x in ("bind", ap(f["hostaddr"], 7505), n)],
        "bindhi", ap(f["hostaddr"], 7505),
    ]
    with Sentinel(h1, f["lo"], 7502, "udp") as lo_udp, \
            Sentinel(h1, f["lo"], 7502, "tcp") as lo_tcp, \
            Sentinel(peer_ns, f["peer"], 7500, "udp") as peer_udp, \
            Sentinel(peer_ns, f["peer"], 7501, "tcp"):
        t0 = time.monotonic()
        out = attack(sec, "h1-c1", mode, caps, *steps)
        elapsed = time.monotonic() - t0
    by = {(s["op"], s["arg"]): s for s in out}
    # the grafted sockets were made (the attack starts from what is granted)
    assert [s["ret"] for s in _ops(out, "connect")][:2] == [0, 0], json.dumps(out[:4])
    for s in _ops(out, "setopt"):
        assert s["errno"] == "EPERM", s
    ulp = [(s["arg"], s["errno"]) for s in _ops(out, "setulp")]
    assert ulp[0][1] == ulp[1][1] == ulp[3][1] == "EPERM", ulp      # smc, espintcp, long
    assert ulp[2][1] != "EPERM", ulp          # tls (ENOENT where tls is not built)
    # socket mode: the container's loopback is its own (a private address on
    # the host, issue 14 item 3): a send or a bind there is allowed and goes
    # there - the sentinels on the host's loopback below prove it went no further
    private_lo = mode == "socket"
    lo_sends = {lo, ap(f["lo_alt"], 7502)}
    if not private_lo:
        assert by[("send", lo)]["errno"] in ("EPERM", "EACCES")
    for s in _ops(out, "send") + _ops(out, "sendmark") + _ops(out, "sendopts"):
        if private_lo and s["op"] == "send" and s["arg"] in lo_sends:
            continue
        assert refused(s), s       # ([::ffff:127.0.0.1] from a v6-bound socket: ENETUNREACH)
    # a forged source is refused, or the kernel sent from the bound endpoint
    pkt = _ops(out, "sendpktinfo")[0]
    assert pkt["errno"] == "EPERM" or pkt["ret"] == 1, pkt
    for s in _ops(out, "bind") + _ops(out, "bindhi"):
        assert s["errno"] == "EACCES", s             # (a grafted socket never re-binds)
    assert _ops(out, "listen")[0]["errno"] == "EACCES"
    for op in ("connect", "tfo"):                    # nothing listens on its private lo
        assert by[(op, lo)]["errno"] in (("ECONNREFUSED",) if private_lo else
                                         ("EPERM", "EACCES")), by[(op, lo)]
    assert elapsed < 20, f"a refusal hung ({elapsed:.1f} s): a dropped SYN is not a refusal"
    assert lo_udp.received == [] and lo_tcp.received == [], "reached the host's loopback"
    endpoint = "198.18.0.1" if fam == 4 else "fd53:6700:0:1::1"
    assert set(peer_udp.received) <= {endpoint}, f"forged sources: {peer_udp.received}"
    assert len(peer_udp.received) <= 1         # the marked datagram never left
    for port in (7503, 7504, 7505):
        assert nothing_listens(h1, f["lo"], port)
        assert nothing_listens(sec.plan.node("h2").netns, "198.18.0.1", port)
    kernel = [a for a in sec.audit("h1") if a.get("by") == "kernel" and
              a["container"] == "h1-c1"]
    assert any(a["rule"] == "sockopt:refused" and a["address"] == "SO_MARK" for a in kernel)
    assert any(a["rule"] == "sockopt:refused" and a["address"] == "TCP_ULP" for a in kernel)


@pytest.mark.parametrize("fam", [4, 6])
def test_a_grafted_socket_never_reaches_the_hosts_loopback_by_the_policy(sec, fam):
    """Syscall mode: a policy that opens a loopback port (for the container's
    own sidecar) never opens the host's - also not for a socket that is
    grafted already (bound through an ingress rule, or connected, then
    disconnected), whose connect the agent makes itself (the kernel's
    loopback guard never sees it)."""
    f = FAM[fam]
    lo = ap(f["lo"], 7506)
    sec.configure("h1-c1", CONFIG.format(c="h1-c1", mode="syscall", http_port=8081).replace(
        '[policy]\n', f'[policy]\nallow = ["allow tcp {"[::1]" if fam == 6 else "127.0.0.1"} '
                      f'7506", "allow tcp {f["peer"]}"]\n'))
    h1 = sec.plan.node("h1").netns
    steps = ["sock", f["sock_tcp"], "bind", ap(f["any"], 80), "connect", lo,
             "sock", f["sock_tcp"], "connect", ap(f["peer"], 7507), "disconnect",
             "connect", lo]
    with Sentinel(h1, f["lo"], 7506, "tcp") as lo_tcp, \
            Sentinel(sec.plan.node(f["peer_node"]).netns, f["peer"], 7507, "tcp"):
        out = attack(sec, "h1-c1", "syscall", "docker", *steps)
    by = [(s["op"], s["arg"], s["ret"], s.get("errno")) for s in out]
    assert [s["ret"] for s in out if s["op"] in ("bind", "disconnect")] == [0, 0], by
    assert [s["ret"] for s in out if s["arg"] == ap(f["peer"], 7507)] == [0], by
    assert [s["errno"] for s in out if s["op"] == "connect" and s["arg"] == lo] == \
        ["EACCES", "EACCES"], by
    assert lo_tcp.received == [], "reached the host's loopback"


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("caps", ["docker", "none"])
def test_socket_mode_binds_and_listens_only_through_ingress_rules(sec, fam, caps):
    """Socket mode, where every inet socket is a host socket from birth:
    untrapped address lengths, the high word of the length register, the
    ephemeral wildcard bind followed by listen()."""
    f = FAM[fam]
    configure(sec, "h1-c1", "socket")
    steps = ["sock", f["sock_tcp"]]
    for n in f["lens"]:
        steps += ["bind", ap(f["any"], 7510), n]
    steps += ["bindhi", ap(f["any"], 7510), "listen",
              "sock", f["sock_udp"], "bind", ap(f["any"], 7511), f["lens"][0],
              "bind", ap(f["lo"], 7511), f["lens"][-1],
              "sock", f["sock_tcp"], "bind", ap(f["any"], 0), "listen", "name",
              # the ingress rule is IPv4's: a v6 socket uses the mapped wildcard
              "sock", f["sock_tcp"], "bind", ap(f["any"] if fam == 4 else "::ffff:0.0.0.0", 80),
              "listen", "name"]
    out = attack(sec, "h1-c1", "socket", caps, *steps)
    binds = [s for s in out if s["op"] in ("bind", "bindhi")]
    # loopback is the container's own: bound on its private loopback address
    want = ["0" if s["arg"].endswith((":0", ":80")) or s["arg"] == ap(f["lo"], 7511)
            else "EACCES" for s in binds]
    assert [s["errno"] for s in binds] == want and want.count("0") == 3, out
    listens = _ops(out, "listen")
    assert [s["errno"] for s in listens] == ["EACCES", "EACCES", "0"], out
    names = _ops(out, "name")
    assert names[0]["local"][1] == 0          # the wildcard bind bound nothing on the host
    assert names[1]["local"][1] == 8081       # the ingress rule's endpoint did
    for port in (7510, 7511):
        assert nothing_listens(sec.plan.node("h2").netns, "198.18.0.1", port)
        assert nothing_listens(sec.plan.node("h1").netns, "127.0.0.1", port)


def test_reuseport_never_joins_another_containers_port(sec):
    """Every host socket is made by the same root agent, so the kernel's
    same-owner check for SO_REUSEPORT would pass: each container's sockets
    have their own owner uid. A container cannot bind another's endpoint,
    and even an endpoint granted to two containers is not shared."""
    configure(sec, "h1-c2", "syscall", http_port=8090)
    victim = sec.spawn("h1-c2", [sec.attack_bin, "--caps", "docker", "sock", "tcp4",
                                 "setopt", "1", "15", "1", "bind", "0.0.0.0:80", "listen",
                                 # keeps the listener a while after the connection
                                 # arrived: closing it at once would reset it
                                 "acceptwait", "90", "sleep", "10"])
    for _ in range(4):                              # sock, setopt, bind, listen
        assert read_json_line(victim)["errno"] == "0"
    configure(sec, "h1-c1", "socket")
    out = attack(sec, "h1-c1", "socket", "docker", "sock", "tcp4", "setopt", 1, 15, 1,
                 "bind", "198.18.0.1:8090", "bind", "198.18.0.1:8090", 20, "listen")
    assert [s["errno"] for s in out[1:]] == ["0", "EACCES", "EACCES", "EACCES"], out
    # the operator granted the same host port to both: still not shared
    configure(sec, "h1-c1", "socket", http_port=8090)
    out = attack(sec, "h1-c1", "socket", "docker", "sock", "tcp4", "setopt", 1, 15, 1,
                 "bind", "0.0.0.0:80", "listen")
    assert out[2]["errno"] == "EADDRINUSE", out
    # the victim still gets its connections
    assert netns.run_in(sec.plan.node("h2").netns, _connect, "198.18.0.1", 8090) == 0
    assert read_json_line(victim)["accepted"] is True
    os.killpg(victim.pid, signal.SIGKILL)


def _connect(ip, port):
    s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET)
    s.settimeout(2)
    try:
        return s.connect_ex((ip, port))
    finally:
        s.close()


RACE = """
container = "h1-c1"
graft_at = "syscall"
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[endpoints.ep-out6]
type = "ipv6"
addr = "fd53:6700:0:1::1"
port = "dynamic"
[rules]
egress = ["0.0.0.0/0=ep-out", "::/0=ep-out6"]
[policy]
allow = ["allow any {peer}", "allow any {lo} 7502"]
"""


@pytest.fixture(params=["native", "python"])
def answer(request, sec):
    """The h1 agent's syscall-mode connect()s answered by the native loop or
    by the Python grafter (the control op applies to later sessions)."""
    sec.set_native("h1", request.param == "native")
    yield request.param
    sec.set_native("h1", True)


@pytest.mark.parametrize("fam", [4, 6])
def test_an_address_changed_after_the_agents_read_reaches_nothing_more(sec, fam, answer):
    """Syscall mode grafts at connect() and sendto() and lets the kernel go
    on with the call, which reads the address again. A second thread keeps
    switching the address between an allowed peer (grafted) and the
    container's own loopback port the policy allows (which the agent keeps in
    the container: a broad egress rule never moves loopback to the host). A
    grafted socket that reaches the host's loopback port would be an escape;
    the kernel guard refuses it (loopback:container-own)."""
    f = FAM[fam]
    sec.configure("h1-c1", RACE.format(peer=f["peer"], lo=f["lo"]))
    h1, peer_ns = sec.plan.node("h1").netns, sec.plan.node(f["peer_node"]).netns
    before = len(sec.audit("h1"))
    peer, lo = ap(f["peer"], 7501), ap(f["lo"], 7502)
    with Sentinel(h1, f["lo"], 7502, "udp") as lo_udp, \
            Sentinel(h1, f["lo"], 7502, "tcp") as lo_tcp, \
            Sentinel(peer_ns, f["peer"], 7501, "tcp"):
        out = attack(sec, "h1-c1", "syscall", "docker", "race", "tcp", 400, peer, lo,
                     "race", "udp", 400, ap(f["peer"], 7500), lo, timeout=120,
                     options=["--udp-sendto"])
    tcp, udp = out
    assert tcp["ok"] > 0 and udp["ok"] > 0, out          # the allowed peer was reached
    assert lo_tcp.received == [] and lo_udp.received == [], "reached the host's loopback"
    # what the kernel refused (the agent read the peer, the kernel the loopback
    # port): EACCES; the container's own loopback answers ECONNREFUSED
    assert set(tcp["errnos"]) <= {"EACCES", "ECONNREFUSED"}, tcp
    assert set(udp["errnos"]) <= {"EACCES"}, udp      # (a datagram to its own lo is sent)
    assert tcp["errnos"].get("EACCES") and udp["errnos"].get("EACCES"), \
        f"the race never reached the kernel guard ({out}): the test proves nothing"
    time.sleep(2.5)                                      # the agent flushes once a second
    assert any(a["container"] == "h1-c1" and a.get("by") == "kernel" and
               a["rule"] == "loopback:container-own" for a in sec.audit("h1")[before:])


@pytest.mark.parametrize("kind", ["mptcp", "udplite"])
def test_other_protocols_of_the_same_types_are_never_grafted(sec, kind, answer):
    """An MPTCP socket is a SOCK_STREAM and a UDP-Lite one a SOCK_DGRAM, but
    the host's guards judge TCP and UDP only (an MPTCP connect runs on a
    subflow the tag is not on; UDP-Lite has no connect hook): grafted, the
    kernel would connect them wherever the buffer says by then. They stay the
    container's own - the same address race as above reaches nothing on the
    host, the native loop and the Python grafter alike."""
    f = FAM[4]
    sec.configure("h1-c1", RACE.format(peer=f["peer"], lo=f["lo"]))
    h1 = sec.plan.node("h1").netns
    udp = kind == "udplite"
    with Sentinel(h1, f["lo"], 7502, "udplite" if udp else "tcp") as lo:
        (out,) = attack(sec, "h1-c1", "syscall", "docker", "race", kind, 200,
                        ap(f["peer"], 7501), ap(f["lo"], 7502), timeout=120,
                        options=["--udp-sendto"] if udp else [])
    assert out["ok"] + out["failed"] == 200, out
    assert lo.received == [], f"reached the host's loopback: {out}"


@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_a_flood_of_denials_cannot_fill_the_disk(sec, mode):
    """Denied connects in a loop: the audit trail takes a bounded number of
    lines per second per container and says how many it suppressed."""
    configure(sec, "h1-c1", mode)
    before = len(sec.audit("h1"))
    t0 = time.monotonic()
    out = attack(sec, "h1-c1", mode, "docker", "loop", 3000, "198.18.0.2:7399", timeout=120)
    elapsed = time.monotonic() - t0
    assert out[0]["failed"] == 3000
    time.sleep(2.5)                                  # the agent flushes once a second
    lines = [a for a in sec.audit("h1")[before:] if a["container"] == "h1-c1"]
    denials = [a for a in lines if a["verdict"] == "deny"]
    suppressed = sum(a["count"] for a in lines if a["verdict"] == "suppressed")
    assert len(denials) <= 50 + 10 * (elapsed + 3), (len(denials), elapsed)
    assert suppressed >= 3000 - len(denials) - 10
    stats = json.loads(sec.sg("stats", "--json", "--agent", sec.agent_socket("h1")).stdout)
    assert next(iter(stats.values()))["audit_suppressed"] >= suppressed


def test_a_grafted_socket_passed_out_of_the_filter_stays_confined(sec):
    """A grafted socket handed to a process outside the seccomp filter (over
    a unix socket, to another container, to the host): nothing the agent
    judged is left to the filter - the kernel guards hold it to the same
    configuration, whoever calls. The test process itself plays that process
    (pidfd_getfd, like SCM_RIGHTS)."""
    configure(sec, "h1-c1", "socket")
    p = sec.spawn("h1-c1", [sec.attack_bin, "sock", "tcp4", "sleep", "30"],
                  options=["--graft-at", "socket"])
    s = steal_socket(p, read_json_line(p)["ret"])
    with s:
        with pytest.raises(OSError) as e:
            s.setsockopt(socket.SOL_SOCKET, 36, 0)          # SO_MARK
        assert e.value.errno == errno.EPERM
        for addr in (("127.0.0.1", 7520), ("0.0.0.0", 7520), ("198.18.0.1", 7520)):
            with pytest.raises(OSError) as e:
                s.bind(addr)
            assert e.value.errno == errno.EACCES
        s.listen(4)                          # not filtered here: the kernel autobinds...
        port = s.getsockname()[1]
        assert port != 0
        # ...but the listener was never granted: it receives nothing
        assert nothing_listens(sec.plan.node("h2").netns, "198.18.0.1", port)
        assert nothing_listens(sec.plan.node("h1").netns, "127.0.0.1", port)
    kernel = [a for a in sec.audit("h1") if a.get("by") == "kernel"]
    assert any(a["rule"] == "listen:no-endpoint" for a in kernel)


# --- through a real OCI runtime ---------------------------------------------------

@pytest.fixture(scope="module")
def runc_envs(sec, tmp_path_factory):
    from runtime import RuncEnv
    envs = {}
    try:
        for mode in ("syscall", "socket"):
            tmp = tmp_path_factory.mktemp(f"runc-{mode}")
            envs[mode] = RuncEnv(sec, tmp, graft_at=mode, extra_files={"attack": sec.attack_bin})
        yield envs
    finally:
        for env in envs.values():
            env.close()


RUNC_ANN = {"sockgraft/endpoints": "ep-out=ipv4:198.18.0.1:dynamic,"
                                    "ep-out6=ipv6:[fd53:6700:0:1::1]:dynamic,"
                                    "ep-http=ipv4:198.18.0.1:8081",
            "sockgraft/egress": "198.18.0.0/24=ep-out,fd53:6700:0:1::/64=ep-out6",
            "sockgraft/ingress": "0.0.0.0:80=ep-http",
            "sockgraft/policy": "deny tcp 198.18.0.2 7399;deny tcp fd53:6700:0:1::1 7399"}


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("caps", ["docker", "none"])
@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_runc_containers_cannot_undo_their_isolation(sec, runc_envs, mode, caps, fam):
    """The same classes in containers started by runc with the profile
    `sockgraft oci-profile` writes: the marks, the re-binds, the untrapped
    and high-word lengths, and socket() with a high word in the family
    register (the profile's comparisons are masked to the low 32 bits)."""
    from runtime import DOCKER_CAPS
    f = FAM[fam]
    env = runc_envs[mode]
    cid = f"atk-{mode[:4]}-{caps}-{fam}"
    h1 = sec.plan.node("h1").netns
    peer_ns = sec.plan.node(f["peer_node"]).netns
    lo = ap(f["lo"], 7502)
    steps = ["sock", f["sock_udp"], "connect", ap(f["peer"], 7500), "setopt", 1, 36, 0,
             "send", lo, "sendmark", 0, lo,
             "disconnect", "bind", ap(f["lo"], 7503),
             "sock", f["sock_tcp"], "connect", ap(f["peer"], 7501), "disconnect",
             "bind", ap(f["lo"], 7504), f["lens"][0], "listen",
             "sock", f["sock_tcp"], "bindhi", ap(f["hostaddr"], 7505),
             "bind", ap(f["hostaddr"], 7505), f["lens"][-1]]
    if mode == "socket":    # socket() with a high word in the family register
        famnum = 2 if fam == 4 else 10
        steps += ["sockhi", famnum, "connect", ap(f["peer"], 7399), "sockhi", famnum,
                  "connect", lo]
    else:
        steps += ["sock", f["sock_tcp"], "connect", ap(f["peer"], 7399)]
    ann = dict(RUNC_ANN, **({"sockgraft/graft-at": "socket"} if mode == "socket" else {}))
    with Sentinel(h1, f["lo"], 7502, "udp") as lo_udp, \
            Sentinel(h1, f["lo"], 7502, "tcp") as lo_tcp, \
            Sentinel(peer_ns, f["peer"], 7501, "tcp"), \
            Sentinel(peer_ns, f["peer"], 7399, "tcp") as denied:
        env.start(cid, ["/bin/attack", "--caps", "keep", *map(str, steps)], ann,
                  caps=DOCKER_CAPS if caps == "docker" else [])
        deadline = time.monotonic() + 30
        while '"done": true' not in env.output(cid):
            assert time.monotonic() < deadline, env.output(cid)
            time.sleep(0.1)
    out = [json.loads(line) for line in env.output(cid).splitlines()
           if line.startswith("{") and "op" in line]
    env.stop(cid)
    assert [s["ret"] for s in _ops(out, "connect")][:2] == [0, 0], json.dumps(out)
    assert _ops(out, "setopt")[0]["errno"] == "EPERM"
    private_lo = mode == "socket"    # its loopback is its own: sends there are allowed
    for s in _ops(out, "send") + _ops(out, "sendmark"):
        if private_lo and s["op"] == "send":
            continue
        assert s["errno"] in ("EPERM", "EACCES"), s
    for s in _ops(out, "bind") + _ops(out, "bindhi"):
        assert s["errno"] == "EACCES", s
    assert _ops(out, "listen")[0]["errno"] == "EACCES"
    hi = _ops(out, "connect")[2:]
    assert hi and all(s["errno"] in ("EPERM", "EACCES") or
                      (private_lo and s["arg"] == lo and s["errno"] == "ECONNREFUSED")
                      for s in hi), hi
    assert lo_udp.received == [] and lo_tcp.received == [] and denied.received == []
    for port in (7503, 7504, 7505):
        assert nothing_listens(h1, f["lo"], port)
        assert nothing_listens(sec.plan.node("h2").netns, "198.18.0.1", port)


def test_a_compat_setsockopt_never_passes_the_guard(sec, tmp_path):
    """The kernel never runs the cgroup setsockopt program for a compat
    (i386, x32) setsockopt: under a base profile that lists the compat ABIs
    (Docker's default does), a grafted socket's SO_MARK changed through
    int 0x80. The merged profile lists the native ABI only: the compat call
    never reaches the kernel's socket code."""
    from runtime import DOCKER_CAPS, RuncEnv
    base = tmp_path / "docker-like.json"
    base.write_text(json.dumps({"defaultAction": "SCMP_ACT_ALLOW",
                                "architectures": ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86",
                                                  "SCMP_ARCH_X32"], "syscalls": []}))
    env = RuncEnv(sec, tmp_path / "runc", graft_at="syscall",
                  extra_files={"attack": sec.attack_bin}, profile_args=("--base", str(base)))
    try:
        assert env.profile["architectures"] == ["SCMP_ARCH_X86_64"]
        steps = ["sock", "tcp4", "connect", "198.18.0.2:7508",
                 "setopt", 1, 36, 0, "setopt32", 1, 36, 0, "setopt32", 1, 25, 0]
        with Sentinel(sec.plan.node("h2").netns, "198.18.0.2", 7508, "tcp"):
            env.start("atk-compat", ["/bin/attack", "--caps", "keep", *map(str, steps)],
                      RUNC_ANN, caps=DOCKER_CAPS)
            deadline = time.monotonic() + 30
            while '"done": true' not in env.output("atk-compat"):
                assert time.monotonic() < deadline, env.output("atk-compat")
                time.sleep(0.1)
        out = [json.loads(line) for line in env.output("atk-compat").splitlines()
               if line.startswith("{") and "op" in line]
        env.stop("atk-compat")
    finally:
        env.close()
    assert _ops(out, "connect")[0]["ret"] == 0, out
    assert _ops(out, "setopt")[0]["errno"] == "EPERM", out
    for s in _ops(out, "setopt32"):
        # runc kills a thread of an ABI its filter does not list: SIGSYS (not
        # an ENOSYS or a SIGSEGV of a kernel without IA32 emulation)
        assert s["ret"] < 0 and s.get("signal") == 31, s



class _CpuCgroup:
    """A CPU cgroup of the test's own, as a runtime gives each container:
    its threads compete for CPU with each other first."""

    V1, V2 = "/sys/fs/cgroup/cpu", "/sys/fs/cgroup/unified"

    def __init__(self):
        root = self.V1 if os.path.exists(os.path.join(self.V1, "cpu.shares")) else self.V2
        self.root, self.path = root, os.path.join(root, f"sg-test-{os.getpid()}")
        os.mkdir(self.path)

    def add(self, pid, path=None):
        with open(os.path.join(path or self.path, "cgroup.procs"), "w") as f:
            f.write(str(pid))

    def close(self):
        with open(os.path.join(self.path, "cgroup.procs")) as f:
            for pid in f.read().split():
                try:
                    self.add(pid, self.root)
                except OSError:
                    pass
        os.rmdir(self.path)


@contextlib.contextmanager
def _slow_attacker(sec, seconds, spinners, bind_seconds):
    """h1-c1's attacker in a CPU cgroup of its own: `spinners` threads per
    CPU for `seconds`, then a SCHED_IDLE thread binding 0.0.0.0:80 for
    `bind_seconds` (each bind waits for that thread to run)."""
    cgroup = _CpuCgroup()
    attacker = sec.spawn("h1-c1", [sec.attack_bin, "--caps", "docker", "hog", seconds,
                                   spinners, "idle", "bindfor", bind_seconds, "0.0.0.0:80"])
    try:
        cgroup.add(attacker.pid)         # (before it starts the attack binary)
        assert read_json_line(attacker, timeout=20)["ret"] == 0        # hog
        assert read_json_line(attacker, timeout=20)["ret"] == 0        # idle
        yield attacker
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait(timeout=10)
        cgroup.close()


def test_a_container_slow_to_run_never_slows_another_containers_calls(sec):
    """ADDFD returns once the target has taken the fd, i.e. once it has run.
    A container whose trapped thread is slow to be scheduled (here: its own
    SCHED_IDLE thread beside spinning threads of its own on every CPU, in its
    own CPU cgroup - what any container may do) makes each of its grafted binds wait for that
    thread - and that wait must be its own: another container's binds,
    answered by the same agent at the same time, stay fast. (The wait used
    to hold the agent's loop lock.)"""
    configure(sec, "h1-c1", "syscall")
    configure(sec, "h1-c2", "syscall", http_port=8082)
    with _slow_attacker(sec, "9", "16", "7") as attacker:
        time.sleep(1.5)                 # its binds wait for its idle thread by now
        victim = _ops(attack(sec, "h1-c2", "syscall", "docker",
                             "bindfor", "3", "0.0.0.0:80"), "bindfor")[0]
        mine = read_json_line(attacker, timeout=30)
    assert mine["op"] == "bindfor" and mine["binds"] > 0 and mine["failed"] == 0, mine
    assert mine["worst_ms"] > 300, f"the attacker's binds were never slow: {mine}"
    assert victim["binds"] > 20 and victim["failed"] == 0, victim
    assert victim["worst_ms"] < 200, f"another container's wait slowed these binds: {victim}"


def _connects(ns, addr, port, n, timeout=0.2):
    """n TCP connects from namespace ns: how many were accepted."""
    def run():
        ok = 0
        for _ in range(n):
            s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
            s.settimeout(timeout)
            try:
                s.connect((addr, port))
                ok += 1
            except OSError:
                pass
            finally:
                s.close()
            time.sleep(0.02)
        return ok
    return netns.run_in(ns, run, timeout=n * (timeout + 0.1) + 10)


@pytest.mark.parametrize("restore", [False, True])
def test_a_grafted_socket_joins_no_hosts_reuseport_group(sec, restore):
    """The kernel lets a socket into an SO_REUSEPORT group of sockets with
    the same owner (sk_uid); a grafted socket's owner is its container's
    socket uid, but fchown() on the fd (CAP_CHOWN, which Docker keeps)
    rewrites it. A container that makes its socket root's before the agent
    binds and listens it joins a root service's group on the same address
    and port, and would take a share of its connections - also after it
    puts the owner back. Its socket gets none of them."""
    # its own port: the service's closed connections leave TIME_WAIT sockets
    # on it, which later tests' binds of ep-http (8081) would meet
    configure(sec, "h1-c1", "socket", http_port=8083)
    h1, h2 = sec.plan.node("h1").netns, sec.plan.node("h2").netns
    steps = ["sock", "tcp4", "setopt", 1, 15, 1,           # SO_REUSEPORT
             "chown", 0, "bind", "0.0.0.0:80", "listen",    # ep-http: 198.18.0.1:8083
             *(["chown", "mark"] if restore else []), "acceptwait", 6]
    import threading
    res = {}
    with Sentinel(h1, "198.18.0.1", 8083, "tcp", reuseport=True) as service:
        t = threading.Timer(2.0, lambda: res.update(ok=_connects(h2, "198.18.0.1", 8083, 40)))
        t.start()
        out = attack(sec, "h1-c1", "socket", "docker", *steps)
        t.join()
    by = {s["op"]: s for s in out}
    assert by["bind"]["ret"] == 0 and by["listen"]["ret"] == 0, out   # it joined the group
    assert by["acceptwait"]["accepted"] is False, "the container took a service's connection"
    assert len(service.received) == res["ok"] > 0, (service.received, res)
    kernel = [a for a in sec.audit("h1") if a.get("by") == "kernel" and
              a["container"] == "h1-c1"]
    assert any(a["rule"] == ("reuseport:foreign-group" if restore else "owner:changed")
               for a in kernel), kernel[-5:]


@pytest.mark.parametrize("fam", [4, 6])
@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_a_grafted_socket_picks_no_host_traffic_class(sec, mode, fam):
    """SO_PRIORITY above 6 (TC_PRIO_INTERACTIVE) needs CAP_NET_RAW in the
    socket's namespace: a container's root (Docker keeps it, no user
    namespace) sets it on its own socket - where it stays on its veth - but
    on a grafted socket it would choose the host's egress traffic class (a
    pfifo_fast band, an HTB class by handle). Refused as an option and as a
    control message; a syscall-mode socket's own priority is not carried
    over to the host socket; 0..6 stay the application's."""
    f = FAM[fam]
    configure(sec, "h1-c1", mode)
    peer_ns = sec.plan.node(f["peer_node"]).netns
    peer = ap(f["peer"], 7506)
    steps = ["sock", f["sock_udp"],
             "setopt", 1, 12, 7,                 # syscall mode: still its own socket
             "connect", peer, "getopt", 1, 12,   # grafted: the host socket's priority
             "setopt", 1, 12, 6, "setopt", 1, 12, 7, "setopt", 1, 12, -1,
             "setopt", 1, 12, 0x10001,           # an HTB class handle 1:1
             "sendprio", 7, peer, "sendprio", 0x10001, peer, "sendprio", 5, peer, "sendc"]
    with Sentinel(peer_ns, f["peer"], 7506, "udp") as sentinel:
        out = attack(sec, "h1-c1", mode, "docker", *steps)
    sets = [(s["arg"], s["ret"], s["errno"]) for s in _ops(out, "setopt")]
    assert _ops(out, "connect")[0]["ret"] == 0, out
    # its own socket took 7 (syscall mode); a host socket never did
    assert sets[0][1] == (0 if mode == "syscall" else -1), sets
    assert _ops(out, "getopt")[0]["value"] == 0, out       # not carried over
    assert sets[1][1] == 0, sets                            # 6: anybody's
    assert [s[2] for s in sets[2:]] == ["EPERM"] * 3, sets
    sends = _ops(out, "sendprio") + _ops(out, "sendc")
    assert [s["errno"] for s in sends[:2]] == ["EPERM", "EPERM"], sends
    assert [s["ret"] for s in sends[2:]] == [1, 1], sends
    # the two refused datagrams never left (the egress guard drops them
    # before the device's queue: cgroup egress runs in ip_finish_output)
    assert len(sentinel.received) == 2, sentinel.received
    kernel = [a for a in sec.audit("h1") if a.get("by") == "kernel" and
              a["container"] == "h1-c1"]
    assert any(a["rule"] == "sockopt:refused" and a["address"] == "SO_PRIORITY"
               for a in kernel), kernel[-5:]
    assert any(a["rule"] == "priority:refused" for a in kernel), kernel[-5:]


def test_a_forged_request_never_opens_a_reply_path_the_policy_denies(sec):
    """A container forges, from its own network stack (a raw socket: Docker
    keeps CAP_NET_RAW), a datagram "from" a destination its policy denies to
    its grafted UDP socket's host address and port. The host's conntrack
    would take it as a request and the grafted socket's datagram to that
    destination as its reply (established: accepted before any container's
    policy). The node drops packets to its own addresses whose source does
    not route back through the interface they came in on: the forged one
    never arrives, the datagram is judged by the policy and refused."""
    denied = 7398
    sec.configure("h1-c1", CONFIG.format(c="h1-c1", mode="syscall", http_port=8081).replace(
        'deny = ["deny tcp 198.18.0.2 7399"]',
        f'deny = ["deny tcp 198.18.0.2 7399", "deny udp 198.18.0.2 {denied}"]'))
    peer_ns = sec.plan.node("h2").netns
    with Sentinel(peer_ns, "198.18.0.2", 7501, "udp"), \
            Sentinel(peer_ns, "198.18.0.2", denied, "udp") as sentinel:
        out = attack(sec, "h1-c1", "syscall", "docker", "sock", "udp4",
                     "connect", "198.18.0.2:7501", "name", "send", f"198.18.0.2:{denied}",
                     "spoofto", f"198.18.0.2:{denied}", "sleep", "0.5",
                     "send", f"198.18.0.2:{denied}", "sleep", "0.5")
    assert _ops(out, "name")[0]["local"][0] == "198.18.0.1", out      # grafted
    assert _ops(out, "spoofto")[0]["ret"] == 0, out                   # sent, at least
    first, second = _ops(out, "send")
    assert first["errno"] in ("EPERM", "EACCES"), out                 # the policy
    assert second["errno"] in ("EPERM", "EACCES"), out                # still the policy
    assert sentinel.received == []


def test_this_host_is_the_containers_own_loopback_in_socket_mode(sec):
    """connect() to 0.0.0.0 / :: means "this host": after the hook the kernel
    connects it to 127.0.0.1 / ::1 - the host's loopback, for a grafted
    socket. Without the built-in denies (which refuse the unspecified
    address), the socket-mode guard sends it to the container's private
    loopback like any loopback address: the host's services on loopback are
    never reached."""
    h1 = sec.plan.node("h1").netns
    sec.configure("h1-c1", CONFIG.format(c="h1-c1", mode="socket", http_port=8081).replace(
        "[policy]\n", "[policy]\nbuiltin_denies = false\n").replace(
        'egress = ["198.18.0.0/24=ep-out", "fd53:6700:0:1::/64=ep-out6"]',
        'egress = ["0.0.0.0/0=ep-out", "::/0=ep-out6"]'))     # everywhere, by any rule
    with Sentinel(h1, "127.0.0.1", 7520, "tcp") as lo4, \
            Sentinel(h1, "::1", 7520, "tcp") as lo6:
        out = attack(sec, "h1-c1", "socket", "docker", "sock", "tcp4", "connect",
                     "0.0.0.0:7520", "sock", "tcp6", "connect", "[::]:7520",
                     "sock", "tcp6", "connect", "[::ffff:0.0.0.0]:7520")
    for step in _ops(out, "connect"):
        assert step["errno"] == "ECONNREFUSED", out     # its own loopback: nobody there
    assert lo4.received == [] and lo6.received == []


@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_a_grafted_socket_broadcasts_to_no_host_link(sec, mode):
    """A grafted UDP socket with SO_BROADCAST, its egress rule covering the
    underlay's subnet: a datagram to that subnet's broadcast address (or to
    255.255.255.255, or to a group) would reach every listener of the host's
    link. Refused (built-in broadcast and multicast denies); nothing
    arrives at the other host."""
    configure(sec, "h1-c1", mode)
    peer_ns = sec.plan.node("h2").netns
    with Sentinel(peer_ns, "0.0.0.0", 7530, "udp") as sentinel:
        out = attack(sec, "h1-c1", mode, "docker", "sock", "udp4", "setopt", 1, 6, 1,
                     "connect", "198.18.0.2:7531",          # (grafted in both modes)
                     "send", "198.18.0.255:7530", "send", "255.255.255.255:7530",
                     "send", "224.0.0.1:7530", "send", "198.18.0.2:7530", "sleep", "0.5")
    sends = _ops(out, "send")
    assert [s["errno"] in ("EPERM", "EACCES") for s in sends] == [True, True, True, False], out
    assert sentinel.received == ["198.18.0.1"], sentinel.received


def test_a_loopback_bind_takes_no_port_the_host_keeps(sec):
    """A socket-mode container's loopback is a private address of the host: a
    bind there holds the port in the host's port space, so a host service
    binding it later on every address would fail (EADDRINUSE). Ports the
    host keeps - privileged ones, those listed in ip_local_reserved_ports -
    are refused (EACCES); others work as before."""
    h1 = sec.plan.node("h1").netns
    path = "/proc/sys/net/ipv4/ip_local_reserved_ports"
    old = netns.run_in(h1, lambda: open(path).read().strip())

    def reserve(value):
        with open(path, "w") as f:
            f.write(value)
    netns.run_in(h1, reserve, "7541")
    try:
        configure(sec, "h1-c1", "socket")
        out = attack(sec, "h1-c1", "socket", "docker",
                     "sock", "tcp4", "bind", "127.0.0.1:1022",
                     "sock", "tcp6", "bind", "[::1]:53",
                     "sock", "tcp4", "bind", "127.0.0.1:7541",
                     "sock", "tcp4", "bind", "127.0.0.1:7540", "listen")
    finally:
        netns.run_in(h1, reserve, old or "")
    binds = _ops(out, "bind")
    assert [b["errno"] for b in binds[:3]] == ["EACCES"] * 3, out
    assert binds[3]["ret"] == 0 and _ops(out, "listen")[0]["ret"] == 0, out


def _waits_in_addfd(pid):
    """Does a thread of process pid wait in a seccomp ioctl other than
    NOTIF_RECV (i.e. ADDFD, waiting for its target to run)?"""
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/wchan") as f:
                if f.read() == "seccomp_notify_ioctl":
                    return True
        except OSError:
            pass
    return False


def test_an_agent_stop_answers_every_call_it_received(sec):
    """The agent stops while one of its threads waits in ADDFD for a
    container's thread slow to run (SCHED_IDLE beside its own spinners), and
    a new agent starts. The kernel hands a call out once: one received by the
    old agent and never answered would hold its thread for good (the new
    agent never sees it). Every bind of the container's loop is answered -
    by the old agent before it ends, or by the new one - and the loop ends."""
    configure(sec, "h1-c1", "syscall")
    try:
        with _slow_attacker(sec, "26", "4", "22") as attacker:
            pid = sec.agents["h1"].pid
            # (under a loaded suite the slow waits may take a while to show)
            deadline = time.monotonic() + 18
            while not _waits_in_addfd(pid):
                assert time.monotonic() < deadline, "no agent thread ever waited in ADDFD"
                time.sleep(0.002)
            sec.stop_agent("h1")
            sec.start_agent("h1")
            mine = read_json_line(attacker, timeout=60)
    finally:
        if "h1" not in sec.agents:
            sec.start_agent("h1")
    assert mine["op"] == "bindfor" and mine["binds"] > 0, mine


def test_a_lingering_socket_never_holds_the_agent(sec, answer):
    """A socket whose close would wait (connected to a listener of the
    container's own that never reads, its send buffer full, SO_LINGER on for
    an hour) handed to the agent by connect() again: the agent's copy may be
    the last reference once the grafted socket replaced it, and closing it
    must not wait - in the agent's thread, holding what every container's
    calls need. (O_ASYNC sends the call to the agent's Python path; the
    native loop looks at the socket first when it answers.)"""
    from sockgraft.agent import control
    configure(sec, "h1-c1", "syscall")
    attacker = sec.spawn("h1-c1", [sec.attack_bin, "--caps", "docker", "sock", "tcp4",
                                   # (a port per run: the orphan lingers on)
                                   "lingerfill", f"127.0.0.1:{7610 + (answer == 'python')}",
                                   "connect", "198.18.0.2:7611", "sleep", "1"])
    try:
        fill = read_json_line(attacker, timeout=20)
        fill = read_json_line(attacker, timeout=20) if fill["op"] == "sock" else fill
        assert fill["op"] == "lingerfill" and fill["ret"] == 0 and fill["queued"] > 0, fill
        again = read_json_line(attacker, timeout=20)
        assert again["op"] == "connect", again      # answered (refused: nothing listens)
        t0 = time.monotonic()
        control.request(sec.agent_socket("h1"), {"op": "stats"}, timeout=5)
        assert time.monotonic() - t0 < 2
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait(timeout=10)


SIOCGIFNAME, SIOCGIFADDR, SIOCSIFMTU = 0x8910, 0x8915, 0x8922
SIOCGIFHWADDR, SIOCGIFINDEX, SIOCETHTOOL = 0x8927, 0x8933, 0x8946


def _links(ns):
    out = subprocess.run(["ip", "-n", ns, "-j", "addr"], capture_output=True, text=True,
                         check=True).stdout
    return {link["ifname"]: link for link in json.loads(out)}


def _ipv4(link):
    return [a["local"] for a in link.get("addr_info", []) if a.get("family") == "inet"]


@pytest.mark.parametrize("caps", ["docker", "keep"])
@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_a_grafted_socket_reads_and_changes_only_its_own_interfaces(sec, mode, caps):
    """The kernel answers interface, address and ARP ioctls from the
    namespace of the socket they are called on - the host's, for a grafted
    socket: SIOCGIFCONF listed the host's addresses, SIOCGARP read its ARP
    table, and a container with CAP_NET_ADMIN ("keep": every capability)
    set the MTU of a host interface. Now every such call is answered from
    the container's own namespace (the same answers as an ungrafted
    socket), changes need CAP_NET_ADMIN as there, and commands with
    pointers inside (ethtool) get ENOTTY."""
    configure(sec, "h1-c1", mode)
    cns, h1 = sec.plan.node("h1-c1").netns, sec.plan.node("h1").netns
    mine, hosts = _links(cns), _links(h1)
    dev = next(n for n in mine if n != "lo")
    host_dev = next(n for n in hosts if n != "lo" and n not in mine and _ipv4(hosts[n]))
    host_mtu, dev_mtu = hosts[host_dev]["mtu"], mine[dev]["mtu"]
    foreign_index = next(i for i in sorted(l["ifindex"] for l in hosts.values())
                         if i not in {l["ifindex"] for l in mine.values()})
    peer, peer6 = ap("198.18.0.2", 7508), ap("fd53:6700:0:1::1", 7508)
    steps = ["sock", "udp4"]
    if mode == "syscall":
        steps += ["ifconf"]             # its own socket, before the graft
    steps += ["connect", peer, "sendc", "ifconf",
              "ifreq", SIOCGIFINDEX, dev, "ifreq", SIOCGIFINDEX, host_dev,
              "ifreq", SIOCGIFHWADDR, dev, "ifreq", SIOCGIFADDR, host_dev,
              "ifreq", SIOCGIFNAME, "", foreign_index,
              "arp", "198.18.0.2", host_dev,
              "ifreq", SIOCSIFMTU, host_dev, 1280, "ifreq", SIOCSIFMTU, dev, dev_mtu - 100,
              "ifreq", SIOCETHTOOL, host_dev,
              "sock", "udp6", "connect", peer6,
              "ifreq", SIOCGIFINDEX, host_dev, "ifreq", SIOCGIFINDEX, dev]
    try:
        out = attack(sec, "h1-c1", mode, caps, *steps)
        mtu_after = _links(cns)[dev]["mtu"]
    finally:
        subprocess.run(["ip", "-n", cns, "link", "set", dev, "mtu", str(dev_mtu)], check=True)
    assert [s["ret"] for s in _ops(out, "connect")] == [0, 0], out
    want = {f"{n}={a}" for n, link in mine.items() for a in _ipv4(link)}
    for s in _ops(out, "ifconf"):
        assert s["ret"] == 0 and set(s["ifaces"].split(",")) == want, (s, want)
        assert s["need"] == 40 * len(want), s
    r = _ops(out, "ifreq")
    assert r[0]["ret"] == 0 and r[0]["int"] == mine[dev]["ifindex"], r[0]
    assert r[1]["errno"] == "ENODEV", r[1]          # no such interface in the container
    assert r[2]["ret"] == 0 and r[2]["mac"] == mine[dev]["address"], r[2]
    assert r[3]["errno"] == "ENODEV", r[3]
    assert r[4]["errno"] == "ENODEV", r[4]          # a host interface's index names nothing
    assert _ops(out, "arp")[0]["ret"] < 0, out      # the host's ARP table is not its own
    refused = "EPERM" if caps == "docker" else "ENODEV"
    assert r[5]["errno"] == refused, r[5]
    assert _links(h1)[host_dev]["mtu"] == host_mtu
    if caps == "docker":
        assert r[6]["errno"] == "EPERM" and mtu_after == dev_mtu, (r[6], mtu_after)
    else:           # its own interface, as an ungrafted socket would
        assert r[6]["ret"] == 0 and mtu_after == dev_mtu - 100, (r[6], mtu_after)
    assert r[7]["errno"] == "ENOTTY", r[7]
    assert r[8]["errno"] == "ENODEV" and r[9]["int"] == mine[dev]["ifindex"], r[8:]


def _dockerish_base(path):
    """Docker's default profile's shape: every call refused unless listed,
    ioctl listed without conditions, one ioctl command refused (TIOCSTI)."""
    with open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h") as f:
        names = [line.split()[1][5:] for line in f if line.startswith("#define __NR_")]
    base = {"defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 1,
            "architectures": ["SCMP_ARCH_X86_64"],
            "syscalls": [{"names": names, "action": "SCMP_ACT_ALLOW"},
                         {"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
                          "args": [{"index": 1, "value": 0x5412, "op": "SCMP_CMP_EQ"}]}]}
    with open(path, "w") as f:
        json.dump(base, f)
    return str(path)


@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_runc_containers_read_only_their_own_interfaces(sec, mode, tmp_path):
    """The same through runc, with a profile merged into a Docker-shaped
    base (ioctl allowed unconditionally beside the trap of the socket
    ioctls: libseccomp keeps both)."""
    from runtime import DOCKER_CAPS, RuncEnv
    env = RuncEnv(sec, tmp_path, graft_at=mode, extra_files={"attack": sec.attack_bin},
                  profile_args=("--base", _dockerish_base(tmp_path / "base.json")))
    cid = f"ioc-{mode[:4]}"
    h1 = sec.plan.node("h1").netns
    host_dev = next(n for n, link in _links(h1).items() if n != "lo" and _ipv4(link))
    steps = ["sock", "udp4", "connect", ap("198.18.0.2", 7509), "ifconf",
             "ifreq", SIOCGIFINDEX, host_dev, "ifreq", SIOCGIFINDEX, "eth0"]
    ann = dict(RUNC_ANN, **({"sockgraft/graft-at": "socket"} if mode == "socket" else {}))
    try:
        env.start(cid, ["/bin/attack", "--caps", "keep", *map(str, steps)], ann,
                  caps=DOCKER_CAPS)
        deadline = time.monotonic() + 30
        while '"done": true' not in env.output(cid):
            assert time.monotonic() < deadline, env.output(cid)
            time.sleep(0.1)
        mine = _links(env.containers[cid][0])
    finally:
        env.close()
    out = [json.loads(line) for line in env.output(cid).splitlines()
           if line.startswith("{") and "op" in line]
    assert _ops(out, "connect")[0]["ret"] == 0, out
    want = {f"{n}={a}" for n, link in mine.items() for a in _ipv4(link)}
    assert set(_ops(out, "ifconf")[0]["ifaces"].split(",")) == want, out
    r = _ops(out, "ifreq")
    assert host_dev not in mine and r[0]["errno"] == "ENODEV", r
    assert r[1]["ret"] == 0 and r[1]["int"] == mine["eth0"]["ifindex"], r


@pytest.mark.parametrize("mode", ["syscall", "socket"])
def test_capabilities_of_its_own_user_namespace_change_no_interface(sec, mode):
    """unshare(CLONE_NEWUSER) needs no capability and gives every one - in a
    user namespace that owns nothing the container uses: natively it still
    may not change its interfaces (EPERM). The agent, which runs the call
    with its own capabilities lowered to the caller's, must count only
    capabilities of a user namespace that owns the caller's network
    namespace (CapEff alone said CAP_NET_ADMIN)."""
    configure(sec, "h1-c1", mode)
    cns = sec.plan.node("h1-c1").netns
    mine = _links(cns)
    dev = next(n for n in mine if n != "lo")
    dev_mtu = mine[dev]["mtu"]
    steps = ["userns", "sock", "udp4", "connect", ap("198.18.0.2", 7510),
             "ifreq", SIOCSIFMTU, dev, dev_mtu - 100, "ifreq", SIOCGIFINDEX, dev]
    try:
        out = attack(sec, "h1-c1", mode, "docker", *steps)
        mtu_after = _links(cns)[dev]["mtu"]
    finally:
        subprocess.run(["ip", "-n", cns, "link", "set", dev, "mtu", str(dev_mtu)], check=True)
    assert _ops(out, "userns")[0]["ret"] == 0, out
    r = _ops(out, "ifreq")
    assert r[0]["errno"] == "EPERM" and mtu_after == dev_mtu, (r[0], mtu_after)
    assert r[1]["ret"] == 0 and r[1]["int"] == mine[dev]["ifindex"], r[1]     # gets still work
