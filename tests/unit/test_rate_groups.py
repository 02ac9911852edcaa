"""Token buckets for operations and bytes, alone and in a shared group (issue #11
item 5), driven by a hand-moved clock and a fake timer queue: no real time, so the
shares asserted are what the limiter guarantees, not what a scheduler did."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable

import pytest

from pyvmm.sharing.ratelimit import Limiter, Limits, RateGroup, jain, shares_in_common_window


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self.seq = itertools.count()

    def __call__(self) -> float:
        return self.now

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (self.now + delay, next(self.seq), fn))

    def run_until(self, t: float) -> None:
        while self.timers and self.timers[0][0] <= t:
            when, _, fn = heapq.heappop(self.timers)
            self.now = max(self.now, when)
            fn()
        self.now = t


class Member:
    """A device whose ring always has ``backlog`` requests of ``size`` bytes."""

    def __init__(self, clock: Clock, limits: Limits, group: RateGroup | None,
                 size: int = 4096, backlog: int = 10**9) -> None:
        self.size, self.backlog, self.served = size, backlog, 0
        self.lim = Limiter(limits, clock.call_later, self.kick, group, clock=clock)

    def kick(self) -> None:  # what process_queue does
        while self.backlog and self.lim.admit():
            self.lim.charge(self.size)
            self.backlog -= 1
            self.served += 1


def test_own_iops_bucket_gives_burst_then_rate() -> None:
    c = Clock()
    m = Member(c, Limits(iops=100, iops_burst=10), None)
    m.kick()
    assert m.served == 10  # the burst at once
    c.run_until(1.0)
    assert 10 + 100 - 1 <= m.served <= 10 + 100  # then the rate


def test_bytes_bucket_charges_whole_requests_and_waits_out_the_debt() -> None:
    c = Clock()
    m = Member(c, Limits(bps=1 << 20), None, size=256 << 10)  # 1 MiB/s, 256 KiB requests
    m.kick()
    assert m.served == 4  # one second's worth of bytes
    c.run_until(10.0)
    # Over 10 s: the burst plus 10 MiB, never more (a request may put the bucket in
    # debt by at most itself).
    assert m.served * (256 << 10) <= (1 << 20) + 10 * (1 << 20) + (256 << 10)
    assert m.served >= 40


def test_a_group_shares_its_rate_equally_among_members_that_always_have_work() -> None:
    c = Clock()
    g = RateGroup(Limits(iops=400, iops_burst=1), c.call_later, clock=c)
    ms = [Member(c, Limits(), g) for _ in range(4)]
    for i, m in enumerate(ms):  # they arrive at different times
        c.run_until(0.1 * i)
        m.kick()
    c.run_until(5.0)
    shares = shares_in_common_window([m.lim for m in ms])
    assert max(shares) - min(shares) <= 1, shares
    assert jain([float(s) for s in shares]) > 0.999
    total = sum(m.served for m in ms)
    assert total <= 1 + 400 * 5.0 + 1  # the group's bucket bounds them all together


def test_deep_queues_do_not_buy_a_bigger_share() -> None:
    """Members whose guests kick often or queue deeply get no more than one request per
    turn while others wait (unlike first-come buckets, where whoever asks first wins)."""
    c = Clock()
    g = RateGroup(Limits(iops=100), c.call_later, clock=c)
    greedy = Member(c, Limits(), g)
    meek = Member(c, Limits(), g)
    for _ in range(1000):  # the greedy one kicks a thousand times first
        greedy.kick()
    meek.kick()
    c.run_until(20.0)
    window = shares_in_common_window([greedy.lim, meek.lim])
    assert abs(window[0] - window[1]) <= 1, window


def test_a_member_s_own_limit_caps_it_and_the_rest_goes_to_the_others() -> None:
    c = Clock()
    g = RateGroup(Limits(iops=300, iops_burst=1), c.call_later, clock=c)
    slow = Member(c, Limits(iops=50, iops_burst=1), g)
    fast = [Member(c, Limits(), g) for _ in range(2)]
    for m in (slow, *fast):
        m.kick()
    c.run_until(10.0)
    assert slow.served <= 1 + 50 * 10
    assert slow.served >= 50 * 10 * 0.9
    for m in fast:
        assert m.served >= (300 - 50) / 2 * 10 * 0.9


def test_idle_member_gives_up_its_turn() -> None:
    c = Clock()
    g = RateGroup(Limits(iops=100, iops_burst=1), c.call_later, clock=c)
    a, b = Member(c, Limits(), g), Member(c, Limits(), g, backlog=3)
    a.kick()
    b.kick()
    c.run_until(10.0)
    assert b.served == 3
    assert a.served >= 100 * 10 * 0.95 - 3  # b's unused turns went to a


@pytest.mark.parametrize(("xs", "want"), [([1, 1, 1, 1], 1.0), ([1, 0, 0, 0], 0.25),
                                          ([2, 1], 0.9)])
def test_jain(xs: list[float], want: float) -> None:
    assert jain(xs) == pytest.approx(want)
