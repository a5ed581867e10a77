"""Enforcement: the kernel's copy of every container's configuration -
the nftables table (`model/nftpolicy.plan_ruleset`) and the cgroup
programs' maps (`model/bpfmaps`: policies, egress rules, granted sources,
mark generations, directory redirects) - reconciled to the desired state
computed from the registered sessions, the store and the directory's
service table. Only what changed is written; egress rules change under a
new generation, flipped atomically.

Must not: decide policy (model/ does) or answer trapped calls.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterable, Mapping

from ..errors import AgentError, SockgraftError
from ..kernel import bpf as kbpf
from ..kernel import links, nft
from ..model import bpfmaps, graft, redirect
from ..model.nftpolicy import plan_ruleset
from .store import ConfigStore

log = logging.getLogger("sockgraft.agent")


@dataclass
class BpfApplied:
    """What the agent last wrote to the kernel maps for one container."""
    cfg: graft.GraftConfig
    socket_mode: bool
    sources: list[bytes]
    gen: int
    keys4: list[bytes]
    keys6: list[bytes]
    labels: tuple[str, ...]         # policy label index -> rule name
    egress_labels: list[str]
    addresses: tuple[str, ...] = ()  # the container's own, granted as reply sources
    splice: bool = False            # its connections may be spliced (policy flag)


class Enforcer:
    def __init__(self, store: ConfigStore, manage_nft: bool = True) -> None:
        self.store = store
        self.manage_nft = manage_nft
        self.bpf: kbpf.Programs | None = None
        self.applied: dict[int, BpfApplied] = {}     # mark -> what the maps hold
        self._gen = 0
        self._reserved: set[int] = set()            # held at the last wrap: not given again
        self._left: set[int] = set()                # rules left behind: never given again
        self._store_configs: dict | None = None      # mark -> (config, socket mode)
        self._svc: dict[bytes, bytes] = {}
        self._svc_rev: dict[bytes, bytes] = {}
        self._nft_applied: object = None
        self._bridges_for: list[str] | None = None   # addresses the bridges were found for
        self._bridges_found: tuple[str, ...] = ()
        self._follow: tuple[object, dict] = (None, {})   # (service table, {policy: part})
        self.redirects: tuple = ()          # the grafted servers' DNAT (model/redirect)

    def _followable(self, policy, services: Mapping) -> Mapping:
        """graft.followable, once per policy and service table: the nftables
        and the BPF reconcilers both need it, on every registration."""
        table, memo = self._follow
        if table is not services:
            memo = {}
            self._follow = (services, memo)
        part = memo.get(policy)
        if part is None:
            part = memo[policy] = graft.followable(policy, services)
        return part

    def reset_bpf(self) -> None:
        """The programs went away: nothing is in any map any more."""
        self.bpf = None
        self.applied.clear()
        self._svc.clear()
        self._svc_rev.clear()

    def sync_nft(self, sessions: Iterable, services: Mapping,
                 servers: Iterable = ()) -> None:
        """Load the per-container policy chains of every registered container
        (sessions), with the directory services each may be sent to, and the
        redirects to this node's grafted servers (model/redirect.py)."""
        if not self.manage_nft:
            return
        sessions = list(sessions)
        redirects = tuple(redirect.plan(
            servers, {s.container: s.addresses for s in sessions},
            {s.container: s.ports for s in sessions}))
        self.redirects = redirects
        policies = {}
        for sess in sessions:
            policies[sess.mark] = (sess.config.policy if sess.config else
                                   graft.GraftConfig(sess.container).policy)
        services = {mark: tuple(sorted({(proto, hip, hport) for (proto, _ov, _p), (hip, hport)
                                        in self._followable(policy, services).items()},
                                       key=str))
                    for mark, policy in policies.items()}
        loopbacks = {s.mark: graft.private_loopback(s.mark) for s in sessions
                     if s.graft_at == "socket"}
        bridges = self._bridges(sorted({a for s in sessions for a in s.addresses}))
        if (policies, services, redirects, loopbacks, bridges) == self._nft_applied:
            return
        nft.apply(None, plan_ruleset(policies, services, redirects, loopbacks, bridges))
        self._nft_applied = (policies, services, redirects, loopbacks, bridges)

    def _bridges(self, addrs: list[str]) -> tuple[str, ...]:
        """The bridges the containers' addresses route through (antispoof),
        looked up again only when the set of addresses changes (a route get
        per address); on a netlink error the last ones found stay."""
        if addrs == self._bridges_for:
            return self._bridges_found
        try:
            found = tuple(links.bridges_toward(addrs))
        except (SockgraftError, OSError) as exc:
            log.warning("nftables: the containers' bridges (for antispoof): %s", exc)
            return self._bridges_found
        self._bridges_for, self._bridges_found = addrs, found
        return found

    def sync_bpf(self, sessions: Iterable, services: Mapping,
                 mark_held: Callable[[int], bool], rescan: bool | str = False,
                 before_retire: Callable[[], None] | None = None) -> None:
        """Write the policy, egress rules and granted source addresses of
        every configured container (registered here, or configured in the
        store: a restarted agent must judge sockets grafted before it
        started) into the kernel maps. Egress rules change under a new
        generation, flipped atomically; sources are added before the flip
        and removed after it. rescan: read the store again - every
        container (True), or the one named (a reload for one container:
        the others' files are not parsed again). before_retire: called once
        the new generations are in force and before the old ones' entries
        go (the native loops take the new generation in it: a connect it
        answers under the old one still finds that one's rules)."""
        if self.bpf is None:
            return
        wanted: dict[int, tuple[graft.GraftConfig, bool, tuple[str, ...]]] = {}
        # spliced only where every process tree of the container traps
        # splice(): the kernel's splice out of a spliced socket reads nothing
        traps: dict[int, bool] = {}
        for sess in sessions:
            traps[sess.mark] = traps.get(sess.mark, True) and sess.traps_splice
            if sess.config is not None:
                socket_mode = sess.graft_at == "socket"
                wanted[sess.mark] = (sess.config, socket_mode,
                                     sess.addresses + _private(sess.mark, socket_mode))
        if isinstance(rescan, str) and self._store_configs is not None:
            self._rescan_one(rescan, mark_held)
        elif rescan or self._store_configs is None:
            found = {}
            marks = self.store.marks()
            for name in self.store.containers():
                try:
                    cfg = self.store.load(name)
                    if cfg is not None:
                        mark = marks.get(name) or self.store.mark(name, in_use=mark_held)
                        found[mark] = (cfg, cfg.graft_at == "socket",
                                       _private(mark, cfg.graft_at == "socket"))
                except SockgraftError as exc:
                    log.warning("bpf: skipping container %s: %s", name, exc)
            self._store_configs = found
        for mark, entry in self._store_configs.items():
            wanted.setdefault(mark, entry)
        # the generation first: a socket tagged for a mark's earlier holder is
        # refused from the moment its new holder can get sockets
        gens = self.store.generations()
        retired: list[tuple[BpfApplied, list[bytes]]] = []
        for mark in wanted:
            if self.bpf.gens.get(mark) != gens.get(mark, 0):
                self.bpf.set_gen(mark, gens.get(mark, 0))
        try:
            for mark, (cfg, socket_mode, own) in wanted.items():
                old = self.applied.get(mark)
                splice = cfg.splice and traps.get(mark, False)
                if old is not None and old.cfg == cfg and old.socket_mode == socket_mode and \
                        old.addresses == own and old.splice == splice:
                    continue
                gen = self._next_gen()
                try:
                    entry = bpfmaps.policy_entry(cfg.policy, gen, socket_mode=socket_mode,
                                                 splice=splice)
                except SockgraftError as exc:
                    log.warning("bpf: container %s keeps its previous policy: %s",
                                cfg.container, exc)
                    continue
                v4, v6, elabels = bpfmaps.egress_entries(cfg, mark, gen)
                sources = bpfmaps.source_keys(cfg, mark, own)
                new = BpfApplied(cfg, socket_mode, sources, gen, [k for k, _ in v4],
                                 [k for k, _ in v6], entry.labels, elabels, own, splice)
                try:
                    for k in sources:
                        self.bpf.update("sg_sources", k, b"\1")
                    for k, v in v4:
                        self.bpf.update("sg_egress4", k, v)
                    for k, v in v6:
                        self.bpf.update("sg_egress6", k, v)
                    self.bpf.update("sg_policy", bpfmaps.policy_key(mark), entry.value)
                except SockgraftError:
                    # the old generation stays in force: nothing of the new one
                    self._forget_egress(new, keep=old.sources if old is not None else [])
                    raise
                if old is not None:
                    retired.append((old, sources))
                self.applied[mark] = new
            for mark in [m for m in self.applied if m not in wanted]:
                self.bpf.delete("sg_policy", bpfmaps.policy_key(mark))
                retired.append((self.applied.pop(mark), []))
        finally:
            # whatever failed above: what the new generations replaced goes
            # (a rule left behind would come back if its generation did)
            try:
                if retired and before_retire is not None:
                    before_retire()
            finally:
                for old, keep in retired:
                    try:
                        self._forget_egress(old, keep=keep)
                    except SockgraftError as exc:
                        # (its generation is not given again: _left)
                        self._reserved.add(old.gen)
                        log.warning("bpf: container %s: rules of generation %d left: %s",
                                    old.cfg.container, old.gen, exc)
        self.sync_bpf_services(services)

    def _next_gen(self) -> int:
        """A policy generation no container holds now, nor held at the last
        wrap (a u16 that comes round: egress rules are keyed by it, cached
        verdicts match by it - a verdict cached under a generation held
        across the wrap may still be in the cache)."""
        held = {a.gen for a in self.applied.values()}
        for _ in range(0x10000):
            if self._gen == 0xFFFF:
                # the generations come round again: no verdict cached under
                # one of them may be taken for the new policy's
                self.forget_verdicts()
                self._gen = 0
                self._reserved = set(held) | self._left
            self._gen += 1
            if self._gen not in held and self._gen not in self._reserved:
                return self._gen
        raise AgentError("every policy generation is in use")

    def _rescan_one(self, name: str, mark_held: Callable[[int], bool]) -> None:
        assert self._store_configs is not None
        configs = {m: e for m, e in self._store_configs.items() if e[0].container != name}
        try:
            cfg = self.store.load(name)
            if cfg is not None:
                mark = self.store.marks().get(name) or self.store.mark(name, in_use=mark_held)
                configs[mark] = (cfg, cfg.graft_at == "socket",
                                 _private(mark, cfg.graft_at == "socket"))
        except SockgraftError as exc:
            log.warning("bpf: skipping container %s: %s", name, exc)
        self._store_configs = configs

    def _forget_egress(self, old: BpfApplied, keep: list[bytes] = ()) -> None:
        """Delete a generation's rules and the sources `keep` does not name;
        every key is tried. A key that cannot be deleted keeps its generation
        from being given again (it would come back into force): reserved for
        good, and the error raised once every key was tried."""
        assert self.bpf is not None
        failed: SockgraftError | None = None
        for m, keys in (("sg_egress4", old.keys4), ("sg_egress6", old.keys6),
                        ("sg_sources", [k for k in old.sources if k not in keep])):
            for k in keys:
                try:
                    self.bpf.delete(m, k)
                except SockgraftError as exc:
                    failed = exc
        if failed is not None:
            self._left.add(old.gen)
            raise failed

    def forget_verdicts(self) -> int:
        """Delete the fast path's cached policy verdicts (sg_fast_flows
        records of flows a container started; the replies' records stay)."""
        if self.bpf is None or "sg_fast_flows" not in self.bpf.maps:
            return 0
        n = self.bpf.forget_flow_records(lambda k, v: bpfmaps.flow_judged(v))
        if n:
            log.info("fastpath: the policy generations wrapped; %d cached verdicts dropped", n)
        return n

    def sync_bpf_services(self, services: Mapping) -> None:
        """The directory redirects (sg_services, per container: only what its
        policy lets it follow) and their reverse (getpeername, socket mode).
        A syscall-mode container's entries serve its grafted sockets' connects
        that the kernel continues, and tell the native loop which connects
        the grafter follows itself."""
        if self.bpf is None:
            return
        fwd, rev = {}, {}
        for (proto, ov, port), (hip, hport) in services.items():
            rev[bpfmaps.svc_key(hip, hport, proto)] = bpfmaps.svc_val(ov, port)
        # the redirect, per container: only what its policy lets it follow
        for mark, applied in self.applied.items():
            for (proto, ov, port), (hip, hport) in self._followable(
                    applied.cfg.policy, services).items():
                fwd[bpfmaps.svc_key(ov, port, proto, mark)] = bpfmaps.svc_val(hip, hport)
        for m, want, have in (("sg_services", fwd, self._svc),
                              ("sg_services_rev", rev, self._svc_rev)):
            for k, v in want.items():
                if have.get(k) != v:
                    self.bpf.update(m, k, v)
            for k in [k for k in have if k not in want]:
                self.bpf.delete(m, k)
            have.clear()
            have.update(want)

    def explain(self, ev: bpfmaps.Event) -> tuple[str, str]:
        """The container and the rule behind a denial the programs reported."""
        applied = self.applied.get(ev.mark)
        container = applied.cfg.container if applied else f"mark {ev.mark:#x}"
        if ev.kind == bpfmaps.EV_DENY_POLICY and applied and ev.label < len(applied.labels):
            return container, applied.labels[ev.label]
        if ev.kind == bpfmaps.EV_BIND_FAILED and applied and \
                ev.label < len(applied.egress_labels):
            return container, f"{applied.egress_labels[ev.label]}: endpoint bind failed"
        if ev.kind == bpfmaps.EV_DENY_MARK:
            return container, f"{ev.reason} (packet mark {ev.label:#x})"
        return container, ev.reason


def _private(mark: int, socket_mode: bool) -> tuple[str, ...]:
    """A socket-mode container's private loopback addresses: sources its
    packets may carry (sg_sources)."""
    return tuple(str(a) for a in graft.private_loopback(mark)) if socket_mode else ()
