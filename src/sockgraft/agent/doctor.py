"""The node's checks for `sockgraft doctor` and the agent's start: each one a
real probe where it can be made without side effects (seccomp's action
query, pidfd_getfd on ourselves, the graft programs compiled and loaded
but never attached, clsact in a throwaway namespace, nft, the runtimes'
versions); the seccomp ioctls a probe cannot reach without a filtered
child are judged by the kernel version (model/nodecheck.py)."""

from __future__ import annotations

import ctypes
import os
import platform
import secrets
import shutil
import subprocess

from ..errors import SockgraftError
from ..model.nodecheck import Check, kernel_checks, runtime_ok

SYS_SECCOMP = 317                    # x86_64
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_RET_USER_NOTIF = 0x7FC00000

_libc = ctypes.CDLL(None, use_errno=True)


def _check(name: str, probe) -> Check:
    try:
        detail = probe()
        return Check(name, True, detail or "ok")
    except (SockgraftError, OSError, subprocess.SubprocessError, ValueError) as exc:
        return Check(name, False, str(exc))


def _user_notif() -> str:
    action = ctypes.c_uint32(SECCOMP_RET_USER_NOTIF)
    if _libc.syscall(SYS_SECCOMP, SECCOMP_GET_ACTION_AVAIL, 0, ctypes.byref(action)) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"SECCOMP_RET_USER_NOTIF unavailable: {os.strerror(e)}")
    return "SECCOMP_RET_USER_NOTIF available"


def _pidfd_getfd() -> str:
    from ..kernel import seccomp
    pidfd = seccomp.pidfd_open(os.getpid())
    try:
        os.close(seccomp.pidfd_getfd(pidfd, 0))
    finally:
        os.close(pidfd)
    return "pidfd_open + pidfd_getfd work"


def _cgroup2() -> str:
    from ..kernel import bpf
    return f"mounted at {bpf.cgroup2_mount()}"


def _bpffs() -> str:
    if not os.path.ismount("/sys/fs/bpf"):
        raise OSError("/sys/fs/bpf is not mounted (the agent mounts it when it may)")
    return "mounted at /sys/fs/bpf"


def _bpf_programs() -> str:
    from ..kernel import bpf
    name = f"doctor-{os.getpid()}"
    progs = bpf.Programs(name)
    try:
        progs.load(join=False)        # compiled and verified, never attached
    finally:
        progs.close()
        bpf.remove(name)              # its pins and cgroup: nothing left behind
    return f"{len(bpf.PROGRAMS)} programs compiled and accepted by the verifier"


def _tc_clsact() -> str:
    from ..kernel import netns
    ns = f"sg-doctor-{secrets.token_hex(3)}"
    netns.create(ns)
    try:
        p = subprocess.run(["ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo",
                            "clsact"], capture_output=True, text=True, timeout=10)
        if p.returncode != 0:
            raise OSError(p.stderr.strip() or "tc qdisc add clsact failed")
    finally:
        netns.delete(ns)
    return "clsact qdisc works"


def _nftables() -> str:
    p = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True, timeout=10)
    if p.returncode != 0:
        raise OSError(p.stderr.strip() or "nft failed")
    return "nft works"


def _oci_runtime() -> str:
    found = []
    for rt in ("runc", "crun"):
        exe = shutil.which(rt)
        if exe is None:
            continue
        out = subprocess.run([exe, "--version"], capture_output=True, text=True,
                             timeout=10).stdout
        version = out.split("version", 1)[-1].split()[0] if "version" in out else "?"
        found.append((rt, version, runtime_ok(rt, version)))
    if not any(ok for _, _, ok in found):
        raise OSError("no runc >= 1.1 or crun >= 0.19 found" +
                      (f" ({', '.join(f'{r} {v}' for r, v, _ in found)})" if found else ""))
    return ", ".join(f"{r} {v}" + ("" if ok else " (too old)") for r, v, ok in found)


PROBES = (("seccomp_user_notif", _user_notif), ("pidfd_getfd", _pidfd_getfd),
          ("cgroup2", _cgroup2), ("bpffs", _bpffs), ("bpf_programs", _bpf_programs),
          ("tc_clsact", _tc_clsact), ("nftables", _nftables), ("oci_runtime", _oci_runtime))
QUICK = ("seccomp_user_notif", "pidfd_getfd", "cgroup2")     # the agent's start


def run(names: tuple[str, ...] | None = None, release: str | None = None) -> list[Check]:
    """The checks (all, or those named); release: the kernel's, `uname -r`
    (SOCKGRAFT_DOCTOR_KERNEL overrides it: how the tests play an old node)."""
    release = release or os.environ.get("SOCKGRAFT_DOCTOR_KERNEL") or platform.release()
    checks = kernel_checks(release)
    checks += [_check(n, p) for n, p in PROBES if names is None or n in names]
    return checks
