"""One parallel ATA channel: two device positions behind the Command Block (8 ports)
and the Control Block (the Alternate Status / Device Control port), one interrupt line,
and its bus-master engine (ATA8-APT).

Both devices see every register write; the DEV bit of the Device register says which
one answers reads and commands and drives INTRQ. INTRQ is the selected device's
pending interrupt gated by nIEN; reading Status (not Alternate Status) or writing the
Command register clears the pending interrupt. With no device on a channel the ports
float (reads all-ones), which is how a probing driver tells an empty channel; with
device 1 absent, device 0 answers for it: its registers as written, 0 for Status.
"""

from __future__ import annotations

from pyvmm.devices.emulated.ide.busmaster import BusMaster
from pyvmm.devices.emulated.ide.disk import AtaDisk, TaskFile
from pyvmm.irq.line import InterruptLine
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import ata as A


class IdeChannel:
    def __init__(self, index: int, line: InterruptLine, bm: BusMaster, errors: OnceLog) -> None:
        self.index, self.line, self.bm, self.errors = index, line, bm, errors
        self.pos: list[TaskFile] = [TaskFile(), TaskFile()]
        self.dev = 0  # the DEV bit last written
        self.control = 0  # Device Control (write-only on the wire)
        self.level = False
        bm.pending = self._dma_pending

    def attach(self, unit: int, disk: AtaDisk) -> None:
        disk.on_interrupt = self._update_line
        disk.on_dma = self.bm.kick
        self.pos[unit] = disk

    def disks(self) -> list[AtaDisk]:
        return [p for p in self.pos if isinstance(p, AtaDisk)]

    @property
    def selected(self) -> TaskFile:
        return self.pos[self.dev]

    def reset(self) -> None:
        """Power-on / function reset: both devices reset, nothing selected but 0."""
        self.control, self.dev = 0, 0
        for d in self.disks():
            d.reset_done()
            d.pending = False
        self.bm.reset()
        self._update_line()

    # --- the interrupt line ------------------------------------------------------------
    def _update_line(self) -> None:
        sel = self.selected
        level = (isinstance(sel, AtaDisk) and sel.pending
                 and not self.control & A.ATA_NIEN)
        if level and not self.level:
            self.bm.interrupt()
        if level != self.level:
            self.level = level
            self.line.set_level(level)

    def _dma_pending(self) -> AtaDisk | None:
        sel = self.selected
        if isinstance(sel, AtaDisk) and sel.dma is not None:
            return sel
        other = self.pos[self.dev ^ 1]
        return other if isinstance(other, AtaDisk) and other.dma is not None else None

    # --- Command Block -----------------------------------------------------------------
    def read_cmd(self, offset: int, size: int) -> int:
        if offset == A.ATA_REG_DATA and size in (2, 4):
            sel = self.selected
            if not isinstance(sel, AtaDisk):
                return (1 << (8 * size)) - 1
            v = sel.read_data()
            return v | sel.read_data() << 16 if size == 4 else v
        return sum(self._read8(offset + i) << (8 * i) for i in range(size))

    def _read8(self, reg: int) -> int:
        if reg == A.ATA_REG_DATA:
            self.errors.warn("ide-data-8bit", "ide: 8-bit access to the 16-bit Data "
                             "register; reads all-ones, writes ignored")
            return 0xFF
        if reg > A.ATA_REG_STATUS or not self.disks():
            return 0xFF  # beyond the block, or an empty channel: nothing drives the bus
        sel = self.selected
        if reg == A.ATA_REG_STATUS:
            if not isinstance(sel, AtaDisk):
                return 0
            sel.pending = False  # reading Status acknowledges the interrupt
            self._update_line()
            return sel.status
        if reg == A.ATA_REG_ERR:
            return sel.error if isinstance(sel, AtaDisk) else 0
        if reg == A.ATA_REG_DEVICE:
            return sel.regs[reg]
        return (sel.hob if self.control & A.ATA_HOB else sel.regs)[reg]

    def write_cmd(self, offset: int, size: int, value: int) -> None:
        if offset == A.ATA_REG_DATA and size in (2, 4):
            sel = self.selected
            if isinstance(sel, AtaDisk):
                sel.write_data(value & 0xFFFF)
                if size == 4:
                    sel.write_data(value >> 16)
            return
        for i in range(size):
            self._write8(offset + i, (value >> (8 * i)) & 0xFF)

    def _write8(self, reg: int, v: int) -> None:
        if reg == A.ATA_REG_DATA:
            self._read8(reg)  # the same complaint, logged once
            return
        if reg > A.ATA_REG_CMD:
            return
        self.control &= ~A.ATA_HOB  # any Command Block write clears HOB
        if reg == A.ATA_REG_CMD:
            self._command(v)
            return
        sel = self.selected
        if sel.status & (A.ATA_BUSY | A.ATA_DRQ):
            # The host shall not write the registers while BSY or DRQ: the device's
            # command is still in progress, so its inputs do not change (ignored).
            self.errors.warn("ide-reg-busy", "ide: Command Block register written while "
                             "BSY or DRQ; ignored")
            return
        for p in self.pos:
            p.latch(reg, v)
        if reg == A.ATA_REG_DEVICE:
            self.dev = 1 if v & A.ATA_DEV1 else 0
            self._update_line()

    def _command(self, op: int) -> None:
        sel = self.selected
        if op == A.ATA_CMD_EDD and self.disks() and not sel.status & (A.ATA_BUSY | A.ATA_DRQ):
            self._diagnose()
            return
        if not isinstance(sel, AtaDisk):
            return  # device 1 is absent: device 0 does not execute its commands
        sel.pending = False  # writing Command clears the pending interrupt
        self._update_line()
        sel.command(op)

    def _diagnose(self) -> None:
        """EXECUTE DEVICE DIAGNOSTIC goes to both devices whatever DEV says; each resets
        to its signature and diagnostic code, device 0 is selected and interrupts."""
        for d in self.disks():
            d.counts["commands"] += 1
            d.diagnose()
        self.dev = 0
        first = self.disks()[0]
        first.pending = True
        self._update_line()

    # --- Control Block -------------------------------------------------------------------
    def read_ctl(self, size: int) -> int:
        """Alternate Status: Status without acknowledging the interrupt."""
        if not self.disks():
            return (1 << (8 * size)) - 1
        sel = self.selected
        return sel.status if isinstance(sel, AtaDisk) else 0

    def write_ctl(self, size: int, value: int) -> None:
        v = value & 0xFF
        old, self.control = self.control, v
        if v & A.ATA_SRST and not old & A.ATA_SRST:
            for d in self.disks():
                d.reset_begin()
        elif old & A.ATA_SRST and not v & A.ATA_SRST:
            for d in self.disks():
                d.reset_done()  # a software reset interrupts nobody
                d.counts["resets"] += 1
            self.dev = 0
        self._update_line()
