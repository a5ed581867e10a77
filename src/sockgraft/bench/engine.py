"""`sockgraft bench engine`: the grafting engine's own figures, side by side in
one run, rounds interleaved (this machine is noisy: only ratios are stable).

  throughput   iperf3, 1 TCP stream: grafted container client vs host client,
               both to a server on the same host (host-loopback limit)
  latency      sockperf TCP ping-pong 64 B: grafted vs host (avg, p99)
  connect      crr (connect/send/recv/close loop): grafted client vs the same
               client on the plain container path, and vs a host client
  accept       crr from the host: to a grafted server vs to a host server
  socket()     grafted at socket(): N socket()+close() in the container, answered
               by the native loop and by the Python threads (flipped per session
               through the agent's control socket), vs a plain container: the
               latency the application sees (p50, p99) and the agent's CPU per
               socket (its threads' schedstat run time); crr on both paths too
  scale        C containers x S grafted sockets on one agent: agent RSS and
               fd count before, at peak, and after everything closed

Raw tool output and results.json go to --out. Must not: decide what a graft
is (the engine does); it only drives real programs through `sockgraft run`.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import time
from importlib import resources
from typing import Callable

from ..agent import control
from ..agent.store import ConfigStore
from ..errors import KernelError
from ..kernel import netns
from ..lab import agents, builder, grafts
from ..lab.traffic import Place, iperf3, popen_in, run_in, wait_listening
from ..model.topology import default_text, parse_topology
from ..paths import state_dir

Progress = Callable[[str], None]


def build_tools(dest: str) -> dict[str, str]:
    """Compile the C workloads shipped with the package (crr, holdsocks, socklat,
    trapfloor)."""
    os.makedirs(dest, exist_ok=True)
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        raise KernelError("build benchmark tools", 2, "no C compiler (apt-get install gcc)")
    out = {}
    for name in ("crr", "holdsocks", "socklat", "trapfloor"):
        src = resources.files("sockgraft").joinpath(f"bench/{name}.c")
        binary = os.path.join(dest, name)
        with resources.as_file(src) as path:
            if not os.path.exists(binary) or os.path.getmtime(binary) < os.path.getmtime(path):
                subprocess.run([cc, "-O2", "-o", binary, str(path)], check=True,
                               capture_output=True, timeout=120)
        out[name] = binary
    return out


_SOCKPERF_AVG = re.compile(r"avg-latency=([\d.]+)")
_SOCKPERF_P99 = re.compile(r"percentile 99\.000 =\s+([\d.]+)")


def _sockperf(place: Place, target: str, port: int, seconds: float) -> dict:
    proc = run_in(place, ["sockperf", "pp", "--tcp", "-i", target, "-p", str(port), "-t",
                          str(seconds), "-m", "64"], timeout=seconds + 30)
    text = proc.stdout + proc.stderr
    avg, p99 = _SOCKPERF_AVG.search(text), _SOCKPERF_P99.search(text)
    if proc.returncode != 0 or not avg or not p99:
        raise KernelError("sockperf", 5, text[-400:])
    # sockperf reports half the round trip; the report uses the round trip.
    return {"rtt_avg_us": 2 * float(avg.group(1)), "rtt_p99_us": 2 * float(p99.group(1)),
            "raw": text}


def _crr(place: Place, crr: str, target: str, port: int, seconds: float,
         nonblocking: bool = False) -> dict:
    proc = run_in(place, [crr, "client-nb" if nonblocking else "client", target, str(port),
                          str(seconds)], timeout=seconds + 30)
    try:
        res = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise KernelError("crr", 5, (proc.stdout + proc.stderr)[-400:]) from None
    if proc.returncode != 0:
        raise KernelError("crr", 5, proc.stderr[-400:])
    return {"conn_per_s": res["conn_per_s"], "raw": proc.stdout}


def _cpu_ns(pid: int) -> dict[str, int]:
    """A process's CPU time so far per thread (schedstat: nanoseconds)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as f:
                out[tid] = int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            pass            # a thread that ended meanwhile
    return out


def _process_cpu_us(pid: int) -> float:
    """A process's user+system CPU so far, its exited threads included (a
    session's notifier threads end with it): /proc/<pid>/stat, clock ticks."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) * 1e6 / os.sysconf("SC_CLK_TCK")


def _cpu_delta_ns(before: dict[str, int], after: dict[str, int]) -> int:
    """CPU spent between two samples: by the threads alive at both, plus all
    of a thread's that started in between (a session's notifier threads). A
    thread of an earlier session that ended meanwhile takes its time with it
    (a plain sum could even go down); a reused thread id never counts less
    than nothing."""
    return sum(max(0, after[t] - before[t]) if t in before else after[t] for t in after)


def _socklat(place: Place, socklat: str, n: int, agent_pid: int | None) -> dict:
    """socklat in place; the agent's CPU time over exactly its loop."""
    proc = popen_in(place, [socklat, str(n)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        if proc.stdout.readline().strip() != "ready":
            raise KernelError("socklat", 5, proc.stderr.read()[-400:])
        before = _cpu_ns(agent_pid) if agent_pid else {}
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline()
        after = _cpu_ns(agent_pid) if agent_pid else {}
        proc.stdin.close()
        proc.wait(timeout=30)
        res = json.loads(line)
    except (ValueError, subprocess.TimeoutExpired) as exc:
        raise KernelError("socklat", 5, str(exc)) from None
    finally:
        _kill(proc)
    if res.get("failed"):
        raise KernelError("socklat", 5, f"{res['failed']} socket() calls failed")
    res["agent_cpu_us_per_socket"] = _cpu_delta_ns(before, after) / 1000 / n
    res["raw"] = line
    return res


def _proc_status(pid: int) -> dict[str, int]:
    out = {"fds": len(os.listdir(f"/proc/{pid}/fd"))}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                out["rss_kib"] = int(line.split()[1])
    return out


def run(rounds: int = 3, seconds: float = 2.0, out_dir: str | None = None,
        scale: tuple[int, int] = (100, 100), progress: Progress = print,
        sockets: int = 20000) -> dict:
    lab = "b" + secrets.token_hex(3)
    text = default_text()
    plan = parse_topology(text, "<default>", name=lab)
    h1 = plan.hosts[0]
    client, server = h1.containers[0], h1.containers[1]
    h1_ip = str(h1.underlay.ip)
    state = state_dir()
    tools = build_tools(os.path.join(state, "bench-bin"))
    raw: list[dict] = []
    series: dict[str, list[float]] = {}
    store = ConfigStore()
    procs: list[subprocess.Popen] = []

    def record(key: str, value: float, rnd: int, raw_text: str = "") -> None:
        series.setdefault(key, []).append(value)
        raw.append({"round": rnd, "measure": key, "value": value, "raw": raw_text})

    progress(f"bench engine: lab {lab}, {rounds} round(s) of {seconds:g} s, "
             f"scale {scale[0]}x{scale[1]}")
    builder.up(plan, text, "<default>")
    try:
        agent_pids = agents.start_agents(plan)
        store.save(grafts.egress_via(client.name, h1_ip, f"{h1_ip}/32"))
        store.save(grafts.ingress_on(server.name, 9200, h1_ip, 9201))
        control.request(control.default_socket_path(h1.name, plan.name), {"op": "reload"})
        host = Place(h1.netns)
        plain_c = Place(client.netns)
        graft_c = Place(client.netns, client.name, lab, graft_at="syscall")
        sock_c = Place(client.netns, client.name, lab, graft_at="socket")
        procs.append(popen_in(host, [tools["crr"], "server", "9100"],
                              stdout=subprocess.DEVNULL, start_new_session=True))
        procs.append(popen_in(host, ["sockperf", "sr", "--tcp", "-i", h1_ip, "-p", "11111"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True))
        procs.append(popen_in(Place(server.netns, server.name, lab),
                              [tools["crr"], "server", "9200"], stdout=subprocess.DEVNULL,
                              start_new_session=True))
        wait_listening(h1.netns, 9100)
        wait_listening(h1.netns, 11111)
        wait_listening(h1.netns, 9201)      # the grafted server listens on the host side
        agent_path = control.default_socket_path(h1.name, plan.name)
        native_ok = control.request(agent_path, {"op": "native", "on": True})["native"]
        for rnd in range(1, rounds + 1):
            progress(f"  round {rnd}/{rounds}: iperf3")
            for key, place in _order(rnd, ("tput_host", host), ("tput_graft", graft_c),
                                     ("tput_socket", sock_c)):
                r = iperf3(host, 5301, place, h1_ip, 5301, seconds, name=key)
                record(key, r["gbit_per_s"], rnd, r["raw"])
            progress(f"  round {rnd}/{rounds}: sockperf")
            for key, place in _order(rnd, ("rtt_host", host), ("rtt_graft", graft_c),
                                     ("rtt_socket", sock_c)):
                r = _sockperf(place, h1_ip, 11111, seconds)
                record(key, r["rtt_avg_us"], rnd, r["raw"])
                record(key.replace("rtt", "p99"), r["rtt_p99_us"], rnd)
            progress(f"  round {rnd}/{rounds}: connect rate")
            for key, place in _order(rnd, ("conn_plain", plain_c), ("conn_graft", graft_c),
                                     ("conn_socket", sock_c), ("conn_host", host),
                                     ("conn_plain_nb", plain_c)):
                r = _crr(place, tools["crr"], h1_ip, 9100, seconds, key.endswith("_nb"))
                record(key, r["conn_per_s"], rnd, r["raw"])
            progress(f"  round {rnd}/{rounds}: socket() answered natively and in Python")
            for key, on in _order(rnd, ("native", True), ("python", False), ("plain", None)):
                if on and not native_ok:
                    continue                        # not built: the Python figures only
                if on is not None:
                    control.request(agent_path, {"op": "native", "on": on})
                place = plain_c if on is None else sock_c
                r = _socklat(place, tools["socklat"], sockets,
                             None if on is None else agent_pids[h1.name])
                record(f"socklat_p50_{key}", r["p50_us"], rnd, r["raw"])
                record(f"socklat_p99_{key}", r["p99_us"], rnd)
                if on is not None:
                    record(f"agent_cpu_{key}", r["agent_cpu_us_per_socket"], rnd)
                    c = _crr(sock_c, tools["crr"], h1_ip, 9100, seconds)
                    record(f"conn_socket_{key}", c["conn_per_s"], rnd, c["raw"])
                    # connect() of a syscall-mode client: grafted by the native
                    # loop or by the Python grafter; blocking and non-blocking
                    for nb in ("", "_nb"):
                        cpu0 = _process_cpu_us(agent_pids[h1.name])
                        c = _crr(graft_c, tools["crr"], h1_ip, 9100, seconds, bool(nb))
                        conns = max(1, json.loads(c["raw"]).get("conns", 0))
                        record(f"conn_graft{nb}_{key}", c["conn_per_s"], rnd, c["raw"])
                        record(f"agent_cpu_connect{nb}_{key}",
                               (_process_cpu_us(agent_pids[h1.name]) - cpu0) / conns, rnd)
            control.request(agent_path, {"op": "native", "on": native_ok})
            progress(f"  round {rnd}/{rounds}: accept rate")
            for key, port in _order(rnd, ("accept_host", 9100), ("accept_graft", 9201)):
                r = _crr(host, tools["crr"], h1_ip, port, seconds)
                record(key, r["conn_per_s"], rnd, r["raw"])
        scale_res = _scale(plan, lab, tools["holdsocks"], agent_pids[h1.name], *scale,
                           progress=progress, probe=(graft_c, h1_ip, 9100)) \
            if scale[0] > 0 else {}
    finally:
        for p in procs:
            _kill(p)
        for c in (client, server):
            store.delete(c.name)
        builder.down(lab)
    result = summarize(series, rounds, seconds)
    result["scale"] = scale_res
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "engine-raw.json"), "w") as f:
            json.dump(raw, f)
        with open(os.path.join(out_dir, "engine-results.json"), "w") as f:
            json.dump(result, f, indent=1)
    return result


def _order(rnd: int, *items):
    """Alternate the order within a round so neither side always goes first."""
    return items if rnd % 2 else tuple(reversed(items))


def _ratio_med(a: list[float], b: list[float]) -> float:
    return statistics.median(x / y for x, y in zip(a, b) if y)


def summarize(series: dict[str, list[float]], rounds: int, seconds: float) -> dict:
    med = {k: statistics.median(v) for k, v in series.items()}
    ratios = {
        "throughput graft/host": _ratio_med(series["tput_graft"], series["tput_host"]),
        "rtt avg graft/host": _ratio_med(series["rtt_graft"], series["rtt_host"]),
        "rtt p99 graft/host": _ratio_med(series["p99_graft"], series["p99_host"]),
        "connect rate graft/plain container": _ratio_med(series["conn_graft"],
                                                         series["conn_plain"]),
        "connect rate graft/host": _ratio_med(series["conn_graft"], series["conn_host"]),
        "throughput socket-graft/host": _ratio_med(series["tput_socket"], series["tput_host"]),
        "rtt avg socket-graft/host": _ratio_med(series["rtt_socket"], series["rtt_host"]),
        "connect rate socket-graft/plain container": _ratio_med(series["conn_socket"],
                                                                series["conn_plain"]),
        "connect rate socket-graft/host": _ratio_med(series["conn_socket"],
                                                     series["conn_host"]),
        "accept rate graft server/host server": _ratio_med(series["accept_graft"],
                                                           series["accept_host"]),
    }
    if series.get("conn_socket_native") and series.get("conn_socket_python"):
        ratios["connect rate socket-graft native/python"] = _ratio_med(
            series["conn_socket_native"], series["conn_socket_python"])
        ratios["agent cpu per socket native/python"] = _ratio_med(
            series["agent_cpu_native"], series["agent_cpu_python"])
    for key in ("native", "python"):
        if series.get(f"conn_graft_{key}"):
            ratios[f"connect rate syscall-graft {key}/plain container"] = _ratio_med(
                series[f"conn_graft_{key}"], series["conn_plain"])
        if series.get(f"conn_graft_nb_{key}") and series.get("conn_plain_nb"):
            ratios[f"connect rate syscall-graft non-blocking {key}/plain container"] = \
                _ratio_med(series[f"conn_graft_nb_{key}"], series["conn_plain_nb"])
    return {"rounds": rounds, "seconds": seconds, "series": series, "median": med,
            "ratios": ratios}


# Each connect() of a grafted (syscall-mode) Python client is trapped: its
# latency is the agent loop's response time. Quantiles in microseconds.
LATENCY_PROBE = r"""
import json, socket, sys, time
host, port, secs = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
lat = []
end = time.monotonic() + secs
while time.monotonic() < end:
    s = socket.socket()
    t = time.perf_counter()
    s.connect((host, port))
    lat.append(time.perf_counter() - t)
    s.close()
    time.sleep(0.002)
lat.sort()
q = lambda f: round(lat[min(len(lat) - 1, int(len(lat) * f))] * 1e6, 1)
print(json.dumps({"n": len(lat), "p50_us": q(0.5), "p99_us": q(0.99), "max_us": q(1.0)}))
"""


def _latency(place: Place, target: str, port: int, seconds: float) -> subprocess.Popen:
    return popen_in(place, [sys.executable, "-c", LATENCY_PROBE, target, str(port),
                            str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                    text=True, start_new_session=True)


def _latency_result(p: subprocess.Popen) -> dict:
    out, err = p.communicate(timeout=120)
    try:
        return json.loads(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        raise KernelError("latency probe", 0, f"no result: {err.strip()[-300:]}") from None


def _scale(plan, lab: str, holdsocks: str, agent_pid: int, containers: int, sockets: int,
           progress: Progress, probe: tuple | None = None) -> dict:
    """`containers` registered containers, each a process holding `sockets`
    grafted UDP sockets, all on one agent. probe (place, host, port): the
    latency of a grafted client's trapped connect(), quiet and while the
    containers register all at once."""
    h1 = plan.hosts[0]
    ns_path = netns.path(h1.containers[0].netns)
    agent_path = control.default_socket_path(h1.name, plan.name)
    store = ConfigStore()
    names = [f"scale-{i:03d}" for i in range(containers)]
    for n in names:
        store.save(grafts.ingress_on(n, f"20000-{20000 + sockets - 1}", str(h1.underlay.ip),
                                     "dynamic"))
    time.sleep(1.5)        # let the agent's sweep settle before the baseline
    before = _proc_status(agent_pid)
    quiet = storm = None
    if probe is not None:
        progress("  scale: connect latency, quiet")
        quiet = _latency_result(_latency(probe[0], probe[1], probe[2], 2.0))
    progress(f"  scale: starting {containers} containers x {sockets} sockets")
    lat = _latency(probe[0], probe[1], probe[2], 6.0) if probe is not None else None
    time.sleep(0.5)        # the probe is running before the first registration
    t0 = time.monotonic()
    procs = []
    try:
        for n in names:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "sockgraft.cli.main", "run", "--container", n, "--netns",
                 ns_path, "--agent", agent_path, "--", holdsocks, str(sockets), "20000"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                text=True, start_new_session=True))
        ready = 0
        for p in procs:
            line = p.stdout.readline()
            if line.startswith("ready"):
                ready += int(line.split()[1])
        setup = time.monotonic() - t0
        if lat is not None:
            storm = _latency_result(lat)
            lat = None
        stats = control.request(agent_path, {"op": "stats"})
        peak = _proc_status(agent_pid)
        progress(f"  scale: {ready} sockets grafted in {setup:.1f} s; closing")
        for p in procs:
            p.stdin.close()
        for p in procs:
            p.wait(timeout=60)
        time.sleep(2.5)    # one sweep interval and then some
        after = _proc_status(agent_pid)
    finally:
        for p in procs:
            _kill(p)
        if lat is not None:
            _kill(lat)
        for n in names:
            store.delete(n)
    return {"containers": containers, "sockets_per_container": sockets,
            "connect_latency_quiet": quiet, "connect_latency_storm": storm,
            "sockets_grafted": ready, "setup_s": setup,
            "grafted_counter": stats["counters"]["grafted"],
            "agent_before": before, "agent_peak": peak, "agent_after": after}


def _kill(p: subprocess.Popen) -> None:
    import signal
    if p.poll() is None:
        try:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            p.wait()


def render(result: dict) -> str:
    med = result["median"]
    lines = [f"sockgraft engine benchmark: {result['rounds']} round(s), "
             f"{result['seconds']:g} s each; medians (ratios are medians of per-round ratios)",
             "",
             "| measure | host | plain container | grafted at syscall | ratio | "
             "grafted at socket | ratio |",
             "|---|---|---|---|---|---|---|"]
    r = result["ratios"]
    lines.append(f"| iperf3 Gbit/s | {med['tput_host']:.2f} | | {med['tput_graft']:.2f} | "
                 f"{r['throughput graft/host']:.2f}x host | {med['tput_socket']:.2f} | "
                 f"{r['throughput socket-graft/host']:.2f}x host |")
    lines.append(f"| TCP RTT avg us | {med['rtt_host']:.1f} | | {med['rtt_graft']:.1f} | "
                 f"{r['rtt avg graft/host']:.2f}x host | {med['rtt_socket']:.1f} | "
                 f"{r['rtt avg socket-graft/host']:.2f}x host |")
    lines.append(f"| TCP RTT p99 us | {med['p99_host']:.1f} | | {med['p99_graft']:.1f} | "
                 f"{r['rtt p99 graft/host']:.2f}x host | {med['p99_socket']:.1f} | |")
    lines.append(f"| client conn/s | {med['conn_host']:.0f} | {med['conn_plain']:.0f} | "
                 f"{med['conn_graft']:.0f} | {r['connect rate graft/plain container']:.2f}x "
                 f"plain | {med['conn_socket']:.0f} | "
                 f"{r['connect rate socket-graft/plain container']:.2f}x plain |")
    lines.append(f"| server accept/s | {med['accept_host']:.0f} | | {med['accept_graft']:.0f} "
                 f"| {r['accept rate graft server/host server']:.2f}x host | | |")
    if "socklat_p50_plain" in med:
        lines += ["", "socket() of a socket-mode container (N socket()+close(), latency as the "
                      "application sees it; agent CPU: all its threads, over the loop only)",
                  "", "| socket() answered by | p50 us | p99 us | agent CPU us/socket | "
                      "crr conn/s |", "|---|---|---|---|---|"]
        for key, what in (("native", "native loop (C)"), ("python", "Python threads"),
                          ("plain", "nobody (plain container)")):
            if f"socklat_p50_{key}" in med:
                cpu = f"{med[f'agent_cpu_{key}']:.1f}" if f"agent_cpu_{key}" in med else ""
                crr = f"{med[f'conn_socket_{key}']:.0f}" if f"conn_socket_{key}" in med else ""
                lines.append(f"| {what} | {med[f'socklat_p50_{key}']:.1f} | "
                             f"{med[f'socklat_p99_{key}']:.1f} | {cpu} | {crr} |")
        if "connect rate socket-graft native/python" in r:
            lines += ["", f"native/python: crr {r['connect rate socket-graft native/python']:.2f}x"
                          f", agent CPU per socket {r['agent cpu per socket native/python']:.2f}x"]
    if any(f"conn_graft_{k}" in med for k in ("native", "python")):
        lines += ["", "connect() of a syscall-mode container (crr to the host; agent CPU: "
                      "the whole process, per connection; non-blocking: connect -> "
                      "EINPROGRESS -> poll, as Go and event loops do)", "",
                  "| connect() grafted by | sockets | crr conn/s | ratio to plain container | "
                  "agent CPU us/connect |", "|---|---|---|---|---|"]
        for nb, how in (("", "blocking"), ("_nb", "non-blocking")):
            for key, what in (("native", "native loop (C)"), ("python", "Python grafter")):
                ratio = r.get(f"connect rate syscall-graft {'non-blocking ' if nb else ''}"
                              f"{key}/plain container")
                if f"conn_graft{nb}_{key}" in med and ratio is not None:
                    lines.append(f"| {what} | {how} | {med[f'conn_graft{nb}_{key}']:.0f} | "
                                 f"{ratio:.2f}x | {med[f'agent_cpu_connect{nb}_{key}']:.1f} |")
            if f"conn_plain{nb}" in med:
                lines.append(f"| nobody (plain container) | {how} | "
                             f"{med[f'conn_plain{nb}']:.0f} | 1.00x | |")
    s = result.get("scale") or {}
    if s:
        b, p, a = s["agent_before"], s["agent_peak"], s["agent_after"]
        lines += ["", f"scale: {s['containers']} containers x {s['sockets_per_container']} "
                      f"sockets = {s['sockets_grafted']} grafted in {s['setup_s']:.1f} s",
                  "",
                  "| agent | before | peak | after close |", "|---|---|---|---|",
                  f"| RSS MiB | {b['rss_kib'] / 1024:.1f} | {p['rss_kib'] / 1024:.1f} | "
                  f"{a['rss_kib'] / 1024:.1f} |",
                  f"| open fds | {b['fds']} | {p['fds']} | {a['fds']} |"]
        q, st = s.get("connect_latency_quiet"), s.get("connect_latency_storm")
        if q and st:
            lines += ["", "| trapped connect() latency, us | p50 | p99 | max | n |",
                      "|---|---|---|---|---|",
                      f"| quiet | {q['p50_us']:.0f} | {q['p99_us']:.0f} | {q['max_us']:.0f} "
                      f"| {q['n']} |",
                      f"| while {s['containers']} containers register | {st['p50_us']:.0f} | "
                      f"{st['p99_us']:.0f} | {st['max_us']:.0f} | {st['n']} |"]
    return "\n".join(lines) + "\n"
