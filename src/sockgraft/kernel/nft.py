"""nftables: load and delete rulesets inside a namespace with the nft tool.

The project's rules always live in tables named by the project prefix, so
teardown removes exactly its own tables. `nft -f -` applies a whole ruleset
text atomically (all or nothing), which is the rollback we want. Runs nft in a
child that entered the namespace (never switches the caller's namespace).
Must not: decide rule contents (the callers' pure planners do).
"""

from __future__ import annotations

import errno
import shutil
import subprocess

from ..errors import KernelError
from . import netns as _netns


def _nft_binary() -> str:
    found = shutil.which("nft") or "/usr/sbin/nft"
    return found


def run(netns: str | None, args: list[str], stdin: str | None = None) -> str:
    pre = (lambda: _netns.enter(netns)) if netns else None
    try:
        proc = subprocess.run([_nft_binary(), *args], input=stdin, capture_output=True,
                              text=True, preexec_fn=pre, timeout=30)
    except FileNotFoundError as exc:
        raise KernelError("nft", errno.ENOENT, "nft is not installed (apt-get install nftables)") from exc
    if proc.returncode != 0:
        raise KernelError("nft " + " ".join(args[:2]), errno.EINVAL,
                          f"in {netns or 'root netns'}: {proc.stderr.strip()}")
    return proc.stdout


def apply(netns: str | None, ruleset: str) -> None:
    """Load a ruleset text atomically."""
    run(netns, ["-f", "-"], stdin=ruleset)


def delete_table(netns: str | None, family: str, table: str) -> bool:
    """Idempotent: True if the table existed."""
    if table not in list_tables(netns, family):
        return False
    run(netns, ["delete", "table", family, table])
    return True


def list_tables(netns: str | None, family: str | None = None) -> list[str]:
    out = run(netns, ["list", "tables"] + ([family] if family else []))
    return [line.split()[-1] for line in out.splitlines() if line.startswith("table ")]
