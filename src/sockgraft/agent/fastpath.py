"""The packet fast path (`sockgraft agent --fastpath`): the tc programs on
every container interface of this namespace, kept in step with the node.

Owns: the cache of what each container interface is (its container, MAC and
addresses, read once from the container's namespace), the reconciliation of
sg_fast_ports / sg_fast_addrs and the pinned tcx links with it, the flow
verdicts that must go when an address moves, and the per-port listing.

Triggers: netlink events of this namespace (a veth came, went or changed:
the link table is kept from the events themselves, one dump only at start
or when events were lost; a route or an overlay neighbour changed), the
agent's reload (CNI ADD/DEL, configuration edits: a container's policy mark
may have changed), and the 1-second sweep every FULL_EVERY seconds (addresses
a container got after its interface appeared, the overlay's tables).

Nothing here holds the agent's loop for long: a policy reload waits for
whatever the loop is doing. The overlay's tables (netlink requests and two
`ip`/`bridge` commands, 50-100 ms) are read by a thread of their own
(OverlayReader) and applied by the loop when read; the link table is
updated from events (a dump of 200 veths takes 0.1-0.2 s).

Must not: decide (model/fastpath.py) or know map layouts (model/bpfmaps.py).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Mapping

from .. import cni
from ..errors import SockgraftError
from ..kernel import bpf as kbpf
from ..kernel import ports as kports
from ..model import bpfmaps
from ..model import fastpath as mfast

log = logging.getLogger("sockgraft.agent")

FULL_EVERY = 5.0        # seconds between sweeps that retry interfaces without addresses
# links come and go; neighbours, FDB entries and routes fill the overlay cache
RTMGRP_LINK, RTMGRP_NEIGH, RTMGRP_IPV4_ROUTE, RTMGRP_IPV6_ROUTE = 0x1, 0x4, 0x40, 0x400


def cni_containers(state_dir: str) -> dict[str, str]:
    """netns path -> container, from the CNI plugin's registrations."""
    return {rec["netns"]: rec["container"] for rec in cni.registered(state_dir)
            if isinstance(rec.get("netns"), str) and isinstance(rec.get("container"), str)}


def _write(bpf: kbpf.Programs, m: str, old: Mapping[bytes, bytes],
           new: Mapping[bytes, bytes]) -> dict[bytes, bytes]:
    """Write to map m the entries of `new` that `old` (what it holds) lacks
    or holds otherwise; returns them."""
    writes, _ = mfast.diff(old, new)
    for key, val in writes.items():
        bpf.update(m, key, val)
    return writes


def _drop(bpf: kbpf.Programs, m: str, old: Mapping[bytes, bytes],
          new: Mapping[bytes, bytes]) -> None:
    """Delete from map m the keys of `old` that `new` no longer has."""
    for key in mfast.diff(old, new)[1]:
        bpf.delete(m, key)


def read_overlay(indexes: list[int]) -> tuple[list[mfast.Overlay], tuple[int, int]]:
    """The VXLAN devices' tables and the outer source port range."""
    return ([mfast.Overlay(**dataclasses.asdict(v)) for v in kports.vxlans(indexes)],
            kports.local_port_range())


class OverlayReader:
    """kernel/ports.vxlans() in a thread: the loop asks (ask), the thread
    reads, a byte on the pipe (fileno) tells the loop to take() the result.
    Asked again while reading: read again after. The result is the latest
    read; an error is handed over as the exception."""

    def __init__(self) -> None:
        self._r, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._cv = threading.Condition()
        self._asked: list[int] | None = None
        self._result: object = None
        self._closed = False
        self._thread: threading.Thread | None = None

    def fileno(self) -> int:
        return self._r

    def ask(self, indexes: list[int]) -> None:
        with self._cv:
            self._asked = list(indexes)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="sockgraft-overlay",
                                                daemon=True)
                self._thread.start()
            self._cv.notify()

    def _run(self) -> None:
        while True:
            with self._cv:
                while self._asked is None and not self._closed:
                    self._cv.wait()
                if self._closed:
                    return
                indexes, self._asked = self._asked, None
            try:
                got: object = read_overlay(indexes)
            except Exception as exc:    # noqa: BLE001 - handed to the loop, the thread lives on
                got = exc
            with self._cv:
                if self._closed:
                    return
                self._result = got
                try:
                    os.write(self._w, b"\1")
                except BlockingIOError:
                    pass                # the loop has a byte to wake it already

    def take(self) -> object:
        """The latest read (None: nothing new)."""
        try:
            os.read(self._r, 4096)
        except BlockingIOError:
            pass
        with self._cv:
            got, self._result = self._result, None
        return got

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(5)
        os.close(self._r)
        os.close(self._w)


class FastPath:
    def __init__(self, lab: str | None, state_dir: str,
                 flows_per_container: int = kbpf.FLOWS_PER_CONTAINER) -> None:
        self.lab = lab
        self.state_dir = state_dir
        self.flows_per_container = flows_per_container   # each policed port's flow cache
        self.no_cache: set[int] = set()             # policed ports whose cache could not be made
        self.facts: dict[int, mfast.Port] = {}      # host ifindex -> what it is
        self.ports: dict[bytes, bytes] = {}         # what sg_fast_ports holds
        self.addrs: dict[bytes, bytes] = {}         # what sg_fast_addrs holds
        self.link_locals: dict[bytes, bytes] = {}   # what sg_fast_ll holds
        self.node_lls: tuple = ()                   # the bridges' own link-local addresses
        self.judged: dict[int, str] = {}
        self.marks: dict[str, int] = {}             # the marks the maps were written with
        self.redirect_set: tuple = ()               # ... and the grafted servers' DNAT
        self.redirects: dict[bytes, bytes] = {}     # what sg_fast_redirects holds
        self.slots: dict[int, int] = {}             # ifindex -> its counters' slot
        self.conflicts: list[str] = []
        self.attached: set[int] = set()
        self.remote: dict[bytes, bytes] = {}        # what sg_fast_remote holds
        self.tunnels: dict[bytes, bytes] = {}       # sg_fast_tunnels
        self.peers: dict[bytes, bytes] = {}         # sg_fast_peers
        self.underlays: set[int] = set()            # decapsulating underlay devices
        self.overlay_ifindexes: set[int] = set()    # VXLAN devices and their underlays
        self.waiting: list[str] = []                # overlay routes not (yet) cached
        self.enabled = True                         # programs on the interfaces
        self.due_links = self.due_overlay = self.due_plan = False
        self.links: dict[int, kports.Link] | None = None   # this namespace's links
        self._present: set[int] = set()             # the container veths last seen
        self._vx_indexes: list[int] = []            # the VXLAN devices last seen
        self._last_full = 0.0
        self.reader = OverlayReader()
        self._nl: kports.Events | None = None
        try:
            self._nl = kports.Events(RTMGRP_LINK | RTMGRP_NEIGH | RTMGRP_IPV4_ROUTE |
                                     RTMGRP_IPV6_ROUTE)
        except OSError as exc:
            log.warning("fastpath: no link events (%s): interfaces are found by the "
                        "sweep", exc)
            self._nl = None

    def fileno(self) -> int:
        return self._nl.fileno() if self._nl is not None else -1

    def on_netlink(self) -> None:
        """Netlink events: reconcile at the end of the turn when one can
        matter - a link came, went or changed what the fast path reads of
        it (the link table is updated from the event itself; a bridge
        port's state changes do not count), a route changed, or a
        neighbour / FDB entry of an overlay device or its underlay did.
        The containers' own neighbour entries on the bridge (a busy node
        has many, changing state all the time) do not. Lost events (the
        socket overflowed): the links are dumped again."""
        assert self._nl is not None
        try:
            msgs, lost = self._nl.read()
        except SockgraftError as exc:
            log.warning("fastpath: %s", exc)
            msgs, lost = [], True
        if lost:
            self.links = None           # events lost: dump again
            self.due_links = self.due_overlay = True
        for m in msgs:
            # m[...], not m.get(): get() prefers an attribute of that name
            # (IFLA_EVENT, NDA_IFINDEX) to the message's own field
            event = m["event"] if "event" in m else ""
            if "LINK" in event:
                changed = self.on_link(event, m)
                self.due_links |= changed
                self.due_overlay |= changed
                continue
            links, overlay = self.relevant(event, m["ifindex"] if "ifindex" in m else None,
                                           self.overlay_ifindexes)
            self.due_links |= links
            self.due_overlay |= overlay

    def drain_netlink(self) -> None:
        """The events already queued (a reload looks at the links as they
        are now: a CNI ADD's veth came just before it)."""
        if self._nl is not None:
            self.on_netlink()

    def on_link(self, event: str, msg) -> bool:
        """One link event into the table; True when what the fast path
        reads of the links changed."""
        link = kports.link_of(msg)
        if link is None or self.links is None:
            return False
        if event == "RTM_DELLINK":
            return self.links.pop(link.ifindex, None) is not None
        if self.links.get(link.ifindex) == link:
            return False
        self.links[link.ifindex] = link
        return True

    @staticmethod
    def relevant(event: str, ifindex, overlay_ifindexes: set[int]) -> tuple[bool, bool]:
        """(read the links again, read the overlay's tables again) for one
        netlink event."""
        if "LINK" in event:
            return True, True
        if "NEIGH" in event:
            return False, ifindex in overlay_ifindexes
        return False, "ROUTE" in event

    def close(self) -> None:
        self.reader.close()
        if self._nl is not None:
            self._nl.close()
            self._nl = None

    # --- reconciliation -----------------------------------------------------

    def _resolve(self, veths: list[kports.Veth]) -> None:
        """Read what the interfaces not known yet (or without an address yet)
        are, from their containers' namespaces."""
        want = [v for v in veths if v.ifindex not in self.facts
                or not self.facts[v.ifindex].addrs]
        if not want:
            return
        cni = cni_containers(self.state_dir)
        paths = kports.netns_ids(kports.named_netns() + sorted(cni))
        if any(v.nsid not in paths for v in want):
            for nsid, path in kports.netns_ids(kports.process_netns()).items():
                paths.setdefault(nsid, path)
        got = kports.peers_facts([(paths[v.nsid], v.peer_ifindex) for v in want
                                  if v.nsid in paths])
        for v in want:
            path = paths.get(v.nsid)
            if path is None or (path, v.peer_ifindex) not in got:
                continue
            mac, addrs = got[(path, v.peer_ifindex)]
            self.facts[v.ifindex] = mfast.Port(
                v.ifindex, v.ifname, mfast.container_of(path, lab=self.lab, cni=cni),
                mac, addrs, v.bridge_mac)

    @property
    def due(self) -> bool:
        """Something changed: reconcile at the end of the turn (due_plan: the
        maps again from what is known - a policy mark, a grafted server)."""
        return self.due_links or self.due_overlay or self.due_plan

    def reconcile(self, bpf: kbpf.Programs, marks: Mapping[str, int], full: bool = False,
                  redirects: tuple = (), links: bool = True, overlay: bool = True,
                  wait: bool = False) -> None:
        """Make the maps and links match the node. marks: container -> mark
        of its policy entry; redirects: the grafted servers' DNAT. links: the
        node's interfaces again (from the link table the events keep; one
        dump when there is none); overlay: the VXLAN devices' tables (read by
        the reader thread and applied when read - at once with wait); full:
        interfaces without addresses read again from their namespaces.
        Without either, only the maps are rewritten from what is known (a
        policy mark or a grafted server changed)."""
        if full:
            for ifindex in [i for i, p in self.facts.items() if not p.addrs]:
                del self.facts[ifindex]          # read again
        if self.links is None or (self._nl is None and (links or full)):
            self.links = kports.dump_links()     # no table (yet), or no events to keep it
            links = True
        overlay = overlay or links
        self.due_links = self.due_overlay = self.due_plan = False
        self.marks = dict(marks)
        self.redirect_set = redirects
        if links or full:
            veths, self._vx_indexes = kports.veths_of(self.links.values())
            self._present = {v.ifindex for v in veths}
            for gone in [i for i in self.facts if i not in self._present]:
                del self.facts[gone]
            self._resolve(veths)
            for v in veths:     # a bridge's MAC follows its ports': kept current
                p = self.facts.get(v.ifindex)
                if p is not None and p.gw != v.bridge_mac:
                    self.facts[v.ifindex] = dataclasses.replace(p, gw=v.bridge_mac)
        fresh = self._assign_slots()
        if links or full:
            bridges = {link.ifindex for link in self.links.values() if link.kind == "bridge"}
            try:
                self.node_lls = tuple(kports.link_locals(sorted(bridges)))
            except OSError as exc:
                log.warning("fastpath: the bridges' link-local addresses: %s", exc)
        plan = mfast.plan(self.facts.values(), marks, self.slots, redirects, self.node_lls)
        if plan.conflicts != self.conflicts:
            for c in plan.conflicts:
                log.warning("fastpath: %s", c)
        self.conflicts = plan.conflicts
        self.judged = plan.judged
        # a port's flow cache before its policy mark (the programs judge
        # without one: fail closed)
        made = self._make_flows(bpf, set(plan.judged) - bpf.flows())
        # the DNAT's ports before the addresses that point at them
        _write(bpf, "sg_fast_redirects", self.redirects, plan.redirects)
        moved = mfast.moved(self.addrs, plan.addrs)
        for ifindex in fresh:
            bpf.fast_stats_reset(self.slots[ifindex])
        port_writes = _write(bpf, "sg_fast_ports", self.ports, plan.ports)
        if self.enabled:
            for key in plan.ports:
                ifindex = int.from_bytes(key, "little")
                if ifindex not in self.attached:
                    try:
                        bpf.fast_attach(ifindex)
                        self.attached.add(ifindex)
                    except SockgraftError as exc:
                        log.warning("fastpath: %s", exc)
        _write(bpf, "sg_fast_addrs", self.addrs, plan.addrs)
        _drop(bpf, "sg_fast_addrs", self.addrs, plan.addrs)
        self.addrs = dict(plan.addrs)
        _write(bpf, "sg_fast_ll", self.link_locals, plan.link_locals)
        _drop(bpf, "sg_fast_ll", self.link_locals, plan.link_locals)
        self.link_locals = dict(plan.link_locals)
        _drop(bpf, "sg_fast_redirects", self.redirects, plan.redirects)
        self.redirects = dict(plan.redirects)
        if moved or port_writes:
            # verdicts about an address that moved, or of a port whose
            # container (policy mark) or addresses changed - not of one whose
            # bridge MAC changed (another container joined its bridge)
            changed = {int.from_bytes(k, "little") for k in port_writes
                       if bpfmaps.fast_port_identity(self.ports.get(k, b"")) !=
                       bpfmaps.fast_port_identity(plan.ports[k])}
            self.forget_flows(bpf, (changed & set(plan.judged)) - made, moved)
        _drop(bpf, "sg_fast_ports", self.ports, plan.ports)
        self.ports = dict(plan.ports)
        for ifindex in bpf.flows() - set(plan.judged):
            bpf.flows_drop(ifindex)     # gone, or no longer policed
        self.no_cache &= set(plan.judged)
        if overlay and wait:
            self.reader.take()          # an older read must not undo this one
            self._reconcile_remote(bpf, read_overlay(self._vx_indexes))
        elif overlay:
            self.reader.ask(self._vx_indexes)
        if links or overlay:
            self._detach_gone(bpf)

    def _detach_gone(self, bpf: kbpf.Programs) -> None:
        """The programs leave interfaces that are neither a container's nor
        a decapsulating underlay any more."""
        for ifindex in (bpf.fast_attached() | self.attached) - (self._present | self.underlays):
            bpf.fast_detach(ifindex)
            self.attached.discard(ifindex)

    def on_overlay_read(self, bpf: kbpf.Programs) -> None:
        """The reader thread read the overlay's tables: into the maps."""
        got = self.reader.take()
        if got is None or not self.enabled:
            return
        if isinstance(got, SockgraftError):
            raise got
        if isinstance(got, BaseException):
            log.error("fastpath: reading the overlay failed: %r", got)
            return
        self._reconcile_remote(bpf, got)
        self._detach_gone(bpf)

    def sweep_scope(self, now: float) -> tuple[bool, bool, bool] | None:
        """What the 1-second sweep should read again, if anything: (links,
        overlay, full) - every FULL_EVERY seconds the overlay's tables (by
        the reader thread: events keep them current, this catches what no
        event says) and, when some interface has no address yet, those
        interfaces from their namespaces."""
        if now - self._last_full < FULL_EVERY:
            return None
        self._last_full = now
        waiting = any(not p.addrs for p in self.facts.values())
        return waiting, True, waiting

    def _reconcile_remote(self, bpf: kbpf.Programs,
                          read: tuple[list[mfast.Overlay], tuple[int, int]]) -> None:
        """The encapsulation cache and the decapsulating underlays, from the
        overlay's tables as read (kernel/ports.vxlans, model/fastpath.plan_remote)."""
        overlays, port_range = read
        self.overlay_ifindexes = {o.ifindex for o in overlays} | {o.underlay for o in overlays} \
            | {hop[1] for o in overlays for hop in o.next_hops}
        plan = mfast.plan_remote(overlays, port_range)
        if plan.waiting != self.waiting:
            for w in plan.waiting:
                log.info("fastpath: %s", w)
        self.waiting = plan.waiting
        underlays = {int.from_bytes(k, "little") for k in plan.tunnels}
        # decapsulation first: what the other hosts send the fast way must
        # find this host ready before this host sends the fast way
        _write(bpf, "sg_fast_peers", self.peers, plan.peers)
        _write(bpf, "sg_fast_tunnels", self.tunnels, plan.tunnels)
        if self.enabled:
            for ifindex in underlays - self.underlays:
                try:
                    bpf.fast_attach(ifindex, kbpf.UNDERLAY_PROGRAMS)
                except SockgraftError as exc:
                    log.warning("fastpath: underlay: %s", exc)
                    underlays.discard(ifindex)
        _write(bpf, "sg_fast_remote", self.remote, plan.remote)
        _drop(bpf, "sg_fast_remote", self.remote, plan.remote)
        _drop(bpf, "sg_fast_peers", self.peers, plan.peers)
        _drop(bpf, "sg_fast_tunnels", self.tunnels, plan.tunnels)
        self.remote, self.peers, self.tunnels = plan.remote, plan.peers, plan.tunnels
        self.underlays = underlays

    def _assign_slots(self) -> list[int]:
        """A counters slot for every interface (the lowest free one for a new
        interface); returns the interfaces that got one now."""
        for ifindex in [i for i in self.slots if i not in self.facts]:
            del self.slots[ifindex]
        used = set(self.slots.values())
        fresh = []
        free = (s for s in range(kbpf.FAST_SLOTS) if s not in used)
        for ifindex in sorted(self.facts):
            if ifindex not in self.slots:
                slot = next(free, None)
                if slot is None:
                    log.warning("fastpath: more than %d container interfaces; %s left to "
                                "the normal path", kbpf.FAST_SLOTS, self.facts[ifindex].ifname)
                    continue
                self.slots[ifindex] = slot
                fresh.append(ifindex)
        for ifindex in [i for i in self.facts if i not in self.slots]:
            del self.facts[ifindex]
        return fresh

    def _make_flows(self, bpf: kbpf.Programs, ifindexes: set[int]) -> set[int]:
        """Flow caches for newly policed ports; returns those made."""
        made = set()
        for ifindex in sorted(ifindexes):
            try:
                bpf.flows_new(ifindex, self.flows_per_container)
            except SockgraftError as exc:
                if ifindex not in self.no_cache:
                    log.error("fastpath: %s: no flow cache (%s): each of its packets is "
                              "judged by the policy alone - replies to flows it did not "
                              "start are dropped unless the policy allows them",
                              self.judged.get(ifindex, ifindex), exc)
                self.no_cache.add(ifindex)
                continue
            self.no_cache.discard(ifindex)
            made.add(ifindex)
        return made

    def forget_flows(self, bpf: kbpf.Programs, ifindexes: set[int], addrs: set) -> int:
        """The records of these ports (a fresh cache each) and, in every
        other port's cache, those with one of these remote addresses;
        returns how many records of the latter went."""
        self._make_flows(bpf, ifindexes & bpf.flows())
        if not addrs:
            return 0
        match = bpfmaps.flow_matcher(addrs)
        return bpf.forget_flow_records(lambda k, v: match(k), skip=ifindexes)

    def set_enabled(self, bpf: kbpf.Programs, on: bool, marks: Mapping[str, int]) -> None:
        """on: programs on every container interface, local pairs forwarded
        directly; off: the programs leave every interface (the normal path
        alone: no data-path policy either)."""
        self.enabled = on
        bpf.set_fast(on)
        if on:
            self.reconcile(bpf, marks, full=True, wait=True)
            return
        for ifindex in bpf.fast_attached() | self.attached:
            bpf.fast_detach(ifindex)
        self.attached.clear()
        self.underlays.clear()

    # --- queries --------------------------------------------------------------

    def listing(self, bpf: kbpf.Programs) -> dict:
        stats = bpf.fast_stats(self.slots)
        flows = {i: sum(1 for k, _ in bpf.entries(fd, kbpf.FLOW_KEY_SIZE, bpfmaps.FLOW_VAL.size)
                        if bpfmaps.flow_is_flow(k))
                 for i, fd in bpf.flow_caches()}
        rows = []
        for ifindex, port in sorted(self.facts.items()):
            st = stats.get(ifindex)
            rows.append({"ifindex": ifindex, "ifname": port.ifname,
                         "container": port.container, "judged": ifindex in self.judged,
                         "attached": ifindex in self.attached,
                         "flows": flows.get(ifindex, 0),
                         "flow_cache": self.flows_per_container if ifindex in flows else 0,
                         "mac": port.mac.hex(":"), "gateway_mac": port.gw.hex(":"),
                         "addresses": [str(a) for a in port.addrs],
                         **(dict(zip(kbpf.FAST_STATS, st)) if st else {})})
        return {"enabled": self.enabled, "ports": rows, "conflicts": list(self.conflicts),
                "addresses": len(self.addrs), "remote_routes": len(self.remote),
                "underlays": sorted(self.underlays), "waiting": list(self.waiting),
                "flows": sum(flows.values())}
