"""pyvmm PCI test device, in the spirit of QEMU's ``edu`` and ``pci-testdev``.

Exercises everything PCI: BAR0 (4 KiB MMIO registers), BAR1 (MSI-X table + PBA,
4 KiB), BAR2 (32-byte I/O window mirroring the scratch register), BAR4 (64-bit
prefetchable 1 MiB of shared memory, mapped into the guest where the host can: see
``devices/assigned/shmem.py``), an MSI capability (1 vector), MSI-X
(2 vectors), INTx pin A, and a DMA engine that copies within guest memory.

BAR0 registers (32-bit unless noted):
  0x00 ID       RO  0x5050ED01
  0x04 SCRATCH  RW  reads back the bitwise NOT of what was written (liveness)
  0x20 STATUS   RO  interrupt status bits
  0x24 RAISE    WO  STATUS |= value, then interrupt
  0x28 ACK      WO  STATUS &= ~value; INTx drops when STATUS is 0
  0x40 DMA_SRC  RW  64-bit guest-physical source
  0x48 DMA_DST  RW  64-bit guest-physical destination
  0x50 DMA_LEN  RW  bytes (at most 1 MiB)
  0x58 DMA_CMD  WO  bit 0 start; bit 2 interrupt on completion
  0x5C DMA_SUM  RO  byte sum of the last transfer (proves the device read it)
  0x60 SHM_SUM  RO  byte sum of the first 4 KiB of BAR4, as the device sees it
  0x64 SHM_FILL WO  the device fills the first 4 KiB of BAR4 with this byte
  0x68 SHM_TRAPS RO BAR4 accesses that reached the device model (0: mapped, no exits)
Completion sets STATUS bit 8 (DMA_DONE) or bit 9 (DMA_ERROR: bus mastering off, a
range outside guest RAM, or a length over the limit). The interrupt goes by MSI-X
vector 0 when MSI-X is on, else MSI, else INTx — the order Linux drivers expect.

What a malicious guest can do: program DMA addresses anywhere; every transfer is
bounds-checked by GuestMemory and fails with DMA_ERROR, never touching host memory
outside guest RAM. Length is capped, so one command costs at most 1 MiB of copying.
"""

from __future__ import annotations

from pyvmm.devices.assigned.shmem import BarMapper, SharedMemoryBar
from pyvmm.devices.pci.config_space import PCIConfigSpace
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.devices.pci.msi import MsiCapability
from pyvmm.devices.pci.msix import MsixCapability
from pyvmm.errors import GuestMemoryError
from pyvmm.irq.msi import MsiSink
from pyvmm.memory import GuestMemory
from pyvmm.uapi import pci as P

TESTDEV_VENDOR = 0x1234
TESTDEV_DEVICE = 0x5050
TESTDEV_CLASS = 0x00FF00  # unclassified device
TESTDEV_ID = 0x5050ED01

REG_ID, REG_SCRATCH = 0x00, 0x04
REG_STATUS, REG_RAISE, REG_ACK = 0x20, 0x24, 0x28
REG_DMA_SRC, REG_DMA_DST, REG_DMA_LEN, REG_DMA_CMD, REG_DMA_SUM = 0x40, 0x48, 0x50, 0x58, 0x5C
REG_SHM_SUM, REG_SHM_FILL, REG_SHM_TRAPS = 0x60, 0x64, 0x68
SHM_SIZE, SHM_WINDOW = 1 << 20, 4096
DMA_CMD_START, DMA_CMD_IRQ = 0x1, 0x4
STATUS_DMA_DONE, STATUS_DMA_ERROR = 0x100, 0x200
DMA_MAX = 1 << 20

BAR_REGS, BAR_MSIX, BAR_IO, BAR_MEM64 = 0, 1, 2, 4


class PciTestDev(PCIDevice):
    name = "pci-testdev"

    def __init__(self, mem: GuestMemory, msi_sink: MsiSink,
                 bar_mapper: BarMapper | None = None) -> None:
        super().__init__()
        self.mem = mem
        self.shm = SharedMemoryBar(SHM_SIZE, "pyvmm-testdev-bar4")
        self.shm.mapper = bar_mapper
        c = self.config = PCIConfigSpace(TESTDEV_VENDOR, TESTDEV_DEVICE, TESTDEV_CLASS,
                                         revision=1, subsystem_vendor_id=TESTDEV_VENDOR,
                                         subsystem_id=1)
        c.data[P.PCI_INTERRUPT_PIN] = 1
        c.add_bar(BAR_REGS, 0x1000)
        c.add_bar(BAR_MSIX, 0x1000)
        c.add_bar(BAR_IO, 0x20, is_io=True)
        c.add_bar(BAR_MEM64, SHM_SIZE, is_64bit=True, prefetchable=True)
        self.msi = MsiCapability(c, msi_sink, vectors=1)
        self.msix = MsixCapability(c, msi_sink, vectors=2, bar=BAR_MSIX)
        self.reset()

    def reset(self) -> None:
        self.scratch = 0
        self.status = 0
        self.dma_src = self.dma_dst = self.dma_len = 0
        self.dma_sum = 0
        self.interrupts = {"intx": 0, "msi": 0, "msix": 0}
        self.set_intx(False)

    def close(self) -> None:
        self.shm.close()

    def bar_memory(self, index: int) -> tuple[int, int] | None:
        return (self.shm.fd, 0) if index == BAR_MEM64 else None

    # --- interrupts --------------------------------------------------------------------
    def _interrupt(self) -> None:
        if self.msix.enabled or self.msix.direct is not None:
            self.interrupts["msix"] += 1
            self.msix.trigger(0)
        elif self.msi.enabled or self.msi.direct is not None:
            self.interrupts["msi"] += 1
            self.msi.trigger(0)
        else:
            self.interrupts["intx"] += 1
            self.set_intx(self.status != 0)

    # --- BARs --------------------------------------------------------------------------
    def bar_moved(self, index: int, new: int | None) -> None:
        if index == BAR_MEM64:
            self.shm.moved(new)

    def read_bar(self, index: int, offset: int, size: int) -> int:
        if index == BAR_MEM64:
            return self.shm.read(offset, size)
        if index == BAR_MSIX:
            return self.msix.read(offset, size)
        if index == BAR_IO:
            return self.scratch & ((1 << (8 * size)) - 1)
        if index != BAR_REGS:
            return 0
        regs = {
            REG_ID: TESTDEV_ID, REG_SCRATCH: ~self.scratch & 0xFFFFFFFF,
            REG_STATUS: self.status, REG_DMA_SRC: self.dma_src, REG_DMA_SRC + 4: self.dma_src >> 32,
            REG_DMA_DST: self.dma_dst, REG_DMA_DST + 4: self.dma_dst >> 32,
            REG_DMA_LEN: self.dma_len, REG_DMA_SUM: self.dma_sum,
            REG_SHM_SUM: sum(self.shm.map[:SHM_WINDOW]) & 0xFFFFFFFF,
            REG_SHM_TRAPS: self.shm.trapped & 0xFFFFFFFF,
        }
        value = regs.get(offset & ~3, 0)
        if size == 8 and offset in (REG_DMA_SRC, REG_DMA_DST):
            return self.dma_src if offset == REG_DMA_SRC else self.dma_dst
        return (value >> (8 * (offset & 3))) & ((1 << (8 * size)) - 1)

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        if index == BAR_MEM64:
            self.shm.write(offset, size, value)
            return
        if index == BAR_MSIX:
            self.msix.write(offset, size, value)
            return
        if index == BAR_IO:
            self.scratch = value & 0xFFFFFFFF
            return
        if index != BAR_REGS:
            return
        if offset == REG_SCRATCH:
            self.scratch = value & 0xFFFFFFFF
        elif offset == REG_RAISE:
            self.status |= value & 0xFFFFFFFF
            self._interrupt()
        elif offset == REG_ACK:
            self.status &= ~value & 0xFFFFFFFF
            if not self.msix.enabled and not self.msi.enabled:
                self.set_intx(self.status != 0)
        elif offset in (REG_DMA_SRC, REG_DMA_SRC + 4, REG_DMA_DST, REG_DMA_DST + 4):
            base = REG_DMA_SRC if offset < REG_DMA_DST else REG_DMA_DST
            cur = self.dma_src if base == REG_DMA_SRC else self.dma_dst
            if size == 8:
                new = value
            elif offset == base:
                new = (cur & ~0xFFFFFFFF) | (value & 0xFFFFFFFF)
            else:
                new = (cur & 0xFFFFFFFF) | ((value & 0xFFFFFFFF) << 32)
            if base == REG_DMA_SRC:
                self.dma_src = new
            else:
                self.dma_dst = new
        elif offset == REG_SHM_FILL:
            self.shm.map[:SHM_WINDOW] = bytes((value & 0xFF,)) * SHM_WINDOW
        elif offset == REG_DMA_LEN:
            self.dma_len = value & 0xFFFFFFFF
        elif offset == REG_DMA_CMD and value & DMA_CMD_START:
            self._dma(bool(value & DMA_CMD_IRQ))

    def _dma(self, irq: bool) -> None:
        ok = bool(self.config.command & P.PCI_COMMAND_MASTER) and 0 < self.dma_len <= DMA_MAX
        if ok:
            try:
                data = self.mem.read(self.dma_src, self.dma_len)
                self.mem.write(self.dma_dst, data)
                self.dma_sum = sum(data) & 0xFFFFFFFF
            except GuestMemoryError:
                ok = False
        self.status |= STATUS_DMA_DONE if ok else STATUS_DMA_ERROR
        if irq:
            self._interrupt()
