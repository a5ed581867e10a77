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


BENCH_EXAMPLES = """\
examples:
  sockgraft bench --quick --out /tmp/quick      iperf3, sockperf-tcp, crr; 1 round on every path
  sockgraft bench --out results                 every workload, 3 rounds (about 15 minutes)
  sockgraft bench --paths graft-remote vxlan host-underlay --workloads iperf3 redis
  sockgraft bench report results                re-render report.md and plots from results.json
  sockgraft bench engine                        the grafting engine's own figures
  sockgraft bench --pin 1 --out results-pinned  both ends of every measure on CPU 1
  sockgraft bench --pin-rr 1 --paths bridge fast-local vxlan fast-remote
                                                request/response on CPU 1, iperf3 on both

Paths: host-loopback host-underlay bridge nat vxlan trap-floor graft-local graft-splice
  graft-remote fast-local fast-remote. trap-floor is host-loopback with every socket() of
  the client trapped and answered CONTINUE (nothing grafted): what a trap per connection
  costs at least.
Workloads: iperf3 sockperf-tcp sockperf-tcp-nb sockperf-udp crr http-close http-keepalive
  memcached redis.
Writes DIR/raw/* (every tool's output), DIR/results.json, DIR/report.md, DIR/plots/*.png.
Only ratios within one run are meaningful on a shared or small machine.
"""


def register(sub) -> None:
    from ..model.paths import BENCH_PATHS as PATHS      # (not bench.harness: pyroute2)
    p = sub.add_parser("bench", help="benchmarks: every path, real workloads",
                       formatter_class=FMT, epilog=BENCH_EXAMPLES)
    p.add_argument("--quick", action="store_true",
                   help="one 1 s round of iperf3, sockperf-tcp and crr on every path")
    p.add_argument("--paths", nargs="+", choices=PATHS, metavar="PATH")
    p.add_argument("--workloads", nargs="+", metavar="WORKLOAD")
    p.add_argument("--rounds", type=int)
    p.add_argument("--seconds", type=int, help="per run (whole seconds)")
    p.add_argument("--out", default="bench-out", help="output directory (default bench-out)")
    p.add_argument("--pin", type=int, metavar="CPU",
                   help="run client and server of every measure on this CPU: request/response "
                        "figures then show the network path, not the cost of waking an idle "
                        "vCPU (large on VMs without halt polling); agents are not pinned")
    p.add_argument("--pin-rr", type=int, metavar="CPU",
                   help="like --pin, for the request/response workloads only: bulk transfers "
                        "(iperf3) keep every CPU, where sender and receiver run side by side")
    p.set_defaults(func=cmd_bench, needs_root=True)
    bsub = p.add_subparsers(dest="bench_command", metavar="WHAT")
    r = bsub.add_parser("report", help="re-render report and plots from DIR/results.json",
                        formatter_class=FMT, epilog=BENCH_EXAMPLES)
    r.add_argument("dir")
    r.set_defaults(func=cmd_report, needs_root=False)
    e = bsub.add_parser("engine", help="the grafting engine against host and plain paths",
                        epilog=ENGINE_EXAMPLES, formatter_class=FMT)
    e.add_argument("--rounds", type=int, default=3)
    e.add_argument("--seconds", type=int, default=2, help="per measure (whole seconds)")
    e.add_argument("--scale", type=int, nargs=2, default=(100, 100),
                   metavar=("CONTAINERS", "SOCKETS"), help="0 0 skips the scale test")
    e.add_argument("--sockets", type=int, default=20000, metavar="N",
                   help="socket() calls per socket() measure (default 20000)")
    e.add_argument("--out", help="directory for raw output and results.json")
    e.set_defaults(func=cmd_engine, needs_root=True)
    pol = bsub.add_parser("policy", help="the fast path's data-path policy at scale: policy "
                                         "change to enforcement, cost of many rules",
                          formatter_class=FMT, epilog="""examples:
  sockgraft bench policy                          200 containers, 30 changes, 1000 rules
  sockgraft bench policy --containers 50 --changes 10 --rules 200 --out /tmp/pol
""")
    pol.add_argument("--containers", type=int, default=200, help="in the lab (4..250)")
    pol.add_argument("--changes", type=int, default=30, help="policy changes timed")
    pol.add_argument("--rules", type=int, default=1000, help="rules of the costly policy "
                                                             "(at most 1024)")
    pol.add_argument("--rounds", type=int, default=5)
    pol.add_argument("--seconds", type=int, default=2, help="per measure (whole seconds)")
    pol.add_argument("--out", help="directory for results.json and policy-report.md")
    pol.set_defaults(func=cmd_policy_bench, needs_root=True)


def cmd_policy_bench(args) -> int:
    import json
    import os
    from ..bench import policy
    from ..errors import ConfigError
    if args.changes < 1 or args.rounds < 1 or args.seconds < 1 or \
            not 10 <= args.rules <= 1024:
        raise ConfigError("accepted: --changes >= 1, --rounds >= 1, --seconds >= 1, "
                          "--rules 10..1024")
    result = policy.run(args.containers, args.changes, args.rules, args.rounds, args.seconds,
                        progress=lambda m: print(m, file=sys.stderr, flush=True))
    text = policy.render(result)
    print(text)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(args.out, "policy-report.md"), "w") as f:
            f.write(text)
    return 0


def cmd_engine(args) -> int:
    from ..bench import engine
    from ..errors import ConfigError
    if args.rounds < 1 or args.seconds < 1 or min(args.scale) < 0 or \
            not 100 <= args.sockets <= 1_000_000:
        raise ConfigError("accepted: --rounds >= 1, --seconds >= 1, --scale >= 0 0, "
                          "--sockets 100..1000000")
    result = engine.run(args.rounds, args.seconds, args.out, tuple(args.scale),
                        progress=lambda m: print(m, file=sys.stderr, flush=True),
                        sockets=args.sockets)
    report = engine.render(result)
    print(report)
    if args.out:
        with open(f"{args.out}/engine-report.md", "w") as f:
            f.write(report)
    return 0


def cmd_bench(args) -> int:
    from ..bench import harness
    from ..errors import ConfigError
    rounds = args.rounds or (1 if args.quick else 3)
    seconds = args.seconds or (1 if args.quick else 3)
    if rounds < 1 or seconds < 1:
        raise ConfigError("accepted: --rounds >= 1, --seconds >= 1")
    workloads = args.workloads or (list(harness.QUICK_WORKLOADS) if args.quick else None)
    results = harness.run(tuple(args.paths or harness.PATHS), workloads, rounds, seconds,
                          args.out, pin=args.pin, pin_rr=args.pin_rr)
    print(f"{len(results['runs'])} runs, {len(results['failures'])} failed, "
          f"{results['duration_s']:.0f} s; report: {args.out}/report.md")
    for r in results["ratios"]:
        print(f"  {r['workload']:15s} {r['metric']:14s} {r['path']:13s} vs "
              f"{r['reference']:14s} {r['median_ratio']:.2f}x")
    return 1 if results["failures"] and not results["runs"] else 0


def cmd_report(args) -> int:
    import os
    from ..bench import report
    from ..errors import ConfigError
    if not os.path.exists(os.path.join(args.dir, "results.json")):
        raise ConfigError("no results.json here; run `sockgraft bench --out DIR` first",
                          source=args.dir)
    results = report.rerender(args.dir)
    print(f"re-rendered {args.dir}/report.md and {len(results['summary'])} summary rows "
          f"into {args.dir}/plots/")
    return 0
