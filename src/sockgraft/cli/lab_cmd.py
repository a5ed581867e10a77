"""`sockgraft lab ...` and `sockgraft demo`: argument handling and output."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import ConfigError, LabError, SockgraftError
from ..kernel import netns
from ..lazy import lazy_module

# pyroute2 and the lab's builders load only when a lab command runs: every
# other command (`sockgraft policy add`...) starts without them (~0.1 s)
agents = lazy_module("sockgraft.lab.agents")
builder = lazy_module("sockgraft.lab.builder")
traffic = lazy_module("sockgraft.lab.traffic")
from ..lab import state as lab_state
from ..model import topology
from ..model.paths import PathSpec, plan_paths

DEFAULT_LAB = "demo"

LAB_EXAMPLES = """\
examples:
  sockgraft lab up                          the embedded default: 2 hosts x 2 containers
  sockgraft lab up --config my-lab.toml     a topology of your own (see docs/architecture.md)
  sockgraft lab up --agents --sockmap auto  with agents that splice grafted local pairs
  sockgraft lab up --agents --fastpath auto with the packet fast path on every container
  sockgraft lab status                      hosts, containers, bytes over each veth
  sockgraft lab status --json               the same, machine-readable
  sockgraft lab exec h1-c1 -- ping -c1 198.19.2.2    container to container over VXLAN
  sockgraft lab exec h1 -- nft list ruleset          a host's NAT rules
  sockgraft lab down                        remove every namespace of the lab (idempotent)
"""


def _progress(msg: str) -> None:
    print(f"  .. {msg}", file=sys.stderr, flush=True)


def register(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    lab = sub.add_parser("lab", help="build and inspect the namespace testbed",
                         description="A small cluster on one machine: hosts and containers "
                                     "are network namespaces; bridge+NAT, published ports "
                                     "and a VXLAN overlay are the baseline paths.",
                         epilog=LAB_EXAMPLES, formatter_class=fmt)
    labsub = lab.add_subparsers(dest="lab_command", metavar="ACTION")

    p = labsub.add_parser("up", help="create the lab", epilog=LAB_EXAMPLES, formatter_class=fmt)
    p.add_argument("--config", metavar="FILE", help="topology TOML (default: embedded 2x2)")
    p.add_argument("--lab", "--name", dest="name",
                   help="lab name (overrides the file's name)")
    p.add_argument("--agents", action="store_true",
                   help="also start one sockgraft agent per host, in the background")
    p.add_argument("--config-dir", help="the graft configuration store the agents read "
                                        "(default: the state directory's)")
    p.add_argument("--sockmap", choices=("auto", "on", "off"), default="off",
                   help="the agents splice connections between grafted local sockets "
                        "(sockgraft agent --sockmap; default off)")
    p.add_argument("--fastpath", choices=("auto", "on", "off"), default="off",
                   help="the agents put the packet fast path on every container interface "
                        "(sockgraft agent --fastpath; default off)")
    p.set_defaults(func=cmd_up, needs_root=True)

    p = labsub.add_parser("down", help="remove everything the lab created",
                          epilog=LAB_EXAMPLES, formatter_class=fmt)
    p.add_argument("--lab", "--name", dest="name", default=None,
                   help=f"lab name (default: {DEFAULT_LAB})")
    p.add_argument("--all", action="store_true", help="every lab with a state file")
    p.set_defaults(func=cmd_down, needs_root=True)

    p = labsub.add_parser("status", help="show hosts, containers and addresses",
                          epilog=LAB_EXAMPLES, formatter_class=fmt)
    p.add_argument("--lab", "--name", dest="name", default=DEFAULT_LAB, help="lab name")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = labsub.add_parser("exec", help="run a command in a host's or container's namespace",
                          epilog=LAB_EXAMPLES, formatter_class=fmt)
    p.add_argument("--lab", "--name", dest="name", default=DEFAULT_LAB, help="lab name")
    p.add_argument("node", help="host or container name")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=cmd_exec, needs_root=True)

    p = sub.add_parser("demo", help="the main job: lab up, status, iperf3 on each path, down",
                       description="Brings the default lab up, shows it, runs a short iperf3 "
                                   "over every baseline path and tears the lab down again.",
                       epilog="examples:\n  sockgraft demo\n  sockgraft demo --seconds 5 "
                              "--keep\n", formatter_class=fmt)
    p.add_argument("--config", metavar="FILE")
    p.add_argument("--lab", "--name", dest="name",
                   help="lab name (default: the topology's, 'demo')")
    p.add_argument("--seconds", type=float, default=2.0, help="iperf3 duration per path")
    p.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    p.set_defaults(func=cmd_demo, needs_root=True)


def load_plan(config: str | None, name: str | None = None):
    if config:
        try:
            with open(config) as f:
                text = f.read()
        except OSError as exc:
            raise ConfigError(f"cannot read topology: {exc.strerror}", source=config) from exc
        return topology.parse_topology(text, config, name=name), text, config
    text = topology.default_text()
    return topology.parse_topology(text, "<default>", name=name), text, "<default>"


def cmd_up(args) -> int:
    plan, text, source = load_plan(args.config, args.name)
    builder.up(plan, text, source, progress=_progress)
    print(f"lab {plan.name} is up: {len(plan.hosts)} hosts, {len(plan.containers)} containers")
    if args.agents:
        try:
            pids = agents.start_agents(plan, config_dir=args.config_dir,
                                       agent_args=("--sockmap", args.sockmap,
                                                   "--fastpath", args.fastpath))
        except SockgraftError:
            builder.down(plan.name)
            raise
        print("agents: " + ", ".join(f"{h} (pid {p})" for h, p in pids.items()))
    return 0


def cmd_down(args) -> int:
    names = lab_state.list_labs() if args.all else [args.name or DEFAULT_LAB]
    for name in names:
        if builder.down(name, progress=_progress):
            print(f"lab {name} is down")
        else:
            print(f"lab {name} was not up; nothing to do")
    return 0


def cmd_status(args) -> int:
    st = builder.status(args.name)
    if args.json:
        from .main import print_json
        print_json(st)
        return 0
    print(f"lab {st['name']} ({st['status']}): underlay {st['underlay']}, "
          f"containers {st['container_v4']} {st['container_v6']}")
    rows = [("NODE", "KIND", "HOST", "NETNS", "IPV4", "IPV6", "PUBLISH", "UP",
             "SENT/RECEIVED")]
    for h in st["hosts"]:
        rows.append((h["name"], "host", "-", h["netns"], h["underlay_ip"], "-", "-",
                     "yes" if h["present"] else "NO", _traffic(h["underlay_bytes"])))
        for c in h["containers"]:
            rows.append((c["name"], "container", h["name"], c["netns"], c["ipv4"], c["ipv6"],
                         ",".join(c["publish"]) or "-", "yes" if c["present"] else "NO",
                         _traffic(c["veth_bytes"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print("SENT/RECEIVED: bytes over a host's underlay port, over a container's veth "
          "(grafted traffic does not cross it)")
    return 0


def _traffic(c: dict | None) -> str:
    return "-" if c is None else f"{_bytes(c['from'])}/{_bytes(c['to'])}"


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


def node_netns(lab: str, node: str) -> str:
    st = lab_state.read(lab)
    if st is None:
        raise LabError(f"lab {lab!r} is not up; run `sockgraft lab up` first")
    return st.plan().node(node).netns


def cmd_exec(args) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ConfigError("missing command; usage: sockgraft lab exec NODE -- CMD [ARGS...]")
    ns_name = node_netns(args.name, args.node)
    sys.stdout.flush()
    netns.enter(ns_name)
    os.environ["SOCKGRAFT_NODE"] = args.node
    try:
        os.execvp(cmd[0], cmd)
    except OSError as exc:
        raise ConfigError(f"cannot execute {cmd[0]!r}: {exc.strerror}") from exc
    return 127  # not reached


def cmd_demo(args) -> int:
    plan, text, source = load_plan(args.config, args.name)
    if lab_state.read(plan.name) is not None:
        raise LabError(f"lab {plan.name!r} is already up; `sockgraft lab down` first")
    print(f"== sockgraft demo: lab {plan.name}, {len(plan.hosts)} hosts, "
          f"{len(plan.containers)} containers")
    builder.up(plan, text, source, progress=_progress)
    store = None
    try:
        cmd_status(argparse.Namespace(name=plan.name, json=False))
        print(f"\n== baseline paths: iperf3, 1 TCP stream, {args.seconds:g} s each "
              "(only ratios within one run are meaningful)")
        results = {}
        for name, spec in plan_paths(plan).items():
            if not isinstance(spec, PathSpec):
                print(f"  {name:14s} skipped: {spec}")
                continue
            server_ns = plan.node(spec.server_node).netns
            client_ns = plan.node(spec.client_node).netns
            res = traffic.iperf3_path(spec, server_ns, client_ns, args.seconds)
            results[name] = res["gbit_per_s"]
            print(f"  {name:14s} {res['gbit_per_s']:7.2f} Gbit/s   {spec.description}")
        ref = results.get("host-loopback")
        if ref:
            print("\n  ratio to host-loopback: " + ", ".join(
                f"{k} {v / ref:.2f}" for k, v in results.items()))
        if len(plan.hosts) >= 2 and all(plan.hosts[i].containers for i in (0, 1)):
            store = _demo_graft(plan, args.seconds)
    finally:
        if store is not None:
            for c in (plan.hosts[0].containers[0], plan.hosts[1].containers[0]):
                store.delete(c.name)
        if not args.keep:
            builder.down(plan.name, progress=_progress)
            print(f"\nlab {plan.name} is down")
    return 0


def _demo_graft(plan, seconds: float):
    """Grafted against plain, side by side: the same unmodified iperf3."""
    from ..agent.store import ConfigStore
    from ..lab import grafts
    from ..lab.traffic import Place
    h1, h2 = plan.hosts[0], plan.hosts[1]
    client, server = h1.containers[0], h2.containers[0]
    print(f"\n== grafting: agents on {h1.name} and {h2.name}")
    agents.start_agents(plan, agent_args=("--fastpath", "auto"))
    fast = _fastpath(plan, False)
    store = ConfigStore()
    # client: its traffic to the underlay and to other containers leaves from
    # h1's address; server: a bind to 0.0.0.0:5201 / [::]:5201 really listens
    # on h2's address, port 5202, and is published in the directory
    from ..model import graftconfig as gc
    from ..model.endpoint import parse_egress
    ccfg = grafts.egress_via(client.name, str(h1.underlay.ip), str(plan.underlay))
    ccfg = gc.with_rule(ccfg, parse_egress(f"{plan.container_v4}=ep-out"))
    for cfg in (ccfg, grafts.ingress_on(server.name, 5201, str(h2.underlay.ip), 5202)):
        store.save(cfg)
        rules = [str(r) for r in (*cfg.egress, *cfg.ingress)]
        eps = [str(e) for e in cfg.endpoints.values()]
        print(f"  config {cfg.container}: {'; '.join(eps)}; rules {', '.join(rules)}")
    target = str(h2.underlay.ip)
    rows = []

    def measure(label, srv, sport, cli, tport, listen, veth_of, to=target, ready=None):
        before, vx0 = _veth_rx(plan, veth_of), _vxlan_bytes(plan, h1.name)
        res = traffic.iperf3(srv, sport, cli, to, tport, seconds, listen=listen, name=label,
                             ready=ready)
        delta, vx = _veth_rx(plan, veth_of) - before, _vxlan_bytes(plan, h1.name) - vx0
        rows.append((label, res["gbit_per_s"], res["bytes"], delta))
        print(f"  {label:52s} {res['gbit_per_s']:7.2f} Gbit/s   "
              f"{delta / 1e6:10.1f} MB on {veth_of}'s veth, {vx / 1e6:8.1f} MB VXLAN")

    host2 = Place(h2.netns)
    measure(f"{client.name} -> {h2.name}:5301, plain (NAT)", host2, 5301,
            Place(client.netns), 5301, None, client.name)
    measure(f"{client.name} -> {h2.name}:5301, grafted", host2, 5301,
            Place(client.netns, client.name, plan.name), 5301, None, client.name)
    pub = next((p for p in server.publish if p.container_port == 5201), None)
    if pub:
        measure(f"{h1.name} -> {server.name}:5201, plain (DNAT {pub.host_port})",
                Place(server.netns), 5201, Place(h1.netns), pub.host_port, None, server.name)
    measure(f"{h1.name} -> {server.name}:5201, grafted (ingress {target}:5202)",
            Place(server.netns, server.name, plan.name), 5201, Place(h1.netns), 5202,
            (h2.netns, 5202), server.name)
    # container to container across hosts, by container IP: the overlay against
    # the directory bypass (client grafted at socket(), redirected in the kernel)
    cip = str(server.ipv4.ip)
    measure(f"{client.name} -> {server.name} {cip}:5201, plain (VXLAN)", Place(server.netns),
            5201, Place(client.netns), 5201, None, client.name, to=cip)
    measure(f"{client.name} -> {server.name} {cip}:5201, grafted (directory)",
            Place(server.netns, server.name, plan.name), 5201,
            Place(client.netns, client.name, plan.name, graft_at="socket"), 5201,
            (h2.netns, 5202), client.name, to=cip,
            ready=lambda: agents.wait_published(plan.name, h1.name, "tcp", cip, 5201))
    print("  grafted sockets skip the container's veth, bridge, NAT and the VXLAN overlay:"
          " one network stack.")
    if fast:
        _demo_fast(plan, measure)
    return store


def _fastpath(plan, on: bool) -> bool:
    """The agents' packet fast path on or off every container interface;
    False if an agent does not have it (the kernel refused it)."""
    from ..agent import control
    from ..errors import AgentError
    try:
        for h in plan.hosts:
            control.request(control.default_socket_path(h.name, plan.name),
                            {"op": "fastpath", "on": on}, timeout=10)
    except AgentError:
        return False
    return True


def _demo_fast(plan, measure) -> None:
    """Plain (non-grafted) containers, bridge and VXLAN, without and with
    the packet fast path."""
    from ..lab.traffic import Place
    from ..bench.harness import warm_overlay
    h1 = plan.hosts[0]
    c1 = h1.containers[0]
    others = [(c, "bridge") for c in h1.containers[1:2]] + \
             [(c, "VXLAN") for c in plan.hosts[1].containers[1:2]]
    print("\n== packet fast path (agents --fastpath): plain containers, nothing grafted")
    for on in (False, True):
        _fastpath(plan, on)
        if on:
            warm_overlay(plan)
        for dst, via in others:
            ip = str(dst.ipv4.ip)
            measure(f"{c1.name} -> {dst.name} {ip}:5201, "
                    f"{'fast path' if on else 'plain (' + via + ')'}",
                    Place(dst.netns), 5201, Place(c1.netns), 5201, None, c1.name, to=ip)
    print("  same host: handed into the destination's namespace (bpf_redirect_peer); across"
          " hosts: encapsulated in tc, no VXLAN device on either host. `sockgraft fastpath`"
          " shows the counters.")


def _vxlan_bytes(plan, host: str) -> int:
    counters = builder.interface_counters(plan.node(host).netns).get("sg-vx0", {})
    return counters.get("rx_bytes", 0) + counters.get("tx_bytes", 0)


def _veth_rx(plan, container: str) -> int:
    c = plan.node(container)
    counters = builder.interface_counters(plan.node(c.host).netns)[c.veth_host]
    return counters["rx_bytes"] + counters["tx_bytes"]
