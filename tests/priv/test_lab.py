"""The lab on the real kernel: namespaces, veth, bridges, VXLAN, nftables NAT."""

import json
import os
import subprocess
import sys
import time

import pytest

from nettools import EchoServer, echo, udp_got
from sockgraft.cli.main import main as cli
from sockgraft.errors import KernelError, LabError
from sockgraft.kernel import netns
from sockgraft.lab import builder
from sockgraft.model.topology import default_text, parse_topology

pytestmark = pytest.mark.priv
SG = [sys.executable, "-m", "sockgraft.cli.main"]


def vxlan_tx(ns):
    return builder.interface_counters(ns)["sg-vx0"]["tx_packets"]


def test_status_json_lists_hosts_containers_addresses(lab, capsys):
    assert cli(["lab", "status", "--json", "--name", lab.name]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["status"] == "up"
    assert [h["name"] for h in st["hosts"]] == ["h1", "h2"]
    containers = [c for h in st["hosts"] for c in h["containers"]]
    assert len(containers) == 4 and all(c["present"] for c in containers)
    assert {c["name"]: c["ipv4"] for c in containers} == {
        "h1-c1": "198.19.1.2", "h1-c2": "198.19.1.3", "h2-c1": "198.19.2.2",
        "h2-c2": "198.19.2.3"}
    assert containers[3]["ipv6"] == "fd53:6700:0:2::3"
    assert cli(["lab", "status", "--name", lab.name]) == 0
    table = capsys.readouterr().out
    assert "h2-c1" in table and "8080:80/tcp" in table and "SENT/RECEIVED" in table
    # the proof of grafting the README names: bytes over a container's veth
    c1 = containers[0]
    before = c1["veth_bytes"]["from"]
    with EchoServer(lab.node("h1-c2").netns, "0.0.0.0", 7009):
        echo(lab.node("h1-c1").netns, "198.19.1.3", 7009, b"x" * 5000)
    assert cli(["lab", "status", "--json", "--name", lab.name]) == 0
    after = json.loads(capsys.readouterr().out)["hosts"][0]["containers"][0]
    assert after["veth"] == "sgv-h1-c1" and after["veth_bytes"]["from"] - before >= 5000
    assert st["hosts"][0]["underlay_bytes"]["from"] >= 0


def test_bridge_path_same_host(lab):
    c1, c2 = lab.node("h1-c1"), lab.node("h1-c2")
    h1 = lab.hosts[0]
    before = vxlan_tx(h1.netns)
    with EchoServer(c2.netns, "0.0.0.0", 7001) as srv:
        assert echo(c1.netns, str(c2.ipv4.ip), 7001) == b"hello sockgraft"
        assert srv.peer() == str(c1.ipv4.ip)
    assert vxlan_tx(h1.netns) == before  # same host never touches the overlay


@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_vxlan_path_cross_host_by_container_ip(lab, family):
    src, dst = lab.node("h1-c1"), lab.node("h2-c2")
    h1 = lab.hosts[0]
    addr = str(getattr(dst, family).ip)
    before = vxlan_tx(h1.netns)
    with EchoServer(dst.netns, "::" if family == "ipv6" else "0.0.0.0", 7002) as srv:
        assert echo(src.netns, addr, 7002, b"over the overlay") == b"over the overlay"
        assert srv.peer() == str(getattr(src, family).ip)  # no NAT on the overlay
    assert vxlan_tx(h1.netns) > before


def test_vxlan_udp(lab):
    src, dst = lab.node("h1-c2"), lab.node("h2-c1")
    with EchoServer(dst.netns, "0.0.0.0", 7003, proto="udp") as srv:
        assert echo(src.netns, str(dst.ipv4.ip), 7003, b"dgram", proto="udp") == b"dgram"
        assert srv.peer() == str(src.ipv4.ip)


def test_nat_published_port_and_masquerade(lab):
    src, dst = lab.node("h1-c1"), lab.node("h2-c1")
    h1, h2 = lab.hosts
    with EchoServer(dst.netns, "0.0.0.0", 80) as srv:  # published as h2:8080
        assert echo(src.netns, str(h2.underlay.ip), 8080) == b"hello sockgraft"
        assert srv.peer() == str(h1.underlay.ip)  # masqueraded to h1's underlay address


def test_host_underlay_path(lab):
    h1, h2 = lab.hosts
    with EchoServer(h2.netns, "0.0.0.0", 7004) as srv:
        assert echo(h1.netns, str(h2.underlay.ip), 7004) == b"hello sockgraft"
        assert srv.peer() == str(h1.underlay.ip)


def test_containers_have_loopback_up(lab):
    c = lab.node("h2-c2")
    with EchoServer(c.netns, "127.0.0.1", 7005):
        assert echo(c.netns, "127.0.0.1", 7005) == b"hello sockgraft"


def test_exec_runs_in_the_node_namespace(lab, state_dir):
    env = dict(os.environ, SOCKGRAFT_STATE_DIR=str(state_dir))
    out = subprocess.run(SG + ["lab", "exec", "--name", lab.name, "h1-c1", "--", "ip", "-br",
                               "addr"], capture_output=True, text=True, env=env, timeout=30)
    assert out.returncode == 0, out.stderr
    assert "198.19.1.2/24" in out.stdout and "fd53:6700:0:1::2/64" in out.stdout
    bad = subprocess.run(SG + ["lab", "exec", "--name", lab.name, "nope", "--", "true"],
                         capture_output=True, text=True, env=env, timeout=30)
    assert bad.returncode == 2 and "no host or container named 'nope'" in bad.stderr


def test_up_twice_is_refused_and_leaves_first_lab(lab):
    with pytest.raises(LabError, match="already up"):
        builder.up(lab, default_text(), "<default>")
    assert all(netns.exists(n) for n in lab.namespaces)


def test_down_removes_everything_and_is_idempotent(state_dir, lab_name):
    plan = parse_topology(default_text(), name=lab_name)
    builder.up(plan, default_text(), "<default>")
    # a process left running inside the lab must not keep a namespace alive
    stray = subprocess.Popen(["sleep", "60"],
                             preexec_fn=lambda: netns.enter(plan.node("h1-c1").netns))
    assert builder.down(lab_name) is True
    assert stray.wait(timeout=10) is not None
    assert not [n for n in netns.list_names() if n.startswith(f"sg-{lab_name}-")]
    assert not (state_dir / "labs" / f"{lab_name}.json").exists()
    assert builder.down(lab_name) is False


def _ours(lab: str) -> list[str]:
    """The namespaces of lab `lab` (other labs may come and go meanwhile:
    tests of other sessions on the same machine)."""
    return sorted(n for n in netns.list_names() if n.startswith(f"sg-{lab}-"))


def test_broken_topology_changes_nothing(state_dir, tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[[hosts]]\nname='h1'\ncontainers=[{name='c1', publish=['x']}]\n")
    assert cli(["lab", "up", "--config", str(bad), "--name", "tbroken"]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "hosts[0].containers[0].publish[0]" in err and "'x'" in err
    assert _ours("tbroken") == []
    assert not (state_dir / "labs").exists() or not list((state_dir / "labs").iterdir())


def test_failure_in_the_middle_rolls_back(state_dir, lab_name, monkeypatch):
    plan = parse_topology(default_text(), name=lab_name)
    calls = []

    def boom(plan_, host):
        calls.append(host.name)
        raise KernelError("vxlan add", 17, "injected")

    monkeypatch.setattr(builder, "_build_overlay", boom)
    with pytest.raises(KernelError, match="injected"):
        builder.up(plan, default_text(), "<default>")
    assert calls == ["h1"]  # hosts and containers had been built by then
    assert _ours(lab_name) == []
    assert not (state_dir / "labs" / f"{lab_name}.json").exists()


def test_existing_namespace_of_the_same_name_is_not_touched(state_dir, lab_name):
    plan = parse_topology(default_text(), name=lab_name)
    squatter = plan.node("h2").netns
    netns.create(squatter)
    try:
        with pytest.raises(LabError, match=squatter):
            builder.up(plan, default_text(), "<default>")
        assert _ours(lab_name) == [squatter]
    finally:
        netns.delete(squatter)


def test_two_labs_with_one_topology_keep_their_agents_apart(glab, tmp_path):
    """Agents are named by lab and host: a second lab of the same topology
    gets its own sockets and embedded directory, `run --lab` reaches that
    lab's agent, and a config edit in another store reloads nobody (issue
    14, item 6)."""
    import secrets
    from grafting import PROBE, GraftLab, default_lab, read_json_line
    from sockgraft.agent import control
    other = "u" + secrets.token_hex(3)
    with default_lab(other) as plan:
        g2 = GraftLab(plan, glab.state_dir)
        try:
            g2.start_agent("h1")
            a1, a2 = glab.agent_socket("h1"), g2.agent_socket("h1")
            assert a1 != a2
            assert control.request(a1, {"op": "ping"})["name"] == "h1"
            # a grafted server in the second lab: that lab's agent has it,
            # that lab's directory publishes it, the first lab sees nothing
            g2.configure("h2-c1", INGRESS_H1C1.replace("h1-c1", "h2-c1").replace(
                "198.18.0.1", "198.18.0.2"))
            g2.start_agent("h2")
            srv = g2.spawn("h2-c1", PROBE + ["tcp-server", "0.0.0.0", "80", "--count", "9"])
            assert read_json_line(srv)["ready"]
            st2 = json.loads(glab.sg("stats", "--json", "--agent",
                                     g2.agent_socket("h2")).stdout)
            st1 = json.loads(glab.sg("stats", "--json", "--agent",
                                     glab.agent_socket("h2")).stdout)
            assert any(c["container"] == "h2-c1" for r in st2.values() for c in r["containers"])
            assert not any(c["container"] == "h2-c1" for r in st1.values()
                           for c in r["containers"])
            got = g2.wait_services(lambda s: any(r["port"] == 80 for r in s), host="h1")
            assert any(r["port"] == 80 for r in got["services"]), got
            assert not glab.services("h1")["services"]
            assert os.path.isdir(os.path.join(glab.state_dir, f"directory-{other}"))
            # an edit in a store no agent reads reloads nobody
            cfg = tmp_path / "c.toml"
            cfg.write_text('container = "x1"\n')
            out = glab.sg("config", "load", str(cfg), "--config-dir",
                          str(tmp_path / "elsewhere")).stdout
            assert "0 agent(s) reloaded" in out and "read another store" in out, out
            out = glab.sg("config", "load", str(cfg)).stdout
            assert "4 agent(s) reloaded" in out, out
        finally:
            g2.close()


INGRESS_H1C1 = """
container = "h1-c1"
[endpoints.ep-http]
type = "ipv4"
addr = "198.18.0.1"
port = 8081
[rules]
ingress = ["0.0.0.0:80=ep-http"]
"""


def _vxlan_into(gw, port, vni, vtep_mac, src, dst, dport, marker):
    """From inside a container: a VXLAN datagram to gw:port whose inner
    frame carries a UDP packet src -> dst:dport (marker as its payload)."""
    import socket
    import struct
    udp = struct.pack("!HHHH", 7199, dport, 8 + len(marker), 0) + marker
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                               socket.inet_aton(src), socket.inet_aton(dst)))
    total = sum(int.from_bytes(ip[i:i + 2], "big") for i in range(0, 20, 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    ip[10:12] = (~total & 0xFFFF).to_bytes(2, "big")
    frame = bytes.fromhex(vtep_mac.replace(":", "")) + bytes.fromhex("020000000001") + \
        b"\x08\x00" + bytes(ip) + udp
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.sendto(struct.pack("!II", 0x08000000, vni << 8) + frame, (gw, port))
    return True


def test_a_container_cannot_send_into_the_overlay(lab):
    """The kernel's VXLAN socket listens on every address of the host: a
    container sending a VXLAN datagram to its gateway would put an inner
    packet - any source, any destination - into the overlay, around every
    check of its own packets. The lab takes the overlay's port from the
    underlay only."""
    import threading
    h1 = lab.hosts[0]
    src, victim, forged = lab.node("h1-c1"), lab.node("h1-c2"), lab.node("h2-c1")
    got = {}
    t = threading.Thread(target=lambda: got.update(r=netns.run_in(victim.netns, udp_got,
                                                                   7300, 3.0)))
    t.start()
    time.sleep(0.5)
    for _ in range(3):
        netns.run_in(src.netns, _vxlan_into, str(h1.bridge4.ip), lab.vxlan_port, lab.vxlan_id,
                     h1.vtep_mac, str(forged.ipv4.ip), str(victim.ipv4.ip), 7300, b"MARK-70")
    t.join()
    assert got["r"] is None, f"an inner packet from the overlay reached {victim.name}: {got}"
