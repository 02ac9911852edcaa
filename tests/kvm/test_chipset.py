"""PIT and RTC interrupts through the PIC and the IOAPIC, on KVM's in-kernel chip and on
pyvmm's split chip (Python PIC/IOAPIC/PIT): the same guests pass on both."""

from __future__ import annotations

import calendar
import json
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import pyvmm_cmd


def tsc_khz() -> int:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    pytest.skip("no cpu MHz in /proc/cpuinfo to convert the guest TSC")


def run(guest: Path, chip: str, cmdline: str, js: Path | None = None
        ) -> subprocess.CompletedProcess[str]:
    extra = ["--exits-json", str(js)] if js else []
    return subprocess.run(pyvmm_cmd("run", "-q", "--irqchip", chip, "--timeout", "60",
                                    "--kernel", str(guest), "--cmdline", cmdline, *extra),
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("chip", ["kernel", "split"])
@pytest.mark.parametrize("route", [1, 2], ids=["pic", "ioapic"])
def test_pit_1khz_for_one_second(guests: Path, chip: str, route: int, tmp_path: Path) -> None:
    """The guest programs 1 kHz and counts its timer interrupts over 1 s of its own TSC.
    A userspace timer on a busy 2-core host gets woken late and coalesces periods
    (seen: 828 of 1000 in a bench run), so the rate itself is checked where it cannot be
    blurred by scheduling: the Python PIT's own count of periods (delivered + coalesced)
    against the periods due by the host clock while it was armed (``pit_due``). The
    guest's window is not that span — the timer is armed before it starts and stopped by
    an exit after it ends, which a descheduled vCPU delays (1036 periods for a 1000 ms
    window seen in CI). KVM's PIT (kernel chip) reinjects late ticks, so its window may
    see more than its share (1023 seen on a loaded machine): what both chips guarantee
    is that the total since programming never exceeds the periods elapsed since then,
    and with reinjection a backlog drains (the guest waits up to 3 s for it)."""
    js = tmp_path / "x.json"
    p = run(guests / "pit_irq.elf", chip, f"route={route} hz=1000 ms=1000 tsc_khz={tsc_khz()}",
            js)
    m = re.search(r"ticks=(\d+) expected=(\d+) total=(\d+) periods=(\d+) caught_up=(\d) "
                  r"over=(\d) final=(\d+)", p.stdout)
    assert m, p.stdout + p.stderr
    ticks, want, total, periods, caught_up, over, final = map(int, m.groups())
    assert p.returncode == 0, p.stdout
    # Both chips: never more interrupts since programming than periods since then.
    assert not over and total <= periods + 2, p.stdout
    rep = json.loads(js.read_text())["irqchip"]
    if chip == "split":
        periods_counted, due = rep["pit_periods"], rep["pit_due"]
        assert due >= want * 97 // 100, rep  # armed across the guest's window
        # -3%: periods still unread in the timerfd when the guest stops the timer are lost
        assert due * 97 // 100 - 2 <= periods_counted <= due + 2, rep
        delivered = rep["pic_injected"] if route == 1 else rep["ioapic_delivered"]
        assert rep["pit_ticks"] >= ticks and delivered >= ticks
        if route == 1:
            # Through the 8259 the PIT sees each INTA: it raises the next period only
            # then, and owes what a late timer coalesced (ack-driven reinjection). So
            # every edge it raised reached the guest, and every period it counted was
            # raised, owed, forgiven when the guest stopped the counter, or dropped.
            assert final == rep["pit_ticks"], (final, rep)
            assert rep["pit_periods"] == (rep["pit_ticks"] + rep["pit_backlog"]
                                          + rep["pit_forgiven"] + rep["pit_dropped"]), rep
            assert rep["pit_dropped"] == 0, rep
    else:
        # KVM's PIT reinjects what a stalled vCPU missed: the total catches up with the
        # periods elapsed (a wrong divisor or mode would not), whatever the scheduling.
        assert caught_up, p.stdout


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_rtc_time_and_periodic_interrupt(guests: Path, chip: str, tmp_path: Path) -> None:
    before = int(time.time())
    js = tmp_path / "x.json"
    p = run(guests / "rtc.elf", chip, f"tsc_khz={tsc_khz()} ms=500", js)  # 1024 Hz
    after = int(time.time())
    assert p.returncode == 0, p.stdout + p.stderr
    m = re.search(r"rtc (\d{4})-(\d\d)-(\d\d) (\d\d):(\d\d):(\d\d)", p.stdout)
    assert m
    y, mo, d, h, mi, s = (int(x) for x in m.groups())
    guest = calendar.timegm((y, mo, d, h, mi, s, 0, 0, 0))
    assert before - 1 <= guest <= after + 1
    assert "cmos mem above 1M: 64512 KiB" in p.stdout  # 64 MiB guest
    t = re.search(r"periodic ticks=(\d+) expected=(\d+) total=(\d+)", p.stdout)
    assert t
    n, want, total = (int(x) for x in t.groups())
    rep = json.loads(js.read_text())["irqchip"]
    check_rtc_accounting(rep, want, total)
    assert n > 0, p.stdout  # (how many in the window depends on how busy the host is)


def check_rtc_accounting(rep: dict[str, int], want: int, total: int) -> None:
    """What the RTC guarantees whatever the host's scheduling. The interrupt is a level
    the guest acknowledges by reading register C, and the next one is raised only then:
    so every interrupt the RTC raised reached the guest (none coalesced in the
    interrupt controller). Every period the timer counted was raised, or is still owed,
    or was forgiven when the guest turned PIE off (or dropped past the backlog cap). And
    the timer's count is the rate: within the periods due by the host clock while armed
    (-3%: periods unread in the timerfd when the guest stops it are not counted)."""
    assert total == rep["rtc_periodic"], rep  # delivered == raised, exactly
    assert rep["rtc_periods"] == (rep["rtc_periodic"] + rep["rtc_backlog"]
                                  + rep["rtc_forgiven"] + rep["rtc_dropped"]), rep
    assert rep["rtc_dropped"] == 0 and rep["rtc_backlog"] == 0, rep
    due = rep["rtc_due"]
    assert due >= want * 97 // 100, rep  # armed across the guest's window
    assert due * 97 // 100 - 2 <= rep["rtc_periods"] <= due + 2, rep


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_rtc_ticks_the_guest_was_late_for_are_reinjected(guests: Path, chip: str,
                                                        tmp_path: Path) -> None:
    """A loaded second: two busy loops beside the VM make the host timer and the vCPU
    late. Periods coalesced then are owed and raised one per acknowledgement, so the
    guest's total is what the RTC raised, and what it raised plus what it still owed
    when the guest stopped is every period counted."""
    hogs = [subprocess.Popen(["sh", "-c", "while :; do :; done"]) for _ in range(2)]
    try:
        js = tmp_path / "x.json"
        p = run(guests / "rtc.elf", chip, f"tsc_khz={tsc_khz()} ms=1000", js)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    assert p.returncode == 0, p.stdout + p.stderr
    t = re.search(r"periodic ticks=(\d+) expected=(\d+) total=(\d+)", p.stdout)
    assert t, p.stdout
    _, want, total = (int(x) for x in t.groups())
    rep = json.loads(js.read_text())["irqchip"]
    check_rtc_accounting(rep, want, total)
    # Owed periods were raised once acknowledged: whatever was late was not lost, only
    # what was still owed when the guest turned the interrupt off.
    assert total + rep["rtc_forgiven"] == rep["rtc_periods"], rep
