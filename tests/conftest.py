import hashlib
import os
import secrets
import shutil
import subprocess
import sys

import pytest
from hypothesis import settings

sys.path.insert(0, os.path.dirname(__file__))

# CI explores the same examples every run (a new counterexample is found by a
# developer's run, not by a submission); elsewhere each run draws new ones
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

ATTACK_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "security", "attack.c")


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
    from grafting import agents_on
    with agents_on(lab, state_dir) as g:
        yield g


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


@pytest.fixture(scope="session")
def attack_bin(tmp_path_factory):
    """tests/security/attack.c built statically (cached by source hash)."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed (./run installs it)")
    with open(ATTACK_SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    cache = os.path.join(os.environ.get("SOCKGRAFT_CACHE_DIR", "/var/cache/sockgraft"),
                         "attack")
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, f"attack-{digest}")
    if not os.path.exists(out):
        tmp = out + f".{os.getpid()}"
        res = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", tmp, ATTACK_SOURCE],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"cannot build attack.c: {res.stderr}"
        os.replace(tmp, out)
    return out
