"""`sockgraft bench ...`: benchmark commands (argument handling and output)."""

from __future__ import annotations

import argparse
import sys

FMT = argparse.RawDescriptionHelpFormatter
ENGINE_EXAMPLES = """\
examples:
  sockgraft bench engine                       3 rounds of 2 s, scale 100 x 100
  sockgraft bench engine --rounds 5 --out results/engine
  sockgraft bench engine --rounds 1 --seconds 1 --scale 10 10     a quick look

It builds its own lab (2 hosts x 2 containers) with agents, runs every
measure interleaved round by round, and removes everything afterwards.
Only ratios within one run are meaningful on a shared or small machine.
"""


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmarks", formatter_class=FMT,
                       epilog=ENGINE_EXAMPLES)
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    e = bsub.add_parser("engine", help="the grafting engine against host and plain paths",
                        epilog=ENGINE_EXAMPLES, formatter_class=FMT)
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--seconds", type=int, default=2, help="per measure (whole seconds)")
    e.add_argument("--scale", type=int, nargs=2, default=(100, 100),
                   metavar=("CONTAINERS", "SOCKETS"), help="0 0 skips the scale test")
    e.add_argument("--out", help="directory for raw output and results.json")
    e.set_defaults(func=cmd_engine, needs_root=True)


def cmd_engine(args) -> int:
    from ..bench import engine
    from ..errors import ConfigError
    if args.rounds < 1 or args.seconds < 1 or min(args.scale) < 0:
        raise ConfigError("accepted: --rounds >= 1, --seconds >= 1, --scale >= 0 0")
    result = engine.run(args.rounds, args.seconds, args.out, tuple(args.scale),
                        progress=lambda m: print(m, file=sys.stderr, flush=True))
    report = engine.render(result)
    print(report)
    if args.out:
        with open(f"{args.out}/engine-report.md", "w") as f:
            f.write(report)
    return 0
