"""`sockgraft doctor`: can this node run sockgraft, in which modes, and what
to do about the rest. The agent runs the quick checks at start too."""

from __future__ import annotations

import argparse

from ..errors import AgentError
from ..model import nodecheck

EXAMPLES = """\
examples:
  sockgraft doctor            every check, then which graft modes this node can run
  sockgraft doctor --json     the same, machine-readable
  sockgraft doctor --quick    only what the agent checks at start (no compile, no netns)
"""


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check what this node offers and which modes will work",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true",
                   help="skip the slower probes (BPF compile/load, tc in a namespace, nft, "
                        "runtimes)")
    p.set_defaults(func=cmd_doctor, needs_root=True)


def cmd_doctor(args) -> int:
    from ..agent import doctor
    checks = doctor.run(doctor.QUICK if args.quick else None)
    verdicts = nodecheck.modes(checks)
    if args.json:
        from .main import print_json
        print_json({"checks": [{"name": c.name, "ok": c.ok, "detail": c.detail,
                                "fix": c.fix} for c in checks], "modes": verdicts})
    else:
        w = max(len(c.name) for c in checks)
        for c in checks:
            print(f"{'ok  ' if c.ok else 'FAIL'} {c.name:{w}s}  {c.detail}")
            if not c.ok and c.fix:
                print(f"     {'':{w}s}  fix: {c.fix}")
        print()
        for mode, v in verdicts.items():
            unchecked = f" (not checked: {', '.join(v['unchecked'])})" if v["unchecked"] else ""
            print(f"mode {mode:12s} " + ("works" if v["ok"] else "NOT AVAILABLE: " + ", ".join(
                m["check"] for m in v["missing"])) + unchecked)
    return 0 if verdicts["syscall"]["ok"] else 1


def agent_preflight(agent) -> None:
    """The agent's start: refuse to run where no graft mode can work, and
    refuse socket mode (per container) where the kernel cannot do it."""
    from ..agent import doctor
    verdicts = nodecheck.modes(doctor.run(doctor.QUICK))
    why = nodecheck.refusal("syscall", verdicts)
    if why:
        raise AgentError(why)
    # (the programs are not probed here: the agent loads them itself, --bpf)
    agent.socket_refusal = nodecheck.refusal("socket", verdicts)
