"""The audit rate limit (model/ratelimit.py) and the audit trail that uses it
(agent/audit.py): a container looping on denied calls gets a bounded number
of lines, the rest is counted and summed up, and the file never grows past
its cap."""

import json

import pytest

from sockgraft.agent.audit import AuditLog
from sockgraft.model.ratelimit import Limiter, TokenBucket

pytestmark = pytest.mark.unit


def test_bucket_allows_a_burst_then_the_rate():
    b = TokenBucket(rate=10, burst=5, tokens=5, stamp=0.0)
    assert [b.take(0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert b.take(0.05) is False            # half a token
    assert b.take(0.1) is True              # one token after 0.1 s
    assert sum(b.take(10.0) for _ in range(20)) == 5     # refills to the burst, not more


def test_limiter_counts_what_it_suppressed_per_key():
    lim = Limiter(rate=2, burst=3)
    got = [lim.allow("a", 0.0) for _ in range(10)]
    assert got.count(True) == 3
    assert all(lim.allow("b", 0.0) for _ in range(3))    # another container is not starved
    assert lim.take_suppressed() == {"a": 7}
    assert lim.take_suppressed() == {}
    assert lim.total_suppressed == 7


def test_limiter_forgets_the_least_recent_key_past_its_bound():
    lim = Limiter(rate=1, burst=1, max_keys=3)
    for k in "abcd":
        assert lim.allow(k, 0.0)
    assert len(lim._buckets) == 3
    assert lim.allow("a", 0.0)              # "a" was dropped: a fresh bucket


@pytest.mark.parametrize("rate, burst", [(0, 5), (-1, 5), (1, 0)])
def test_limiter_rejects_nonsense(rate, burst):
    with pytest.raises(ValueError):
        Limiter(rate, burst)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_audit_log_rate_limits_a_flooding_container_and_sums_it_up(tmp_path):
    path = tmp_path / "audit.log"
    clock = Clock()
    a = AuditLog(str(path), "h1", rate=10, burst=20, clock=clock)
    for i in range(1000):
        clock.t = i * 0.001                 # 1000 denials in one second
        a.write("evil", 1, "connect", "127.0.0.1:1", "deny", "builtin:loopback", 13)
    a.write("good", 2, "bind", "0.0.0.0:1", "deny", "bind:no-endpoint", 13)
    a.flush()
    lines = _lines(path)
    evil = [x for x in lines if x["container"] == "evil" and x["verdict"] == "deny"]
    assert 20 <= len(evil) <= 20 + 10 + 1
    summary = [x for x in lines if x["verdict"] == "suppressed"]
    assert summary == [{**summary[0], "container": "evil", "count": 1000 - len(evil)}]
    assert any(x["container"] == "good" for x in lines)
    assert a.suppressed == 1000 - len(evil)
    a.close()


def test_audit_log_rotates_at_its_cap(tmp_path):
    path = tmp_path / "audit.log"
    clock = Clock()
    a = AuditLog(str(path), "h1", rate=1e9, burst=1e9, max_bytes=4096, clock=clock)
    for i in range(200):
        a.write(f"c{i}", i, "connect", "10.0.0.1:80", "deny", "deny[0]", 13)
    a.close()
    assert path.stat().st_size <= 4096
    assert (tmp_path / "audit.log.1").stat().st_size <= 4096
    assert not (tmp_path / "audit.log.2").exists()


def test_audit_log_without_a_file_still_limits(tmp_path):
    a = AuditLog(None, "h1", rate=1, burst=1, clock=Clock())
    assert a.write("c", 1, "connect", "x", "deny", "r") is True
    assert a.write("c", 1, "connect", "x", "deny", "r") is False
    a.close()
