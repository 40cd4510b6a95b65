"""Per-key rate limits: one token bucket per API key, kept by the key's SHA-256 digest (never the key).

A key with a limit of `per_minute` requests per minute has a bucket of `burst` tokens (by default
`burst` = `per_minute`: one minute's worth), full at first and refilled continuously at
`per_minute / 60` tokens per second. A request takes one token; a request that finds less than one
whole token is refused (429) and takes nothing. Over any long stretch a key gets `per_minute`
requests a minute; `burst` bounds how many it can send at once.

Hand-written on purpose: the bucket is a few lines of arithmetic on two floats per key, run in the
event loop (no awaits inside, so no lock), with no store or process outside the service. The
buckets live in one process: with several replicas, each has its own (a client spread over N
replicas gets up to N times its limit). Only keys that authenticated get a bucket, so there are
never more buckets than configured keys (app/api/auth.py drops those of removed keys).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass

LIMIT_HEADER = "X-RateLimit-Limit"
REMAINING_HEADER = "X-RateLimit-Remaining"
RESET_HEADER = "X-RateLimit-Reset"
_EPSILON = 1e-9  # float refill: 0.999999999 tokens count as one


@dataclass(frozen=True)
class RateLimit:
    """`per_minute` requests per minute, at most `burst` at once."""

    per_minute: int
    burst: int

    @property
    def per_second(self) -> float:
        return self.per_minute / 60.0


@dataclass(frozen=True)
class Decision:
    """The answer for one request. `remaining`: whole tokens left (requests that would pass right now);
    `reset_s`: seconds until the bucket is full again (0 when full); `retry_after_s`: seconds until
    the next token, at least 1 when refused (0 when allowed)."""

    allowed: bool
    limit: int
    remaining: int
    reset_s: int
    retry_after_s: int

    def headers(self) -> dict[str, str]:
        """The `X-RateLimit-*` headers (on every answer to a request of a key with a limit)."""
        return {LIMIT_HEADER: str(self.limit), REMAINING_HEADER: str(self.remaining), RESET_HEADER: str(self.reset_s)}


class TokenBuckets:
    """The buckets of every key with a limit, by digest. `clock`: seconds, monotonic."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._buckets: dict[bytes, tuple[float, float]] = {}  # digest -> (tokens, when)

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, digest: bytes, limit: RateLimit) -> Decision:
        """Take one token from the bucket of `digest` if it has one."""
        now = self._clock()
        tokens, when = self._buckets.get(digest, (float(limit.burst), now))
        rate = limit.per_second
        tokens = min(float(limit.burst), tokens + max(0.0, now - when) * rate)
        allowed = tokens >= 1.0 - _EPSILON
        if allowed:
            tokens = max(0.0, tokens - 1.0)
        self._buckets[digest] = (tokens, now)
        missing = limit.burst - tokens
        reset = math.ceil(missing / rate - _EPSILON) if missing > _EPSILON else 0
        retry = 0 if allowed else max(1, math.ceil((1.0 - tokens) / rate - _EPSILON))
        return Decision(allowed, limit.per_minute, int(tokens + _EPSILON), max(0, reset), retry)

    def retain(self, digests: Collection[bytes]) -> None:
        """Forget the buckets of keys not in `digests` (keys removed or no longer limited)."""
        for digest in [d for d in self._buckets if d not in digests]:
            del self._buckets[digest]
