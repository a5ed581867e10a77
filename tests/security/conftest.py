"""The adversarial suite's fixtures: one lab with an agent per host shared by
a module's tests (the attack binary, tests/security/attack.c, is built by
tests/conftest.py's `attack_bin`)."""

import os
import secrets

import pytest


@pytest.fixture(scope="module")
def seclab(tmp_path_factory):
    """The default lab with an agent on each host, shared by the tests of one
    module (each test configures the containers it attacks)."""
    from grafting import agents_on, default_lab
    if os.geteuid() != 0:
        pytest.fail("the adversarial suite needs root")
    state = tmp_path_factory.mktemp("secstate")
    mp = pytest.MonkeyPatch()
    mp.setenv("SOCKGRAFT_STATE_DIR", str(state))
    try:
        with default_lab("s" + secrets.token_hex(4)) as plan, agents_on(plan, state) as g:
            yield g
    finally:
        mp.undo()
