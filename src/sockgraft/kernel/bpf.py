"""The cgroup programs of bpf/sockgraft.bpf.c, through the system libbpf
(libbpf.so.1) with ctypes.

Owns: compiling the object (clang -target bpf, cached by source hash),
loading it, the agent's cgroup (the agent joins it, so the host sockets it
creates carry it and the programs see them), attaching the programs with
pinned bpf_links (they stay attached across agent restarts; a new agent
swaps its programs in with BPF_LINK_UPDATE; sg_born_sock alone is held by
the agent process, not pinned: it is of no use without it), the pinned socket tag map
(sg_sock, reused by a restarted agent: the tags of sockets grafted before
stay valid), tagging sockets, map updates, and the events ring buffer.

Must not: decide what goes into the maps (model/bpfmaps.py encodes, the
agent chooses). Errors are translated into the sockgraft.errors tree.

Names (deterministic, one set per agent name):
  cgroup  <cgroup2 mount>/sockgraft/<agent>       the agent process lives here
  pins    /sys/fs/bpf/sockgraft/<agent>/link_<program>, .../map_sg_sock
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import hashlib
import logging
import os
import shutil
import struct
import subprocess
import time
from importlib import resources

from ..errors import BpfUnavailable, KernelError
from . import sockets as ksock

log = logging.getLogger("sockgraft.bpf")

BPFFS = "/sys/fs/bpf"
PROGRAMS = ("sg_connect4", "sg_connect6", "sg_sendmsg4", "sg_sendmsg6",
            "sg_getpeername4", "sg_getpeername6", "sg_recvmsg4", "sg_recvmsg6",
            "sg_getsockname4", "sg_getsockname6",
            "sg_bind4", "sg_bind6", "sg_setsockopt", "sg_egress", "sg_ingress", "sg_born_sock")
BORN_PROGRAM = "sg_born_sock"   # attached while the agent runs, not pinned
SPLICE_PROGRAMS = ("sg_sockops", "sg_msg")   # sockmap splicing of grafted local pairs
FAST_PROGRAMS = ("sg_fast_in", "sg_fast_out", "sg_fast_decap")  # tc: the packet fast path
BPF_TCX_INGRESS, BPF_TCX_EGRESS = 46, 47
PORT_PROGRAMS = (("sg_fast_in", BPF_TCX_INGRESS),          # a container's veth
                 ("sg_fast_out", BPF_TCX_EGRESS))
UNDERLAY_PROGRAMS = (("sg_fast_decap", BPF_TCX_INGRESS),)  # an underlay device
MAPS = ("sg_policy", "sg_egress4", "sg_egress6", "sg_services", "sg_services_rev",
        "sg_events", "sg_counters", "sg_sock", "sg_config", "sg_sources", "sg_gen",
        "sg_splice", "sg_splice_st", "sg_splice_stats", "sg_local", "sg_splice_leave",
        "sg_splice_norx",
        "sg_fast_ports", "sg_fast_addrs", "sg_fast_flows", "sg_fast_stats",
        "sg_fast_remote", "sg_fast_tunnels", "sg_fast_peers", "sg_fast_redirects",
        "sg_fast_ll", "sg_born")
# outlive the agent: the identity of grafted sockets, and the spliced
# connections with their state (freeing sg_splice would drop the bytes queued
# in its sockets' psock queues) - and every other map the sk_msg program
# reads or writes: a socket keeps the sk_msg program it entered the map with,
# so after a restart the old program must see the new agent's generations and
# configuration, and its leave requests, events and counters must reach the
# new agent
PINNED_MAPS = ("sg_sock", "sg_splice", "sg_splice_st", "sg_gen", "sg_config", "sg_events",
               "sg_splice_leave", "sg_splice_stats", "sg_splice_peer", "sg_splice_norx")
BPF_SK_MSG_VERDICT = 7
CFG_SPLICE = 1                 # sg_config[1]: grafted local pairs are spliced
CFG_RMEM_MAX = 2               # sg_config[2]: a spliced receiver's queue bound
CFG_FAST = 3                   # sg_config[3]: the fast path forwards local pairs
# struct fast_stats, per container port (ifindex): its counters, then
# FAST_STATS_WORDS - len(FAST_STATS) words of the program's own (the audit window)
FAST_STATS = ("fast_pkts", "fast_bytes", "slow_pkts", "drops", "hits", "misses",
              "encap_pkts", "encap_bytes", "decap_pkts", "decap_bytes", "spoofed",
              "unreported")
FAST_STATS_WORDS = len(FAST_STATS) + 2
FAST_SLOTS = 4096              # sg_fast_ports / sg_fast_stats entries
FLOW_KEY_SIZE = 28             # struct flow_key
FLOW_VAL_SIZE = 8              # struct flow_val
FLOWS_PER_CONTAINER = 8192     # default size of a policed port's flow cache (~0.85 MB)
BPF_MAP_TYPE_LRU_HASH = 9
ENOTSUPP = 524                 # the kernel's own "not supported" (no Python name)
SPLICE_KEY_SIZE = 44           # struct splice_key
# struct splice_stats, per container mark: sockets that entered the map,
# switches of a direction to the spliced path, bytes spliced, sends to a known
# peer that took TCP, sockets that left the map (their file became blocking)
SPLICE_STATS = ("sockets", "streams", "bytes", "fallback", "left")
BPF_ANY = 0
TAG = struct.Struct("=IHH")    # struct sock_tag {mark, flags, gen}
_FD = struct.Struct("=i")      # an SK_STORAGE map's key: the socket's fd
T_INGRESS = 1                  # bound by the agent through an ingress rule
# made under the container's socket uid (kernel/sockets.fsuid_for: the mark;
# only a root agent switches): the guards drop the packets of such a socket
# whose owner changed (fchown on its fd rewrites sk_uid)
T_OWNED = 2
T_STALE = 1 << 16              # (tag_of only) tagged for an earlier holder of its mark


def _cache_dir() -> str:
    """Where compiled objects are cached (by source hash)."""
    return os.path.join(os.environ.get("SOCKGRAFT_CACHE_DIR", "/var/cache/sockgraft"), "bpf")


def _lib() -> ctypes.CDLL:
    name = ctypes.util.find_library("bpf") or "libbpf.so.1"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise BpfUnavailable(f"libbpf not found ({exc}); install libbpf1") from None
    vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    for fn, res, args in (
        ("bpf_object__open_file", vp, [cp, vp]),
        ("bpf_object__load", i, [vp]),
        ("bpf_object__close", None, [vp]),
        ("bpf_object__find_program_by_name", vp, [vp, cp]),
        ("bpf_object__find_map_by_name", vp, [vp, cp]),
        ("bpf_program__fd", i, [vp]),
        ("bpf_map__fd", i, [vp]),
        ("bpf_map__reuse_fd", i, [vp, i]),
        ("bpf_map__pin", i, [vp, cp]),
        ("bpf_program__attach_cgroup", vp, [vp, i]),
        ("bpf_link__pin", i, [vp, cp]),
        ("bpf_link__fd", i, [vp]),
        ("bpf_link__disconnect", None, [vp]),
        ("bpf_link__destroy", i, [vp]),
        ("bpf_obj_get", i, [cp]),
        ("bpf_link_update", i, [i, i, vp]),
        ("bpf_link_create", i, [i, i, i, vp]),
        ("bpf_obj_pin", i, [i, cp]),
        ("bpf_program__set_autoload", i, [vp, ctypes.c_bool]),
        ("bpf_prog_attach", i, [i, i, i, ctypes.c_uint]),
        ("bpf_map_update_elem", i, [i, vp, vp, ctypes.c_uint64]),
        ("bpf_map_create", i, [i, cp, ctypes.c_uint32, ctypes.c_uint32, ctypes.c_uint32, vp]),
        ("bpf_map_get_fd_by_id", i, [ctypes.c_uint32]),
        ("bpf_map_lookup_elem", i, [i, vp, vp]),
        ("bpf_map_delete_elem", i, [i, vp]),
        ("bpf_map_get_next_key", i, [i, vp, vp]),
        ("bpf_map_lookup_batch", i, [i, vp, vp, vp, vp, ctypes.POINTER(ctypes.c_uint32), vp]),
        ("bpf_map_delete_batch", i, [i, vp, ctypes.POINTER(ctypes.c_uint32), vp]),
        ("ring_buffer__new", vp, [i, vp, vp, vp]),
        ("ring_buffer__epoll_fd", i, [vp]),
        ("ring_buffer__consume", i, [vp]),
        ("ring_buffer__free", None, [vp]),
    ):
        f = getattr(lib, fn)
        f.restype = res
        f.argtypes = args
    return lib


_LIB: ctypes.CDLL | None = None


def lib() -> ctypes.CDLL:
    global _LIB
    if _LIB is None:
        _LIB = _lib()
    return _LIB


def _err(op: str, rc: int, detail: str = "") -> KernelError:
    e = -rc if rc < 0 else (ctypes.get_errno() or errno.EIO)
    return KernelError(op, e, detail)


# --- compile ------------------------------------------------------------------

def source_text() -> bytes:
    return resources.files("sockgraft.bpf").joinpath("sockgraft.bpf.c").read_bytes()


def compile_object() -> str:
    """Compile the program once per source version; returns the object path."""
    src = source_text()
    digest = hashlib.sha256(src).hexdigest()[:16]
    out_dir = _cache_dir()
    obj = os.path.join(out_dir, f"sockgraft-{digest}.o")
    if os.path.exists(obj):
        return obj
    clang = shutil.which("clang")
    if clang is None:
        raise BpfUnavailable("clang not found; install clang (./run installs it)")
    os.makedirs(out_dir, exist_ok=True)
    src_path = os.path.join(out_dir, f"sockgraft-{digest}.c")
    src_tmp = f"{src_path}.{os.getpid()}.tmp"     # agents may start at once: no torn file
    with open(src_tmp, "wb") as f:
        f.write(src)
    os.replace(src_tmp, src_path)
    arch_inc = f"/usr/include/{os.uname().machine}-linux-gnu"
    tmp = obj + f".{os.getpid()}.tmp"
    cmd = [clang, "-O2", "-g", "-target", "bpf", "-Wall", "-I", arch_inc, "-c", src_path,
           "-o", tmp]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise BpfUnavailable(f"clang failed on {src_path}: {res.stderr.strip()[-2000:]}")
    os.replace(tmp, obj)
    return obj


# --- cgroup and bpffs -----------------------------------------------------------

def cgroup2_mount() -> str:
    with open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[2] == "cgroup2":
                return parts[1]
    raise BpfUnavailable("no cgroup v2 hierarchy is mounted")


def cgroup_path(agent: str) -> str:
    return os.path.join(cgroup2_mount(), "sockgraft", agent)


def pin_dir(agent: str) -> str:
    return os.path.join(BPFFS, "sockgraft", agent)


def ensure_bpffs() -> None:
    if os.path.ismount(BPFFS):
        return
    os.makedirs(BPFFS, exist_ok=True)
    res = subprocess.run(["mount", "-t", "bpf", "bpf", BPFFS], capture_output=True,
                         text=True, timeout=10)
    if res.returncode != 0:
        raise BpfUnavailable(f"cannot mount the BPF filesystem at {BPFFS}: "
                             f"{res.stderr.strip()}")


def join_cgroup(agent: str) -> str:
    """Move this process into the agent's cgroup; returns its path."""
    path = cgroup_path(agent)
    try:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
    except OSError as exc:
        raise BpfUnavailable(f"cannot join cgroup {path}: {exc.strerror}") from None
    return path


def remove(agent: str) -> list[str]:
    """Detach (unpin the links) and remove the agent's cgroup if empty. For
    `lab down` and tests, after the agent is gone. Returns what was removed."""
    removed = []
    pdir = pin_dir(agent)
    if os.path.isdir(pdir):
        for name in os.listdir(pdir):
            os.unlink(os.path.join(pdir, name))     # unpinning detaches the program
        os.rmdir(pdir)
        removed.append(pdir)
        try:
            os.rmdir(os.path.dirname(pdir))
        except OSError:
            pass
    try:
        cg = cgroup_path(agent)
    except BpfUnavailable:
        return removed
    if os.path.isdir(cg):
        deadline = time.monotonic() + 3.0
        while True:
            try:
                os.rmdir(cg)
                removed.append(cg)
                break
            except OSError as exc:
                # a killed agent leaves its cgroup once it is fully reaped
                if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                    log.warning("cgroup %s not removed: %s", cg, exc.strerror)
                    break
                time.sleep(0.05)
        try:
            os.rmdir(os.path.dirname(cg))
        except OSError:
            pass
    return removed


def leftovers(agent: str) -> list[str]:
    out = [p for p in (pin_dir(agent),) if os.path.exists(p)]
    try:
        cg = cgroup_path(agent)
        if os.path.exists(cg):
            out.append(cg)
    except BpfUnavailable:
        pass
    return out


# --- the loaded object ------------------------------------------------------------

_SAMPLE_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)


class Programs:
    """The loaded object of one agent: map fds, attached links, the ring buffer."""

    def __init__(self, agent: str) -> None:
        self.agent = agent
        self._obj = None
        self.maps: dict[str, int] = {}
        self.gens: dict[int, int] = {}     # mark -> generation (sg_gen), read by tag()
        self._rb = None
        self._born_link = None         # sg_born_sock's link: held, never pinned
        self._cb = None
        self._events: list[bytes] = []
        self.cgroup = ""
        self.splice = False            # the sockmap programs are loaded
        self.splice_error = ""
        self.fast = False              # the tc fast path programs are loaded
        self.fast_error = ""
        self._reused: set[str] = set()
        self._local: set[bytes] = set()   # sg_local keys written
        self._flows: set[int] = set()     # ports with a flow cache in sg_fast_flows

    def load(self, *, join: bool = True, splice: str = "off", fastpath: str = "off") -> None:
        """splice, fastpath: load the sockmap programs / the tc fast path
        too - "on" (refusal is an error), "auto" (a kernel that refuses them -
        no BTF, no sockmap, no tcx - gets the guards alone; `splice_error`,
        `fast_error` say why) or "off"."""
        L = lib()
        ensure_bpffs()
        obj_path = compile_object()
        if join:
            self.cgroup = join_cgroup(self.agent)
        else:
            self.cgroup = cgroup_path(self.agent)
            os.makedirs(self.cgroup, exist_ok=True)
        want = {"splice": splice != "off", "fast": fastpath != "off"}
        rc = self._open_load(obj_path, want["splice"], want["fast"])
        for part, mode, words in (("splice", splice, "grafted local pairs are not spliced"),
                                  ("fast", fastpath, "no packet fast path")):
            if rc and mode == "auto":
                self.close()
                setattr(self, f"{part}_error", f"the kernel refused the {part} programs: "
                        f"{os.strerror(-rc)} (see the libbpf log above)")
                log.warning("%s; %s", getattr(self, f"{part}_error"), words)
                want[part] = False
                rc = self._open_load(obj_path, want["splice"], want["fast"])
        if rc:
            self.close()
            what = ("splice" if splice == "on" else "fast path" if fastpath == "on"
                    else "graft")
            raise BpfUnavailable(f"the kernel refused the {what} programs: "
                                 f"{os.strerror(-rc)} (see the libbpf log above)")
        self.splice = want["splice"]
        self.fast = want["fast"]
        obj = self._obj
        for m in MAPS:
            mp = L.bpf_object__find_map_by_name(obj, m.encode())
            self.maps[m] = L.bpf_map__fd(mp)
        for m in PINNED_MAPS:
            if m not in self._reused:
                self._pin_map(m)
        # the agent's own calls are not judged again by the guards
        self.update("sg_config", b"\0\0\0\0",
                    os.stat(self.cgroup).st_ino.to_bytes(8, "little"))

    def _open_load(self, obj_path: str, splice: bool, fast: bool) -> int:
        L = lib()
        obj = L.bpf_object__open_file(obj_path.encode(), None)
        if not obj:
            raise _err("bpf_object__open_file", 0, obj_path)
        self._obj = obj
        off = (() if splice else SPLICE_PROGRAMS) + (() if fast else FAST_PROGRAMS)
        for name in off:
            L.bpf_program__set_autoload(
                L.bpf_object__find_program_by_name(obj, name.encode()), False)
        self._reused = self._reuse_pinned()
        return L.bpf_object__load(obj)

    def _reuse_pinned(self) -> set[str]:
        """A restarted agent keeps the socket tags of its predecessor: reuse
        the pinned map instead of creating an empty one. A pin that does not
        fit (another version's layout) is replaced, with a warning: sockets
        tagged in it are no longer recognised as grafted."""
        L = lib()
        reused = set()
        for m in PINNED_MAPS:
            pin = os.path.join(pin_dir(self.agent), f"map_{m}")
            if not os.path.exists(pin):
                continue
            fd = L.bpf_obj_get(pin.encode())
            mp = L.bpf_object__find_map_by_name(self._obj, m.encode())
            rc = L.bpf_map__reuse_fd(mp, fd) if fd >= 0 else -errno.ENOENT
            if fd >= 0:
                os.close(fd)        # libbpf holds its own dup
            if rc == 0:
                reused.add(m)
                continue
            log.warning("pinned map %s does not fit this version (%s): replaced; what it "
                        "kept across the restart is lost (for sg_sock: sockets grafted "
                        "before are no longer guarded)", pin, os.strerror(-rc))
            os.unlink(pin)
        return reused

    def _pin_map(self, m: str) -> None:
        L = lib()
        pdir = pin_dir(self.agent)
        os.makedirs(pdir, exist_ok=True)
        mp = L.bpf_object__find_map_by_name(self._obj, m.encode())
        pin = os.path.join(pdir, f"map_{m}")
        rc = L.bpf_map__pin(mp, pin.encode())
        if rc:
            raise _err(f"pin {pin}", rc)

    # --- socket tags (the identity of grafted sockets) --------------------------

    def set_gen(self, mark: int, gen: int) -> None:
        """The current generation of a container mark (sg_gen): tags of any
        other generation are refused everything. Written before a socket of
        the new holder is tagged."""
        self.gens[mark] = gen
        self.update("sg_gen", (mark & 0xFFFF).to_bytes(4, "little"), gen.to_bytes(4, "little"))

    def tag(self, fd: int, mark: int, flags: int = 0) -> None:
        """Tag socket fd as grafted for the container of `mark`, in the mark's
        current generation (thread-safe: notifier threads tag the sockets
        they hand out)."""
        owned = T_OWNED if ksock.fsuid_for(mark) >= 0 else 0   # (as _answer.c tag_of)
        self.update("sg_sock", _FD.pack(fd), TAG.pack(mark, flags | owned,
                                                      self.gens.get(mark, 0)))

    def tag_params(self, mark: int) -> tuple[int, int]:
        """(sg_sock map fd, the mark's generation): what a native tagger
        writes `tag`'s entry with (value TAG: mark, flags, gen)."""
        return self.maps["sg_sock"], self.gens.get(mark, 0)

    def born_fd(self) -> int:
        """sg_born's fd: a native loop thread that writes its entry there gets
        its host sockets marked and tagged at birth (sg_born_sock); -1: none."""
        return self.maps.get("sg_born", -1)

    def tag_of(self, fd: int) -> tuple[int, int] | None:
        """(mark, flags) of a tagged socket, None for an untagged one."""
        raw = self.lookup("sg_sock", _FD.pack(fd), TAG.size)
        if raw is None:
            return None
        mark, flags, gen = TAG.unpack(raw)
        return mark, flags if gen == self.gens.get(mark, 0) else flags | T_STALE

    def attach(self) -> None:
        """Attach (or swap into the pinned links) the loaded programs; call
        once the maps hold what the programs must know."""
        L = lib()
        obj = self._obj
        pdir = pin_dir(self.agent)
        os.makedirs(pdir, exist_ok=True)
        if self.splice:
            # before sg_sockops fills the map: a socket takes the map's
            # sk_msg program when it enters, never later
            prog = L.bpf_object__find_program_by_name(obj, b"sg_msg")
            rc = L.bpf_prog_attach(L.bpf_program__fd(prog), self.maps["sg_splice"],
                                   BPF_SK_MSG_VERDICT, 0)
            if rc:
                raise _err("attach sg_msg to sg_splice", rc)
        else:
            stale = os.path.join(pdir, "link_sg_sockops")
            if os.path.exists(stale):
                os.unlink(stale)    # an earlier agent spliced: new connections are not
        cg_fd = os.open(self.cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for name in PROGRAMS + (("sg_sockops",) if self.splice else ()):
                prog = L.bpf_object__find_program_by_name(obj, name.encode())
                pfd = L.bpf_program__fd(prog)
                pin = os.path.join(pdir, f"link_{name}")
                if name == BORN_PROGRAM:
                    self._attach_born(prog, cg_fd, pin)
                    continue
                if _swap_pinned(pin, pfd):
                    continue
                link = L.bpf_program__attach_cgroup(prog, cg_fd)
                if not link:
                    raise _err(f"attach {name} to {self.cgroup}", 0)
                rc = L.bpf_link__pin(link, pin.encode())
                if rc:
                    L.bpf_link__destroy(link)
                    raise _err(f"pin {pin}", rc)
                L.bpf_link__disconnect(link)   # the pin keeps it attached
                L.bpf_link__destroy(link)
        finally:
            os.close(cg_fd)
        self._cb = _SAMPLE_FN(self._on_sample)
        rb = L.ring_buffer__new(self.maps["sg_events"], self._cb, None, None)
        if not rb:
            raise _err("ring_buffer__new", 0)
        self._rb = rb
        log.info("graft programs attached to %s (pins in %s)", self.cgroup, pdir)

    def _attach_born(self, prog, cg_fd: int, pin: str) -> None:
        """sg_born_sock lives as long as this agent process: its link is held,
        not pinned, so that a crashed agent's sg_born entries (pid_tgid ->
        a container's tag) die with it instead of marking the sockets of a
        later thread that gets the same ids (an older agent would never swap
        the program out). Its absence costs nothing but speed: the native
        loop reads every socket's mark back and marks by hand."""
        L = lib()
        self.born_detach()      # (attached twice: once)
        if os.path.exists(pin):
            os.unlink(pin)      # (pinned by an earlier build: detached with it)
        link = L.bpf_program__attach_cgroup(prog, cg_fd)
        if not link:
            raise _err(f"attach {BORN_PROGRAM} to {self.cgroup}", 0)
        self._born_link = link

    def born_detach(self) -> None:
        """Take sg_born_sock away (the agent's own exit does the same)."""
        if self._born_link:
            lib().bpf_link__destroy(self._born_link)
            self._born_link = None

    def _on_sample(self, _ctx, data, size) -> int:
        self._events.append(ctypes.string_at(data, size))
        return 0

    def events_fd(self) -> int:
        return lib().ring_buffer__epoll_fd(self._rb)

    def drain(self) -> list[bytes]:
        lib().ring_buffer__consume(self._rb)
        out, self._events = self._events, []
        return out

    # --- maps ---------------------------------------------------------------
    # (m: a map of the object by name, or the fd of one the agent made)

    def _fd(self, m: str | int) -> int:
        return m if isinstance(m, int) else self.maps[m]

    def update(self, m: str | int, key: bytes, value: bytes) -> None:
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value, len(value))
        rc = lib().bpf_map_update_elem(self._fd(m), k, v, BPF_ANY)
        if rc:
            raise _err(f"update {m}", rc)

    def delete(self, m: str | int, key: bytes) -> bool:
        k = ctypes.create_string_buffer(key, len(key))
        rc = lib().bpf_map_delete_elem(self._fd(m), k)
        if rc and -rc != errno.ENOENT:
            raise _err(f"delete from {m}", rc)
        return rc == 0

    def lookup(self, m: str | int, key: bytes, value_size: int) -> bytes | None:
        k = ctypes.create_string_buffer(key, len(key))
        v = ctypes.create_string_buffer(value_size)
        rc = lib().bpf_map_lookup_elem(self._fd(m), k, v)
        if rc:
            return None
        return v.raw

    def keys(self, m: str | int, key_size: int) -> list[bytes]:
        out = []
        cur = None
        nxt = ctypes.create_string_buffer(key_size)
        while True:
            rc = lib().bpf_map_get_next_key(self._fd(m), cur, nxt)
            if rc:
                return out
            out.append(nxt.raw)
            cur = ctypes.create_string_buffer(nxt.raw, key_size)

    def entries(self, m: str | int, key_size: int, value_size: int,
                batch: int = 8192) -> list[tuple[bytes, bytes]]:
        """Every (key, value) of a hash map, read a batch at a time
        (BPF_MAP_LOOKUP_BATCH: a few system calls for a full flow cache
        instead of two per entry, and no restart from the first key when
        the LRU drops the one the walk stands on)."""
        out: list[tuple[bytes, bytes]] = []
        keys = ctypes.create_string_buffer(key_size * batch)
        vals = ctypes.create_string_buffer(value_size * batch)
        tokens = [ctypes.create_string_buffer(max(key_size, 8)) for _ in range(2)]
        token_in = None
        while True:
            count = ctypes.c_uint32(batch)
            rc = lib().bpf_map_lookup_batch(self._fd(m), token_in, tokens[0], keys, vals,
                                            ctypes.byref(count), None)
            if rc and -rc not in (errno.ENOENT,):
                if -rc == errno.ENOSPC and batch < (1 << 20):
                    return self.entries(m, key_size, value_size, batch * 4)
                if -rc in (errno.EINVAL, ENOTSUPP, errno.EOPNOTSUPP) and not out:
                    return [(k, v) for k in self.keys(m, key_size)
                            if (v := self.lookup(m, k, value_size)) is not None]
                raise _err(f"read {m}", rc)
            raw_k, raw_v = keys.raw, vals.raw
            for i in range(count.value):
                out.append((raw_k[i * key_size:(i + 1) * key_size],
                            raw_v[i * value_size:(i + 1) * value_size]))
            if rc:                      # ENOENT: that was the last batch
                return out
            token_in = tokens[1]
            ctypes.memmove(token_in, tokens[0], len(tokens[0]))

    def delete_many(self, m: str | int, keys: list[bytes]) -> int:
        """Delete these keys (BPF_MAP_DELETE_BATCH, past any key that is gone
        already - the LRU may have dropped it since it was read); the number
        deleted."""
        if not keys:
            return 0
        size = len(keys[0])
        buf = ctypes.create_string_buffer(b"".join(keys), size * len(keys))
        done, i = 0, 0
        while i < len(keys):
            count = ctypes.c_uint32(len(keys) - i)
            rc = lib().bpf_map_delete_batch(self._fd(m), ctypes.addressof(buf) + i * size,
                                            ctypes.byref(count), None)
            if not rc:
                return done + len(keys) - i
            if -rc != errno.ENOENT:
                # (the count is the kernel's only for a missing key): one by one
                return done + sum(self.delete(m, k) for k in keys[i:])
            done += count.value
            i += count.value + 1            # the missing key
        return done

    # --- splicing ---------------------------------------------------------------

    def set_splice(self, on: bool) -> None:
        """Splice grafted local pairs established from now on (or not). A
        spliced receiver that did not set SO_RCVBUF may hold 8 times
        tcp_rmem's default (at most its maximum) before its sender falls back
        to TCP, whose flow control then blocks the sender as TCP would."""
        try:
            with open("/proc/sys/net/ipv4/tcp_rmem") as f:
                rmem = [int(v) for v in f.read().split()]
            rmem_max = min(rmem[2], 8 * rmem[1])
        except (OSError, ValueError, IndexError):
            rmem_max = 1 << 20
        self.update("sg_config", CFG_RMEM_MAX.to_bytes(4, "little"),
                    rmem_max.to_bytes(8, "little"))
        self.update("sg_config", CFG_SPLICE.to_bytes(4, "little"),
                    int(on and self.splice).to_bytes(8, "little"))

    def set_local(self, keys: set[bytes]) -> None:
        """This node's addresses as sg_local keys (model/bpfmaps.local_keys):
        writes only the difference."""
        for k in self._local - keys:
            self.delete("sg_local", k)
        for k in keys - self._local:
            self.update("sg_local", k, b"\1")
        self._local = set(keys)

    def splice_stats(self) -> dict[int, tuple[int, ...]]:
        """mark -> SPLICE_STATS fields (sockets, streams, bytes, fallback,
        left), summed over CPUs."""
        out = {}
        for key in self.keys("sg_splice_stats", 4):
            sums = self._percpu("sg_splice_stats", key, len(SPLICE_STATS))
            if sums is not None:
                out[int.from_bytes(key, "little")] = sums
        return out

    def release_leavers(self) -> int:
        """Take the sockets named in sg_splice_leave (their file became
        blocking, or their server's listener is blocking) out of sg_splice;
        returns how many."""
        n = 0
        for key in self.keys("sg_splice_leave", SPLICE_KEY_SIZE):
            n += self.delete("sg_splice", key)
            self.delete("sg_splice_leave", key)
        return n

    def spliced(self, key: bytes, cookie: int) -> bool:
        """Is the socket of this cookie (SO_COOKIE) in sg_splice under this
        splice key (model/bpfmaps.splice_key)? (A socket of another
        namespace may have the same four addresses and ports.)"""
        got = self.lookup("sg_splice", key, 8)
        return got is not None and int.from_bytes(got, "little") == cookie

    def stop_splicing_into(self, key: bytes) -> None:
        """Nothing more is spliced into this socket: its peer's sends take TCP."""
        self.update("sg_splice_norx", key, b"\1")

    def allow_splicing_into(self, key: bytes) -> None:
        self.delete("sg_splice_norx", key)

    def unsplice(self, key: bytes) -> bool:
        """Take the socket out of sg_splice (its psock queue must be empty:
        what waits there is dropped with it)."""
        return self.delete("sg_splice", key)

    def spliced_sockets(self) -> int:
        """Sockets in sg_splice now (the kernel removes them as they close)."""
        return len(self.keys("sg_splice", SPLICE_KEY_SIZE))

    # --- the packet fast path (tc) ----------------------------------------------

    def set_fast(self, on: bool) -> None:
        """Forward packets between local containers directly (or leave them
        to the bridge; the policy is judged either way)."""
        self.update("sg_config", CFG_FAST.to_bytes(4, "little"),
                    int(on and self.fast).to_bytes(8, "little"))

    def fast_attach(self, ifindex: int, programs=PORT_PROGRAMS) -> None:
        """programs ((name, tcx attach type), ...) on an interface: by
        default sg_fast_in at tcx ingress and sg_fast_out at tcx egress of a
        container's host-side interface; UNDERLAY_PROGRAMS for an underlay
        device. Pinned links: they stay attached across agent restarts; a
        new agent swaps its programs in (a pinned link is updated in place)."""
        L = lib()
        pdir = pin_dir(self.agent)
        os.makedirs(pdir, exist_ok=True)
        for name, where in programs:
            pfd = L.bpf_program__fd(L.bpf_object__find_program_by_name(self._obj,
                                                                        name.encode()))
            pin = fast_pin(self.agent, ifindex, name)
            if _swap_pinned(pin, pfd):
                continue
            lfd = L.bpf_link_create(pfd, ifindex, where, None)
            if lfd < 0:
                raise _err(f"attach {name} to interface {ifindex}", lfd)
            try:
                rc = L.bpf_obj_pin(lfd, pin.encode())
                if rc:
                    raise _err(f"pin {pin}", rc)
            finally:
                os.close(lfd)

    def fast_detach(self, ifindex: int) -> None:
        """Remove the pinned links of an interface (the last reference: the
        programs leave it)."""
        for name in FAST_PROGRAMS:
            try:
                os.unlink(fast_pin(self.agent, ifindex, name))
            except FileNotFoundError:
                pass

    def fast_attached(self) -> set[int]:
        """The interfaces with pinned fast path links."""
        return fast_pins(self.agent)

    def fast_stats(self, slots: dict[int, int]) -> dict[int, tuple[int, ...]]:
        """ifindex -> FAST_STATS fields, summed over CPUs; slots: ifindex ->
        its counters' slot."""
        out = {}
        for ifindex, slot in slots.items():
            sums = self._percpu("sg_fast_stats", slot.to_bytes(4, "little"), FAST_STATS_WORDS)
            if sums is not None:
                out[ifindex] = sums[:len(FAST_STATS)]
        return out

    def fast_stats_reset(self, slot: int) -> None:
        """Zero a counters slot before a new port takes it."""
        possible = _possible_cpus() or os.cpu_count() or 1
        self.update("sg_fast_stats", slot.to_bytes(4, "little"),
                    bytes(8 * FAST_STATS_WORDS * possible))

    def flows_new(self, ifindex: int, entries: int = FLOWS_PER_CONTAINER) -> None:
        """A fresh flow cache for a policed port (an LRU of its own in
        sg_fast_flows): made, then swapped in for the one it had - whose
        records go with it."""
        fd = lib().bpf_map_create(BPF_MAP_TYPE_LRU_HASH, b"sg_flows", FLOW_KEY_SIZE,
                                  FLOW_VAL_SIZE, entries, None)
        if fd < 0:
            raise _err(f"a flow cache of {entries} entries for interface {ifindex}", fd)
        try:
            self.update("sg_fast_flows", ifindex.to_bytes(4, "little"), fd.to_bytes(4, "little"))
        finally:
            os.close(fd)        # sg_fast_flows holds it (no fd per policed container here)
        self._flows.add(ifindex)

    def flows_drop(self, ifindex: int) -> None:
        """The port is not policed (or gone): its flow cache goes."""
        self.delete("sg_fast_flows", ifindex.to_bytes(4, "little"))
        self._flows.discard(ifindex)

    def flows(self) -> set[int]:
        """The ports with a flow cache."""
        return set(self._flows)

    def flow_id(self, ifindex: int) -> int | None:
        """The map id of a port's flow cache (None: none)."""
        raw = self.lookup("sg_fast_flows", ifindex.to_bytes(4, "little"), 4)
        return None if raw is None else int.from_bytes(raw, "little")

    @contextlib.contextmanager
    def flow_cache(self, ifindex: int):
        """An fd of a port's flow cache for the block (None: it has none)."""
        mid = self.flow_id(ifindex)
        fd = lib().bpf_map_get_fd_by_id(mid) if mid is not None else -1
        try:
            yield fd if fd >= 0 else None
        finally:
            if fd >= 0:
                os.close(fd)

    def flow_caches(self):
        """(ifindex, fd) of every port's flow cache, one open at a time."""
        for ifindex in sorted(self._flows):
            with self.flow_cache(ifindex) as fd:
                if fd is not None:
                    yield ifindex, fd

    def forget_flow_records(self, test, skip: set[int] = frozenset()) -> int:
        """Delete the records (key, value) -> bool `test` picks from every
        port's flow cache but those of `skip`; how many went."""
        n = 0
        for ifindex, fd in self.flow_caches():
            if ifindex not in skip:
                n += self.delete_many(fd, [k for k, v in self.entries(
                    fd, FLOW_KEY_SIZE, FLOW_VAL_SIZE) if test(k, v)])
        return n

    def counters(self) -> list[int]:
        """Totals of sg_counters over CPUs: judged, denied, redirected, and
        refused by the guards."""
        return [(self._percpu("sg_counters", i.to_bytes(4, "little"), 1) or (0,))[0]
                for i in range(4)]

    def _percpu(self, m: str, key: bytes, fields: int) -> tuple[int, ...] | None:
        """A per-CPU map's value of `fields` u64s, summed over CPUs (None: no
        such key)."""
        possible = _possible_cpus() or os.cpu_count() or 1
        raw = self.lookup(m, key, 8 * fields * possible)
        if raw is None:
            return None
        tot = [0] * fields
        for j in range(0, len(raw), 8 * fields):
            for f, v in enumerate(struct.unpack_from(f"={fields}Q", raw, j)):
                tot[f] += v
        return tuple(tot)

    def close(self) -> None:
        """Free our handles. The pinned links stay attached (restart safety);
        sg_born_sock goes (it is for this process only)."""
        L = lib()
        self.born_detach()
        self._flows.clear()
        if self._rb:
            L.ring_buffer__free(self._rb)
            self._rb = None
        if self._obj:
            L.bpf_object__close(self._obj)
            self._obj = None
        self.maps = {}


def _swap_pinned(pin: str, prog_fd: int) -> bool:
    """Swap program prog_fd into the link pinned at `pin` (BPF_LINK_UPDATE:
    it stays attached throughout); False when there is no such link - a
    stale pin (its cgroup or interface is gone) or a foreign one is removed,
    to be attached afresh."""
    if not os.path.exists(pin):
        return False
    L = lib()
    lfd = L.bpf_obj_get(pin.encode())
    if lfd >= 0:
        rc = L.bpf_link_update(lfd, prog_fd, None)
        os.close(lfd)
        if rc == 0:
            return True
    os.unlink(pin)
    return False


def fast_pin(agent: str, ifindex: int, program: str) -> str:
    return os.path.join(pin_dir(agent), f"link_{program}_{ifindex}")


def fast_pins(agent: str) -> set[int]:
    out = set()
    try:
        names = os.listdir(pin_dir(agent))
    except FileNotFoundError:
        return out
    for name in names:
        for program in FAST_PROGRAMS:
            prefix = f"link_{program}_"
            if name.startswith(prefix) and name[len(prefix):].isdigit():
                out.add(int(name[len(prefix):]))
    return out


def _possible_cpus() -> int:
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            text = f.read().strip()
    except OSError:
        return 0
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += (int(hi) if hi else int(lo)) - int(lo) + 1
    return n
