"""The cluster directory of grafted services: what a record is, who may
publish it, and how the records of every agent merge into one lookup table.

A record says: the grafted server of `container` (on node `node`, agent
`owner`) is reachable at overlay address:port/proto, and its host socket
really listens on host_addr:host_port. Clients' agents (and the cgroup
programs) connect straight there: no overlay encapsulation.

Because a record redirects other containers' connections, it is trusted only
as far as its publisher is (`admit`):

  - every agent publishes a node document under its own name (owner): the
    node's name, its host addresses and the overlay addresses of the
    containers registered on it (by CNI, the runtime hand-off or the lab);
  - a record counts only if it sits under its owner's name, names that
    owner and node, its host address is one the node published and is a
    usable unicast address (never loopback, link-local, cloud metadata,
    unspecified, multicast, reserved or IPv4-mapped: `unusable_host_addr`),
    and its overlay address is one of that node's containers';
  - `since` is what the reader observed (etcd's create revision of the key,
    or the first time this agent saw the record), never what the writer
    claims: the record seen first keeps its key, a later claim by anybody
    else is a conflict, however old a time it carries.

Which of these records a given client may follow is the client's own policy's
business (`graft.may_follow`).

Pure: records are plain dicts (JSON on the wire and on disk).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address
from typing import Iterable, Mapping

from ..errors import ConfigError
from .policy import builtin_category

FIELDS = ("overlay", "port", "proto", "host_addr", "host_port", "node", "owner",
          "container")
NODE_FIELDS = ("node", "owner", "addresses", "overlay")
MAX_NODE_ADDRESSES = 256
MAX_NODE_OVERLAY = 65536


def key(proto: str, overlay: str, port: int) -> str:
    return f"{proto}/{ip_address(overlay)}/{port}"


def record_key(r: dict) -> str:
    return key(r["proto"], r["overlay"], r["port"])


def unusable_host_addr(ip: IPv4Address | IPv6Address) -> str | None:
    """Why `ip` may never be a directory record's host address, or None.
    A record redirects other containers' connects there, so nothing that
    means "this machine" to the reader or reaches outside the node fabric."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        return "IPv4-mapped"
    category = builtin_category(ip.version, int(ip))
    if category is not None:
        return category
    if ip.is_multicast:
        return "multicast"
    if ip.version == 4 and ip == IPv4Address("255.255.255.255"):
        return "broadcast"
    if ip.is_reserved:
        return "reserved"
    if ip.version == 6 and ip.is_site_local:
        return "site-local"
    return None


def _addr(v: object, source: str, fld: str) -> IPv4Address | IPv6Address:
    try:
        return ip_address(v)            # type: ignore[arg-type]
    except (ValueError, TypeError):
        raise ConfigError(f"{fld} {v!r} is not an IP address", source=source, field=fld,
                          value=v) from None


def check_record(r: object, source: str = "directory") -> dict:
    """A record as read from a peer (file or etcd): every field present and
    sane, or ConfigError naming the field. Extra fields are kept."""
    if not isinstance(r, dict):
        raise ConfigError(f"record is not an object: {r!r}", source=source)
    for f in FIELDS:
        if f not in r:
            raise ConfigError(f"record lacks {f!r}", source=source, field=f)
    if r["proto"] not in ("tcp", "udp"):
        raise ConfigError(f"proto {r['proto']!r} unknown", source=source, field="proto",
                          value=r["proto"])
    overlay = _addr(r["overlay"], source, "overlay")
    host = _addr(r["host_addr"], source, "host_addr")
    for f in ("port", "host_port"):
        v = r[f]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
            raise ConfigError(f"{f} {v!r} is not a port 1-65535", source=source, field=f,
                              value=v)
    if overlay.version != host.version:
        raise ConfigError("overlay and host addresses of different families", source=source,
                          field="host_addr", value=r["host_addr"])
    why = unusable_host_addr(host)
    if why is not None:
        raise ConfigError(f"host_addr {host} is a {why} address", source=source,
                          field="host_addr", value=r["host_addr"])
    for f in ("node", "owner", "container"):
        if not isinstance(r[f], str) or not r[f]:
            raise ConfigError(f"{f} must be a non-empty string", source=source, field=f,
                              value=r[f])
    return r


def check_node(doc: object, source: str = "directory") -> dict:
    """A node document: {"node", "owner", "addresses": [...], "overlay": [...]}."""
    if not isinstance(doc, dict):
        raise ConfigError(f"node document is not an object: {doc!r}", source=source)
    for f in NODE_FIELDS:
        if f not in doc:
            raise ConfigError(f"node document lacks {f!r}", source=source, field=f)
    for f in ("node", "owner"):
        if not isinstance(doc[f], str) or not doc[f]:
            raise ConfigError(f"{f} must be a non-empty string", source=source, field=f,
                              value=doc[f])
    for f, most in (("addresses", MAX_NODE_ADDRESSES), ("overlay", MAX_NODE_OVERLAY)):
        v = doc[f]
        if not isinstance(v, list) or len(v) > most:
            raise ConfigError(f"{f} must be a list of at most {most} addresses",
                              source=source, field=f)
        for a in v:
            _addr(a, source, f)
    return doc


def node_document(node: str, owner: str, addresses: Iterable, overlay: Iterable) -> dict:
    """What an agent publishes about itself: only usable host addresses."""
    hosts = sorted({ip_address(a) for a in addresses
                    if unusable_host_addr(ip_address(a)) is None}, key=lambda a: (a.version, a))
    ov = sorted({ip_address(a) for a in overlay}, key=lambda a: (a.version, a))
    return {"node": node, "owner": owner, "addresses": [str(a) for a in hosts],
            "overlay": [str(a) for a in ov][:MAX_NODE_OVERLAY]}


@dataclass(frozen=True)
class Conflict:
    key: str
    winner: dict
    loser: dict

    def __str__(self) -> str:
        w, lo = self.winner, self.loser
        return (f"overlay {self.key} is published by {w['node']}/{w['container']}; "
                f"{lo['node']}/{lo['container']} may not publish it too")


@dataclass(frozen=True)
class Rejected:
    owner: str
    key: str
    reason: str
    record: dict

    def __str__(self) -> str:
        return f"record {self.key} under {self.owner!r} rejected: {self.reason}"


def judge_record(r: dict, owner: str, node: dict | None) -> str | None:
    """Why a (syntactically valid) record published under `owner` may not be
    followed, given that owner's node document; None if it may."""
    return _judge(r, owner, None if node is None else _NodeView.of(node))


@dataclass(frozen=True)
class _NodeView:
    name: str
    hosts: frozenset
    overlay: frozenset

    @classmethod
    def of(cls, node: dict) -> "_NodeView":
        return cls(node["node"], frozenset(ip_address(a) for a in node["addresses"]),
                   frozenset(ip_address(a) for a in node["overlay"]))


def _judge(r: dict, owner: str, node: _NodeView | None) -> str | None:
    if r["owner"] != owner:
        return f"names owner {r['owner']!r} but was published by {owner!r}"
    if node is None:
        return f"{owner!r} published no node document"
    if r["node"] != node.name:
        return f"names node {r['node']!r} but {owner!r} is node {node.name!r}"
    host = ip_address(r["host_addr"])
    if host not in node.hosts:
        return f"host_addr {host} is not an address of node {node.name!r}"
    if ip_address(r["overlay"]) not in node.overlay:
        return f"overlay {r['overlay']} is not a container address of node {node.name!r}"
    return None


def admit(by_owner: Mapping[str, Iterable[dict]], nodes: Mapping[str, dict],
          seen: Mapping[tuple[str, str], float],
          node_seen: Mapping[str, float] | None = None,
          ) -> tuple[dict[str, dict], list[Conflict], list[Rejected]]:
    """Check every owner's records (check_record: syntax and host address
    class) and judge them against its node document, stamp each
    with the reader's `since` (seen[(owner, key)]; unknown: +inf, i.e. last),
    and merge. Returns (table, conflicts, rejected).

    An overlay or host address belongs to the node whose document claimed it
    first (node_seen[owner], as the reader observed it; ties: owner name): a
    later node document claiming a container or an address of another node
    gets nothing through it."""
    node_seen = node_seen or {}
    claims: dict[object, str] = {}
    views: dict[str, _NodeView] = {}
    for owner in sorted(nodes, key=lambda o: (node_seen.get(o, float("inf")), o)):
        view = _NodeView.of(nodes[owner])
        views[owner] = view
        for a in (*(("h", h) for h in view.hosts), *(("o", o) for o in view.overlay)):
            claims.setdefault(a, owner)
    ok: dict[str, list[dict]] = {}
    rejected: list[Rejected] = []
    for owner in sorted(by_owner):
        node = views.get(owner)
        for r in by_owner[owner]:
            try:
                check_record(r, owner)
            except ConfigError as exc:
                rejected.append(Rejected(owner, _safe_key(r), str(exc),
                                         r if isinstance(r, dict) else {}))
                continue
            k = record_key(r)
            why = _judge(r, owner, node)
            if why is None:
                for kind, a, what in (("o", ip_address(r["overlay"]), "overlay"),
                                      ("h", ip_address(r["host_addr"]), "host address")):
                    first = claims.get((kind, a), owner)
                    if first != owner:
                        why = (f"{what} {a} belongs to {first!r}, whose node document "
                               "claimed it first")
                        break
            if why is not None:
                rejected.append(Rejected(owner, k, why, r))
                continue
            ok.setdefault(owner, []).append(
                dict(r, since=seen.get((owner, k), float("inf"))))
    table, conflicts = merge(ok)
    return table, conflicts, rejected


def _safe_key(r: object) -> str:
    try:
        return record_key(r)            # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return "?"


def merge(by_owner: Mapping[str, Iterable[dict]]) -> tuple[dict[str, dict], list[Conflict]]:
    """One table {key: record}; the earliest `since` (as the reader stamped
    it) wins a contested key (ties: the smaller owner name), the same
    container republishing wins over its own older record."""
    table: dict[str, dict] = {}
    conflicts: list[Conflict] = []
    for owner in sorted(by_owner):
        for r in by_owner[owner]:
            k = record_key(r)
            cur = table.get(k)
            if cur is None:
                table[k] = r
                continue
            if (cur["owner"], cur["container"]) == (r["owner"], r["container"]):
                if r["since"] >= cur["since"]:
                    table[k] = r
                continue
            if (r["since"], r["owner"]) < (cur["since"], cur["owner"]):
                table[k], r, cur = r, cur, r
            conflicts.append(Conflict(k, table[k], r))
    return table, conflicts


__all__ = ["FIELDS", "NODE_FIELDS", "key", "record_key", "check_record", "check_node",
           "node_document", "unusable_host_addr", "judge_record", "admit", "merge",
           "Conflict", "Rejected"]
