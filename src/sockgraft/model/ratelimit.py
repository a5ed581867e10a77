"""Token buckets: how many audit lines a container may cause per second.

Pure: the caller passes the time (monotonic seconds); no clock, no I/O.
A bucket holds up to `burst` tokens and gains `rate` tokens a second; each
line takes one. `Limiter` keeps one bucket per key (container), bounded in
number: past `max_keys` the least recently used bucket is dropped, so a
churn of containers cannot grow it without end.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: float
    tokens: float
    stamp: float

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


class Limiter:
    """Per-key buckets plus the count of what each key had suppressed."""

    def __init__(self, rate: float, burst: float, max_keys: int = 4096) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got {rate}, {burst}")
        self.rate, self.burst, self.max_keys = rate, burst, max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self.suppressed: dict[str, int] = {}
        self.total_suppressed = 0

    def allow(self, key: str, now: float) -> bool:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = TokenBucket(self.rate, self.burst, self.burst, now)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if b.take(now):
            return True
        self.suppressed[key] = self.suppressed.get(key, 0) + 1
        self.total_suppressed += 1
        return False

    def take_suppressed(self) -> dict[str, int]:
        """What was suppressed since the last call (and forget it)."""
        out, self.suppressed = self.suppressed, {}
        return out
