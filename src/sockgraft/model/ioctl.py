"""Socket ioctls of a grafted container: which the filter traps, and what the
agent does with one (pure; agent/ioctls.py carries it out).

Why: the kernel answers the interface, address and ARP ioctls (`SIOCGIF*`,
`SIOCGIFCONF`, `SIOCGARP`...) from the namespace of the *socket* they are
called on (sock_ioctl -> sock_net(sk)). On a grafted socket - a host socket
- that is the host's: a container read the host's interfaces, addresses,
MACs and ARP table through any grafted fd (`if_nametoindex`-style code on an
AF_INET socket got the host's numbers), and one with CAP_NET_ADMIN would have
configured the host's interfaces, routes and ARP entries.

What the filter traps: ioctl() whose command is of the socket ioctl types
(`_IOC_TYPE` 0x89, and 0x8B: wireless extensions), whatever fd it names -
an fd is not something a filter can see, and the agent must not judge it
and then let the kernel run the call (another thread may put a grafted
socket at that number in between). The commands that only concern the
socket they are called on (`PER_SOCKET`) are not trapped at all.

What the agent answers (`decide`), for every fd alike:
- `Emulate`: the commands of `COMMANDS` - fixed-size arguments the agent
  copies in and out of the caller's memory - run by the agent in the
  caller's network namespace: on the caller's own socket when that is in
  its namespace (the exact native answer), else on a socket of the same
  family the agent makes there. Commands that change something need
  CAP_NET_ADMIN in the caller's effective set, as the kernel would ask.
- `Refuse(ENOTTY)`: every other trapped command (ethtool, bridge, VLAN,
  bonding, wireless, route, private and unknown commands): their arguments
  point further into the caller's memory. Tools fall back to netlink
  (ethtool, ip, brctl's successors); documented as a limitation.
- a non-socket fd: ENOTTY (what files answer these commands).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

AF_INET, AF_INET6 = 2, 10

IOC_TYPE_MASK = 0xFF00
SOCK_IOC_TYPES = (0x8900, 0x8B00)       # socket ioctls, wireless extensions

# the commands that act on the socket itself (owner, OOB mark, timestamps,
# unsent bytes): safe on any socket, never trapped
PER_SOCKET = frozenset({
    0x8901,         # FIOSETOWN
    0x8902,         # SIOCSPGRP
    0x8903,         # FIOGETOWN
    0x8904,         # SIOCGPGRP
    0x8905,         # SIOCATMARK
    0x8906,         # SIOCGSTAMP_OLD
    0x8907,         # SIOCGSTAMPNS_OLD
    0x80108906,     # SIOCGSTAMP_NEW
    0x80108907,     # SIOCGSTAMPNS_NEW
    0x894B,         # SIOCOUTQNSD
})

IFREQ = 40          # sizeof(struct ifreq) on x86_64
IN6_IFREQ = 24      # sizeof(struct in6_ifreq): AF_INET6's address commands
IFCONF = 16         # sizeof(struct ifconf): int, pad, pointer
ARPREQ = 68         # sizeof(struct arpreq)
IFCONF_MAX = 64 * 1024      # bytes of ifreq records handed back at most (1638 records)

SIOCGIFCONF = 0x8912
SIOCGSKNS = 0x894C


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    size: int               # bytes of the argument struct (IFCONF: the header)
    sets: bool              # changes something: CAP_NET_ADMIN, nothing copied back
    in6_size: int = 0       # another size on an AF_INET6 socket (in6_ifreq)


def _cmds(*rows: tuple[int, str, int, bool]) -> dict[int, Command]:
    return {nr: Command(name, size, sets) for nr, name, size, sets in rows}


COMMANDS: dict[int, Command] = _cmds(
    (0x8910, "SIOCGIFNAME", IFREQ, False),
    (SIOCGIFCONF, "SIOCGIFCONF", IFCONF, False),
    (0x8913, "SIOCGIFFLAGS", IFREQ, False),
    (0x8914, "SIOCSIFFLAGS", IFREQ, True),
    (0x8915, "SIOCGIFADDR", IFREQ, False),
    (0x8917, "SIOCGIFDSTADDR", IFREQ, False),
    (0x8919, "SIOCGIFBRDADDR", IFREQ, False),
    (0x891A, "SIOCSIFBRDADDR", IFREQ, True),
    (0x891B, "SIOCGIFNETMASK", IFREQ, False),
    (0x891C, "SIOCSIFNETMASK", IFREQ, True),
    (0x891D, "SIOCGIFMETRIC", IFREQ, False),
    (0x891E, "SIOCSIFMETRIC", IFREQ, True),
    (0x8921, "SIOCGIFMTU", IFREQ, False),
    (0x8922, "SIOCSIFMTU", IFREQ, True),
    (0x8923, "SIOCSIFNAME", IFREQ, True),
    (0x8924, "SIOCSIFHWADDR", IFREQ, True),
    (0x8927, "SIOCGIFHWADDR", IFREQ, False),
    (0x8931, "SIOCADDMULTI", IFREQ, True),
    (0x8932, "SIOCDELMULTI", IFREQ, True),
    (0x8933, "SIOCGIFINDEX", IFREQ, False),
    (0x8934, "SIOCSIFPFLAGS", IFREQ, True),
    (0x8935, "SIOCGIFPFLAGS", IFREQ, False),
    (0x8937, "SIOCSIFHWBROADCAST", IFREQ, True),
    (0x8942, "SIOCGIFTXQLEN", IFREQ, False),
    (0x8943, "SIOCSIFTXQLEN", IFREQ, True),
    (0x8953, "SIOCDARP", ARPREQ, True),
    (0x8954, "SIOCGARP", ARPREQ, False),
    (0x8955, "SIOCSARP", ARPREQ, True),
    (0x8970, "SIOCGIFMAP", IFREQ, False),
    (0x8971, "SIOCSIFMAP", IFREQ, True),
)
# the address commands take a struct in6_ifreq on an AF_INET6 socket
for _nr, _name in ((0x8916, "SIOCSIFADDR"), (0x8918, "SIOCSIFDSTADDR"), (0x8936, "SIOCDIFADDR")):
    COMMANDS[_nr] = Command(_name, IFREQ, True, IN6_IFREQ)

CAP_NET_ADMIN = 12


def trapped(cmd: int) -> bool:
    """Does the filter trap ioctl(fd, cmd, ...)? (low 32 bits: the kernel's
    cmd is an unsigned int)"""
    cmd &= 0xFFFFFFFF
    return cmd not in PER_SOCKET and (cmd & IOC_TYPE_MASK) in SOCK_IOC_TYPES


@dataclass(frozen=True, slots=True)
class Emulate:
    cmd: int
    command: Command
    size: int               # bytes to copy in (and out, for a get)


@dataclass(frozen=True, slots=True)
class Refuse:
    errno: int
    why: str


def decide(cmd: int, family: int | None, caps_effective: int | None) -> Emulate | Refuse:
    """What the agent answers a trapped ioctl with. family: SO_DOMAIN of the
    fd's socket (None: not a socket); caps_effective: the caller's CapEff
    bits (None: unknown - a command that sets something is refused)."""
    cmd &= 0xFFFFFFFF
    if family is None:
        return Refuse(errno.ENOTTY, "not a socket")
    c = COMMANDS.get(cmd)
    net_admin = caps_effective is not None and bool(caps_effective >> CAP_NET_ADMIN & 1)
    if cmd == SIOCGSKNS and not net_admin:
        return Refuse(errno.EPERM, "SIOCGSKNS needs CAP_NET_ADMIN")     # (as natively)
    if c is None:
        return Refuse(errno.ENOTTY, f"command {cmd:#x} not answered for a grafted container")
    if c.sets and not net_admin:
        return Refuse(errno.EPERM, f"{c.name} needs CAP_NET_ADMIN")
    size = c.in6_size if family == AF_INET6 and c.in6_size else c.size
    return Emulate(cmd, c, size)


def caps_over_netns(caps: int | None, caller_userns: int, owner_userns: int,
                    agent_userns: int) -> int:
    """The caller's effective capabilities (CapEff: counted in its own user
    namespace) that count over its network namespace, whose owner is
    owner_userns: all of them if its user namespace owns the network
    namespace or is the agent's (the initial one, whose capabilities count
    in every namespace), else none - a container that made a user namespace
    of its own (unshare -U: every capability there) has none over the
    network namespace it still sits in."""
    if caps is None or caller_userns not in (owner_userns, agent_userns):
        return 0
    return caps


def ifconf_length(requested: int) -> int:
    """Bytes of records the agent asks the kernel for, for an ifc_len the
    caller passed (negative: none, as the kernel lists none)."""
    return max(0, min(requested, IFCONF_MAX))
