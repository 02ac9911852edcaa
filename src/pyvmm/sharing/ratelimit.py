"""Token buckets, as Firecracker's rate limiter: a bucket holds up to ``burst``
tokens and refills at ``rate`` tokens per second; an operation takes tokens or
waits. A device keeps one bucket per resource (bytes, operations) and, when a bucket
is empty, stops taking requests and asks to be called again once enough tokens will
be there — the guest's requests stay in its queue, nothing is dropped.

The clock is injectable so tests drive time by hand.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import NamedTuple


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


# --- a device's limiter, alone or in a shared group ---------------------------------------
class Limits(NamedTuple):
    """Operations and bytes per second, each with its burst (None: unlimited)."""

    iops: float | None = None
    iops_burst: float | None = None
    bps: float | None = None
    bps_burst: float | None = None

    def buckets(self, clock: Callable[[], float]) -> tuple[TokenBucket | None,
                                                            TokenBucket | None]:
        return (None if self.iops is None else TokenBucket(self.iops, self.iops_burst, clock),
                None if self.bps is None else TokenBucket(self.bps, self.bps_burst, clock))


def _ready(ops: TokenBucket | None, nbytes: TokenBucket | None) -> float:
    """0 if one more request may start now, else the seconds until it may."""
    wait = 0.0
    if ops is not None and ops.available() < 1:
        wait = max(wait, ops.delay_for(1))
    if nbytes is not None and nbytes.available() <= 0:
        wait = max(wait, (1 - nbytes.available()) / nbytes.rate)
    # Not less than a microsecond: refilling for exactly the computed time can leave
    # the bucket a rounding error short, and a timer of 1e-17 s would fire at once
    # forever (time.monotonic() + 1e-17 == time.monotonic()).
    return max(wait, 1e-6) if wait > 0 else 0.0


def _charge(ops: TokenBucket | None, nbytes: TokenBucket | None, n: int) -> None:
    if ops is not None:
        ops.take(1)
    if nbytes is not None:
        # A request's size is known only once it is popped: it is charged in full and
        # may leave the bucket in debt (at most one request's worth), which the next
        # requests wait out — the long-run rate is exact, as Firecracker's
        # over-consumption.
        nbytes._refill()
        nbytes._tokens -= n


class RateGroup:
    """Buckets shared by several devices (Cloud Hypervisor's ``rate_limit_group``), with
    round-robin turns: while any member waits, the group's tokens go to the waiting
    members one request each in the order they came, so members that always have work
    get equal shares whatever their queue depth or how fast their guests kick."""

    def __init__(self, limits: Limits, call_later: Callable[[float, Callable[[], None]],
                                                            object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ops, self.bytes = limits.buckets(clock)
        self.call_later = call_later
        self.waiting: dict[Limiter, None] = {}  # insertion-ordered: the turn order
        self.granted: Limiter | None = None
        self._timer = False
        self.lock = threading.RLock()
        self.throttled = 0

    def _admit(self, m: Limiter) -> bool:
        with self.lock:
            if self.granted is m:
                return True
            if not self.waiting and _ready(self.ops, self.bytes) == 0:
                return True
            self.throttled += 1
            m.throttled += 1  # a member's count is its waits, on its buckets or the group's
            if m._own_waited and m not in self.waiting:
                # It has just waited out its own bucket: the next turn is its, or a
                # member capped below its fair share would lose a turn's wait on every
                # request on top of its own limit (it cannot take more than its own
                # rate this way).
                self.waiting = {m: None, **self.waiting}
            else:
                self.waiting.setdefault(m, None)
            m._own_waited = False
            self._arm()
            return False

    def _charge(self, m: Limiter, n: int) -> None:
        with self.lock:
            _charge(self.ops, self.bytes, n)
            if self.granted is m:
                self.granted = None  # one request per turn

    def _arm(self) -> None:
        if not self._timer and self.waiting:
            self._timer = True
            self.call_later(_ready(self.ops, self.bytes), self._tick)

    def _tick(self) -> None:
        with self.lock:
            self._timer = False
        while True:
            with self.lock:
                if not self.waiting or _ready(self.ops, self.bytes) > 0:
                    self._arm()
                    return
                m = next(iter(self.waiting))
                del self.waiting[m]
                self.granted = m
            m.resume()  # serves at most one request of m's (its own lock)
            with self.lock:
                if self.granted is m:  # it had nothing to do: the turn lapses
                    self.granted = None


class Limiter:
    """One device's limits, and the group it shares, if any. The device asks ``admit``
    before it pops a request and calls ``charge`` with the request's bytes after; when
    ``admit`` says no, ``resume`` is called later (on the event loop) to go on."""

    def __init__(self, limits: Limits, call_later: Callable[[float, Callable[[], None]],
                                                            object],
                 resume: Callable[[], None], group: RateGroup | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ops, self.bytes = limits.buckets(clock)
        self.call_later, self.resume, self.group = call_later, resume, group
        self._timer = False
        self._own_waited = False
        self.throttled = 0
        self.charged_ops = 0
        self.charged_bytes = 0
        self.clock = clock
        self.first: float | None = None  # when it was first and last charged
        self.log: list[float] = []  # charge times (bounded), for fairness over a window

    def admit(self) -> bool:
        wait = _ready(self.ops, self.bytes)
        if wait > 0:
            self.throttled += 1
            if not self._timer:
                self._timer = True
                self.call_later(wait, self._own_tick)
            return False
        return self.group is None or self.group._admit(self)

    def charge(self, nbytes: int) -> None:
        _charge(self.ops, self.bytes, nbytes)
        if self.group is not None:
            self.group._charge(self, nbytes)
        self.charged_ops += 1
        self.charged_bytes += nbytes
        now = self.clock()
        if self.first is None:
            self.first = now
        if len(self.log) < LOG_MAX:
            self.log.append(now)

    def _own_tick(self) -> None:
        self._timer = False
        self._own_waited = True
        self.resume()
        self._own_waited = False


LOG_MAX = 1 << 20


def jain(xs: list[float]) -> float:
    """Jain's fairness index: (sum x)^2 / (n * sum x^2), 1 when all are equal, 1/n when
    one has everything."""
    if not xs or not any(xs):
        return 1.0
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def shares_in_common_window(limiters: list[Limiter]) -> list[int]:
    """Requests each limiter was charged while all of them were active (from the latest
    first charge to the earliest last charge): the shares a fair group makes equal."""
    logs = [lim.log for lim in limiters if lim.log]
    if len(logs) < len(limiters):
        return [0] * len(limiters)
    start, end = max(log[0] for log in logs), min(log[-1] for log in logs)
    return [sum(1 for t in log if start <= t <= end) for log in logs]
