"""Token buckets, as Firecracker's rate limiter: a bucket holds up to ``burst``
tokens and refills at ``rate`` tokens per second; an operation takes tokens or
waits. A device keeps one bucket per resource (bytes, operations) and, when a bucket
is empty, stops taking requests and asks to be called again once enough tokens will
be there — the guest's requests stay in its queue, nothing is dropped.

The clock is injectable so tests drive time by hand.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class TokenBucket:
    def __init__(self, rate: float, burst: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("rate must be positive")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else rate)  # one second's worth
        if self.burst <= 0:
            raise ValueError("burst must be positive")
        self.clock = clock
        self._tokens = self.burst
        self._stamp = clock()
        self.throttled = 0  # times a caller found the bucket empty

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def available(self) -> float:
        self._refill()
        return self._tokens

    def take(self, want: float) -> float:
        """Take up to ``want`` tokens; returns how many were taken (maybe 0)."""
        self._refill()
        got = min(want, self._tokens)
        if got < want:
            self.throttled += 1
        self._tokens -= got
        return got

    def delay_for(self, n: float) -> float:
        """Seconds until ``n`` tokens (at most ``burst``) are available."""
        self._refill()
        missing = min(n, self.burst) - self._tokens
        return max(0.0, missing / self.rate)
