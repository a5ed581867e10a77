"""The node agent: services seccomp notifications of registered containers.

One thread, one epoll, for every decision. Sources: the control socket
(registrations, reloads, queries), the OCI socket (runtime hand-offs), one
seccomp listener per registered process tree, host sockets whose
non-blocking connect is in flight for a blocked application thread, the
cgroup programs' event ring buffer, and the directory backend's wake-up pipe
(its worker thread does the directory's network I/O and nothing else).

Each notification goes to the grafter (agent/grafter.py); docs/architecture.md
("The agent, file by file") walks one through.

Never switches namespaces: it lives in the host namespace it was started in
(`sockgraft agent --netns` enters it before anything else runs).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import select
import signal
import socket
import threading
import time
from contextlib import nullcontext

from ..errors import AgentError, KernelError, NotFound, SockgraftError
from ..kernel import bpf as kbpf
from ..kernel import links, seccomp
from ..kernel import sockets as ksock
from ..model import bpfmaps, graft, redirect
from ..model.graftconfig import GRAFT_AT, load_config
from . import control, notifiers, oci
from .audit import AuditLog
from .directory import Backend as DirectoryBackend
from .enforce import Enforcer
from .fastpath import FastPath
from .grafter import Grafter
from .inventory import Inventory
from .loop import Closer, listen_unix, unregister
from .procfs import host_addresses, malloc_trim
from .publisher import Publisher
from .sessions import Session, SessionTable
from .store import ConfigStore
from .targets import Targets

log = logging.getLogger("sockgraft.agent")


def _locked(method):
    """Run an Agent method holding its loop lock (re-entrant): notifier
    threads answer calls under the same lock (Agent.serve_notification)."""
    @functools.wraps(method)
    def run(self, *args, **kw):
        with self.lock:
            return method(self, *args, **kw)
    return run

MAX_CLIENTS = 256
STOP_WAIT = 5.0          # s an agent stop waits for its notifier threads to answer


class Agent:
    def __init__(self, socket_path: str, store: ConfigStore, *, name: str = "default",
                 audit_path: str | None = None, manage_nft: bool = True,
                 bpf: str = "off", bpf_name: str | None = None,
                 directory: DirectoryBackend | None = None, node: str | None = None,
                 oci_socket: str | None = None, annotations: str = "trust",
                 notifier_threads: int = 2,
                 metrics: str | None = None, native: str = "auto",
                 sockmap: str = "off", fastpath: str = "off", lab: str | None = None,
                 state_dir: str | None = None,
                 flows_per_container: int = kbpf.FLOWS_PER_CONTAINER) -> None:
        """metrics: ADDR:PORT to serve Prometheus metrics on (agent/metrics.py).
        sockmap: splice grafted local pairs (auto = when the kernel can).
        fastpath: the tc programs on the containers' interfaces (policy in
        the data path, local pairs forwarded directly); flows_per_container:
        the size of each policed container's flow cache; lab: the lab whose
        host this agent serves (its containers' namespaces are named
        sg-<lab>-<container>); state_dir: where CNI registrations are."""
        if bpf not in ("auto", "on", "off"):
            raise AgentError(f"bpf mode {bpf!r} unknown; accepted: auto, on, off")
        if sockmap not in ("auto", "on", "off"):
            raise AgentError(f"sockmap mode {sockmap!r} unknown; accepted: auto, on, off")
        if sockmap == "on" and bpf == "off":
            raise AgentError("--sockmap on needs the in-kernel programs (--bpf auto or on)")
        if fastpath not in ("auto", "on", "off"):
            raise AgentError(f"fastpath mode {fastpath!r} unknown; accepted: auto, on, off")
        if fastpath == "on" and bpf == "off":
            raise AgentError("--fastpath on needs the in-kernel programs (--bpf auto or on)")
        self.sockmap_mode = sockmap
        self.fastpath_mode = fastpath
        if not 64 <= flows_per_container <= 1 << 20:
            raise AgentError(f"flows per container must be 64..{1 << 20}, "
                             f"got {flows_per_container}")
        self.flows_per_container = flows_per_container
        self.lab = lab
        self.state_dir = state_dir
        self.fast: FastPath | None = None
        if not 0 <= notifier_threads <= 16:
            raise AgentError(f"notifier threads must be 0..16, got {notifier_threads}")
        self.notifier_threads = notifier_threads
        self.native = notifiers.choose_native(native)    # socket() answered in C or Python
        self.inbox = notifiers.Inbox()
        self.name = name
        self.bpf_mode = bpf
        self.bpf_name = bpf_name or name
        self.enforcer = Enforcer(store, manage_nft)
        self.bpf_error = "disabled (--bpf off)" if bpf == "off" else ""
        self._bpf_events_fd = -1
        self.directory = directory
        self.node = node or name
        self.inventory = Inventory()
        self.publisher = Publisher(directory, self.node, self.inventory.write_audit,
                                   self._node_facts)
        self.publisher.on_servers = self._servers_changed
        self.oci_socket = oci_socket
        if annotations not in ("trust", "ignore"):
            raise AgentError(f"annotations must be trust or ignore, got {annotations!r}")
        self.annotations = annotations      # a config in OCI annotations: taken or refused
        self.oci: oci.OciServer | None = None
        self.holders: list = []
        self.socket_path = socket_path
        self.store = store
        self.audit_path = audit_path
        self.ep = select.epoll()
        self.sessions = SessionTable()                  # listener fd -> session
        self.targets = Targets()                        # per trapped thread: pidfd, memory
        self.sockets = ksock.HostSockets()      # tagged once the guards are loaded
        self.grafter = Grafter(self.inventory, self.targets, self.sockets, self.enforcer,
                               self.publisher, self.ep, bpf)
        self.server: control.Server | None = None
        self._stop = False
        # The loop's state (sessions, inventory, pending connects, targets) has
        # one owner at a time: the loop while it handles a turn, or a notifier
        # thread answering a call of its listener (serve_notification).
        self.lock = threading.RLock()
        self._in_notifier = threading.local()   # .serving: a notifier thread's call
        self.grafter.waiting_for_target = self._outside_lock
        self.grafter.listener_of = self._listener_of
        # (the wake signal's handler: installed with the notifier threads'
        # when the agent starts in the main thread; else never sent)
        self.closer = Closer(wake=notifiers.WAKE_SIGNAL if notifiers.install_wake_handler()
                             else None)
        ksock.TargetSocket.around_close = self._close_outside_lock
        self._nft_due = False                   # reconcile nftables at the end of the turn
        self._deferred: list[tuple[socket.socket, dict]] = []   # register replies
        self._starting: list[int] = []          # registered listeners not served yet
        self.metrics_listen = metrics
        self.metrics = None                     # agent/metrics.Metrics once started
        self.socket_refusal: str | None = None  # the node cannot do socket mode: why
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
        self.inventory.audit = AuditLog(self.audit_path, self.name)
        if self.metrics_listen:
            from .metrics import Metrics
            self.metrics = Metrics.start(self.metrics_listen, self.grafter)
        self.grafter.reregistrar.warm()
        self.grafter.host_addrs = host_addresses()
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
            progs.load(splice=self.sockmap_mode, fastpath=self.fastpath_mode)
            self.bpf = progs
            self.sockets.tag = progs.tag
            self.sync_bpf()
            progs.set_local(bpfmaps.local_keys(self.grafter.host_addrs))
            progs.attach()
            progs.set_splice(progs.splice)
            if progs.splice:
                log.info("grafted local pairs are spliced (sockmap)")
            if progs.fast:
                from ..paths import state_dir
                self.fast = FastPath(self.lab, self.state_dir or state_dir(),
                                     self.flows_per_container)
                progs.set_fast(True)
                self.sync_fast(wait=True)    # maps first, then the links (swapped in)
                if self.fast.fileno() >= 0:
                    self.ep.register(self.fast.fileno(), select.EPOLLIN)
                self.ep.register(self.fast.reader.fileno(), select.EPOLLIN)
                log.info("packet fast path on %d container interfaces",
                         len(self.fast.attached))
        except SockgraftError as exc:
            if self.fast is not None:
                self.fast.close()
                self.fast = None
            progs.close()
            self.bpf = None
            self.sockets.tag = None
            self.enforcer.reset_bpf()
            self.bpf_error = str(exc)
            if self.bpf_mode == "on" or self.sockmap_mode == "on" or \
                    self.fastpath_mode == "on":
                raise
            log.warning("in-kernel graft programs unavailable (graft_at=socket refused): %s",
                        exc)
            return
        self._bpf_events_fd = progs.events_fd()
        self.ep.register(self._bpf_events_fd, select.EPOLLIN)

    def stop(self) -> None:
        self._stop = True

    def close(self) -> None:
        self._stop = True           # notifier threads let what they receive go on
        # Every notifier thread stops and is waited for before anything
        # closes: a call it received must be answered before the process
        # ends (the kernel hands a notification out once - not again to the
        # next agent: unanswered, the application's thread waits for good).
        # A call it answers outside the lock (ADDFD waits for its target to
        # run) finishes through the thread's own listener. Bounded: a target
        # that never runs keeps its call past STOP_WAIT (logged).
        with self.lock:
            threads = self.sessions.all_threads()
        for t in threads:
            t.stop(timeout=0)
        deadline = time.monotonic() + STOP_WAIT
        for t in threads:
            t.join(deadline)
        self._close()

    @_locked
    def _close(self) -> None:
        self.grafter.close()
        for fd in self.sessions.keys():
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
        if self.fast is not None:
            if self.fast.fileno() >= 0:
                unregister(self.ep, self.fast.fileno())
            unregister(self.ep, self.fast.reader.fileno())
            self.fast.close()   # its pinned links stay: the data path keeps its policy
            self.fast = None
        if self.bpf is not None:
            if self._bpf_events_fd >= 0:
                unregister(self.ep, self._bpf_events_fd)
            self.bpf.close()     # the pinned links stay: grafted sockets stay judged
            self.bpf = None
        self.inbox.close()
        self.targets.close()
        if self.metrics is not None:
            self.metrics.close()
        self.ep.close()
        if self.inventory.audit is not None:
            self.inventory.audit.close()

    def serve_forever(self) -> None:
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        next_sweep = time.monotonic() + 1.0
        while not self._stop:
            try:
                events = self.ep.poll(0.5)
            except InterruptedError:
                continue
            with self.lock:
                for fd, ev in events:
                    self.dispatch(fd, ev)
                if self.inbox.waiting():
                    self.drain_inbox()
                self.end_turn()
                now = time.monotonic()
                if now >= next_sweep:
                    self.sweep(now)
                    next_sweep = now + 1.0

    def serve_notification(self, key: int, n: seccomp.Notification,
                           listener: seccomp.Listener) -> bool:
        """A notifier thread's call that is not a socket() it answers itself
        (connect, bind, listen, sendto): answered in that thread, which the
        kernel woke on the trapping task's CPU, under the loop's lock - no
        second wake-up of the loop per call - and through the thread's own
        `listener` (open until the thread has answered, whatever the loop
        closes meanwhile). False: the session is gone or the agent is
        stopping; the thread lets the call go on (notifiers.Notifiers._other)."""
        with self.lock:
            if self._stop:
                return False
            sess = self.sessions.get(key)
            if sess is None:
                return False
            self._in_notifier.serving = True
            self._in_notifier.listener = listener
            try:
                self.grafter.handle(sess, n)
            finally:
                self._in_notifier.serving = False
                self._in_notifier.listener = None
            if self._nft_due or self._deferred or (self.fast is not None and self.fast.due):
                # e.g. a grafted server's redirects: the loop loads them now,
                # not at its next timeout
                self.inbox.wake()
            return True

    @contextlib.contextmanager
    def _outside_lock(self):
        """Around a call a container can make slow: ADDFD (it completes when
        the target has run) and a connect() of a socket whose blocking mode
        the application shares. A notifier thread makes it without the
        loop's lock, so a container whose tasks are slow to be scheduled
        (its own SCHED_IDLE threads, a tight CPU quota), or that flips its
        socket to blocking, slows its own calls only, not every container's.
        The thread answers through its own listener (Grafter.listener_of):
        the loop may drop the session meanwhile, the call is still answered.
        The loop's own calls (threads off) keep the lock."""
        if not getattr(self._in_notifier, "serving", False):
            yield
            return
        state = self.lock._release_save()          # (every level of the RLock)
        try:
            yield
        finally:
            self.lock._acquire_restore(state)

    def _listener_of(self, sess: Session) -> seccomp.Listener:
        """A notifier thread answers through its own listener, the loop
        through the session's."""
        return getattr(self._in_notifier, "listener", None) or sess.listener

    def _close_outside_lock(self, sock: ksock.TargetSocket, close) -> None:
        """Close the agent's copy of a target's socket: were it the last
        reference (the application closed its fd meanwhile), close() waits
        for the application's SO_LINGER - in a notifier thread, without the
        loop's lock (the wait is then its own container's only); in the loop,
        a socket that may linger goes to a closer thread (the loop never
        waits for a container's linger)."""
        if getattr(self._in_notifier, "serving", False):
            with self._outside_lock():
                close()
        elif ksock.may_linger(sock):
            self.closer.close(sock.detach())
        else:
            close()

    @_locked
    def end_turn(self) -> None:
        """Once per loop turn: one nftables reload for every registration of
        the turn (not one per container: quadratic when many start at once),
        then the new listeners are served and the registrations answered.
        Nothing of a container is answered before the kernel enforces its
        policy: a socket() answered earlier would send its first packets
        into a table without the container's chain (dropped)."""
        if self._nft_due:
            self._nft_due = False
            try:
                self.sync_nft()
            except SockgraftError as exc:
                log.error("nftables: %s", exc)
                for key in self._starting:
                    if key in self.sessions:
                        self._drop_session(key)
                self._starting.clear()
                for conn, _reply in self._deferred:
                    control.reply(conn, {"ok": False, "error": f"nftables: {exc}"})
                self._deferred.clear()
        starting, self._starting = self._starting, []
        for key in starting:
            self._serve(key)
        deferred, self._deferred = self._deferred, []
        for conn, reply in deferred:
            control.reply(conn, reply)
        if self.fast is not None and self.fast.due:
            self.sync_fast(links=self.fast.due_links, overlay=self.fast.due_overlay)

    @_locked
    def dispatch(self, fd: int, ev: int) -> None:
        if fd in self.sessions:
            self._on_listener(fd, ev)
        elif self.grafter.connects.owns(fd):
            self.grafter.connects.ready(fd)
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
        elif self.fast is not None and fd == self.fast.fileno():
            self.fast.on_netlink()
        elif self.fast is not None and fd == self.fast.reader.fileno():
            self._fast_call(self.fast.on_overlay_read, self.bpf)

    # --- control connections -------------------------------------------------

    def _handle_request(self, conn: socket.socket, msg: dict, fds: list[int]) -> None:
        """The op table. Owns `fds`: closes what is left of them, once."""
        op = msg.get("op")
        try:
            if op == "register":
                key = self._register(conn, msg, fds)       # takes the fd it keeps
                # answered at the end of the turn, once nftables knows it
                self._deferred.append((conn, {"ok": True, "mark": self.sessions[key].mark}))
                return
            elif op == "reload":
                reply = self._reload(msg.get("container"))
            elif op == "sockets":
                reply = {"ok": True, "sockets": self.list_sockets()}
            elif op == "stats":
                reply = {"ok": True, **self.stats()}
            elif op == "services":
                reply = {"ok": True, **self.publisher.listing()}
            elif op == "native":       # for sessions served from now on (bench engine)
                self.native = notifiers.choose_native("on" if msg.get("on") else "off")
                reply = {"ok": True, "native": self.native}
            elif op == "sockmap":      # connections established from now on (bench)
                if self.bpf is None or not self.bpf.splice:
                    raise AgentError("splicing is not loaded (start the agent with "
                                     "--sockmap auto or on)")
                self.bpf.set_splice(bool(msg.get("on")))
                reply = {"ok": True, "sockmap": bool(msg.get("on"))}
            elif op == "fastpath":
                if self.fast is None or self.bpf is None:
                    raise AgentError("the packet fast path is not loaded (start the agent "
                                     "with --fastpath auto or on)")
                if "on" in msg:        # programs on / off every container interface
                    self.fast.set_enabled(self.bpf, bool(msg["on"]), self._marks())
                reply = {"ok": True, **self.fast.listing(self.bpf)}
            elif op == "ping":
                reply = {"ok": True, "pid": os.getpid(), "name": self.name,
                         "store": os.path.abspath(self.store.dir),
                         "splice": self.bpf is not None and self.bpf.splice,
                         "epoll": True}
            else:
                reply = {"ok": False, "error": f"unknown op {op!r}"}
        except SockgraftError as exc:
            log.warning("control: %s failed: %s", op, exc)
            reply = {"ok": False, "error": str(exc)}
        finally:
            for fd in fds:
                os.close(fd)
        control.reply(conn, reply)

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
        if graft_at == "socket" and self.socket_refusal:     # the doctor's words
            raise AgentError(f"container {container}: {self.socket_refusal}")
        if graft_at == "socket" and self.bpf is None:
            raise AgentError(f"container {container}: graft_at=socket needs the in-kernel "
                             f"graft programs, which are unavailable: {self.bpf_error}")
        inline = None
        if msg.get("inline_config") and self.annotations == "ignore":
            # a holder started before the agent was told to ignore them
            log.warning("container %s: its annotations' configuration ignored "
                        "(--annotations ignore)", container)
        elif msg.get("inline_config"):
            inline = load_config(str(msg["inline_config"]), f"annotations of {container}")
            if inline.container != container:
                raise AgentError(f"inline config is for {inline.container}, not {container}")
        ports = redirect.parse_ports(msg.get("ports"), f"ports of {container}")
        cfg = self.store.load(container) or inline
        mark = self.store.mark(container, in_use=self.sessions.holds)
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
                       graft_at=graft_at, addresses=tuple(addresses[:64]), inline=inline,
                       ports=ports, traps_splice=msg.get("traps_splice") is True)
        key = listener.fileno()
        first_of_mark = not self.sessions.holds(mark)
        self.sessions.add(key, sess)
        try:
            self.publisher.publish_node()
            # the kernel maps first: a socket answered by a notifier thread may
            # connect at once, and a tagged socket of an unknown container is
            # refused; nftables once per loop turn, before the reply (end_turn)
            self._nft_due = True
            self.sync_bpf()
            if graft_at == "socket" and first_of_mark:
                # its private IPv6 loopback (the IPv4 one is in 127.0.0.0/8)
                links.set_loopback_address(graft.private_loopback(mark)[1], True)
        except SockgraftError:
            self.sessions.pop(key)          # roll back: nothing half-registered
            listener.close()
            self.publisher.publish_node()
            raise
        self._starting.append(key)          # served at the end of the turn (end_turn)
        log.info("registered container %s pid %d (mark %#x, %s)", container, pid, mark,
                 "configured" if cfg else "no graft config: everything passes through")
        return key

    def _serve(self, key: int) -> None:
        """Start receiving a registered listener's notifications: its notifier
        threads (socket mode) or the loop's epoll."""
        sess = self.sessions.get(key)
        if sess is None:
            return
        threads = None
        if self.notifier_threads:
            try:
                threads = notifiers.Notifiers(
                    key, sess.mark, sess.container, self.inbox, threads=self.notifier_threads,
                    enabled=lambda: self.grafter.grafts_sockets(sess), sockets=self.sockets,
                    native_loop=self.native, serve=self.serve_notification,
                    connects=lambda: self.native_connect(sess),
                    splice_map=lambda: self._splice_map(sess))
            except SockgraftError as exc:
                log.warning("%s: calls answered from the loop only: %s", sess.container, exc)
        if threads is not None:
            # the threads receive every notification; the loop only hears
            # that the last filtered task exited (EPOLLHUP is always reported)
            self.sessions.set_threads(key, threads)
            sess.native_table = threads.table     # (notes the session's epoll_creates)
            self.ep.register(key, 0)
        else:
            self.ep.register(key, select.EPOLLIN)

    def _reload(self, container: str | None) -> dict:
        n = 0
        for sess in self.sessions.values():
            if container is None or sess.container == container:
                sess.config = self.store.load(sess.container) or sess.inline
                n += 1
        # the in-kernel judges first (a policy change takes effect at the
        # next connect and packet), then the node's addresses (one dump of
        # every interface's, ~20 ms with 200 containers), the fast path's
        # interfaces (from the link table the events keep: a CNI ADD's veth
        # came just before; its addresses are read from its namespace) and
        # the nftables table (loaded only if a registered container's chain
        # changed). Nothing here reads every link or the overlay's tables:
        # the next reload must not wait behind this one.
        self.sync_bpf(rescan=container if isinstance(container, str) and container else True)
        self.grafter.host_addrs = host_addresses()
        if self.bpf is not None:
            self.bpf.set_local(bpfmaps.local_keys(self.grafter.host_addrs))
        self.publisher.publish_node()
        if self.fast is not None:
            self.fast.drain_netlink()
        self.sync_fast(full=True, links=False, overlay=False)
        self.sync_nft()
        return {"ok": True, "reloaded": n}

    # --- enforcement (agent/enforce.py) and the in-kernel programs -------------

    @property
    def bpf(self) -> kbpf.Programs | None:
        return self.enforcer.bpf

    @bpf.setter
    def bpf(self, progs: kbpf.Programs | None) -> None:
        self.enforcer.bpf = progs

    def sync_nft(self) -> None:
        with self._timed("nftables"):
            self.enforcer.sync_nft(self.sessions.values(), self.publisher.services,
                                   self.publisher.servers.values())
        if self.fast is not None and self.fast.redirect_set != self.enforcer.redirects:
            self.fast.due_plan = True   # a grafted server's DNAT: around it no more

    def _servers_changed(self) -> None:
        """A grafted server came or went: its redirects, at the end of the turn."""
        self._nft_due = True

    def sync_bpf(self, rescan: bool | str = False) -> None:
        with self._timed("bpf"):
            self.enforcer.sync_bpf(self.sessions.values(), self.publisher.services,
                                   self.sessions.holds, rescan,
                                   before_retire=self.sessions.refresh_native)
        self.sessions.refresh_native()       # the native loops take what is now in force
        if self.fast is not None and self.fast.marks != self._marks():
            self.fast.due_plan = True        # a container's policy mark is new: end of turn

    def _marks(self) -> dict[str, int]:
        """container -> the mark of its policy entry in sg_policy."""
        return {a.cfg.container: mark for mark, a in self.enforcer.applied.items()}

    def sync_fast(self, full: bool = False, links: bool = True, overlay: bool = True,
                  wait: bool = False) -> None:
        """The fast path's maps and links in step with the node (links: the
        interfaces again; overlay: the VXLAN devices' tables, read by a
        thread unless wait); full (a reload: CNI ADD/DEL, a configuration
        edit): interfaces without addresses are read again too."""
        if self.fast is None or self.bpf is None or not self.fast.enabled:
            return
        self._fast_call(self.fast.reconcile, self.bpf, self._marks(), full=full,
                        redirects=self.enforcer.redirects, links=links, overlay=overlay,
                        wait=wait)

    def _fast_call(self, fn, *args, **kw) -> None:
        try:
            with self._timed("fastpath"):
                fn(*args, **kw)
        except SockgraftError as exc:
            log.warning("fastpath: %s", exc)

    def _timed(self, what: str):
        return self.metrics.timer(what) if self.metrics is not None else nullcontext()

    def _sync_bpf_services(self) -> None:
        self.enforcer.sync_bpf_services(self.publisher.services)
        self.sessions.refresh_native()     # a directory redirect is followed in Python

    def _splice_map(self, sess: Session) -> int:
        """sg_splice's fd for the native loop of a session that traps
        splice() (it continues every splice not out of a spliced socket), -1."""
        if not sess.traps_splice or self.bpf is None or not self.bpf.splice:
            return -1
        return self.bpf.maps["sg_splice"]

    def native_connect(self, sess: Session) -> dict | None:
        """What the native loop needs to graft this syscall-mode session's
        blocking connect()s itself (its egress rules in the kernel maps under
        the generation in force; the kernel guard judges each connect), or
        None: the grafter answers them. Python keeps them whenever the kernel
        maps are not the session's configuration; the native loop hands it
        each connect to a directory service too (sg_services: the agent
        follows the redirect itself)."""
        if sess.graft_at != "syscall" or sess.config is None or self.bpf is None:
            return None
        applied = self.enforcer.applied.get(sess.mark)
        if applied is None or applied.cfg != sess.config:
            return None
        return {"eg4_fd": self.bpf.maps["sg_egress4"], "eg6_fd": self.bpf.maps["sg_egress6"],
                "svc_fd": self.bpf.maps["sg_services"],
                "egress_gen": applied.gen, "sndbuf": sess.buffers.get(ksock.SO_SNDBUF, 0),
                "rcvbuf": sess.buffers.get(ksock.SO_RCVBUF, 0)}

    def _on_bpf_events(self) -> None:
        """Denials the programs made in the kernel: count them, audit them."""
        assert self.bpf is not None
        leaving = False
        for raw in self.bpf.drain():
            if int.from_bytes(raw[:4], "little") == bpfmaps.EV_SPLICE_LEAVE:
                leaving = True          # not a denial: a socket to unsplice
                continue
            try:
                ev = bpfmaps.decode_event(raw)
            except ValueError as exc:
                log.warning("bpf: bad event: %s", exc)
                continue
            container, rule = self.enforcer.explain(ev)
            # the metrics' label: a rule name, never an address or a mark
            label = rule if ev.kind == bpfmaps.EV_DENY_POLICY else ev.reason
            self.inventory.deny(self.sessions.by_mark(ev.mark), ev.op, label, "kernel")
            self.inventory.write_audit(container, ev.pid, ev.op, ev.address, "deny", rule,
                                       ev.errno, where="kernel")
        if leaving:
            self.bpf.release_leavers()

    @_locked
    def drain_inbox(self) -> None:
        """Take over what the notifier threads handed over: count and list
        the sockets they answered, handle the notifications they forwarded."""
        for key, item in self.inbox.drain():
            sess = self.sessions.get(key)
            if isinstance(item, int):
                if sess is not None:
                    self.inventory.socket_answered(sess, item)
            elif isinstance(item, notifiers.ThreadFailed):
                if sess is not None:
                    self.sessions.takeover(key, self.ep, self.inventory, item)
            elif sess is not None:
                self.grafter.handle(sess, item)
            else:
                log.warning("notification %#x of a dropped session left unanswered", item.id)
        self.sessions.harvest(self.inventory)      # what the native loops answered

    # --- OCI runtimes --------------------------------------------------------

    def _on_handoff(self, h, listener: int) -> None:
        holder = oci.start_holder(self.socket_path, self.store, h, listener,
                                  self.inventory.write_audit,
                                  trust_annotations=self.annotations == "trust")
        if holder is not None:
            self.holders.append(holder)

    # --- the cluster directory (overlay bypass) -------------------------------

    def _node_facts(self) -> tuple:
        """The node document's inputs: host addresses, containers' addresses."""
        hosts = [a for a in self.grafter.host_addrs if a not in graft.LOOPBACK6_NET]
        return hosts, [a for sess in self.sessions.values() for a in sess.addresses]

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
                self.grafter.handle(sess, n)
                return
        if ev & (select.EPOLLHUP | select.EPOLLERR):
            log.info("container %s pid %d: every filtered task exited", sess.container,
                     sess.pid)
            self._drop_session(fd, exited=True)

    def _drop_session(self, fd: int, exited: bool = False) -> None:
        """exited: every filtered task of the session exited (not the
        agent stopping, nor a registration rolled back - a holder registers
        again with the same mark, which its container's sockets carry)."""
        threads = self.sessions.threads_of(fd)
        if threads is not None:
            threads.stop(timeout=0)     # woken, not waited for: each closes its own fd
            self.drain_inbox()       # answer what they forwarded while the listener is open
        sess, _ = self.sessions.pop(fd)
        unregister(self.ep, fd)
        if sess.graft_at == "socket" and not self.sessions.holds(sess.mark):
            try:
                links.set_loopback_address(graft.private_loopback(sess.mark)[1], False)
            except SockgraftError as exc:
                log.warning("%s: %s", sess.container, exc)
        sess.listener.close()
        for s in sess.ioctl_socks.values():
            s.close()
        sess.ioctl_socks.clear()
        self.publisher.publish_node()
        for tid in sess.tids:
            self.targets.forget(tid)
        self.inventory.forget_exited(sess.container)
        if exited and not any(s.container == sess.container for s in self.sessions.values()):
            try:
                if self.store.release_unconfigured(sess.container):
                    log.info("container %s: its mark is free again (no stored "
                             "configuration)", sess.container)
            except (SockgraftError, OSError) as exc:
                log.warning("%s: mark not released: %s", sess.container, exc)
        self.publisher.sweep()
        self._trim_due = True

    @_locked
    def sweep(self, now: float) -> None:
        """Expire connects whose application thread gave up or that time out;
        close cached pidfds and memory fds of threads that exited; cut short
        closes that linger."""
        self.closer.sweep(now)
        if self._trim_due and not self.grafter.connects.pending:
            # Containers went away: hand the memory their records used back to
            # the system (CPython and malloc keep freed memory otherwise).
            self._trim_due = False
            try:
                self.sync_nft()       # drop the chains of containers that are gone
            except SockgraftError as exc:
                log.warning("nftables: %s", exc)
            self.inventory.compact()
            gc.collect()
            malloc_trim()
        for sess in self.sessions.values():
            sess.tids.difference_update(self.targets.exited(sess.tids))
        self.inventory.prune()
        self.publisher.sweep()
        if self.inventory.audit is not None:
            self.inventory.audit.flush()
        if self.oci is not None:
            self.oci.sweep(now)
        self.holders = [p for p in self.holders if p.poll() is None]
        if self.bpf is not None and self.bpf.splice:
            # leave requests whose event was lost (a full ring buffer): taken
            # out within a second, not at the next event
            self.bpf.release_leavers()
        self.grafter.connects.expire(now)
        scope = self.fast.sweep_scope(now) if self.fast is not None else None
        if scope is not None:
            links, overlay, full = scope
            self.sync_fast(full=full, links=links, overlay=overlay)
        if self.metrics is not None:
            self.metrics.publish({**self.stats(splice=False),
                                  "denials": dict(self.inventory.denials),
                                  "directory": self.publisher.listing()})

    # --- queries -------------------------------------------------------------

    def list_sockets(self) -> list[dict]:
        self.drain_inbox()
        return self.inventory.list_sockets(self.sessions.natively_served())

    def stats(self, splice: bool = True) -> dict:
        """splice: read the splice counters and count the sockhash (map
        scans; the metrics snapshot, every second, does without)."""
        self.drain_inbox()
        kernel = None
        spliced: dict[int, tuple] = {}
        if self.bpf is not None:
            judged, denied, redirected, guarded = self.bpf.counters()
            kernel = {"connects_judged": judged, "denied": denied,
                      "redirected": redirected, "guard_refused": guarded,
                      "containers": len(self.enforcer.applied), "cgroup": self.bpf.cgroup,
                      "splice": self.bpf.splice, "splice_error": self.bpf.splice_error or None,
                      "fastpath": self.fast is not None and self.fast.enabled,
                      "fastpath_error": self.bpf.fast_error or None}
            if self.bpf.splice and splice:
                spliced = self.bpf.splice_stats()
                kernel["spliced_sockets"] = self.bpf.spliced_sockets()   # now
                for i, what in enumerate(kbpf.SPLICE_STATS):
                    kernel[f"splice_{what}"] = sum(v[i] for v in spliced.values())
        oci_stats = None if self.oci is None else {
            "accepted": self.oci.accepted, "rejected": self.oci.rejected,
            "holders": len(self.holders)}
        return {"counters": self.inventory.totals.as_dict(), "kernel": kernel,
                "kernel_error": self.bpf_error or None, "oci": oci_stats,
                "guarded": self.bpf is not None, "grafting": self.grafter.guarded,
                "audit_suppressed": (self.inventory.audit.suppressed
                                     if self.inventory.audit else 0),
                "containers": [{"container": s.container, "pid": s.pid, "mark": s.mark,
                                "configured": s.config is not None, "graft_at": s.graft_at,
                                "notifier_threads": self.sessions.threads_alive(k),
                                "native": self.sessions.native(k),
                                **_splice_row(spliced.get(s.mark)),
                                **s.counters.as_dict()} for k, s in self.sessions.items()],
                "pending_connects": len(self.grafter.connects.pending),
                "grafted_tracked": len(self.inventory.grafted)}


def _splice_row(st: tuple | None) -> dict:
    """A container's splice counters for `stats` (empty when nothing was)."""
    if not st:
        return {}
    return {"spliced": dict(zip(kbpf.SPLICE_STATS, st))}
