"""The help examples name what the default lab has: an endpoint example's
address is an address of the host its container runs on (issue 14, item 7)."""

import re

import pytest

from sockgraft.cli import graft_cmd, main
from sockgraft.model.topology import default_text, parse_topology

pytestmark = pytest.mark.unit

EXAMPLE = re.compile(r"ep add \S+\s+--container (\S+) type ipv[46] addr (\S+)")


def _host_addresses(plan, container):
    h = plan.node(plan.node(container).host)
    return {str(h.underlay.ip), str(h.bridge4.ip), str(h.bridge6.ip)}


@pytest.mark.parametrize("text", [graft_cmd.EP_EXAMPLES, main.__doc__ or "",
                                  getattr(main, "EXAMPLES", "")])
def test_endpoint_examples_use_addresses_of_the_default_lab(text):
    plan = parse_topology(default_text(), "default")
    found = EXAMPLE.findall(text)
    for container, addr in found:
        assert addr in _host_addresses(plan, container), (container, addr)


def test_the_endpoint_examples_are_checked():
    assert len(EXAMPLE.findall(graft_cmd.EP_EXAMPLES)) == 3


@pytest.mark.parametrize("text, want", [
    ("8080:80", {"host_ip": None, "host_port": 8080, "container_port": 80, "proto": "tcp"}),
    ("198.18.0.1:8080:80/udp", {"host_ip": "198.18.0.1", "host_port": 8080,
                                "container_port": 80, "proto": "udp"}),
    ("[fd00::1]:8443:443", {"host_ip": "fd00::1", "host_port": 8443, "container_port": 443,
                            "proto": "tcp"}),
])
def test_run_publish_takes_dockers_syntax(text, want):
    assert graft_cmd.parse_publish(text) == want


@pytest.mark.parametrize("text", ["80", "a:b", "8080:80:x"])
def test_run_publish_refuses_what_it_cannot_read(text):
    from sockgraft.errors import ConfigError
    with pytest.raises(ConfigError, match="--publish"):
        graft_cmd.parse_publish(text)
