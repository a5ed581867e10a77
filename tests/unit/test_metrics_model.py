"""agent/metrics.py without an agent: the collector renders a snapshot with
bounded label sets, and --metrics values are checked."""

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sockgraft.agent import metrics as m
from sockgraft.errors import AgentError

pytestmark = pytest.mark.unit


def _snapshot(n_containers, n_rules):
    return {"counters": {"grafted": 5, "passed": 2, "denied": 3, "errors": 0,
                         "notifier_failures": 1},
            "containers": [{"container": f"c{i:04d}", "grafted": 1, "passed": 0, "denied": 0,
                            "errors": 0, "notifier_failures": 0, "notifier_threads": 2}
                           for i in range(n_containers)],
            "pending_connects": 0, "guarded": True, "kernel": None, "oci": None,
            "denials": {("connect", f"deny[{i}]", "agent"): 1 for i in range(n_rules)},
            "directory": {"directory": None}}


def _families(metrics):
    return {f.name: f for f in text_string_to_metric_families(
        generate_latest(metrics.registry).decode())}


def test_per_container_and_denial_series_are_bounded():
    mt = m.Metrics()
    mt.publish(_snapshot(m.MAX_CONTAINERS + 44, m.MAX_DENIAL_KEYS + 10))
    f = _families(mt)
    rows = {s.labels["container"]: s.value for s in f["sockgraft_container_grafted"].samples
            if s.name.endswith("_total")}
    assert len(rows) == m.MAX_CONTAINERS + 1 and rows[m.OTHER] == 44
    assert sum(rows.values()) == m.MAX_CONTAINERS + 44              # nothing lost
    den = [s for s in f["sockgraft_denials"].samples if s.name.endswith("_total")]
    assert len(den) == m.MAX_DENIAL_KEYS + 1
    assert sum(s.value for s in den) == m.MAX_DENIAL_KEYS + 10
    assert f["sockgraft_notifier_threads"].samples[0].value == 2 * (m.MAX_CONTAINERS + 44)


def test_nothing_is_rendered_before_the_first_snapshot():
    assert "sockgraft_grafted" not in _families(m.Metrics())


@pytest.mark.parametrize("text, want", [("127.0.0.1:9464", ("127.0.0.1", 9464)),
                                        (":9464", ("0.0.0.0", 9464)),
                                        ("[::1]:9464", ("::1", 9464))])
def test_listen_addresses(text, want):
    assert m.parse_listen(text) == want


@pytest.mark.parametrize("text", ["9464", "host:", "h:99999", "h:x"])
def test_bad_listen_addresses(text):
    with pytest.raises(AgentError, match="--metrics"):
        m.parse_listen(text)
