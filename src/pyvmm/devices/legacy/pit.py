"""Intel 8254 programmable interval timer (three channels at 1.193182 MHz).

Modelled: control word (0x43) with counter latch and read-back commands, the three
counters (0x40-0x42) with LSB/MSB/LSB-then-MSB access, binary and BCD counting,
modes 0-5 (counts and OUT computed from a virtual clock, as the datasheet's
waveforms give them), gates, and port 0x61 (channel 2 gate, speaker data, OUT2 and
the refresh toggle bit used for delay loops). Channel 0's OUT drives IRQ 0: in
modes 2 and 3 a periodic host timerfd pulses the line once per period; in modes 0,
1, 4 and 5 a one-shot timerfd does. Expirations the host could not service in time
are counted (``missed``) and delivered as one edge, since the PIC would coalesce
them anyway.

Threat model: counts are 16-bit, modes 0-5 (6 and 7 alias 2 and 3); a guest can
program at most one timer period of 1/1193182 s, which the host timer floors at
``MIN_PERIOD_NS`` so a guest cannot make the VMM spin.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

PIT_FREQ = 1193182
MIN_PERIOD_NS = 50_000  # 20 kHz: beyond this the host timer coalesces expirations
NS = 1_000_000_000


class Timer(Protocol):
    """What a device needs from the host: arm and disarm (a TimerFd in the VMM)."""

    def set(self, first_ns: int, interval_ns: int = 0) -> None: ...


class NullTimer:
    """No host timer attached (unit tests, ``pyvmm info``)."""

    def set(self, first_ns: int, interval_ns: int = 0) -> None:
        pass


class DuePeriods:
    """How many periods a periodic host timer owed the guest by the host clock while it was
    armed. ``delivered + missed`` is what the device produced; this is what it should have
    produced, whatever the guest measured (its window, its TSC estimate) — the reference a
    rate check needs. Armed and disarmed by the vCPU thread, read after the run."""

    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self._done = 0.0
        self._since = 0
        self._period = 0

    def start(self, period_ns: int) -> None:
        self.stop()
        self._since, self._period = self.clock(), period_ns

    def stop(self) -> None:
        if self._period:
            self._done += (self.clock() - self._since) / self._period
            self._period = 0

    def due(self) -> int:
        running = (self.clock() - self._since) / self._period if self._period else 0.0
        return int(self._done + running)


class PitChannel:
    def __init__(self, clock: Callable[[], int]) -> None:
        self.clock = clock
        self.count = 0x10000
        self.mode = 0
        self.rw_mode = 3
        self.bcd = False
        self.gate = True
        self.load_ns = clock()
        self.latched: int | None = None  # latched count (16 bits)
        self.status_latched: int | None = None
        self.read_lsb_next = True
        self.write_lsb_next = True
        self.write_latch = 0
        self.null_count = True

    def _ticks(self) -> int:
        return (self.clock() - self.load_ns) * PIT_FREQ // NS

    def current(self) -> int:
        d, c = self._ticks(), self.count
        if self.mode in (0, 1, 4, 5):
            return (c - d) & 0xFFFF
        if self.mode == 3:
            return c - ((2 * d) % c)
        return c - (d % c)  # mode 2

    def out(self) -> bool:
        d, c = self._ticks(), self.count
        if self.mode == 0:
            return d >= c
        if self.mode == 1:
            return d < c
        if self.mode == 2:
            return (d % c) != 0 or d == 0
        if self.mode == 3:
            return (d % c) < ((c + 1) >> 1)
        return d != c  # modes 4, 5: a one-tick low pulse at terminal count

    def period_ns(self) -> int:
        return self.count * NS // PIT_FREQ

    def _to_bcd(self, v: int) -> int:
        v %= 10000
        return int(str(v), 16)

    def _from_bcd(self, v: int) -> int:
        digits = f"{v & 0xFFFF:04x}"
        return int(digits) if digits.isdigit() else v  # invalid BCD: take it as binary

    def read(self) -> int:
        if self.status_latched is not None:
            v, self.status_latched = self.status_latched, None
            return v
        if self.latched is None:
            cur = self.current()
            val = self._to_bcd(cur) if self.bcd else cur
        else:
            val = self.latched
        if self.rw_mode == 1:
            self.latched = None
            return val & 0xFF
        if self.rw_mode == 2:
            self.latched = None
            return (val >> 8) & 0xFF
        if self.read_lsb_next:
            self.read_lsb_next = False
            if self.latched is None:
                self.latched = val  # hold the value for the MSB read
            return val & 0xFF
        self.read_lsb_next = True
        self.latched = None
        return (val >> 8) & 0xFF

    def write(self, value: int) -> bool:
        """Returns True when a new count has been loaded."""
        if self.rw_mode == 1:
            return self.load(value)
        if self.rw_mode == 2:
            return self.load(value << 8)
        if self.write_lsb_next:
            self.write_latch = value
            self.write_lsb_next = False
            return False
        self.write_lsb_next = True
        return self.load(self.write_latch | (value << 8))

    def load(self, raw: int) -> bool:
        v = self._from_bcd(raw) if self.bcd else raw
        self.count = v if v else (10000 if self.bcd else 0x10000)
        self.load_ns = self.clock()
        self.null_count = False
        return True

    def control(self, value: int) -> None:
        rw = (value >> 4) & 3
        if rw == 0:  # counter latch command
            if self.latched is None:
                cur = self.current()
                self.latched = self._to_bcd(cur) if self.bcd else cur
                self.read_lsb_next = True
            return
        self.rw_mode = rw
        mode = (value >> 1) & 7
        self.mode = mode - 4 if mode >= 6 else mode
        self.bcd = bool(value & 1)
        self.read_lsb_next = self.write_lsb_next = True
        self.latched = None
        self.null_count = True

    def status(self) -> int:
        return ((0x80 if self.out() else 0) | (0x40 if self.null_count else 0)
                | (self.rw_mode << 4) | (self.mode << 1) | int(self.bcd))


# Periods owed at most (a second at 8 kHz); beyond, dropped and counted.
MAX_BACKLOG = 8192


class Pit:
    """Ports 0x40-0x43 (insert at 0x40, size 4); ``port61`` is the system control port."""

    def __init__(self, irq0: Callable[[], None], timer: Timer | None = None,
                 clock: Callable[[], int] = time.monotonic_ns,
                 acks_irq0: Callable[[], bool] | None = None) -> None:
        self.clock = clock
        self.channels = [PitChannel(clock) for _ in range(3)]
        self.irq0 = irq0
        self.timer: Timer = timer or NullTimer()
        self.speaker = False
        self.ticks = 0  # IRQ 0 edges raised (reinjected ones too)
        self.missed = 0  # periods the host timer coalesced
        # Ack-driven reinjection where the interrupt's acknowledgement can be seen: the
        # 8259's INTA (``acked``), while ``acks_irq0`` says IRQ 0 is unmasked there. An
        # IOAPIC edge gives the VMM no acknowledgement, so on that route a late period
        # stays coalesced (counted in ``missed``).
        self.acks_irq0 = acks_irq0 or (lambda: False)
        self.backlog = 0
        self.reinjected = self.forgiven = self.dropped = 0
        self.periods = 0  # periods the timer counted
        self._unacked = False
        self.due = DuePeriods(clock)  # periods owed in modes 2/3 (see DuePeriods)
        self.refresh = False

    def read(self, base: int, offset: int, size: int) -> int:
        if offset < 3:
            return self.channels[offset].read()
        return 0xFF  # the control register is write-only

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 3:
            sel = value >> 6
            if sel == 3:  # read-back command
                for i in range(3):
                    if value & (2 << i):
                        ch = self.channels[i]
                        if not value & 0x10 and ch.status_latched is None:
                            ch.status_latched = ch.status()
                        if not value & 0x20:
                            ch.control(0)  # latch count
                return
            self.channels[sel].control(value)
            if sel == 0 and (value >> 4) & 3:
                self.timer.set(0)  # a new mode stops the counter until a count is written
                self.due.stop()
                self.forgiven += self.backlog  # a reprogrammed counter owes nothing
                self.backlog = 0
            return
        if self.channels[offset].write(value) and offset == 0:
            self._arm()

    def _arm(self) -> None:
        ch = self.channels[0]
        period = max(ch.period_ns(), MIN_PERIOD_NS)
        if ch.mode in (2, 3):
            self.timer.set(period, period)
            self.due.start(period)
        else:
            self.timer.set(period)
            self.due.stop()

    def on_timer(self, expirations: int) -> None:
        """Host timer fired (event loop): raise IRQ 0."""
        if expirations <= 0:
            return
        self.missed += expirations - 1
        self.periods += expirations
        if not self.acks_irq0():
            self._unacked = False
            self._raise()  # no acknowledgement to wait for: one edge, the rest coalesced
            return
        if self._unacked:
            self._owe(expirations)  # the last one is not acknowledged yet
        else:
            self._owe(expirations - 1)
            self._raise()

    def _raise(self) -> None:
        self.ticks += 1
        self._unacked = True
        self.irq0()

    def _owe(self, n: int) -> None:
        room = MAX_BACKLOG - self.backlog
        self.backlog += min(n, room)
        self.dropped += max(0, n - room)

    def acked(self) -> None:
        """The interrupt controller took IRQ 0 (the 8259's INTA): raise what is owed."""
        self._unacked = False
        if self.backlog:
            self.backlog -= 1
            self.reinjected += 1
            self._raise()

    # --- port 0x61 ----------------------------------------------------------------
    def read_port61(self) -> int:
        self.refresh = not self.refresh
        ch2 = self.channels[2]
        return (int(ch2.gate) | (int(self.speaker) << 1) | (int(self.refresh) << 4)
                | (int(ch2.out()) << 5))

    def write_port61(self, value: int) -> None:
        ch2 = self.channels[2]
        gate = bool(value & 1)
        if gate and not ch2.gate and ch2.mode in (1, 5, 2, 3):
            ch2.load_ns = self.clock()  # a rising gate retriggers
        ch2.gate = gate
        self.speaker = bool(value & 2)


class Port61:
    """Bus adapter for the system control port B at 0x61."""

    def __init__(self, pit: Pit) -> None:
        self.pit = pit

    def read(self, base: int, offset: int, size: int) -> int:
        return self.pit.read_port61()

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        self.pit.write_port61(value & 0xFF)
