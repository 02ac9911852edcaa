"""One ATA device on a parallel ATA channel (ATA8-ACS commands, ATA8-APT protocols):
its Command Block registers with the 48-bit high-order bytes, status and error, the PIO
data-in/data-out protocols a DRQ block at a time, DMA commands handed to the channel's
bus master, and the reset behaviour (signature, diagnostic code).

Everything runs synchronously on the vCPU thread that wrote the register: a command is
done (or waiting on DRQ / the bus master) when the port write returns, so BSY is only
ever seen while SRST is held. That is the cost model of this device: every register
access and every 16-bit data word is a trapped port exit.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from pyvmm.backends.block import BlockBackend
from pyvmm.devices.emulated.ide.identify import Geometry, Settings, identify_page, valid_xfer_mode
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import ata as A

SECTOR = A.ATA_SECT_SIZE
IOV_MAX = 1024  # preadv/pwritev take at most this many buffers

# opcode -> (host-to-device, 48-bit, protocol)
_RW: dict[int, tuple[bool, bool, str]] = {
    A.ATA_CMD_READ_PIO: (False, False, "pio"), A.ATA_CMD_READ_PIO_EXT: (False, True, "pio"),
    A.ATA_CMD_WRITE_PIO: (True, False, "pio"), A.ATA_CMD_WRITE_PIO_EXT: (True, True, "pio"),
    A.ATA_CMD_READ_MULTI: (False, False, "multi"),
    A.ATA_CMD_READ_MULTI_EXT: (False, True, "multi"),
    A.ATA_CMD_WRITE_MULTI: (True, False, "multi"),
    A.ATA_CMD_WRITE_MULTI_EXT: (True, True, "multi"),
    A.ATA_CMD_READ: (False, False, "dma"), A.ATA_CMD_READ_DMA_EXT: (False, True, "dma"),
    A.ATA_CMD_WRITE: (True, False, "dma"), A.ATA_CMD_WRITE_DMA_EXT: (True, True, "dma"),
}


class TaskFile:
    """The Command Block registers a device position holds. Both devices of a channel
    latch every register write (ATA8-APT), so an absent device 1 still has them: device
    0 answers its register reads with them, and 0 for Status.

    ``regs[r]`` is register r (1 Features .. 6 Device); ``hob[r]`` the value written
    before it — the high-order byte of a 48-bit field (registers 1-5 are two-deep)."""

    present = False

    def __init__(self) -> None:
        self.regs = bytearray(8)
        self.hob = bytearray(8)
        self.status = 0
        self.error = 0

    def latch(self, reg: int, value: int) -> None:
        if reg != A.ATA_REG_DEVICE:
            self.hob[reg] = self.regs[reg]
        self.regs[reg] = value & 0xFF

    def signature(self) -> None:
        """The ATA device signature a reset or EXECUTE DEVICE DIAGNOSTIC leaves."""
        self.regs[A.ATA_REG_NSECT:A.ATA_REG_DEVICE + 1] = bytes((1, 1, 0, 0, 0))
        self.hob[:] = bytes(8)


@dataclass
class Transfer:
    """A PIO command between DRQ blocks."""

    write: bool  # host to device
    lba: int  # the next block's first sector
    remaining: int  # sectors not yet in a block
    block: int  # sectors per DRQ block (1, or the multiple count)


@dataclass(frozen=True)
class DmaRequest:
    write: bool  # host to device: the bus master reads guest memory
    lba: int
    sectors: int


class AtaDisk(TaskFile):
    present = True

    def __init__(self, backend: BlockBackend, unit: int, *, serial: str, model: str,
                 firmware: str, errors: OnceLog) -> None:
        super().__init__()
        self.backend, self.unit = backend, unit
        self.serial, self.model, self.firmware = serial, model, firmware
        self.sectors = backend.size // SECTOR
        self.geometry = Geometry.default(self.sectors)
        self.errors = errors
        self.counts: Counter[str] = Counter()
        # The channel connects these: INTRQ became pending; a DMA command waits.
        self.on_interrupt: Callable[[], None] = lambda: None
        self.on_dma: Callable[[], None] = lambda: None
        self.pending = False  # INTRQ pending (the channel drives the line from it)
        self.settings = Settings()
        self.keep_settings = False  # SET FEATURES 66h: no revert at a reset
        self.standby = False
        self.buf = bytearray()
        self.pos = 0
        self.data_in = True  # direction of the DRQ block in ``buf``
        self.xfer: Transfer | None = None
        self.dma: DmaRequest | None = None
        self._commands: dict[int, Callable[[int], None]] = {
            **dict.fromkeys(_RW, self._cmd_rw),
            A.ATA_CMD_ID_ATA: self._cmd_identify,
            A.ATA_CMD_SET_MULTI: self._cmd_set_multiple,
            A.ATA_CMD_SET_FEATURES: self._cmd_set_features,
            A.ATA_CMD_FLUSH: self._cmd_flush, A.ATA_CMD_FLUSH_EXT: self._cmd_flush,
            A.ATA_CMD_IDLE: self._cmd_power, A.ATA_CMD_IDLEIMMEDIATE: self._cmd_power,
            A.ATA_CMD_STANDBY: self._cmd_power, A.ATA_CMD_STANDBYNOW1: self._cmd_power,
            A.ATA_CMD_CHK_POWER: self._cmd_check_power,
        }
        self.reset_done()  # power-on: as after a reset

    def metrics(self) -> dict[str, int]:
        return dict(self.counts)

    # --- reset ----------------------------------------------------------------------
    def reset_begin(self) -> None:
        """SRST asserted: BSY, and whatever was in progress is gone."""
        self._stop()
        self.pending = False
        self.status = A.ATA_BUSY

    def reset_done(self) -> None:
        """SRST released (or power-on): the diagnostic's outputs, and the settings
        revert to their power-on values unless SET FEATURES 66h said keep them."""
        self.diagnose()
        self.standby = False
        if not self.keep_settings:
            self.settings = Settings()

    def diagnose(self) -> None:
        """EXECUTE DEVICE DIAGNOSTIC (and the end of a reset): signature, diagnostic
        code 01h (passed), DRDY. The settings stay: this is no reset."""
        self._stop()
        self.signature()
        self.error = A.ATA_DIAG_PASSED
        self.status = A.ATA_DRDY

    def _stop(self) -> None:
        self.xfer, self.dma = None, None
        self.buf, self.pos = bytearray(), 0

    # --- command completion ------------------------------------------------------------
    def _interrupt(self) -> None:
        self.pending = True
        self.on_interrupt()

    def _complete(self) -> None:
        self.status = A.ATA_DRDY
        self._interrupt()

    def _fail(self, error: int, key: str, why: str) -> None:
        """End the command with ERR and ``error`` (ABRT, IDNF, UNC), logged once."""
        self._stop()
        self.counts[key] += 1
        self.errors.warn(f"ide-{key}", f"ide: {why}")
        self.status = A.ATA_DRDY | A.ATA_ERR
        self.error = error
        self._interrupt()

    def _abort(self, key: str, why: str) -> None:
        self._fail(A.ATA_ABORTED, key, why)

    # --- commands ---------------------------------------------------------------------
    def command(self, op: int) -> None:
        """A write to the Command register of this (selected, present) device."""
        if self.status & (A.ATA_BUSY | A.ATA_DRQ):
            # ATA8-APT: the host shall not; the result is indeterminate. Ignored, as on
            # drives that keep the command in progress; SRST is the way out.
            self.counts["ignored_busy"] += 1
            self.errors.warn("ide-cmd-busy", f"ide: command {op:#04x} written while BSY or "
                             "DRQ (a data transfer the guest never finished); ignored")
            return
        self.counts["commands"] += 1
        self.error = 0
        handler = self._commands.get(op)
        if handler is None:
            self._abort("unknown_command", f"unsupported command {op:#04x}: ABRT")
            return
        handler(op)

    def _address(self, ext: bool) -> tuple[int | None, int]:
        """(first LBA or None for a CHS address off the geometry, sector count) with
        the count's 0 meaning 256 (28-bit) or 65536 (48-bit)."""
        r, h = self.regs, self.hob
        if ext:
            lba = (h[A.ATA_REG_LBAH] << 40 | h[A.ATA_REG_LBAM] << 32 | h[A.ATA_REG_LBAL] << 24
                   | r[A.ATA_REG_LBAH] << 16 | r[A.ATA_REG_LBAM] << 8 | r[A.ATA_REG_LBAL])
            return lba, (h[A.ATA_REG_NSECT] << 8 | r[A.ATA_REG_NSECT]) or 65536
        n = r[A.ATA_REG_NSECT] or 256
        dev = r[A.ATA_REG_DEVICE]
        if dev & A.ATA_LBA:
            return ((dev & 0x0F) << 24 | r[A.ATA_REG_LBAH] << 16 | r[A.ATA_REG_LBAM] << 8
                    | r[A.ATA_REG_LBAL]), n
        # CHS (obsolete, but what a BIOS-era driver sends): the default translation.
        g = self.geometry
        cyl, head, sec = r[A.ATA_REG_LBAH] << 8 | r[A.ATA_REG_LBAM], dev & 0x0F, r[A.ATA_REG_LBAL]
        if not 1 <= sec <= g.sectors or head >= g.heads or cyl >= g.cylinders:
            return None, n
        return (cyl * g.heads + head) * g.sectors + sec - 1, n

    def _cmd_rw(self, op: int) -> None:
        write, ext, kind = _RW[op]
        if kind == "multi" and not self.settings.multiple:
            self._abort("multiple_disabled", f"command {op:#04x} with multiple mode off: ABRT")
            return
        if write and self.backend.read_only:
            self._abort("read_only", f"write command {op:#04x} to a read-only disk: ABRT")
            return
        lba, n = self._address(ext)
        if lba is None or lba + n > self.sectors:
            where = "a CHS address off the geometry" if lba is None else f"LBA {lba}+{n}"
            self._fail(A.ATA_IDNF, "out_of_range", f"{where} beyond {self.sectors} "
                       "sectors: IDNF")
            return
        self.standby = False
        if kind == "dma":
            self.dma = DmaRequest(write, lba, n)
            self.status = A.ATA_DRDY | A.ATA_DRQ  # DMARQ: waiting for the bus master
            self.on_dma()
            return
        self.xfer = Transfer(write, lba, n, 1 if kind == "pio" else self.settings.multiple)
        if write:
            self._expect_block()  # data-out: no interrupt before the first block
        else:
            self._read_block()

    def _cmd_identify(self, op: int) -> None:
        page = identify_page(sectors=self.sectors, serial=self.serial, model=self.model,
                             firmware=self.firmware, unit=self.unit, settings=self.settings)
        self._give(bytearray(page))

    def _cmd_set_multiple(self, op: int) -> None:
        n = self.regs[A.ATA_REG_NSECT]
        if n and (n & (n - 1) or n > 16):  # 0 disables; else a power of two up to word 47
            self._abort("bad_multiple", f"SET MULTIPLE MODE to {n} sectors: ABRT")
            return
        self.settings = replace(self.settings, multiple=n)
        self._complete()

    def _cmd_set_features(self, op: int) -> None:
        sub, count = self.regs[A.ATA_REG_FEATURE], self.regs[A.ATA_REG_NSECT]
        if sub == A.SETFEATURES_XFER and valid_xfer_mode(count):
            if count & 0xF8 in (A.XFER_MW_DMA_0, A.XFER_UDMA_0):
                self.settings = replace(self.settings, xfer_mode=count)
        elif sub in (A.SETFEATURES_WC_ON, A.SETFEATURES_WC_OFF):
            on = sub == A.SETFEATURES_WC_ON
            if not on and not self._host(self._flush, "flush_error"):
                return  # disabling the cache writes it back first
            self.settings = replace(self.settings, write_cache=on)
        elif sub in (A.SETFEATURES_REVERT_OFF, A.SETFEATURES_REVERT_ON):
            self.keep_settings = sub == A.SETFEATURES_REVERT_OFF
        else:
            self._abort("bad_feature", f"SET FEATURES {sub:#04x} (count {count:#04x}): ABRT")
            return
        self._complete()

    def _cmd_flush(self, op: int) -> None:
        self.standby = False
        if self._host(self._flush, "flush_error"):
            self.counts["flushes"] += 1
            self._complete()

    def _cmd_power(self, op: int) -> None:
        self.standby = op in (A.ATA_CMD_STANDBY, A.ATA_CMD_STANDBYNOW1)
        self._complete()  # nothing spins: the modes are only reported

    def _cmd_check_power(self, op: int) -> None:
        self.regs[A.ATA_REG_NSECT] = (A.ATA_POWER_STANDBY if self.standby
                                      else A.ATA_POWER_ACTIVE_OR_IDLE)
        self._complete()

    # --- host I/O ---------------------------------------------------------------------
    def _flush(self) -> None:
        if not self.backend.read_only:
            self.backend.flush()

    def _host(self, fn: Callable[[], None], key: str) -> bool:
        """Run host I/O; a host error ends the command with ABRT (logged once)."""
        try:
            fn()
        except OSError as e:
            self._abort(key, f"host I/O error: {e.strerror or e}")
            return False
        return True

    def transfer(self, write: bool, lba: int, bufs: Sequence[memoryview]) -> None:
        """Move whole sectors between the image and ``bufs`` (at most IOV_MAX at a time);
        a short transfer is an error, as the image cannot have shrunk under a range we
        checked."""
        off = lba * SECTOR
        for i in range(0, len(bufs), IOV_MAX):
            chunk = bufs[i:i + IOV_MAX]
            want = sum(len(b) for b in chunk)
            got = self.backend.writev(off, chunk) if write else self.backend.readv(off, chunk)
            if got != want:
                raise OSError(0, f"short transfer ({got} of {want} bytes)")
            off += want
        if write and not self.settings.write_cache:
            self.backend.flush()  # the cache is off: a completed write is on the medium

    # --- PIO --------------------------------------------------------------------------
    def _give(self, block: bytearray) -> None:
        """Data-in: a block is ready to read; DRQ and an interrupt."""
        self.buf, self.pos, self.data_in = block, 0, True
        self.status = A.ATA_DRDY | A.ATA_DRQ
        self._interrupt()

    def _read_block(self) -> None:
        t = self.xfer
        assert t is not None
        n = min(t.block, t.remaining)
        block = bytearray(n * SECTOR)
        try:
            self.transfer(False, t.lba, [memoryview(block)])
        except OSError as e:
            self._fail(A.ATA_UNC, "read_error", f"host read error: {e.strerror or e}: UNC")
            return
        t.lba, t.remaining = t.lba + n, t.remaining - n
        self.counts["pio_sectors_read"] += n
        self._give(block)

    def _expect_block(self) -> None:
        """Data-out: DRQ for the next block (the caller interrupts if it is not the
        first)."""
        t = self.xfer
        assert t is not None
        self.buf, self.pos, self.data_in = bytearray(min(t.block, t.remaining) * SECTOR), 0, False
        self.status = A.ATA_DRDY | A.ATA_DRQ

    def _block_done(self) -> None:
        t = self.xfer
        if t is None:  # IDENTIFY: one block and done (data-in: no interrupt at the end)
            self._stop()
            self.status = A.ATA_DRDY
            return
        if t.write:
            n = len(self.buf) // SECTOR
            try:
                self.transfer(True, t.lba, [memoryview(self.buf)])
            except OSError as e:
                self._abort("write_error", f"host write error: {e.strerror or e}: ABRT")
                return
            t.lba, t.remaining = t.lba + n, t.remaining - n
            self.counts["pio_sectors_written"] += n
            if t.remaining:
                self._expect_block()
                self._interrupt()  # the next block may go
            else:
                self._stop()
                self._complete()
        elif t.remaining:
            self._read_block()
        else:
            self._stop()
            self.status = A.ATA_DRDY

    def read_data(self) -> int:
        """A 16-bit read of the Data register."""
        if not self.status & A.ATA_DRQ or not self.data_in or self.pos >= len(self.buf):
            # (DRQ without a block: a DMA command waiting for the bus master)
            self.errors.warn("ide-data-read", "ide: Data register read with no data-in "
                             "block pending; reads all-ones")
            return 0xFFFF
        v = self.buf[self.pos] | self.buf[self.pos + 1] << 8
        self.pos += 2
        if self.pos >= len(self.buf):
            self._block_done()
        return v

    def write_data(self, value: int) -> None:
        """A 16-bit write of the Data register."""
        if not self.status & A.ATA_DRQ or self.data_in or self.pos >= len(self.buf):
            self.errors.warn("ide-data-write", "ide: Data register write with no data-out "
                             "block pending; ignored")
            return
        self.buf[self.pos] = value & 0xFF
        self.buf[self.pos + 1] = (value >> 8) & 0xFF
        self.pos += 2
        if self.pos >= len(self.buf):
            self._block_done()

    # --- DMA (the bus master calls these) ---------------------------------------------------
    def dma_done(self, bufs: Sequence[memoryview]) -> None:
        """The bus master has the PRD-described memory for the whole request."""
        req = self.dma
        assert req is not None
        self.dma = None
        try:
            self.transfer(req.write, req.lba, bufs)
        except OSError as e:
            why = f"host I/O error in DMA: {e.strerror or e}"
            if req.write:
                self._abort("write_error", why + ": ABRT")
            else:
                self._fail(A.ATA_UNC, "read_error", why + ": UNC")
            return
        self.counts["dma_sectors_written" if req.write else "dma_sectors_read"] += req.sectors
        self._complete()

    def dma_failed(self) -> None:
        """The bus master could not reach the memory (a PRD table or buffer outside
        RAM): the transfer ends with ABRT."""
        self._abort("dma_memory", "DMA to or from memory outside RAM: ABRT, bus-master "
                    "status ERR")
