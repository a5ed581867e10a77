"""`sockgraft doctor` on this machine, and the agent refusing what the node
cannot do with the doctor's words (an old kernel played through
SOCKGRAFT_DOCTOR_KERNEL)."""

import json
import os
import subprocess
import sys

import pytest

from grafting import PROBE

pytestmark = pytest.mark.priv
SG = [sys.executable, "-m", "sockgraft.cli.main"]


def test_doctor_says_every_mode_works_here_and_leaves_nothing(tmp_path):
    from sockgraft.kernel import bpf, netns
    env = dict(os.environ, SOCKGRAFT_STATE_DIR=str(tmp_path))
    p = subprocess.run(SG + ["doctor", "--json"], env=env, capture_output=True, text=True,
                       timeout=180)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    checks = {c["name"]: c for c in out["checks"]}
    assert set(checks) >= {"seccomp_user_notif", "seccomp_addfd", "seccomp_addfd_send",
                           "pidfd_getfd", "cgroup2", "bpf_programs", "bpf_splice", "bpf_fastpath",
                           "tc_clsact",
                           "nftables",
                           "oci_runtime"}
    assert all(c["ok"] for c in checks.values()), [c for c in checks.values() if not c["ok"]]
    assert all(v["ok"] for v in out["modes"].values()), out["modes"]
    # its probes leave nothing: no namespace, no pinned programs or maps, no cgroup
    assert not [n for n in netns.list_names() if n.startswith("sg-doctor-")]
    for base in ("/sys/fs/bpf/sockgraft", os.path.join(bpf.cgroup2_mount(), "sockgraft")):
        left = os.listdir(base) if os.path.isdir(base) else []
        assert not [d for d in left if d.startswith("doctor-")], left


def test_an_agent_on_a_node_without_seccomp_addfd_refuses_to_start(tmp_path):
    env = dict(os.environ, SOCKGRAFT_STATE_DIR=str(tmp_path), SOCKGRAFT_DOCTOR_KERNEL="5.4.0")
    p = subprocess.run(SG + ["agent", "--socket", str(tmp_path / "a.sock"), "--directory",
                             "off", "--oci-socket", "off", "--no-nft", "--bpf", "off"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert "cannot run graft mode 'syscall'" in p.stderr and "seccomp_addfd missing" in p.stderr
    assert "sockgraft doctor" in p.stderr


def test_socket_mode_is_refused_with_the_doctors_words_on_an_old_kernel(glab):
    glab.stop_agent("h1")
    glab.env["SOCKGRAFT_DOCTOR_KERNEL"] = "5.10.0"     # ADDFD yes, ADDFD_FLAG_SEND no
    try:
        glab.start_agent("h1")
        rc, _lines, err = glab.run("h1-c1", PROBE + ["tcp-client", "198.18.0.2", "9"],
                                   options=["--graft-at", "socket"])
        assert rc != 0 and "seccomp_addfd_send missing" in err, err
        rc, lines, err = glab.run("h1-c1", PROBE + ["bind-probe", "::1"])   # syscall mode
        assert rc == 0, err
    finally:
        del glab.env["SOCKGRAFT_DOCTOR_KERNEL"]


def _children():
    me = str(os.getpid())
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        out.append(p)
            except OSError:
                pass
    return out


def test_the_seccomp_ioctls_are_probed_on_a_real_notification():
    """ADDFD, ADDFD_FLAG_SEND and SYNC_WAKE_UP tried on a child's trapped
    call, not read off the kernel version; nothing left behind."""
    from sockgraft.agent import doctor
    fds = len(os.listdir("/proc/self/fd"))
    checks = {c.name: c for c in doctor.run(doctor.QUICK)}
    assert checks["seccomp_addfd_send"].ok and \
        "FLAG_SEND answered a call" in checks["seccomp_addfd_send"].detail
    assert checks["seccomp_addfd"].ok and "installed an fd" in checks["seccomp_addfd"].detail
    assert checks["seccomp_sync_wake_up"].ok and \
        "SYNC_WAKE_UP) accepted" in checks["seccomp_sync_wake_up"].detail
    assert len(os.listdir("/proc/self/fd")) == fds and not _children()


def test_when_the_probe_cannot_be_made_the_kernel_version_decides_and_says_so(monkeypatch):
    """A node where the agent may not copy the child's listener (no
    CAP_SYS_PTRACE): the checks fall back to the version, saying why."""
    import errno

    from sockgraft.agent import doctor
    from sockgraft.errors import KernelError
    from sockgraft.kernel import seccomp

    def refused(pidfd, fd):
        raise KernelError("pidfd_getfd", errno.EPERM)
    monkeypatch.setattr(seccomp, "pidfd_getfd", refused)
    fds = len(os.listdir("/proc/self/fd"))
    checks = {c.name: c for c in doctor.seccomp_checks("5.10.0", simulated=False)}
    assert not checks["seccomp_addfd_send"].ok and checks["seccomp_addfd"].ok
    assert "probe failed" in checks["seccomp_addfd"].detail and \
        "EPERM" in checks["seccomp_addfd"].detail
    assert len(os.listdir("/proc/self/fd")) == fds and not _children()
