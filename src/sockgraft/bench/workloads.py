"""The benchmark workload table: for each real, unmodified workload, how to
start its server, how to run its client for a bounded time, and how to turn
the client's output into metrics.

Owns: the argv of every server and client, the tool options that make a run
comparable (message sizes, connection counts, get/set mix, durations), the
parsers of each tool's real output, and `BenchParseError`, raised when the
output is not what a successful run prints.

Must not: start processes, enter namespaces, wait for ports, time anything or
measure CPU: the harness does all of that. These are pure argv builders and
parsers, with one documented exception: nginx's `server_argv` writes its
config file into `workdir` before returning (see `nginx_config`).

Contract with the harness, per workload `w = WORKLOADS[name]`:

    w = w.with_tools(tools)             # {"crr": "/path/to/crr", ...}
    server = w.server_argv(port, workdir)  # run it in the server namespace,
                                        # wait until `w.proto` `port` listens
    client = w.client_argv(target, port, seconds, workdir)
    result = w.parse(stdout, stderr)    # {metric: value, "ops": n, counter: n}
    cpu_us_per_op = cpu_us / result["ops"]      # ops are in units of `w.unit`

Program paths: every argv[0] goes through `Workload.program(name)`, which
returns `tools[name]` if the harness gave one and the bare name otherwise
(resolved through PATH when executed). `crr` is compiled by sockgraft itself
(`sockgraft.bench.engine.build_tools`) and never on PATH, so its path is
required: `WORKLOADS["crr"].with_tools(build_tools(dir))`.

Every client exits by itself within about `seconds` plus a fixed start-up
cost (sockperf ~2.2 s, memaslap ~1 s, the others < 0.1 s), also when the server
is unreachable. redis-benchmark has no duration option and spins forever when
it cannot connect, so its argv is wrapped in coreutils `timeout`. The harness
should still put its own deadline on every client.

Targets are IPv4 addresses (crr only speaks IPv4; the servers all accept
IPv4 on 0.0.0.0 or a dual-stack wildcard).
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from ..errors import BenchParseError, ConfigError, from_oserror

__all__ = ["BenchParseError", "Workload", "WORKLOADS", "nginx_config"]


class _NoResult(Exception):
    """Raised by the parsers below; `Workload.parse` adds name and output tail."""


# argv builders get the workload's program resolver, never the tools mapping.
Exe = Callable[[str], str]
ServerFn = Callable[[Exe, int, str], list[str]]
ClientFn = Callable[[Exe, str, int, int, str], list[str]]
ParseFn = Callable[[str, str], dict[str, float]]

# Programs that sockgraft builds itself: never on PATH, their path is required.
_BUILT_BY_SOCKGRAFT = frozenset({"crr"})


@dataclass(frozen=True)
class Workload:
    """One row of the table. `parse` returns exactly `metrics` + "ops" +
    `counters`; metrics are positive in a successful run, counters (errors,
    drops) may be 0."""

    name: str
    proto: str                  # "tcp" or "udp": what the server listens on
    metrics: tuple[str, ...]    # headline metrics returned by parse()
    unit: str                   # unit of work behind "ops" (for cpu_us_per_op)
    udp_sendto: bool = False    # client sends UDP with sendto() on an unconnected socket
    bulk: bool = False          # a bulk transfer (sender and receiver busy at once: --pin-rr
                                # leaves it on every CPU)
    counters: tuple[str, ...] = ()  # informational counts parse() also returns
    packages: tuple[str, ...] = ()  # Debian packages providing server and client
    tools: tuple[tuple[str, str], ...] = ()  # (program, path) overrides; see with_tools
    server_fn: ServerFn = field(kw_only=True, repr=False, compare=False)
    client_fn: ClientFn = field(kw_only=True, repr=False, compare=False)
    parse_fn: ParseFn = field(kw_only=True, repr=False, compare=False)

    def with_tools(self, tools: Mapping[str, str]) -> Workload:
        """A copy whose argv[0]s come from `tools` (program name -> path)."""
        merged = dict(self.tools)
        merged.update(tools)
        return replace(self, tools=tuple(sorted(merged.items())))

    def program(self, name: str) -> str:
        for prog, path in self.tools:
            if prog == name:
                return path
        if name in _BUILT_BY_SOCKGRAFT:
            raise ConfigError(
                f"no path for {name!r}: it is built by sockgraft, not installed; pass "
                f"WORKLOADS[{self.name!r}].with_tools({{{name!r}: PATH}}) "
                "(sockgraft.bench.engine.build_tools compiles it)",
                source=f"workload {self.name}", field="tools", value=dict(self.tools))
        return name

    def server_argv(self, port: int, workdir: str) -> list[str]:
        """argv of the server, listening on every IPv4 address at `port`.
        `workdir` is a private temp dir for configs, pidfiles and logs."""
        return self.server_fn(self.program, _check_port(self.name, port), workdir)

    def client_argv(self, target: str, port: int, seconds: int, workdir: str) -> list[str]:
        """argv of a client that loads `target`:`port` for about `seconds` and exits."""
        if not isinstance(seconds, int) or seconds < 1:
            raise ConfigError("must be a whole number of seconds >= 1",
                              source=f"workload {self.name}", field="seconds", value=seconds)
        return self.client_fn(self.program, target, _check_port(self.name, port), seconds,
                              workdir)

    def parse(self, stdout: str, stderr: str) -> dict[str, float]:
        """metric -> value, plus "ops" (units of work done) and the counters.
        Raises BenchParseError unless the output is that of a successful run."""
        try:
            res = self.parse_fn(stdout, stderr)
        except _NoResult as e:
            raise BenchParseError(self.name, str(e), _tail(stdout, stderr)) from None
        expected = set(self.metrics) | {"ops"} | set(self.counters)
        assert set(res) == expected, (self.name, sorted(res), sorted(expected))
        bad = [k for k in (*self.metrics, "ops")
               if not (math.isfinite(res[k]) and res[k] > 0)]
        if bad:
            raise BenchParseError(self.name, f"non-positive or non-finite {', '.join(bad)}: "
                                  f"{ {k: res[k] for k in bad} }", _tail(stdout, stderr))
        return res


def _check_port(name: str, port: int) -> int:
    if not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError("must be an integer in 1..65535",
                          source=f"workload {name}", field="port", value=port)
    return port


# --- output helpers ---------------------------------------------------------------

_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _clean(text: str) -> str:
    """Without ANSI colour codes; progress lines redrawn with \\r become lines."""
    return _ANSI.sub("", text).replace("\r\n", "\n").replace("\r", "\n")


def _tail(stdout: str, stderr: str, lines: int = 12, chars: int = 1200) -> str:
    out = []
    for label, text in (("stdout", stdout), ("stderr", stderr)):
        kept = [ln.rstrip() for ln in _clean(text).splitlines() if ln.strip()]
        if kept:
            out.append(f"[{label}]")
            out.extend(kept[-lines:])
    text = "\n".join(out) if out else "(no output)"
    return text if len(text) <= chars else "..." + text[-chars:]


def _search(pattern: str, text: str, what: str, flags: int = 0) -> re.Match[str]:
    m = re.search(pattern, text, flags)
    if not m:
        raise _NoResult(f"no {what} in the output")
    return m


# --- iperf3 -------------------------------------------------------------------------

def _iperf3_server(exe: Exe, port: int, workdir: str) -> list[str]:
    return [exe("iperf3"), "-s", "-1", "-p", str(port)]


def _iperf3_client(exe: Exe, target: str, port: int, seconds: int, workdir: str) -> list[str]:
    return [exe("iperf3"), "-c", target, "-p", str(port), "-t", str(seconds), "-J"]


def parse_iperf3(stdout: str, stderr: str) -> dict[str, float]:
    try:
        doc = json.loads(stdout)
    except ValueError:
        raise _NoResult("stdout is not iperf3 -J JSON") from None
    if not isinstance(doc, dict):
        raise _NoResult("stdout is not an iperf3 -J JSON object")
    if doc.get("error"):
        raise _NoResult(f"iperf3 reported an error: {doc['error']}")
    recv = (doc.get("end") or {}).get("sum_received")
    if not isinstance(recv, dict) or "bits_per_second" not in recv or "bytes" not in recv:
        raise _NoResult("no end.sum_received in the iperf3 JSON")
    return {"gbit_per_s": float(recv["bits_per_second"]) / 1e9,
            "ops": float(recv["bytes"]) / 2**20}


# --- sockperf -----------------------------------------------------------------------

def _sockperf_server(tcp: bool, nonblocked: bool = False) -> ServerFn:
    def build(exe: Exe, port: int, workdir: str) -> list[str]:
        return [exe("sockperf"), "sr", *(["--tcp"] if tcp else []),
                *(["--nonblocked"] if nonblocked else []), "-i", "0.0.0.0", "-p", str(port)]
    return build


def _sockperf_client(tcp: bool, nonblocked: bool = False) -> ClientFn:
    def build(exe: Exe, target: str, port: int, seconds: int, workdir: str) -> list[str]:
        return [exe("sockperf"), "pp", *(["--tcp"] if tcp else []),
                *(["--nonblocked"] if nonblocked else []), "-i", target,
                "-p", str(port), "-t", str(seconds), "-m", "64"]
    return build


def parse_sockperf(stdout: str, stderr: str) -> dict[str, float]:
    # sockperf exits 0 even when it could not connect or got no reply, so
    # success is judged from the summary lines alone.
    text = _clean(stdout + "\n" + stderr)
    if "No messages were received" in text:
        raise _NoResult("sockperf received no reply from the server")
    err = re.search(r"sockperf: ERROR: (.*)", text)
    if err:
        raise _NoResult(f"sockperf failed: {err.group(1).strip()}")
    avg = _search(r"avg-latency=([\d.]+)", text, "'avg-latency=' line")
    p99 = _search(r"percentile 99\.000 =\s*([\d.]+)", text, "'percentile 99.000' line")
    # [Total Run] counts every round trip the client made (warm-up included),
    # which is the work the harness's CPU measurement covers; [Valid Duration]
    # is only the part sockperf keeps for its statistics.
    total = _search(r"\[Total Run\][^\n]*ReceivedMessages=(\d+)", text,
                    "'[Total Run] ... ReceivedMessages=' line")
    dropped = _search(r"# dropped messages = (\d+)", text, "'# dropped messages' line")
    # sockperf's "latency" is half the round trip; report the round trip.
    return {"rtt_avg_us": 2 * float(avg.group(1)), "rtt_p99_us": 2 * float(p99.group(1)),
            "ops": float(total.group(1)), "dropped": float(dropped.group(1))}


# --- crr ----------------------------------------------------------------------------

def _crr_server(exe: Exe, port: int, workdir: str) -> list[str]:
    return [exe("crr"), "server", str(port)]


def _crr_client(exe: Exe, target: str, port: int, seconds: int, workdir: str) -> list[str]:
    return [exe("crr"), "client", target, str(port), str(seconds)]


# crr.c gives up after this many failed connections (and exits 1).
_CRR_GIVE_UP = 1000


def parse_crr(stdout: str, stderr: str) -> dict[str, float]:
    lines = [ln for ln in stdout.strip().splitlines() if ln.strip()]
    try:
        res = json.loads(lines[-1])
        conns, failed, rate = int(res["conns"]), int(res["failed"]), float(res["conn_per_s"])
    except (IndexError, ValueError, KeyError, TypeError):
        raise _NoResult("no crr JSON result line on stdout") from None
    if failed > _CRR_GIVE_UP:
        raise _NoResult(f"crr gave up after {failed} failed connections "
                        f"({conns} succeeded)")
    if conns <= 0:
        raise _NoResult("crr completed no connection")
    return {"conn_per_s": rate, "ops": float(conns), "failed": float(failed)}


# --- nginx + wrk --------------------------------------------------------------------

def nginx_config(port: int, workdir: str) -> str:
    """A minimal single-process nginx answering 200 "ok" on 0.0.0.0:port, with
    every file it writes (pid, error log, temp dirs) inside `workdir`, so it
    runs as root without touching /var."""
    w = workdir.rstrip("/") or "/"
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {w}/nginx.pid;
error_log {w}/nginx-error.log;
events {{}}
http {{
    access_log off;
    client_body_temp_path {w}/nginx-client-body;
    proxy_temp_path {w}/nginx-proxy;
    fastcgi_temp_path {w}/nginx-fastcgi;
    uwsgi_temp_path {w}/nginx-uwsgi;
    scgi_temp_path {w}/nginx-scgi;
    server {{
        listen {port};
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""


def _nginx_server(exe: Exe, port: int, workdir: str) -> list[str]:
    # The one side effect in this module: nginx reads its config from a file,
    # so the file must exist before the argv is any use.
    conf = os.path.join(workdir, "nginx.conf")
    try:
        with open(conf, "w") as f:
            f.write(nginx_config(port, workdir))
    except OSError as e:
        raise from_oserror("write nginx config", e, conf) from e
    # -e: the error log before the config is read (Debian's default is stderr,
    # other builds use /var/log/nginx); -p: relative paths stay in workdir.
    return [exe("nginx"), "-p", workdir, "-c", conf, "-e",
            os.path.join(workdir, "nginx-error.log")]


def _wrk_client(close: bool) -> ClientFn:
    def build(exe: Exe, target: str, port: int, seconds: int, workdir: str) -> list[str]:
        host = f"[{target}]" if ":" in target else target
        return [exe("wrk"), "-t1", "-c8", f"-d{seconds}s", "--latency",
                *(["-H", "Connection: close"] if close else []), f"http://{host}:{port}/"]
    return build


# With keep-alive a healthy run has no errors at all; allow a little noise.
_WRK_MAX_ERROR_SHARE = 0.05


def _parse_wrk(close: bool) -> ParseFn:
    def parse(stdout: str, stderr: str) -> dict[str, float]:
        text = _clean(stdout + "\n" + stderr)
        reqs = _search(r"(\d+) requests in [\d.]+\w+,", text, "'N requests in' line")
        rate = _search(r"Requests/sec:\s*([\d.]+)", text, "'Requests/sec:' line")
        requests = int(reqs.group(1))
        non2xx = re.search(r"Non-2xx or 3xx responses:\s*(\d+)", text)
        sock = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                         r"timeout (\d+)", text)
        bad_responses = int(non2xx.group(1)) if non2xx else 0
        errors = bad_responses + (sum(int(g) for g in sock.groups()) if sock else 0)
        if close:
            # Connection: close makes socket errors on the closing race normal
            # on some paths: they are reported, not fatal.
            if requests - bad_responses <= 0:
                raise _NoResult(f"no successful request ({requests} requests, "
                                f"{bad_responses} non-2xx/3xx)")
        elif errors > _WRK_MAX_ERROR_SHARE * max(requests, 1):
            raise _NoResult(f"{errors} non-2xx/3xx responses or socket errors in "
                            f"{requests} requests (> {_WRK_MAX_ERROR_SHARE:.0%})")
        return {"req_per_s": float(rate.group(1)), "ops": float(requests),
                "errors": float(errors)}
    return parse


# --- memcached + memaslap -------------------------------------------------------------

def _memcached_server(exe: Exe, port: int, workdir: str) -> list[str]:
    return [exe("memcached"), "-u", "root", "-l", "0.0.0.0", "-p", str(port), "-U", "0",
            "-t", "1", "-m", "64"]


def _memaslap_client(exe: Exe, target: str, port: int, seconds: int, workdir: str) -> list[str]:
    # Debian 12's libmemcached-tools (libmemcached-awesome) names memaslap
    # "memcaslap". Its default mix is get:set 9:1 (it prints set_prop=0.10,
    # get_prop=0.90); 1 thread x 4 concurrent connections.
    return [exe("memcaslap"), "-s", f"{target}:{port}", "-T", "1", "-c", "4",
            "-t", f"{seconds}s"]


def parse_memaslap(stdout: str, stderr: str) -> dict[str, float]:
    # memaslap prints nothing at all when it cannot connect; the summary line
    # is the only sign of a completed run.
    text = _clean(stdout + "\n" + stderr)
    m = _search(r"Run time: ([\d.]+)s Ops: (\d+) TPS: (\d+)", text,
                "'Run time: ... Ops: ... TPS: ...' summary (memcached unreachable?)")
    return {"ops_per_s": float(m.group(3)), "ops": float(m.group(2))}


# --- redis + redis-benchmark -----------------------------------------------------------

def _redis_server(exe: Exe, port: int, workdir: str) -> list[str]:
    return [exe("redis-server"), "--port", str(port), "--bind", "0.0.0.0",
            "--protected-mode", "no", "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--dir", workdir]


# Requests per test (SET, then GET) per second asked for: measured ~34k SET/s
# and ~53k GET/s with 8 clients on loopback here, so 2 x 20k takes about a second.
_REDIS_REQUESTS_PER_SECOND = 20000
_REDIS_MIN_REQUESTS = 10000


def redis_requests(seconds: int) -> int:
    """-n for redis-benchmark (per test): it has no duration option."""
    return max(_REDIS_MIN_REQUESTS, _REDIS_REQUESTS_PER_SECOND * seconds)


def _redis_client(exe: Exe, target: str, port: int, seconds: int, workdir: str) -> list[str]:
    # redis-benchmark never exits (and spins a CPU) when it cannot connect:
    # bound it. --foreground keeps it in the caller's process group, so the
    # harness's group kill still reaches it; the deadline leaves room for a
    # path 4x slower than loopback.
    deadline = 10 + 4 * seconds
    return [exe("timeout"), "--foreground", "-k", "5", str(deadline),
            exe("redis-benchmark"), "-h", target, "-p", str(port), "-c", "8",
            "-t", "set,get", "-n", str(redis_requests(seconds))]


def parse_redis_benchmark(stdout: str, stderr: str) -> dict[str, float]:
    # The full (not -q/--csv) report is parsed because only it says how many
    # requests each test completed.
    text = _clean(stdout + "\n" + stderr)
    parts = re.split(r"^====== (\S+) ======$", text, flags=re.M)
    tests: dict[str, tuple[int, float]] = {}
    for name, body in zip(parts[1::2], parts[2::2]):
        done = re.search(r"(\d+) requests completed in [\d.]+ seconds", body)
        rps = re.search(r"throughput summary: ([\d.]+) requests per second", body)
        if done and rps:
            tests[name] = (int(done.group(1)), float(rps.group(1)))
    missing = [t for t in ("SET", "GET") if t not in tests]
    if missing:
        err = re.search(r"Could not connect to Redis at ([^\n]*)", text)
        why = f" (could not connect to Redis at {err.group(1)})" if err else ""
        raise _NoResult(f"no completed {' and '.join(missing)} test{why}")
    return {"req_per_s": (tests["SET"][1] + tests["GET"][1]) / 2,
            "ops": float(tests["SET"][0] + tests["GET"][0])}


# --- the table ----------------------------------------------------------------------

WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    Workload("iperf3", "tcp", ("gbit_per_s",), "MiB", packages=("iperf3",), bulk=True,
             server_fn=_iperf3_server, client_fn=_iperf3_client, parse_fn=parse_iperf3),
    Workload("sockperf-tcp", "tcp", ("rtt_avg_us", "rtt_p99_us"), "round trip",
             counters=("dropped",), packages=("sockperf",),
             server_fn=_sockperf_server(True), client_fn=_sockperf_client(True),
             parse_fn=parse_sockperf),
    # the same round trips over non-blocking sockets at both ends, as event
    # loops use them (the only pairs sockmap splicing takes: docs/architecture.md)
    Workload("sockperf-tcp-nb", "tcp", ("rtt_avg_us", "rtt_p99_us"), "round trip",
             counters=("dropped",), packages=("sockperf",),
             server_fn=_sockperf_server(True, True), client_fn=_sockperf_client(True, True),
             parse_fn=parse_sockperf),
    # sockperf 3.7's UDP client never connect()s: it sendto()s every message
    # with the server address on an unconnected socket (strace), and has no
    # option to connect it (--client_ip/--client_port only bind()).
    Workload("sockperf-udp", "udp", ("rtt_avg_us", "rtt_p99_us"), "round trip",
             udp_sendto=True, counters=("dropped",), packages=("sockperf",),
             server_fn=_sockperf_server(False), client_fn=_sockperf_client(False),
             parse_fn=parse_sockperf),
    Workload("crr", "tcp", ("conn_per_s",), "connection", counters=("failed",),
             packages=("gcc",),
             server_fn=_crr_server, client_fn=_crr_client, parse_fn=parse_crr),
    Workload("http-close", "tcp", ("req_per_s",), "request", counters=("errors",),
             packages=("nginx-light", "wrk"),
             server_fn=_nginx_server, client_fn=_wrk_client(True), parse_fn=_parse_wrk(True)),
    Workload("http-keepalive", "tcp", ("req_per_s",), "request", counters=("errors",),
             packages=("nginx-light", "wrk"),
             server_fn=_nginx_server, client_fn=_wrk_client(False),
             parse_fn=_parse_wrk(False)),
    Workload("memcached", "tcp", ("ops_per_s",), "op",
             packages=("memcached", "libmemcached-tools"),
             server_fn=_memcached_server, client_fn=_memaslap_client,
             parse_fn=parse_memaslap),
    Workload("redis", "tcp", ("req_per_s",), "request",
             packages=("redis-server", "redis-tools"),
             server_fn=_redis_server, client_fn=_redis_client,
             parse_fn=parse_redis_benchmark),
)}
