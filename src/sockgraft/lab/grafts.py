"""Ready-made graft configurations for the lab's demo and benchmarks: a
container whose traffic to a prefix leaves from a host address, and a
container whose listener is bound on a host endpoint.

Built with the pure config edits (model/graftconfig), so they are validated
exactly like an operator's `sockgraft ep/rule add`.
"""

from __future__ import annotations

from ipaddress import ip_address

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
