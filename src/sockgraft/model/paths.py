"""The baseline network paths of the lab, as pure data: who serves, who
connects, to which address. Shared by `sockgraft demo` and the benchmarks.

Names are the ones the benchmark report uses: host-loopback, host-underlay,
bridge, nat, vxlan (the graft paths join when the engine does).
Must not: start processes (lab/traffic does).
"""

from __future__ import annotations

from dataclasses import dataclass

from .topology import LabPlan

BASELINE_PATHS = ("host-loopback", "host-underlay", "bridge", "nat", "vxlan")
# every path `sockgraft bench` measures: the baselines, the trap floor, then
# sockgraft's own
BENCH_PATHS = BASELINE_PATHS + ("trap-floor", "graft-local", "graft-splice", "graft-remote",
                                "fast-local", "fast-remote")


@dataclass(frozen=True)
class PathSpec:
    name: str
    server_node: str      # node whose namespace runs the server
    server_port: int      # port the server listens on
    client_node: str
    target: str           # address the client connects to
    target_port: int
    description: str


def plan_paths(plan: LabPlan, port: int = 5201) -> dict[str, PathSpec | str]:
    """Every baseline path, or a string saying why the topology cannot offer it."""
    out: dict[str, PathSpec | str] = {}
    published = {p.host_port for c in plan.containers for p in c.publish}
    while port in published:   # a published port is DNATed away from the host, as in docker
        port += 1
    h1 = plan.hosts[0]
    out["host-loopback"] = PathSpec("host-loopback", h1.name, port, h1.name, "127.0.0.1", port,
                                    f"{h1.name} to itself over loopback")
    if len(plan.hosts) < 2:
        for name in ("host-underlay", "nat", "vxlan"):
            out[name] = "needs two hosts"
    else:
        h2 = plan.hosts[1]
        out["host-underlay"] = PathSpec("host-underlay", h2.name, port, h1.name,
                                        str(h2.underlay.ip), port,
                                        f"{h1.name} to {h2.name} over the underlay")
        if h1.containers and h2.containers:
            src = h1.containers[0]
            dst = h2.containers[-1]
            out["vxlan"] = PathSpec("vxlan", dst.name, port, src.name, str(dst.ipv4.ip), port,
                                    f"{src.name} to {dst.name} by container IP over VXLAN")
            pub = next(((c, p) for c in h2.containers for p in c.publish if p.proto == "tcp"),
                       None)
            if pub:
                c, p = pub
                out["nat"] = PathSpec("nat", c.name, p.container_port, src.name,
                                      str(h2.underlay.ip), p.host_port,
                                      f"{src.name} to {h2.name}:{p.host_port} (DNAT to {c.name}"
                                      f":{p.container_port}), masqueraded")
            else:
                out["nat"] = f"no container on {h2.name} publishes a tcp port"
        else:
            out["vxlan"] = out["nat"] = "needs containers on two hosts"
    if len(h1.containers) >= 2:
        a, b = h1.containers[0], h1.containers[1]
        out["bridge"] = PathSpec("bridge", b.name, port, a.name, str(b.ipv4.ip), port,
                                 f"{a.name} to {b.name} over the {h1.name} bridge")
    else:
        out["bridge"] = f"needs two containers on {h1.name}"
    return {k: out[k] for k in BASELINE_PATHS}
