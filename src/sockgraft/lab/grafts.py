"""Ready-made graft configurations for the lab's demo and benchmarks: a
container whose traffic to a prefix leaves from a host address, and a
container whose listener is bound on a host endpoint.

Built with the pure config edits (model/graftconfig), so they are validated
exactly like an operator's `sockgraft ep/rule add`. Also a lab container's
published ports, which `sockgraft run` hands to the agent.
"""

from __future__ import annotations

from ipaddress import ip_address

from ..errors import ConfigError
from ..model import graftconfig as gc
from ..model.endpoint import make_endpoint, parse_egress, parse_ingress


def egress_via(container: str, host_ip: str, prefix: str, ep: str = "ep-out") -> gc.GraftConfig:
    """connect()s of `container` into `prefix` leave from host_ip (ephemeral port)."""
    kind = "ipv4" if ip_address(host_ip).version == 4 else "ipv6"
    cfg = gc.with_endpoint(gc.GraftConfig(container),
                           make_endpoint(ep, kind, addr=host_ip, port="dynamic"))
    return gc.with_rule(cfg, parse_egress(f"{prefix}={ep}"))


def ingress_on(container: str, port: int | str, host_ip: str, host_port: int | str,
               ep: str = "ep-in") -> gc.GraftConfig:
    """A bind of `container` to 0.0.0.0:port or [::]:port really listens on
    host_ip:host_port. `port` may be a range "LO-HI" (host ports follow from
    host_port on), `host_port` "dynamic" (the kernel picks)."""
    kind = "ipv4" if ip_address(host_ip).version == 4 else "ipv6"
    cfg = gc.with_endpoint(gc.GraftConfig(container),
                           make_endpoint(ep, kind, addr=host_ip, port=host_port))
    for rule in (f"0.0.0.0:{port}={ep}", f"[::]:{port}={ep}"):
        if kind == "ipv6" and rule.startswith("0.0.0.0"):
            continue
        cfg = gc.with_rule(cfg, parse_ingress(rule))
    return cfg


def published_ports(lab: str, container: str) -> list[dict]:
    """A lab container's published ports (its host's DNAT), as `register`
    carries them; [] if the lab is not up or has no such container."""
    from . import state as lab_state
    st = lab_state.read(lab)
    if st is None:
        return []
    plan = st.plan()
    try:
        node = plan.node(container)
    except ConfigError:
        return []
    if not hasattr(node, "publish"):
        return []
    host = plan.node(node.host)
    return [{"host_ip": str(host.underlay.ip), "host_port": p.host_port,
             "container_port": p.container_port, "proto": p.proto} for p in node.publish]
