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
