"""Socket addresses as the kernel sees them: parse and pack struct sockaddr_*.

Owns: the byte layouts of `struct sockaddr_in` (<linux/in.h>), `struct
sockaddr_in6` (<linux/in6.h>), `struct sockaddr_un` (<linux/un.h>) and the
AF_UNSPEC header, plus the kernel's own length rules for them, so that the
agent can answer a trapped bind/connect/sendto with exactly the errno the
kernel would have given.

Must not: touch sockets, read process memory, or decide anything about
grafting or policy. Input is bytes already copied out of the target; output
is a plain frozen dataclass.

Length rules mirrored here (net/socket.c move_addr_to_kernel, then the
protocol's own checks):

    addrlen < 0 or addrlen > 128 (sizeof sockaddr_storage)  -> EINVAL
    fewer than addrlen bytes readable                         -> EFAULT
    addrlen < 2 (no room for sa_family)                       -> EINVAL
    AF_INET  with addrlen < 16                                -> EINVAL
    AF_INET6 with addrlen < 24 (SIN6_LEN_RFC2133)             -> EINVAL
             (24..27 bytes: scope_id is not read, taken as 0)
    AF_UNIX  with addrlen > 110 (sizeof sockaddr_un)          -> EINVAL

AF_UNIX with addrlen == 2 parses as the unnamed address (UnixAddr(b"",
False)): the kernel autobinds on bind() but answers EINVAL on connect(); that
difference is the caller's to apply, since this module does not know which
syscall is being served. Which family a given socket accepts (EAFNOSUPPORT,
the AF_UNSPEC-bind compatibility quirk of IPv4) is also the caller's.
"""

from __future__ import annotations

import errno as _errno
import struct
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from sockgraft.errors import SockaddrError

__all__ = [
    "AF_UNSPEC", "AF_UNIX", "AF_INET", "AF_INET6",
    "SOCKADDR_STORAGE_LEN", "SOCKADDR_IN_LEN", "SOCKADDR_IN6_LEN",
    "SIN6_LEN_RFC2133", "SOCKADDR_UN_LEN", "UNIX_PATH_MAX",
    "SockaddrError", "InetAddr", "UnixAddr", "UnspecAddr", "OtherAddr",
    "Sockaddr", "parse_sockaddr", "pack_sockaddr",
]

# Linux values (include/linux/socket.h); kept here so this module needs no
# `socket` import and means the same on every build host.
AF_UNSPEC = 0
AF_UNIX = 1
AF_INET = 2
AF_INET6 = 10

SOCKADDR_STORAGE_LEN = 128   # sizeof(struct __kernel_sockaddr_storage)
SOCKADDR_IN_LEN = 16         # sizeof(struct sockaddr_in)
SOCKADDR_IN6_LEN = 28        # sizeof(struct sockaddr_in6)
SIN6_LEN_RFC2133 = 24        # sockaddr_in6 without sin6_scope_id
SOCKADDR_UN_LEN = 110        # sizeof(struct sockaddr_un)
UNIX_PATH_MAX = 108          # sizeof(sun_path)

# Family is host order (sa_family_t), ports/flowinfo network order, the v6
# scope id host order: hence the mixed formats.
_FAMILY = struct.Struct("=H")
_SIN_BODY = struct.Struct("!H4s")           # port, addr (after family)
_SIN6_BODY = struct.Struct("!HI16s")        # port, flowinfo, addr
_SCOPE = struct.Struct("=I")


@dataclass(frozen=True, slots=True)
class InetAddr:
    """An AF_INET or AF_INET6 address with port (host byte order ints)."""

    family: int
    ip: IPv4Address | IPv6Address
    port: int
    flowinfo: int = 0
    scope_id: int = 0

    def __post_init__(self) -> None:
        if self.family == AF_INET:
            if not isinstance(self.ip, IPv4Address):
                raise ValueError(f"AF_INET address needs an IPv4Address, got {self.ip!r}")
            if self.flowinfo or self.scope_id:
                raise ValueError("AF_INET address has no flowinfo/scope_id")
        elif self.family == AF_INET6:
            if not isinstance(self.ip, IPv6Address):
                raise ValueError(f"AF_INET6 address needs an IPv6Address, got {self.ip!r}")
            if not 0 <= self.flowinfo <= 0xFFFFFFFF or not 0 <= self.scope_id <= 0xFFFFFFFF:
                raise ValueError("flowinfo/scope_id must fit in 32 bits")
        else:
            raise ValueError(f"InetAddr family must be AF_INET or AF_INET6, got {self.family}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} out of range 0-65535")

    @classmethod
    def of(cls, ip: str | IPv4Address | IPv6Address, port: int) -> InetAddr:
        """Convenience constructor: family follows the address."""
        if isinstance(ip, str):
            from ipaddress import ip_address
            ip = ip_address(ip)
        return cls(AF_INET if ip.version == 4 else AF_INET6, ip, port)

    @property
    def is_mapped(self) -> bool:
        """True for an IPv4-mapped IPv6 address (::ffff:a.b.c.d)."""
        return self.family == AF_INET6 and self.ip.ipv4_mapped is not None

    def unmapped(self) -> InetAddr:
        """::ffff:a.b.c.d:P -> a.b.c.d:P (AF_INET); anything else unchanged.

        A v6 socket talking to a mapped address really talks IPv4, so every
        decision about where it goes must look at this form.
        """
        if self.family == AF_INET6:
            v4 = self.ip.ipv4_mapped
            if v4 is not None:
                return InetAddr(AF_INET, v4, self.port)
        return self

    @property
    def is_wildcard(self) -> bool:
        """0.0.0.0 or :: (INADDR_ANY / in6addr_any).

        ::ffff:0.0.0.0 is not the dual-stack wildcard (it binds IPv4 only);
        use `unmapped().is_wildcard` to treat it as the IPv4 wildcard.
        """
        return self.ip.is_unspecified

    def __str__(self) -> str:
        if self.family == AF_INET:
            return f"{self.ip}:{self.port}"
        scope = f"%{self.scope_id}" if self.scope_id else ""
        v4 = self.ip.ipv4_mapped
        # Python 3.11 prints ::ffff:1.2.3.4 as ::ffff:102:304; audit lines
        # must show the IPv4 it really is.
        text = f"::ffff:{v4}" if v4 is not None else str(self.ip)
        return f"[{text}{scope}]:{self.port}"


@dataclass(frozen=True, slots=True)
class UnixAddr:
    """An AF_UNIX address.

    abstract=False, path=b"/run/x.sock": a filesystem path (no NUL).
    abstract=True,  path=b"name": the abstract name *without* its leading NUL
    (may contain NULs; its length is significant).
    abstract=False, path=b"": the unnamed address (addrlen == 2).
    """

    path: bytes
    abstract: bool = False

    def __post_init__(self) -> None:
        if self.abstract:
            if len(self.path) > UNIX_PATH_MAX - 1:
                raise ValueError(f"abstract name longer than {UNIX_PATH_MAX - 1} bytes")
        else:
            if b"\0" in self.path:
                raise ValueError("unix path contains NUL")
            if len(self.path) > UNIX_PATH_MAX:
                raise ValueError(f"unix path longer than {UNIX_PATH_MAX} bytes")

    @property
    def is_unnamed(self) -> bool:
        return not self.abstract and not self.path

    def __str__(self) -> str:
        if self.abstract:
            return "@" + self.path.decode("utf-8", "backslashreplace")
        return self.path.decode("utf-8", "backslashreplace") or "(unnamed)"


@dataclass(frozen=True, slots=True)
class UnspecAddr:
    """sa_family == AF_UNSPEC (connect: dissolve association). `raw` is all addrlen bytes."""

    raw: bytes = b"\0\0"


@dataclass(frozen=True, slots=True)
class OtherAddr:
    """A family this project does not interpret (AF_NETLINK, AF_PACKET, ...)."""

    family: int
    raw: bytes = b""


Sockaddr = InetAddr | UnixAddr | UnspecAddr | OtherAddr


def parse_sockaddr(data: bytes, addrlen: int) -> Sockaddr:
    """Interpret the first `addrlen` bytes of `data` as the kernel would.

    `data` may be longer than addrlen (the tail is ignored); shorter means the
    target's memory was not all readable, which the kernel reports as EFAULT.
    Raises SockaddrError with the kernel's errno.
    """
    if addrlen < 0 or addrlen > SOCKADDR_STORAGE_LEN:
        raise SockaddrError(_errno.EINVAL,
                            f"addrlen {addrlen} outside 0-{SOCKADDR_STORAGE_LEN}")
    if len(data) < addrlen:
        raise SockaddrError(_errno.EFAULT,
                            f"only {len(data)} of addrlen {addrlen} bytes readable")
    if addrlen < _FAMILY.size:
        raise SockaddrError(_errno.EINVAL, f"addrlen {addrlen} too short for sa_family")
    buf = bytes(data[:addrlen])
    (family,) = _FAMILY.unpack_from(buf)

    if family == AF_INET:
        if addrlen < SOCKADDR_IN_LEN:
            raise SockaddrError(_errno.EINVAL,
                                f"AF_INET addrlen {addrlen} < {SOCKADDR_IN_LEN}")
        port, raw = _SIN_BODY.unpack_from(buf, 2)
        return InetAddr(AF_INET, IPv4Address(raw), port)

    if family == AF_INET6:
        if addrlen < SIN6_LEN_RFC2133:
            raise SockaddrError(_errno.EINVAL,
                                f"AF_INET6 addrlen {addrlen} < {SIN6_LEN_RFC2133}")
        port, flowinfo, raw = _SIN6_BODY.unpack_from(buf, 2)
        scope_id = _SCOPE.unpack_from(buf, 24)[0] if addrlen >= SOCKADDR_IN6_LEN else 0
        return InetAddr(AF_INET6, IPv6Address(raw), port, flowinfo, scope_id)

    if family == AF_UNIX:
        if addrlen > SOCKADDR_UN_LEN:
            raise SockaddrError(_errno.EINVAL,
                                f"AF_UNIX addrlen {addrlen} > {SOCKADDR_UN_LEN}")
        sun_path = buf[2:]
        if not sun_path:
            return UnixAddr(b"", False)
        if sun_path[0] == 0:
            return UnixAddr(sun_path[1:], True)
        # Pathname sockets end at the first NUL, or at addrlen if none
        # (the kernel terminates the copy itself: unix_mkname_bsd).
        return UnixAddr(sun_path.split(b"\0", 1)[0], False)

    if family == AF_UNSPEC:
        return UnspecAddr(buf)
    return OtherAddr(family, buf)


def pack_sockaddr(addr: Sockaddr) -> bytes:
    """The bytes a program would pass; len() of the result is the addrlen to use."""
    if isinstance(addr, InetAddr):
        if addr.family == AF_INET:
            return (_FAMILY.pack(AF_INET) + _SIN_BODY.pack(addr.port, addr.ip.packed)
                    + bytes(8))
        return (_FAMILY.pack(AF_INET6)
                + _SIN6_BODY.pack(addr.port, addr.flowinfo, addr.ip.packed)
                + _SCOPE.pack(addr.scope_id))
    if isinstance(addr, UnixAddr):
        head = _FAMILY.pack(AF_UNIX)
        if addr.abstract:
            return head + b"\0" + addr.path
        if not addr.path:
            return head
        # A full 108-byte path has no room for the NUL; the kernel accepts that.
        return head + addr.path + (b"\0" if len(addr.path) < UNIX_PATH_MAX else b"")
    if isinstance(addr, UnspecAddr):
        return addr.raw or _FAMILY.pack(AF_UNSPEC)
    if isinstance(addr, OtherAddr):
        return addr.raw or _FAMILY.pack(addr.family)
    raise TypeError(f"not a sockaddr: {addr!r}")
