"""Hypothesis strategies shared by the property tests of the decision core
(tests/unit/test_properties.py) and of its kernel renderings
(tests/priv/test_properties_kernel.py): random policies over a pool of
prefixes that overlap each other and the built-in categories, and random
destinations inside and outside them."""

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

from hypothesis import strategies as st

from sockgraft.model.policy import Policy, PolicyRule
from sockgraft.model.sockaddr import AF_INET, AF_INET6, InetAddr

# a pool of prefixes that overlap each other and the built-in categories, so
# random policies exercise precedence, plus random ones
POOL4 = ["0.0.0.0/0", "10.0.0.0/8", "10.1.0.0/16", "10.1.2.3/32", "127.0.0.0/8",
         "127.0.0.1/32", "169.254.0.0/16", "169.254.169.254/32", "198.18.0.0/15", "0.0.0.0/8"]
POOL6 = ["::/0", "fd00::/8", "fd00:1::/32", "::1/128", "fe80::/10", "fd00:ec2::254/128"]
MAPPED = IPv6Network("::ffff:0:0/96")    # no rule names it (configs refuse it); addresses do

v4_net = st.one_of(st.sampled_from(POOL4).map(IPv4Network),
                   st.builds(lambda a, p: IPv4Network((a, p), strict=False),
                             st.integers(0, 2**32 - 1), st.integers(0, 32)))
v6_net = st.one_of(st.sampled_from(POOL6).map(IPv6Network),
                   st.builds(lambda a, p: IPv6Network((a, p), strict=False),
                             st.integers(0, 2**128 - 1), st.integers(0, 128))
                   .filter(lambda n: not n.subnet_of(MAPPED)))
ports = st.one_of(st.just((0, 65535)), st.tuples(st.integers(0, 65535), st.integers(0, 65535))
                  .map(sorted).map(tuple), st.sampled_from([(80, 80), (53, 53), (1, 1024)]))


def rules(action):
    return st.builds(lambda net, pr, proto: PolicyRule(action, net, pr[0], pr[1], proto),
                     st.one_of(st.none(), v4_net, v6_net), ports,
                     st.sampled_from(["any", "tcp", "udp"]))


policies = st.builds(lambda a, d, b: Policy(tuple(a), tuple(d), b),
                     st.lists(rules("allow"), max_size=5), st.lists(rules("deny"), max_size=4),
                     st.booleans())


def _addr_in(net):
    return st.integers(0, net.num_addresses - 1).map(lambda i: net.network_address + i)


v4_addr = st.one_of(st.sampled_from(POOL4).map(IPv4Network).flatmap(_addr_in),
                    st.integers(0, 2**32 - 1).map(IPv4Address))
v6_addr = st.one_of(st.sampled_from(POOL6).map(IPv6Network).flatmap(_addr_in),
                    st.integers(0, 2**128 - 1).map(IPv6Address),
                    v4_addr.map(lambda a: IPv6Address("::ffff:" + str(a))))      # mapped
dests = st.one_of(st.builds(lambda a, p: InetAddr(AF_INET, a, p), v4_addr,
                            st.integers(0, 65535)),
                  st.builds(lambda a, p: InetAddr(AF_INET6, a, p), v6_addr,
                            st.integers(0, 65535)))

