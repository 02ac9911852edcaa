"""The PCI root: functions by (bus, device, function), two config-access front ends
(ports 0xCF8/0xCFC, and the ECAM MMIO window), BAR moves applied to the buses.

A guest may program a BAR anywhere; the root maps it only if it lies wholly inside
the matching window (PCI memory hole or PCI I/O range) and overlaps nothing already
on that bus. Otherwise the BAR stays unmapped, the attempt is counted and logged
once, and the VM goes on — as on hardware, where such a BAR simply decodes nothing
useful.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from pyvmm.bus import Bus, BusRange
from pyvmm.devices.pci.config_space import BarChange
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.errors import BusError
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import pci as P

# INTx pins A-D of slot n go to GSI PCI_INTX_GSIS[(n + pin) % 4] (the usual swizzle).
PCI_INTX_GSIS = (16, 17, 18, 19)


@dataclass(frozen=True)
class Window:
    base: int
    size: int

    def holds(self, addr: int, size: int) -> bool:
        return self.base <= addr and addr + size <= self.base + self.size


class BarWindow:
    """Bus adapter: routes one BAR's accesses to the device by BAR index."""

    def __init__(self, device: PCIDevice, index: int) -> None:
        self.device, self.index = device, index

    def read(self, base: int, offset: int, size: int) -> int:
        return self.device.read_bar(self.index, offset, size)

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        self.device.write_bar(self.index, offset, size, value)


class PCIRoot:
    def __init__(self, pio: Bus, mmio: Bus, mem_window: Window, io_window: Window) -> None:
        self.pio, self.mmio = pio, mmio
        self.mem_window, self.io_window = mem_window, io_window
        self.devices: dict[tuple[int, int, int], PCIDevice] = {}
        self.errors = OnceLog()
        self.bad_config_accesses = 0
        self.rejected_bars = 0
        self._parked: dict[str, BusRange] = {}  # ranges of BARs not decoded right now

    def add(self, dev: PCIDevice, slot: int, function: int = 0) -> None:
        key = (0, slot, function)
        if key in self.devices or not 0 <= slot < 32 or not 0 <= function < 8:
            raise BusError(f"PCI 00:{slot:02x}.{function} is taken or invalid")
        self.devices[key] = dev
        pin = dev.config.data[P.PCI_INTERRUPT_PIN]
        if pin:
            dev.config.data[P.PCI_INTERRUPT_LINE] = self.intx_gsi(slot, pin)

    @staticmethod
    def intx_gsi(slot: int, pin: int) -> int:
        return PCI_INTX_GSIS[(slot + pin - 1) % 4]

    def functions(self) -> Iterator[tuple[tuple[int, int, int], PCIDevice]]:
        return iter(sorted(self.devices.items()))

    def assign_bars(self) -> None:
        """Firmware's job: place every BAR in its window and enable decoding."""
        mem_next, io_next = self.mem_window.base, self.io_window.base
        for _, dev in self.functions():
            cmd = 0
            for bar in dev.config.bars:
                if bar is None:
                    continue
                if bar.is_io:
                    io_next = (io_next + bar.size - 1) & ~(bar.size - 1)
                    dev.config.set_bar_address(bar.index, io_next)
                    io_next += bar.size
                    cmd |= P.PCI_COMMAND_IO
                else:
                    mem_next = (mem_next + bar.size - 1) & ~(bar.size - 1)
                    dev.config.set_bar_address(bar.index, mem_next)
                    mem_next += bar.size
                    cmd |= P.PCI_COMMAND_MEMORY
            if cmd:
                self.apply(dev, dev.config_write(P.PCI_COMMAND, 2, dev.config.command | cmd))

    # --- config access -------------------------------------------------------------
    def config_read(self, bus: int, slot: int, fn: int, offset: int, size: int) -> int:
        dev = self.devices.get((bus, slot, fn))
        if dev is None:
            return (1 << (8 * size)) - 1  # no device: master abort
        return dev.config_read(offset, size)

    def config_write(self, bus: int, slot: int, fn: int, offset: int, size: int,
                     value: int) -> None:
        dev = self.devices.get((bus, slot, fn))
        if dev is None:
            return
        if offset >= dev.config.size:
            self.bad_config_accesses += 1
            self.errors.warn("cfg-beyond", f"config write beyond {dev.config.size} bytes "
                             f"at {bus:02x}:{slot:02x}.{fn} offset {offset:#x}")
            return
        self.apply(dev, dev.config_write(offset, size, value))

    # --- BAR moves ---------------------------------------------------------------------
    def apply(self, dev: PCIDevice, changes: list[BarChange]) -> None:
        for ch in changes:
            bus = self.pio if ch.is_io else self.mmio
            name = f"{dev.name}.bar{ch.index}"
            if ch.old is not None:
                r = bus.find(ch.old)
                if r is not None and r.name == name:
                    self._parked[name] = bus.remove(ch.old)  # its counters live on
            if ch.new is None:
                dev.bar_moved(ch.index, None)
                continue
            window = self.io_window if ch.is_io else self.mem_window
            if not window.holds(ch.new, ch.size):
                self._reject(name, ch, "outside the PCI window")
                dev.bar_moved(ch.index, None)
                continue
            try:
                rng = bus.insert(BarWindow(dev, ch.index), ch.new, ch.size, name)
            except BusError:
                self._reject(name, ch, "overlapping another device")
                dev.bar_moved(ch.index, None)
                continue
            parked = self._parked.pop(name, None)
            if parked is not None:  # a moved BAR keeps its accounting (offsets are BAR-relative)
                rng.reads, rng.writes = parked.reads, parked.writes
                rng.counts.update(parked.counts)
            dev.bar_moved(ch.index, ch.new)

    def _reject(self, name: str, ch: BarChange, why: str) -> None:
        self.rejected_bars += 1
        self.errors.warn(f"bar:{why}", f"guest put {name} at {ch.new:#x}+{ch.size:#x}, {why}; "
                         "left unmapped")


class ConfigAddressPort:
    """Configuration mechanism #1: CONFIG_ADDRESS at 0xCF8, CONFIG_DATA at 0xCFC-0xCFF.
    Insert at 0xCF8 with size 8."""

    def __init__(self, root: PCIRoot) -> None:
        self.root = root
        self.address = 0

    def _target(self, offset: int) -> tuple[int, int, int, int] | None:
        a = self.address
        if not a & P.PCI_CONFIG_ADDRESS_ENABLE:
            return None
        return (a >> 16) & 0xFF, (a >> 11) & 0x1F, (a >> 8) & 0x7, (a & 0xFC) + (offset - 4)

    def read(self, base: int, offset: int, size: int) -> int:
        if offset < 4:
            if offset == 0 and size == 4:
                return self.address
            return (1 << (8 * size)) - 1
        t = self._target(offset)
        if t is None:
            return (1 << (8 * size)) - 1
        return self.root.config_read(*t, size)

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        if offset < 4:
            if offset == 0 and size == 4:  # only dword writes latch (byte 0xCF9 is not ours)
                self.address = value & 0x80FFFFFC
            return
        t = self._target(offset)
        if t is not None:
            self.root.config_write(*t, size, value)


class Ecam:
    """PCI Express enhanced configuration access: bus << 20 | dev << 15 | fn << 12 | reg."""

    def __init__(self, root: PCIRoot, buses: int = 1) -> None:
        self.root = root
        self.size = buses << 20

    def read(self, base: int, offset: int, size: int) -> int:
        bus, slot, fn, reg = offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, offset & 0xFFF
        if size == 8:  # split a qword into two dword config reads
            lo = self.root.config_read(bus, slot, fn, reg, 4)
            return lo | (self.root.config_read(bus, slot, fn, reg + 4, 4) << 32)
        return self.root.config_read(bus, slot, fn, reg, size)

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        bus, slot, fn, reg = offset >> 20, (offset >> 15) & 0x1F, (offset >> 12) & 7, offset & 0xFFF
        if size == 8:
            self.root.config_write(bus, slot, fn, reg, 4, value & 0xFFFFFFFF)
            self.root.config_write(bus, slot, fn, reg + 4, 4, value >> 32)
            return
        self.root.config_write(bus, slot, fn, reg, size, value)
