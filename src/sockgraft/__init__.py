"""sockgraft: graft container sockets onto host sockets.

Layers (see docs/architecture.md):
  model/   pure decision code: topology plans, sockaddrs, endpoints, policy
  kernel/  thin adapters over netns, netlink (pyroute2), nftables, seccomp
  lab/     the testbed built from network namespaces
  agent/   the node agent servicing seccomp notifications
  cli/     the `sockgraft` command
"""

__version__ = "0.1.0"
PREFIX = "sg"
