"""8254 and MC146818 against a controllable clock."""

from __future__ import annotations

import calendar

from hypothesis import given
from hypothesis import strategies as st

from pyvmm.bus import IoBus
from pyvmm.devices.legacy.pit import PIT_FREQ, Pit, Port61
from pyvmm.devices.legacy.rtc import MAX_BACKLOG, Rtc
from pyvmm.testing import RecordingLine


class Clock:
    def __init__(self) -> None:
        self.ns = 10**12

    def __call__(self) -> int:
        return self.ns

    def ticks(self, n: int) -> None:
        self.ns += n * 10**9 // PIT_FREQ + 1


class FakeTimer:
    def __init__(self) -> None:
        self.calls: list[tuple[int, int]] = []

    def set(self, first_ns: int, interval_ns: int = 0) -> None:
        self.calls.append((first_ns, interval_ns))


def pit() -> tuple[IoBus, Pit, Clock, FakeTimer, list[int]]:
    clock, timer, irqs = Clock(), FakeTimer(), []
    p = Pit(irq0=lambda: irqs.append(1), timer=timer, clock=clock)
    bus = IoBus()
    bus.insert(p, 0x40, 4)
    bus.insert(Port61(p), 0x61, 1)
    return bus, p, clock, timer, irqs


def test_mode2_periodic_arms_host_timer_at_the_programmed_rate() -> None:
    bus, p, _, timer, irqs = pit()
    bus.write(0x43, 1, 0x34)
    bus.write(0x40, 1, 1193 & 0xFF)
    bus.write(0x40, 1, 1193 >> 8)
    first, interval = timer.calls[-1]
    assert interval == first == 1193 * 10**9 // PIT_FREQ  # ~1 ms
    p.on_timer(3)
    assert irqs == [1] and p.missed == 2


def test_periods_due_count_only_while_periodic() -> None:
    """``due`` is the reference the rate checks use: host time armed in mode 2/3 over the
    period, not counting time stopped or in a one-shot mode."""
    bus, p, clock, _, _ = pit()
    bus.write(0x43, 1, 0x34)
    bus.write(0x40, 1, 1193 & 0xFF)
    bus.write(0x40, 1, 1193 >> 8)  # ~1 ms periods
    clock.ns += 250_000_000
    assert 249 <= p.due.due() <= 250
    bus.write(0x43, 1, 0x30)  # mode 0, no count: stopped
    clock.ns += 10**9
    assert 249 <= p.due.due() <= 250
    bus.write(0x43, 1, 0x34)
    bus.write(0x40, 1, 0x9B)
    bus.write(0x40, 1, 0x2E)  # 11931: ~10 ms
    clock.ns += 10**9
    assert 348 <= p.due.due() <= 350


def test_counter_latch_and_countdown() -> None:
    bus, _, clock, _, _ = pit()
    bus.write(0x43, 1, 0x30)  # ch0, lo/hi, mode 0
    bus.write(0x40, 1, 0x00)
    bus.write(0x40, 1, 0x10)  # 0x1000
    clock.ticks(0x100)
    bus.write(0x43, 1, 0x00)  # latch
    clock.ticks(0x100)  # the latched value does not move
    lo, hi = bus.read(0x40, 1), bus.read(0x40, 1)
    assert (hi << 8 | lo) == 0x1000 - 0x100


def test_readback_status_and_bcd() -> None:
    bus, _, _, _, _ = pit()
    bus.write(0x43, 1, 0xB1)  # ch2, lo/hi, mode 0, BCD
    bus.write(0x42, 1, 0x99)
    bus.write(0x42, 1, 0x09)  # BCD 0999
    bus.write(0x43, 1, 0xE8)  # read-back: status only, ch2
    assert bus.read(0x42, 1) == 0x31  # OUT low, count loaded, lo/hi, mode 0, BCD
    lo, hi = bus.read(0x42, 1), bus.read(0x42, 1)
    assert hi <= 0x09 and all(int(d) < 10 for d in f"{hi:02x}{lo:02x}")


def test_port61_gate_and_out2_for_delay_loops() -> None:
    bus, _, clock, _, _ = pit()
    bus.write(0x61, 1, 0x01)  # gate 2 on
    bus.write(0x43, 1, 0xB0)  # ch2, lo/hi, mode 0
    bus.write(0x42, 1, 100)
    bus.write(0x42, 1, 0)
    assert not bus.read(0x61, 1) & 0x20
    clock.ticks(101)
    assert bus.read(0x61, 1) & 0x20  # terminal count reached
    assert bus.read(0x61, 1) & 0x10 != bus.read(0x61, 1) & 0x10  # refresh toggles


@given(st.lists(st.tuples(st.integers(0, 3), st.integers(0, 255)), max_size=80))
def test_random_pit_writes_never_raise(ops: list[tuple[int, int]]) -> None:
    bus, p, clock, _, _ = pit()
    for port, v in ops:
        bus.write(0x40 + port, 1, v)
        clock.ticks(v)
        assert 0 <= bus.read(0x40 + port % 3, 1) <= 0xFF
    for ch in p.channels:
        assert 1 <= ch.count <= 0x10000 and 0 <= ch.mode <= 5


def rtc(now: int = calendar.timegm((2026, 11, 25, 13, 45, 30, 0, 0, 0))) -> tuple[IoBus, Rtc]:
    r = Rtc(irq=RecordingLine(), memory_bytes=64 << 20, timer=FakeTimer(),
            now_ns=lambda: now * 10**9)
    bus = IoBus()
    bus.insert(r, 0x70, 2)
    return bus, r


def cmos(bus: IoBus, reg: int) -> int:
    bus.write(0x70, 1, reg)
    return bus.read(0x71, 1)


def test_rtc_time_bcd_binary_and_12h() -> None:
    bus, _ = rtc()
    assert [cmos(bus, r) for r in (0, 2, 4, 7, 8, 9, 0x32)] == [
        0x30, 0x45, 0x13, 0x25, 0x11, 0x26, 0x20]
    bus.write(0x70, 1, 0x0B)
    bus.write(0x71, 1, 0x04)  # binary, 12-hour
    assert cmos(bus, 0) == 30 and cmos(bus, 4) == 0x80 | 1  # 1 PM


def test_rtc_set_time_moves_the_guest_clock_only() -> None:
    bus, r = rtc()
    bus.write(0x70, 1, 0x09)
    bus.write(0x71, 1, 0x30)  # year 30
    assert cmos(bus, 9) == 0x30 and r.offset_s > 0
    bus.write(0x70, 1, 0x08)
    bus.write(0x71, 1, 0x13)  # month 13: impossible, ignored
    assert cmos(bus, 8) == 0x11


def test_rtc_memory_size_and_register_c_clears() -> None:
    bus, r = rtc()
    assert cmos(bus, 0x30) | cmos(bus, 0x31) << 8 == 63 * 1024
    assert cmos(bus, 0x34) | cmos(bus, 0x35) << 8 == (48 << 20) >> 16
    bus.write(0x70, 1, 0x0B)
    bus.write(0x71, 1, 0x42)  # PIE, 24h
    r.on_timer(1)
    assert cmos(bus, 0x0C) & 0xC0 == 0xC0 and cmos(bus, 0x0C) == 0
    assert r.periodic_ns() == 10**9 // 1024


@given(st.lists(st.tuples(st.integers(0, 255), st.integers(0, 255)), max_size=80))
def test_random_cmos_writes_never_raise(ops: list[tuple[int, int]]) -> None:
    bus, r = rtc()
    for reg, v in ops:
        bus.write(0x70, 1, reg)
        bus.write(0x71, 1, v)
        assert 0 <= bus.read(0x71, 1) <= 0xFF
        r.on_timer(1)
    assert len(r.cmos) == 128


def rtc_with_pie() -> tuple[Rtc, RecordingLine]:
    line = RecordingLine()
    r = Rtc(irq=line, timer=FakeTimer())
    r.write(0, 0, 1, 0x0B)
    r.write(0, 1, 1, 0x40 | 0x02)  # PIE, 24h
    return r, line


def read_c(r: Rtc) -> int:
    r.write(0, 0, 1, 0x0C)
    return r.read(0, 1, 1)


def test_rtc_irq_is_a_level_released_by_reading_register_c() -> None:
    r, line = rtc_with_pie()
    r.on_timer(1)
    assert line.level and r.periodic_interrupts == 1
    r.on_timer(1)  # not acknowledged yet: owed, no second edge
    assert r.periodic_interrupts == 1 and r.backlog == 1
    assert read_c(r) & 0xC0 == 0xC0  # IRQF | PF
    # the read acknowledged it and raised the owed one at once: a new edge
    assert line.level and r.periodic_interrupts == 2 and r.periodic_reinjected == 1
    assert line.history[-2:] == [False, True]
    read_c(r)
    assert not line.level and r.backlog == 0  # nothing owed: the line stays low


def test_rtc_periods_a_late_timer_coalesced_are_reinjected_one_per_ack() -> None:
    r, _ = rtc_with_pie()
    r.on_timer(5)  # the event loop was four periods late
    assert r.periodic_interrupts == 1 and r.backlog == 4 and r.periodic_missed == 4
    for _ in range(4):
        read_c(r)
    assert r.periodic_interrupts == 5 and r.backlog == 0 and r.periodic_reinjected == 4
    assert r.periodic_periods == 5


def test_rtc_turning_pie_off_forgives_what_is_owed_and_the_backlog_is_bounded() -> None:
    r, _ = rtc_with_pie()
    r.on_timer(MAX_BACKLOG + 10)
    assert r.backlog == MAX_BACKLOG and r.periodic_dropped == 9
    r.write(0, 0, 1, 0x0B)
    r.write(0, 1, 1, 0x02)  # PIE off
    assert r.backlog == 0 and r.periodic_forgiven == MAX_BACKLOG
    read_c(r)
    assert r.periodic_reinjected == 0
    assert r.periodic_periods == (r.periodic_interrupts + r.backlog + r.periodic_forgiven
                                  + r.periodic_dropped)


def test_pit_reinjects_coalesced_periods_one_per_8259_acknowledgement() -> None:
    raised: list[int] = []
    acks = [True]
    p = Pit(irq0=lambda: raised.append(1), timer=FakeTimer(), clock=Clock(),
            acks_irq0=lambda: acks[0])
    p.on_timer(4)  # three periods late
    assert len(raised) == 1 and p.backlog == 3
    p.on_timer(1)  # not acknowledged yet: owed
    assert len(raised) == 1 and p.backlog == 4
    for _ in range(4):
        p.acked()
    assert len(raised) == 5 and p.backlog == 0 and p.reinjected == 4
    p.acked()  # nothing owed: nothing raised
    assert len(raised) == 5 and p.periods == 5
    acks[0] = False  # the IOAPIC route: no acknowledgement to wait for
    p.on_timer(3)
    assert len(raised) == 6 and p.backlog == 0 and p.missed == 3 + 2
    assert p.periods == p.ticks + p.backlog + p.forgiven + p.dropped + 2  # 2 coalesced


def test_pit_reprogramming_forgives_what_is_owed() -> None:
    p = Pit(irq0=lambda: None, timer=FakeTimer(), clock=Clock(), acks_irq0=lambda: True)
    p.on_timer(10)
    assert p.backlog == 9
    p.write(0x40, 3, 1, 0x34)  # channel 0, new mode: the counter stops
    assert p.backlog == 0 and p.forgiven == 9
