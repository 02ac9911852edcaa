"""A register-decoded access trace per device, on only when asked for.

Enabling a device's trace puts a ``Tracer`` in front of the device on each of its bus
ranges (``BusRange.device`` is swapped; the bus looks it up per access, so the swap
takes effect at the next exit and is undone the same way). While a trace is off the
ranges hold the device itself: the hot path pays nothing. While it is on, every access
is recorded in a ring buffer — time, vCPU, bus, offset, size, value, the register's
name from its spec and a decoded meaning:

    serial0 LCR write 0x03 (8N1, DLAB=0)
    pci-config CONFIG_ADDRESS write 0x80001004 (00:02.0 COMMAND)
    pci-config CONFIG_DATA read 0x1af4 (00:02.0 VENDOR_ID)

Decoders exist for the 16550A UART (``<linux/serial_reg.h>`` names) and the PCI
configuration mechanisms (0xCF8/0xCFC and ECAM, with the config header's register
names from ``uapi/pci.py``); any other device is traced by offset (``+0x10``).
A BAR the guest moves gets a new bus range, which is not traced until the trace is
enabled again.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pyvmm.api import models as M
from pyvmm.devices.legacy.uart import Serial
from pyvmm.devices.pci.root import ConfigAddressPort, Ecam
from pyvmm.irqchip.split import Locked
from pyvmm.uapi import pci as P
from pyvmm.uapi import serial as S

if TYPE_CHECKING:
    from pyvmm.bus import BusDevice, BusRange

DEFAULT_DEPTH = 256
MAX_DEPTH = 4096

# (register, meaning) for one access, decided before the access happens (the UART's
# DLAB, the PCI address latch are read as the access finds them).
Decoder = Callable[[str, int, int, int], tuple[str, str]]


def _bits(value: int, names: tuple[tuple[int, str], ...]) -> str:
    on = [n for bit, n in names if value & bit]
    return ", ".join(on) if on else "none"


# --- 16550A ----------------------------------------------------------------------------------
_IER = ((S.UART_IER_RDI, "RDI"), (S.UART_IER_THRI, "THRI"), (S.UART_IER_RLSI, "RLSI"),
        (S.UART_IER_MSI, "MSI"))
_MCR = ((S.UART_MCR_DTR, "DTR"), (S.UART_MCR_RTS, "RTS"), (S.UART_MCR_OUT1, "OUT1"),
        (S.UART_MCR_OUT2, "OUT2"), (S.UART_MCR_LOOP, "LOOP"))
_LSR = ((S.UART_LSR_DR, "DR"), (S.UART_LSR_OE, "OE"), (S.UART_LSR_THRE, "THRE"),
        (S.UART_LSR_TEMT, "TEMT"))
_MSR = ((S.UART_MSR_DCTS, "DCTS"), (S.UART_MSR_DDSR, "DDSR"), (S.UART_MSR_TERI, "TERI"),
        (S.UART_MSR_DDCD, "DDCD"), (S.UART_MSR_CTS, "CTS"), (S.UART_MSR_DSR, "DSR"),
        (S.UART_MSR_RI, "RI"), (S.UART_MSR_DCD, "DCD"))
_FCR = ((S.UART_FCR_ENABLE_FIFO, "ENABLE_FIFO"), (S.UART_FCR_CLEAR_RCVR, "CLEAR_RCVR"),
        (S.UART_FCR_CLEAR_XMIT, "CLEAR_XMIT"))
_IIR = {S.UART_IIR_NO_INT: "no interrupt", S.UART_IIR_MSI: "modem status",
        S.UART_IIR_THRI: "THR empty", S.UART_IIR_RDI: "data ready",
        S.UART_IIR_RLSI: "line status"}


def lcr_meaning(v: int) -> str:
    word = 5 + (v & 3)
    parity = "N" if not v & 0x08 else ("E" if v & 0x10 else "O")
    if v & 0x08 and v & 0x20:
        parity = "1" if not v & 0x10 else "0"  # stick parity: mark or space
    stop = 2 if v & 0x04 else 1
    brk = ", break" if v & 0x40 else ""
    return f"{word}{parity}{stop}, DLAB={int(bool(v & S.UART_LCR_DLAB))}{brk}"


def uart_decoder(uart: Serial) -> Decoder:
    def decode(access: str, offset: int, size: int, value: int) -> tuple[str, str]:
        dlab = bool(uart.lcr & S.UART_LCR_DLAB)
        w = access == "write"
        if offset == 0:
            if dlab:
                return "DLL", "divisor latch low"
            ch = chr(value) if 0x20 <= value < 0x7F else None
            return ("THR" if w else "RBR"), (repr(ch) if ch else f"byte {value:#04x}")
        if offset == 1:
            return ("DLM", "divisor latch high") if dlab else ("IER", _bits(value, _IER))
        if offset == 2:
            if w:
                trig = (1, 4, 8, 14)[value >> 6]
                return "FCR", f"{_bits(value, _FCR)}; trigger {trig}"
            fifo = ", FIFOs on" if value & S.UART_IIR_FIFO_ENABLED == 0xC0 else ""
            return "IIR", _IIR.get(value & 0x0F, f"id {value & 0x0F:#x}") + fifo
        if offset == 3:
            return "LCR", lcr_meaning(value)
        if offset == 4:
            return "MCR", _bits(value, _MCR)
        if offset == 5:
            return "LSR", _bits(value, _LSR)
        if offset == 6:
            return "MSR", _bits(value, _MSR)
        return "SCR", "scratch"
    return decode


# --- PCI configuration -----------------------------------------------------------------------
_CFG_NAMES: dict[int, str] = {}
for _name in ("VENDOR_ID", "DEVICE_ID", "COMMAND", "STATUS", "REVISION_ID", "CLASS_PROG",
              "CLASS_DEVICE", "CACHE_LINE_SIZE", "LATENCY_TIMER", "HEADER_TYPE",
              "SUBSYSTEM_VENDOR_ID", "SUBSYSTEM_ID", "ROM_ADDRESS", "CAPABILITY_LIST",
              "INTERRUPT_LINE", "INTERRUPT_PIN"):
    _CFG_NAMES[getattr(P, "PCI_" + _name)] = _name
for _i in range(P.PCI_STD_NUM_BARS):
    _CFG_NAMES[P.PCI_BASE_ADDRESS_0 + 4 * _i] = f"BAR{_i}"
_COMMAND = ((P.PCI_COMMAND_IO, "IO"), (P.PCI_COMMAND_MEMORY, "MEMORY"),
            (P.PCI_COMMAND_MASTER, "MASTER"), (P.PCI_COMMAND_SERR, "SERR"),
            (P.PCI_COMMAND_INTX_DISABLE, "INTX_DISABLE"))


def cfg_register(reg: int) -> str:
    name = _CFG_NAMES.get(reg)
    if name is not None:
        return name
    base = max((o for o in _CFG_NAMES if o <= reg and reg < P.PCI_STD_HEADER_SIZEOF),
               default=None)
    if base is not None and reg < P.PCI_STD_HEADER_SIZEOF:
        return f"{_CFG_NAMES[base]}+{reg - base}"
    return f"config {reg:#x}"  # capabilities and device-specific space


def _target(bus: int, slot: int, fn: int, reg: int, access: str, value: int) -> str:
    where = f"{bus:02x}:{slot:02x}.{fn} {cfg_register(reg)}"
    if reg == P.PCI_COMMAND and access == "write":
        where += f" = {_bits(value, _COMMAND)}"
    return where


def cf8_decoder(port: ConfigAddressPort) -> Decoder:
    def decode(access: str, offset: int, size: int, value: int) -> tuple[str, str]:
        if offset < 4:
            a = value if access == "write" else port.address
            if size != 4:
                return "CONFIG_ADDRESS", f"{size}-byte access: not a config cycle"
            enabled = "" if a & P.PCI_CONFIG_ADDRESS_ENABLE else ", disabled"
            return "CONFIG_ADDRESS", _target((a >> 16) & 0xFF, (a >> 11) & 0x1F,
                                             (a >> 8) & 7, a & 0xFC, "read", 0) + enabled
        a = port.address
        if not a & P.PCI_CONFIG_ADDRESS_ENABLE:
            return "CONFIG_DATA", "CONFIG_ADDRESS not enabled: no config cycle"
        return "CONFIG_DATA", _target((a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 7,
                                      (a & 0xFC) + offset - 4, access, value)
    return decode


def ecam_decoder(_: Ecam) -> Decoder:
    def decode(access: str, offset: int, size: int, value: int) -> tuple[str, str]:
        return "ECAM", _target(offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7,
                               offset & 0xFFF, access, value)
    return decode


def generic_decoder(access: str, offset: int, size: int, value: int) -> tuple[str, str]:
    return f"+{offset:#x}", ""


def decoder_for(device: object) -> Decoder:
    while isinstance(device, Locked):
        device = device.device
    if isinstance(device, Serial):
        return uart_decoder(device)
    if isinstance(device, ConfigAddressPort):
        return cf8_decoder(device)
    if isinstance(device, Ecam):
        return ecam_decoder(device)
    return generic_decoder


# --- the tracer ----------------------------------------------------------------------------
class Tracer:
    """A bus device in front of the real one: records, then passes the access on."""

    def __init__(self, inner: BusDevice, bus: str, range_name: str, decode: Decoder,
                 ring: collections.deque[M.TraceEntry], t0: float,
                 vcpu_thread: Callable[[], int | None]) -> None:
        self.inner, self.bus, self.range_name = inner, bus, range_name
        self.decode, self.ring, self.t0 = decode, ring, t0
        self.vcpu_thread = vcpu_thread

    def _record(self, access: str, offset: int, size: int, value: int,
                reg: str, meaning: str) -> None:
        vcpu = 0 if threading.get_ident() == self.vcpu_thread() else None
        self.ring.append(M.TraceEntry(round(time.monotonic() - self.t0, 6), vcpu, self.bus,
                                      self.range_name, offset, size, access, reg, value,
                                      meaning))

    def read(self, base: int, offset: int, size: int) -> int:
        v = self.inner.read(base, offset, size)
        try:
            reg, meaning = self.decode("read", offset, size, v)
        except Exception as e:  # a decoder bug must not break the guest's access
            reg, meaning = f"+{offset:#x}", f"(decoder failed: {type(e).__name__})"
        self._record("read", offset, size, v, reg, meaning)
        return v

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        try:
            reg, meaning = self.decode("write", offset, size, value)
        except Exception as e:
            reg, meaning = f"+{offset:#x}", f"(decoder failed: {type(e).__name__})"
        self._record("write", offset, size, value, reg, meaning)
        self.inner.write(base, offset, size, value)


class DeviceTrace:
    """One device's trace: its ring and the tracers on its ranges while enabled."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.depth = DEFAULT_DEPTH
        self.ring: collections.deque[M.TraceEntry] = collections.deque(maxlen=self.depth)
        self.installed: list[tuple[BusRange, Tracer]] = []

    @property
    def enabled(self) -> bool:
        return bool(self.installed)

    def enable(self, ranges: list[tuple[str, BusRange]], depth: int, t0: float,
               vcpu_thread: Callable[[], int | None]) -> None:
        self.disable()
        if depth != self.depth:
            self.depth = depth
            self.ring = collections.deque(self.ring, maxlen=depth)
        for bus, r in ranges:
            t = Tracer(r.device, bus, r.name, decoder_for(r.device), self.ring, t0,
                       vcpu_thread)
            r.device = t  # the next access through this range is traced
            self.installed.append((r, t))

    def disable(self) -> None:
        for r, t in self.installed:
            if r.device is t:
                r.device = t.inner
        self.installed.clear()

    def snapshot(self) -> M.Trace:
        return M.Trace(device=self.device, enabled=self.enabled, depth=self.depth,
                       entries=list(self.ring))

    def lines(self) -> list[str]:
        return [format_entry(self.device, e) for e in list(self.ring)]


def format_entry(device: str, e: M.TraceEntry) -> str:
    meaning = f" ({e.meaning})" if e.meaning else ""
    return f"{device} {e.register} {e.access} {e.value:#0{2 + 2 * e.size}x}{meaning}"


def parse_request(body: dict[str, Any]) -> tuple[bool, int]:
    """``{"enabled": bool, "depth": int}`` (depth optional) or ValueError."""
    unknown = set(body) - {"enabled", "depth"}
    if unknown:
        raise ValueError(f"unknown key {sorted(unknown)[0]!r} (enabled, depth)")
    enabled = body.get("enabled")
    if not isinstance(enabled, bool):
        raise ValueError("enabled must be true or false")
    depth = body.get("depth", DEFAULT_DEPTH)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth <= MAX_DEPTH:
        raise ValueError(f"depth must be a whole number from 1 to {MAX_DEPTH}")
    return enabled, depth
