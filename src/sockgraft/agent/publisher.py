"""The agent's side of the cluster directory: what this node publishes (its
node document, a record per grafted server bound through an ingress rule)
and the service table it reads back (the records other agents published,
as model/directory.admit let them through), which the grafter and the
enforcement reconcilers use.

Also keeps every grafted server of this node, directory or not (`servers`):
the redirects from their container addresses and published ports
(model/redirect.py) are made from it.

Owns: the published records, their withdrawal when the socket closes, the
node document, the audit of refused records, and withdrawing our own record
when the directory says another container holds its key. Must not: decide
who may follow which record (model/graft.followable) or touch nftables/BPF.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
from typing import Callable, Iterable

from ..model import directory as mdir
from ..model import redirect
from ..model.sockaddr import InetAddr
from .directory import Backend
from .procfs import socket_open, tgid

log = logging.getLogger("sockgraft.agent")

# (container, pid, syscall, address, verdict, rule): the agent's audit trail
Audit = Callable[[str, int, str, object, str, str], None]


class Publisher:
    def __init__(self, directory: Backend | None, node: str, audit: Audit,
                 node_facts: Callable[[], tuple[Iterable, Iterable[str]]]) -> None:
        """node_facts(): (this node's host addresses, its containers' overlay
        addresses), read whenever the node document is made."""
        self.directory = directory
        self.node = node
        self.audit = audit
        self.node_facts = node_facts
        self.published: dict[str, dict] = {}    # our records: key -> record
        # every grafted server of this node, directory or not: (pid, fd, inode)
        # -> (its redirect.Server); what the redirects (nftables DNAT) are made of
        self.servers: dict[tuple[int, int, int], redirect.Server] = {}
        self.on_servers: Callable[[], None] = lambda: None      # the set changed
        self.services: dict = {}                # (proto, overlay ip, port) -> (host ip, port)
        self._rejected_seen: set[str] = set()   # refused records (audited once)

    # --- this node ---------------------------------------------------------------

    def node_doc(self) -> dict:
        """What other agents check this node's records against: its usable
        host addresses and its registered containers' overlay addresses."""
        hosts, addresses = self.node_facts()
        overlay = set()
        for a in addresses:
            try:
                overlay.add(ipaddress.ip_address(a))
            except ValueError:
                pass
        return mdir.node_document(self.node, self.directory.owner if self.directory else "",
                                  hosts, overlay)

    def publish_node(self) -> None:
        if self.directory is not None:
            self.directory.publish_node(self.node_doc())

    def publish_bind(self, container: str, addresses: Iterable[str], tid: int, fd: int,
                     proto: str, host: socket.socket, requested: InetAddr) -> None:
        """A grafted server bound through an ingress rule: remember it (the
        redirects from its container address and published ports), publish
        its overlay address(es):port -> the host address:port it really
        listens on."""
        try:
            local = host.getsockname()
        except OSError:
            return
        hip = ipaddress.ip_address(local[0])
        if hip.version == 6 and hip.ipv4_mapped is not None:
            hip = hip.ipv4_mapped
        req = requested.unmapped()
        self.servers[(tgid(tid), fd, os.fstat(host.fileno()).st_ino)] = redirect.Server(
            container, proto, req.ip, req.port, hip, local[1])
        self.on_servers()
        if self.directory is None:
            return
        if hip.is_unspecified:
            # a wildcard endpoint: clients are sent to one of this node's
            # published addresses (the records of others are checked on it)
            usable = [a for a in self.node_doc().get("addresses", [])
                      if ipaddress.ip_address(a).version == hip.version]
            if not usable:
                log.info("directory: %s listens on a wildcard and this node has no usable "
                         "IPv%d address to publish", container, hip.version)
                return
            hip = ipaddress.ip_address(usable[0])
        if mdir.unusable_host_addr(hip) is not None:
            log.info("directory: not publishing %s's server: host address %s is %s",
                     container, hip, mdir.unusable_host_addr(hip))
            return
        addresses = list(addresses)
        if req.ip.is_unspecified:
            overlay = [a for a in addresses if ipaddress.ip_address(a).version == hip.version]
        else:
            overlay = [str(req.ip)] if str(req.ip) in addresses else []
        table = self.directory.table()
        pid = tgid(tid)
        inode = os.fstat(host.fileno()).st_ino
        changed = False
        for ov in overlay:
            rec = {"overlay": ov, "port": req.port, "proto": proto,
                   "host_addr": str(hip), "host_port": local[1], "node": self.node,
                   "owner": self.directory.owner, "container": container,
                   "pid": pid, "fd": fd, "inode": inode}
            k = mdir.record_key(rec)
            other = table.get(k)
            mine = self.published.get(k)
            if mine is not None and mine["container"] != rec["container"]:
                other = mine
            if other is not None and (other["owner"], other["container"]) != \
                    (rec["owner"], rec["container"]):
                log.error("directory: %s", mdir.Conflict(k, other, rec))
                self.audit(container, pid, "bind", f"{ov}:{req.port}", "conflict",
                           f"directory: already published by {other['node']}/"
                           f"{other['container']}")
                continue
            self.published[k] = rec
            changed = True
        if changed:
            self.directory.publish(self.published)

    def sweep(self) -> None:
        """Forget servers and withdraw records whose socket is closed (or
        whose process is gone)."""
        dead = [k for k in self.servers if not socket_open(*k)]
        for k in dead:
            del self.servers[k]
        if dead:
            self.on_servers()
        if self.directory is None or not self.published:
            return
        gone = [k for k, r in self.published.items() if not _socket_alive(r)]
        for k in gone:
            del self.published[k]
        if gone:
            self.directory.publish(self.published)

    def readopt(self, previous: list[dict]) -> None:
        """A restarted agent: keep publishing what its predecessor published if
        the socket still exists; everything else goes (no stale records)."""
        assert self.directory is not None
        kept = 0
        for r in previous:
            if r.get("owner") == self.directory.owner and _socket_alive(r):
                self.published[mdir.record_key(r)] = r
                kept += 1
        self.directory.publish(self.published)
        if previous:
            log.info("directory: re-published %d of %d record(s) of the previous agent",
                     kept, len(previous))

    # --- the view ------------------------------------------------------------------

    def on_view(self) -> None:
        """The directory's view changed: audit what it refused, rebuild the
        service table, withdraw our records another container holds."""
        assert self.directory is not None
        self.directory.drain()
        for r in self.directory.rejected():
            if str(r) not in self._rejected_seen:
                # one rate-limit bucket for the directory: the names in a
                # record are the writer's, as many as it likes
                self.audit("directory", 0, "directory", r.key, "reject", str(r))
        self._rejected_seen = {str(r) for r in self.directory.rejected()}
        services = {}
        for r in self.directory.table().values():
            services[(r["proto"], ipaddress.ip_address(r["overlay"]), r["port"])] = \
                (ipaddress.ip_address(r["host_addr"]), r["host_port"])
        self.services = services
        for c in self.directory.conflicts():
            if c.loser.get("owner") == self.directory.owner:
                k = c.key
                if self.published.get(k) == c.loser:
                    log.error("directory: withdrawing %s: %s", k, c)
                    del self.published[k]
                    self.directory.publish(self.published)

    def listing(self) -> dict:
        if self.directory is None:
            return {"directory": None, "records": [], "conflicts": []}
        return {"directory": self.directory.kind, "reachable": self.directory.reachable,
                "last_error": self.directory.last_error or None,
                "records": sorted(self.directory.table().values(), key=mdir.record_key),
                "conflicts": [str(c) for c in self.directory.conflicts()],
                "rejected": [str(r) for r in self.directory.rejected()],
                "published_here": len(self.published)}


def _socket_alive(r: dict) -> bool:
    """Is the socket of a published record still open in its process?"""
    try:
        return socket_open(int(r["pid"]), int(r["fd"]), int(r["inode"]))
    except (KeyError, TypeError, ValueError):
        return False
