"""The fast path's verdict cache across a wrap of the policy generations:
records are matched by generation (a u16), so when the counter comes round
again, a verdict cached long ago under a number now given to another policy
would be read as current. The enforcer drops the cached verdicts when it
wraps; the replies' records (not verdicts) stay."""

import contextlib
import os
import secrets

import pytest

from sockgraft.agent.enforce import Enforcer
from sockgraft.agent.store import ConfigStore
from sockgraft.kernel import bpf as kbpf
from sockgraft.model import bpfmaps
from sockgraft.model import graftconfig as gc
from sockgraft.model.policy import Policy, parse_policy_rule

pytestmark = pytest.mark.priv


def _flow(ifindex: int, port: int) -> bytes:
    return bpfmaps.FLOW_KEY.pack(ifindex, 4, 6, port, 80, 0, bytes([10, 0, 0, 1]) + bytes(12))


def test_a_wrap_of_the_generations_drops_the_cached_verdicts(tmp_path):
    name = "tgen-" + secrets.token_hex(3)
    progs = kbpf.Programs(name)
    progs.load(join=False, fastpath="on")
    stack = contextlib.ExitStack()
    try:
        store = ConfigStore(str(tmp_path / "store"))
        store.save(gc.GraftConfig("c1", policy=Policy(
            allow=(parse_policy_rule("allow any 10.0.0.0/8"),))))
        enf = Enforcer(store, manage_nft=False)
        enf.bpf = progs
        enf._gen = 0xFFFD
        enf.sync_bpf([], {}, lambda mark: False, rescan=True)
        assert enf._gen == 0xFFFE
        verdict = bpfmaps.FLOW_VAL.pack(0xFFFE, 1, bpfmaps.FL_OUT, 0)
        older = bpfmaps.FLOW_VAL.pack(1, 1, bpfmaps.FL_OUT, 0)    # the next number given
        reply = bpfmaps.FLOW_VAL.pack(7, 1, bpfmaps.FL_IN, 0)
        progs.flows_new(5, 64)
        progs.flows_new(6, 64)
        flows = stack.enter_context(progs.flow_cache(5))
        other = stack.enter_context(progs.flow_cache(6))
        progs.update(flows, _flow(5, 1000), verdict)
        progs.update(flows, _flow(5, 1001), older)
        progs.update(flows, _flow(5, 1002), reply)
        progs.update(other, _flow(6, 1000), verdict)
        # a change below the wrap keeps the cache (the generation judges it)
        store.edit("c1", lambda cfg: gc.with_policy_rule(
            cfg, parse_policy_rule("deny tcp 10.9.0.0/16")))
        enf.sync_bpf([], {}, lambda mark: False, rescan=True)
        assert enf._gen == 0xFFFF
        assert len(progs.keys(flows, kbpf.FLOW_KEY_SIZE)) == 3
        # the change that wraps: generation 1 again
        store.edit("c1", lambda cfg: gc.with_policy_rule(
            cfg, parse_policy_rule("deny udp 10.8.0.0/16")))
        enf.sync_bpf([], {}, lambda mark: False, rescan=True)
        enf.sync_bpf([], {}, lambda mark: False, rescan=True)      # (nothing new: no wrap)
        assert enf._gen == 1
        left = progs.keys(flows, kbpf.FLOW_KEY_SIZE)
        assert left == [_flow(5, 1002)]                       # the reply's record only
        assert progs.keys(other, kbpf.FLOW_KEY_SIZE) == []    # every port's cache
    finally:
        stack.close()
        progs.close()
        kbpf.remove(name)
    assert not kbpf.leftovers(name)


def test_the_flow_cache_is_read_and_pruned_in_batches(tmp_path):
    """Programs.entries reads a hash map a batch at a time (here 64 entries
    per call over 1,000) and sees every entry once; delete_many deletes a
    list past a key that is gone already; FastPath.forget_flows gives a port
    a fresh cache and prunes the others by remote address; each policed
    port's cache is an LRU of its own (records beyond its size evict its
    own oldest, never another port's)."""
    from ipaddress import IPv4Address
    from sockgraft.agent.fastpath import FastPath
    name = "tbat-" + secrets.token_hex(3)
    progs = kbpf.Programs(name)
    progs.load(join=False, fastpath="on")
    fp = FastPath(None, str(tmp_path), flows_per_container=1024)
    stack = contextlib.ExitStack()
    try:
        val = bpfmaps.FLOW_VAL.pack(3, 1, bpfmaps.FL_OUT, 0)
        for i in (5, 6, 7, 8):
            progs.flows_new(i, 1024)
        caches = {i: stack.enter_context(progs.flow_cache(i)) for i in (5, 6, 7, 8)}
        ids = {i: progs.flow_id(i) for i in (5, 6, 7, 8)}
        keys = [_flow(5 + i % 4, 1000 + i) for i in range(1000)]
        for k in keys:
            progs.update(caches[int.from_bytes(k[:4], "little")], k, val)
        got = progs.entries(caches[5], kbpf.FLOW_KEY_SIZE, bpfmaps.FLOW_VAL.size, batch=64)
        assert sorted(k for k, _ in got) == sorted(keys[0::4]) and {v for _, v in got} == {val}
        progs.delete(caches[5], keys[0])
        progs.delete(caches[5], keys[8])
        assert progs.delete_many(caches[5], keys[0:20:4]) == 3     # two gone already
        assert len(progs.keys(caches[5], kbpf.FLOW_KEY_SIZE)) == 250 - 5
        # a fresh cache for port 5; port 6's records of 10.0.0.1 go
        assert fp.forget_flows(progs, {5}, {IPv4Address("10.0.0.1")}) == 3 * 250
        assert progs.flow_id(5) != ids[5] and progs.flow_id(6) == ids[6]
        for _, fd in progs.flow_caches():
            assert progs.entries(fd, kbpf.FLOW_KEY_SIZE, bpfmaps.FLOW_VAL.size) == []
        # a flood of one port's flows: the others keep every record
        for i, k in enumerate(keys[1:9:4]):
            progs.update(caches[6], k, val)
        for i in range(5000):
            progs.update(caches[7], _flow(7, i), val)
        assert len(progs.keys(caches[6], kbpf.FLOW_KEY_SIZE)) == 2
        assert len(progs.keys(caches[7], kbpf.FLOW_KEY_SIZE)) <= 1024
        progs.flows_drop(7)
        assert 7 not in progs.flows() and progs.flow_id(7) is None
        assert len(progs.keys("sg_fast_flows", 4)) == 3
        # the agent holds no fd per cache (a node of a thousand policed
        # containers would run out of them)
        before = len(os.listdir("/proc/self/fd"))
        for i in range(100, 150):
            progs.flows_new(i, 64)
        assert len(os.listdir("/proc/self/fd")) == before
    finally:
        stack.close()
        fp.close()
        progs.close()
        kbpf.remove(name)
    assert not kbpf.leftovers(name)


def test_a_generation_a_container_holds_is_never_given_again(tmp_path):
    """When the counter comes round to the generation a container holds, its
    next policy change skips it: given again, the new egress rules would
    have the old ones' keys (and be deleted with them), and verdicts cached
    under the old policy would match the new one."""
    name = "tgen-" + secrets.token_hex(3)
    progs = kbpf.Programs(name)
    progs.load(join=False, fastpath="on")
    try:
        store = ConfigStore(str(tmp_path / "store"))
        store.save(gc.load_config(EGRESS, source="test"))
        enf = Enforcer(store, manage_nft=False)
        enf.bpf = progs
        enf._gen = 4
        enf.sync_bpf([], {}, lambda mark: False, rescan=True)
        (mark, held), = enf.applied.items()
        assert held.gen == 5 and held.keys4
        enf._gen = 4                                  # as if it came round
        store.edit("c1", lambda cfg: gc.with_policy_rule(
            cfg, parse_policy_rule("deny udp 10.8.0.0/16")))
        enf.sync_bpf([], {}, lambda mark: False, rescan=True)
        now = enf.applied[mark]
        assert now.gen == 6
        assert all(progs.lookup("sg_egress4", k, bpfmaps.EGRESS_VAL.size) is not None for k in now.keys4)
        assert all(progs.lookup("sg_egress4", k, bpfmaps.EGRESS_VAL.size) is None for k in held.keys4)
    finally:
        progs.close()
        kbpf.remove(name)
    assert not kbpf.leftovers(name)


EGRESS = """
container = "c1"
[endpoints.out]
type = "ipv4"
addr = "10.0.0.1"
port = "dynamic"
[rules]
egress = ["10.0.0.0/8=out"]
"""
