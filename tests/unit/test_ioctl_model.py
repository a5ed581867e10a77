"""model/ioctl.py: which socket ioctls a grafted container gets answered,
and how."""

from __future__ import annotations

import errno

import pytest

from sockgraft.model import ioctl as m

NET_ADMIN = 1 << m.CAP_NET_ADMIN
DOCKER_DEFAULT = 0x00000000a80425fb      # Docker's default set: no CAP_NET_ADMIN


def test_docker_default_capabilities_lack_net_admin():
    assert not DOCKER_DEFAULT & NET_ADMIN


@pytest.mark.parametrize("cmd", [0x8912, 0x8910, 0x8915, 0x8927, 0x8933, 0x8954, 0x8921])
def test_reads_are_emulated_without_capabilities(cmd):
    a = m.decide(cmd, m.AF_INET, 0)
    assert isinstance(a, m.Emulate) and not a.command.sets


@pytest.mark.parametrize("cmd", [0x8914, 0x8916, 0x8922, 0x8924, 0x8923, 0x8955, 0x8953])
def test_changes_need_net_admin(cmd):
    for caps in (0, DOCKER_DEFAULT, None):
        a = m.decide(cmd, m.AF_INET, caps)
        assert isinstance(a, m.Refuse) and a.errno == errno.EPERM
    a = m.decide(cmd, m.AF_INET, DOCKER_DEFAULT | NET_ADMIN)
    assert isinstance(a, m.Emulate) and a.command.sets


@pytest.mark.parametrize("cmd", [0x8946, 0x894C, 0x890B, 0x89A0, 0x89F0, 0x8B01, 0x8940, 0x8982])
def test_commands_with_pointers_inside_are_refused(cmd):
    # ethtool, SIOCGSKNS, routes, bridge, private, wireless, SIOCGIFBR, VLAN
    a = m.decide(cmd, m.AF_INET, NET_ADMIN)
    assert isinstance(a, m.Refuse) and a.errno == errno.ENOTTY


def test_non_sockets_get_enotty():
    assert m.decide(0x8912, None, NET_ADMIN) == m.Refuse(errno.ENOTTY, "not a socket")


def test_sizes():
    assert m.decide(0x8933, m.AF_INET6, 0).size == m.IFREQ
    assert m.decide(0x8916, m.AF_INET, NET_ADMIN).size == m.IFREQ
    assert m.decide(0x8916, m.AF_INET6, NET_ADMIN).size == m.IN6_IFREQ      # in6_ifreq
    assert m.decide(0x8954, m.AF_INET, 0).size == m.ARPREQ
    assert m.decide(m.SIOCGIFCONF, m.AF_INET, 0).size == m.IFCONF


def test_high_word_is_ignored():
    assert m.decide(0xFFFF_FFFF_0000_8933, m.AF_INET, 0) == m.decide(0x8933, m.AF_INET, 0)


def test_every_emulated_command_is_trapped():
    assert all(m.trapped(c) for c in m.COMMANDS)
    assert not any(m.trapped(c) for c in m.PER_SOCKET)


def test_ifconf_length_is_bounded():
    assert m.ifconf_length(-5) == 0
    assert m.ifconf_length(400) == 400
    assert m.ifconf_length(1 << 30) == m.IFCONF_MAX


def test_siocgskns_says_eperm_without_net_admin_as_the_kernel_does():
    assert m.decide(0x894C, m.AF_INET, DOCKER_DEFAULT).errno == errno.EPERM
    assert m.decide(0x894C, m.AF_INET, NET_ADMIN).errno == errno.ENOTTY     # not emulated


def test_only_capabilities_of_a_user_namespace_owning_its_network_count():
    full = (1 << 41) - 1
    # the caller in the agent's (initial) user namespace: its CapEff counts
    assert m.caps_over_netns(full, 1, 1, 1) == full
    assert m.caps_over_netns(NET_ADMIN, 1, 7, 1) == NET_ADMIN      # any network namespace
    # its own user namespace owns its network namespace (a userns container)
    assert m.caps_over_netns(full, 7, 7, 1) == full
    # unshare -U: every capability in a user namespace that owns nothing it uses
    assert m.caps_over_netns(full, 9, 1, 1) == 0
    assert m.caps_over_netns(None, 1, 1, 1) == 0
