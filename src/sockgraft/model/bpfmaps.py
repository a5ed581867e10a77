"""The bytes of sockgraft's BPF maps: one container's policy, egress rules and
the directory's services, laid out exactly as bpf/sockgraft.bpf.c reads them.

Pure: GraftConfig / Policy in, (key bytes, value bytes) out; events decoded
from the ring buffer's raw records. kernel/bpf.py writes the bytes; the agent
decides which containers get entries (those grafted at socket() time).

Egress entries carry a generation number: the agent writes a container's new
rule set under gen+1, then flips the generation in its policy entry (a
single atomic map update), then deletes the old generation. A connect in
flight sees either the old or the new rule set, never a mix.

Layouts (little endian host order unless noted; addresses and ports of
sockaddrs are network order, as the kernel hands them to the program):

  sg_policy      key u32 mark -> struct policy (flags, nrules, default verdict
                 and label, gen, 64 x struct rule)
  sg_egress4/6   LPM key {prefixlen = 64 + plen, mark, gen, port(be), addr}
                 -> {plen, label, src[4], src_port(be), src_family}
  sg_services(_rev) {addr[4], port(be), family, proto} -> {addr[4], port(be), family}
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from ..errors import ConfigError
from .graftconfig import GraftConfig
from .policy import LinearRule, Policy, linearize

MAX_RULES = 64
F_SOCKET_MODE = 1
V_DENY, V_ALLOW = 0, 1
IPPROTO_TCP, IPPROTO_UDP = 6, 17
PROTO_NUM = {"any": 0, "tcp": IPPROTO_TCP, "udp": IPPROTO_UDP}
PROTO_NAME = {IPPROTO_TCP: "tcp", IPPROTO_UDP: "udp"}

EV_DENY_POLICY, EV_DENY_NO_EGRESS, EV_BIND_FAILED = 1, 2, 3
OP_NAMES = {1: "connect", 2: "sendmsg"}

# struct rule: addr[4], mask[4] (network order words), port_lo, port_hi,
# family, proto, verdict, pad, label
RULE = struct.Struct("=4I4IHHBBBBI")
POLICY_HEAD = struct.Struct("=IIIIHHI")
POLICY_SIZE = POLICY_HEAD.size + MAX_RULES * RULE.size
EGRESS4_KEY = struct.Struct("=IIHH4s")
EGRESS6_KEY = struct.Struct("=IIHH16s")
EGRESS_VAL = struct.Struct("=II16sHBB")
SVC_KEY = struct.Struct("=16sHBB")
SVC_VAL = struct.Struct("=16sHBB")
EVENT = struct.Struct("=IIII16sHBBI")


def _words(packed: bytes) -> tuple[int, int, int, int]:
    """Network-order address bytes (padded to 16) as the four u32 words the
    program compares (in host order, as loaded from memory)."""
    return struct.unpack("=4I", packed.ljust(16, b"\0"))


def _rule_bytes(r: LinearRule, label: int) -> bytes:
    if r.network is None:
        addr = mask = (0, 0, 0, 0)
        family = 0
    else:
        addr = _words(r.network.network_address.packed)
        mask = _words(r.network.netmask.packed)
        family = r.network.version
    return RULE.pack(*addr, *mask, r.port_lo, r.port_hi, family, PROTO_NUM[r.proto],
                     V_ALLOW if r.allow else V_DENY, 0, label)


@dataclass(frozen=True)
class PolicyEntry:
    value: bytes
    labels: tuple[str, ...]     # label index -> rule name for audit lines


def policy_key(mark: int) -> bytes:
    """sg_policy's key: the container's mark, a u32 in host order."""
    return mark.to_bytes(4, "little")


def policy_entry(policy: Policy, gen: int, *, socket_mode: bool = True) -> PolicyEntry:
    rules, final = linearize(policy)
    if len(rules) > MAX_RULES:
        raise ConfigError(f"policy compiles to {len(rules)} rules; the in-kernel enforcer "
                          f"holds at most {MAX_RULES} (built-in categories count 8)",
                          field="policy", value=len(rules))
    labels = tuple(r.label for r in rules) + (final.label,)
    body = b"".join(_rule_bytes(r, i) for i, r in enumerate(rules))
    body = body.ljust(MAX_RULES * RULE.size, b"\0")
    head = POLICY_HEAD.pack(F_SOCKET_MODE if socket_mode else 0, len(rules),
                            V_ALLOW if final.allow else V_DENY, len(rules), gen & 0xFFFF, 0, 0)
    return PolicyEntry(head + body, labels)


def _be16(port: int) -> int:
    """A port in network order, as the u16 the program loads."""
    return struct.unpack("=H", struct.pack("!H", port))[0]


def egress_entries(cfg: GraftConfig, mark: int, gen: int
                   ) -> tuple[list[tuple[bytes, bytes]], list[tuple[bytes, bytes]], list[str]]:
    """(v4 entries, v6 entries, labels) for the container's egress rules under
    generation `gen`. label index i names cfg.egress rule i."""
    v4: list[tuple[bytes, bytes]] = []
    v6: list[tuple[bytes, bytes]] = []
    labels = []
    for i, rule in enumerate(cfg.egress):
        ep = cfg.endpoints[rule.endpoint]
        labels.append(f"egress {rule}")
        net = rule.network
        port_be = _be16(rule.port) if rule.port is not None else 0
        src = ep.addr
        assert src is not None
        val = EGRESS_VAL.pack(net.prefixlen, i, src.packed.ljust(16, b"\0"),
                              _be16(ep.port or 0), src.version, 0)
        if net.version == 4:
            key = EGRESS4_KEY.pack(64 + net.prefixlen, mark, gen & 0xFFFF, port_be,
                                   net.network_address.packed)
            v4.append((key, val))
        else:
            key = EGRESS6_KEY.pack(64 + net.prefixlen, mark, gen & 0xFFFF, port_be,
                                   net.network_address.packed)
            v6.append((key, val))
    return v4, v6, labels


def svc_key(addr: IPv4Address | IPv6Address, port: int, proto: str) -> bytes:
    return SVC_KEY.pack(addr.packed.ljust(16, b"\0"), _be16(port), addr.version,
                        PROTO_NUM[proto])


def svc_val(addr: IPv4Address | IPv6Address, port: int) -> bytes:
    return SVC_VAL.pack(addr.packed.ljust(16, b"\0"), _be16(port), addr.version, 0)


@dataclass(frozen=True)
class Event:
    kind: int
    mark: int
    op: str
    label: int
    address: str
    proto: str
    pid: int

    @property
    def reason(self) -> str:
        return {EV_DENY_POLICY: "policy", EV_DENY_NO_EGRESS: "egress:no-rule",
                EV_BIND_FAILED: "egress:bind-failed"}.get(self.kind, f"kind {self.kind}")


def decode_event(raw: bytes) -> Event:
    if len(raw) < EVENT.size:
        raise ValueError(f"event of {len(raw)} bytes, expected {EVENT.size}")
    kind, mark, op, label, addr, port_, family, proto, pid = EVENT.unpack_from(raw)
    if family == 4:
        a = f"{IPv4Address(addr[:4])}:{port_}"
    else:
        a = f"[{IPv6Address(addr)}]:{port_}"
    return Event(kind, mark, OP_NAMES.get(op, str(op)), label, a,
                 PROTO_NAME.get(proto, str(proto)), pid)


__all__ = ["MAX_RULES", "PolicyEntry", "policy_key", "policy_entry", "egress_entries",
           "svc_key", "svc_val", "Event", "decode_event", "POLICY_SIZE"]
