"""16550A UART (National Semiconductor PC16550D datasheet; Linux serial_reg.h names).

Modelled: THR/RBR, IER, IIR with the datasheet's interrupt priorities, FCR (FIFO
enable and clears), LCR with DLAB and the divisor latch, MCR with loopback, LSR,
MSR with delta bits, SCR; a receive FIFO bounded at 16 bytes (overrun sets LSR.OE);
the interrupt output on an :class:`InterruptLine`, gated by MCR.OUT2 as on a PC.
Transmission is instant: THR is always empty, bytes go straight to the output sink.
Not modelled: baud timing, character timeout interrupts, break, the transmit FIFO
trigger levels.

Threat model: the guest controls every register write. State is a handful of
bytes and a bounded deque, so no guest sequence grows memory or raises; output
goes to a host sink that may be slow (the vCPU waits, as on real hardware).
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from pyvmm.irq.line import InterruptLine, NullLine
from pyvmm.uapi.serial import (
    UART_FCR_CLEAR_RCVR,
    UART_FCR_ENABLE_FIFO,
    UART_FIFO_SIZE,
    UART_IER,
    UART_IER_MSI,
    UART_IER_RDI,
    UART_IER_RLSI,
    UART_IER_THRI,
    UART_IIR,
    UART_IIR_FIFO_ENABLED,
    UART_IIR_MSI,
    UART_IIR_NO_INT,
    UART_IIR_RDI,
    UART_IIR_RLSI,
    UART_IIR_THRI,
    UART_LCR,
    UART_LCR_DLAB,
    UART_LSR,
    UART_LSR_DR,
    UART_LSR_OE,
    UART_LSR_TEMT,
    UART_LSR_THRE,
    UART_MCR,
    UART_MCR_DTR,
    UART_MCR_LOOP,
    UART_MCR_OUT1,
    UART_MCR_OUT2,
    UART_MCR_RTS,
    UART_MSR,
    UART_MSR_CTS,
    UART_MSR_DCD,
    UART_MSR_DCTS,
    UART_MSR_DDCD,
    UART_MSR_DDSR,
    UART_MSR_DSR,
    UART_MSR_RI,
    UART_MSR_TERI,
    UART_RX,
    UART_SCR,
)

REGISTER_COUNT = 8


class Serial:
    """The 16550A emulation core; bus adapter and host I/O are separate."""

    def __init__(
        self,
        output: Callable[[bytes], None] | None = None,
        irq: InterruptLine | None = None,
        on_rx_space: Callable[[], None] | None = None,
    ) -> None:
        self.output = output or (lambda b: None)
        self.irq: InterruptLine = irq or NullLine()
        self.on_rx_space = on_rx_space
        self._lock = threading.Lock()  # guest (vCPU) and host input (event loop) both enter
        self.reset()

    def reset(self) -> None:
        self.ier = 0
        self.lcr = 0x03
        self.mcr = UART_MCR_OUT2
        self.lsr = UART_LSR_THRE | UART_LSR_TEMT
        self.msr = UART_MSR_DCD | UART_MSR_DSR | UART_MSR_CTS
        self.scr = 0
        self.dll = 0x0C  # 9600 baud, the PC BIOS default
        self.dlm = 0
        self.fifo_enabled = False
        self.thr_interrupt_pending = True
        self.rx: deque[int] = deque()
        # The host end offered input that did not fit (a full FIFO, or loopback, when
        # the line is disconnected); it has paused and waits for on_rx_space. Whatever
        # frees room — an RBR read, FCR CLEAR_RCVR, leaving loopback — resumes it.
        self._starved = False
        self.tx_bytes = 0
        self.rx_dropped = 0

    # --- host side -------------------------------------------------------------------
    def rx_space(self) -> int:
        return UART_FIFO_SIZE - len(self.rx)

    def enqueue_input(self, data: bytes) -> int:
        """Feed received bytes; returns how many fit in the FIFO. In loopback mode
        the line is disconnected and nothing is taken."""
        with self._lock:
            n = 0 if self.mcr & UART_MCR_LOOP else min(len(data), self.rx_space())
            if n < len(data):
                self._starved = True
            self.rx.extend(data[:n])
            if n:
                self.lsr |= UART_LSR_DR
                self._update_irq()
            return n

    # --- guest side -----------------------------------------------------------------
    def read(self, base: int, offset: int, size: int) -> int:
        with self._lock:
            value = self._read(offset & 7)
        return value

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        with self._lock:
            self._write(offset & 7, value & 0xFF)

    def _dlab(self) -> bool:
        return bool(self.lcr & UART_LCR_DLAB)

    def _read(self, reg: int) -> int:
        if reg == UART_RX:
            if self._dlab():
                return self.dll
            value = self.rx.popleft() if self.rx else 0
            if not self.rx:
                self.lsr &= ~UART_LSR_DR
            self._update_irq()
            self._room_made()
            return value
        if reg == UART_IER:
            return self.dlm if self._dlab() else self.ier
        if reg == UART_IIR:
            iir = self._iir()
            if iir & 0x0F == UART_IIR_THRI:
                # Reading IIR with THRE as the source clears that interrupt (datasheet).
                self.thr_interrupt_pending = False
                self._update_irq()
            return iir | (UART_IIR_FIFO_ENABLED if self.fifo_enabled else 0)
        if reg == UART_LCR:
            return self.lcr
        if reg == UART_MCR:
            return self.mcr
        if reg == UART_LSR:
            value = self.lsr
            self.lsr &= ~UART_LSR_OE  # error bits clear on read
            self._update_irq()
            return value
        if reg == UART_MSR:
            value = self._msr()
            self.msr &= ~(UART_MSR_DCTS | UART_MSR_DDSR | UART_MSR_TERI | UART_MSR_DDCD)
            self._update_irq()
            return value
        return self.scr

    def _write(self, reg: int, value: int) -> None:
        if reg == UART_RX:
            if self._dlab():
                self.dll = value
                return
            self.tx_bytes += 1
            if self.mcr & UART_MCR_LOOP:
                if len(self.rx) < UART_FIFO_SIZE:
                    self.rx.append(value)
                    self.lsr |= UART_LSR_DR
                else:
                    self.lsr |= UART_LSR_OE
            else:
                self.output(bytes((value,)))
            self.thr_interrupt_pending = True  # transmitted at once: THR empty again
        elif reg == UART_IER:
            if self._dlab():
                self.dlm = value
                return
            if value & UART_IER_THRI and not self.ier & UART_IER_THRI:
                self.thr_interrupt_pending = True  # enabling THRI with THR empty fires
            self.ier = value & 0x0F
        elif reg == UART_IIR:  # FCR
            self.fifo_enabled = bool(value & UART_FCR_ENABLE_FIFO)
            if value & UART_FCR_CLEAR_RCVR:
                self.rx.clear()
                self.lsr &= ~UART_LSR_DR
                self._room_made()
        elif reg == UART_LCR:
            self.lcr = value
        elif reg == UART_MCR:
            old = self._msr()
            self.mcr = value & 0x1F
            new = self._msr()
            self._latch_msr_deltas(old, new)
            self._room_made()  # out of loopback: the line takes input again
        elif reg == UART_LSR:
            pass  # factory test register on some parts; read-only here
        elif reg == UART_MSR:
            pass
        elif reg == UART_SCR:
            self.scr = value
        self._update_irq()

    def _room_made(self) -> None:
        if (self._starved and self.rx_space() > 0 and not self.mcr & UART_MCR_LOOP
                and self.on_rx_space is not None):
            self._starved = False
            self.on_rx_space()

    def _msr(self) -> int:
        if self.mcr & UART_MCR_LOOP:
            # Loopback wires MCR outputs back to the modem inputs (datasheet 8.6).
            m = self.mcr
            lines = (
                (UART_MSR_CTS if m & UART_MCR_RTS else 0)
                | (UART_MSR_DSR if m & UART_MCR_DTR else 0)
                | (UART_MSR_RI if m & UART_MCR_OUT1 else 0)
                | (UART_MSR_DCD if m & UART_MCR_OUT2 else 0)
            )
            return lines | (self.msr & 0x0F)
        return self.msr

    def _latch_msr_deltas(self, old: int, new: int) -> None:
        changed = old ^ new
        if changed & UART_MSR_CTS:
            self.msr |= UART_MSR_DCTS
        if changed & UART_MSR_DSR:
            self.msr |= UART_MSR_DDSR
        if old & UART_MSR_RI and not new & UART_MSR_RI:
            self.msr |= UART_MSR_TERI
        if changed & UART_MSR_DCD:
            self.msr |= UART_MSR_DDCD

    def _iir(self) -> int:
        """Highest-priority pending source (datasheet table 4)."""
        if self.ier & UART_IER_RLSI and self.lsr & UART_LSR_OE:
            return UART_IIR_RLSI
        if self.ier & UART_IER_RDI and self.lsr & UART_LSR_DR:
            return UART_IIR_RDI
        if self.ier & UART_IER_THRI and self.thr_interrupt_pending:
            return UART_IIR_THRI
        if self.ier & UART_IER_MSI and self.msr & 0x0F:
            return UART_IIR_MSI
        return UART_IIR_NO_INT

    def _update_irq(self) -> None:
        # On a PC the UART's interrupt reaches the PIC only with OUT2 set; in loopback
        # the output is disconnected.
        pending = self._iir() != UART_IIR_NO_INT
        self.irq.set_level(pending and bool(self.mcr & UART_MCR_OUT2)
                           and not self.mcr & UART_MCR_LOOP)
