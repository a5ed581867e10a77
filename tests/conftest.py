import os
import secrets
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture
def state_dir(tmp_path, monkeypatch):
    d = tmp_path / "state"
    monkeypatch.setenv("SOCKGRAFT_STATE_DIR", str(d))
    return d


@pytest.fixture
def lab_name():
    return "t" + secrets.token_hex(4)


@pytest.fixture
def lab(state_dir, lab_name):
    """The default topology brought up under a unique lab name, always torn down."""
    from grafting import default_lab
    if os.geteuid() != 0:
        pytest.skip("needs root for network namespaces")
    with default_lab(lab_name) as plan:
        yield plan


@pytest.fixture
def glab(lab, state_dir):
    """The default lab with a real agent on each host."""
    from grafting import GraftLab
    g = GraftLab(lab, state_dir)
    try:
        for h in lab.hosts:
            g.start_agent(h.name)
        yield g
    finally:
        g.close()


@pytest.fixture(autouse=True, scope="module")
def root_namespace_untouched():
    """No test may leave sockgraft's policy table in the namespace the suite
    runs in (it would drop marked packets of every later test)."""
    yield
    if os.geteuid() != 0:
        return
    from sockgraft.kernel import nft
    try:
        tables = nft.list_tables(None, "inet")
    except Exception:   # noqa: BLE001 - no nft binary: nothing to check
        return
    if "sockgraft" in tables:
        nft.delete_table(None, "inet", "sockgraft")
        pytest.fail("a test left table inet sockgraft in the root namespace")
