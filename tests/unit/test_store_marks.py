"""agent/store.py container marks: stable, released on delete, handed out
again only in a new generation and never while a live session holds them
(issue 13, defect 3)."""

from __future__ import annotations

import json
import os

import pytest

from sockgraft.agent.store import ConfigStore, empty_config
from sockgraft.errors import ConfigError
from sockgraft.model.graft import MARK_BASE

pytestmark = pytest.mark.unit


def _store(tmp_path, space=4):
    return ConfigStore(str(tmp_path), mark_space=space)


def test_marks_are_stable_and_distinct(tmp_path):
    st = _store(tmp_path)
    a, b = st.mark("a"), st.mark("b")
    assert a != b and st.mark("a") == a and a & ~0xFFFF == MARK_BASE
    assert st.generation(a) == 0


def test_a_churn_of_more_containers_than_marks(tmp_path):
    """40 containers come and go through a space of 4 marks; each mark
    handed out again moves to the next generation; none is handed to a
    second container while a live session holds it."""
    st = _store(tmp_path)
    live: dict[str, int] = {}
    held = lambda m: m in live.values()            # noqa: E731 - the agent's sessions
    seen_gens: dict[int, list[int]] = {}
    for i in range(40):
        name = f"c{i}"
        st.save(empty_config(name))
        m = st.mark(name, in_use=held)
        assert m not in live.values()
        live[name] = m
        seen_gens.setdefault(m, []).append(st.generation(m))
        if len(live) == 3:                          # the oldest one goes away
            gone = sorted(live, key=lambda n: int(n[1:]))[0]
            assert st.delete(gone)
            del live[gone]
    assert len(seen_gens) == 4
    for gens in seen_gens.values():
        assert gens == sorted(gens) and len(set(gens)) == len(gens)   # a new generation each time
    assert st.generations() == {m: g[-1] for m, g in seen_gens.items() if g[-1]}


def test_a_deleted_container_still_running_keeps_its_mark(tmp_path):
    st = _store(tmp_path, space=1)
    m = st.mark("a")
    st.delete("a")                                   # config gone, session still alive
    with pytest.raises(ConfigError, match="no free container mark"):
        st.mark("b", in_use=lambda x: x == m)
    assert st.mark("b", in_use=lambda x: False) == m and st.generation(m) == 1


def test_without_an_in_use_check_released_marks_are_not_reused(tmp_path):
    st = _store(tmp_path, space=1)
    st.mark("a")
    st.delete("a")
    with pytest.raises(ConfigError, match="released ones still in use"):
        st.mark("b")


def test_an_old_registry_is_read_and_a_corrupt_one_refused(tmp_path):
    (tmp_path / "marks.json").write_text(json.dumps({"a": 1, "b": 2}))
    st = _store(tmp_path)
    assert st.mark("b") == MARK_BASE | 2 and st.mark("c") == MARK_BASE | 3
    for bad in ('{"a": "x"}', '[1]', '{"a": 70000}', '{".released": 3}', "{"):
        (tmp_path / "marks.json").write_text(bad)
        with pytest.raises(ConfigError, match="corrupt mark registry"):
            st.mark("z")


def test_mark_space_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("SOCKGRAFT_MARK_SPACE", "2")
    assert ConfigStore(str(tmp_path)).mark_space == 2
    monkeypatch.setenv("SOCKGRAFT_MARK_SPACE", "0")
    with pytest.raises(ConfigError, match="1-65535"):
        ConfigStore(str(tmp_path))


def test_a_known_mark_is_read_without_waiting_for_the_lock(tmp_path):
    """The agent asks for marks on its loop (issue 13, defect 6): a container
    that has one is answered while a CLI holds the store's lock; only a new
    container's first mark waits for it."""
    import fcntl
    import os
    import threading
    st = _store(tmp_path)
    known = st.mark("known")
    lock = os.open(os.path.join(str(tmp_path), ".lock"), os.O_RDWR)
    fcntl.flock(lock, fcntl.LOCK_EX)          # another process editing the store
    try:
        got: dict[str, int] = {}
        t1 = threading.Thread(target=lambda: got.update(known=st.mark("known")))
        t2 = threading.Thread(target=lambda: got.update(new=st.mark("new")))
        t1.start()
        t2.start()
        t1.join(5)
        assert got.get("known") == known
        t2.join(0.3)
        assert t2.is_alive() and "new" not in got
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
    t2.join(5)
    assert got["new"] not in (known, None) and st.marks() == {"known": known,
                                                              "new": got["new"]}


def test_containers_without_a_stored_config_give_their_mark_back(tmp_path):
    """OCI and `sockgraft run` containers configured inline have no stored
    configuration: their mark goes back when their last session ends (the
    agent calls release_unconfigured) - 10 of them come and go through a
    space of 2 marks. A stored configuration keeps its mark."""
    st = _store(tmp_path, space=2)
    st.save(empty_config("kept"))
    kept = st.mark("kept")
    for i in range(10):
        m = st.mark(f"oci{i}", in_use=lambda x: x == kept)
        assert m != kept
        assert st.release_unconfigured(f"oci{i}")
        assert not st.release_unconfigured(f"oci{i}")           # (once)
    assert not st.release_unconfigured("kept") and st.mark("kept") == kept
    assert st.generation(m) == 9                                # a new one each time


@pytest.mark.parametrize("name", ["web\n", "web/x", "../web", "", "-web", "w" * 129])
def test_a_name_the_store_refuses(tmp_path, name):
    with pytest.raises(ConfigError, match="container name"):
        _store(tmp_path).mark(name)


def test_two_long_pod_names_keep_two_identities(tmp_path, monkeypatch):
    """CNI names a pod "namespace.pod": two long names that agree on their
    first 128 characters used to be cut to one - one stored config, one
    mark, one set of grants for two pods. A longer name keeps its start and
    gets a hash of the whole; the store takes it."""
    from sockgraft import cni
    names = []
    for last in "ab":
        monkeypatch.setenv("CNI_ARGS", f"K8S_POD_NAMESPACE=team;K8S_POD_NAME={'p' * 150}{last}")
        names.append(cni.container_name({}, "cid"))
    assert names[0] != names[1] and all(len(n) == 128 for n in names)
    assert names[0][:100] == "team." + "p" * 95
    st = _store(tmp_path)
    assert st.mark(names[0]) != st.mark(names[1])
    monkeypatch.setenv("CNI_ARGS", "K8S_POD_NAMESPACE=team;K8S_POD_NAME=short")
    assert cni.container_name({}, "cid") == "team.short"


def _cni_env(tmp_path, monkeypatch, cid):
    """The plugin's environment for container cid on eth0: (state dir, store)."""
    from sockgraft import cni
    for k, v in (("CNI_CONTAINERID", cid), ("CNI_NETNS", "/var/run/netns/x"),
                 ("CNI_IFNAME", "eth0"), ("CNI_ARGS", "")):
        monkeypatch.setenv(k, v)
    return str(tmp_path), cni._store(str(tmp_path))


def _web_config(denied):
    from sockgraft.model.graftconfig import config_from_dict
    return config_from_dict({"container": "web", "policy": {"deny": [f"deny tcp {denied}"]}},
                            "test")


def test_a_failed_cni_add_leaves_what_was_there_before(tmp_path, monkeypatch):
    """ADD with a graft configuration, the agent unreachable: the record is
    gone again and the configuration stored before this ADD is back (it
    used to be deleted); with none before, none after."""
    from sockgraft import cni
    state, store = _cni_env(tmp_path, monkeypatch, "cid1")
    before = _web_config("10.0.0.1")
    store.save(before)
    conf = {"cniVersion": "1.0.0", "stateDir": state, "container": "web",
            "agentSocket": str(tmp_path / "nobody.sock"),
            "graft": {"policy": {"deny": ["deny tcp 10.9.9.9"]}},
            "prevResult": {"cniVersion": "1.0.0", "ips": [{"address": "10.1.0.2/24"}]}}
    with pytest.raises(cni.CniError) as exc:
        cni.cmd_add(conf)
    assert exc.value.code == cni.E_TRY_LATER
    assert store.load("web") == before
    assert not os.path.exists(cni.state_path(state, "cid1", "eth0"))
    store.delete("web")
    with pytest.raises(cni.CniError):
        cni.cmd_add(conf)
    assert store.load("web") is None and store.containers() == []


def test_del_removes_only_the_configuration_its_add_wrote(tmp_path, monkeypatch):
    """An ADD killed after its record and before its configuration leaves a
    record saying it wrote one: DEL must not delete the configuration that
    is there (an operator's, another interface's)."""
    from sockgraft import cni
    state, store = _cni_env(tmp_path, monkeypatch, "cid2")
    operators, mine = _web_config("10.0.0.1"), _web_config("10.9.9.9")
    path = cni.state_path(state, "cid2", "eth0")
    os.makedirs(os.path.dirname(path))
    conf = {"stateDir": state, "agentSocket": str(tmp_path / "nobody.sock")}
    for stored, gone in ((operators, False), (mine, True)):
        store.save(stored)
        with open(path, "w") as f:
            json.dump({"id": "cid2", "container": "web", "config_written": True,
                       "config_digest": cni._digest(mine)}, f)
        cni.cmd_del(conf)
        assert (store.load("web") is None) == gone and not os.path.exists(path)
