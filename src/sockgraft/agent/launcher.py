"""`sockgraft run`: start a command in a container's network namespace under
the graft seccomp filter, hand the listener to the node agent, and hold it.

  parent (this process, host side)           child
  --------------------------------           -----
  connect to the agent (fail early)
  fork  ------------------------------------> setns(container netns)
                                              read the netns' socket buffer defaults
                                              install filter (NEW_LISTENER)
  <---------------- listener fd + defaults -- send over a socketpair
  register with the agent (listener fd)
  "go" -------------------------------------> exec CMD (the filter is inherited)
  hold the listener; forward signals; re-register if the agent restarts;
  exit with CMD's status once every filtered task is gone.

Holding the listener is what makes agent restarts safe: while a holder keeps
it open, trapped syscalls wait in the kernel queue instead of failing with
ENOSYS, and a new agent picks them up after re-registration.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import signal
import socket
import sys
import time

from ..errors import AgentError, KernelError
from ..kernel import links, netns, seccomp
from ..kernel import seccomp_filter
from ..model.graftconfig import GRAFT_AT
from . import control

log = logging.getLogger("sockgraft.run")

GO, ABORT = b"G", b"A"
REGISTER_TIMEOUT = 30.0


def _child(sp: socket.socket, ns_path: str | None, argv: list[str], trap_sendto: bool,
           graft_at: str, trap_splice: bool = False, trap_epoll: bool = False) -> None:
    """Runs in the forked child; never returns."""
    try:
        if ns_path:
            netns.enter(ns_path)
        facts = netns_facts()
        spec = (seccomp_filter.socket_graft_filter() if graft_at == "socket"
                else seccomp_filter.default_graft_filter(trap_sendto))
        if trap_splice:
            spec = seccomp_filter.with_splice(spec)
        if trap_epoll:
            spec = seccomp_filter.with_epoll(spec)
        prog = seccomp_filter.build_filter(spec)
        listener = seccomp.install_filter(prog, listener=True)
        socket.send_fds(sp, [json.dumps(facts).encode()], [listener])
        os.close(listener)
        if sp.recv(1) != GO:
            os._exit(125)
        sp.close()
        os.execvp(argv[0], argv)
    except OSError as exc:
        msg = f"sockgraft run: cannot execute {argv[0]!r}: {exc.strerror}\n"
        os.write(2, msg.encode())
        os._exit(127 if exc.errno == errno.ENOENT else 126)
    except BaseException as exc:  # noqa: BLE001
        os.write(2, f"sockgraft run: setup failed: {exc}\n".encode())
        os._exit(125)


def netns_facts() -> dict:
    """What the agent wants to know of the calling thread's network namespace:
    its socket buffer defaults (so unchanged ones are not pinned on the host
    socket) and its own addresses (what the directory publishes)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        buffers = {"sndbuf": probe.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
                   "rcvbuf": probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)}
    try:
        addresses = links.own_addresses()
    except Exception:   # noqa: BLE001 - the directory just will not know them
        addresses = []
    return {"buffers": buffers, "addresses": addresses}


def hold_oci(listener: int, info: dict) -> int:
    """`sockgraft oci-hold`: register a listener an OCI runtime handed to the
    agent, and hold it like `sockgraft run` does (agent restarts are safe)."""
    pid = int(info["pid"])
    try:
        facts = netns.run_in(f"/proc/{pid}/ns/net", netns_facts, timeout=10)
    except Exception as exc:  # noqa: BLE001 - the container may already be gone
        log.warning("container %s: cannot read its namespace: %s", info["container"], exc)
        facts = {"buffers": {}, "addresses": []}
    if info.get("cni_addresses"):
        # What CNI assigned wins over what the namespace shows: a process of
        # the pod with CAP_NET_ADMIN could add any address to its interface
        # (another pod's, a Service's), and a container's own addresses are
        # redirected to its grafted servers and granted as its sources.
        facts["addresses"] = list(info["cni_addresses"])
    hello = {**facts, "graft_at": info.get("graft_at", "syscall"),
             "inline_config": info.get("config"), "ports": info.get("cni_ports") or []}
    try:
        conn = _register(info["agent"], info["container"], pid, listener, hello)
    except (AgentError, OSError) as exc:
        log.warning("container %s: registration failed (%s); retrying", info["container"],
                    exc)
        conn = None
    return _hold(info["container"], pid, listener, conn, info["agent"], hello, child=False)


def _register(agent_path: str, container: str, pid: int, listener: int,
              hello: dict) -> socket.socket:
    """hello: what the child learned in the container's namespace (socket
    buffer defaults, its addresses) and the filter's graft_at."""
    # generous: a node starting a hundred containers at once queues their
    # registrations behind each other in the agent's single loop
    sock = control.connect(agent_path, timeout=REGISTER_TIMEOUT)
    control.send(sock, {"op": "register", "container": container, "pid": pid, **hello},
                 [listener])
    reply = control.recv_reply(sock)
    if not reply.get("ok"):
        sock.close()
        raise AgentError(f"the agent refused container {container}: {reply.get('error')}")
    sock.settimeout(None)
    return sock


def run(container: str, argv: list[str], *, ns_path: str | None, agent_path: str,
        trap_sendto: bool = False, graft_at: str = "syscall",
        ports: list[dict] | None = None) -> int:
    if graft_at not in GRAFT_AT:
        raise AgentError(f"graft_at {graft_at!r} unknown; accepted: {', '.join(GRAFT_AT)}")
    # Fail before anything starts if no agent answers. An agent that splices
    # local grafted pairs wants the container's splice() calls too (its
    # sockets are spliced only when every session of the container traps it).
    pong = control.request(agent_path, {"op": "ping"}, timeout=5)
    trap_splice = bool(pong.get("splice"))
    # an agent that knows epoll_create(1) learns of each new epoll instance
    # (its non-blocking connect grafts need them; socket mode has none)
    trap_epoll = bool(pong.get("epoll")) and graft_at != "socket"
    parent_sp, child_sp = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent_sp.close()
        _child(child_sp, ns_path, argv, trap_sendto, graft_at, trap_splice, trap_epoll)
    child_sp.close()
    listener = -1
    try:
        parent_sp.settimeout(10)
        msg, fds, _, _ = socket.recv_fds(parent_sp, 4096, 1)
        if len(fds) != 1:
            raise KernelError("seccomp listener hand-over", errno.EPROTO,
                              "the child sent no listener (see its message above)")
        listener = fds[0]
        got = json.loads(msg or b"{}")
        hello = {"buffers": got.get("buffers", {}), "addresses": got.get("addresses", []),
                 "graft_at": graft_at, "ports": ports or [], "traps_splice": trap_splice}
        conn = _register(agent_path, container, pid, listener, hello)
        parent_sp.send(GO)
    except BaseException:
        try:
            parent_sp.send(ABORT)
        except OSError:
            pass
        _reap(pid)
        if listener >= 0:
            os.close(listener)
        raise
    finally:
        parent_sp.close()
    return _hold(container, pid, listener, conn, agent_path, hello)


def _reap(pid: int) -> int:
    try:
        _, status = os.waitpid(pid, 0)
    except ChildProcessError:
        return 0
    return os.waitstatus_to_exitcode(status)


def _hold(container: str, pid: int, listener: int, conn: socket.socket | None,
          agent_path: str, hello: dict, child: bool = True) -> int:
    if child:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT):
            signal.signal(sig, lambda s, _f: _forward(pid, s))
    code: int | None = None
    poller = select.poll()
    poller.register(listener, select.POLLIN)   # POLLHUP: every filtered task is gone
    next_retry = 0.0
    while True:
        if code is None and child:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
        hup = any(ev & select.POLLHUP for _, ev in poller.poll(0))
        if hup and (code is not None or not child):
            break
        if conn is None and time.monotonic() >= next_retry:
            try:
                conn = _register(agent_path, container, pid, listener, hello)
                log.warning("re-registered %s with the restarted agent", container)
            except (AgentError, OSError):
                next_retry = time.monotonic() + 0.2
        waits = [conn] if conn is not None else []
        try:
            ready, _, _ = select.select(waits, [], [], 0.05)
        except InterruptedError:
            continue
        if ready:
            try:
                data = conn.recv(4096)
            except OSError:
                data = b""
            if not data:
                conn.close()
                conn = None      # the agent went away: keep holding, re-register
                print("sockgraft run: lost the agent; holding the listener until it is back",
                      file=sys.stderr)
    if conn is not None:
        conn.close()
    os.close(listener)
    return code if code is not None else 0


def _forward(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass
