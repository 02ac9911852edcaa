"""Motorola MC146818 real-time clock and CMOS NVRAM (ports 0x70 index, 0x71 data).

Modelled: time and date registers 0-9 from the host clock (plus a guest-set offset),
alarm registers, register A (UIP for the last 244 µs of each second, rate select),
register B (SET, PIE, AIE, UIE, DM binary/BCD, 24/12 hour), register C (IRQF, PF,
AF, UF; read-to-clear), register D (VRT), the century byte (0x32), and NVRAM
0x0E-0x7F with the memory-size bytes a BIOS would leave (0x15-0x18, 0x30-0x31,
0x34-0x35, 0x5B-0x5D). Periodic interrupts (rates 3-15 of register A) come from a
host timerfd; update-ended and alarm interrupts are checked once a second by the
same timer path. The interrupt output is IRQ 8 (edge).

Not modelled: the NMI-disable bit (bit 7 of the index; it is masked off), daylight
saving, divider reset chains beyond "running or not".

Threat model: 128 bytes of state; the index is masked to 7 bits; time fields written
with invalid values are stored as given (like hardware) and only change what the
guest reads back.
"""

from __future__ import annotations

import calendar
import time
from collections.abc import Callable

from pyvmm.devices.legacy.pit import DuePeriods, NullTimer, Timer
from pyvmm.irq.line import InterruptLine

RTC_SECONDS, RTC_SECONDS_ALARM, RTC_MINUTES, RTC_MINUTES_ALARM = 0, 1, 2, 3
RTC_HOURS, RTC_HOURS_ALARM, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH = 4, 5, 6, 7
RTC_MONTH, RTC_YEAR = 8, 9
RTC_REG_A, RTC_REG_B, RTC_REG_C, RTC_REG_D = 0x0A, 0x0B, 0x0C, 0x0D
RTC_CENTURY = 0x32
RTC_UIP = 0x80
RTC_SET, RTC_PIE, RTC_AIE, RTC_UIE = 0x80, 0x40, 0x20, 0x10
RTC_DM_BINARY, RTC_24H = 0x04, 0x02
RTC_IRQF, RTC_PF, RTC_AF, RTC_UF = 0x80, 0x40, 0x20, 0x10
RTC_VRT = 0x80
UIP_NS = 244_000


def _bcd(v: int) -> int:
    return ((v // 10) << 4) | (v % 10)


def _unbcd(v: int) -> int:
    return (v >> 4) * 10 + (v & 0xF)


# How many periodic interrupts a guest that fell behind may be owed: one second's worth
# at the fastest rate. Beyond that, periods are dropped (and counted).
MAX_BACKLOG = 8192


class Rtc:
    """The MC146818's IRQ output is a level: asserted while REG_C.IRQF is set, released
    when the guest reads REG_C (which is how a driver acknowledges it). Periods that pass
    while an interrupt is still unacknowledged, or that the host's timer was late for,
    are owed: each REG_C read that acknowledges one raises the next at once, until the
    guest has had every period due (ack-driven reinjection, as KVM's in-kernel PIT does
    for its EOIs; a backlog over MAX_BACKLOG is dropped and counted)."""

    def __init__(self, irq: InterruptLine, memory_bytes: int = 0,
                 timer: Timer | None = None,
                 now_ns: Callable[[], int] = time.time_ns) -> None:
        self.irq = irq
        self.timer: Timer = timer or NullTimer()
        self.now_ns = now_ns
        self.offset_s = 0  # guest-set time minus host time
        self.index = 0
        self.cmos = bytearray(128)
        self.cmos[RTC_REG_A] = 0x26  # 32.768 kHz divider, 1024 Hz rate
        self.cmos[RTC_REG_B] = RTC_24H
        self.cmos[RTC_REG_D] = RTC_VRT
        self.periodic_interrupts = 0  # periodic interrupts raised (reinjected ones too)
        self.periodic_missed = 0  # periods the host timer coalesced (owed, not lost)
        self.periodic_reinjected = 0
        self.periodic_dropped = 0  # owed past MAX_BACKLOG
        self.periodic_forgiven = 0  # owed when the guest turned periodic interrupts off
        self.periodic_periods = 0  # periods the timer counted while PIE was on
        self.backlog = 0
        self.periodic_due = DuePeriods(time.monotonic_ns)
        self._last_second = -1
        self._set_memory(memory_bytes)

    def _set_memory(self, size: int) -> None:
        kb = size >> 10
        ext = min(max(kb - 1024, 0), 0xFFFF)  # KiB above 1 MiB, capped
        for reg in (0x17, 0x30):
            self.cmos[reg], self.cmos[reg + 1] = ext & 0xFF, ext >> 8
        self.cmos[0x15], self.cmos[0x16] = 640 & 0xFF, 640 >> 8
        above16 = min(max((size - (16 << 20)) >> 16, 0), 0xFFFF)  # 64 KiB units
        self.cmos[0x34], self.cmos[0x35] = above16 & 0xFF, above16 >> 8
        above4g = max(size - 0xC0000000, 0) >> 16
        self.cmos[0x5B], self.cmos[0x5C], self.cmos[0x5D] = (
            above4g & 0xFF, (above4g >> 8) & 0xFF, (above4g >> 16) & 0xFF)

    # --- time -----------------------------------------------------------------------
    def _enc(self, v: int) -> int:
        return v if self.cmos[RTC_REG_B] & RTC_DM_BINARY else _bcd(v)

    def _dec(self, v: int) -> int:
        return v if self.cmos[RTC_REG_B] & RTC_DM_BINARY else _unbcd(v)

    def _now(self) -> tuple[time.struct_time, int]:
        ns = self.now_ns() + self.offset_s * 1_000_000_000
        return time.gmtime(ns // 1_000_000_000), ns % 1_000_000_000

    def _time_reg(self, reg: int) -> int:
        t, _ = self._now()
        if reg == RTC_SECONDS:
            return self._enc(t.tm_sec)
        if reg == RTC_MINUTES:
            return self._enc(t.tm_min)
        if reg == RTC_HOURS:
            h = t.tm_hour
            if self.cmos[RTC_REG_B] & RTC_24H:
                return self._enc(h)
            pm = 0x80 if h >= 12 else 0
            return self._enc(h % 12 or 12) | pm
        if reg == RTC_DAY_OF_WEEK:
            return self._enc((t.tm_wday + 1) % 7 + 1)  # 1 = Sunday
        if reg == RTC_DAY_OF_MONTH:
            return self._enc(t.tm_mday)
        if reg == RTC_MONTH:
            return self._enc(t.tm_mon)
        if reg == RTC_YEAR:
            return self._enc(t.tm_year % 100)
        return self._enc(t.tm_year // 100)  # century

    def _set_time_reg(self, reg: int, value: int) -> None:
        t, _ = self._now()
        fields = [t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min, t.tm_sec]
        v = self._dec(value & 0x7F if reg == RTC_HOURS else value)
        if reg == RTC_HOURS and not self.cmos[RTC_REG_B] & RTC_24H:
            v = (v % 12) + (12 if value & 0x80 else 0)
        idx = {RTC_YEAR: 0, RTC_MONTH: 1, RTC_DAY_OF_MONTH: 2, RTC_HOURS: 3, RTC_MINUTES: 4,
               RTC_SECONDS: 5}.get(reg)
        if reg == RTC_YEAR:
            fields[0] = (t.tm_year // 100) * 100 + v
        elif reg == RTC_CENTURY:
            fields[0] = v * 100 + t.tm_year % 100
        elif idx is not None:
            fields[idx] = v
        else:
            return
        try:
            guest = calendar.timegm((*fields, 0, 0, 0))
        except (ValueError, OverflowError):
            return  # an impossible date: keep the clock as it was
        self.offset_s = guest - self.now_ns() // 1_000_000_000

    # --- ports ------------------------------------------------------------------------
    def read(self, base: int, offset: int, size: int) -> int:
        if offset == 0:
            return 0xFF  # the index port is write-only
        reg = self.index
        if reg in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_WEEK, RTC_DAY_OF_MONTH,
                   RTC_MONTH, RTC_YEAR, RTC_CENTURY):
            return self._time_reg(reg)
        if reg == RTC_REG_A:
            _, frac = self._now()
            uip = RTC_UIP if frac >= 1_000_000_000 - UIP_NS and not (
                self.cmos[RTC_REG_B] & RTC_SET) else 0
            return (self.cmos[RTC_REG_A] & 0x7F) | uip
        if reg == RTC_REG_C:
            self._check_update()
            v = self.cmos[RTC_REG_C]
            self.cmos[RTC_REG_C] = 0  # read clears the flags and releases the line
            self.irq.set_level(False)
            if self.backlog and self.cmos[RTC_REG_B] & RTC_PIE and v & RTC_IRQF:
                self.backlog -= 1  # this read acknowledged one: the next owed one now
                self.periodic_reinjected += 1
                self._raise_periodic()
            return v
        return self.cmos[reg]

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.index = value & 0x7F
            return
        reg = self.index
        if reg in (RTC_SECONDS, RTC_MINUTES, RTC_HOURS, RTC_DAY_OF_MONTH, RTC_MONTH, RTC_YEAR,
                   RTC_CENTURY):
            self._set_time_reg(reg, value)
            if reg == RTC_CENTURY:
                self.cmos[reg] = value
        elif reg == RTC_REG_A:
            self.cmos[reg] = value & 0x7F
            self._arm()
        elif reg == RTC_REG_B:
            self.cmos[reg] = value
            if not value & RTC_PIE:
                self.periodic_forgiven += self.backlog  # off: nothing is owed any more
                self.backlog = 0
            self._arm()
        elif reg in (RTC_REG_C, RTC_REG_D):
            pass  # read-only
        else:
            self.cmos[reg] = value

    # --- interrupts -------------------------------------------------------------------
    def periodic_ns(self) -> int:
        rate = self.cmos[RTC_REG_A] & 0x0F
        if rate == 0:
            return 0
        if rate <= 2:
            rate += 7  # rates 1 and 2 alias 8 and 9 (datasheet table 3)
        return 1_000_000_000 * (1 << (rate - 1)) // 32768

    def _arm(self) -> None:
        b = self.cmos[RTC_REG_B]
        if b & RTC_PIE and self.periodic_ns():
            p = self.periodic_ns()
            self.timer.set(p, p)
            self.periodic_due.start(p)
            return
        self.periodic_due.stop()
        if b & (RTC_UIE | RTC_AIE):
            self.timer.set(100_000_000, 100_000_000)  # check update/alarm at 10 Hz
        else:
            self.timer.set(0)

    def _check_update(self) -> bool:
        """Set UF/AF when a second boundary has passed; True if an enabled flag rose."""
        t, _ = self._now()
        sec = calendar.timegm(t)
        if sec == self._last_second:
            return False
        first = self._last_second < 0
        self._last_second = sec
        if first:
            return False
        raised = 0
        self.cmos[RTC_REG_C] |= RTC_UF
        raised |= self.cmos[RTC_REG_B] & RTC_UIE
        alarm = all(
            (self.cmos[a] & 0xC0) == 0xC0 or self.cmos[a] == self._time_reg(r)
            for a, r in ((RTC_SECONDS_ALARM, RTC_SECONDS), (RTC_MINUTES_ALARM, RTC_MINUTES),
                         (RTC_HOURS_ALARM, RTC_HOURS)))
        if alarm:
            self.cmos[RTC_REG_C] |= RTC_AF
            raised |= self.cmos[RTC_REG_B] & RTC_AIE
        return bool(raised)

    def _raise_periodic(self) -> None:
        self.cmos[RTC_REG_C] |= RTC_PF | RTC_IRQF
        self.periodic_interrupts += 1
        self.irq.set_level(True)

    def _owe(self, n: int) -> None:
        room = MAX_BACKLOG - self.backlog
        self.backlog += min(n, room)
        self.periodic_dropped += max(0, n - room)

    def on_timer(self, expirations: int) -> None:
        if expirations <= 0:
            return
        b = self.cmos[RTC_REG_B]
        if b & RTC_PIE:
            # Periods the event loop was too late for are owed, as is this one if the
            # guest has not acknowledged the last interrupt yet (IRQF still set).
            self.periodic_missed += expirations - 1
            self.periodic_periods += expirations
            if self.cmos[RTC_REG_C] & RTC_IRQF:
                self._owe(expirations)
            else:
                self._owe(expirations - 1)
                self._raise_periodic()
        if b & (RTC_UIE | RTC_AIE) and self._check_update():
            self.cmos[RTC_REG_C] |= RTC_IRQF
            self.irq.set_level(True)
