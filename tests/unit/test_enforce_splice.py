"""Which containers' connections may be spliced (the policy entry's
F_NO_SPLICE flag as Enforcer.sync_bpf writes it): only where the config
allows it and every process tree of the container traps splice() - the
kernel's splice out of a spliced socket would read nothing."""

import os

from sockgraft.agent.enforce import Enforcer
from sockgraft.agent.sessions import Session
from sockgraft.agent.store import ConfigStore
from sockgraft.model import bpfmaps
from sockgraft.model import graftconfig as gc


class FakeBpf:
    def __init__(self):
        self.gens, self.maps = {}, {}

    def set_gen(self, mark, gen):
        self.gens[mark] = gen

    def update(self, m, key, val):
        self.maps.setdefault(m, {})[key] = val

    def delete(self, m, key):
        return self.maps.get(m, {}).pop(key, None) is not None


def _flags(bpf, mark):
    return bpfmaps.POLICY_HEAD.unpack_from(bpf.maps["sg_policy"][bpfmaps.policy_key(mark)])[0]


def _sess(mark, traps, cfg):
    return Session(cfg.container, os.getpid(), None, mark, cfg, {}, traps_splice=traps)


def test_spliced_only_where_every_session_traps_splice(tmp_path):
    enf = Enforcer(ConfigStore(str(tmp_path)), manage_nft=False)
    enf.bpf = bpf = FakeBpf()
    a, b, c = gc.GraftConfig("a"), gc.GraftConfig("b"), gc.GraftConfig("c", splice=False)
    sessions = [_sess(1, True, a), _sess(2, True, b), _sess(2, False, b), _sess(3, True, c)]
    enf.sync_bpf(sessions, {}, lambda m: True, rescan=False)
    assert not _flags(bpf, 1) & bpfmaps.F_NO_SPLICE           # traps it: may be spliced
    assert _flags(bpf, 2) & bpfmaps.F_NO_SPLICE               # one tree does not trap it
    assert _flags(bpf, 3) & bpfmaps.F_NO_SPLICE               # its config says no
    # the tree that did not trap it goes: the container may be spliced now
    enf.sync_bpf(sessions[:2] + sessions[3:], {}, lambda m: True, rescan=False)
    assert not _flags(bpf, 2) & bpfmaps.F_NO_SPLICE
