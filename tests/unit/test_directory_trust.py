"""model/directory.py admission and graft.may_follow: a directory record is
followed only if its publisher may publish it and the client may go there."""

from __future__ import annotations

from ipaddress import IPv4Address, ip_address

import pytest

from sockgraft.errors import ConfigError
from sockgraft.model import directory as mdir
from sockgraft.model.graft import (SOCK_STREAM, GraftConnect, SockInfo, decide_connect,
                                   followable, may_follow)
from sockgraft.model.graftconfig import load_config
from sockgraft.model.policy import Policy, parse_policy_rule
from sockgraft.model.sockaddr import AF_INET, InetAddr

pytestmark = pytest.mark.unit

H2 = {"node": "h2", "owner": "h2", "addresses": ["198.18.0.2", "fd53:6700:0:2::1"],
      "overlay": ["198.19.2.2", "fd53:6700:0:2::2"]}


def rec(owner="h2", overlay="198.19.2.2", host="198.18.0.2", port=80, **kw):
    r = {"overlay": overlay, "port": port, "proto": "tcp", "host_addr": host,
         "host_port": 8081, "node": owner, "owner": owner, "container": "h2-c1"}
    r.update(kw)
    return r


@pytest.mark.parametrize("addr, why", [
    ("127.0.0.1", "loopback"), ("127.8.9.10", "loopback"), ("::1", "loopback"),
    ("169.254.169.254", "metadata"), ("fd00:ec2::254", "metadata"),
    ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
    ("0.0.0.0", "unspecified"), ("::", "unspecified"), ("0.1.2.3", "unspecified"),
    ("224.0.0.1", "multicast"), ("ff02::1", "multicast"),
    ("255.255.255.255", "broadcast"), ("240.0.0.1", "reserved"),
    ("::ffff:127.0.0.1", "IPv4-mapped"), ("::ffff:198.18.0.2", "IPv4-mapped"),
])
def test_unusable_host_addresses(addr, why):
    assert mdir.unusable_host_addr(ip_address(addr)) == why
    with pytest.raises(ConfigError, match="host_addr"):
        mdir.check_record(rec(host=addr, overlay="fd53:6700:0:2::2" if ":" in addr
                              else "198.19.2.2"))


@pytest.mark.parametrize("addr", ["198.18.0.2", "10.0.0.7", "192.168.1.1", "fd53:6700::1",
                                  "2001:db8::1", "203.0.113.9"])
def test_usable_host_addresses(addr):
    assert mdir.unusable_host_addr(ip_address(addr)) is None


def test_node_document_drops_unusable_addresses_and_is_checked():
    doc = mdir.node_document("h1", "h1", [ip_address(a) for a in
                                          ("127.0.0.1", "198.18.0.1", "::1", "fe80::1",
                                           "fd53:6700:0:1::1")],
                             ["198.19.1.2", "198.19.1.2"])
    assert doc == {"node": "h1", "owner": "h1", "addresses": ["198.18.0.1", "fd53:6700:0:1::1"],
                   "overlay": ["198.19.1.2"]}
    assert mdir.check_node(doc) is doc
    for bad in ({**doc, "addresses": "198.18.0.1"}, {**doc, "overlay": ["x"]},
                {k: v for k, v in doc.items() if k != "node"}, {**doc, "owner": ""}, []):
        with pytest.raises(ConfigError):
            mdir.check_node(bad)


def test_a_record_needs_its_owners_node_to_vouch_for_both_addresses():
    good = rec()
    table, conflicts, rejected = mdir.admit({"h2": [good]}, {"h2": H2}, {})
    assert list(table) == ["tcp/198.19.2.2/80"] and not conflicts and not rejected
    cases = [
        ({"h2": [rec(host="198.18.0.9")]}, {"h2": H2}, "not an address of node 'h2'"),
        ({"h2": [rec(overlay="198.19.1.2")]}, {"h2": H2}, "not a container address"),
        ({"h2": [rec()]}, {}, "published no node document"),
        ({"evil": [rec()]}, {"evil": {**H2, "owner": "evil"}}, "names owner 'h2'"),
        ({"h2": [rec(node="h9")]}, {"h2": H2}, "names node 'h9'"),
    ]
    for by_owner, nodes, why in cases:
        table, _, rejected = mdir.admit(by_owner, nodes, {})
        assert table == {} and len(rejected) == 1 and why in rejected[0].reason, rejected


def test_a_later_node_cannot_claim_another_nodes_containers_or_addresses():
    """An impostor node document listing h2's container and address: its
    record is refused because h2 claimed both first (reader's observation)."""
    evil = {"node": "evil", "owner": "evil", "addresses": ["198.18.0.2", "203.0.113.9"],
            "overlay": ["198.19.2.2"]}
    imp = rec(owner="evil", host="203.0.113.9", since=0.0)
    table, conflicts, rejected = mdir.admit(
        {"h2": [rec()], "evil": [imp]}, {"h2": H2, "evil": evil},
        {("h2", "tcp/198.19.2.2/80"): 10.0, ("evil", "tcp/198.19.2.2/80"): 1.0},
        {"h2": 5.0, "evil": 9.0})
    assert table["tcp/198.19.2.2/80"]["owner"] == "h2"
    assert [r.owner for r in rejected] == ["evil"]
    assert "belongs to 'h2'" in rejected[0].reason


def test_since_is_the_readers_never_the_writers():
    """A record carrying an old `since` does not displace the one seen first."""
    other = {"node": "h3", "owner": "h3", "addresses": ["198.18.0.3"],
             "overlay": ["198.19.2.2"]}
    table, conflicts, _ = mdir.admit(
        {"h2": [rec(since=99.0)], "h3": [rec(owner="h3", host="198.18.0.3", since=0.0)]},
        {"h2": H2, "h3": other},
        {("h2", "tcp/198.19.2.2/80"): 1.0, ("h3", "tcp/198.19.2.2/80"): 2.0},
        {"h2": 1.0, "h3": 1.0})
    # both nodes list the overlay (a moved container): the record seen first wins
    assert table["tcp/198.19.2.2/80"]["owner"] == "h2"
    assert table["tcp/198.19.2.2/80"]["since"] == 1.0
    # h3's overlay claim lost to h2 (same time, smaller name): rejected, not a conflict
    assert not conflicts


def test_merge_conflict_goes_to_the_later_sighting():
    a = {**rec(), "since": 2.0}
    b = {**rec(owner="h3", host="198.18.0.3"), "container": "x", "since": 1.0}
    table, conflicts = mdir.merge({"h2": [a], "h3": [b]})
    assert table["tcp/198.19.2.2/80"]["owner"] == "h3"
    assert conflicts[0].loser["owner"] == "h2"


def _policy(*rules):
    parsed = [parse_policy_rule(r) for r in rules]
    return Policy(allow=tuple(r for r in parsed if r.action == "allow"),
                  deny=tuple(r for r in parsed if r.action == "deny"))


def _tcp(a, port):
    return InetAddr(AF_INET, IPv4Address(a), port)


def test_may_follow_judges_denies_and_categories_not_the_allow_list():
    allow_overlay = _policy("allow tcp 198.19.0.0/16")
    assert may_follow(allow_overlay, "tcp", _tcp("198.18.0.2", 8081))
    deny_host = _policy("deny tcp 198.18.0.2 8081")
    assert not may_follow(deny_host, "tcp", _tcp("198.18.0.2", 8081))
    assert not may_follow(Policy(), "tcp", _tcp("127.0.0.1", 8081))
    assert not may_follow(Policy(), "tcp", _tcp("169.254.169.254", 80))
    services = {("tcp", IPv4Address("198.19.2.2"), 80): (IPv4Address("198.18.0.2"), 8081),
                ("tcp", IPv4Address("198.19.2.3"), 80): (IPv4Address("198.18.0.3"), 8081)}
    assert set(followable(_policy("deny tcp 198.18.0.3"), services)) == \
        {("tcp", IPv4Address("198.19.2.2"), 80)}
    assert set(followable(_policy("allow tcp 198.19.2.3"), services)) == \
        {("tcp", IPv4Address("198.19.2.3"), 80)}


def test_a_client_whose_policy_refuses_the_host_address_takes_the_overlay():
    cfg = load_config('''container = "c"
        [endpoints.ep-out]
        type = "ipv4"
        addr = "198.18.0.1"
        port = "dynamic"
        [rules]
        egress = ["198.19.0.0/16=ep-out"]
        [policy]
        deny = ["deny tcp 198.18.0.2 8081"]
    '''.replace("\n        ", "\n"), "test.toml")
    services = {("tcp", IPv4Address("198.19.2.2"), 80): (IPv4Address("198.18.0.2"), 8081)}
    a = decide_connect(cfg, SockInfo(AF_INET, SOCK_STREAM, grafted=False),
                       _tcp("198.19.2.2", 80), services)
    assert isinstance(a, GraftConnect) and a.dest == _tcp("198.19.2.2", 80) and a.overlay is None


def test_an_embedded_directory_others_can_write_is_refused(tmp_path):
    from sockgraft.agent.directory import EmbeddedDirectory
    d = tmp_path / "dir"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(ConfigError, match="writable by group or others"):
        EmbeddedDirectory(str(d), "h1")
    d.chmod(0o700)
    EmbeddedDirectory(str(d), "h1").close(withdraw=False)


def test_etcd_access_options_are_checked(tmp_path):
    from sockgraft.agent.directory import open_backend
    from sockgraft.agent.etcd import EtcdAccess
    with pytest.raises(ConfigError, match="need an etcds://"):
        open_backend("etcd://127.0.0.1:1", "h1", 3, str(tmp_path), EtcdAccess(ca="/x"))
    with pytest.raises(ConfigError, match="go together"):
        open_backend("etcds://127.0.0.1:1", "h1", 3, str(tmp_path), EtcdAccess(cert="/x"))
    with pytest.raises(ConfigError, match="password-file"):
        open_backend("etcds://127.0.0.1:1", "h1", 3, str(tmp_path), EtcdAccess(user="u"))
    with pytest.raises(ConfigError, match="not readable"):
        open_backend("etcds://127.0.0.1:1", "h1", 3, str(tmp_path),
                     EtcdAccess(ca=str(tmp_path / "missing.pem")))
    with pytest.raises(ConfigError, match="unknown"):
        open_backend("ftp://x", "h1", 3, str(tmp_path))


def test_an_etcd_answer_past_the_bound_is_not_read():
    """Whoever can write to etcd can make it answer anything: the agent reads
    at most MAX_RESPONSE bytes of an answer (a loopback server here)."""
    import http.server
    import threading
    from sockgraft.agent.etcd import EtcdDirectory

    class Big(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            body = b'{"kvs": [' + b",".join([b'{"key": "eA=="}'] * 401) + b"]}"
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    srv = http.server.HTTPServer(("127.0.0.1", 0), Big)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        d = EtcdDirectory(f"etcd://127.0.0.1:{srv.server_address[1]}", "n1")
        assert len(d._range("/sockgraft/nodes/")[0]) == 401        # within the bound: read
        d.MAX_RESPONSE = 1024
        with pytest.raises(OSError, match="over 1024 bytes"):
            d._range("/sockgraft/nodes/")
    finally:
        srv.shutdown()
        srv.server_close()
