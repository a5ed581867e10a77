"""model/nodecheck.py: which graft modes a node's checks allow, and the
words the doctor and the agent use for what is missing."""

import pytest

from sockgraft.model.nodecheck import Check, kernel_checks, kernel_version, modes, refusal, \
    runtime_ok

pytestmark = pytest.mark.unit

ALL = ["seccomp_user_notif", "pidfd_getfd", "cgroup2", "bpffs", "bpf_programs", "bpf_splice",
       "bpf_fastpath", "tc_clsact",
       "nftables", "oci_runtime"]


def _checks(release="6.18.0", failing=()):
    return kernel_checks(release) + [Check(n, n not in failing) for n in ALL]


@pytest.mark.parametrize("release, failing, works, broken", [
    ("6.18.0", (), {"syscall", "socket", "oci", "enforcement", "splice", "fastpath"}, set()),
    ("5.10.0", (), {"syscall", "oci", "enforcement", "splice", "fastpath"},
     {"socket"}),                                                            # no ADDFD_FLAG_SEND
    ("5.4.0", (), {"enforcement", "splice", "fastpath"}, {"syscall", "socket", "oci"}),  # no ADDFD
    ("6.1.0", ("bpf_programs",), {"syscall", "oci", "enforcement"},
     {"socket", "splice", "fastpath"}),
    ("6.1.0", ("bpf_splice",), {"syscall", "socket", "oci", "enforcement", "fastpath"},
     {"splice"}),
    ("6.1.0", ("bpf_fastpath",), {"syscall", "socket", "oci", "enforcement", "splice"},
     {"fastpath"}),
    ("6.1.0", ("oci_runtime", "nftables"), {"syscall", "socket", "splice", "fastpath"},
     {"oci", "enforcement"}),
    ("6.1.0", ("pidfd_getfd",), {"enforcement", "splice", "fastpath"},
     {"syscall", "socket", "oci"}),
])
def test_modes(release, failing, works, broken):
    v = modes(_checks(release, failing))
    assert {m for m, x in v.items() if x["ok"]} == works
    assert {m for m, x in v.items() if not x["ok"]} == broken


def test_a_check_that_did_not_run_is_unchecked_not_missing():
    quick = kernel_checks("5.10.0") + [Check(n, True) for n in ("seccomp_user_notif",
                                                                "pidfd_getfd", "cgroup2")]
    v = modes(quick)
    assert v["syscall"]["ok"] and v["syscall"]["unchecked"] == []
    assert not v["socket"]["ok"]                              # ADDFD_FLAG_SEND failed
    assert [m["check"] for m in v["socket"]["missing"]] == ["seccomp_addfd_send"]
    assert v["socket"]["unchecked"] == ["bpf_programs"]
    assert v["oci"]["ok"] and v["oci"]["unchecked"] == ["oci_runtime"]


def test_the_refusal_names_what_is_missing_and_what_to_do():
    v = modes(_checks("5.10.0"))
    assert refusal("syscall", v) is None
    why = refusal("socket", v)
    assert "seccomp_addfd_send missing (a kernel >= 5.14)" in why and "sockgraft doctor" in why


@pytest.mark.parametrize("release, want", [("6.18.44-fc-v1045", (6, 18)), ("5.9", (5, 9)),
                                           ("garbage", (0, 0))])
def test_kernel_version(release, want):
    assert kernel_version(release) == want


@pytest.mark.parametrize("name, version, ok", [("runc", "1.1.5+ds1", True),
                                               ("runc", "1.0.3", False),
                                               ("crun", "1.8.1", True), ("crun", "0.18", False),
                                               ("runc", "?", False)])
def test_runtimes_that_pass_a_listener(name, version, ok):
    assert runtime_ok(name, version) is ok
