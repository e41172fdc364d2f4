"""Per-key token buckets (the key is the caller, e.g. its uid).

A key starts with a full bucket of `burst` tokens; each allowed request takes one token, and
tokens come back at `per_second` up to `burst`.

Edge values, chosen so that the numbers mean what they say:
- `per_second == 0`: no refill; a key gets `burst` requests for as long as the broker runs
  (or until its bucket is evicted, see below).
- `burst < 1` (including 0): a request needs a whole token and the bucket never holds one, so
  every request is refused. 0 does not mean "unlimited": a limiter that silently switched
  itself off on a typo would fail open. To make limiting irrelevant, give a large burst.

Memory is bounded: a bucket that has refilled to `burst` is indistinguishable from no bucket
and is dropped, and at most `max_keys` buckets are kept. When that many keys are still
limited, the fullest bucket (ties: least recently used) is evicted, which forgives the key
that has been least limited.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass

DEFAULT_MAX_KEYS = 4096


@dataclass
class _Bucket:
    tokens: float
    updated_at: float


class RateLimiter:
    def __init__(self, burst: float, per_second: float, max_keys: int = DEFAULT_MAX_KEYS):
        for what, value in (("burst", burst), ("per_second", per_second)):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{what} must be a number")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{what} must be a finite non-negative number")
        if isinstance(max_keys, bool) or not isinstance(max_keys, int):
            raise TypeError("max_keys must be an integer")
        if max_keys < 1:
            raise ValueError("max_keys must be positive")
        self.burst = float(burst)
        self.per_second = float(per_second)
        self.max_keys = max_keys
        self._buckets: dict[Hashable, _Bucket] = {}

    def __len__(self) -> int:
        """Number of keys currently remembered (for tests and status)."""
        return len(self._buckets)

    def _level(self, bucket: _Bucket, now: float) -> float:
        # A clock that went backwards gives no tokens (and takes none).
        elapsed = max(0.0, now - bucket.updated_at)
        return min(self.burst, bucket.tokens + elapsed * self.per_second)

    def tokens(self, key: Hashable, now: float) -> float:
        """Tokens `key` has at `now`, without consuming any."""
        bucket = self._buckets.get(key)
        return self.burst if bucket is None else self._level(bucket, now)

    def allow(self, key: Hashable, now: float) -> bool:
        """True (and one token taken) when `key` may make a request at `now`."""
        if self.burst < 1:
            return False
        bucket = self._buckets.get(key)
        if bucket is None:
            self._make_room(now)
            bucket = _Bucket(self.burst, now)
            self._buckets[key] = bucket
        else:
            bucket.tokens = self._level(bucket, now)
            bucket.updated_at = now
            # Move to the end: dict order doubles as least-recently-used order for eviction.
            del self._buckets[key]
            self._buckets[key] = bucket
        if bucket.tokens < 1:
            return False
        bucket.tokens -= 1
        return True

    def _make_room(self, now: float) -> None:
        if len(self._buckets) < self.max_keys:
            return
        full = [k for k, b in self._buckets.items() if self._level(b, now) >= self.burst]
        for k in full:
            del self._buckets[k]
        if len(self._buckets) < self.max_keys:
            return
        # max() returns the first of equal maxima, and iteration runs oldest first.
        fullest = max(self._buckets, key=lambda k: self._level(self._buckets[k], now))
        del self._buckets[fullest]
