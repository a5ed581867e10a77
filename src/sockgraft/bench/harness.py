"""`sockgraft bench`: real, unmodified workloads over every path of a lab of
its own, interleaved round by round, with raw output kept for every run.

Paths (names as in the report):
  host-loopback  h1 -> 127.0.0.1 on h1                      (same-host limit)
  host-underlay  h1 -> h2's underlay address                (cross-host limit)
  trap-floor     host-loopback with the client's socket() calls trapped (seccomp user
                 notification) and answered CONTINUE by a supervisor that does nothing
                 else (bench/trapfloor.c): the least any per-connection trap costs
  bridge         h1-c1 -> h1-c2 by container IP
  nat            h1-c1 -> h2:PORT published, DNAT to h2-c1, masqueraded
  vxlan          h1-c1 -> h2-c2 by container IP over the overlay
  graft-local    grafted h1-c1 -> h1-c2 by container IP; h1-c2's server is grafted
                 (ingress on h1's address), the directory sends the client there
  graft-splice   graft-local with h1's agent splicing the pair (--sockmap auto;
                 switched on for this path only, off for graft-local, per run)
  graft-remote   grafted h1-c1 -> h2-c2 by container IP; h2-c2's server is grafted
                 (ingress on h2's address): the cross-host overlay bypass
  fast-local     the bridge path (plain, unmodified programs) with h1's agent's packet
                 fast path on the containers' interfaces (--fastpath auto; its programs
                 are on the interfaces for the fast paths only, off the others, per run)
  fast-remote    the vxlan path (plain programs) with both agents' fast path: packets
                 encapsulated at h1-c1's veth, decapsulated at h2's underlay device

The grafted client runs with graft_at = "socket" (every socket a host socket
from birth, connects judged and redirected in the kernel); the grafted
servers with the default graft_at = "syscall" (their bind() is grafted).

Ports: a workload's base port P is what every server binds. Published ports
take P on h2's address (like docker -p), so host-underlay serves on P+1; the
grafted servers' ingress endpoints are P+2 on h1 and P+3 on h2. Base ports
are at least 4 apart so no offset lands on another workload's published port
(a unit test checks it).
Must not: parse tool output (bench/workloads) or render reports (bench/report).
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from ..agent.store import ConfigStore
from ..errors import SockgraftError
from ..lab import agents, builder, grafts
from ..lab.traffic import Place, wait_listening
from ..model import graftconfig as gc
from ..model.endpoint import make_endpoint, parse_egress, parse_ingress
from ..model.paths import BENCH_PATHS
from ..model.topology import parse_topology
from . import report
from .engine import build_tools
from ..paths import state_dir

PATHS = BENCH_PATHS
QUICK_WORKLOADS = ("iperf3", "sockperf-tcp", "crr")
PORTS = {"iperf3": 5201, "sockperf-tcp": 11111, "sockperf-udp": 11121,
         "sockperf-tcp-nb": 11131, "crr": 9100,
         "http-close": 8080, "http-keepalive": 8090, "memcached": 11211, "redis": 6379}

Progress = Callable[[str], None]


def topology_text(lab: str) -> str:
    pubs = ", ".join(f'"{p}:{p}/{"udp" if w == "sockperf-udp" else "tcp"}"'
                     for w, p in PORTS.items())
    return f"""name = "{lab}"
[[hosts]]
name = "h1"
containers = ["h1-c1", "h1-c2"]
[[hosts]]
name = "h2"
containers = [{{ name = "h2-c1", publish = [{pubs}] }}, "h2-c2"]
"""


@dataclass(frozen=True)
class Run:
    """Where the two ends of one path run, for one workload."""
    server: Place
    server_port: int
    listen: tuple[str, int]     # (netns, port) where the server socket really is
    client: Place
    target: str
    target_port: int
    overlay: bool = False       # the target is a container IP the directory must know


def plan_runs(plan, lab: str, port: int, trapfloor: str = "trapfloor") -> dict[str, Run]:
    """trapfloor: the path of the built bench/trapfloor.c (build_tools)."""
    h1, h2 = plan.hosts[0], plan.hosts[1]
    c11, c12 = h1.containers[0], h1.containers[1]
    c21, c22 = h2.containers[0], h2.containers[1]
    h1_ip, h2_ip = str(h1.underlay.ip), str(h2.underlay.ip)

    def at(node, graft=False):
        return Place(node.netns, node.name if graft else None, lab)

    client = Place(c11.netns, c11.name, lab, graft_at="socket")

    return {
        "host-loopback": Run(at(h1), port, (h1.netns, port), at(h1), "127.0.0.1", port),
        "trap-floor": Run(at(h1), port, (h1.netns, port),
                          Place(h1.netns, lab=lab, wrap=(trapfloor,)), "127.0.0.1", port),
        "host-underlay": Run(at(h2), port + 1, (h2.netns, port + 1), at(h1), h2_ip, port + 1),
        "bridge": Run(at(c12), port, (c12.netns, port), at(c11), str(c12.ipv4.ip), port),
        "fast-local": Run(at(c12), port, (c12.netns, port), at(c11), str(c12.ipv4.ip), port),
        "nat": Run(at(c21), port, (c21.netns, port), at(c11), h2_ip, port),
        "vxlan": Run(at(c22), port, (c22.netns, port), at(c11), str(c22.ipv4.ip), port),
        "fast-remote": Run(at(c22), port, (c22.netns, port), at(c11), str(c22.ipv4.ip), port),
        "graft-local": Run(at(c12, True), port, (h1.netns, port + 2), client,
                           str(c12.ipv4.ip), port, overlay=True),
        "graft-splice": Run(at(c12, True), port, (h1.netns, port + 2), client,
                            str(c12.ipv4.ip), port, overlay=True),
        "graft-remote": Run(at(c22, True), port, (h2.netns, port + 3), client,
                            str(c22.ipv4.ip), port, overlay=True),
    }


def graft_configs(plan, ports: dict[str, int]) -> list[gc.GraftConfig]:
    """h1-c1's traffic to the underlay leaves from h1's address; every base port
    bound in h1-c2 / h2-c2 really listens on P+2 on h1 / P+3 on h2."""
    h1, h2 = plan.hosts[0], plan.hosts[1]
    client = grafts.egress_via(h1.containers[0].name, str(h1.underlay.ip), str(plan.underlay))
    client = gc.with_rule(client, parse_egress(f"{plan.container_v4}=ep-out"))
    out = [gc.with_graft_at(client, "socket")]
    for container, host, offset in ((h1.containers[1], h1, 2), (h2.containers[1], h2, 3)):
        cfg = gc.GraftConfig(container.name)
        for name, port in ports.items():
            ep = f"ep-{name}"
            cfg = gc.with_endpoint(cfg, make_endpoint(ep, "ipv4", addr=str(host.underlay.ip),
                                                      port=port + offset))
            for rule in (f"0.0.0.0:{port}={ep}", f"[::]:{port}={ep}"):
                cfg = gc.with_rule(cfg, parse_ingress(rule))
        out.append(cfg)
    return out


def _cpu_busy_jiffies() -> int:
    with open("/proc/stat") as f:   # the aggregate "cpu" line, in clock ticks
        vals = [int(v) for v in f.readline().split()[1:]]
    return sum(vals) - vals[3] - vals[4]        # all but idle and iowait


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=5)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()


class ProgressBar:
    def __init__(self, total: int, out=sys.stderr) -> None:
        self.total, self.done, self.out = total, 0, out
        self.tty = out.isatty()
        self.t0 = time.monotonic()

    def step(self, label: str) -> None:
        self.done += 1
        width = 30
        fill = int(width * self.done / self.total)
        elapsed = time.monotonic() - self.t0
        eta = elapsed / self.done * (self.total - self.done)
        line = (f"[{'#' * fill}{'.' * (width - fill)}] {self.done}/{self.total} "
                f"{label:32s} {elapsed:5.0f}s elapsed, ~{eta:4.0f}s left")
        self.out.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and self.done == self.total:
            self.out.write("\n")
        self.out.flush()


def pinned(argv: list[str], cpu: int | None) -> list[str]:
    """argv run on one CPU (taskset; its children inherit it), or as is."""
    return argv if cpu is None else ["taskset", "-c", str(cpu), *argv]


def measure(wl, run: Run, seconds: int, workdir: str, tools: dict[str, str],
            pin: int | None = None) -> dict:
    """One server + one client run; returns {"metrics", "raw"} or raises.
    pin: run both ends on that CPU (the agents stay where the scheduler
    puts them)."""
    server = subprocess.Popen(pinned(run.server.command(wl.server_argv(run.server_port,
                                                                        workdir)), pin),
                              preexec_fn=run.server.preexec(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, start_new_session=True, cwd=workdir)
    try:
        wait_listening(*run.listen, timeout=10, proto=wl.proto)
        if run.overlay:
            agents.wait_published(run.client.lab, "h1", wl.proto, run.target, run.target_port)
        client = run.client
        cmd = client.command(wl.client_argv(run.target, run.target_port, seconds, workdir))
        if client.graft is not None and wl.udp_sendto and client.graft_at != "socket":
            cmd.insert(cmd.index("--"), "--udp-sendto")   # an unconnected UDP sender
        cmd = pinned(cmd, pin)
        before = _cpu_busy_jiffies()
        proc = subprocess.run(cmd, preexec_fn=client.preexec(), capture_output=True, text=True,
                              timeout=seconds * 4 + 60, cwd=workdir)
        busy = _cpu_busy_jiffies() - before
        metrics = wl.parse(proc.stdout, proc.stderr)
        ops = metrics.pop("ops", 0)
        if ops:
            metrics["cpu_us_per_op"] = busy * (1e6 / os.sysconf("SC_CLK_TCK")) / ops
        return {"metrics": metrics, "raw": f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"}
    finally:
        _stop(server)


def _splice(plan, on: bool) -> None:
    """h1's agent splices connections established from now on, or not."""
    from ..agent import control
    control.request(control.default_socket_path(plan.hosts[0].name, plan.name),
                    {"op": "sockmap", "on": on}, timeout=5)


def _fastpath(plan, on: bool) -> None:
    """The fast path's programs on both hosts' interfaces, or off them (every
    other path measures the nodes without them). On: the overlay's
    underlay neighbours resolved first (one ping each way, normal path) so
    the encapsulation cache is complete before the run."""
    from ..agent import control
    for h in plan.hosts:
        control.request(control.default_socket_path(h.name, plan.name),
                        {"op": "fastpath", "on": on}, timeout=10)
    if on:
        warm_overlay(plan)


def warm_overlay(plan, timeout: float = 5.0) -> None:
    from ..agent import control
    c11, c22 = plan.hosts[0].containers[0], plan.hosts[1].containers[1]
    for src, dst in ((c11, c22), (c22, c11)):
        subprocess.run(["ip", "netns", "exec", src.netns, "ping", "-c", "1", "-W", "1",
                        str(dst.ipv4.ip)], capture_output=True)
    deadline = time.monotonic() + timeout
    for h in plan.hosts:
        path = control.default_socket_path(h.name, plan.name)
        while control.request(path, {"op": "fastpath"}, timeout=10).get("remote_routes", 0) \
                < 1 and time.monotonic() < deadline:
            time.sleep(0.05)


def run(paths=PATHS, workload_names=None, rounds: int = 3, seconds: int = 3,
        out_dir: str = "bench-out", progress: Progress | None = None,
        pin: int | None = None, pin_rr: int | None = None) -> dict:
    """pin: both ends of every measure on that CPU; pin_rr: the same for the
    request/response workloads only (bulk transfers keep every CPU)."""
    from . import workloads as wmod
    for flag, cpu in (("--pin", pin), ("--pin-rr", pin_rr)):
        if cpu is not None and cpu not in os.sched_getaffinity(0):
            from ..errors import ConfigError
            raise ConfigError(f"{flag} {cpu}: not a CPU this process may use "
                              f"({', '.join(map(str, sorted(os.sched_getaffinity(0))))})")
    names = list(workload_names or wmod.WORKLOADS)
    unknown = [n for n in names if n not in wmod.WORKLOADS] + [p for p in paths
                                                                if p not in PATHS]
    if unknown:
        from ..errors import ConfigError
        raise ConfigError(f"unknown workload/path {', '.join(unknown)}; workloads: "
                          f"{', '.join(wmod.WORKLOADS)}; paths: {', '.join(PATHS)}")
    lab = "k" + secrets.token_hex(3)
    text = topology_text(lab)
    plan = parse_topology(text, "<bench>")
    os.makedirs(os.path.join(out_dir, "raw"), exist_ok=True)
    state = state_dir()
    tools = build_tools(os.path.join(state, "bench-bin"))
    store = ConfigStore()
    configs = graft_configs(plan, {n: PORTS[n] for n in names})
    runs: list[dict] = []
    failures: list[dict] = []
    bar = ProgressBar(rounds * len(names) * len(paths))
    t0 = time.monotonic()
    builder.up(plan, text, "<bench>")
    try:
        splicing = "graft-splice" in paths
        fast = any(p.startswith("fast") for p in paths)
        if any(p.startswith(("graft", "fast")) for p in paths):
            agents.start_agents(plan, agent_args=(("--sockmap", "auto") if splicing else ())
                                + (("--fastpath", "auto") if fast else ()))
            for cfg in configs:
                store.save(cfg)
            from ..agent import control
            for h in plan.hosts:
                control.request(control.default_socket_path(h.name, plan.name),
                                {"op": "reload"})
        for rnd in range(1, rounds + 1):
            for name in names:
                wl = wmod.WORKLOADS[name].with_tools(tools)
                order = paths if rnd % 2 else tuple(reversed(paths))
                runs_of = plan_runs(plan, lab, PORTS[name], tools["trapfloor"])
                for path in order:
                    bar.step(f"r{rnd} {name} {path}")
                    workdir = tempfile.mkdtemp(prefix="sgbench-")
                    raw_name = f"r{rnd}-{name}-{path}.txt"
                    try:
                        if splicing and path.startswith("graft"):
                            _splice(plan, path == "graft-splice")
                        if fast:
                            _fastpath(plan, path.startswith("fast"))
                        res = measure(wl, runs_of[path], seconds, workdir, tools,
                                      pin if pin is not None else
                                      (None if wl.bulk else pin_rr))
                        runs.append({"round": rnd, "workload": name, "path": path,
                                     "metrics": res["metrics"], "raw": f"raw/{raw_name}"})
                        raw_text = res["raw"]
                    except (SockgraftError, OSError, subprocess.SubprocessError) as exc:
                        failures.append({"round": rnd, "workload": name, "path": path,
                                         "error": str(exc)[:300]})
                        raw_text = f"FAILED: {exc}"
                    finally:
                        shutil.rmtree(workdir, ignore_errors=True)
                    with open(os.path.join(out_dir, "raw", raw_name), "w") as f:
                        f.write(raw_text)
    finally:
        for cfg in configs:
            store.delete(cfg.container)
        builder.down(lab)
    results = report.build(runs, {"rounds": rounds, "seconds": seconds, "pin": pin,
                                  "pin_rr": pin_rr if pin is None else None,
                                  "paths": list(paths),
                                  "workloads": names, "failures": failures,
                                  "duration_s": round(time.monotonic() - t0, 1)})
    report.write_outputs(results, out_dir)
    return results
