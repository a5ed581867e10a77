"""The agent's audit trail: one JSON line per refused or notable call.

Owns the audit file and the agent-log copy of each line, and keeps a
container from flooding either: lines are rate-limited per container
(`model/ratelimit.Limiter`, default 10 a second with bursts of 50); what is
suppressed is counted and summed up in one `"verdict": "suppressed"` line per
container per flush (the agent flushes once a second). The file is rotated
once it reaches `max_bytes` (one previous file, FILE.1, is kept), so the
audit trail of a node never takes more than twice that on disk.

Must not: decide anything; it only writes what the agent hands it.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from typing import Callable

from ..model.ratelimit import Limiter

log = logging.getLogger("sockgraft.agent")

RATE = 10.0             # lines per second per container
BURST = 50
MAX_BYTES = 64 << 20


class AuditLog:
    def __init__(self, path: str | None, agent: str, *, rate: float = RATE,
                 burst: float = BURST, max_bytes: int = MAX_BYTES,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self.agent = agent
        self.max_bytes = max_bytes
        self.limiter = Limiter(rate, burst)
        self.clock = clock
        self.written = 0
        self._f = open(path, "a", buffering=1) if path else None

    def write(self, container: str, pid: int, syscall: str, addr: object, verdict: str,
              rule: str, errno_: int = 0, where: str = "agent") -> bool:
        """One audit line; False if the container's rate limit suppressed it."""
        if not self.limiter.allow(container, self.clock()):
            return False
        line = {"time": round(time.time(), 6), "agent": self.agent, "container": container,
                "pid": pid, "syscall": syscall, "address": str(addr), "verdict": verdict,
                "rule": rule, "by": where}
        if errno_:
            line["errno"] = errno.errorcode.get(errno_, errno_)
        self._emit(line)
        return True

    def flush(self) -> None:
        """One summary line per container whose lines were suppressed."""
        for container, n in sorted(self.limiter.take_suppressed().items()):
            self._emit({"time": round(time.time(), 6), "agent": self.agent,
                        "container": container, "verdict": "suppressed", "count": n,
                        "rule": f"rate limit {self.limiter.rate:g}/s"})

    @property
    def suppressed(self) -> int:
        return self.limiter.total_suppressed

    def _emit(self, line: dict) -> None:
        text = json.dumps(line)
        log.warning("audit: %s", text)
        if self._f is None:
            return
        try:
            if self._f.tell() + len(text) + 1 > self.max_bytes:
                self._rotate()
            self._f.write(text + "\n")
            self.written += 1
        except OSError as exc:      # a full disk must not stop the agent
            log.error("audit: cannot write %s: %s", self.path, exc.strerror)

    def _rotate(self) -> None:
        assert self.path is not None and self._f is not None
        self._f.close()
        os.replace(self.path, self.path + ".1")
        self._f = open(self.path, "a", buffering=1)

    def close(self) -> None:
        if self._f is not None:
            self.flush()
            self._f.close()
            self._f = None
