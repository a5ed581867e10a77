"""The `sockgraft` command line: argument parsing and output only.

Every sub-command is a thin wrapper over a library call; errors from the one
exception tree are printed as one line `sockgraft: error: ...` with exit
status 2 for bad input (ConfigError) and 1 for everything else.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

from ..errors import ConfigError, SockgraftError
from . import bench_cmd, doctor_cmd, graft_cmd, lab_cmd, oci_cmd

EXAMPLES = """\
examples:
  sockgraft demo                           bring the default lab up, measure each path, tear down
  sockgraft lab up                         build the embedded default lab (2 hosts x 2 containers)
  sockgraft lab status --json              hosts, containers and their addresses
  sockgraft lab exec h1-c1 -- ip addr      run a command inside a container (or a host)
  sockgraft lab down                       remove everything the lab created
  sockgraft agent --host h1 &              the node agent of lab host h1
  sockgraft ep add ep-out --container h1-c1 type ipv4 addr 198.18.0.1 port dynamic
  sockgraft rule add --container h1-c1 egress 198.18.0.0/24=ep-out
  sockgraft run --container h1-c1 -- iperf3 -c 198.18.0.2     grafted: never touches the veth
  sockgraft sockets                        grafted sockets with container, pid, fd, endpoint
  sockgraft services                       the directory: overlay address -> host address
  sockgraft oci-profile > profile.json     seccomp profile for runc/crun/Docker/Kubernetes
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sockgraft", description="Graft container sockets onto host sockets.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    lab_cmd.register(sub)
    graft_cmd.register(sub)
    bench_cmd.register(sub)
    oci_cmd.register(sub)
    doctor_cmd.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # `ep add NAME --container C type ipv4 ...`: words after an option belong
        # to the endpoint spec; anything else unknown is an error as usual.
        if hasattr(args, "spec") and not any(w.startswith("-") for w in extra):
            args.spec = list(args.spec) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if os.geteuid() != 0 and getattr(args, "needs_root", False):
        print("sockgraft: error: this command needs root (network namespaces, netlink)",
              file=sys.stderr)
        return 1
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"sockgraft: error: {exc}", file=sys.stderr)
        return 2
    except SockgraftError as exc:
        print(f"sockgraft: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


if __name__ == "__main__":
    sys.exit(main())
