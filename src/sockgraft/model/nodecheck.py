"""What each graft mode needs of a node, and what to do about what is missing
(`sockgraft doctor`, and the agent's own start-up check). Pure: the checks'
results in (agent/doctor.py gathers them), verdicts and words out."""

from __future__ import annotations

import re
from dataclasses import dataclass

# feature -> the kernel that has it: the verdict when agent/doctor.listener_probe
# cannot run, or when a test plays another kernel
KERNEL_FEATURES = {
    "seccomp_addfd": ((5, 9), "SECCOMP_IOCTL_NOTIF_ADDFD"),
    "seccomp_addfd_send": ((5, 14), "SECCOMP_ADDFD_FLAG_SEND"),
    "seccomp_sync_wake_up": ((6, 6), "SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP"),
}

# mode -> the checks it cannot work without
MODES = {
    "syscall": ("seccomp_user_notif", "seccomp_addfd", "pidfd_getfd"),
    "socket": ("seccomp_user_notif", "seccomp_addfd", "seccomp_addfd_send", "pidfd_getfd",
               "cgroup2", "bpf_programs"),
    "oci": ("seccomp_user_notif", "seccomp_addfd", "pidfd_getfd", "oci_runtime"),
    "enforcement": ("nftables",),
    "splice": ("bpf_programs", "bpf_splice"),       # agent --sockmap
    "fastpath": ("bpf_programs", "bpf_fastpath"),   # agent --fastpath
}

FIX = {
    "seccomp_user_notif": "a kernel >= 5.0 with CONFIG_SECCOMP_FILTER",
    "seccomp_addfd": "a kernel >= 5.9",
    "seccomp_addfd_send": "a kernel >= 5.14",
    "seccomp_sync_wake_up": "a kernel >= 6.6 (optional: socket() answers are slower without)",
    "pidfd_getfd": "a kernel >= 5.6, and run the agent as root (CAP_SYS_PTRACE)",
    "cgroup2": "mount the unified cgroup hierarchy (cgroup2)",
    "bpffs": "mount -t bpf bpf /sys/fs/bpf (the agent mounts it when it may)",
    "bpf_programs": "install clang and libbpf1 (./run does), a kernel with cgroup sock_addr, "
                    "sk_storage and cgroup_skb programs",
    "bpf_splice": "a kernel with BTF (CONFIG_DEBUG_INFO_BTF) and sockmap "
                  "(CONFIG_BPF_STREAM_PARSER); only for agent --sockmap",
    "bpf_fastpath": "a kernel >= 6.6 (tcx links, bpf_redirect_peer); only for agent "
                    "--fastpath",
    "tc_clsact": "a kernel with the clsact qdisc (CONFIG_NET_SCH_INGRESS)",
    "nftables": "install nftables (the per-packet policy of grafted sockets)",
    "oci_runtime": "install runc >= 1.1 or crun >= 0.19 (seccomp listenerPath)",
}


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str = ""

    @property
    def fix(self) -> str:
        return "" if self.ok else FIX.get(self.name, "")


def kernel_version(release: str) -> tuple[int, int]:
    """(major, minor) of a `uname -r` string; (0, 0) if unreadable."""
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def kernel_checks(release: str) -> list[Check]:
    have = kernel_version(release)
    return [Check(name, have >= need, f"{what}: kernel {release} (needs {need[0]}.{need[1]})")
            for name, (need, what) in KERNEL_FEATURES.items()]


def runtime_ok(name: str, version: str) -> bool:
    """Does this OCI runtime pass a seccomp listener (listenerPath)?"""
    v = tuple(int(x) for x in re.findall(r"\d+", version)[:2]) or (0,)
    return (name == "runc" and v >= (1, 1)) or (name == "crun" and v >= (0, 19))


def modes(checks: list[Check]) -> dict[str, dict]:
    """Per mode: works or not, the checks that failed with what to do, and
    the ones that were not run (a quick check leaves the slow probes out:
    not a failure, not a proof either)."""
    by = {c.name: c for c in checks}
    out = {}
    for mode, needs in MODES.items():
        missing = [n for n in needs if n in by and not by[n].ok]
        out[mode] = {"ok": not missing,
                     "missing": [{"check": n, "fix": FIX.get(n, "")} for n in missing],
                     "unchecked": [n for n in needs if n not in by]}
    return out


def refusal(mode: str, verdicts: dict[str, dict]) -> str | None:
    """The doctor's words for a mode the node cannot do, or None."""
    v = verdicts.get(mode)
    if v is None or v["ok"]:
        return None
    return (f"this node cannot run graft mode {mode!r}: " +
            "; ".join(f"{m['check']} missing ({m['fix']})" for m in v["missing"]) +
            " - see `sockgraft doctor`")
