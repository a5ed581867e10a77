"""The node agent: services seccomp notifications of registered containers.

One thread, one epoll, for every decision. Sources: the control socket
(registrations, reloads, queries), the OCI socket (runtime hand-offs), one
seccomp listener per registered process tree, host sockets whose
non-blocking connect is in flight for a blocked application thread, the
cgroup programs' event ring buffer, and the directory backend's wake-up pipe
(its worker thread does the directory's network I/O and nothing else).

The notify loop per notification (seccompagent's shape):
  recv -> read the sockaddr from target memory -> re-check the id is valid
  -> decide (model/graft, pure) -> act on the checked copy -> respond.
ENOENT from any step means "the target is gone": drop quietly.

Never switches namespaces: it lives in the host namespace it was started in
(`sockgraft agent --netns` enters it before anything else runs).
"""

from __future__ import annotations

import ctypes
import errno
import gc
import logging
import os
import select
import signal
import socket
import time
from dataclasses import dataclass, field

from ..errors import AgentError, KernelError, NotFound, NotificationGone, SockgraftError
from ..kernel import bpf as kbpf
from ..kernel import epollfix, seccomp
from ..kernel import sockets as ksock
from ..model import bpfmaps, graft
from ..model import oci as moci
from ..model.graft import (BindGrafted, ConnectGrafted, Continue, Deny, Fail, GraftBind,
                           GraftConnect, GraftSend, Listen, SockInfo)
from ..model.graftconfig import GRAFT_AT, dump_config, load_config
from ..model.sockaddr import InetAddr
from ..paths import state_dir
from . import control, notifiers, oci
from .audit import AuditLog
from .directory import Backend as DirectoryBackend
from .enforce import Enforcer
from .procfs import socket_open, tgid
from .publisher import Publisher
from .targets import Targets
from .loop import listen_unix, unregister
from .store import ConfigStore

log = logging.getLogger("sockgraft.agent")

SYSCALL_NAMES = {seccomp.SYS_BIND: "bind", seccomp.SYS_CONNECT: "connect",
                 seccomp.SYS_SENDTO: "sendto", seccomp.SYS_SOCKET: "socket",
                 seccomp.SYS_LISTEN: "listen"}
CONNECT_TIMEOUT = 130.0   # about what the kernel's SYN retries take
MAX_CLIENTS = 256


@dataclass
class Counters:
    grafted: int = 0
    passed: int = 0
    denied: int = 0
    errors: int = 0
    notifier_failures: int = 0              # notifier threads that ended unexpectedly

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class Session:
    """One registered process tree (one seccomp listener)."""
    container: str
    pid: int
    listener: seccomp.Listener
    mark: int
    config: graft.GraftConfig | None
    buffers: dict[int, int]                 # container defaults of SO_SNDBUF/SO_RCVBUF
    conn: socket.socket | None = None       # the launcher's control connection
    counters: Counters = field(default_factory=Counters)
    tids: set[int] = field(default_factory=set)   # threads we cached pidfd/mem fds for
    graft_at: str = "syscall"               # what the process's filter traps
    addresses: tuple[str, ...] = ()         # the container's own (overlay) addresses
    inline: graft.GraftConfig | None = None  # from OCI annotations (the store wins)
    loop_serves: bool = True                # the loop receives its notifications (False
                                            # while notifier threads alone do)


@dataclass(slots=True)
class GraftedSocket:
    container: str
    pid: int
    fd: int
    inode: int
    proto: str
    kind: str            # "ingress" | "egress" | "sendto"
    endpoint: str
    local: str
    remote: str
    since: float


@dataclass
class PendingConnect:
    session: Session
    notif_id: int
    tid: int
    fd: int                      # the application's fd number
    sock: socket.socket          # our host socket (or a dup of the grafted one)
    inject: bool                 # install sock at fd when done (False: it is already there)
    cloexec: bool
    app_nonblocking: bool
    record: GraftedSocket | None
    deadline: float
    watch: list = field(default_factory=list)   # target epoll items to carry over


class Agent:
    def __init__(self, socket_path: str, store: ConfigStore, *, name: str = "default",
                 audit_path: str | None = None, manage_nft: bool = True,
                 bpf: str = "off", bpf_name: str | None = None,
                 directory: DirectoryBackend | None = None, node: str | None = None,
                 oci_socket: str | None = None, notifier_threads: int = 2) -> None:
        if bpf not in ("auto", "on", "off"):
            raise AgentError(f"bpf mode {bpf!r} unknown; accepted: auto, on, off")
        if not 0 <= notifier_threads <= 16:
            raise AgentError(f"notifier threads must be 0..16, got {notifier_threads}")
        self.notifier_threads = notifier_threads
        self.inbox = notifiers.Inbox()
        self.notifiers: dict[int, notifiers.Notifiers] = {}   # listener fd -> its threads
        self.name = name
        self.bpf_mode = bpf
        self.bpf_name = bpf_name or name
        self.enforcer = Enforcer(store, manage_nft)
        self.bpf_error = "disabled (--bpf off)" if bpf == "off" else ""
        self._bpf_events_fd = -1
        self.directory = directory
        self.node = node or name
        self.publisher = Publisher(directory, self.node, self._write_audit, self._node_facts)
        self.oci_socket = oci_socket
        self.oci: oci.OciServer | None = None
        self.holders: list = []
        self.socket_path = socket_path
        self.store = store
        self.audit_path = audit_path
        self.ep = select.epoll()
        self.sessions: dict[int, Session] = {}          # listener fd -> session
        self.pending: dict[int, PendingConnect] = {}    # host socket fd -> pending connect
        self.grafted: dict[tuple[int, int], GraftedSocket] = {}
        self.totals = Counters()
        self.targets = Targets()                        # per trapped thread: pidfd, memory
        self.copier = ksock.OptionCopier()
        self.sockets = ksock.HostSockets()      # tagged once the guards are loaded
        self.server: control.Server | None = None
        self.audit: AuditLog | None = None
        self._stop = False
        self._nft_due = False                   # reconcile nftables at the end of the turn
        self._deferred: list[tuple[socket.socket, dict, int]] = []   # register replies
        self.host_addrs: frozenset = frozenset()
        self.epolls = epollfix.EpollIndex()
        self.reregistrar = epollfix.Reregistrar()
        self._trim_due = False

    # --- lifecycle -----------------------------------------------------------

    def start(self) -> None:
        os.makedirs(os.path.dirname(self.socket_path) or ".", exist_ok=True)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.socket_path)
        except OSError:
            pass
        else:
            probe.close()
            raise AgentError(f"another agent is already serving {self.socket_path}")
        finally:
            probe.close()
        self.server = control.Server(listen_unix(self.socket_path), self.ep,
                                     self._handle_request, MAX_CLIENTS)
        self.ep.register(self.inbox.fileno(), select.EPOLLIN)
        if self.notifier_threads and not notifiers.install_wake_handler():
            log.info("not in the main thread: socket() answered from the loop only")
            self.notifier_threads = 0
        self.audit = AuditLog(self.audit_path, self.name)
        self.reregistrar.warm()
        self.host_addrs = host_addresses()
        self.sync_nft()
        if self.bpf_mode != "off":
            self._start_bpf()
        if self.bpf is None and self.bpf_mode == "off":
            log.warning("--bpf off: grafted sockets are not guarded in the kernel; a container "
                        "with CAP_NET_RAW can change their mark. For trusted containers only")
        elif self.bpf is None:
            log.error("the kernel guards are unavailable (%s): nothing is grafted, every "
                      "container keeps its own network", self.bpf_error)
        if self.oci_socket:
            self.oci = oci.OciServer(self.oci_socket, self.ep, self._on_handoff)
        if self.directory is not None:
            self.publisher.publish_node()
            self.directory.start()
            self.publisher.readopt(self.directory.previous)
            self.ep.register(self.directory.fileno(), select.EPOLLIN)
        log.info("agent %s listening on %s", self.name, self.socket_path)

    def _start_bpf(self) -> None:
        """Load the cgroup programs, fill their maps, then attach them (a
        restarted agent swaps its programs into the pinned links only once
        its maps hold every socket-mode container's policy)."""
        progs = kbpf.Programs(self.bpf_name)
        try:
            progs.load()
            self.bpf = progs
            self.sockets.tag = progs.tag
            self.sync_bpf()
            progs.attach()
        except SockgraftError as exc:
            progs.close()
            self.bpf = None
            self.sockets.tag = None
            self.enforcer.reset_bpf()
            self.bpf_error = str(exc)
            if self.bpf_mode == "on":
                raise
            log.warning("in-kernel graft programs unavailable (graft_at=socket refused): %s",
                        exc)
            return
        self._bpf_events_fd = progs.events_fd()
        self.ep.register(self._bpf_events_fd, select.EPOLLIN)

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        for pc in list(self.pending.values()):
            self._finish_pending(pc, errno.ECONNABORTED)
        for fd in list(self.sessions):
            self._drop_session(fd)
        if self.server is not None:
            self.server.close()
            self.server = None
            try:
                os.unlink(self.socket_path)
            except FileNotFoundError:
                pass
        if self.oci is not None:
            self.oci.close()
            self.oci = None
        if self.directory is not None:
            unregister(self.ep, self.directory.fileno())
            # A clean stop withdraws our records; a crash leaves them to expire.
            self.directory.close(withdraw=True)
            self.directory = self.publisher.directory = None
        if self.bpf is not None:
            if self._bpf_events_fd >= 0:
                unregister(self.ep, self._bpf_events_fd)
            self.bpf.close()     # the pinned links stay: grafted sockets stay judged
            self.bpf = None
        self.inbox.close()
        self.reregistrar.close()
        self.targets.close()
        self.ep.close()
        if self.audit is not None:
            self.audit.close()

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        next_sweep = time.monotonic() + 1.0
        while not self._stop:
            try:
                events = self.ep.poll(0.5)
            except InterruptedError:
                continue
            for fd, ev in events:
                self.dispatch(fd, ev)
            if self.inbox.waiting():
                self.drain_inbox()
            self.end_turn()
            now = time.monotonic()
            if now >= next_sweep:
                self.sweep(now)
                next_sweep = now + 1.0

    def end_turn(self) -> None:
        """Once per loop turn: one nftables reload for every registration of
        the turn (not one per container: quadratic when many start at once),
        then the registrations' replies - a container runs only once the
        kernel knows its policy."""
        if self._nft_due:
            self._nft_due = False
            try:
                self.sync_nft()
            except SockgraftError as exc:
                log.error("nftables: %s", exc)
                for conn, _reply, key in self._deferred:
                    if key in self.sessions:
                        self._drop_session(key)
                    self._reply(conn, {"ok": False, "error": f"nftables: {exc}"})
                self._deferred.clear()
        deferred, self._deferred = self._deferred, []
        for conn, reply, _key in deferred:
            self._reply(conn, reply)

    def dispatch(self, fd: int, ev: int) -> None:
        if fd in self.sessions:
            self._on_listener(fd, ev)
        elif fd in self.pending:
            self._on_connect_ready(fd)
        elif self.server is not None and self.server.owns(fd):
            self.server.dispatch(fd)
        elif fd == self._bpf_events_fd:
            self._on_bpf_events()
        elif fd == self.inbox.fileno():
            self.drain_inbox()
        elif self.directory is not None and fd == self.directory.fileno():
            self._on_directory()
        elif self.oci is not None and self.oci.owns(fd):
            self.oci.dispatch(fd)

    # --- control connections -------------------------------------------------

    def _reply(self, conn: socket.socket, msg: dict) -> None:
        control.reply(conn, msg)

    def _handle_request(self, conn: socket.socket, msg: dict, fds: list[int]) -> None:
        """The op table. Owns `fds`: closes what is left of them, once."""
        op = msg.get("op")
        try:
            if op == "register":
                key = self._register(conn, msg, fds)       # takes the fd it keeps
                # answered at the end of the turn, once nftables knows it
                self._deferred.append((conn, {"ok": True, "mark": self.sessions[key].mark},
                                       key))
                return
            elif op == "reload":
                reply = self._reload(msg.get("container"))
            elif op == "sockets":
                reply = {"ok": True, "sockets": self.list_sockets()}
            elif op == "stats":
                reply = {"ok": True, **self.stats()}
            elif op == "services":
                reply = {"ok": True, **self.publisher.listing()}
            elif op == "ping":
                reply = {"ok": True, "pid": os.getpid(), "name": self.name}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except SockgraftError as exc:
            log.warning("control: %s failed: %s", op, exc)
            reply = {"ok": False, "error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        self._reply(conn, reply)

    def _register(self, conn: socket.socket, msg: dict, fds: list[int]) -> int:
        """A new session; returns its key (the listener fd). Everything that
        can be refused is checked before the listener fd is taken from `fds`
        (whose owner, _handle_request, closes what is left there, once); from
        then on the session owns it, and a failure rolls the session back."""
        container, pid = msg.get("container"), msg.get("pid")
        if len(fds) != 1:
            raise AgentError(f"register needs exactly one listener fd, got {len(fds)}")
        if not isinstance(container, str) or not container or \
                not isinstance(pid, int) or isinstance(pid, bool):
            raise AgentError("register needs a container name and a pid")
        buffers = msg.get("buffers") or {}
        if not isinstance(buffers, dict) or not all(
                isinstance(buffers.get(k, 0), int) for k in ("sndbuf", "rcvbuf")):
            raise AgentError("register: buffers must be {\"sndbuf\": int, \"rcvbuf\": int}")
        graft_at = msg.get("graft_at", "syscall")
        if graft_at not in GRAFT_AT:
            raise AgentError(f"graft_at {graft_at!r} unknown; accepted: {', '.join(GRAFT_AT)}")
        if graft_at == "socket" and self.bpf is None:
            raise AgentError(f"container {container}: graft_at=socket needs the in-kernel "
                             f"graft programs, which are unavailable: {self.bpf_error}")
        inline = None
        if msg.get("inline_config"):
            inline = load_config(str(msg["inline_config"]), f"annotations of {container}")
            if inline.container != container:
                raise AgentError(f"inline config is for {inline.container}, not {container}")
        cfg = self.store.load(container) or inline
        mark = self.store.mark(container, in_use=self._mark_held)
        listener = seccomp.Listener(fds.pop())
        try:
            # 6.6+: the target runs on our CPU when we answer; a trapped call
            # is a round trip between two tasks that would otherwise migrate
            listener.set_flags(seccomp.SECCOMP_USER_NOTIF_FD_SYNC_WAKE_UP)
        except KernelError:
            pass
        addresses = msg.get("addresses") or []
        if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
            addresses = []
        sess = Session(container, pid, listener, mark, cfg,
                       {ksock.SO_SNDBUF: int(buffers.get("sndbuf", 0)),
                        ksock.SO_RCVBUF: int(buffers.get("rcvbuf", 0))}, conn,
                       graft_at=graft_at, addresses=tuple(addresses[:64]), inline=inline)
        key = listener.fileno()
        self.sessions[key] = sess
        try:
            self.publisher.publish_node()
            # the kernel maps first: a socket answered by a notifier thread may
            # connect at once, and a tagged socket of an unknown container is
            # refused; nftables once per loop turn, before the reply (end_turn)
            self._nft_due = True
            self.sync_bpf()
        except SockgraftError:
            del self.sessions[key]          # roll back: nothing half-registered
            listener.close()
            self.publisher.publish_node()
            raise
        threads = None
        if graft_at == "socket" and self.notifier_threads:
            try:
                threads = notifiers.Notifiers(
                    key, mark, container, self.inbox, threads=self.notifier_threads,
                    enabled=lambda: self._grafts_sockets(sess), sockets=self.sockets)
            except SockgraftError as exc:
                log.warning("%s: socket() answered from the loop only: %s", container, exc)
        if threads is not None:
            # the threads receive every notification; the loop only hears
            # that the last filtered task exited (EPOLLHUP is always reported)
            self.notifiers[key] = threads
            sess.loop_serves = False
            self.ep.register(key, 0)
        else:
            self.ep.register(key, select.EPOLLIN)
        log.info("registered container %s pid %d (mark %#x, %s)", container, pid, mark,
                 "configured" if cfg else "no graft config: everything passes through")
        return key

    def _reload(self, container: str | None) -> dict:
        n = 0
        for sess in self.sessions.values():
            if container is None or sess.container == container:
                sess.config = self.store.load(sess.container) or sess.inline
                n += 1
        self.host_addrs = host_addresses()
        self.publisher.publish_node()
        self.sync_nft()
        self.sync_bpf(rescan=True)
        return {"ok": True, "reloaded": n}

    # --- enforcement (agent/enforce.py) and the in-kernel programs -------------

    @property
    def bpf(self) -> kbpf.Programs | None:
        return self.enforcer.bpf

    @bpf.setter
    def bpf(self, progs: kbpf.Programs | None) -> None:
        self.enforcer.bpf = progs

    def sync_nft(self) -> None:
        self.enforcer.sync_nft(self.sessions.values(), self.publisher.services)

    def sync_bpf(self, rescan: bool = False) -> None:
        self.enforcer.sync_bpf(self.sessions.values(), self.publisher.services,
                               self._mark_held, rescan)

    def _sync_bpf_services(self) -> None:
        self.enforcer.sync_bpf_services(self.publisher.services)

    def _on_bpf_events(self) -> None:
        """Denials the programs made in the kernel: count them, audit them."""
        assert self.bpf is not None
        for raw in self.bpf.drain():
            try:
                ev = bpfmaps.decode_event(raw)
            except ValueError as exc:
                log.warning("bpf: bad event: %s", exc)
                continue
            applied = self.enforcer.applied.get(ev.mark)
            container = applied.cfg.container if applied else f"mark {ev.mark:#x}"
            if ev.kind == bpfmaps.EV_DENY_POLICY and applied and ev.label < len(applied.labels):
                rule = applied.labels[ev.label]
            elif ev.kind == bpfmaps.EV_BIND_FAILED and applied and \
                    ev.label < len(applied.egress_labels):
                rule = f"{applied.egress_labels[ev.label]}: endpoint bind failed"
            elif ev.kind == bpfmaps.EV_DENY_MARK:
                rule = f"{ev.reason} (packet mark {ev.label:#x})"
            else:
                rule = ev.reason
            for sess in self.sessions.values():
                if sess.mark == ev.mark:
                    sess.counters.denied += 1
                    break
            self.totals.denied += 1
            self._write_audit(container, ev.pid, ev.op, ev.address, "deny", rule, ev.errno,
                              where="kernel")

    def _on_socket(self, sess: Session, n: seccomp.Notification) -> None:
        """graft_at = socket: answer socket() with a host socket carrying the
        container's mark (notifiers.answer_socket). Normally the session's
        notifier threads do this; the loop does it when they are off."""
        if not self._grafts_sockets(sess):
            self._continue(sess, n.id)      # unconfigured: the container's own socket
            return
        a = notifiers.answer_socket(sess.listener, n.id, n.pid, n.args, sess.mark, self.sockets)
        if a is not None:
            self._count_answered(sess, a)

    def _grafts_sockets(self, sess: Session) -> bool:
        """Does socket() of this session get a host socket (read by notifier
        threads too: attribute reads only)?"""
        return sess.graft_at == "socket" and sess.config is not None and self.bpf is not None

    def _count_answered(self, sess: Session, packed: int) -> None:
        a = notifiers.unpack_answer(packed)
        self._count_graft(sess, GraftedSocket(sess.container, a.tid, a.fd, a.inode, a.proto,
                                              "socket", "", "", "", time.time()))

    def drain_inbox(self) -> None:
        """Take over what the notifier threads handed over: count and list
        the sockets they answered, handle the notifications they forwarded."""
        for key, item in self.inbox.drain():
            sess = self.sessions.get(key)
            if isinstance(item, int):
                if sess is not None:
                    self._count_answered(sess, item)
            elif isinstance(item, notifiers.ThreadFailed):
                if sess is not None:
                    self._notifier_failed(key, sess, item)
            elif sess is not None:
                self.handle(sess, item)
            else:
                log.warning("notification %#x of a dropped session left unanswered", item.id)

    def _mark_held(self, mark: int) -> bool:
        """Does a live session carry this mark (its config may be deleted while
        it runs)? Such a mark is not handed to another container."""
        return any(s.mark == mark for s in self.sessions.values())

    def _notifier_failed(self, key: int, sess: Session, failed) -> None:
        """A notifier thread of this session ended unexpectedly: the loop
        receives the listener's notifications too (the surviving threads keep
        going; each notification goes to one receiver), so none waits."""
        sess.counters.notifier_failures += 1
        self.totals.notifier_failures += 1
        if not sess.loop_serves:
            sess.loop_serves = True
            try:
                self.ep.modify(key, select.EPOLLIN)
            except OSError as exc:
                log.error("%s: cannot serve the listener from the loop: %s", sess.container,
                          exc)
                return
            log.warning("%s: the loop now answers this container's notifications (%s: %s)",
                        sess.container, failed.thread, failed.error)

    def _on_listen(self, sess: Session, n: seccomp.Notification) -> None:
        """listen(): a grafted socket listens only once the agent bound it
        through an ingress rule (graft.decide_listen). Whatever the verdict,
        the kernel never looks the fd up again after the check: the agent
        listens on its own duplicate of the socket it judged, or answers the
        errno itself (a racing dup2() cannot swap a grafted socket in)."""
        fd = n.args[0] & 0xFFFFFFFF
        got = self.targets.dup_socket(n.pid, fd)
        if isinstance(got, int):
            self._respond(sess, n.id, error=got)
            return
        try:
            info, _ = self._sock_info(got)
            action = graft.decide_listen(info)
            if isinstance(action, Listen):
                self._respond(sess, n.id, error=ksock.listen(got, n.args[1]))
                return
            try:
                local = _fmt(got.getsockname())
            except OSError:
                local = f"fd {fd}"
            sess.counters.denied += 1
            self.totals.denied += 1
            self._audit_line(sess, n, "listen", "deny", local, action.rule, action.errno)
            self._respond(sess, n.id, error=action.errno)
        finally:
            got.close()

    # --- OCI runtimes --------------------------------------------------------

    def _on_handoff(self, h, listener: int) -> None:
        """A runtime handed over a container's listener: find its config (the
        store first, then its annotations) and start its holder."""
        from .. import cni
        regs = cni.registrations(state_dir(), h.container_id)
        try:
            container = moci.container_name(h, regs[0].get("container") if regs else None)
        except SockgraftError as exc:
            log.error("OCI container %s rejected: %s", h.container_id, exc)
            return
        cfg_text = None
        if self.store.load(container) is None:
            try:
                cfg = moci.config_from_annotations(container, h.annotations)
            except SockgraftError as exc:
                log.error("container %s: annotations rejected, served without grafting: %s",
                          container, exc)
                self._write_audit(container, h.pid, "oci", h.container_id, "reject", str(exc))
                cfg = None
            cfg_text = dump_config(cfg) if cfg is not None else None
        addresses = [ip for r in regs for ip in r.get("ips", []) if isinstance(ip, str)]
        self.holders.append(oci.spawn_holder(self.socket_path, h, listener, container,
                                             cfg_text, addresses))
        log.info("OCI container %s (%s, pid %d, graft_at %s): holder started", container,
                 h.container_id, h.pid, h.graft_at)

    # --- the cluster directory (overlay bypass) -------------------------------

    def _node_facts(self) -> tuple:
        """The node document's inputs: host addresses, containers' addresses."""
        return self.host_addrs, [a for sess in self.sessions.values() for a in sess.addresses]

    def _on_directory(self) -> None:
        """The directory's view changed: new service table, then the kernel's
        exceptions for it (nftables accept sets, BPF redirects)."""
        self.publisher.on_view()
        try:
            self.sync_nft()
        except SockgraftError as exc:
            log.warning("nftables: %s", exc)
        self._sync_bpf_services()

    # --- notifications -------------------------------------------------------

    def _on_listener(self, fd: int, ev: int) -> None:
        sess = self.sessions[fd]
        if ev & select.EPOLLIN:
            try:
                n = sess.listener.recv()
            except NotFound:
                n = None
            except KernelError as exc:
                log.warning("%s: NOTIF_RECV failed: %s", sess.container, exc)
                n = None
            if n is not None:
                self.handle(sess, n)
                return
        if ev & (select.EPOLLHUP | select.EPOLLERR):
            log.info("container %s pid %d: every filtered task exited", sess.container,
                     sess.pid)
            self._drop_session(fd)

    def _drop_session(self, fd: int) -> None:
        threads = self.notifiers.pop(fd, None)
        if threads is not None:
            threads.stop(timeout=0)     # woken, not waited for: each closes its own fd
            self.drain_inbox()       # answer what they forwarded while the listener is open
        sess = self.sessions.pop(fd)
        unregister(self.ep, fd)
        sess.listener.close()
        self.publisher.publish_node()
        for tid in sess.tids:
            self.targets.forget(tid)
        for key in [k for k, g in self.grafted.items() if g.container == sess.container
                    and not os.path.exists(f"/proc/{g.pid}")]:
            del self.grafted[key]
        self.publisher.sweep()
        self._trim_due = True

    def handle(self, sess: Session, n: seccomp.Notification) -> None:
        """Service one notification. Never raises: every path answers or drops."""
        name = SYSCALL_NAMES.get(n.nr, str(n.nr))
        try:
            self._handle(sess, n, name)
        except NotificationGone:
            pass  # the target died or was interrupted: nothing to answer
        except KernelError as exc:
            # everything else is answered: an unanswered call blocks its thread
            # for good (a target that died meanwhile makes the answer a no-op)
            sess.counters.errors += 1
            self.totals.errors += 1
            (log.debug if isinstance(exc, NotFound) else log.warning)(
                "%s pid %d %s: %s", sess.container, n.pid, name, exc)
            self._respond(sess, n.id, error=exc.errno or errno.EIO)
        except Exception:  # noqa: BLE001 - the agent keeps serving whatever happens
            sess.counters.errors += 1
            self.totals.errors += 1
            log.exception("%s pid %d %s: internal error", sess.container, n.pid, name)
            self._respond(sess, n.id, error=errno.EIO)

    def _respond(self, sess: Session, nid: int, *, val: int = 0, error: int = 0) -> None:
        try:
            sess.listener.respond(nid, val=val, error=error)
        except NotificationGone:
            pass

    def _continue(self, sess: Session, nid: int) -> None:
        sess.counters.passed += 1
        self.totals.passed += 1
        try:
            sess.listener.continue_(nid)
        except NotificationGone:
            pass

    def _handle(self, sess: Session, n: seccomp.Notification, name: str) -> None:
        if n.arch != seccomp.AUDIT_ARCH_X86_64:
            self._respond(sess, n.id, error=errno.ENOSYS)
            return
        if n.nr == seccomp.SYS_SOCKET:
            self._on_socket(sess, n)
            return
        if n.nr == seccomp.SYS_LISTEN:
            self._on_listen(sess, n)
            return
        if n.nr == seccomp.SYS_SENDTO:
            fd, ptr, alen, flags = n.args[0], n.args[4], n.args[5], n.args[3]
        else:
            fd, ptr, alen, flags = n.args[0], n.args[1], n.args[2], 0
        fd &= 0xFFFFFFFF
        alen &= 0xFFFFFFFF
        if sess.config is None or not self.guarded:
            # nothing to graft; a grafted socket of a container whose config
            # is gone is still judged by the kernel guards
            self._continue(sess, n.id)
            return
        sess.tids.add(n.pid)
        data = self.targets.read(n.pid, ptr, min(alen, 128)) if alen else b""
        if not sess.listener.id_valid(n.id):
            return      # the thread was interrupted or died while we read
        addr = graft.parse_trapped(data, alen)
        if isinstance(addr, Fail):
            self._malformed(sess, n, fd, addr)
            return
        if not isinstance(addr, InetAddr):
            self._continue(sess, n.id)
            return
        cfg = sess.config
        if n.nr == seccomp.SYS_SENDTO and cfg.match_egress(addr) is None:
            # No graft to start; a grafted socket's datagrams are judged by nftables.
            self._continue(sess, n.id)
            return
        dup = self._dup_target_fd(n.pid, fd)
        if dup is None:
            self._respond(sess, n.id, error=errno.EBADF)
            return
        keep = False
        try:
            info, proto = self._sock_info(dup)
            if n.nr == seccomp.SYS_BIND:
                action = graft.decide_bind(cfg, info, addr, self.host_addrs)
            elif n.nr == seccomp.SYS_CONNECT:
                action = graft.decide_connect(cfg, info, addr, self.publisher.services)
            else:
                action = graft.decide_sendto(cfg, info, addr, flags)
            keep = self._act(sess, n, name, fd, dup, info, proto, action)
        finally:
            if not keep:
                dup.close()

    def _malformed(self, sess: Session, n: seccomp.Notification, fd: int, fail: Fail) -> None:
        """A sockaddr the kernel would refuse (graft.decide_malformed)."""
        dup = self._dup_target_fd(n.pid, fd)
        info = None
        if dup is not None:
            try:
                info = self._sock_info(dup)[0]
            finally:
                dup.close()
        action = graft.decide_malformed(info, fail)
        if isinstance(action, Fail):
            self._respond(sess, n.id, error=action.errno)
        else:
            self._continue(sess, n.id)

    @property
    def guarded(self) -> bool:
        """May the agent graft? Only with the kernel guards loaded (or when
        the operator chose --bpf off: trusted containers only)."""
        return self.bpf is not None or self.bpf_mode == "off"

    def _sock_info(self, dup: socket.socket) -> tuple[SockInfo, int]:
        """What the decisions need to know of a target's socket, and its
        protocol number. Grafted = tagged by this agent (the mark is only the
        fallback without the guards: a container with CAP_NET_RAW can set it)."""
        family, type_, proto, mark = ksock.info(dup)
        if self.bpf is not None:
            tag = self.bpf.tag_of(dup.fileno())
            grafted = tag is not None
            bound = grafted and _bound(dup)
            ingress = grafted and bool(tag[1] & kbpf.T_INGRESS)
        else:
            grafted = graft.is_grafted_mark(mark)
            bound = ingress = grafted and _bound(dup)
        return SockInfo(family, type_, grafted, bound if grafted else True, ingress), proto

    def _dup_target_fd(self, tid: int, fd: int) -> socket.socket | None:
        got = self.targets.dup_socket(tid, fd)
        return None if isinstance(got, int) else got

    def _audit_line(self, sess: Session, n: seccomp.Notification, name: str, verdict: str,
                    addr: object, rule: str, errno_: int = 0) -> None:
        self._write_audit(sess.container, n.pid, name, addr, verdict, rule, errno_)

    def _write_audit(self, container: str, pid: int, name: str, addr: object, verdict: str,
                     rule: str, errno_: int = 0, where: str = "agent") -> None:
        if self.audit is not None:
            self.audit.write(container, pid, name, addr, verdict, rule, errno_, where)

    def _act(self, sess: Session, n: seccomp.Notification, name: str, fd: int,
             dup: socket.socket, info: SockInfo, proto: int, action) -> bool:
        """Carry out a decision. Returns True if `dup` was handed to a pending connect."""
        if isinstance(action, Continue):
            self._continue(sess, n.id)
            return False
        if isinstance(action, Fail):
            sess.counters.errors += 1
            self.totals.errors += 1
            log.info("%s pid %d %s: %s", sess.container, n.pid, name, action.reason)
            self._respond(sess, n.id, error=action.errno)
            return False
        if isinstance(action, Deny):
            sess.counters.denied += 1
            self.totals.denied += 1
            self._audit_line(sess, n, name, "deny", action.dest, action.rule, action.errno)
            self._respond(sess, n.id, error=action.errno)
            return False
        if isinstance(action, BindGrafted):
            if action.endpoint is None:
                # an ephemeral wildcard bind: nothing to bind on the host (its
                # connect()/sendmsg() bind the egress endpoint later)
                self._respond(sess, n.id, val=0)
                return False
            try:
                dup.bind(ksock.sockaddr_tuple(action.local))
            except OSError as exc:
                self._respond(sess, n.id, error=exc.errno or errno.EADDRNOTAVAIL)
                return False
            if self.bpf is not None:
                self.bpf.tag(dup.fileno(), sess.mark, kbpf.T_INGRESS)   # may listen now
            self._count_graft(sess, self._record(sess, n.pid, fd, info, "ingress",
                                                 action.endpoint.name, dup, remote=""))
            self.publisher.publish_bind(sess.container, sess.addresses, n.pid, fd, info.proto,
                                         dup, action.requested)
            self._respond(sess, n.id, val=0)
            return False
        if isinstance(action, ConnectGrafted):
            return self._start_connect(sess, n, fd, dup, action.dest, inject=False,
                                       record=None)
        host = self.sockets.host_socket(
            info.family, info.type, proto, sess.mark,
            kbpf.T_INGRESS if isinstance(action, GraftBind) else 0)
        try:
            self.copier.copy(dup, host, info.family, info.type, proto, sess.buffers)
            if isinstance(action, GraftBind):
                try:
                    host.bind(ksock.sockaddr_tuple(action.local))
                except OSError as exc:
                    self._respond(sess, n.id, error=exc.errno or errno.EADDRNOTAVAIL)
                    log.info("%s: bind %s for %s failed: %s", sess.container, action.local,
                             action.requested, exc.strerror)
                    return False
                record = self._record(sess, n.pid, fd, info, "ingress", action.endpoint.name,
                                      host, remote="")
                self._inject_and_answer(sess, n, fd, host, dup, record)
                self.publisher.publish_bind(sess.container, sess.addresses, n.pid, fd,
                                             info.proto, host, action.requested)
                return False
            if isinstance(action, GraftConnect):
                self._bind_local(host, action.local, defer_port=True)
                remote = str(action.dest) if action.overlay is None else \
                    f"{action.overlay} via {action.dest}"
                record = self._record(sess, n.pid, fd, info, "egress", action.endpoint.name,
                                      host, remote=remote)
                keep_host = self._start_connect(sess, n, fd, host, action.dest, inject=True,
                                                record=record, app_sock=dup)
                if keep_host:
                    host = None  # owned by the pending connect now
                return False
            if isinstance(action, GraftSend):
                self._bind_local(host, action.local)
                record = self._record(sess, n.pid, fd, info, "sendto", action.endpoint.name,
                                      host, remote=str(action.dest))
                cloexec = ksock.target_fd_cloexec(n.pid, fd)
                ksock.set_blocking(host, not ksock.file_nonblocking(dup.fileno()))
                self._install(sess, n.id, n.pid, host, fd, cloexec,
                              self._watchers(n.pid, fd, dup))
                self._count_graft(sess, record)
                # The datagram itself goes through the kernel on the host
                # socket; nftables judges it by the mark (no re-read hazard).
                sess.listener.continue_(n.id)
                return False
            raise AssertionError(f"unknown action {action!r}")
        finally:
            if host is not None:
                host.close()

    def _watchers(self, tid: int, fd: int, app: socket.socket) -> list:
        """The target's epoll items on fd, read before the swap. Only sockets
        in non-blocking mode are looked at: a blocking socket in an epoll set
        before connect()/bind() is not a pattern event loops use."""
        if not ksock.file_nonblocking(app.fileno()):
            return []
        return epollfix.watchers(tid, fd, self.epolls)

    def _install(self, sess: Session, nid: int, tid: int, host: socket.socket, fd: int,
                 cloexec: bool, watch: list) -> None:
        """ADDFD the host socket at the application's fd number, then carry the
        application's epoll registrations of the old socket over to it."""
        sess.listener.addfd(nid, host.fileno(), newfd=fd, cloexec=cloexec)
        if watch and not self.reregistrar.reregister(self.targets.pidfd(tid), host.fileno(), fd,
                                                     watch):
            log.warning("%s tid %d fd %d: could not carry %d epoll registration(s) over",
                        sess.container, tid, fd, len(watch))

    def _bind_local(self, host: socket.socket, local: InetAddr, *,
                    defer_port: bool = False) -> None:
        """Bind to the endpoint. defer_port (a connect to come, dynamic port):
        IP_BIND_ADDRESS_NO_PORT leaves the port to connect(), which picks it
        knowing the destination and may reuse TIME_WAIT ports; a bind to port 0
        would reserve one per socket and exhaust the range under connection churn."""
        try:
            if defer_port and local.port == 0:
                host.setsockopt(ksock.IPPROTO_IP, ksock.IP_BIND_ADDRESS_NO_PORT, 1)
            host.bind(ksock.sockaddr_tuple(local))
        except OSError as exc:
            raise KernelError("bind endpoint", exc.errno or errno.EADDRNOTAVAIL,
                              str(local)) from None

    def _record(self, sess: Session, tid: int, fd: int, info: SockInfo, kind: str,
                endpoint: str, host: socket.socket, remote: str) -> GraftedSocket:
        """What `sockgraft sockets` shows. Cheap on purpose (one fstat): the
        process id and the addresses are resolved when somebody lists them."""
        return GraftedSocket(sess.container, tid, fd, os.fstat(host.fileno()).st_ino,
                             info.proto, kind, endpoint, "", remote, time.time())

    def _count_graft(self, sess: Session, record: GraftedSocket | None) -> None:
        sess.counters.grafted += 1
        self.totals.grafted += 1
        if record is not None:
            self.grafted[(record.pid, record.fd)] = record

    def _inject_and_answer(self, sess: Session, n: seccomp.Notification, fd: int,
                           host: socket.socket, app: socket.socket,
                           record: GraftedSocket | None) -> None:
        cloexec = ksock.target_fd_cloexec(n.pid, fd)
        ksock.set_blocking(host, not ksock.file_nonblocking(app.fileno()))
        self._install(sess, n.id, n.pid, host, fd, cloexec, self._watchers(n.pid, fd, app))
        self._count_graft(sess, record)
        self._respond(sess, n.id, val=0)

    # --- connects ------------------------------------------------------------

    def _start_connect(self, sess: Session, n: seccomp.Notification, fd: int,
                       sock: socket.socket, dest: InetAddr, *, inject: bool,
                       record: GraftedSocket | None, app_sock: socket.socket | None = None
                       ) -> bool:
        """Connect `sock` (non-blocking) to the checked `dest`. Returns True if
        `sock` is now owned by a pending connect."""
        app = app_sock if app_sock is not None else sock
        app_nb = ksock.file_nonblocking(app.fileno())
        cloexec = ksock.target_fd_cloexec(n.pid, fd) if inject else False
        watch = self._watchers(n.pid, fd, app) if inject else []
        restore_blocking = False
        if not inject and not app_nb:
            # A grafted socket shared with the application: connect it without
            # blocking the agent, then give the application its blocking mode back.
            ksock.set_blocking(sock, False)
            restore_blocking = True
        err = sock.connect_ex(ksock.sockaddr_tuple(dest))
        if err in (0,) or (err != errno.EINPROGRESS and err != errno.EAGAIN):
            if restore_blocking:
                ksock.set_blocking(sock, True)
            if err == 0 and inject:
                ksock.set_blocking(sock, not app_nb)
                self._install(sess, n.id, n.pid, sock, fd, cloexec, watch)
                self._count_graft(sess, record)
            self._respond(sess, n.id, error=err)
            return False
        if not app_nb and _writable(sock):
            # Loopback and local peers usually finish the handshake inside
            # connect(): answer now instead of after another epoll round.
            err = ksock.so_error(sock)
            if restore_blocking or inject:
                ksock.set_blocking(sock, True)
            if err == 0 and inject:
                self._install(sess, n.id, n.pid, sock, fd, cloexec, watch)
                self._count_graft(sess, record)
            self._respond(sess, n.id, error=err)
            return False
        if app_nb:
            # The application will poll for writability and read SO_ERROR itself.
            if inject:
                self._install(sess, n.id, n.pid, sock, fd, cloexec, watch)
                self._count_graft(sess, record)
            self._respond(sess, n.id, error=errno.EINPROGRESS)
            return False
        pc = PendingConnect(sess, n.id, n.pid, fd, sock, inject, cloexec, app_nb, record,
                            time.monotonic() + CONNECT_TIMEOUT, watch)
        self.pending[sock.fileno()] = pc
        self.ep.register(sock.fileno(), select.EPOLLOUT | select.EPOLLONESHOT)
        return True

    def _on_connect_ready(self, fd: int) -> None:
        pc = self.pending[fd]
        self._finish_pending(pc, ksock.so_error(pc.sock))

    def _finish_pending(self, pc: PendingConnect, err: int) -> None:
        fd = pc.sock.fileno()
        self.pending.pop(fd, None)
        unregister(self.ep, fd)
        sess = pc.session
        try:
            if err == 0 and pc.inject:
                ksock.set_blocking(pc.sock, True)
                self._install(sess, pc.notif_id, pc.tid, pc.sock, pc.fd, pc.cloexec, pc.watch)
                self._count_graft(sess, pc.record)
            elif not pc.inject:
                ksock.set_blocking(pc.sock, True)
            self._respond(sess, pc.notif_id, error=err)
        except NotificationGone:
            pass
        except KernelError as exc:
            log.warning("%s: finishing a connect failed: %s", sess.container, exc)
        finally:
            pc.sock.close()

    def sweep(self, now: float) -> None:
        """Expire connects whose application thread gave up or that time out;
        close cached pidfds and memory fds of threads that exited."""
        if self._trim_due and not self.pending:
            # Containers went away: hand the memory their records used back to
            # the system (CPython and malloc keep freed memory otherwise).
            self._trim_due = False
            try:
                self.sync_nft()       # drop the chains of containers that are gone
            except SockgraftError as exc:
                log.warning("nftables: %s", exc)
            if len(self.grafted) < 64:
                self.grafted = dict(self.grafted)   # a dict never shrinks in place
            gc.collect()
            _malloc_trim()
        for sess in self.sessions.values():
            sess.tids.difference_update(self.targets.exited(sess.tids))
        self.publisher.sweep()
        if self.audit is not None:
            self.audit.flush()
        if self.oci is not None:
            self.oci.sweep(now)
        self.holders = [p for p in self.holders if p.poll() is None]
        for pc in list(self.pending.values()):
            if now > pc.deadline:
                self._finish_pending(pc, errno.ETIMEDOUT)
            elif pc.session.listener.closed or not pc.session.listener.id_valid(pc.notif_id):
                self.pending.pop(pc.sock.fileno(), None)
                try:
                    self.ep.unregister(pc.sock.fileno())
                except (KeyError, ValueError, OSError):
                    pass
                pc.sock.close()

    # --- queries -------------------------------------------------------------

    def list_sockets(self) -> list[dict]:
        """Grafted sockets still open in their process (checked now via /proc),
        with their process id and current addresses."""
        self.drain_inbox()
        out = []
        for key, g in list(self.grafted.items()):
            pid = tgid(g.pid)
            if not socket_open(pid, g.fd, g.inode):
                del self.grafted[key]
                continue
            row = {f: getattr(g, f) for f in g.__slots__}
            row["pid"] = pid
            row["local"], peer = self._addresses(pid, g.fd)
            row["remote"] = g.remote or peer
            out.append(row)
        return out

    def _addresses(self, pid: int, fd: int) -> tuple[str, str]:
        try:
            pidfd = seccomp.pidfd_open(pid)
        except KernelError:
            return "", ""
        try:
            with ksock.adopt(seccomp.pidfd_getfd(pidfd, fd)) as s:
                local = _fmt(s.getsockname())
                try:
                    peer = _fmt(s.getpeername())
                except OSError:
                    peer = ""
                return local, peer
        except (KernelError, OSError):
            return "", ""
        finally:
            os.close(pidfd)

    def stats(self) -> dict:
        self.drain_inbox()
        kernel = None
        if self.bpf is not None:
            judged, denied, redirected, guarded = self.bpf.counters()
            kernel = {"connects_judged": judged, "denied": denied,
                      "redirected": redirected, "guard_refused": guarded,
                      "containers": len(self.enforcer.applied), "cgroup": self.bpf.cgroup}
        oci_stats = None if self.oci is None else {
            "accepted": self.oci.accepted, "rejected": self.oci.rejected,
            "holders": len(self.holders)}
        return {"counters": self.totals.as_dict(), "kernel": kernel,
                "kernel_error": self.bpf_error or None, "oci": oci_stats,
                "guarded": self.bpf is not None, "grafting": self.guarded,
                "audit_suppressed": self.audit.suppressed if self.audit else 0,
                "containers": [{"container": s.container, "pid": s.pid, "mark": s.mark,
                                "configured": s.config is not None, "graft_at": s.graft_at,
                                "notifier_threads": (self.notifiers[k].alive
                                                     if k in self.notifiers else 0),
                                **s.counters.as_dict()} for k, s in self.sessions.items()],
                "pending_connects": len(self.pending), "grafted_tracked": len(self.grafted)}


def _bound(sock: socket.socket) -> bool:
    """Has the socket a local address or port? (getsockname of a fresh socket
    is the wildcard with port 0)"""
    try:
        name = sock.getsockname()
    except OSError:
        return True
    return name[1] != 0 or name[0] not in ("0.0.0.0", "::")


def _fmt(addr) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def host_addresses() -> frozenset:
    """Addresses of the namespace the agent serves (refreshed on reload):
    one netlink dump, no subprocess."""
    import ipaddress
    from pyroute2 import IPRoute
    try:
        with IPRoute() as ipr:
            return frozenset(ipaddress.ip_address(a.get_attr("IFA_ADDRESS"))
                             for a in ipr.get_addr() if a.get_attr("IFA_ADDRESS"))
    except (OSError, ValueError) as exc:
        log.warning("cannot list host addresses: %s", exc)
        return frozenset()


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _writable(sock: socket.socket) -> bool:
    p = select.poll()
    p.register(sock.fileno(), select.POLLOUT)
    return bool(p.poll(0))


