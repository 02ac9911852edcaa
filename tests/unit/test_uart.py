"""16550A behaviour from the PC16550D datasheet, driven at COM1's real ports."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.bus import IoBus
from pyvmm.devices.legacy.uart import Serial
from pyvmm.testing import RecordingLine
from pyvmm.uapi import serial as R

COM1 = 0x3F8


def make() -> tuple[IoBus, Serial, list[bytes], RecordingLine]:
    out: list[bytes] = []
    line = RecordingLine()
    s = Serial(output=out.append, irq=line)
    bus = IoBus()
    bus.insert(s, COM1, 8, "serial0")
    return bus, s, out, line


def test_transmit_goes_to_the_sink_and_thr_stays_empty() -> None:
    bus, s, out, _ = make()
    for c in b"hi":
        assert bus.read(COM1 + R.UART_LSR, 1) & R.UART_LSR_THRE
        bus.write(COM1 + R.UART_TX, 1, c)
    assert b"".join(out) == b"hi"
    assert s.tx_bytes == 2


def test_dlab_switches_to_the_divisor_latch() -> None:
    bus, s, out, _ = make()
    bus.write(COM1 + R.UART_LCR, 1, R.UART_LCR_DLAB | 3)
    bus.write(COM1 + R.UART_DLL, 1, 0x01)
    bus.write(COM1 + R.UART_DLM, 1, 0x02)
    assert (s.dll, s.dlm) == (1, 2)
    assert bus.read(COM1 + R.UART_DLL, 1) == 1
    assert bus.read(COM1 + R.UART_DLM, 1) == 2
    assert out == []  # divisor writes are not data
    bus.write(COM1 + R.UART_LCR, 1, 3)
    bus.write(COM1 + R.UART_IER, 1, 0x05)
    assert s.ier == 0x05 and s.dlm == 2


def test_receive_fifo_is_bounded_and_overrun_is_reported() -> None:
    bus, s, _, _ = make()
    assert s.enqueue_input(b"x" * 40) == R.UART_FIFO_SIZE
    assert s.enqueue_input(b"y") == 0
    lsr = bus.read(COM1 + R.UART_LSR, 1)
    assert lsr & R.UART_LSR_DR
    got = bytes(bus.read(COM1 + R.UART_RX, 1) for _ in range(R.UART_FIFO_SIZE))
    assert got == b"x" * 16
    assert not bus.read(COM1 + R.UART_LSR, 1) & R.UART_LSR_DR
    assert bus.read(COM1 + R.UART_RX, 1) == 0  # empty FIFO reads 0


def test_rx_space_callback_when_fifo_drains() -> None:
    calls = []
    s = Serial(on_rx_space=lambda: calls.append(1))
    s.enqueue_input(b"z" * 16)
    s.read(0, R.UART_RX, 1)
    assert calls == []  # the host end was never refused: nothing to resume
    assert s.enqueue_input(b"zz") == 1  # full again, one byte refused
    s.read(0, R.UART_RX, 1)
    assert calls == [1]
    s.read(0, R.UART_RX, 1)
    assert calls == [1]  # once per refusal, not per byte


def test_fcr_clears_the_receive_fifo() -> None:
    bus, s, _, _ = make()
    s.enqueue_input(b"abc")
    bus.write(COM1 + R.UART_FCR, 1, R.UART_FCR_ENABLE_FIFO | R.UART_FCR_CLEAR_RCVR)
    assert not bus.read(COM1 + R.UART_LSR, 1) & R.UART_LSR_DR
    assert bus.read(COM1 + R.UART_IIR, 1) & 0xC0 == 0xC0  # FIFOs enabled


def test_rx_interrupt_raises_and_lowers_the_line() -> None:
    bus, s, _, line = make()
    bus.write(COM1 + R.UART_MCR, 1, R.UART_MCR_OUT2)
    bus.write(COM1 + R.UART_IER, 1, R.UART_IER_RDI)
    assert not line.level
    s.enqueue_input(b"k")
    assert line.level
    assert bus.read(COM1 + R.UART_IIR, 1) & 0x0F == R.UART_IIR_RDI
    bus.read(COM1 + R.UART_RX, 1)
    assert not line.level
    assert bus.read(COM1 + R.UART_IIR, 1) & 0x0F == R.UART_IIR_NO_INT


def test_out2_gates_the_interrupt_as_on_a_pc() -> None:
    bus, s, _, line = make()
    bus.write(COM1 + R.UART_MCR, 1, 0)
    bus.write(COM1 + R.UART_IER, 1, R.UART_IER_RDI)
    s.enqueue_input(b"k")
    assert not line.level
    bus.write(COM1 + R.UART_MCR, 1, R.UART_MCR_OUT2)
    assert line.level


def test_thri_fires_on_enable_and_clears_on_iir_read() -> None:
    bus, _, _, line = make()
    bus.write(COM1 + R.UART_MCR, 1, R.UART_MCR_OUT2)
    bus.write(COM1 + R.UART_IER, 1, R.UART_IER_THRI)
    assert line.level
    assert bus.read(COM1 + R.UART_IIR, 1) & 0x0F == R.UART_IIR_THRI
    assert not line.level
    bus.write(COM1 + R.UART_TX, 1, ord("a"))  # THR empties again at once
    assert line.level


def test_interrupt_priority_rx_over_thr() -> None:
    bus, s, _, _ = make()
    bus.write(COM1 + R.UART_IER, 1, R.UART_IER_THRI | R.UART_IER_RDI | R.UART_IER_RLSI)
    s.enqueue_input(b"a" * 17)
    assert bus.read(COM1 + R.UART_IIR, 1) & 0x0F == R.UART_IIR_RDI


def test_loopback_routes_tx_to_rx_and_modem_lines() -> None:
    bus, s, out, line = make()
    bus.write(COM1 + R.UART_MCR, 1, R.UART_MCR_LOOP | R.UART_MCR_RTS | R.UART_MCR_OUT2)
    bus.write(COM1 + R.UART_TX, 1, 0x5A)
    assert out == []
    assert bus.read(COM1 + R.UART_RX, 1) == 0x5A
    msr = bus.read(COM1 + R.UART_MSR, 1)
    assert msr & R.UART_MSR_CTS and msr & R.UART_MSR_DCD and not msr & R.UART_MSR_DSR
    assert s.enqueue_input(b"x") == 0  # the line is disconnected in loopback
    assert not line.level


def test_loopback_overrun_sets_oe_and_lsr_read_clears_it() -> None:
    bus, _, _, _ = make()
    bus.write(COM1 + R.UART_MCR, 1, R.UART_MCR_LOOP)
    for i in range(R.UART_FIFO_SIZE + 1):
        bus.write(COM1 + R.UART_TX, 1, i)
    assert bus.read(COM1 + R.UART_LSR, 1) & R.UART_LSR_OE
    assert not bus.read(COM1 + R.UART_LSR, 1) & R.UART_LSR_OE


def test_scratch_register() -> None:
    bus, _, _, _ = make()
    bus.write(COM1 + R.UART_SCR, 1, 0xA5)
    assert bus.read(COM1 + R.UART_SCR, 1) == 0xA5


@settings(max_examples=200)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(0, 0xFFFFFFFF)),
                max_size=200),
       st.binary(max_size=64))
def test_random_register_sequences_keep_state_in_range(
    ops: list[tuple[bool, int, int]], feed: bytes
) -> None:
    bus, s, _, _ = make()
    s.enqueue_input(feed)
    for is_write, off, value in ops:
        if is_write:
            bus.write(COM1 + off, 1, value)
        else:
            assert 0 <= bus.read(COM1 + off, 1) <= 0xFF
        assert len(s.rx) <= R.UART_FIFO_SIZE
        for reg in (s.ier, s.lcr, s.mcr, s.lsr, s.msr, s.scr, s.dll, s.dlm):
            assert 0 <= reg <= 0xFF
