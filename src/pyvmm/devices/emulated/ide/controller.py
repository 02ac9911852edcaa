"""The PIIX3 IDE function (Intel 82371SB, function 1: vendor 8086 device 7010, class
01 01 80) with its two channels in ISA compatibility mode: the legacy ports and IRQs
that a driver finds by probing, not by enumeration — primary 0x1F0-0x1F7 + 0x3F6 on
IRQ 14, secondary 0x170-0x177 + 0x376 on IRQ 15 — and bus-master DMA through BMIBA
(BAR4, 16 bytes of I/O: 8 per channel).

The legacy ports decode while PCI_COMMAND's I/O space enable and the channel's IDETIM
decode-enable bit (bit 15) are both set, as on the chip; with no firmware in front of
the guest, the VMM sets the two IDETIM bits (what a BIOS does at POST). Bus-master
transfers need PCI_COMMAND's bus-master enable: a transfer started without it waits
and runs when the guest sets it.

Disks attach by position (channel, unit); every ``--disk ...,if=ide`` entry of a
machine attaches to the one function (``HostContext.shared``; the registry entry is in
``spec.py``).

``native=True`` is the function in **native-PCI mode** (PCI IDE Controller
Specification 1.0; programming interface 0x85: both channels native, not
programmable, bus master): each channel's Command Block is an 8-byte I/O BAR (0, 2)
and its Control Block a 4-byte one (1, 3; the register at offset 2), and both
channels share the function's INTx pin A. The PIIX3 itself has no such mode; it is
what makes the function a PCI function only — exportable over vfio-user — and it is
what Linux's libata drives through the BARs and ``pdev->irq``. The legacy ports then
do not decode (they read all-ones).
"""

from __future__ import annotations

from pyvmm.devices.emulated.ide.busmaster import BusMaster
from pyvmm.devices.emulated.ide.channel import IdeChannel
from pyvmm.devices.emulated.ide.disk import AtaDisk
from pyvmm.devices.pci.config_space import BarChange, PCIConfigSpace
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.errors import ConfigError
from pyvmm.irq.line import InterruptLine
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import ata as A
from pyvmm.uapi import pci as P

MODEL = "PYVMM HARDDISK"
_LEGACY = ((A.ATA_PRIMARY_CMD, A.ATA_PRIMARY_CTL), (A.ATA_SECONDARY_CMD, A.ATA_SECONDARY_CTL))
_IDETIM = (A.PIIX_IDETIM_PRI, A.PIIX_IDETIM_SEC)


class _ChannelIntx:
    """One channel's INTRQ in native mode: the function's INTx is their OR."""

    def __init__(self, fn: PiixIde, index: int) -> None:
        self.fn, self.index = fn, index

    def set_level(self, level: bool) -> None:
        self.fn._intrq[self.index] = level
        self.fn.set_intx(any(self.fn._intrq))

    def pulse(self) -> None:  # the channels drive levels; kept for the protocol
        self.set_level(True)
        self.set_level(False)


class PiixIde(PCIDevice):
    name = "piix-ide"

    def __init__(self, mem: GuestMemory, lines: tuple[InterruptLine, InterruptLine] | None,
                 native: bool = False) -> None:
        super().__init__()
        self.mem = mem
        self.native = native
        self.errors = OnceLog()
        progif = (A.PCI_IDE_PROGIF_PRI_NATIVE | A.PCI_IDE_PROGIF_SEC_NATIVE) if native else 0
        c = self.config = PCIConfigSpace(A.PCI_VENDOR_ID_INTEL,
                                         A.PCI_DEVICE_ID_INTEL_82371SB_1,
                                         A.PIIX_IDE_CLASS | progif)
        c.add_bar(A.PIIX_BMIBA_BAR, A.PIIX_BM_SIZE, is_io=True)
        self._intrq = [False, False]
        if native:
            for ch in range(2):
                c.add_bar(2 * ch, A.PCI_IDE_CMD_BAR_SIZE, is_io=True)
                c.add_bar(2 * ch + 1, A.PCI_IDE_CTL_BAR_SIZE, is_io=True)
            c.data[P.PCI_INTERRUPT_PIN] = 1  # INTA#, both channels
            lines = (_ChannelIntx(self, 0), _ChannelIntx(self, 1))
        elif lines is None:
            raise ValueError("compatibility mode needs the two ISA lines")
        # Compatibility mode has no INTx pin: the channels use IRQ 14 and 15.
        for reg in _IDETIM:
            c.wmask[reg:reg + 2] = A.PIIX_IDETIM_WMASK.to_bytes(2, "little")
        c.wmask[A.PIIX_SIDETIM] = 0xFF
        self.channels = [IdeChannel(i, lines[i], BusMaster(mem, self._may_master, self.errors),
                                    self.errors) for i in range(2)]
        self._by_base = {base: (ch, block) for ch, bases in zip(self.channels, _LEGACY,
                                                                strict=True)
                         for block, base in enumerate(bases)}
        self.reset()

    def check_free(self, bus: int, unit: int) -> None:
        if self.channels[bus].pos[unit].present:
            raise ConfigError(f"ide: bus {bus} unit {unit} is given twice")

    def attach(self, bus: int, unit: int, disk: AtaDisk) -> None:
        self.check_free(bus, unit)
        self.channels[bus].attach(unit, disk)

    def reset(self) -> None:
        for reg in _IDETIM:  # what firmware does at POST: decode the legacy ports
            self.config.set16(reg, A.PIIX_IDETIM_IDE)
        for ch in self.channels:
            ch.reset()

    def metrics(self) -> dict[str, object]:
        return {"disks": {f"{ch.index}.{d.unit}": d.metrics()
                          for ch in self.channels for d in ch.disks()},
                "dma_transfers": sum(ch.bm.transfers for ch in self.channels),
                "bus_master_errors": sum(ch.bm.errors_seen for ch in self.channels),
                "errors": dict(self.errors.counts)}

    def _may_master(self) -> bool:
        return bool(self.config.command & P.PCI_COMMAND_MASTER)

    def config_write(self, offset: int, size: int, value: int) -> list[BarChange]:
        was = self._may_master()
        changes = super().config_write(offset, size, value)
        if self._may_master() and not was:
            for ch in self.channels:  # a transfer started without bus mastering goes now
                ch.bm.kick()
        return changes

    # --- BMIBA (BAR4); in native mode the channels' blocks (BAR0-3) --------------------
    def read_bar(self, index: int, offset: int, size: int) -> int:
        if index == A.PIIX_BMIBA_BAR:
            return self.channels[offset // 8].bm.read(offset % 8, min(size, 8 - offset % 8))
        if self.native and 0 <= index < 4:
            ch = self.channels[index // 2]
            if index % 2 == 0:
                return ch.read_cmd(offset, size)
            if offset == A.PCI_IDE_CTL_OFFSET:
                return ch.read_ctl(size)
            return (1 << (8 * size)) - 1  # the rest of the Control Block BAR: nothing there
        return super().read_bar(index, offset, size)

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        if index == A.PIIX_BMIBA_BAR:
            self.channels[offset // 8].bm.write(offset % 8, min(size, 8 - offset % 8), value)
        elif self.native and 0 <= index < 4:
            ch = self.channels[index // 2]
            if index % 2 == 0:
                ch.write_cmd(offset, size, value)
            elif offset == A.PCI_IDE_CTL_OFFSET:
                ch.write_ctl(size, value)

    # --- the legacy ports (a bus device at the fixed ranges of the spec) ----------------
    def _decodes(self, ch: IdeChannel) -> bool:
        return bool(not self.native and self.config.command & P.PCI_COMMAND_IO
                    and self.config.get16(_IDETIM[ch.index]) & A.PIIX_IDETIM_IDE)

    def read(self, base: int, offset: int, size: int) -> int:
        ch, block = self._by_base[base]
        if not self._decodes(ch):
            return (1 << (8 * size)) - 1
        return ch.read_cmd(offset, size) if block == 0 else ch.read_ctl(size)

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        ch, block = self._by_base[base]
        if not self._decodes(ch):
            return
        if block == 0:
            ch.write_cmd(offset, size, value)
        else:
            ch.write_ctl(size, value)
