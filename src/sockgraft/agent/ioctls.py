"""A trapped socket ioctl, answered from the caller's own network namespace
(model/ioctl.py says which commands and why).

  copy the caller's fd (pidfd_getfd) -> decide (family, CapEff) ->
  open the caller's netns, re-check the notification (the namespace was the
  caller's) -> the caller's socket if it lives there, else a socket of its
  family made there -> copy the argument in, ioctl, copy the answer out ->
  answer the errno

The kernel never runs a trapped command itself (no CONTINUE after looking at
the fd: another thread could swap a grafted socket in before it ran), so
every answer is the agent's, acting on its own copies: the fd it copied and
the argument bytes it read."""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket

from ..errors import KernelError, from_oserror
from ..kernel import sockioctl
from ..model import ioctl as mioctl
from . import procfs
from .sessions import Session

log = logging.getLogger("sockgraft.agent")


def answer(g, sess: Session, n) -> None:
    """Answer one trapped ioctl(fd, cmd, arg) of sess (g: the Grafter: its
    targets, listener, respond/continue_, inventory)."""
    cmd = n.args[1] & 0xFFFFFFFF
    if not mioctl.trapped(cmd):
        # an OCI profile traps the whole type: these act on the socket
        # itself, whichever socket the kernel finds at the fd
        g.continue_(sess, n.id)
        return
    fd, arg, tid = n.args[0] & 0xFFFFFFFF, n.args[2], n.pid
    sess.tids.add(tid)
    # the agent's copy (a TargetSocket: its close never waits for the
    # application's SO_LINGER under the loop lock); ENOTSOCK: no socket, an
    # O_PATH fd of a socket inode included
    got = g.targets.dup_socket(tid, fd)
    if got == errno.EBADF:
        g.respond(sess, n.id, error=errno.EBADF)
        return
    with contextlib.ExitStack() as owned:
        copy = None if isinstance(got, int) else owned.enter_context(got)
        family = None if copy is None else copy.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        nsfd = _open_ns(owned, tid, "net")
        userfd = _open_ns(owned, tid, "user")
        caps = procfs.caps_effective(tid)
        listener = g.listener_of(sess)
        if not listener.id_valid(n.id):
            return      # interrupted or gone: what was opened and read may not be its
        ns = os.fstat(nsfd).st_ino
        caps = mioctl.caps_over_netns(caps, os.fstat(userfd).st_ino,
                                      sockioctl.userns_owner(nsfd), _AGENT_USERNS)
        action = mioctl.decide(cmd, family, caps)
        if isinstance(action, mioctl.Refuse):
            _note(g, sess, action.why)
            g.respond(sess, n.id, error=action.errno)
            return
        # the caller's own socket when it lives there (the exact native
        # answer), else - a grafted, host socket - a socket of its family
        # the agent keeps in the caller's namespace
        if sockioctl.netns_inode(copy.fileno()) == ns:
            run_fd = copy.fileno()
        else:
            try:
                run_fd = _ns_socket(sess, nsfd, ns, family).fileno()
            except KernelError as exc:
                _note(g, sess, f"no socket of family {family} in its namespace: {exc}")
                g.respond(sess, n.id, error=exc.errno or errno.EIO)
                return
        still = lambda: listener.id_valid(n.id)     # noqa: E731
        # the kernel's checks judge the caller's capabilities, not the agent's
        keep = (caps or 0) & (1 << mioctl.CAP_NET_ADMIN)
        try:
            if cmd == mioctl.SIOCGIFCONF:
                err = _ifconf(g, tid, arg, keep, run_fd, still)
            else:
                data = bytearray(g.targets.read(tid, arg, action.size))
                if not still():
                    return      # the bytes read may not be the caller's
                with sockioctl.effective_caps(keep):
                    err = sockioctl.run(run_fd, cmd, data)
                if not err and not action.command.sets:
                    sockioctl.write_target(tid, arg, bytes(data), still)
        except KernelError as exc:
            if exc.errno != errno.EFAULT:
                raise
            err = errno.EFAULT      # the argument is not the caller's memory
        g.respond(sess, n.id, error=err)


_AGENT_USERNS = os.stat("/proc/self/ns/user").st_ino


def _open_ns(owned: contextlib.ExitStack, tid: int, kind: str) -> int:
    try:
        fd = os.open(f"/proc/{tid}/ns/{kind}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_oserror(f"open /proc/TID/ns/{kind}", exc, f"tid {tid}") from None
    owned.callback(os.close, fd)
    return fd


NS_SOCKETS = 4          # per session: its processes normally share one namespace


def _ns_socket(sess: Session, nsfd: int, ns: int, family: int) -> socket.socket:
    """The agent's socket of `family` in the namespace `ns` (open at nsfd)
    of one of sess's processes, made once (a thread enters the namespace)
    and kept with the session."""
    s = sess.ioctl_socks.get((ns, family))
    if s is None:
        s = sockioctl.socket_in(nsfd, family, sess.container)
        if len(sess.ioctl_socks) >= NS_SOCKETS:
            sess.ioctl_socks.pop(next(iter(sess.ioctl_socks))).close()
        sess.ioctl_socks[(ns, family)] = s
    return s


def _ifconf(g, tid: int, arg: int, keep: int, run_fd: int, still) -> int:
    """SIOCGIFCONF: struct ifconf {int ifc_len; char *ifc_buf}: with a NULL
    buffer the length the records need, else the records that fit."""
    head = g.targets.read(tid, arg, mioctl.IFCONF)
    want = int.from_bytes(head[0:4], "little", signed=True)
    buf = int.from_bytes(head[8:16], "little")
    length = mioctl.ifconf_length(want) if buf else 0
    with sockioctl.effective_caps(keep):
        err, total, records = sockioctl.ifconf(run_fd, length, bool(buf))
    if err:
        return err
    if records:
        sockioctl.write_target(tid, buf, records, still)
    sockioctl.write_target(tid, arg, total.to_bytes(4, "little", signed=True), still)
    return 0


def _note(g, sess: Session, why: str) -> None:
    """Say once per container and reason why an ioctl was refused."""
    if g.note_once(sess.container, "ioctl: " + why):
        log.info("%s: ioctl refused: %s", sess.container, why)
