"""The i8042 controller with its PS/2 keyboard and mouse, driven through the ports as a
driver does (Linux's i8042.c / atkbd.c / psmouse sequences), plus host input."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.bus import IoBus
from pyvmm.devices.input.ps2 import QUEUE_SIZE, REPLY_RESERVE
from pyvmm.devices.input.ps2_mouse import packet, scale21
from pyvmm.devices.legacy.i8042 import CTL_QUEUE_MAX, I8042
from pyvmm.uapi.input import KEYS, XLATE, break_code

OBF, SYS, CMD, AUXB = 0x01, 0x04, 0x08, 0x20


class Line:
    def __init__(self) -> None:
        self.level = False
        self.rises = 0

    def set_level(self, level: bool) -> None:
        if level and not self.level:
            self.rises += 1
        self.level = level

    def pulse(self) -> None:
        self.rises += 1


class Kbc:
    """A driver's view: the two ports on a bus, and the two lines."""

    def __init__(self) -> None:
        self.resets = 0
        self.irq1, self.irq12 = Line(), Line()
        self.dev = I8042(on_reset=self._reset, irq1=self.irq1, irq12=self.irq12)
        self.bus = IoBus()
        self.bus.insert(self.dev, 0x60, 1)
        self.bus.insert(self.dev, 0x64, 1)

    def _reset(self) -> None:
        self.resets += 1

    def status(self) -> int:
        return self.bus.read(0x64, 1)

    def cmd(self, c: int, arg: int | None = None) -> None:
        self.bus.write(0x64, 1, c)
        if arg is not None:
            self.bus.write(0x60, 1, arg)

    def data(self, v: int) -> None:
        self.bus.write(0x60, 1, v)

    def read_all(self) -> list[tuple[int, int]]:
        """(byte, status) until the output buffer is empty."""
        out = []
        while (st_ := self.status()) & OBF:
            out.append((self.bus.read(0x60, 1), st_))
        return out

    def bytes(self) -> list[int]:
        return [b for b, _ in self.read_all()]

    def ctr(self) -> int:
        self.cmd(0x20)
        return self.bytes()[0]

    def set_ctr(self, v: int) -> None:
        self.cmd(0x60, v)

    def aux(self, *data: int) -> list[int]:
        for d in data:
            self.cmd(0xD4, d)
        return self.bytes()


# --- the controller -------------------------------------------------------------------
def test_controller_self_and_interface_tests() -> None:
    k = Kbc()
    k.cmd(0xAA)
    assert k.read_all() == [(0x55, SYS | CMD | 0x10 | OBF)]
    k.cmd(0xAB)
    assert k.bytes() == [0x00]
    k.cmd(0xA9)
    assert k.bytes() == [0x00]
    k.cmd(0xA4)
    assert k.bytes() == [0xF1]  # no password installed


def test_command_byte_and_ram_round_trip() -> None:
    k = Kbc()
    assert k.ctr() == 0x47  # what a BIOS leaves: XLATE, SYS, INT2, INT
    k.set_ctr(0x65)
    assert k.ctr() == 0x65
    k.cmd(0x65, 0xA5)  # controller RAM byte 5
    k.cmd(0x25)
    assert k.bytes() == [0xA5]
    k.set_ctr(0x00)  # SYS flag cleared in the command byte shows in the status
    assert not k.status() & SYS


def test_disable_enable_ports_set_command_byte_bits() -> None:
    k = Kbc()
    k.cmd(0xAD)
    assert k.ctr() & 0x10
    k.cmd(0xAE)
    assert not k.ctr() & 0x10
    k.cmd(0xA7)
    assert k.ctr() & 0x20
    k.cmd(0xA8)
    assert not k.ctr() & 0x20


def test_status_cmd_bit_follows_the_last_port_written() -> None:
    k = Kbc()
    k.cmd(0xAE)
    assert k.status() & CMD
    k.data(0xEE)
    assert not k.status() & CMD


def test_pulse_reset_and_output_port() -> None:
    k = Kbc()
    k.cmd(0xFF)  # pulses nothing (bit 0 high)
    assert k.resets == 0
    k.cmd(0xFE)
    assert k.resets == 1
    k.cmd(0xF0)  # every pulse command with bit 0 low drives the reset line
    assert k.resets == 2
    k.cmd(0xD0)
    assert k.bytes()[0] & 0x03 == 0x03  # reset high, A20 on
    k.cmd(0xDD)
    k.cmd(0xD0)
    assert not k.bytes()[0] & 0x02
    k.cmd(0xD1, 0x03)
    assert k.resets == 2
    k.cmd(0xD1, 0x02)
    assert k.resets == 3


def test_output_port_shows_the_irq_lines() -> None:
    k = Kbc()
    k.dev.keyboard.press("KEY_A")  # OBF from the keyboard, INT on: IRQ 1 high
    assert k.irq1.level
    k.cmd(0xD0)  # the reply queues behind the keyboard byte already in the buffer
    assert k.bytes() == [0x1E, 0x13]  # translated A, then the port: reset, A20, bit 4


def test_write_kbd_and_aux_output_buffer_loop_back() -> None:
    k = Kbc()
    k.cmd(0xD2, 0x5A)
    assert k.read_all() == [(0x5A, SYS | 0x10 | OBF)]
    assert k.irq1.rises == 1 and not k.irq1.level
    k.cmd(0xD3, 0xA5)  # what Linux's i8042_check_aux does
    (b, s), = k.read_all()
    assert b == 0xA5 and s & AUXB
    assert k.irq12.rises == 1 and not k.irq12.level


def test_interrupts_follow_the_command_byte_enables() -> None:
    k = Kbc()
    k.set_ctr(0x44)  # INT off
    k.dev.keyboard.press("KEY_A")
    assert k.status() & OBF and not k.irq1.level
    k.set_ctr(0x45)  # on while the byte waits: the line rises now
    assert k.irq1.level
    assert k.bytes() == [0x1E]
    assert not k.irq1.level


def test_empty_output_buffer_reads_the_last_byte_again() -> None:
    k = Kbc()
    assert k.bus.read(0x60, 1) == 0  # nothing ever loaded
    k.cmd(0xAA)
    assert k.bus.read(0x60, 1) == 0x55
    assert not k.status() & OBF
    assert k.bus.read(0x60, 1) == 0x55
    assert k.bus.read(0x60, 1) == 0x55


def test_unknown_controller_command_is_ignored() -> None:
    k = Kbc()
    before = k.ctr()
    k.cmd(0x01)
    assert k.bytes() == [] and k.ctr() == before
    assert k.dev.errors.counts["ctl-cmd"] == 1


def test_controller_reply_flood_is_bounded() -> None:
    k = Kbc()
    for _ in range(10_000):
        k.cmd(0xAA)
    got = k.bytes()
    assert got == [0x55] * (CTL_QUEUE_MAX + 1)  # the output buffer plus the queue
    assert k.dev.ctl_dropped == 10_000 - CTL_QUEUE_MAX - 1


def test_disabled_keyboard_port_holds_bytes_in_the_keyboard() -> None:
    k = Kbc()
    k.cmd(0xAD)
    k.dev.keyboard.press("KEY_A")
    assert not k.status() & OBF
    k.cmd(0xAE)
    assert k.bytes() == [0x1E]


# --- the keyboard ---------------------------------------------------------------------
def test_keyboard_init_sequence_as_atkbd() -> None:
    k = Kbc()
    k.set_ctr(0x05)  # translation off: raw set 2 replies
    k.data(0xFF)
    assert k.bytes() == [0xFA, 0xAA]
    k.data(0xF2)
    assert k.bytes() == [0xFA, 0xAB, 0x83]
    k.data(0xED)
    assert k.bytes() == [0xFA]
    k.data(0x07)
    assert k.bytes() == [0xFA] and k.dev.keyboard.leds == 7
    k.data(0xEE)
    assert k.bytes() == [0xEE]
    k.data(0xF3)
    k.data(0x20)
    assert k.bytes() == [0xFA, 0xFA] and k.dev.keyboard.typematic == 0x20
    k.data(0xF4)
    assert k.bytes() == [0xFA]
    k.data(0xFE)  # resend: the last byte again
    assert k.bytes() == [0xFA]


def test_identify_with_translation_is_translated() -> None:
    k = Kbc()
    k.data(0xF2)
    assert k.bytes() == [0xFA, 0xAB, 0x41]  # what Linux's atkbd sees behind XLATE


@pytest.mark.parametrize("scan_set", [1, 2, 3])
def test_scan_code_set_get_and_set(scan_set: int) -> None:
    k = Kbc()
    k.set_ctr(0x05)
    k.data(0xF0)
    k.data(scan_set)
    assert k.bytes() == [0xFA, 0xFA]
    k.data(0xF0)
    k.data(0x00)
    assert k.bytes() == [0xFA, 0xFA, scan_set]
    k.data(0xF0)
    k.data(0x07)  # no such set
    assert k.bytes() == [0xFA, 0xFE]


def test_unknown_keyboard_command_gets_resend() -> None:
    k = Kbc()
    k.set_ctr(0x05)
    k.data(0x42)
    k.data(0xE0)
    assert k.bytes() == [0xFE, 0xFE]


def test_a_command_where_an_argument_was_expected_runs() -> None:
    k = Kbc()
    k.set_ctr(0x05)
    k.data(0xED)
    k.data(0xFF)  # reset instead of an LED byte
    assert k.bytes() == [0xFA, 0xFA, 0xAA]


def test_disable_scanning_drops_host_keys_and_enable_resumes() -> None:
    k = Kbc()
    kb = k.dev.keyboard
    k.data(0xF5)
    assert k.bytes() == [0xFA]
    assert kb.press("KEY_A") is False and kb.host_dropped == 1
    assert k.bytes() == []
    k.data(0xF4)
    assert k.bytes() == [0xFA]
    assert kb.press("KEY_A") is True


def test_keys_in_set_2_raw_and_translated_to_set_1() -> None:
    k = Kbc()
    kb = k.dev.keyboard
    k.set_ctr(0x05)  # raw set 2
    kb.press("KEY_A")
    kb.release("KEY_A")
    kb.press("KEY_UP")
    kb.release("KEY_UP")
    assert k.bytes() == [0x1C, 0xF0, 0x1C, 0xE0, 0x75, 0xE0, 0xF0, 0x75]
    k.set_ctr(0x45)  # XLATE: the controller turns them into set 1
    kb.press("KEY_A")
    kb.release("KEY_A")
    kb.press("KEY_UP")
    kb.release("KEY_UP")
    assert k.bytes() == [0x1E, 0x9E, 0xE0, 0x48, 0xE0, 0xC8]


def test_keyboard_in_set_1_sends_set_1() -> None:
    k = Kbc()
    k.set_ctr(0x05)
    k.data(0xF0)
    k.data(0x01)
    k.bytes()
    k.dev.keyboard.press("KEY_ESC")
    k.dev.keyboard.release("KEY_ESC")
    assert k.bytes() == [0x01, 0x81]


@given(st.sampled_from(sorted(KEYS)))
def test_translation_of_every_key_gives_its_set_1_codes(name: str) -> None:
    k = Kbc()
    kb = k.dev.keyboard
    kb.press(name)
    kb.release(name)
    key = KEYS[name]
    assert bytes(k.bytes()) == key.set1 + break_code(key, 1)


def test_type_text_shifts_capitals() -> None:
    k = Kbc()
    k.set_ctr(0x05)
    assert k.dev.keyboard.type_text("aB") == 2
    assert k.bytes() == [0x1C, 0xF0, 0x1C, 0x12, 0x32, 0xF0, 0x32, 0xF0, 0x12]
    with pytest.raises(ValueError):
        k.dev.keyboard.type_text("é")
    with pytest.raises(ValueError):
        k.dev.keyboard.press("KEY_NOPE")


def test_host_input_is_bounded_and_whole() -> None:
    k = Kbc()
    k.set_ctr(0x05)
    kb = k.dev.keyboard
    n = 0
    while kb.press("KEY_UP"):  # 2 bytes each
        n += 1
    # One byte went to the output buffer; the queue holds the rest up to its limit.
    assert n == (QUEUE_SIZE - REPLY_RESERVE + 1) // 2
    assert kb.host_dropped == 1
    got = k.bytes()
    assert got == [0xE0, 0x75] * n  # no torn sequence
    k.data(0xEE)  # replies still fit after a full queue
    assert k.bytes() == [0xEE]


def test_keyboard_command_flood_is_bounded() -> None:
    k = Kbc()
    for _ in range(5000):
        k.data(0xEE)
    got = k.bytes()
    assert got == [0xEE] * (QUEUE_SIZE + 1)
    assert k.dev.keyboard.replies_dropped == 5000 - QUEUE_SIZE - 1
    assert k.dev.keyboard.errors.counts["ps2-flood"] == 5000 - QUEUE_SIZE - 1


def test_key_table_matches_the_linux_header() -> None:
    h = Path("/usr/include/linux/input-event-codes.h")
    if not h.exists():
        pytest.skip(f"{h} is not installed (linux-libc-dev)")
    codes = {m[1]: int(m[2], 0) for m in
             re.finditer(r"#define\s+(KEY_\w+)\s+(0x[0-9a-fA-F]+|\d+)\b", h.read_text())}
    assert {n: k.code for n, k in KEYS.items()} == {n: codes[n] for n in KEYS}


def test_translation_table_keeps_replies() -> None:
    for b in (0xFA, 0xAA, 0xEE, 0xFE, 0xAB, 0xE0):
        assert XLATE[b] == b
    assert XLATE[0x83] == 0x41 and XLATE[0x00] == 0xFF


# --- the mouse ------------------------------------------------------------------------
def test_mouse_init_sequence_as_psmouse() -> None:
    k = Kbc()
    assert k.aux(0xFF) == [0xFA, 0xAA, 0x00]
    assert k.aux(0xF2) == [0xFA, 0x00]
    # IntelliMouse knock: sample rates 200, 100, 80, then the ID is 3
    assert k.aux(0xF3, 200, 0xF3, 100, 0xF3, 80) == [0xFA] * 6
    assert k.aux(0xF2) == [0xFA, 0x03]
    assert k.aux(0xE8, 0x03) == [0xFA, 0xFA]
    assert k.aux(0xE7) == [0xFA]
    assert k.aux(0xE6) == [0xFA]
    assert k.aux(0xF3, 100) == [0xFA, 0xFA]
    assert k.aux(0xF4) == [0xFA]
    assert k.aux(0xE9) == [0xFA, 0x20, 0x03, 100]  # enabled, 1:1, res 3, 100/s
    assert k.aux(0xFF) == [0xFA, 0xAA, 0x00]
    assert k.aux(0xF2) == [0xFA, 0x00]  # a reset forgets the wheel


def test_mouse_bytes_carry_auxb_and_raise_irq12() -> None:
    k = Kbc()
    k.cmd(0xD4, 0xF2)
    got = k.read_all()
    assert [b for b, _ in got] == [0xFA, 0x00]
    assert all(s & AUXB for _, s in got)
    assert k.irq12.rises == 2 and k.irq1.rises == 0  # each byte a new edge


def test_mouse_packets_3_and_4_bytes() -> None:
    k = Kbc()
    k.aux(0xF4)
    m = k.dev.mouse
    assert m.move(5, -3, buttons=1)
    assert k.bytes() == [0x08 | 0x01 | 0x20, 5, 0xFD]
    assert m.move(-300, 400, buttons=6)
    assert k.bytes() == [0x08 | 0x06 | 0x10 | 0x40 | 0x80, 0x00, 0xFF]
    k.aux(0xF3, 200, 0xF3, 100, 0xF3, 80, 0xF4)
    assert m.move(1, 1, dz=-2)
    assert k.bytes() == [0x08, 1, 1, 0x0E]


def test_mouse_reporting_disabled_remote_mode_and_poll() -> None:
    k = Kbc()
    m = k.dev.mouse
    assert not m.move(1, 1)  # reporting is off after power-on
    assert k.aux(0xF0) == [0xFA]  # remote mode
    m.move(3, 4)
    m.move(1, -1, buttons=1)
    assert k.aux(0xEB) == [0xFA, 0x09, 4, 3]
    assert k.aux(0xE9)[1] & 0x40  # status shows remote mode


def test_mouse_wrap_mode_echoes() -> None:
    k = Kbc()
    assert k.aux(0xEE) == [0xFA]
    assert k.aux(0x12, 0xF4) == [0x12, 0xF4]
    assert k.aux(0xEC) == [0xFA]
    assert k.aux(0x12) == [0xFE]  # out of wrap mode: not a command


def test_mouse_scaling_2_to_1() -> None:
    assert [scale21(v) for v in (0, 1, 2, 3, 4, 5, 6, -4)] == [0, 1, 1, 3, 6, 9, 12, -6]
    k = Kbc()
    k.aux(0xE7, 0xF4)
    k.dev.mouse.move(4, 0)
    assert k.bytes() == [0x08, 6, 0]


def test_mouse_bad_resolution_and_resend() -> None:
    k = Kbc()
    assert k.aux(0xE8, 9) == [0xFA, 0xFE]
    assert k.aux(0xF2) == [0xFA, 0x00]
    assert k.aux(0xFE) == [0xFA, 0x00]  # the last packet again


def test_keyboard_and_mouse_interleave_and_both_arrive() -> None:
    k = Kbc()
    k.set_ctr(0x07)
    k.aux(0xF4)
    for _ in range(3):
        k.dev.keyboard.press("KEY_A")
        k.dev.mouse.move(1, 0)
    got = k.read_all()
    kbd = [b for b, s in got if not s & AUXB]
    aux = [b for b, s in got if s & AUXB]
    assert kbd == [0x1C] * 3 and aux == list(packet(1, 0, 0, 0, False)) * 3


# --- any sequence ---------------------------------------------------------------------
OPS = st.one_of(
    st.tuples(st.just("cmd"), st.integers(0, 255)),
    st.tuples(st.just("data"), st.integers(0, 255)),
    st.tuples(st.just("read"), st.sampled_from([0x60, 0x64])),
    st.tuples(st.just("key"), st.sampled_from(sorted(KEYS)[:20])),
    st.tuples(st.just("move"), st.integers(-600, 600)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(OPS, max_size=200))
def test_any_sequence_keeps_the_controller_sane(ops: list[tuple[str, object]]) -> None:
    k = Kbc()
    d = k.dev
    resets = 0
    for op, v in ops:
        assert isinstance(v, int | str)
        if op == "cmd":
            assert isinstance(v, int)
            k.cmd(v)
            resets += v >= 0xF0 and not v & 1
        elif op == "data":
            assert isinstance(v, int)
            k.data(v)
        elif op == "read":
            assert isinstance(v, int)
            assert 0 <= k.bus.read(v, 1) <= 0xFF
        elif op == "key":
            assert isinstance(v, str)
            k.dev.keyboard.press(v)
        else:
            assert isinstance(v, int)
            k.dev.mouse.move(v, -v, 1, 1)
        assert len(d.keyboard.queue) <= QUEUE_SIZE and len(d.mouse.queue) <= QUEUE_SIZE
        assert len(d.ctl) <= CTL_QUEUE_MAX
        # The lines are exactly what the status and command byte say.
        s, ctr = d.status, d.ctr
        assert k.irq1.level == bool(s & OBF and not s & AUXB and ctr & 1)
        assert k.irq12.level == bool(s & OBF and s & AUXB and ctr & 2)
    assert k.resets >= resets  # (an output-port write can reset too)
    d.pending_cmd = None  # (a controller command may still wait for its byte)
    k.set_ctr(0x07)  # both ports on: everything queued drains through the buffer
    k.read_all()
    assert not d.keyboard.queue and not d.mouse.queue and not d.ctl


def test_keyboard_in_set_3_sends_one_byte_codes() -> None:
    k = Kbc()
    k.set_ctr(0x05)
    k.data(0xF0)
    k.data(0x03)
    k.bytes()
    kb = k.dev.keyboard
    for name in ("KEY_A", "KEY_UP", "KEY_F1"):
        kb.press(name)
        kb.release(name)
    assert k.bytes() == [0x1C, 0xF0, 0x1C, 0x63, 0xF0, 0x63, 0x07, 0xF0, 0x07]


def test_set_3_codes_are_one_byte_and_distinct() -> None:
    codes = [k.set3 for k in KEYS.values()]
    assert len(set(codes)) == len(codes) and all(0 < c < 0xE0 for c in codes)
