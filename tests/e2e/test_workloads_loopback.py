"""Every benchmark workload, run for real on loopback: the server from
`server_argv` in a temp dir, the client from `client_argv` for 1 second
against 127.0.0.1, its output through `parse`. This is what the bench harness
does between namespaces, minus the namespaces.

Each server runs in its own session and its process group is killed at the
end; every wait is bounded.
"""

import math
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

from sockgraft.bench.workloads import WORKLOADS

pytestmark = pytest.mark.e2e

# Programs each workload runs (server and client), besides crr which is built.
PROGRAMS = {
    "iperf3": ["iperf3"],
    "sockperf-tcp": ["sockperf"],
    "sockperf-tcp-nb": ["sockperf"],
    "sockperf-udp": ["sockperf"],
    "crr": [],
    "http-close": ["nginx", "wrk"],
    "http-keepalive": ["nginx", "wrk"],
    "memcached": ["memcached", "memcaslap"],
    "redis": ["redis-server", "redis-benchmark", "timeout"],
}

SECONDS = 1
LISTEN_TIMEOUT = 5.0


def test_programs_table_covers_every_workload():
    assert set(PROGRAMS) == set(WORKLOADS)


@pytest.fixture(scope="module")
def tools(tmp_path_factory):
    if not (shutil.which("cc") or shutil.which("gcc")):
        return None
    from sockgraft.bench.engine import build_tools
    return build_tools(str(tmp_path_factory.mktemp("bench-bin")))


def free_port(proto):
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("0.0.0.0", 0))
        return s.getsockname()[1]


def listening(proto, port):
    flags = "-Htln" if proto == "tcp" else "-Huln"
    out = subprocess.run(["ss", flags, f"sport = :{port}"], capture_output=True, text=True,
                         timeout=5).stdout
    return out.strip()


def wait_listening(proc, proto, port, log):
    deadline = time.monotonic() + LISTEN_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"server exited with {proc.returncode} before listening:\n"
                        f"{log.read_text()[-2000:]}")
        if listening(proto, port):
            return
        time.sleep(0.05)
    pytest.fail(f"server not listening on {proto} {port} after {LISTEN_TIMEOUT}s:\n"
                f"{log.read_text()[-2000:]}")


def stop(proc):
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=3)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=3)


@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workload_on_loopback(name, tools, tmp_path):
    if name == "crr" and tools is None:
        pytest.skip("no C compiler to build crr (apt-get install gcc)")
    w = WORKLOADS[name].with_tools(tools or {})
    for prog in PROGRAMS[name]:
        if not shutil.which(prog):
            pytest.skip(f"{prog} is not installed (apt-get install {' '.join(w.packages)})")
    if not shutil.which("ss"):
        pytest.skip("ss is not installed (apt-get install iproute2)")

    workdir = tmp_path / "work"
    workdir.mkdir()
    port = free_port(w.proto)
    log = tmp_path / "server.log"
    t0 = time.monotonic()
    server_argv = w.server_argv(port, str(workdir))
    with open(log, "wb") as logf:
        srv = subprocess.Popen(server_argv, stdin=subprocess.DEVNULL, stdout=logf,
                               stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_listening(srv, w.proto, port, log)
        if name.startswith("http-"):
            # nginx must listen on IPv4 0.0.0.0, the address the harness targets
            assert f"0.0.0.0:{port}" in listening("tcp", port)
        client_argv = w.client_argv("127.0.0.1", port, SECONDS, str(workdir))
        proc = subprocess.run(client_argv, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=SECONDS + 20)
        res = w.parse(proc.stdout, proc.stderr)
    finally:
        stop(srv)
    elapsed = time.monotonic() - t0

    assert set(res) == set(w.metrics) | {"ops"} | set(w.counters)
    for k in (*w.metrics, "ops"):
        assert isinstance(res[k], float) and math.isfinite(res[k]) and res[k] > 0, (k, res)
    for k in w.counters:
        assert math.isfinite(res[k]) and res[k] >= 0, (k, res)
    assert elapsed < 10, f"{name} took {elapsed:.1f}s"
    if name.startswith("http-"):
        # nothing written outside workdir, and no complaint while running
        errlog = (workdir / "nginx-error.log").read_text()
        assert "[emerg]" not in errlog and "[alert]" not in errlog, errlog
        assert res["errors"] == 0 or name == "http-close", res


def test_sockperf_udp_client_sends_on_an_unconnected_socket(tmp_path):
    """The udp_sendto flag of sockperf-udp, checked on the real client."""
    for prog, pkg in (("sockperf", "sockperf"), ("strace", "strace"), ("ss", "iproute2")):
        if not shutil.which(prog):
            pytest.skip(f"{prog} is not installed (apt-get install {pkg})")
    w = WORKLOADS["sockperf-udp"]
    port = free_port("udp")
    log = tmp_path / "server.log"
    with open(log, "wb") as logf:
        srv = subprocess.Popen(w.server_argv(port, str(tmp_path)), stdin=subprocess.DEVNULL,
                               stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
    trace = tmp_path / "client.strace"
    try:
        wait_listening(srv, "udp", port, log)
        proc = subprocess.run(["strace", "-f", "-qq", "-o", str(trace),
                               "-e", "trace=socket,connect,sendto,sendmsg,send",
                               *w.client_argv("127.0.0.1", port, 1, str(tmp_path))],
                              capture_output=True, text=True, timeout=25)
        w.parse(proc.stdout, proc.stderr)
    finally:
        stop(srv)
    calls = trace.read_text().splitlines()
    assert any("SOCK_DGRAM" in c for c in calls), calls[:20]
    assert not [c for c in calls if " connect(" in c], "sockperf's UDP client connected"
    sent = [c for c in calls if " sendto(" in c]
    assert sent and all(f"sin_port=htons({port})" in c for c in sent), sent[:3]
    assert w.udp_sendto
