"""`sockgraft bench policy`: the data-path policy of the packet fast path at
scale - a lab of its own with N containers (all configured, all judged),
then

  enforcement  how long after a policy change a flow it denies stops: a UDP
               sender in h1-c1 sends a numbered datagram every millisecond to
               h1-c2; each change denies (then allows again) that flow; the
               time from the change to the last datagram that still arrived,
               p50/p99/max over the changes. Two clocks: from the agent's
               reload request (what the agent and kernel take) and from the
               start of the `sockgraft policy add` process (what an operator
               waits, Python start-up included).
  rules        iperf3 and crr from h1-c1 to a container of h2 through the
               fast path (fast-remote) with h1-c1's policy 0 rules against
               RULES rules (the deciding one last), interleaved rounds.

Must not: parse tool output (bench/workloads) or decide policy (model/).
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from ..agent import control
from ..agent.store import ConfigStore
from ..lab import agents, builder
from ..lab.traffic import Place
from ..model import graftconfig as gc
from ..model.policy import Policy, parse_policy_rule
from ..model.topology import parse_topology
from ..kernel import netns
from ..paths import state_dir
from .engine import build_tools

UDP_PORT = 7400
SEQ = struct.Struct("!Id")


def topology_text(lab: str, containers: int) -> str:
    h1 = ", ".join(f'"h1-c{i}"' for i in range(1, containers - 1))
    return f"""name = "{lab}"
[[hosts]]
name = "h1"
containers = [{h1}]
[[hosts]]
name = "h2"
containers = ["h2-c1", "h2-c2"]
"""


def _percentile(vals: list[float], q: float) -> float:
    s = sorted(vals)
    return s[min(len(s) - 1, int(round(q * (len(s) - 1))))]


def _receiver(ns: str, addr: str, stop: threading.Event, last: list) -> threading.Thread:
    """A UDP receiver in `ns` (a thread that entered the namespace): last[0]
    = monotonic time of the latest datagram."""
    ready = threading.Event()

    def body():
        netns.enter(ns)         # this thread only (setns on a thread)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, UDP_PORT))
        s.settimeout(0.05)
        ready.set()
        while not stop.is_set():
            try:
                s.recv(64)
            except socket.timeout:
                continue
            last[0] = time.monotonic()
        s.close()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    ready.wait(5)
    return t


def _sender(ns: str, addr: str, stop: threading.Event) -> threading.Thread:
    def body():
        netns.enter(ns)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        n = 0
        while not stop.is_set():
            try:
                s.sendto(SEQ.pack(n, time.monotonic()), (addr, UDP_PORT))
            except OSError:
                pass
            n += 1
            time.sleep(0.001)
        s.close()

    t = threading.Thread(target=body, daemon=True)
    t.start()
    return t


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.002)
    return False


def enforcement(plan, store: ConfigStore, changes: int, progress) -> dict:
    """Deny, then allow again, the flow h1-c1 -> h1-c2:UDP_PORT `changes`
    times each way of changing it; seconds from the change to the last
    datagram that arrived."""
    h1 = plan.hosts[0]
    c1, c2 = h1.containers[0], h1.containers[1]
    sock = control.default_socket_path(h1.name, plan.name)
    deny = parse_policy_rule(f"deny udp {c2.ipv4.ip} {UDP_PORT}")
    out: dict[str, list[float]] = {"agent": [], "command": []}
    stop, last = threading.Event(), [0.0]
    threads = [_receiver(c2.netns, str(c2.ipv4.ip), stop, last),
               _sender(c1.netns, str(c2.ipv4.ip), stop)]
    env = dict(os.environ)
    try:
        if not _wait(lambda: time.monotonic() - last[0] < 0.05, 5):
            raise RuntimeError("no datagram reached h1-c2 before any change")
        for i in range(changes):
            for how in ("agent", "command"):
                t0 = time.monotonic()
                if how == "agent":
                    store.edit(c1.name, lambda cfg: gc.with_policy_rule(cfg, deny))
                    t0 = time.monotonic()
                    control.request(sock, {"op": "reload", "container": c1.name}, timeout=10)
                else:
                    subprocess.run([sys.executable, "-m", "sockgraft.cli.main", "policy", "add",
                                    "--container", c1.name, "deny", "udp",
                                    str(c2.ipv4.ip), str(UDP_PORT)],
                                   env=env, capture_output=True, check=True, timeout=30)
                # stopped: nothing for 200 ms; the last arrival is when it took
                _wait(lambda: time.monotonic() - last[0] > 0.2, 10)
                out[how].append(max(0.0, last[0] - t0))
                store.edit(c1.name, lambda cfg: gc.without_policy_rule(cfg, deny))
                control.request(sock, {"op": "reload", "container": c1.name}, timeout=10)
                if not _wait(lambda: time.monotonic() - last[0] < 0.01, 5):
                    raise RuntimeError("the flow did not resume after the rule went")
            progress(f"policy change {i + 1}/{changes}: agent {out['agent'][-1] * 1e3:.1f} ms, "
                     f"command {out['command'][-1] * 1e3:.1f} ms")
    finally:
        stop.set()
        for t in threads:
            t.join(2)
    return {how: {"changes": len(v), "p50_ms": _percentile(v, 0.5) * 1e3,
                  "p99_ms": _percentile(v, 0.99) * 1e3, "max_ms": max(v) * 1e3}
            for how, v in out.items()}


def rules_cost(plan, store: ConfigStore, rules: int, rounds: int, seconds: int,
               tools: dict, progress) -> dict:
    """fast-remote iperf3 and crr with h1-c1's policy empty against `rules`
    rules (the deciding allow last, behind rules-1 denies that never match)."""
    from . import workloads as wmod
    from .harness import Run, warm_overlay, measure
    h1, h2 = plan.hosts[0], plan.hosts[1]
    c1, dst = h1.containers[0], h2.containers[0]
    many = tuple(parse_policy_rule(f"deny tcp 10.{i // 250}.{i % 250}.0/24")
                 for i in range(max(0, rules - 9)))        # + 8 built-in denies + 1 allow
    allow = (parse_policy_rule("allow any 198.19.0.0/16"),)
    policies = {"0 rules": Policy(), f"{rules} rules": Policy(allow=allow, deny=many)}
    out: dict[str, dict[str, list[float]]] = {k: {} for k in policies}
    for rnd in range(1, rounds + 1):
        for name in ("iperf3", "crr"):
            wl = wmod.WORKLOADS[name].with_tools(tools)
            port = 5301 if name == "iperf3" else 9301
            run = Run(Place(dst.netns), port, (dst.netns, port), Place(c1.netns),
                      str(dst.ipv4.ip), port)
            order = list(policies) if rnd % 2 else list(reversed(policies))
            for label in order:
                cfg = store.load(c1.name) or gc.GraftConfig(c1.name)
                store.save(gc.with_policy(cfg, policies[label]))
                control.request(control.default_socket_path(h1.name, plan.name),
                                {"op": "reload", "container": c1.name}, timeout=10)
                warm_overlay(plan)
                workdir = tempfile.mkdtemp(prefix="sgbench-")
                try:
                    res = measure(wl, run, seconds, workdir, tools)
                finally:
                    shutil.rmtree(workdir, ignore_errors=True)
                for metric, v in res["metrics"].items():
                    out[label].setdefault(f"{name}.{metric}", []).append(v)
                progress(f"r{rnd} {name} {label}: {res['metrics']}")
    ref, big = list(policies)
    ratios = {}
    for metric in out[ref]:
        pairs = [b / a for a, b in zip(out[ref][metric], out[big].get(metric, [])) if a]
        if pairs:
            ratios[metric] = statistics.median(pairs)
    return {"rules": rules, "medians": {k: {m: statistics.median(v) for m, v in d.items()}
                                        for k, d in out.items()},
            "ratio_median": ratios}


def run(containers: int = 200, changes: int = 30, rules: int = 1000, rounds: int = 5,
        seconds: int = 2, progress=lambda m: None) -> dict:
    if containers < 4 or containers > 250:
        from ..errors import ConfigError
        raise ConfigError("--containers: 4..250 (one /24 per host)", value=containers)
    lab = "p" + secrets.token_hex(3)
    text = topology_text(lab, containers)
    plan = parse_topology(text, "<bench policy>")
    tools = build_tools(os.path.join(state_dir(), "bench-bin"))
    store = ConfigStore()
    names = [c.name for h in plan.hosts for c in h.containers]
    t0 = time.monotonic()
    progress(f"lab {lab}: {len(names)} containers")
    builder.up(plan, text, "<bench policy>")
    try:
        for name in names:       # every container configured: every port judged
            store.save(gc.GraftConfig(name, policy=Policy(
                allow=(parse_policy_rule("allow any 198.19.0.0/16"),))))
        agents.start_agents(plan, agent_args=("--fastpath", "on"), timeout=60)
        judged = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            listing = control.request(control.default_socket_path("h1", lab),
                                      {"op": "fastpath"}, timeout=30)
            judged = sum(r["judged"] for r in listing["ports"])
            if judged >= containers - 2:
                break
            time.sleep(0.5)
        progress(f"{judged} container interfaces judged on h1; measuring")
        result = {"containers": len(names), "judged_h1": judged,
                  "enforcement": enforcement(plan, store, changes, progress),
                  "rules": rules_cost(plan, store, rules, rounds, seconds, tools, progress)}
    finally:
        for name in names:
            store.delete(name)
        builder.down(lab)
    result["duration_s"] = round(time.monotonic() - t0, 1)
    return result


def render(r: dict) -> str:
    e = r["enforcement"]
    lines = [f"# Data-path policy at scale ({r['containers']} containers, "
             f"{r['judged_h1']} judged on h1)", "",
             "## Policy change to enforcement (a 1 kHz UDP flow denied, then allowed again)",
             "", "| measured from | changes | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|"]
    for how, label in (("agent", "the agent's reload request"),
                       ("command", "the start of `sockgraft policy add`")):
        v = e[how]
        lines.append(f"| {label} | {v['changes']} | {v['p50_ms']:.1f} | {v['p99_ms']:.1f} | "
                     f"{v['max_ms']:.1f} |")
    ru = r["rules"]
    lines += ["", f"## fast-remote with 0 against {ru['rules']} policy rules (h1-c1, the "
              "deciding rule last)", "", "| metric | 0 rules | many rules | ratio (median of "
              "rounds) |", "|---|---|---|---|"]
    ref, big = list(ru["medians"])
    for metric, ratio in sorted(ru["ratio_median"].items()):
        lines.append(f"| {metric} | {ru['medians'][ref][metric]:.2f} | "
                     f"{ru['medians'][big][metric]:.2f} | {ratio:.3f}x |")
    lines += ["", f"Duration {r['duration_s']} s. The 1 ms send interval bounds the "
              "resolution of the enforcement times."]
    return "\n".join(lines) + "\n"
