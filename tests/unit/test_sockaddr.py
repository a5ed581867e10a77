"""Golden bytes and the kernel's length rules for sockgraft.model.sockaddr."""

from __future__ import annotations

import errno
import sys
from ipaddress import IPv4Address, IPv6Address

import pytest

from sockgraft.errors import SockgraftError
from sockgraft.model.sockaddr import (AF_INET, AF_INET6, AF_UNIX, AF_UNSPEC, InetAddr,
                                      OtherAddr, SockaddrError, UnixAddr, UnspecAddr,
                                      pack_sockaddr, parse_sockaddr)

pytestmark = pytest.mark.unit


def fam(n: int) -> bytes:
    """sa_family_t is host byte order."""
    return n.to_bytes(2, sys.byteorder)


# struct sockaddr_in for 192.0.2.1:80, written out byte by byte.
SIN_192_0_2_1_80 = fam(2) + b"\x00\x50" + b"\xc0\x00\x02\x01" + b"\0" * 8
# struct sockaddr_in6 for [2001:db8::1]:443, flowinfo 0x12345, scope_id 7.
SIN6_DB8_443 = (fam(10) + b"\x01\xbb" + b"\x00\x01\x23\x45"
                + bytes.fromhex("20010db8000000000000000000000001")
                + (7).to_bytes(4, sys.byteorder))

GOLDEN = [
    pytest.param(SIN_192_0_2_1_80, InetAddr(AF_INET, IPv4Address("192.0.2.1"), 80), id="in"),
    pytest.param(SIN6_DB8_443,
                 InetAddr(AF_INET6, IPv6Address("2001:db8::1"), 443, 0x12345, 7), id="in6"),
    pytest.param(fam(10) + b"\x1f\x90" + b"\0" * 4 + b"\0" * 16 + b"\0" * 4,
                 InetAddr(AF_INET6, IPv6Address("::"), 8080), id="in6-any"),
    pytest.param(fam(10) + b"\x00\x35" + b"\0" * 4 + bytes.fromhex("00000000000000000000ffff7f000001")
                 + b"\0" * 4,
                 InetAddr(AF_INET6, IPv6Address("::ffff:127.0.0.1"), 53), id="in6-mapped"),
    pytest.param(fam(1) + b"/run/x.sock\0", UnixAddr(b"/run/x.sock"), id="un-path"),
    pytest.param(fam(1) + b"\0abs\0x", UnixAddr(b"abs\0x", abstract=True), id="un-abstract"),
    pytest.param(fam(1), UnixAddr(b""), id="un-unnamed"),
    pytest.param(fam(1) + b"/" + b"a" * 107, UnixAddr(b"/" + b"a" * 107), id="un-108-no-nul"),
    pytest.param(fam(0) + b"\0" * 14, UnspecAddr(fam(0) + b"\0" * 14), id="unspec"),
    pytest.param(fam(16) + b"\0" * 10, OtherAddr(16, fam(16) + b"\0" * 10), id="netlink"),
]


@pytest.mark.parametrize("raw, addr", GOLDEN)
def test_golden_parse_and_pack(raw: bytes, addr) -> None:
    assert parse_sockaddr(raw, len(raw)) == addr
    assert pack_sockaddr(addr) == raw


@pytest.mark.parametrize("data, addrlen, expect", [
    # kernel copies only addrlen bytes: trailing junk is ignored
    (SIN_192_0_2_1_80 + b"junk", 16, InetAddr.of("192.0.2.1", 80)),
    # sockaddr_in longer than 16 is fine (e.g. sizeof(sockaddr_storage))
    (SIN_192_0_2_1_80 + bytes(112), 128, InetAddr.of("192.0.2.1", 80)),
    # nonzero sin_zero is ignored by the kernel
    (SIN_192_0_2_1_80[:8] + b"\xff" * 8, 16, InetAddr.of("192.0.2.1", 80)),
    # RFC 2133 sockaddr_in6 (24 bytes): scope_id is not read
    (SIN6_DB8_443, 24, InetAddr(AF_INET6, IPv6Address("2001:db8::1"), 443, 0x12345, 0)),
    (SIN6_DB8_443, 27, InetAddr(AF_INET6, IPv6Address("2001:db8::1"), 443, 0x12345, 0)),
    # pathname ends at the first NUL
    (fam(1) + b"/tmp/a\0garbage", 15, UnixAddr(b"/tmp/a")),
    (fam(1) + b"\0", 3, UnixAddr(b"", abstract=True)),
    (fam(0), 2, UnspecAddr(fam(0))),
])
def test_parse_lenient_cases(data: bytes, addrlen: int, expect) -> None:
    assert parse_sockaddr(data, addrlen) == expect


@pytest.mark.parametrize("data, addrlen, err", [
    (b"", 0, errno.EINVAL),
    (fam(2), 1, errno.EINVAL),
    (SIN_192_0_2_1_80, -1, errno.EINVAL),
    (SIN_192_0_2_1_80, 15, errno.EINVAL),
    (SIN_192_0_2_1_80[:2], 2, errno.EINVAL),          # AF_INET, family only
    (SIN6_DB8_443, 23, errno.EINVAL),
    (SIN6_DB8_443, 16, errno.EINVAL),
    (SIN6_DB8_443 + bytes(101), 129, errno.EINVAL),
    (bytes(200), 129, errno.EINVAL),                  # > sockaddr_storage beats EFAULT
    (SIN_192_0_2_1_80[:15], 16, errno.EFAULT),        # truncated buffer
    (SIN6_DB8_443[:27], 28, errno.EFAULT),
    (b"", 2, errno.EFAULT),
    (fam(1) + b"/" * 109, 111, errno.EINVAL),         # > sizeof(sockaddr_un)
])
def test_parse_errors(data: bytes, addrlen: int, err: int) -> None:
    with pytest.raises(SockaddrError) as ei:
        parse_sockaddr(data, addrlen)
    assert ei.value.errno == err
    assert isinstance(ei.value, SockgraftError)


def test_sockaddr_in6_27_bytes_is_valid_without_scope() -> None:
    # addrlen 27 is between RFC2133 and full size: valid, scope 0
    a = parse_sockaddr(SIN6_DB8_443, 27)
    assert isinstance(a, InetAddr) and a.scope_id == 0


@pytest.mark.parametrize("addr, text", [
    (InetAddr.of("1.2.3.4", 80), "1.2.3.4:80"),
    (InetAddr.of("::1", 80), "[::1]:80"),
    (InetAddr(AF_INET6, IPv6Address("fe80::1"), 22, 0, 3), "[fe80::1%3]:22"),
    (InetAddr.of("::ffff:127.0.0.1", 80), "[::ffff:127.0.0.1]:80"),
])
def test_str(addr: InetAddr, text: str) -> None:
    assert str(addr) == text


@pytest.mark.parametrize("addr, unmapped, wildcard", [
    (InetAddr.of("::ffff:10.1.2.3", 5), InetAddr.of("10.1.2.3", 5), False),
    (InetAddr.of("::ffff:0.0.0.0", 5), InetAddr.of("0.0.0.0", 5), False),
    (InetAddr.of("::", 5), InetAddr.of("::", 5), True),
    (InetAddr.of("0.0.0.0", 5), InetAddr.of("0.0.0.0", 5), True),
    (InetAddr.of("2001:db8::1", 5), InetAddr.of("2001:db8::1", 5), False),
])
def test_unmapped_and_wildcard(addr: InetAddr, unmapped: InetAddr, wildcard: bool) -> None:
    assert addr.unmapped() == unmapped
    assert addr.is_wildcard is wildcard
    assert unmapped.unmapped() == unmapped


def test_mapped_wildcard_is_ipv4_wildcard_after_unmapping() -> None:
    assert InetAddr.of("::ffff:0.0.0.0", 1).unmapped().is_wildcard


@pytest.mark.parametrize("kwargs", [
    dict(family=AF_INET, ip=IPv6Address("::1"), port=1),
    dict(family=AF_INET6, ip=IPv4Address("1.2.3.4"), port=1),
    dict(family=AF_INET, ip=IPv4Address("1.2.3.4"), port=65536),
    dict(family=AF_INET, ip=IPv4Address("1.2.3.4"), port=-1),
    dict(family=AF_UNIX, ip=IPv4Address("1.2.3.4"), port=1),
])
def test_inetaddr_rejects_inconsistent(kwargs) -> None:
    with pytest.raises(ValueError):
        InetAddr(**kwargs)


@pytest.mark.parametrize("path, abstract", [
    (b"/a\0b", False),
    (b"/" * 109, False),
    (b"x" * 108, True),
])
def test_unixaddr_rejects(path: bytes, abstract: bool) -> None:
    with pytest.raises(ValueError):
        UnixAddr(path, abstract)


@pytest.mark.parametrize("addr", [
    InetAddr.of("0.0.0.0", 0),
    InetAddr.of("255.255.255.255", 65535),
    InetAddr(AF_INET6, IPv6Address("ff02::1"), 1, 0xFFFFFFFF, 0xFFFFFFFF),
    UnixAddr(b"\xff\xfe", abstract=True),
    UnixAddr(b"/run/sockgraft/agent.sock"),
    UnspecAddr(),
    OtherAddr(AF_UNSPEC + 17),
])
def test_round_trip(addr) -> None:
    raw = pack_sockaddr(addr)
    again = parse_sockaddr(raw, len(raw))
    if isinstance(addr, (UnspecAddr, OtherAddr)):
        assert pack_sockaddr(again) == raw
    else:
        assert again == addr


def test_pack_sizes() -> None:
    assert len(pack_sockaddr(InetAddr.of("1.2.3.4", 1))) == 16
    assert len(pack_sockaddr(InetAddr.of("::1", 1))) == 28
