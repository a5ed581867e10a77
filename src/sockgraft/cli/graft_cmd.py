"""`sockgraft agent|run|ep|rule|policy|config|sockets|stats`: argument handling and output.

Configuration commands edit the operator's store (agent/store.py) and then ask
every running agent to reload, so changes apply to new sockets at once.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import sys

from ..errors import AgentError, ConfigError, LabError
from ..agent import control
from ..agent.store import ConfigStore, default_dir
from . import doctor_cmd
from .oci_cmd import default_oci_socket
from ..kernel import bpf as kbpf
from ..kernel import netns
from ..lab import state as lab_state
from ..lab.grafts import published_ports
from ..model import graftconfig as gc
from ..model import redirect
from ..model.endpoint import parse_egress, parse_endpoint_args, parse_ingress
from ..model.policy import parse_policy_rule
from ..paths import state_dir

FMT = argparse.RawDescriptionHelpFormatter

AGENT_EXAMPLES = """\
examples:
  sockgraft agent --host h1 &              the agent of lab host h1 (enters its namespace)
  sockgraft agent --netns /run/netns/node1 --socket /run/sockgraft/agent-node1.sock
  sockgraft lab up --agents                the lab with one agent per host, in the background
  sockgraft agent --host h1 --directory etcd://198.18.0.1:2379 --directory-ttl 10   (lab only)
  sockgraft agent --directory etcds://10.0.0.5:2379 --directory-ca /etc/sockgraft/etcd-ca.pem \
      --directory-cert /etc/sockgraft/node1.pem --directory-key /etc/sockgraft/node1-key.pem \
      --directory-user sockgraft-node1 --directory-password-file /etc/sockgraft/etcd-password
  sockgraft agent --oci-socket /run/sockgraft/oci-default.sock   runc/crun hand-offs here
  sockgraft agent --host h1 --native off    socket() answered in Python (to compare)
  sockgraft agent --host h1 --sockmap auto  splice connections between grafted local sockets
  sockgraft agent --host h1 --fastpath auto tc programs on every container interface: policy
                                            in the data path, local pairs skip the bridge
"""

RUN_EXAMPLES = """\
examples:
  sockgraft run --container h1-c1 -- iperf3 -c 198.18.0.2
  sockgraft run --container h2-c1 -- nginx -g 'daemon off;'
  sockgraft run --container web --netns /run/netns/web --agent /run/sockgraft/agent-n1.sock -- ./server
  sockgraft run --container h1-c1 --graft-at socket -- ./client   every socket a host socket
  sockgraft run --container web --netns /run/netns/web -p 8080:80 -- ./server
      the node publishes web's port 80 at 8080: a grafted server stays reachable there
"""

EP_EXAMPLES = """\
examples:
  sockgraft ep add ep-http --container h2-c1 type ipv4 addr 198.18.0.2 port 8080
  sockgraft ep add ep-out  --container h1-c1 type ipv4 addr 198.18.0.1 port dynamic
  sockgraft ep add ep-v6   --container h1-c1 type ipv6 addr fd53:6700:0:1::1 port dynamic
  sockgraft ep add ep-sock --container h1-c1 type unix path /run/app.sock
  sockgraft ep del ep-out --container h1-c1
  sockgraft ep show [--container h1-c1] [--json]
"""

RULE_EXAMPLES = """\
examples:
  sockgraft rule add --container h2-c1 ingress 0.0.0.0:80=ep-http
  sockgraft rule add --container h2-c1 ingress '[::]:80=ep-http'
  sockgraft rule add --container h1-c1 egress 198.18.0.0/24=ep-out
  sockgraft rule add --container h1-c1 egress 198.18.0.0/24:5201=ep-out
  sockgraft rule del --container h1-c1 egress 198.18.0.0/24=ep-out
"""

POLICY_EXAMPLES = """\
examples:
  sockgraft policy add --container h1-c1 deny tcp 198.18.0.2 22
  sockgraft policy add --container h1-c1 allow tcp 198.18.0.0/24 1-65535
  sockgraft policy add --container h1-c1 allow udp '[fd00::/8]' 53
  sockgraft policy del --container h1-c1 deny tcp 198.18.0.2 22
  sockgraft policy builtin --container h1-c1 off      (allow loopback/link-local/metadata/...)
Rule syntax: ACTION PROTO DEST [PORTS]; built-in denies (loopback, link-local,
cloud metadata, unspecified, multicast, broadcast) apply unless an allow rule
names them.
"""

CONFIG_EXAMPLES = """\
examples:
  sockgraft config load h1-c1.toml          replace a container's whole configuration
  sockgraft config show --container h1-c1   print it as TOML
  sockgraft config del --container h1-c1    forget it (new sockets pass through)
"""


def register(sub) -> None:
    p = sub.add_parser("agent", help="run the node agent", epilog=AGENT_EXAMPLES,
                       formatter_class=FMT,
                       description="The privileged node agent: receives seccomp listeners "
                                   "from `sockgraft run` (or an OCI runtime) and grafts "
                                   "container sockets onto host sockets.")
    p.add_argument("--host", help="lab host whose namespace the agent serves")
    p.add_argument("--lab", default="demo")
    p.add_argument("--netns", help="enter this network namespace (path or name) first")
    p.add_argument("--socket", help="control socket path (default: agent-<host>.sock "
                                    "in the state directory)")
    p.add_argument("--config-dir", help=f"graft configuration store (default {default_dir()})")
    p.add_argument("--audit-log", help="append audit lines (JSON) to this file")
    p.add_argument("--no-nft", action="store_true",
                   help="do not manage the nftables policy table (per-datagram UDP policy off)")
    p.add_argument("--bpf", choices=("auto", "on", "off"), default="auto",
                   help="in-kernel graft programs (cgroup connect/sendmsg hooks) needed by "
                        "graft_at=socket containers: auto = use them if the machine can, "
                        "on = fail without them, off = never (default auto)")
    p.add_argument("--directory", default="embedded",
                   help="cluster directory of grafted services: embedded[:PATH] (files on "
                        "this machine, the default), etcds://HOST:PORT (etcd over TLS), "
                        "etcd://HOST:PORT (plain HTTP: a lab only), or off")
    p.add_argument("--directory-ca", metavar="FILE",
                   help="CA bundle that signed etcd's server certificate (etcds://)")
    p.add_argument("--directory-cert", metavar="FILE",
                   help="client certificate for etcd --client-cert-auth (etcds://)")
    p.add_argument("--directory-key", metavar="FILE", help="the client certificate's key")
    p.add_argument("--directory-user", metavar="NAME",
                   help="etcd user (auth enabled; give it a role limited to /sockgraft/)")
    p.add_argument("--directory-password-file", metavar="FILE",
                   help="file holding the etcd user's password")
    p.add_argument("--directory-ttl", type=float, default=10.0,
                   help="lease of this agent's directory records in seconds (default 10): "
                        "records of an agent that died expire after it")
    p.add_argument("--node", help="node name shown in the directory (default: --host)")
    p.add_argument("--uninstall", action="store_true",
                   help="remove this agent's pinned in-kernel programs, its cgroup and its "
                        "nftables table (after stopping it for good; a restarting agent keeps "
                        "them on purpose)")
    p.add_argument("--oci-socket",
                   help="where OCI runtimes hand over seccomp listeners (the profile's "
                        "listenerPath; default oci-<host>.sock in the state directory; "
                        "'off' to disable)")
    p.add_argument("--annotations", choices=("trust", "ignore"), default="trust",
                   help="a graft configuration in a container's OCI annotations "
                        "(sockgraft/endpoints, /ingress, /egress, /policy, /graft-at): "
                        "'trust' takes it (default: whoever starts containers is the "
                        "node's operator - Docker, Podman); 'ignore' refuses it, logged and "
                        "audited (Kubernetes with tenants: pod authors set annotations; "
                        "configure with 'sockgraft config load' or the CNI graft object)")
    p.add_argument("--notifier-threads", type=int, default=2, metavar="N",
                   help="threads per container that wait for its trapped calls and answer "
                        "them on the caller's CPU (default 2; 0 = answer from the agent's "
                        "loop, slower per connection)")
    p.add_argument("--native", choices=("auto", "on", "off"), default="auto",
                   help="answer socket() of graft_at=socket containers and blocking "
                        "connect() of graft_at=syscall ones in the native loop "
                        "(C, outside the GIL): auto = when it is built (said once if not), "
                        "on = refuse to start without it, off = in Python (default auto)")
    p.add_argument("--sockmap", choices=("auto", "on", "off"), default="off",
                   help="splice TCP connections whose two ends are grafted sockets on this "
                        "node (sockops + sk_msg: data skips TCP/IP; see docs/architecture.md "
                        "for what applications see differently): auto = when the kernel "
                        "can, on = refuse to start without it, off (default)")
    p.add_argument("--fastpath", choices=("auto", "on", "off"), default="off",
                   help="tc programs on every container interface of this namespace: each "
                        "container's policy judged per packet for traffic that is not grafted, "
                        "and packets between two local containers handed straight into the "
                        "destination's namespace (bpf_redirect_peer, skipping the bridge): "
                        "auto = when the kernel can, on = refuse to start without it, "
                        "off (default)")
    p.add_argument("--flows-per-container", type=int, default=kbpf.FLOWS_PER_CONTAINER,
                   metavar="N",
                   help="size of each policed container's flow cache in the fast path (an "
                        "LRU of its own: a container starting flows by the thousand evicts "
                        "only its own; about 104 bytes an entry, preallocated; default "
                        f"{kbpf.FLOWS_PER_CONTAINER})")
    p.add_argument("--metrics", metavar="ADDR:PORT",
                   help="serve Prometheus metrics at http://ADDR:PORT/metrics (e.g. "
                        "127.0.0.1:9464, :9464 for every address; default: off)")
    p.set_defaults(func=cmd_agent, needs_root=True)

    p = sub.add_parser("run", help="run a command in a container with its sockets grafted",
                       epilog=RUN_EXAMPLES, formatter_class=FMT)
    p.add_argument("--container", required=True)
    p.add_argument("--lab", default="demo")
    p.add_argument("--netns", help="network namespace (path or name); default: the lab's")
    p.add_argument("--agent", help="agent control socket; default: the container's host agent")
    p.add_argument("--udp-sendto", action="store_true",
                   help="also graft unconnected UDP senders at sendto() (traps every sendto "
                        "that carries an address, including TCP sends some programs make)")
    p.add_argument("--graft-at", choices=gc.GRAFT_AT,
                   help="trap bind()/connect() (syscall) or graft every TCP/UDP socket at "
                        "socket() and judge connects in the kernel (socket); default: the "
                        "container's graft_at setting")
    p.add_argument("--config-dir", help=f"graft configuration store (default {default_dir()})")
    p.add_argument("--publish", "-p", action="append", default=[],
                   metavar="[HOSTIP:]HOSTPORT:CONTAINERPORT[/tcp|udp]",
                   help="a port the node publishes for this container (its DNAT exists "
                        "already); a grafted server stays reachable there. A lab container's "
                        "published ports are added by themselves")
    p.add_argument("cmd", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS...]")
    p.set_defaults(func=cmd_run, needs_root=True)

    p = sub.add_parser("ep", help="graft endpoints (per container, operator only)",
                       epilog=EP_EXAMPLES, formatter_class=FMT)
    epsub = p.add_subparsers(dest="ep_command", metavar="ACTION")
    a = epsub.add_parser("add", help="add an endpoint", epilog=EP_EXAMPLES, formatter_class=FMT)
    a.add_argument("name")
    a.add_argument("--container", required=True)
    a.add_argument("--replace", action="store_true")
    a.add_argument("spec", nargs="*",
                   help="type ipv4|ipv6 addr ADDR port PORT|dynamic  |  type unix path PATH")
    a.set_defaults(func=cmd_ep_add)
    d = epsub.add_parser("del", help="delete an endpoint", epilog=EP_EXAMPLES,
                         formatter_class=FMT)
    d.add_argument("name")
    d.add_argument("--container", required=True)
    d.set_defaults(func=cmd_ep_del)
    s = epsub.add_parser("show", help="list endpoints and rules", epilog=EP_EXAMPLES,
                         formatter_class=FMT)
    s.add_argument("--container")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ep_show)
    for q in (a, d, s):
        q.add_argument("--config-dir")

    p = sub.add_parser("rule", help="conversion rules: ingress ADDR:PORT=EP, egress PREFIX=EP",
                       epilog=RULE_EXAMPLES, formatter_class=FMT)
    rsub = p.add_subparsers(dest="rule_command", metavar="ACTION")
    for verb in ("add", "del"):
        r = rsub.add_parser(verb, epilog=RULE_EXAMPLES, formatter_class=FMT,
                            help=f"{verb} a rule")
        r.add_argument("--container", required=True)
        r.add_argument("--config-dir")
        r.add_argument("direction", choices=["ingress", "egress"])
        r.add_argument("rule")
        r.set_defaults(func=cmd_rule, verb=verb)

    p = sub.add_parser("policy", help="per-container access control",
                       epilog=POLICY_EXAMPLES, formatter_class=FMT)
    psub = p.add_subparsers(dest="policy_command", metavar="ACTION")
    for verb in ("add", "del"):
        r = psub.add_parser(verb, epilog=POLICY_EXAMPLES, formatter_class=FMT,
                            help=f"{verb} an allow/deny rule")
        r.add_argument("--container", required=True)
        r.add_argument("--config-dir")
        r.add_argument("words", nargs="+", help="ACTION PROTO DEST [PORTS]")
        r.set_defaults(func=cmd_policy, verb=verb)
    r = psub.add_parser("builtin", help="turn the built-in denies on or off",
                        epilog=POLICY_EXAMPLES, formatter_class=FMT)
    r.add_argument("--container", required=True)
    r.add_argument("--config-dir")
    r.add_argument("state", choices=["on", "off"])
    r.set_defaults(func=cmd_policy_builtin)

    p = sub.add_parser("config", help="whole per-container configuration files (TOML)",
                       epilog=CONFIG_EXAMPLES, formatter_class=FMT)
    csub = p.add_subparsers(dest="config_command", metavar="ACTION")
    c = csub.add_parser("load", help="validate and install a TOML file", epilog=CONFIG_EXAMPLES,
                        formatter_class=FMT)
    c.add_argument("file")
    c.add_argument("--config-dir")
    c.set_defaults(func=cmd_config_load)
    c = csub.add_parser("show", epilog=CONFIG_EXAMPLES, formatter_class=FMT,
                        help="print a container's configuration")
    c.add_argument("--container", required=True)
    c.add_argument("--config-dir")
    c.set_defaults(func=cmd_config_show)
    c = csub.add_parser("del", epilog=CONFIG_EXAMPLES, formatter_class=FMT,
                        help="delete a container's configuration")
    c.add_argument("--container", required=True)
    c.add_argument("--config-dir")
    c.set_defaults(func=cmd_config_del)

    for name, helptext, func in (("sockets", "list grafted sockets", cmd_sockets),
                                 ("stats", "agent counters per container", cmd_stats),
                                 ("services", "grafted services in the cluster directory "
                                              "(overlay address -> host address)",
                                  cmd_services)):
        p = sub.add_parser(name, help=helptext, formatter_class=FMT,
                           epilog=f"examples:\n  sockgraft {name}\n  sockgraft {name} --json\n"
                                  f"  sockgraft {name} --agent /run/sockgraft/agent-h1.sock\n")
        p.add_argument("--agent", action="append", help="agent socket (default: all running)")
        p.add_argument("--json", action="store_true")
        p.set_defaults(func=func)

    p = sub.add_parser("fastpath", help="the packet fast path: container interfaces, verdict "
                                        "cache, packets forwarded directly and dropped",
                       formatter_class=FMT, epilog="""examples:
  sockgraft fastpath                 every interface with its container and counters
  sockgraft fastpath --json
  sockgraft fastpath --off           take the programs off every interface (normal path
                                     alone; no data-path policy either)
  sockgraft fastpath --on --agent /run/sockgraft/agent-h1.sock
""")
    p.add_argument("--agent", action="append", help="agent socket (default: every running "
                                                     "agent that has the fast path loaded)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--on", dest="set", action="store_const", const=True,
                   help="programs on every container interface (again)")
    g.add_argument("--off", dest="set", action="store_const", const=False,
                   help="programs off every interface: the normal path alone")
    p.add_argument("--json", action="store_true", help="machine-readable")
    p.set_defaults(func=cmd_fastpath, set=None)


# --- helpers --------------------------------------------------------------------------

def _store(args) -> ConfigStore:
    return ConfigStore(getattr(args, "config_dir", None))


def agent_sockets() -> list[str]:
    return sorted(glob.glob(os.path.join(state_dir(), "agent-*.sock")))


def notify_agents(container: str | None, store: ConfigStore) -> str:
    """Ask every running agent that reads `store` to reload; says how many
    did (an agent reading another store is not asked: nothing of this edit
    reaches it)."""
    n, other = 0, []
    mine = os.path.realpath(store.dir)
    for path in agent_sockets():
        try:
            ping = control.request(path, {"op": "ping"}, timeout=3)
            if ping.get("store") and os.path.realpath(ping["store"]) != mine:
                other.append(ping.get("name") or path)
                continue
            control.request(path, {"op": "reload", "container": container}, timeout=3)
            n += 1
        except AgentError as exc:
            logging.getLogger("sockgraft").info("reload via %s: %s", path, exc)
    text = f"{n} agent(s) reloaded"
    if other:
        text += f"; {len(other)} read another store and were left alone " \
                f"({', '.join(sorted(other))})"
    return text


def _edit(args, change, what: str) -> int:
    store = _store(args)
    cfg = store.edit(args.container, change)
    print(f"{what} (container {cfg.container}; {notify_agents(args.container, store)})")
    return 0


# --- commands -------------------------------------------------------------------------

FD_LIMIT_CAP = 1 << 20


def raise_fd_limit() -> tuple[int, int]:
    """The agent holds fds for every container it serves (listeners, the
    pidfds of trapping threads, spare sockets, pending connects): its soft
    RLIMIT_NOFILE (often 1024) goes up to the hard limit (at most 2^20).
    Returns (before, after)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = FD_LIMIT_CAP if hard == resource.RLIM_INFINITY else min(hard, FD_LIMIT_CAP)
    log = logging.getLogger("sockgraft.agent")
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        log.info("open files: soft limit raised from %d to %d", soft, want)
        return soft, want
    if want < 4096:
        log.warning("open files: the hard limit is %d; an agent serving many containers "
                    "needs more (LimitNOFILE= in its unit)", hard)
    return soft, soft


def cmd_agent(args) -> int:
    from ..agent.engine import Agent
    name = args.host or "default"
    ns = args.netns
    if args.host and not ns:
        st = lab_state.read(args.lab)
        if st is None:
            raise LabError(f"lab {args.lab!r} is not up; start it or pass --netns")
        ns = st.plan().node(args.host).netns
    if ns:
        netns.enter(ns)   # before any thread exists: the directory worker inherits it
    if not logging.getLogger().handlers or logging.getLogger().level > logging.INFO:
        logging.getLogger().setLevel(logging.INFO)
    raise_fd_limit()
    lab = args.lab if args.host else None
    path = args.socket or control.default_socket_path(name, lab)
    bpf_name = control.agent_name(name, lab)
    if args.uninstall:
        from ..lab.agents import answers
        if answers(path):
            raise AgentError(f"agent {name} is still running; stop it first")
        from ..kernel import nft
        from ..model.nftpolicy import FAMILY, TABLE
        removed = kbpf.remove(bpf_name)
        if nft.delete_table(None, FAMILY, TABLE):     # this namespace's policy table
            removed.append(f"nftables table {FAMILY} {TABLE}")
        from ..kernel import links
        from ..model.graft import LOOPBACK6_NET
        for ip in links.loopback_addresses(LOOPBACK6_NET):    # private loopbacks left
            links.set_loopback_address(ip, False)
            removed.append(f"address {ip} on lo")
        print("\n".join(f"removed {p}" for p in removed) or f"nothing installed for {bpf_name}")
        return 0
    from ..agent.directory import open_backend
    from ..agent.etcd import EtcdAccess
    access = EtcdAccess(args.directory_ca, args.directory_cert, args.directory_key,
                        args.directory_user, args.directory_password_file)
    # a lab's agents share one embedded directory, never another lab's
    directory = open_backend(args.directory, bpf_name, args.directory_ttl,
                             state_dir(), access, lab=lab)
    agent = Agent(path, _store(args), name=name, audit_path=args.audit_log,
                  manage_nft=not args.no_nft, bpf=args.bpf, bpf_name=bpf_name,
                  directory=directory, node=args.node or name,
                  notifier_threads=args.notifier_threads, metrics=args.metrics,
                  native=args.native, sockmap=args.sockmap, fastpath=args.fastpath,
                  flows_per_container=args.flows_per_container,
                  lab=lab, state_dir=state_dir(),
                  annotations=args.annotations,
                  oci_socket=None if args.oci_socket == "off" else
                  (args.oci_socket or default_oci_socket(bpf_name)))
    doctor_cmd.agent_preflight(agent)                 # refuses what the node cannot do
    agent.start()
    print(f"sockgraft agent {name}: serving {path} (pid {os.getpid()})", flush=True)
    try:
        agent.serve_forever()
    finally:
        agent.close()
    return 0


def container_location(lab: str, container: str) -> tuple[str, str]:
    """(netns path, host name) of a lab container."""
    st = lab_state.read(lab)
    if st is None:
        raise LabError(f"lab {lab!r} is not up; pass --netns and --agent for a container "
                       "outside the lab")
    plan = st.plan()
    node = plan.node(container)
    if not hasattr(node, "host"):
        raise ConfigError(f"{container!r} is a host, not a container")
    return netns.path(node.netns), node.host


def cmd_run(args) -> int:
    from ..agent.launcher import run
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        raise ConfigError("missing command; usage: sockgraft run --container C -- CMD [ARGS]")
    ns_path = args.netns
    agent = args.agent
    if not ns_path or not agent:
        lab_ns, host = container_location(args.lab, args.container)
        ns_path = ns_path or lab_ns
        agent = agent or control.default_socket_path(host, args.lab)
    if ns_path and not ns_path.startswith("/"):
        ns_path = netns.path(ns_path)
    graft_at = args.graft_at
    if graft_at is None:
        cfg = _store(args).load(args.container)
        graft_at = cfg.graft_at if cfg is not None else "syscall"
    ports = [parse_publish(p) for p in args.publish] + published_ports(args.lab, args.container)
    redirect.parse_ports(ports, "--publish")          # refused here, not by the agent
    return run(args.container, cmd, ns_path=ns_path, agent_path=agent,
               trap_sendto=args.udp_sendto, graft_at=graft_at, ports=ports)


def parse_publish(text: str) -> dict:
    """`[HOSTIP:]HOSTPORT:CONTAINERPORT[/PROTO]`, docker's -p syntax."""
    spec, _, proto = text.partition("/")
    parts = spec.rsplit(":", 2)
    host_ip = parts[0].strip("[]") if len(parts) == 3 else ""
    try:
        hp, cp = (int(x) for x in parts[-2:])
    except ValueError:
        raise ConfigError(f"--publish {text!r}: expected [HOSTIP:]HOSTPORT:CONTAINERPORT"
                          "[/tcp|udp]") from None
    return {"host_ip": host_ip or None, "host_port": hp, "container_port": cp,
            "proto": proto or "tcp"}


def cmd_ep_add(args) -> int:
    spec = args.spec[1:] if args.spec[:1] == ["--"] else args.spec
    ep = parse_endpoint_args(args.name, spec)
    return _edit(args, lambda cfg: gc.with_endpoint(cfg, ep, replace=args.replace),
                 f"endpoint {ep}")


def cmd_ep_del(args) -> int:
    return _edit(args, lambda cfg: gc.without_endpoint(cfg, args.name),
                 f"endpoint {args.name} deleted")


def cmd_ep_show(args) -> int:
    store = _store(args)
    names = [args.container] if args.container else store.containers()
    configs = [c for c in (store.load(n) for n in names) if c is not None]
    if args.json:
        out = [{"container": c.container,
                "endpoints": [{"name": e.name, "type": e.kind,
                               "addr": str(e.addr) if e.addr else None,
                               "port": "dynamic" if e.is_dynamic else e.port,
                               "path": e.path} for e in c.endpoints.values()],
                "ingress": [str(r) for r in c.ingress], "egress": [str(r) for r in c.egress],
                "policy": {"allow": [str(r) for r in c.policy.allow],
                           "deny": [str(r) for r in c.policy.deny],
                           "builtin_denies": c.policy.builtin_denies}} for c in configs]
        json.dump(out, sys.stdout, indent=2)
        print()
        return 0
    if not configs:
        print("no graft configuration" + (f" for {args.container}" if args.container else ""))
    for c in configs:
        print(f"container {c.container}")
        for e in c.endpoints.values():
            print(f"  ep {e}")
        for r in c.ingress:
            print(f"  ingress {r}")
        for r in c.egress:
            print(f"  egress {r}")
        for r in c.policy.deny + c.policy.allow:
            print(f"  policy {r}")
        print(f"  builtin denies {'on' if c.policy.builtin_denies else 'off'}")
    return 0


def cmd_rule(args) -> int:
    rule = parse_ingress(args.rule) if args.direction == "ingress" else parse_egress(args.rule)
    change = gc.with_rule if args.verb == "add" else gc.without_rule
    return _edit(args, lambda cfg: change(cfg, rule),
                 f"{args.direction} rule {rule} {'added' if args.verb == 'add' else 'deleted'}")


def cmd_policy(args) -> int:
    rule = parse_policy_rule(" ".join(args.words))
    change = gc.with_policy_rule if args.verb == "add" else gc.without_policy_rule
    return _edit(args, lambda cfg: change(cfg, rule),
                 f"policy {rule} {'added' if args.verb == 'add' else 'deleted'}")


def cmd_policy_builtin(args) -> int:
    from dataclasses import replace
    on = args.state == "on"
    return _edit(args, lambda cfg: gc.with_policy(cfg, replace(cfg.policy, builtin_denies=on)),
                 f"built-in denies {args.state}")


def cmd_config_load(args) -> int:
    try:
        with open(args.file) as f:
            text = f.read()
    except OSError as exc:
        raise ConfigError(f"cannot read: {exc.strerror}", source=args.file) from exc
    cfg = gc.load_config(text, args.file)
    store = _store(args)
    store.save(cfg)
    print(f"configuration of {cfg.container} installed ({notify_agents(cfg.container, store)})")
    return 0


def cmd_config_show(args) -> int:
    cfg = _store(args).load(args.container)
    if cfg is None:
        raise ConfigError(f"no configuration for container {args.container!r}")
    sys.stdout.write(gc.dump_config(cfg))
    return 0


def cmd_config_del(args) -> int:
    store = _store(args)
    existed = store.delete(args.container)
    print(f"configuration of {args.container} " + ("deleted" if existed else "did not exist")
          + f" ({notify_agents(args.container, store)})")
    return 0


def _query(args, op: str) -> list[tuple[str, dict]]:
    paths = args.agent or agent_sockets()
    if not paths:
        raise AgentError("no running agent found (start one with `sockgraft agent`)")
    out = []
    for path in paths:
        out.append((path, control.request(path, {"op": op})))
    return out


def _print_json(results: list[tuple[str, dict]]) -> int:
    """Every agent's answer, by socket path, without the "ok" key."""
    json.dump({p: {k: v for k, v in r.items() if k != "ok"} for p, r in results},
              sys.stdout, indent=2)
    print()
    return 0


def cmd_fastpath(args) -> int:
    msg: dict = {"op": "fastpath"}
    if args.set is not None:
        msg["on"] = args.set
    results = []
    for path in args.agent or agent_sockets():
        try:
            results.append((path, control.request(path, msg, timeout=10)))
        except AgentError as exc:
            if args.agent:
                raise
            logging.getLogger("sockgraft").info("%s: %s", path, exc)
    if not results:
        raise AgentError("no running agent has the fast path loaded (start one with "
                         "`sockgraft agent --fastpath auto`)")
    if args.json:
        return _print_json(results)
    for path, r in results:
        print(f"{path}: fast path {'on' if r['enabled'] else 'off'}  addresses "
              f"{r['addresses']}  flows cached {r['flows']}  overlay routes cached "
              f"{r.get('remote_routes', 0)}  decapsulating on {len(r.get('underlays', []))} "
              f"underlay device(s)")
        table = [("INTERFACE", "CONTAINER", "POLICY", "FAST PKTS", "FAST BYTES", "NORMAL",
                  "DROPS", "SPOOFED", "HITS", "MISSES", "FLOWS", "ENCAP", "DECAP",
                  "ADDRESSES")]
        for row in r["ports"]:
            flows = (f"{row.get('flows', 0)}/{row['flow_cache']}" if row.get("flow_cache")
                     else "no cache" if row["judged"] else "-")
            table.append((row["ifname"] + ("" if row["attached"] else " (detached)"),
                          row["container"] or "-", "judged" if row["judged"] else "-",
                          *(str(row.get(k, 0)) for k in ("fast_pkts", "fast_bytes",
                                                          "slow_pkts", "drops", "spoofed",
                                                          "hits", "misses")),
                          flows, str(row.get("encap_pkts", 0)), str(row.get("decap_pkts", 0)),
                          " ".join(row["addresses"]) or "-"))
        widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
        for t in table:
            print("  " + "  ".join(v.ljust(w) for v, w in zip(t, widths)).rstrip())
        for c in r["conflicts"]:
            print(f"  conflict: {c}")
        for w in r.get("waiting", []):
            print(f"  not cached: {w}")
    return 0


def cmd_sockets(args) -> int:
    rows = [dict(s, agent=os.path.basename(p)) for p, r in _query(args, "sockets")
            for s in r["sockets"]]
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    table = [("CONTAINER", "PID", "FD", "PROTO", "KIND", "ENDPOINT", "LOCAL", "REMOTE")]
    for s in rows:
        table.append((s["container"], str(s["pid"]), str(s["fd"]), s["proto"], s["kind"],
                      s["endpoint"], s["local"], s["remote"] or "-"))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


def cmd_services(args) -> int:
    """The directory as the agents see it (one merged table per directory;
    agents sharing one directory agree, so rows are de-duplicated)."""
    results = _query(args, "services")
    rows: dict[tuple, dict] = {}
    conflicts: set[str] = set()
    rejected: set[str] = set()
    for _path, r in results:
        for rec in r.get("records", []):
            rows[(rec["proto"], rec["overlay"], rec["port"], rec["owner"])] = rec
        conflicts.update(r.get("conflicts", []))
        rejected.update(r.get("rejected", []))
    if args.json:
        json.dump({"services": list(rows.values()), "conflicts": sorted(conflicts),
                   "rejected": sorted(rejected),
                   "agents": {p: {k: v for k, v in r.items() if k not in ("ok", "records")}
                              for p, r in results}}, sys.stdout, indent=2)
        print()
        return 0
    table = [("PROTO", "OVERLAY", "HOST ADDRESS", "NODE", "CONTAINER")]
    for rec in sorted(rows.values(), key=lambda x: (x["overlay"], x["port"], x["proto"])):
        ov = f"[{rec['overlay']}]:{rec['port']}" if ":" in rec["overlay"] else \
            f"{rec['overlay']}:{rec['port']}"
        ha = f"[{rec['host_addr']}]:{rec['host_port']}" if ":" in rec["host_addr"] else \
            f"{rec['host_addr']}:{rec['host_port']}"
        table.append((rec["proto"], ov, ha, rec["node"], rec["container"]))
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    for c in sorted(conflicts):
        print(f"conflict: {c}")
    for c in sorted(rejected):
        print(f"rejected: {c}")
    for path, r in results:
        if r.get("directory") and not r.get("reachable"):
            print(f"{path}: directory unreachable: {r.get('last_error')}")
    return 0


def cmd_stats(args) -> int:
    results = _query(args, "stats")
    if args.json:
        return _print_json(results)
    for path, r in results:
        c = r["counters"]
        print(f"{path}: grafted {c['grafted']}  passed {c['passed']}  denied {c['denied']}  "
              f"errors {c['errors']}  pending connects {r['pending_connects']}"
              + (f"  notifier threads failed {c['notifier_failures']}"
                 if c.get("notifier_failures") else ""))
        k = r.get("kernel")
        if k:
            print(f"  in-kernel ({k['cgroup']}): connects judged {k['connects_judged']}  "
                  f"denied {k['denied']}  redirected {k['redirected']}")
            if k.get("splice"):
                print(f"  spliced sockets now {k.get('spliced_sockets', 0)}")
            elif k.get("splice_error"):
                print(f"  splicing off: {k['splice_error']}")
            if k.get("fastpath"):
                print("  packet fast path on (`sockgraft fastpath` for its counters)")
            elif k.get("fastpath_error"):
                print(f"  packet fast path off: {k['fastpath_error']}")
        elif r.get("kernel_error"):
            print(f"  in-kernel programs off: {r['kernel_error']}")
        for s in r["containers"]:
            threads = (f"  notifier threads {s['notifier_threads']}"
                       f"{' (native)' if s.get('native') else ''}"
                       if s.get("notifier_threads") else "")
            if s.get("notifier_failures"):
                threads += f" ({s['notifier_failures']} failed: the loop answers)"
            print(f"  {s['container']:12s} pid {s['pid']:<7d} grafted {s['grafted']}  "
                  f"passed {s['passed']}  denied {s['denied']}  errors {s['errors']}{threads}")
            sp = s.get("spliced")
            if sp:
                print(f"  {'':12s} spliced: sockets {sp['sockets']}  streams {sp['streams']}  "
                      f"bytes {sp['bytes']}  by TCP {sp['fallback']}  left {sp['left']}")
    return 0
