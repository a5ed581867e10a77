"""The cluster directory of grafted services: what a record is, its key, and
how the records of every agent merge into one lookup table.

A record says: the grafted server of `container` (on node `node`, agent
`owner`) is reachable at overlay address:port/proto, and its host socket
really listens on host_addr:host_port. Clients' agents (and the cgroup
programs) connect straight there: no overlay encapsulation.

Pure: records are plain dicts (JSON on the wire and on disk) checked by
`check_record`; `merge` turns {owner: [records]} into the table and the
conflicts. Two containers may never publish the same overlay key: the
record published first wins, the other is a conflict its agent withdraws
(and reports).
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import ip_address
from typing import Iterable

from ..errors import ConfigError

FIELDS = ("overlay", "port", "proto", "host_addr", "host_port", "node", "owner",
          "container", "since")


def key(proto: str, overlay: str, port: int) -> str:
    return f"{proto}/{ip_address(overlay)}/{port}"


def record_key(r: dict) -> str:
    return key(r["proto"], r["overlay"], r["port"])


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
    for f in ("overlay", "host_addr"):
        try:
            ip_address(r[f])
        except (ValueError, TypeError):
            raise ConfigError(f"{f} {r[f]!r} is not an IP address", source=source, field=f,
                              value=r[f]) from None
    for f in ("port", "host_port"):
        v = r[f]
        if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= 65535:
            raise ConfigError(f"{f} {v!r} is not a port 1-65535", source=source, field=f,
                              value=v)
    if ip_address(r["overlay"]).version != ip_address(r["host_addr"]).version:
        raise ConfigError("overlay and host addresses of different families", source=source,
                          field="host_addr", value=r["host_addr"])
    for f in ("node", "owner", "container"):
        if not isinstance(r[f], str) or not r[f]:
            raise ConfigError(f"{f} must be a non-empty string", source=source, field=f,
                              value=r[f])
    if not isinstance(r["since"], (int, float)):
        raise ConfigError("since must be a time", source=source, field="since",
                          value=r["since"])
    return r


@dataclass(frozen=True)
class Conflict:
    key: str
    winner: dict
    loser: dict

    def __str__(self) -> str:
        w, lo = self.winner, self.loser
        return (f"overlay {self.key} is published by {w['node']}/{w['container']}; "
                f"{lo['node']}/{lo['container']} may not publish it too")


def merge(by_owner: dict[str, Iterable[dict]]) -> tuple[dict[str, dict], list[Conflict]]:
    """One table {key: record}; the earliest `since` wins a contested key
    (ties: the smaller owner name), the same container republishing wins over
    its own older record."""
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


__all__ = ["FIELDS", "key", "record_key", "check_record", "merge", "Conflict"]
