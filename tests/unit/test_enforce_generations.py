"""Enforcer.sync_bpf when a write to the kernel maps fails half-way: the
container whose write failed keeps its previous generation whole (nothing
of the new one is left), and what the other containers' new generations
replaced is still deleted - a rule left behind under its generation would
come back to life if that generation were given to the container again."""

import os

import pytest

from sockgraft.agent.enforce import Enforcer
from sockgraft.agent.sessions import Session
from sockgraft.agent.store import ConfigStore
from sockgraft.errors import KernelError
from sockgraft.model import bpfmaps
from sockgraft.model import graftconfig as gc

CFG = """
container = "{name}"
[endpoints.out]
type = "ipv4"
addr = "10.0.0.1"
port = "dynamic"
[rules]
egress = ["{net}=out"]
"""


class FailingBpf:
    def __init__(self):
        self.gens, self.maps, self.fail_policy_of, self.fail_deletes = {}, {}, None, False

    def set_gen(self, mark, gen):
        self.gens[mark] = gen

    def update(self, m, key, val):
        if m == "sg_policy" and key == bpfmaps.policy_key(self.fail_policy_of or 0):
            raise KernelError("update sg_policy", 12)
        self.maps.setdefault(m, {})[key] = val

    def delete(self, m, key):
        if self.fail_deletes and m == "sg_egress4":
            raise KernelError("delete from sg_egress4", 5)
        return self.maps.get(m, {}).pop(key, None) is not None


def _cfg(name, net):
    return gc.load_config(CFG.format(name=name, net=net), source="test")


def _sess(mark, cfg):
    return Session(cfg.container, os.getpid(), None, mark, cfg, {})


def test_a_failed_write_leaves_no_half_generation(tmp_path):
    enf = Enforcer(ConfigStore(str(tmp_path)), manage_nft=False)
    enf.bpf = bpf = FailingBpf()
    enf.sync_bpf([_sess(1, _cfg("a", "10.0.0.0/8")), _sess(2, _cfg("b", "10.0.0.0/8"))],
                 {}, lambda m: True, rescan=False)
    old_a, old_b = enf.applied[1], enf.applied[2]
    assert set(bpf.maps["sg_egress4"]) == set(old_a.keys4 + old_b.keys4)
    bpf.fail_policy_of = 2
    retired = []
    with pytest.raises(KernelError):
        enf.sync_bpf([_sess(1, _cfg("a", "10.1.0.0/16")), _sess(2, _cfg("b", "10.1.0.0/16"))],
                     {}, lambda m: True, rescan=False,
                     before_retire=lambda: retired.append(set(bpf.maps["sg_egress4"])))
    new_a = enf.applied[1]
    assert new_a.gen != old_a.gen and enf.applied[2] is old_b
    # a's old rules went after the native loops were told (before_retire), b's
    # half-written new ones at once; b's old generation is whole
    assert retired == [set(old_a.keys4 + new_a.keys4 + old_b.keys4)]
    assert set(bpf.maps["sg_egress4"]) == set(new_a.keys4 + old_b.keys4)


def test_a_generation_whose_rules_could_not_be_deleted_is_never_given_again(tmp_path):
    """Its rules are still in the map under (mark, generation): given to the
    container again - after the counter came round - they would be in force."""
    enf = Enforcer(ConfigStore(str(tmp_path)), manage_nft=False)
    enf.bpf = bpf = FailingBpf()
    enf.sync_bpf([_sess(1, _cfg("a", "10.0.0.0/8"))], {}, lambda m: True, rescan=False)
    first = enf.applied[1].gen
    bpf.fail_deletes = True
    enf.sync_bpf([_sess(1, _cfg("a", "10.1.0.0/16"))], {}, lambda m: True, rescan=False)
    assert enf.applied[1].gen != first and first in enf._left    # logged, not raised
    bpf.fail_deletes = False
    enf._gen = 0xFFFF                       # the counter comes round at the next change
    enf.sync_bpf([_sess(1, _cfg("a", "10.2.0.0/16"))], {}, lambda m: True, rescan=False)
    assert enf.applied[1].gen not in (first, 0)
