"""`sockgraft agent --metrics`: a live agent in the lab, scraped over HTTP
and parsed with prometheus-client's own parser (issue 18, metrics)."""

import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from grafting import PROBE, read_json_line
from nettools import EchoServer
from sockgraft.kernel import netns

pytestmark = pytest.mark.priv

CONFIG = """
container = "h1-c1"
[endpoints.ep-out]
type = "ipv4"
addr = "198.18.0.1"
port = "dynamic"
[rules]
egress = ["198.18.0.0/24=ep-out"]
[policy]
deny = ["deny tcp 198.18.0.2 7199"]
"""


def _scrape(ns, port):
    def get():
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode()
    return netns.run_in(ns, get)


def _samples(text):
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_live_agent_is_scraped(glab):
    glab.stop_agent("h1")
    # (the Python grafter: the answer-latency histogram and the agent's own
    # denials are its; the native loop's connects are counted, not timed, and
    # their denials are the kernel guard's)
    glab.start_agent("h1", "--metrics", "127.0.0.1:9464", "--native", "off")
    glab.configure("h1-c1", CONFIG)
    h1, h2 = glab.plan.node("h1").netns, glab.plan.node("h2").netns
    with EchoServer(h2, "0.0.0.0", 7198):
        assert glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7198)["echo"] == "ping"
    assert glab.probe("h1-c1", "tcp-client", "198.18.0.2", 7199)["connect_errno"] == "EACCES"
    # a live session (per-container series exist while the container runs)
    srv = glab.spawn("h1-c1", PROBE + ["tcp-server", "0.0.0.0", "7300", "--count", "1"])
    assert read_json_line(srv)["ready"]                 # its bind passed: no ingress rule
    deadline = time.monotonic() + 5                 # the loop publishes once a second
    while True:
        s = _samples(_scrape(h1, 9464))
        if s.get(("sockgraft_grafted_total", ()), 0) >= 1 and \
                s.get(("sockgraft_container_passed_total", (("container", "h1-c1"),)), 0):
            break
        assert time.monotonic() < deadline, s
        time.sleep(0.2)
    assert s[("sockgraft_container_passed_total", (("container", "h1-c1"),))] >= 1
    assert s[("sockgraft_sessions", ())] >= 1
    assert s[("sockgraft_denials_total", (("rule", "deny[0]"), ("syscall", "connect"),
                                          ("where", "agent")))] >= 1
    assert s[("sockgraft_answer_seconds_count", (("syscall", "connect"),))] >= 2
    assert s[("sockgraft_reconcile_seconds_count", (("what", "nftables"),))] >= 1
    assert s[("sockgraft_kernel_guards", ())] == 1
    assert s[("sockgraft_directory_reachable", ())] == 1       # the embedded directory
    assert ("sockgraft_oci_handoffs_total", (("result", "accepted"),)) in s


def test_idle_connections_to_the_metrics_port_hold_little_and_not_for_long(glab):
    """The port is reachable from wherever it is published (a hostPort: every
    pod). Connections that never finish a request (a slowloris, sending a
    byte now and then) get at most a few of the agent's threads and fds, for
    a few seconds in all; then it answers."""
    import os
    import subprocess
    import sys
    from sockgraft.agent.metrics import BoundedServer
    glab.stop_agent("h1")
    glab.start_agent("h1", "--metrics", "127.0.0.1:9465")
    h1 = glab.plan.node("h1").netns
    assert "sockgraft_" in _scrape(h1, 9465)
    pid = glab.agents["h1"].pid
    fds, threads = len(os.listdir(f"/proc/{pid}/fd")), len(os.listdir(f"/proc/{pid}/task"))

    idle = subprocess.Popen(
        ["ip", "netns", "exec", h1, sys.executable, "-c",
         "import socket, sys, time\n"
         "s = [socket.create_connection(('127.0.0.1', 9465)) for _ in range(64)]\n"
         "print('open', flush=True)\n"
         "for _ in range(30):\n"                   # a byte now and then (slow drip)
         "    for c in s:\n"
         "        try: c.send(b'G')\n"
         "        except OSError: pass\n"
         "    time.sleep(1)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert idle.stdout.readline().strip() == "open"
        time.sleep(0.5)
        assert len(os.listdir(f"/proc/{pid}/fd")) <= fds + BoundedServer.CONNECTIONS + 2
        # (a thread and its deadline timer per connection)
        assert len(os.listdir(f"/proc/{pid}/task")) <= threads + 2 * BoundedServer.CONNECTIONS
        time.sleep(BoundedServer.TIMEOUT + 1)
        assert "sockgraft_" in _scrape(h1, 9465)       # the idle ones timed out
    finally:
        idle.kill()
        idle.wait()
