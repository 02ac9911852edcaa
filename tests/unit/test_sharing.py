"""Token buckets, the rate-limited virtio-rng, the event loop's call_later, and the
GSI routing table that irqfd vectors share with the fixed routes."""

from __future__ import annotations

import time

import pytest

from pyvmm.devices.virtio.rng import MIN_CHUNK, VirtioRng
from pyvmm.event import EventManager
from pyvmm.irqchip.routing import FIRST_MSI_GSI, GsiRouting
from pyvmm.kvm.vm import IrqchipRoute, MsiRoute
from pyvmm.memory import GuestMemory
from pyvmm.sharing.ratelimit import TokenBucket
from tests.unit.test_virtio_core import bring_up

MiB = 1 << 20


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_bucket_starts_full_refills_at_rate_and_caps_at_burst() -> None:
    c = Clock()
    b = TokenBucket(1000, burst=500, clock=c)
    assert b.take(800) == 500 and b.throttled == 1
    assert b.take(1) == 0
    c.t += 0.1
    assert b.available() == pytest.approx(100)
    assert b.delay_for(300) == pytest.approx(0.2)
    c.t += 10
    assert b.available() == 500  # never above burst
    assert b.delay_for(10_000) == 0.0  # asks for more than burst: burst is enough
    with pytest.raises(ValueError):
        TokenBucket(0)


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory([(0, 4 * MiB)])
    yield m  # type: ignore[misc]
    m.close()


def test_rate_limited_rng_fills_what_tokens_allow_then_waits(mem: GuestMemory) -> None:
    c = Clock()
    later: list[tuple[float, object]] = []
    rng = VirtioRng(TokenBucket(1000, burst=1000, clock=c),
                    lambda d, fn: later.append((d, fn)))
    core, dq, _ = bring_up(rng, mem)
    heads = [dq.add([(dq.alloc(600), 600, True)]) for _ in range(3)]
    core.notify(0)
    # 600 + 400 (the rest of the burst, a short fill the spec allows); the third waits.
    assert dq.take_used() == [(heads[0], 600), (heads[1], 400)]
    assert len(later) == 1 and later[0][0] == pytest.approx(MIN_CHUNK / 1000)
    core.notify(0)  # a kick while throttled arms no second timer
    assert len(later) == 1 and rng.throttled == 2
    c.t += 0.5
    later[0][1]()  # type: ignore[operator]
    assert dq.take_used() == [(heads[2], 500)]
    assert rng.bytes == 1500


def test_rate_limited_rng_timer_after_reset_does_nothing(mem: GuestMemory) -> None:
    c = Clock()
    later: list[object] = []
    rng = VirtioRng(TokenBucket(100, burst=100, clock=c), lambda d, fn: later.append(fn))
    core, dq, _ = bring_up(rng, mem)
    dq.add([(dq.alloc(200), 200, True)])
    dq.add([(dq.alloc(200), 200, True)])
    core.notify(0)
    core.set_status(0)
    c.t += 5
    later[0]()  # type: ignore[operator]
    assert rng.requests == 1


def test_call_later_runs_on_the_loop_in_deadline_order() -> None:
    ev = EventManager()
    try:
        seen: list[str] = []
        ev.call_later(0.05, lambda: seen.append("b"))
        ev.call_later(0.01, lambda: seen.append("a"))
        t0 = time.monotonic()
        while len(seen) < 2 and time.monotonic() - t0 < 5:
            ev.run_once(None)  # the loop's own wait is shortened to the next deadline
        assert seen == ["a", "b"]
    finally:
        ev.close()


class FakeVm:
    def __init__(self) -> None:
        self.tables: list[list[MsiRoute | IrqchipRoute]] = []

    def set_gsi_routing(self, routes: list[MsiRoute | IrqchipRoute]) -> None:
        self.tables.append(list(routes))


def test_gsi_routing_keeps_fixed_and_msi_routes_together() -> None:
    vm = FakeVm()
    r = GsiRouting(vm, max_routes=4)  # type: ignore[arg-type]
    r.set_fixed([IrqchipRoute(4, 0, 4)])
    a, b = r.alloc_gsi(), r.alloc_gsi()
    assert (a, b) == (FIRST_MSI_GSI, FIRST_MSI_GSI + 1)
    r.set_msi(a, 0xFEE00000, 0x41)
    r.set_fixed([MsiRoute(4, 0xFEE00000, 0x30)])  # the split IOAPIC reprogrammed
    assert vm.tables[-1] == [MsiRoute(4, 0xFEE00000, 0x30), MsiRoute(a, 0xFEE00000, 0x41)]
    r.alloc_gsi()
    with pytest.raises(RuntimeError):
        r.alloc_gsi()  # 1 fixed + 1 routed + ... the table is full
    r.release_gsi(a)
    assert r.alloc_gsi() == a  # reused
    assert vm.tables[-1] == [MsiRoute(4, 0xFEE00000, 0x30)]
