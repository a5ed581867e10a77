"""OCI runtime integration, pure parts: the seccomp-notify hand-off message a
runtime (runc >= 1.1, crun) sends to `listenerPath`, graft configuration
from container annotations, and the seccomp profile `sockgraft oci-profile`
writes (merged into a runtime's own profile).

The hand-off (runc libcontainer/specconv, OCI runtime-spec "container
process state"): one message on a unix stream socket, JSON plus the listener
fd by SCM_RIGHTS:

    {"ociVersion": "1.0.2", "fds": ["seccompFd"], "pid": 4242,
     "metadata": "<listenerMetadata>",
     "state": {"ociVersion": ..., "id": "web", "status": "creating", "pid": 4242,
               "bundle": "/path", "annotations": {...}}}

Annotations (all optional; values checked like the CLI's, bad ones rejected
with the annotation named):

    sockgraft/container  the graft store name (default: the state id)
    sockgraft/graft-at   syscall | socket
    sockgraft/endpoints  NAME=TYPE:ADDR:PORT|dynamic[,...]  or NAME=unix:PATH
    sockgraft/ingress    ADDR:PORT[-PORT]=EP[,...]
    sockgraft/egress     PREFIX/LEN[:PORT]=EP[,...]
    sockgraft/policy     RULE[;RULE...]   e.g. "deny tcp 10.0.0.0/8;allow any any"
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from typing import Any

from ..errors import ConfigError
from . import graftconfig as gc
from . import ioctl as mioctl
from .endpoint import make_endpoint, parse_egress, parse_ingress
from .policy import parse_policy_rule

MAX_HANDOFF = 1 << 20            # a runtime's state JSON is a few KiB
ANNOTATION_PREFIX = "sockgraft/"
ANNOTATIONS = ("container", "graft-at", "endpoints", "ingress", "egress", "policy")
METADATA_PREFIX = "sockgraft:v1"
SOURCE = "OCI hand-off"


@dataclass(frozen=True)
class Handoff:
    container_id: str
    pid: int
    bundle: str
    annotations: dict[str, str] = field(default_factory=dict)
    metadata: str = ""
    fd_index: int = 0

    @property
    def graft_at(self) -> str:
        """What the profile traps, as `oci-profile` wrote into listenerMetadata."""
        for part in self.metadata.split(";"):
            k, _, v = part.partition("=")
            if k.strip() == "graft_at" and v.strip() in gc.GRAFT_AT:
                return v.strip()
        return "syscall"


def message_complete(data: bytes) -> bool:
    """Has the runtime's whole message arrived? It is one JSON object sent
    with its fds in one sendmsg; runc before 1.4 keeps the connection open
    after it (`runc run` in the foreground), so the end of the message, not
    of the stream, is where the agent stops reading."""
    text = bytes(data).strip()
    if not text.endswith(b"}"):
        return False
    try:
        json.loads(text)
    except (ValueError, UnicodeDecodeError):
        return False
    return True


def parse_handoff(data: bytes, nfds: int) -> Handoff:
    """The runtime's message and the number of fds that came with it."""
    if len(data) > MAX_HANDOFF:
        raise ConfigError(f"message of {len(data)} bytes; at most {MAX_HANDOFF}", source=SOURCE)
    try:
        msg = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not JSON: {exc}", source=SOURCE) from None
    if not isinstance(msg, dict):
        raise ConfigError("not a JSON object", source=SOURCE)
    fds = msg.get("fds")
    if not isinstance(fds, list) or not all(isinstance(f, str) for f in fds):
        raise ConfigError("'fds' must be a list of names", source=SOURCE, field="fds",
                          value=fds)
    if "seccompFd" not in fds:
        raise ConfigError("'fds' names no seccompFd", source=SOURCE, field="fds", value=fds)
    if len(fds) != nfds:
        raise ConfigError(f"'fds' names {len(fds)} fd(s) but {nfds} arrived", source=SOURCE,
                          field="fds", value=fds)
    state = msg.get("state")
    if not isinstance(state, dict):
        raise ConfigError("'state' missing or not an object", source=SOURCE, field="state")
    pid = msg.get("pid", state.get("pid"))
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        raise ConfigError(f"pid {pid!r} invalid", source=SOURCE, field="pid", value=pid)
    cid = state.get("id")
    if not isinstance(cid, str) or not cid or len(cid) > 1024:
        raise ConfigError(f"state.id {cid!r} invalid", source=SOURCE, field="state.id",
                          value=cid)
    ann = state.get("annotations") or {}
    if not isinstance(ann, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                            for k, v in ann.items()):
        raise ConfigError("state.annotations must map strings to strings", source=SOURCE,
                          field="state.annotations")
    meta = msg.get("metadata", "")
    bundle = state.get("bundle", "")
    return Handoff(cid, pid, bundle if isinstance(bundle, str) else "", dict(ann),
                   meta if isinstance(meta, str) else "", fds.index("seccompFd"))


# Where CRI runtimes name the pod sandbox of an application container: the
# CNI plugin ran (and registered the name) for the sandbox's id, not for the
# application container's. Each runtime sets its own key itself (after the
# pod's own annotations: a pod cannot override it) - but not the other
# runtime's: CRI-O copies a pod's annotations into its containers' specs, so
# under CRI-O a pod can write containerd's key (and under containerd, with
# pod annotations passed through, CRI-O's).
SANDBOX_ID_ANNOTATIONS = ("io.kubernetes.cri.sandbox-id", "io.kubernetes.cri-o.SandboxID")


def sandbox_conflict(h: Handoff) -> str:
    """Why the runtimes' sandbox keys are not followed ('' if they agree):
    both present and different - one of them is the pod's own."""
    vals = [h.annotations.get(k) for k in SANDBOX_ID_ANNOTATIONS]
    if all(vals) and vals[0] != vals[1]:
        return (f"annotations {SANDBOX_ID_ANNOTATIONS[0]}={vals[0]!r} and "
                f"{SANDBOX_ID_ANNOTATIONS[1]}={vals[1]!r} disagree: one is the pod's own "
                f"(a runtime writes only its key); neither is followed")
    return ""


def sandbox_id(h: Handoff) -> str | None:
    """The pod sandbox id the runtime wrote into a container's annotations
    (None: a sandbox names itself, there is none, or the two runtimes' keys
    disagree - sandbox_conflict says why: whichever was read first, a pod
    could otherwise name a victim's sandbox and take its network's name,
    configuration and grants)."""
    if sandbox_conflict(h):
        return None
    v = next((h.annotations[k] for k in SANDBOX_ID_ANNOTATIONS if h.annotations.get(k)), None)
    return v if v and v != h.container_id else None


def container_name(h: Handoff, cni_name: str | None = None, *, trusted: bool = True) -> str:
    """The store name: the name the CNI plugin registered (for this
    container's id or its pod sandbox's), else - only from annotations the
    agent trusts - the sockgraft/container annotation, else the runtime's
    container id. An annotation naming another container does not count
    (name_refused says so): whoever sets a pod's annotations would otherwise
    pick its identity - another container's stored configuration and mark
    (its grants, its private loopback, its reuseport groups)."""
    asked = h.annotations.get(ANNOTATION_PREFIX + "container") if trusted else None
    name = cni_name or asked or h.container_id
    gc.check_config(name, {}, (), (), gc.Policy(), source=f"{SOURCE} {h.container_id}")
    return name


def name_refused(h: Handoff, name: str) -> str:
    """Why the sockgraft/container annotation was not followed ('' if it
    was, or there is none); name: the one container_name chose."""
    asked = h.annotations.get(ANNOTATION_PREFIX + "container")
    if asked is not None and asked != name:
        return (f"annotation {ANNOTATION_PREFIX}container={asked!r} ignored: the container "
                f"is {name!r} (its network's registration, or the runtime's id where "
                f"annotations are not trusted: a container does not choose its identity)")
    return ""


def _split(value: str, sep: str = ",") -> list[str]:
    return [p.strip() for p in value.split(sep) if p.strip()]


CONFIG_ANNOTATIONS = ("endpoints", "ingress", "egress", "policy", "graft-at")


def config_from_annotations(container: str, ann: dict[str, str], *,
                            trusted: bool = True) -> gc.GraftConfig | None:
    """The graft config the annotations describe, or None if they name none.
    ConfigError names the annotation and the bad value. trusted=False (the
    agent's --annotations ignore: whoever sets them is not the operator, e.g.
    a Kubernetes tenant): a config in annotations is refused (an endpoint
    there takes any host address and port, an egress rule any destination)."""
    ours = {k[len(ANNOTATION_PREFIX):]: v for k, v in ann.items()
            if k.startswith(ANNOTATION_PREFIX)}
    for k in ours:
        if k not in ANNOTATIONS:
            raise ConfigError(f"unknown annotation {ANNOTATION_PREFIX}{k}; accepted: "
                              + ", ".join(ANNOTATION_PREFIX + a for a in ANNOTATIONS),
                              source=SOURCE, field=ANNOTATION_PREFIX + k)
    named = [k for k in CONFIG_ANNOTATIONS if k in ours]
    if not named:
        return None
    if not trusted:
        raise ConfigError(f"annotations {', '.join(ANNOTATION_PREFIX + k for k in named)} "
                          f"ignored: this agent takes no configuration from annotations "
                          f"(--annotations ignore); configure {container!r} with "
                          f"'sockgraft config load' or the CNI network's graft object",
                          source=SOURCE, field=ANNOTATION_PREFIX + named[0])
    src = f"annotations of {container}"
    cfg = gc.GraftConfig(container)
    for item in _split(ours.get("endpoints", "")):
        name, eq, spec = item.partition("=")
        fld = f"{ANNOTATION_PREFIX}endpoints"
        parts = spec.split(":")
        if not eq or not name:
            raise ConfigError(f"endpoint {item!r}: expected NAME=TYPE:ADDR:PORT",
                              source=src, field=fld, value=item)
        if parts[0] == "unix":
            ep = make_endpoint(name.strip(), "unix", path=spec[5:], source=src, prefix=fld)
        elif parts[0] in ("ipv4", "ipv6") and len(parts) >= 3:
            addr, port = ":".join(parts[1:-1]).strip("[]"), parts[-1]
            port_v: Any = port if port == "dynamic" else _int(port, item, src, fld)
            ep = make_endpoint(name.strip(), parts[0], addr=addr, port=port_v, source=src,
                               prefix=fld)
        else:
            raise ConfigError(f"endpoint {item!r}: expected NAME=ipv4|ipv6:ADDR:PORT|dynamic "
                              f"or NAME=unix:PATH", source=src, field=fld, value=item)
        cfg = gc.with_endpoint(cfg, ep)
    for item in _split(ours.get("ingress", "")):
        cfg = gc.with_rule(cfg, parse_ingress(item, source=src,
                                              field=f"{ANNOTATION_PREFIX}ingress"))
    for item in _split(ours.get("egress", "")):
        cfg = gc.with_rule(cfg, parse_egress(item, source=src,
                                             field=f"{ANNOTATION_PREFIX}egress"))
    for item in _split(ours.get("policy", ""), ";"):
        cfg = gc.with_policy_rule(cfg, parse_policy_rule(item, source=src,
                                                         field=f"{ANNOTATION_PREFIX}policy"))
    if "graft-at" in ours:
        cfg = gc.with_graft_at(cfg, ours["graft-at"].strip())
    return cfg


def _int(text: str, item: str, src: str, fld: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"endpoint {item!r}: port {text!r} is not a number or 'dynamic'",
                          source=src, field=fld, value=text) from None


# --- the seccomp profile ------------------------------------------------------------

IO_URING = ("io_uring_setup", "io_uring_enter", "io_uring_register")
EPOLL = ("epoll_create", "epoll_create1")
# what a merge may have trapped (a previous merge's traps are taken out first)
TRAPPABLE = ("bind", "listen", "connect", "socket", "ioctl") + EPOLL
ALLOWING = ("SCMP_ACT_ALLOW", "SCMP_ACT_LOG")
# the compat ABIs of 64-bit machines: the kernel never runs the cgroup
# setsockopt program for their setsockopt (do_sock_setsockopt: `if
# (!compat)`), so a grafted socket set an option from one of them past its
# guard (SO_BINDTODEVICE, IP_TRANSPARENT, multicast joins...); a merged
# profile lists the native ABIs only (what else calls gets the runtime's
# answer to an architecture the filter does not know - runc: the thread is
# killed), as `sockgraft run`'s own filter answers them ENOSYS
COMPAT_ARCHES = ("SCMP_ARCH_X86", "SCMP_ARCH_X32", "SCMP_ARCH_ARM", "SCMP_ARCH_MIPS",
                 "SCMP_ARCH_MIPSEL", "SCMP_ARCH_MIPS64N32", "SCMP_ARCH_MIPSEL64N32",
                 "SCMP_ARCH_PPC", "SCMP_ARCH_S390", "SCMP_ARCH_PARISC")
INET_ADDRLEN = (16, 28, 128)
ENOSYS = 38


LOW_WORD = 0xFFFFFFFF


def _notify(name: str, index: int | None, values: tuple[int, ...]) -> list[dict]:
    """Trap `name` (when args[index] is one of values). The comparison is
    masked to the low 32 bits: the arguments tested are ints, which the
    kernel reads from the low word of the register, while SCMP_CMP_EQ would
    compare all 64 bits and miss `bind(fd, addr, 0x1_0000_0010)` or
    `socket(AF_INET | 1 << 32, ...)` (libseccomp: (arg & value) == valueTwo)."""
    if index is None:
        return [{"names": [name], "action": "SCMP_ACT_NOTIFY"}]
    return [{"names": [name], "action": "SCMP_ACT_NOTIFY",
             "args": [{"index": index, "value": LOW_WORD, "valueTwo": v,
                       "op": "SCMP_CMP_MASKED_EQ"}]} for v in values]


def _notify_types(name: str, index: int, mask: int, values: tuple[int, ...]) -> list[dict]:
    """Trap `name` when (args[index] & mask) is one of values (the mask
    clears the high word: the argument is an unsigned int)."""
    return [{"names": [name], "action": "SCMP_ACT_NOTIFY",
             "args": [{"index": index, "value": mask, "valueTwo": v,
                       "op": "SCMP_CMP_MASKED_EQ"}]} for v in values]


def complement_masks(mask: int, values: tuple[int, ...]) -> list[tuple[int, int]]:
    """(mask, value) pairs whose MASKED_EQ conditions together match exactly
    the arguments whose `arg & mask` is none of values (a walk down the
    mask's bits, highest first: each branch no value shares ends in a pair)."""
    bits = [1 << b for b in range(31, -1, -1) if mask >> b & 1]
    out: list[tuple[int, int]] = []

    def walk(i: int, pmask: int, pval: int, left: list[int]) -> None:
        if not left:
            out.append((pmask, pval))
        elif i < len(bits):
            for bit in (0, bits[i]):
                walk(i + 1, pmask | bits[i], pval | bit, [v for v in left if v & bits[i] == bit])

    walk(0, 0, 0, list(values))
    return out


# libseccomp lets an unconditional rule of a syscall win over its
# conditional ones (measured with runc: a base's plain "ioctl allowed" kept
# the trap from ever firing); a base that allows ioctl with a plain rule gets
# these instead: every other command allowed, by its action
IOCTL_OTHERS = [{"index": 1, "value": m, "valueTwo": v, "op": "SCMP_CMP_MASKED_EQ"}
                for m, v in complement_masks(mioctl.IOC_TYPE_MASK, mioctl.SOCK_IOC_TYPES)]


def _is_ioctl_others(r: dict) -> bool:
    """One of the rules a previous merge put in for a plain "ioctl allowed"."""
    return (r.get("names") == ["ioctl"] and r.get("action") in ALLOWING
            and len(r.get("args") or []) == 1 and r["args"][0] in IOCTL_OTHERS)


def _allows_unconditionally(rules: list, name: str, allowing: bool) -> bool:
    """Does the base let calls of `name` through whatever their arguments,
    apart from rules that refuse some of them (which keep precedence over a
    trap: libseccomp orders ERRNO/KILL before NOTIFY)?"""
    base = [r for r in rules if name in r["names"] and r.get("action") != "SCMP_ACT_NOTIFY"]
    if any(not r.get("args") and r.get("action") not in ALLOWING for r in base):
        return False
    return allowing or any(not r.get("args") and r.get("action") in ALLOWING for r in base)


def _allows_socket_ioctls_only_some(rules: list) -> list[int]:
    """Indexes of ioctl rules that allow (on conditions) or trace calls which
    may be socket ioctl commands (not pinned by args[1] to a command of
    another type): a base that lets ioctl through only so is refused -
    trapped, its refusals would be lost; untrapped, those commands would be
    answered from a grafted socket's namespace, the host's."""
    def pinned_elsewhere(a: dict) -> bool:
        """args[1] held to commands of another type: equal to one, or masked
        over the whole type byte to one"""
        value, two = a.get("value"), a.get("valueTwo", 0)
        if a.get("index") != 1 or not isinstance(value, int) or not isinstance(two, int):
            return False
        if a.get("op") == "SCMP_CMP_EQ":
            return (value & mioctl.IOC_TYPE_MASK) not in mioctl.SOCK_IOC_TYPES
        return (a.get("op") == "SCMP_CMP_MASKED_EQ"
                and value & mioctl.IOC_TYPE_MASK == mioctl.IOC_TYPE_MASK
                and (two & mioctl.IOC_TYPE_MASK) not in mioctl.SOCK_IOC_TYPES)

    # TRACE too: a tracer the container runs itself (PTRACE_O_TRACESECCOMP
    # on its own child) would let the call through untrapped
    return [i for i, r in enumerate(rules) if "ioctl" in r["names"]
            and r.get("action") in ALLOWING + ("SCMP_ACT_TRACE",)
            and (r.get("args") or r.get("action") == "SCMP_ACT_TRACE")
            and not _is_ioctl_others(r)
            and not any(pinned_elsewhere(a) for a in r.get("args") or [])]


def _lets_through(rules: list, name: str, allowing: bool) -> bool:
    """Does the base profile let every call of `name` through, so that
    trapping it (the agent continues it) widens nothing? A previous merge's
    trap says it did (merges trap nothing else of the base's)."""
    mine = [r for r in rules if name in r["names"]]
    base = [r for r in mine if r.get("action") != "SCMP_ACT_NOTIFY"]   # not a trap of ours
    if not all(r.get("action") in ALLOWING for r in base):
        return False        # something refuses some of its calls
    return allowing or len(base) < len(mine) or any(not r.get("args") for r in base)


def build_profile(base: dict | None, listener: str, graft_at: str = "syscall",
                  source: str = "base profile", trap_epoll: bool = True) -> dict:
    """The runtime profile with sockgraft's rules: trap what the engine needs
    (every bind and listen, connect with an inet-sized address; with
    graft_at=socket socket(AF_INET/AF_INET6) instead of connect), deny
    io_uring (ENOSYS), name the agent's OCI socket as listener. In syscall
    mode epoll_create and epoll_create1 are trapped as well (trap_epoll): the
    agent notes that the container made an epoll instance and continues the
    call, so a socket given to a new instance before connect() keeps its
    registration through the graft (an agent older than this answers them
    ENOSYS: trap_epoll=False for one) - only where the base lets every such
    call through (a base that refuses them, or allows some arguments only,
    keeps its rule: continuing them would widen it). Merged into `base`: the
    syscalls trapped (and io_uring) are taken out of its rules first, with a
    previous merge's traps, so merging twice gives the same profile; the
    base's rules for everything else (socket() in syscall mode, connect() in
    socket mode, sendto()) stay as they are.
    A base whose default action refuses syscalls cannot express "everything
    else allowed" for our syscalls with one argument test, so there they are
    trapped unconditionally (the agent lets the rest through). A base that
    refuses some calls of a syscall the mode traps (bind, listen, connect or
    socket) is refused with ConfigError: the agent would let them through."""
    if graft_at not in gc.GRAFT_AT:
        raise ConfigError(f"graft_at {graft_at!r} unknown; accepted: {', '.join(gc.GRAFT_AT)}",
                          field="graft_at", value=graft_at)
    prof = copy.deepcopy(base) if base is not None else {
        "defaultAction": "SCMP_ACT_ALLOW", "architectures": ["SCMP_ARCH_X86_64"],
        "syscalls": []}
    if not isinstance(prof, dict):
        raise ConfigError("the profile is not a JSON object", source=source)
    if "defaultAction" not in prof:
        raise ConfigError("the profile has no defaultAction", source=source,
                          field="defaultAction")
    other = prof.get("listenerPath")
    if other and other != listener:
        raise ConfigError(f"the profile already sends its notifications to {other!r}; "
                          f"a filter has one listener, so sockgraft cannot add {listener!r} "
                          f"(merge the other tool's rules into one agent, or drop its "
                          f"listenerPath)", source=source, field="listenerPath", value=other)
    rules = prof.get("syscalls") or []
    if not isinstance(rules, list):
        raise ConfigError("'syscalls' must be a list", source=source, field="syscalls")
    for i, r in enumerate(rules):
        if not isinstance(r, dict) or not isinstance(r.get("names"), list):
            raise ConfigError(f"syscalls[{i}] has no list of names", source=source,
                              field=f"syscalls[{i}]")
    allowing = prof["defaultAction"] in ALLOWING
    epoll = [n for n in EPOLL if _lets_through(rules, n, allowing)] \
        if trap_epoll and graft_at != "socket" else []
    must = ("bind", "listen", "socket" if graft_at == "socket" else "connect")
    for name in must:
        if not _lets_through(rules, name, allowing):
            # trapped, every call the agent does not graft is let through:
            # the base's refusal would be lost (and kept beside the trap, a
            # rule libseccomp may order first would disable the trap)
            which = [i for i, r in enumerate(rules) if name in r["names"]]
            raise ConfigError(
                f"the profile refuses some or all {name}() calls "
                f"({', '.join(f'syscalls[{i}]' for i in which) or 'its defaultAction'}); "
                f"sockgraft traps every {name}() in {graft_at} mode and lets through what "
                f"it does not graft, which would undo that refusal"
                + (" (--graft-at syscall traps connect() instead of socket())"
                   if name == "socket" else "")
                + f": allow {name} unconditionally in the base, or merge into another",
                source=source, field="syscalls", value=name)
    # the socket ioctls (model/ioctl.py) next to the base's own ioctl rules,
    # where the base lets ioctl through: it may refuse some commands itself
    # (TIOCSTI...), which stays so; a base that lists the commands it allows
    # keeps answering them from the socket's namespace (not trapped)
    others_before = [r for r in rules if _is_ioctl_others(r)]
    rules = [r for r in rules if not _is_ioctl_others(r)]
    trap_ioctl = bool(others_before) or _allows_unconditionally(rules, "ioctl", allowing)
    # the action of the base's plain "ioctl allowed" rule (given to IOCTL_OTHERS)
    ioctl_allow = others_before[0]["action"] if others_before else None
    some = [] if trap_ioctl else _allows_socket_ioctls_only_some(rules)
    if some:
        raise ConfigError(
            f"the profile allows some ioctl() commands only "
            f"({', '.join(f'syscalls[{i}]' for i in some)}), and they may include socket "
            f"ioctls (type 0x89/0x8B), which the kernel answers from a grafted socket's "
            f"namespace - the host's; sockgraft traps those and answers them from the "
            f"container's, which would undo the base's refusal of the others: allow ioctl "
            f"unconditionally (refusing chosen commands is fine), or allow only commands of "
            f"other types (SCMP_CMP_EQ on args[1], or SCMP_CMP_MASKED_EQ over 0xff00)",
            source=source, field="syscalls",
            value="ioctl")
    trap = must + tuple(epoll)
    taken = trap + IO_URING      # the base's rules for these give way to ours
    kept: list[dict] = []
    untrapped: list[str] = []
    for r in rules:
        # a previous merge's traps go, also of what is not trapped now (which
        # then stays allowed: that merge took it out of the base's rules)
        ours_before = [n for n in r["names"] if n in TRAPPABLE] \
            if r.get("action") == "SCMP_ACT_NOTIFY" else []
        untrapped += [n for n in ours_before if n not in trap and n != "ioctl"]
        names = [n for n in r["names"] if n not in taken and n not in ours_before]
        if trap_ioctl and "ioctl" in names and not r.get("args") and r.get("action") in ALLOWING:
            names.remove("ioctl")
            ioctl_allow = r["action"]
        if names:
            kept.append({**r, "names": names})
    if untrapped and not allowing:
        kept.append({"names": untrapped, "action": "SCMP_ACT_ALLOW"})
    ours: list[dict] = []
    ours += _notify("bind", None, ())
    ours += _notify("listen", None, ())
    if graft_at == "socket":
        ours += _notify("socket", 0 if allowing else None, (2, 10))
    else:
        ours += _notify("connect", 2 if allowing else None, INET_ADDRLEN)
    for name in epoll:
        ours += _notify(name, None, ())
    if trap_ioctl:
        if ioctl_allow is not None:
            ours += [{"names": ["ioctl"], "action": ioctl_allow, "args": [a]}
                     for a in IOCTL_OTHERS]
        ours += _notify_types("ioctl", 1, mioctl.IOC_TYPE_MASK, mioctl.SOCK_IOC_TYPES)
    ours.append({"names": list(IO_URING), "action": "SCMP_ACT_ERRNO", "errnoRet": ENOSYS})
    prof["syscalls"] = kept + ours
    prof["architectures"] = [a for a in prof.get("architectures") or ["SCMP_ARCH_X86_64"]
                             if a not in COMPAT_ARCHES]
    if not prof["architectures"]:
        raise ConfigError("the profile names no 64-bit architecture (sockgraft profiles "
                          "leave out the compat ABIs: the kernel never runs the socket "
                          "option guard for their calls)", source=source,
                          field="architectures")
    prof.pop("archMap", None)       # (Docker's own format: the runtime reads the list)
    prof["listenerPath"] = listener
    prof["listenerMetadata"] = f"{METADATA_PREFIX};graft_at={graft_at}"
    return prof


def check_profile(prof: dict) -> list[str]:
    """What a runtime needs of a profile that hands its listener to sockgraft;
    returns the problems (empty: fine). Used by tests on deploy/ files."""
    problems = []
    if not isinstance(prof, dict):
        return ["not an object"]
    if not isinstance(prof.get("defaultAction"), str):
        problems.append("defaultAction missing")
    if not isinstance(prof.get("listenerPath"), str) or not prof["listenerPath"].startswith("/"):
        problems.append("listenerPath must be an absolute path")
    names = {n: r for r in prof.get("syscalls", []) for n in r.get("names", [])}
    for n in ("bind", "listen"):
        rule = names.get(n, {})
        if rule.get("action") != "SCMP_ACT_NOTIFY":
            problems.append(f"{n} is not trapped (SCMP_ACT_NOTIFY)")
        elif rule.get("args"):
            problems.append(f"{n} is trapped only for some arguments (trap every call)")
    for r in prof.get("syscalls", []):
        for a in r.get("args") or []:
            if r.get("action") == "SCMP_ACT_NOTIFY" and a.get("op") != "SCMP_CMP_MASKED_EQ":
                problems.append(f"{r.get('names')} compares args[{a.get('index')}] with "
                                f"{a.get('op')} over 64 bits; use SCMP_CMP_MASKED_EQ with "
                                f"value {LOW_WORD:#x}")
    if names.get("io_uring_setup", {}).get("action") != "SCMP_ACT_ERRNO":
        problems.append("io_uring is not denied")
    for r in prof.get("syscalls", []):
        if r.get("action") not in ("SCMP_ACT_ALLOW", "SCMP_ACT_NOTIFY", "SCMP_ACT_ERRNO",
                                   "SCMP_ACT_LOG", "SCMP_ACT_KILL", "SCMP_ACT_KILL_PROCESS",
                                   "SCMP_ACT_KILL_THREAD", "SCMP_ACT_TRAP", "SCMP_ACT_TRACE"):
            problems.append(f"unknown action {r.get('action')!r}")
    return problems


__all__ = ["Handoff", "parse_handoff", "container_name", "config_from_annotations",
           "build_profile", "check_profile", "MAX_HANDOFF"]
