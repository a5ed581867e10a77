"""The node's checks for `sockgraft doctor` and the agent's start: each one a
real probe made without side effects (seccomp's action query, pidfd_getfd
on ourselves, a forked child whose own getppid() is trapped to a listener
we take with pidfd_getfd and try NOTIF_SET_FLAGS(SYNC_WAKE_UP), ADDFD with
FLAG_SEND and plain ADDFD on, the graft programs compiled and loaded but
never attached, clsact in a throwaway namespace, nft, the runtimes'
versions). Only when that child cannot run, or SOCKGRAFT_DOCTOR_KERNEL
plays another kernel, are the seccomp ioctls judged by the kernel version
(model/nodecheck.py)."""

from __future__ import annotations

import ctypes
import os
import platform
import secrets
import select
import shutil
import signal
import struct
import subprocess

from ..errors import KernelError, SockgraftError
from ..model.nodecheck import KERNEL_FEATURES, Check, kernel_checks, runtime_ok

SYS_SECCOMP = 317                    # x86_64
SECCOMP_GET_ACTION_AVAIL = 2
SECCOMP_RET_USER_NOTIF = 0x7FC00000
SYS_GETPPID = 110                    # x86_64: nothing else in the probe child calls it

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


def _read_within(fd: int, n: int, timeout: float) -> bytes:
    ready, _, _ = select.select([fd], [], [], timeout)
    return os.read(fd, n) if ready else b""


def _probe_child(prog: bytes, w: int, r: int) -> None:
    """In the forked child: a listener for our own getppid(), its number to
    the parent, then the trapped call once told, and what it returned."""
    from ..kernel import seccomp
    code = 0
    try:
        fd = seccomp.install_filter(prog)
        os.write(w, struct.pack("=i", fd))
        if os.read(r, 1) == b"g":
            os.write(w, struct.pack("=q", _libc.syscall(SYS_GETPPID)))
    except BaseException:   # noqa: BLE001 - the parent sees the missing answer
        code = 1
    finally:
        os._exit(code)


def listener_probe() -> dict[str, Check]:
    """The seccomp ioctls the modes need, tried on a real notification:
    {seccomp_addfd, seccomp_addfd_send, seccomp_sync_wake_up: Check}.
    Raises OSError/SockgraftError if the probe itself cannot be made."""
    from ..kernel import seccomp
    from ..kernel import seccomp_filter as sf
    prog = sf.build_filter(sf.FilterSpec(trap={SYS_GETPPID: None}))
    up_r, up_w = os.pipe()          # child -> parent
    down_r, down_w = os.pipe()      # parent -> child
    pid = os.fork()
    if pid == 0:
        os.close(up_r)
        os.close(down_w)
        _probe_child(prog, up_w, down_r)
    os.close(up_w)
    os.close(down_r)
    out: dict[str, Check] = {}
    listener = pidfd = None
    try:
        raw = _read_within(up_r, 4, 5)
        if len(raw) != 4:
            raise OSError("the probe child could not install a seccomp listener")
        pidfd = seccomp.pidfd_open(pid)
        listener = seccomp.Listener(seccomp.pidfd_getfd(pidfd, struct.unpack("=i", raw)[0]))
        try:
            listener.set_flags(seccomp.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
            out["seccomp_sync_wake_up"] = Check("seccomp_sync_wake_up", True,
                                                "NOTIF_SET_FLAGS(SYNC_WAKE_UP) accepted")
        except KernelError as exc:
            out["seccomp_sync_wake_up"] = Check("seccomp_sync_wake_up", False,
                                                f"NOTIF_SET_FLAGS(SYNC_WAKE_UP): {exc}")
        os.write(down_w, b"g")
        if not listener.poll(5000):
            raise OSError("the probe child's trapped call never arrived")
        notif = listener.recv()
        with open(os.devnull, "rb") as null:
            try:
                listener.addfd(notif.id, null.fileno(), send=True)
                out["seccomp_addfd_send"] = Check("seccomp_addfd_send", True,
                                                  "NOTIF_ADDFD with FLAG_SEND answered a call")
                out["seccomp_addfd"] = Check("seccomp_addfd", True,
                                             "NOTIF_ADDFD installed an fd")
            except KernelError as exc:
                out["seccomp_addfd_send"] = Check("seccomp_addfd_send", False,
                                                  f"NOTIF_ADDFD with FLAG_SEND: {exc}")
                try:
                    listener.addfd(notif.id, null.fileno())
                    out["seccomp_addfd"] = Check("seccomp_addfd", True,
                                                 "NOTIF_ADDFD installed an fd")
                except KernelError as exc2:
                    out["seccomp_addfd"] = Check("seccomp_addfd", False,
                                                 f"NOTIF_ADDFD: {exc2}")
                listener.respond(notif.id, val=0)
        if len(_read_within(up_r, 8, 5)) != 8:
            raise OSError("the probe child's trapped call was not answered")
        return out
    finally:
        if listener is not None:
            listener.close()
        if pidfd is not None:
            os.close(pidfd)
        for fd in (up_r, down_w):
            os.close(fd)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        os.waitpid(pid, 0)


def seccomp_checks(release: str, simulated: bool) -> list[Check]:
    """The ioctl checks: probed, or by the kernel version when the probe
    cannot be made (said in each check's detail) or a kernel is played."""
    if not simulated:
        try:
            probed = listener_probe()
            return [probed[name] for name in KERNEL_FEATURES]
        except (SockgraftError, OSError) as exc:
            why = f"probe failed ({exc}), judged by version"
            return [Check(c.name, c.ok, f"{c.detail}; {why}") for c in kernel_checks(release)]
    return kernel_checks(release)


def _cgroup2() -> str:
    from ..kernel import bpf
    return f"mounted at {bpf.cgroup2_mount()}"


def _bpffs() -> str:
    if not os.path.ismount("/sys/fs/bpf"):
        raise OSError("/sys/fs/bpf is not mounted (the agent mounts it when it may)")
    return "mounted at /sys/fs/bpf"


def _load_programs(splice: str, fastpath: str = "off", attach_lo: bool = False) -> None:
    """Compile and verify the programs, never attached (attach_lo: the fast
    path's tcx links on the loopback of the namespace this runs in, then
    removed); nothing left behind."""
    from ..kernel import bpf
    name = f"doctor-{os.getpid()}"
    progs = bpf.Programs(name)
    try:
        progs.load(join=False, splice=splice, fastpath=fastpath)
        if attach_lo:
            progs.fast_attach(1)
            progs.fast_detach(1)
    finally:
        progs.close()
        bpf.remove(name)              # its pins and cgroup


def _bpf_programs() -> str:
    from ..kernel import bpf
    _load_programs("off")
    return f"{len(bpf.PROGRAMS)} programs compiled and accepted by the verifier"


def _bpf_splice() -> str:
    from ..kernel import bpf
    _load_programs("on")              # sockops + sk_msg, CO-RE against the kernel's BTF
    return f"{len(bpf.SPLICE_PROGRAMS)} splice programs (sockops, sk_msg) accepted"


def _bpf_fastpath() -> str:
    from ..kernel import bpf, netns
    ns = f"sg-doctor-{secrets.token_hex(3)}"
    netns.create(ns)
    try:
        netns.run_in(ns, _load_programs, "off", "on", True)
    finally:
        netns.delete(ns)
    return f"{len(bpf.FAST_PROGRAMS)} fast path programs accepted and attached (tcx)"


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
          ("bpf_splice", _bpf_splice), ("bpf_fastpath", _bpf_fastpath),
          ("tc_clsact", _tc_clsact), ("nftables", _nftables),
          ("oci_runtime", _oci_runtime))
QUICK = ("seccomp_user_notif", "pidfd_getfd", "cgroup2")     # the agent's start


def run(names: tuple[str, ...] | None = None, release: str | None = None) -> list[Check]:
    """The checks (all, or those named); release: the kernel's, `uname -r`
    (SOCKGRAFT_DOCTOR_KERNEL overrides it: how the tests play an old node)."""
    played = release or os.environ.get("SOCKGRAFT_DOCTOR_KERNEL")
    checks = seccomp_checks(played or platform.release(), simulated=bool(played))
    checks += [_check(n, p) for n, p in PROBES if names is None or n in names]
    return checks
