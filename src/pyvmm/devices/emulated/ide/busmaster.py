"""Bus-master IDE DMA of one channel (82371SB/AB datasheet, "Bus Master IDE Function";
the SFF-8038i register model): the command register (start/stop, direction), the
status register (active, error, interrupt, the drives' DMA-capable bits) and the
descriptor table pointer, and the walk of the Physical Region Descriptor table.

A PRD is 8 bytes: the memory address (32 bits, bit 0 zero), a byte count (16 bits, bit 0
zero, 0 meaning 64 KiB) and EOT in bit 15 of the last word. The table is read where the
start bit latched it; a transfer takes as many bytes as its sector count asks, and the
table is left where the transfer ended (a next command on a still-active engine goes
on from there, as hardware does).

What the guest sees at the end, per the datasheet's table of IDEINTS/BMIDEA:
- the PRDs cover the transfer exactly (EOT consumed): active 0, interrupt 1;
- the PRDs are larger (or had no EOT yet): active 1, interrupt 1 (the driver stops it);
- the table ended before the transfer was covered (EOT too early, or no EOT within
  8192 entries — 64 KiB of table, as much as may sit below a 64 KiB boundary): active
  0, interrupt 0, nothing moved, and the device goes on waiting for its data (DRQ)
  until the driver resets it;
- a descriptor or a buffer outside RAM (a master abort on a real bus): active 0, ERR 1,
  and the device ends the command with ABRT and an interrupt (interrupt 1).
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.devices.emulated.ide.disk import AtaDisk
from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import ata as A

CMD_WMASK = A.BMICX_SSBM | A.BMICX_RWCON
STATUS_RW = A.BMISX_DMA0CAP | A.BMISX_DMA1CAP
STATUS_W1C = A.BMISX_IDEDMA_ERR | A.BMISX_IDEINTS


class PrdCursor:
    """Where the walk of one PRD table stands."""

    def __init__(self, mem: GuestMemory, table: int) -> None:
        self.mem, self.table = mem, table
        self.entries = 0  # read so far (bounded by PRD_TABLE_MAX_ENTRIES)
        self.addr = self.left = 0  # the current entry's unused part
        self.eot = False

    def exhausted(self) -> bool:
        """The entry with EOT has been used up: the engine goes inactive."""
        return self.eot and self.left == 0

    def take(self, n: int) -> list[tuple[int, int]] | None:
        """(address, length) pieces covering the next ``n`` bytes, adjacent ones merged;
        None if the table ends first. A descriptor outside RAM raises GuestMemoryError."""
        out: list[tuple[int, int]] = []
        while n:
            if not self.left:
                if self.eot or self.entries >= A.PRD_TABLE_MAX_ENTRIES:
                    return None
                raw = self.mem.read(self.table + 8 * self.entries, 8)
                self.entries += 1
                count = int.from_bytes(raw[4:6], "little") & 0xFFFE
                self.addr = int.from_bytes(raw[0:4], "little") & ~1
                self.left = count or A.PRD_MAX_BYTES
                self.eot = bool(int.from_bytes(raw[6:8], "little") & A.PRD_EOT)
            k = min(n, self.left)
            if out and out[-1][0] + out[-1][1] == self.addr:
                out[-1] = (out[-1][0], out[-1][1] + k)
            else:
                out.append((self.addr, k))
            self.addr += k
            self.left -= k
            n -= k
        return out


class BusMaster:
    """The bus-master registers of one channel (8 bytes of BMIBA)."""

    def __init__(self, mem: GuestMemory, may_master: Callable[[], bool],
                 errors: OnceLog) -> None:
        self.mem = mem
        self.may_master = may_master  # PCI_COMMAND_MASTER of the function
        self.errors = errors
        self.cmd = 0
        self.status = 0
        self.prd = 0
        self.cursor: PrdCursor | None = None
        self.pending: Callable[[], AtaDisk | None] = lambda: None  # set by the channel
        self.transfers = self.errors_seen = 0

    def reset(self) -> None:
        self.cmd = self.status = self.prd = 0
        self.cursor = None

    # --- registers, a byte at a time (wider accesses are split, as on the PCI bus) --------
    def read(self, offset: int, size: int) -> int:
        return sum(self._read8(offset + i) << (8 * i) for i in range(size))

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write8(offset + i, (value >> (8 * i)) & 0xFF)

    def _read8(self, off: int) -> int:
        if off == A.BMICX:
            return self.cmd
        if off == A.BMISX:
            return self.status
        if A.BMIDTPX <= off < A.BMIDTPX + 4:
            return (self.prd >> (8 * (off - A.BMIDTPX))) & 0xFF
        return 0  # reserved

    def _write8(self, off: int, v: int) -> None:
        if off == A.BMICX:
            self._write_cmd(v & CMD_WMASK)
        elif off == A.BMISX:
            self.status = (v & STATUS_RW) | (self.status & ~STATUS_RW & ~(v & STATUS_W1C))
        elif A.BMIDTPX <= off < A.BMIDTPX + 4:
            shift = 8 * (off - A.BMIDTPX)
            self.prd = ((self.prd & ~(0xFF << shift)) | v << shift) & 0xFFFFFFFC

    def _write_cmd(self, v: int) -> None:
        was = self.cmd & A.BMICX_SSBM
        self.cmd = v
        if v & A.BMICX_SSBM and not was:
            self.cursor = PrdCursor(self.mem, self.prd)  # the table is latched at start
            self.status |= A.BMISX_BMIDEA
            if self.pending() is None:
                self.errors.warn("ide-bm-idle", "ide: bus master started with no DMA "
                                 "command pending; it waits for one")
            self.kick()
        elif was and not v & A.BMICX_SSBM:
            # Stop: a transfer still in progress is abandoned (the device keeps waiting).
            self.status &= ~A.BMISX_BMIDEA
            self.cursor = None

    def interrupt(self) -> None:
        """The channel's INTRQ was asserted."""
        self.status |= A.BMISX_IDEINTS

    # --- the transfer ---------------------------------------------------------------------
    def kick(self) -> None:
        """Run the pending DMA command if the engine is started and may master the bus
        (a driver may start it before or after the command; PCI bus mastering may be
        switched on last: each of those calls this)."""
        disk = self.pending()
        cur = self.cursor
        if disk is None or cur is None or not self.status & A.BMISX_BMIDEA:
            return
        req = disk.dma
        assert req is not None
        if not self.may_master():
            self.errors.warn("ide-bm-off", "ide: bus master started while PCI bus mastering "
                             "is disabled; the transfer waits")
            return
        if bool(self.cmd & A.BMICX_RWCON) == req.write:
            self.errors.warn("ide-bm-dir", "ide: bus-master direction disagrees with the "
                             "DMA command; the command's direction is used")
        try:
            pieces = cur.take(req.sectors * A.ATA_SECT_SIZE)
            views = None if pieces is None else [self.mem.view(a, n) for a, n in pieces]
        except GuestMemoryError as e:
            self.errors_seen += 1
            self.errors.warn("ide-bm-memory", f"ide: bus-master DMA outside RAM ({e}); "
                             "status ERR")
            self.status = (self.status | A.BMISX_IDEDMA_ERR) & ~A.BMISX_BMIDEA
            disk.dma_failed()
            return
        if views is None:
            self.errors_seen += 1
            self.errors.warn("ide-bm-short", "ide: PRD table ended before the transfer "
                             f"({req.sectors} sectors; {cur.entries} entries read, EOT "
                             f"{'seen' if cur.eot else 'never seen'}); nothing moved")
            self.status &= ~A.BMISX_BMIDEA  # no interrupt: the device is still waiting
            return
        self.transfers += 1
        if cur.exhausted():
            self.status &= ~A.BMISX_BMIDEA
        disk.dma_done(views)
