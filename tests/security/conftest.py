"""The adversarial suite's fixtures: the attack binary (static, so it runs in
the runc rootfs too), one lab with an agent per host shared by a module's
tests, and sentinels that listen where nothing may arrive."""

import hashlib
import os
import secrets
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(HERE, "attack.c")


@pytest.fixture(scope="session")
def attack_bin(tmp_path_factory):
    """tests/security/attack.c built statically (cached by source hash)."""
    if shutil.which("gcc") is None:
        pytest.fail("gcc is not installed (./run installs it)")
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    cache = os.path.join(os.environ.get("SOCKGRAFT_CACHE_DIR", "/var/cache/sockgraft"),
                         "attack")
    os.makedirs(cache, exist_ok=True)
    out = os.path.join(cache, f"attack-{digest}")
    if not os.path.exists(out):
        tmp = out + f".{os.getpid()}"
        res = subprocess.run(["gcc", "-static", "-O2", "-Wall", "-o", tmp, SOURCE],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"cannot build attack.c: {res.stderr}"
        os.replace(tmp, out)
    return out


@pytest.fixture(scope="module")
def seclab(tmp_path_factory):
    """The default lab with an agent on each host, shared by the tests of one
    module (each test configures the containers it attacks)."""
    from grafting import GraftLab, default_lab
    if os.geteuid() != 0:
        pytest.fail("the adversarial suite needs root")
    state = tmp_path_factory.mktemp("secstate")
    mp = pytest.MonkeyPatch()
    mp.setenv("SOCKGRAFT_STATE_DIR", str(state))
    try:
        with default_lab("s" + secrets.token_hex(4)) as plan:
            g = GraftLab(plan, state)
            try:
                for h in plan.hosts:
                    g.start_agent(h.name)
                yield g
            finally:
                g.close()
    finally:
        mp.undo()
