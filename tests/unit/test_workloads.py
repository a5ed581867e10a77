"""The benchmark workload table: argv builders and parsers, on real outputs.

Every fixture under data/workloads/ is the verbatim output of a run on
loopback on the project machine (Debian 12: iperf3 3.12, sockperf 3.7,
wrk 4.1.0, nginx 1.22, memcaslap from libmemcached-tools 1.1.4,
redis-benchmark 7.0.15, crr from src/sockgraft/bench/crr.c).
`<case>.stdout` / `<case>.stderr` hold the two streams; a missing file is an
empty stream.
"""

import math
from pathlib import Path

import pytest

from sockgraft.bench import workloads as wl
from sockgraft.bench.workloads import WORKLOADS, BenchParseError
from sockgraft.errors import ConfigError, NotFound, SockgraftError

pytestmark = pytest.mark.unit

DATA = Path(__file__).parent / "data" / "workloads"


def output(case):
    streams = []
    for ext in ("stdout", "stderr"):
        p = DATA / f"{case}.{ext}"
        streams.append(p.read_text() if p.exists() else "")
    assert any(streams), f"no fixture for {case}"
    return streams


# --- the table itself ------------------------------------------------------------

def test_table_names_and_order():
    assert list(WORKLOADS) == ["iperf3", "sockperf-tcp", "sockperf-tcp-nb", "sockperf-udp",
                               "crr", "http-close", "http-keepalive", "memcached", "redis"]
    for name, w in WORKLOADS.items():
        assert w.name == name
        assert w.proto in ("tcp", "udp")
        assert w.metrics and w.unit and w.packages
        assert "ops" not in w.metrics and not set(w.metrics) & set(w.counters)


def test_only_sockperf_udp_is_udp_and_uses_sendto():
    assert [n for n, w in WORKLOADS.items() if w.proto == "udp"] == ["sockperf-udp"]
    assert [n for n, w in WORKLOADS.items() if w.udp_sendto] == ["sockperf-udp"]


# --- parsers on real outputs ---------------------------------------------------------

OK_CASES = [
    ("iperf3", "iperf3_ok",
     {"gbit_per_s": 32.78819800136466, "ops": 4102553600 / 2**20}),
    ("sockperf-tcp", "sockperf_tcp_ok",
     {"rtt_avg_us": 2 * 13.220, "rtt_p99_us": 2 * 23.869, "ops": 38228, "dropped": 0}),
    ("sockperf-udp", "sockperf_udp_ok",
     {"rtt_avg_us": 2 * 57.090, "rtt_p99_us": 2 * 95.548, "ops": 8230, "dropped": 0}),
    ("crr", "crr_ok", {"conn_per_s": 12293.6, "ops": 12294, "failed": 0}),
    ("http-keepalive", "wrk_keepalive_ok", {"req_per_s": 87588.43, "ops": 87643, "errors": 0}),
    ("http-close", "wrk_close_ok", {"req_per_s": 16656.87, "ops": 16660, "errors": 0}),
    # server killed mid-run: errors are reported, the close run still counts ...
    ("http-close", "wrk_close_sockerr",
     {"req_per_s": 4586.49, "ops": 4603, "errors": 6 + 446}),
    # ... and so does a keep-alive run with 2.3% errors (under the 5% limit)
    ("http-keepalive", "wrk_keepalive_sockerr",
     {"req_per_s": 22466.11, "ops": 24697, "errors": 8 + 559}),
    ("memcached", "memaslap_ok", {"ops_per_s": 90839, "ops": 90846}),
    ("redis", "redis_ok", {"req_per_s": (34042.55 + 53511.71) / 2, "ops": 2 * 16000}),
]


@pytest.mark.parametrize("name,case,expected", OK_CASES, ids=[c[1] for c in OK_CASES])
def test_parse_real_output(name, case, expected):
    w = WORKLOADS[name]
    res = w.parse(*output(case))
    assert set(res) == set(w.metrics) | {"ops"} | set(w.counters)
    assert res == pytest.approx(expected)
    for k in (*w.metrics, "ops"):
        assert math.isfinite(res[k]) and res[k] > 0


FAIL_CASES = [
    # (workload, case, text the message must quote: reason or the tool's own words)
    ("iperf3", "iperf3_refused", "unable to connect to server: Connection refused"),
    ("sockperf-tcp", "sockperf_tcp_refused", "Connection refused"),
    ("sockperf-udp", "sockperf_udp_noserver", "received no reply"),
    ("crr", "crr_refused", "gave up after 1001 failed connections"),
    ("http-keepalive", "wrk_refused", "unable to connect to 127.0.0.1:18699 Connection refused"),
    ("http-close", "wrk_refused", "unable to connect to 127.0.0.1:18699 Connection refused"),
    ("http-keepalive", "wrk_keepalive_503", "31982 non-2xx/3xx responses or socket errors"),
    ("http-close", "wrk_keepalive_503", "no successful request"),
    ("memcached", "memaslap_refused", "memcached unreachable"),
    ("redis", "redis_refused", "could not connect to Redis at 127.0.0.1:18799"),
]


@pytest.mark.parametrize("name,case,quote", FAIL_CASES, ids=[f"{c[0]}:{c[1]}" for c in FAIL_CASES])
def test_parse_failed_run(name, case, quote):
    with pytest.raises(BenchParseError) as ei:
        WORKLOADS[name].parse(*output(case))
    e = ei.value
    assert isinstance(e, SockgraftError)
    assert e.workload == name
    msg = str(e)
    assert msg.startswith(f"{name}: ")
    assert quote in msg
    # the tail of the real output is quoted, without colour codes
    assert e.tail and e.tail in msg and "\x1b" not in msg


def test_parse_error_quotes_tool_output_tail():
    out, err = output("sockperf_udp_noserver")
    with pytest.raises(BenchParseError) as ei:
        WORKLOADS["sockperf-udp"].parse(out, err)
    assert "Is the server down?" in ei.value.tail
    assert "[stdout]" in ei.value.tail


def test_keepalive_errors_over_five_percent_fail():
    out, err = output("wrk_keepalive_sockerr")
    worse = out.replace("write 559", "write 2000")
    assert worse != out
    with pytest.raises(BenchParseError, match="5%"):
        WORKLOADS["http-keepalive"].parse(worse, err)
    # the same errors are only reported on the close path
    assert WORKLOADS["http-close"].parse(worse, err)["errors"] == 8 + 2000


def test_empty_output_is_a_parse_error_for_every_workload():
    for name, w in WORKLOADS.items():
        with pytest.raises(BenchParseError, match="no output"):
            w.parse("", "")


def test_parser_does_not_accept_another_tools_output():
    out, err = output("sockperf_tcp_ok")
    for name in ("iperf3", "crr", "http-close", "memcached", "redis"):
        with pytest.raises(BenchParseError):
            WORKLOADS[name].parse(out, err)


def test_iperf3_zero_bytes_is_an_error():
    out, err = output("iperf3_ok")
    zero = out.replace('"bits_per_second":\t32788198001.364658', '"bits_per_second":\t0')
    assert zero != out
    with pytest.raises(BenchParseError, match="gbit_per_s"):
        WORKLOADS["iperf3"].parse(zero, err)


def test_redis_needs_both_tests():
    out, _ = output("redis_ok")
    only_set = out.split("====== GET ======")[0]
    with pytest.raises(BenchParseError, match="no completed GET test"):
        WORKLOADS["redis"].parse(only_set, "")


# --- argv builders ---------------------------------------------------------------------

CRR = "/opt/sg/crr"


def argv(name, workdir="/tmp/wd"):
    w = WORKLOADS[name].with_tools({"crr": CRR})
    return w.server_argv(5201, workdir), w.client_argv("10.0.0.2", 5201, 3, workdir)


def test_argv_iperf3():
    assert argv("iperf3") == (["iperf3", "-s", "-1", "-p", "5201"],
                              ["iperf3", "-c", "10.0.0.2", "-p", "5201", "-t", "3", "-J"])


def test_argv_sockperf():
    assert argv("sockperf-tcp") == (
        ["sockperf", "sr", "--tcp", "-i", "0.0.0.0", "-p", "5201"],
        ["sockperf", "pp", "--tcp", "-i", "10.0.0.2", "-p", "5201", "-t", "3", "-m", "64"])
    assert argv("sockperf-tcp-nb") == (
        ["sockperf", "sr", "--tcp", "--nonblocked", "-i", "0.0.0.0", "-p", "5201"],
        ["sockperf", "pp", "--tcp", "--nonblocked", "-i", "10.0.0.2", "-p", "5201", "-t", "3",
         "-m", "64"])
    assert argv("sockperf-udp") == (
        ["sockperf", "sr", "-i", "0.0.0.0", "-p", "5201"],
        ["sockperf", "pp", "-i", "10.0.0.2", "-p", "5201", "-t", "3", "-m", "64"])


def test_argv_crr_takes_the_built_binary():
    assert argv("crr") == ([CRR, "server", "5201"], [CRR, "client", "10.0.0.2", "5201", "3"])


def test_crr_without_a_path_is_a_config_error():
    with pytest.raises(ConfigError, match="with_tools"):
        WORKLOADS["crr"].server_argv(5201, "/tmp/wd")
    with pytest.raises(ConfigError, match="build_tools"):
        WORKLOADS["crr"].client_argv("10.0.0.2", 5201, 1, "/tmp/wd")


def test_with_tools_overrides_any_program_and_leaves_the_table_alone():
    w = WORKLOADS["iperf3"].with_tools({"iperf3": "/usr/local/bin/iperf3", "crr": CRR})
    assert w.server_argv(1, "/w")[0] == "/usr/local/bin/iperf3"
    assert WORKLOADS["iperf3"].server_argv(1, "/w")[0] == "iperf3"
    assert w.with_tools({"iperf3": "/x"}).program("iperf3") == "/x"
    assert w.with_tools({"iperf3": "/x"}).program("crr") == CRR
    assert w == WORKLOADS["iperf3"].with_tools({"crr": CRR, "iperf3": "/usr/local/bin/iperf3"})


def test_argv_wrk(tmp_path):
    srv, cli = argv("http-keepalive", str(tmp_path))
    assert cli == ["wrk", "-t1", "-c8", "-d3s", "--latency", "http://10.0.0.2:5201/"]
    srv, cli = argv("http-close", str(tmp_path))
    assert cli == ["wrk", "-t1", "-c8", "-d3s", "--latency", "-H", "Connection: close",
                   "http://10.0.0.2:5201/"]


def test_nginx_server_writes_its_config(tmp_path):
    wd = str(tmp_path)
    srv = WORKLOADS["http-close"].server_argv(8080, wd)
    conf = tmp_path / "nginx.conf"
    assert srv == ["nginx", "-p", wd, "-c", str(conf), "-e", f"{wd}/nginx-error.log"]
    assert conf.read_text() == wl.nginx_config(8080, wd)


def test_nginx_config_write_failure_is_a_kernel_error(tmp_path):
    with pytest.raises(NotFound, match="write nginx config"):
        WORKLOADS["http-close"].server_argv(8080, str(tmp_path / "missing"))


def test_nginx_config_stays_in_workdir():
    text = wl.nginx_config(8080, "/tmp/wd/")
    lines = [ln.strip() for ln in text.splitlines()]
    for directive in ("daemon off;", "master_process off;", "worker_processes 1;",
                      "access_log off;", "listen 8080;", 'location / { return 200 "ok\\n"; }'):
        assert directive in lines
    paths = [ln.split()[1].rstrip(";") for ln in lines
             if ln.split() and (ln.split()[0].endswith("_path") or ln.split()[0] in
                                ("pid", "error_log"))]
    assert len(paths) == 7
    assert all(p.startswith("/tmp/wd/nginx") for p in paths), paths
    assert "/var" not in text
    assert text.count("{") == text.count("}")


def test_argv_memcached():
    assert argv("memcached") == (
        ["memcached", "-u", "root", "-l", "0.0.0.0", "-p", "5201", "-U", "0", "-t", "1",
         "-m", "64"],
        ["memcaslap", "-s", "10.0.0.2:5201", "-T", "1", "-c", "4", "-t", "3s"])


def test_argv_redis_is_bounded():
    srv, cli = argv("redis")
    assert srv == ["redis-server", "--port", "5201", "--bind", "0.0.0.0", "--protected-mode",
                   "no", "--save", "", "--appendonly", "no", "--daemonize", "no",
                   "--dir", "/tmp/wd"]
    assert cli == ["timeout", "--foreground", "-k", "5", "22", "redis-benchmark",
                   "-h", "10.0.0.2", "-p", "5201", "-c", "8", "-t", "set,get", "-n", "60000"]
    assert wl.redis_requests(1) == 20000
    assert wl.redis_requests(10) == 200000


@pytest.mark.parametrize("port", [0, 65536, -1, "80"])
def test_bad_port_is_a_config_error(port):
    with pytest.raises(ConfigError, match="port"):
        WORKLOADS["iperf3"].server_argv(port, "/w")
    with pytest.raises(ConfigError, match="port"):
        WORKLOADS["iperf3"].client_argv("127.0.0.1", port, 1, "/w")


@pytest.mark.parametrize("seconds", [0, -1, 1.5])
def test_bad_seconds_is_a_config_error(seconds):
    with pytest.raises(ConfigError, match="seconds"):
        WORKLOADS["iperf3"].client_argv("127.0.0.1", 5201, seconds, "/w")


def test_tail_is_short_and_clean():
    noisy = "\x1b[2;35mhello\x1b[0m\r" + "\n".join(f"line {i}" for i in range(100)) + "\n"
    tail = wl._tail(noisy, "boom\n")
    assert "\x1b" not in tail and "line 99" in tail and "line 50" not in tail
    assert tail.endswith("[stderr]\nboom")
    assert len(wl._tail("x" * 5000, "")) <= 1203
