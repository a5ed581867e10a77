"""`sockgraft oci-profile` and the hidden `sockgraft oci-hold` (started by the
agent for every container an OCI runtime hands over)."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..agent import control
from ..errors import ConfigError
from ..model import graftconfig as gc
from ..model import oci as moci
from ..paths import state_dir

FMT = argparse.RawDescriptionHelpFormatter

PROFILE_EXAMPLES = """\
examples:
  sockgraft oci-profile > sockgraft-seccomp.json            allow-all base, runc/crun/podman
  sockgraft oci-profile --base /etc/containers/seccomp.json --out merged.json
  sockgraft oci-profile --graft-at socket --listener /run/sockgraft/oci-node1.sock
  docker run --security-opt seccomp=merged.json ...           (Docker: see deploy/runtimes.md)

The profile traps bind()/connect() with an inet-sized address (socket() too
with --graft-at socket), denies io_uring (ENOSYS) and names the agent's OCI
socket as listenerPath. With --graft-at syscall it traps epoll_create(1)
too: the agent learns of each new epoll instance, so a socket registered
with one before connect() (nginx's upstreams) keeps its registration when
it is grafted. --no-trap-epoll leaves them out, for an agent older than
this release (it would answer them ENOSYS). With --base, sockgraft's syscalls are taken out of
the base's rules and its own added: merging twice gives the same profile. A
base that already names another listenerPath is refused.
"""


def default_oci_socket(name: str = "default") -> str:
    return os.path.join(state_dir(), f"oci-{name}.sock")


def register(sub) -> None:
    p = sub.add_parser("oci-profile", help="write a seccomp profile for runc/crun/Docker/"
                                           "Kubernetes that hands containers to the agent",
                       epilog=PROFILE_EXAMPLES, formatter_class=FMT)
    p.add_argument("--base", help="merge into this profile (JSON), e.g. a runtime's default")
    p.add_argument("--listener", default=None,
                   help=f"the agent's OCI socket (default {default_oci_socket()})")
    p.add_argument("--graft-at", choices=gc.GRAFT_AT, default="syscall")
    p.add_argument("--no-trap-epoll", dest="trap_epoll", action="store_false",
                   help="do not trap epoll_create(1) (for an older agent; a socket given to "
                        "an epoll instance made within a second before its connect() then "
                        "loses the registration when grafted)")
    p.add_argument("--out", help="write here (atomically) instead of stdout")
    p.set_defaults(func=cmd_profile)

    h = sub.add_parser("oci-hold", help=argparse.SUPPRESS)
    h.add_argument("--fd", type=int, required=True)
    h.add_argument("--info-fd", type=int, required=True)
    h.set_defaults(func=cmd_hold, needs_root=True)


def cmd_profile(args) -> int:
    base = None
    if args.base:
        try:
            with open(args.base) as f:
                base = json.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read: {exc.strerror}", source=args.base) from None
        except ValueError as exc:
            raise ConfigError(f"not JSON: {exc}", source=args.base) from None
    listener = args.listener or default_oci_socket()
    if not listener.startswith("/"):
        raise ConfigError("must be an absolute path", field="--listener", value=listener)
    prof = moci.build_profile(base, listener, args.graft_at, source=args.base or "base profile",
                              trap_epoll=args.trap_epoll)
    dropped = [a for a in (base or {}).get("architectures") or ()
               if a not in prof["architectures"]]
    if dropped:
        print(f"note: {', '.join(dropped)} left out: the kernel never runs the socket option "
              f"guard for compat system calls (32-bit programs in this container get the "
              f"runtime's answer to an unknown architecture)", file=sys.stderr)
    text = json.dumps(prof, indent=2) + "\n"
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, args.out)
        print(f"wrote {args.out} (listener {listener}, graft_at {args.graft_at})",
              file=sys.stderr)
    else:
        sys.stdout.write(text)
    return 0


def cmd_hold(args) -> int:
    import logging
    from ..agent.launcher import hold_oci
    logging.getLogger().setLevel(logging.INFO)
    with os.fdopen(args.info_fd) as f:
        info = json.load(f)
    return hold_oci(args.fd, info)


__all__ = ["register", "default_oci_socket", "control"]
