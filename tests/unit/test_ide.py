"""The PIIX3 IDE function and its ATA disks through their ports, as a driver sees them:
the function on a PCI root (BMIBA assigned, decoding on), the legacy ranges on the same
I/O bus the builder puts them on, real guest memory for the PRD tables and buffers.

Register-level behaviour (signature, probing, HOB, nIEN, SRST, alternate status), each
command's data phases and interrupts, the bus-master table of outcomes, and what a
hostile driver can do (random register sequences never raise)."""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.backends.block import RawBlockBackend
from pyvmm.bus import IoBus, MmioBus
from pyvmm.devices.emulated.ide import spec as ide
from pyvmm.devices.emulated.ide.busmaster import PrdCursor
from pyvmm.devices.emulated.ide.controller import MODEL, PiixIde
from pyvmm.devices.emulated.ide.disk import AtaDisk
from pyvmm.devices.pci.root import PCIRoot
from pyvmm.errors import ConfigError
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.machine.pci import build_pci
from pyvmm.memory import GuestMemory
from pyvmm.testing.lines import RecordingLine
from pyvmm.uapi import ata as A
from pyvmm.uapi import pci as P

MiB = 1 << 20
PRD, BUF = 0x10000, 0x100000  # guest addresses of the PRD table and the data buffer
PRI, PRI_CTL, SEC, SEC_CTL = 0x1F0, 0x3F6, 0x170, 0x376


def pattern(n: int, seed: int) -> bytes:
    period = bytes((i * 7 + seed * 13 + 1) & 0xFF for i in range(256))  # 7 is odd: 256
    return (period * (n // 256 + 1))[:n]


class CountingBackend(RawBlockBackend):
    def __init__(self, path: str, read_only: bool = False) -> None:
        super().__init__(path, read_only)
        self.flushes = 0

    def flush(self) -> None:
        self.flushes += 1
        super().flush()


class Rig:
    """The function on a PCI root and a port bus; a driver's view of it."""

    def __init__(self, mem: GuestMemory, disks: dict[tuple[int, int], CountingBackend]) -> None:
        self.mem = mem
        self.lines = (RecordingLine(), RecordingLine())
        self.ide = PiixIde(mem, self.lines)
        for (bus, unit), be in disks.items():
            self.ide.attach(bus, unit, AtaDisk(be, unit, serial=f"SER-{bus}{unit}", model=MODEL,
                                               firmware="9.8.7", errors=self.ide.errors))
        self.pio, self.mmio = IoBus(), MmioBus()
        for r in ide.SPEC.isa:
            self.pio.insert(self.ide, r.base, r.size, f"piix-ide.{r.name}")
        self.root: PCIRoot = build_pci(self.pio, self.mmio, mem, RecordingMsiSink(), False,
                                       [self.ide])
        self.bm = self.ide.config.bar_address(A.PIIX_BMIBA_BAR)
        self.cfg(P.PCI_COMMAND, 2, self.ide.config.command | P.PCI_COMMAND_MASTER)

    # --- ports ---------------------------------------------------------------------------
    def outb(self, port: int, v: int) -> None:
        self.pio.write(port, 1, v)

    def inb(self, port: int) -> int:
        return self.pio.read(port, 1)

    def inw(self, port: int) -> int:
        return self.pio.read(port, 2)

    def outw(self, port: int, v: int) -> None:
        self.pio.write(port, 2, v)

    def cfg(self, off: int, size: int, v: int) -> None:
        self.root.config_write(0, 2, 0, off, size, v)

    def irqs(self, ch: int = 0) -> int:
        return sum(self.lines[ch].history)  # rising edges

    # --- task file ------------------------------------------------------------------------
    def setup(self, lba: int, count: int, ext: bool = False, unit: int = 0,
              base: int = PRI, feature: int = 0) -> None:
        self.outb(base + 6, A.ATA_LBA | (unit << 4) | (0 if ext else (lba >> 24) & 0x0F))
        if ext:
            self.outb(base + 1, 0)
            self.outb(base + 2, (count >> 8) & 0xFF)
            self.outb(base + 3, (lba >> 24) & 0xFF)
            self.outb(base + 4, (lba >> 32) & 0xFF)
            self.outb(base + 5, (lba >> 40) & 0xFF)
        self.outb(base + 1, feature)
        self.outb(base + 2, count & 0xFF)
        self.outb(base + 3, lba & 0xFF)
        self.outb(base + 4, (lba >> 8) & 0xFF)
        self.outb(base + 5, (lba >> 16) & 0xFF)

    def command(self, op: int, lba: int = 0, count: int = 0, ext: bool = False,
                unit: int = 0, base: int = PRI, feature: int = 0) -> None:
        self.setup(lba, count, ext, unit, base, feature)
        self.outb(base + 7, op)

    def status(self, base: int = PRI) -> int:
        return self.inb(base + 7)

    def read_block(self, sectors: int, base: int = PRI) -> bytes:
        st_ = self.status(base)
        assert st_ & (A.ATA_DRQ | A.ATA_ERR | A.ATA_BUSY) == A.ATA_DRQ, hex(st_)
        return struct.pack(f"<{256 * sectors}H",
                           *(self.inw(base) for _ in range(256 * sectors)))

    def write_block(self, data: bytes, base: int = PRI) -> None:
        assert self.inb(base + 0x206) & A.ATA_DRQ  # alternate status
        for (w,) in struct.iter_unpack("<H", data):
            self.outw(base, w)

    def identify(self, unit: int = 0, base: int = PRI) -> list[int]:
        self.command(A.ATA_CMD_ID_ATA, unit=unit, base=base)
        return list(struct.unpack("<256H", self.read_block(1, base)))

    # --- bus master ------------------------------------------------------------------------
    def prd(self, entries: list[tuple[int, int, bool]], at: int = PRD) -> None:
        self.mem.write(at, b"".join(struct.pack("<IHH", a, n & 0xFFFF, A.PRD_EOT if eot else 0)
                                    for a, n, eot in entries))

    def bm_start(self, to_memory: bool, table: int = PRD, ch: int = 0) -> None:
        b = self.bm + 8 * ch
        self.pio.write(b + A.BMIDTPX, 4, table)
        self.outb(b + A.BMISX, A.BMISX_IDEINTS | A.BMISX_IDEDMA_ERR)  # clear both
        self.outb(b + A.BMICX, (A.BMICX_RWCON if to_memory else 0) | A.BMICX_SSBM)

    def bm_status(self, ch: int = 0) -> int:
        return self.inb(self.bm + 8 * ch + A.BMISX)

    def bm_stop(self, ch: int = 0) -> None:
        self.outb(self.bm + 8 * ch + A.BMICX, 0)


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    with GuestMemory([(0, 4 * MiB)]) as m:
        yield m


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "d.img"
    p.write_bytes(os.urandom(4 * MiB))
    return p


@pytest.fixture
def be(image: Path) -> Iterator[CountingBackend]:
    b = CountingBackend(str(image))
    yield b
    b.close()


@pytest.fixture
def rig(mem: GuestMemory, be: CountingBackend) -> Rig:
    return Rig(mem, {(0, 0): be})


# --- registers, probing, resets -----------------------------------------------------------
def test_power_on_signature_and_probing_by_register_echo(rig: Rig) -> None:
    assert rig.status() == A.ATA_DRDY and rig.inb(PRI + 1) == A.ATA_DIAG_PASSED
    assert [rig.inb(PRI + r) for r in (2, 3, 4, 5)] == [1, 1, 0, 0]
    for a, b in ((0x55, 0xAA), (0xAA, 0x55)):  # how a driver finds a device without PCI
        rig.outb(PRI + 2, a)
        rig.outb(PRI + 3, b)
        assert (rig.inb(PRI + 2), rig.inb(PRI + 3)) == (a, b)
    assert rig.inb(SEC + 7) == 0xFF and rig.inb(SEC + 2) == 0xFF  # empty channel floats
    assert rig.inb(SEC_CTL) == 0xFF
    rig.outb(PRI + 6, A.ATA_DEV1)  # device 1 absent: device 0 answers, Status 0
    rig.outb(PRI + 2, 0x33)
    assert rig.status() == 0 and rig.inb(PRI_CTL) == 0 and rig.inb(PRI + 2) == 0x33
    rig.outb(PRI + 7, A.ATA_CMD_ID_ATA)  # a command to the absent device does nothing
    assert rig.irqs() == 0 and rig.inw(PRI) == 0xFFFF
    rig.outb(PRI + 6, 0)
    assert rig.status() == A.ATA_DRDY


def test_identify_reports_what_the_image_is(mem: GuestMemory, tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    sectors = (1 << 28) + 12345  # past LBA28: words 60-61 saturate, 100-103 do not
    with open(big, "wb") as f:
        f.truncate(sectors * 512)
    b = CountingBackend(str(big))
    r = Rig(mem, {(0, 0): b})
    w = r.identify()
    page = struct.pack("<256H", *w)

    def text(a: int, n: int) -> str:
        return b"".join(struct.pack(">H", x) for x in w[a:a + n]).decode().rstrip()

    assert (text(27, 20), text(10, 10), text(23, 4)) == (MODEL, "SER-00", "9.8.7")
    assert w[60] | w[61] << 16 == (1 << 28) - 1
    assert w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48 == sectors
    assert w[47] == 0x8010 and w[59] == 0  # 16 sectors per block at most, none set yet
    assert w[49] & 0x0300 == 0x0300 and w[53] & 0x6 == 0x6  # DMA+LBA; words 64-70, 88 valid
    assert w[63] == 0x0007 and w[88] == 0x203F  # MWDMA0-2, UDMA0-5 (UDMA5 selected)
    assert w[83] & 0x3400 == 0x3400 and w[86] & 0x3400 == 0x3400  # LBA48, FLUSH (EXT)
    assert w[85] & (1 << 5) and w[1] == 16383 and w[3] == 16 and w[6] == 63
    assert page[510] == 0xA5 and sum(page) % 256 == 0  # integrity word
    assert r.status() == A.ATA_DRDY and r.irqs() == 1  # one interrupt: the data-in block
    b.close()


def test_hob_reads_the_previous_byte_and_any_write_clears_it(rig: Rig) -> None:
    rig.outb(PRI + 3, 0x11)
    rig.outb(PRI + 3, 0x22)
    rig.outb(PRI_CTL, A.ATA_HOB)
    assert rig.inb(PRI + 3) == 0x11
    rig.outb(PRI + 4, 0)  # a Command Block write clears HOB
    assert rig.inb(PRI + 3) == 0x22


def test_status_acknowledges_the_interrupt_alternate_status_does_not(rig: Rig) -> None:
    rig.command(A.ATA_CMD_CHK_POWER)
    assert rig.lines[0].level
    assert rig.inb(PRI_CTL) == A.ATA_DRDY and rig.lines[0].level
    assert rig.status() == A.ATA_DRDY and not rig.lines[0].level


def test_nien_holds_the_interrupt_back_until_it_is_cleared(rig: Rig) -> None:
    rig.outb(PRI_CTL, A.ATA_NIEN)
    rig.command(A.ATA_CMD_CHK_POWER)
    assert not rig.lines[0].level and rig.inb(PRI_CTL) == A.ATA_DRDY
    rig.outb(PRI_CTL, 0)  # still pending: INTRQ asserts now
    assert rig.lines[0].level and rig.bm_status() & A.BMISX_IDEINTS
    rig.status()
    assert not rig.lines[0].level


def test_srst_is_busy_while_held_then_signature_and_no_interrupt(rig: Rig) -> None:
    rig.command(A.ATA_CMD_READ_PIO, 5, 2)  # left with a data-in block pending
    rig.status()
    rig.outb(PRI_CTL, A.ATA_SRST)
    assert rig.inb(PRI_CTL) == A.ATA_BUSY
    rig.outb(PRI + 2, 9)  # ignored while BSY
    rig.outb(PRI_CTL, 0)
    assert rig.status() == A.ATA_DRDY and rig.inb(PRI + 1) == A.ATA_DIAG_PASSED
    assert [rig.inb(PRI + r) for r in (2, 3, 4, 5, 6)] == [1, 1, 0, 0, 0]
    assert rig.irqs() == 1  # only the read's block, none for the reset


def test_execute_device_diagnostic_goes_to_both_devices(mem: GuestMemory, image: Path,
                                                        tmp_path: Path) -> None:
    other = tmp_path / "e.img"
    other.write_bytes(bytes(MiB))
    b0, b1 = CountingBackend(str(image)), CountingBackend(str(other))
    r = Rig(mem, {(0, 0): b0, (0, 1): b1})
    r.outb(PRI + 6, A.ATA_DEV1)
    r.outb(PRI + 7, A.ATA_CMD_EDD)
    assert r.inb(PRI + 6) == 0 and r.status() == A.ATA_DRDY  # device 0 selected again
    assert r.inb(PRI + 1) == A.ATA_DIAG_PASSED and r.irqs() == 1
    w1 = r.identify(unit=1)  # and device 1 answers as itself
    assert b"".join(struct.pack(">H", x) for x in w1[10:20]).rstrip() == b"SER-01"
    assert w1[93] & 0x0100 and not w1[93] & 0x0001
    b0.close()
    b1.close()


def test_legacy_ports_decode_only_with_io_space_and_idetim(rig: Rig) -> None:
    rig.cfg(A.PIIX_IDETIM_PRI, 2, 0)
    assert rig.status() == 0xFF
    rig.cfg(A.PIIX_IDETIM_PRI, 2, A.PIIX_IDETIM_IDE)
    assert rig.status() == A.ATA_DRDY
    rig.cfg(P.PCI_COMMAND, 2, P.PCI_COMMAND_MASTER)
    assert rig.status() == 0xFF


def test_function_identity(rig: Rig) -> None:
    c = rig.ide.config
    assert (c.get16(0), c.get16(2)) == (0x8086, 0x7010)
    assert c.data[P.PCI_CLASS_PROG:P.PCI_CLASS_PROG + 3] == bytes((0x80, 0x01, 0x01))
    assert c.data[P.PCI_INTERRUPT_PIN] == 0 and c.bars[4] is not None and c.bars[4].is_io
    assert c.bars[4].size == 16 and rig.bm >= 0xC000


# --- PIO ---------------------------------------------------------------------------------
def test_pio_write_then_read_lba28_one_interrupt_per_sector(rig: Rig, image: Path) -> None:
    data = pattern(3 * 512, 1)
    rig.command(A.ATA_CMD_WRITE_PIO, 100, 3)
    assert rig.irqs() == 0  # data-out: the first block needs no interrupt
    for i in range(3):
        rig.write_block(data[512 * i:512 * (i + 1)])
        assert rig.irqs() == i + 1
        rig.status()
    assert image.read_bytes()[100 * 512:103 * 512] == data
    rig.command(A.ATA_CMD_READ_PIO, 100, 3)
    got = b"".join(rig.read_block(1) for _ in range(3))
    assert got == data and rig.irqs() == 6 and rig.status() == A.ATA_DRDY
    d = rig.ide.metrics()["disks"]
    assert isinstance(d, dict) and d["0.0"]["pio_sectors_read"] == 3


def test_lba48_uses_the_high_order_bytes(mem: GuestMemory, tmp_path: Path) -> None:
    big = tmp_path / "big.img"
    lba = (1 << 28) + 77  # needs the HOB of LBA Low
    with open(big, "wb") as f:
        f.truncate((lba + 100) * 512)
    b = CountingBackend(str(big))
    r = Rig(mem, {(0, 0): b})
    data = pattern(2 * 512, 5)
    r.command(A.ATA_CMD_WRITE_PIO_EXT, lba, 2, ext=True)
    r.write_block(data[:512])
    r.status()
    r.write_block(data[512:])
    with open(big, "rb") as f:
        f.seek(lba * 512)
        assert f.read(1024) == data
    r.command(A.ATA_CMD_READ_PIO_EXT, lba, 2, ext=True)
    assert r.read_block(1) + r.read_block(1) == data
    b.close()


def test_count_zero_means_256_sectors(rig: Rig, image: Path) -> None:
    rig.command(A.ATA_CMD_READ_PIO, 0, 0)
    got = b"".join(rig.read_block(1) for _ in range(256))
    assert got == image.read_bytes()[:256 * 512] and rig.status() == A.ATA_DRDY


def test_multiple_mode_blocks_and_its_errors(rig: Rig, image: Path) -> None:
    rig.command(A.ATA_CMD_READ_MULTI, 0, 4)
    assert rig.status() == A.ATA_DRDY | A.ATA_ERR and rig.inb(PRI + 1) == A.ATA_ABORTED
    rig.command(A.ATA_CMD_SET_MULTI, count=3)  # not a power of two
    assert rig.status() & A.ATA_ERR
    rig.command(A.ATA_CMD_SET_MULTI, count=4)
    assert rig.status() == A.ATA_DRDY and rig.identify()[59] == 0x0104
    data = pattern(10 * 512, 9)  # blocks of 4, 4, 2
    before = rig.irqs()
    rig.command(A.ATA_CMD_WRITE_MULTI_EXT, 40, 10, ext=True)
    for i, n in ((0, 4), (4, 4), (8, 2)):
        rig.write_block(data[512 * i:512 * (i + n)])
        rig.status()
    assert rig.irqs() - before == 3 and image.read_bytes()[40 * 512:50 * 512] == data
    rig.command(A.ATA_CMD_READ_MULTI, 40, 10)
    assert rig.read_block(4) + rig.read_block(4) + rig.read_block(2) == data


def test_chs_addressing_uses_the_default_geometry(rig: Rig, image: Path) -> None:
    rig.outb(PRI + 6, 0x01)  # CHS, head 1
    rig.outb(PRI + 2, 1)
    rig.outb(PRI + 3, 2)  # sector 2 (1-based)
    rig.outb(PRI + 4, 0)
    rig.outb(PRI + 5, 0)
    rig.outb(PRI + 7, A.ATA_CMD_READ_PIO)
    lba = 1 * 63 + 1
    assert rig.read_block(1) == image.read_bytes()[lba * 512:(lba + 1) * 512]
    rig.outb(PRI + 3, 0)  # sector 0 does not exist
    rig.outb(PRI + 7, A.ATA_CMD_READ_PIO)
    assert rig.status() & A.ATA_ERR and rig.inb(PRI + 1) == A.ATA_IDNF


def test_errors_idnf_abrt_and_read_only(rig: Rig, mem: GuestMemory, tmp_path: Path) -> None:
    n = 4 * MiB // 512
    rig.command(A.ATA_CMD_READ_PIO_EXT, n - 1, 2, ext=True)
    assert rig.status() == A.ATA_DRDY | A.ATA_ERR and rig.inb(PRI + 1) == A.ATA_IDNF
    for op in (0x0F, A.ATA_CMD_DEV_RESET, 0x00):  # reserved, PACKET-only, NOP
        rig.command(op)
        assert rig.status() == A.ATA_DRDY | A.ATA_ERR and rig.inb(PRI + 1) == A.ATA_ABORTED
    ro = tmp_path / "ro.img"
    ro.write_bytes(pattern(MiB, 3))
    b = CountingBackend(str(ro), read_only=True)
    r = Rig(GuestMemory([(0, MiB)]), {(0, 0): b})
    for op in (A.ATA_CMD_WRITE_PIO, A.ATA_CMD_WRITE, A.ATA_CMD_WRITE_MULTI_EXT):
        r.command(op, 0, 1, ext=op == A.ATA_CMD_WRITE_MULTI_EXT)
        assert r.status() & A.ATA_ERR and r.inb(PRI + 1) == A.ATA_ABORTED
    r.command(A.ATA_CMD_READ_PIO, 0, 1)
    assert r.read_block(1) == pattern(MiB, 3)[:512]
    assert ro.read_bytes() == pattern(MiB, 3)
    b.close()


def test_a_guest_that_never_reads_its_data(rig: Rig) -> None:
    """DRQ stays; register and command writes are ignored (logged once) until SRST."""
    rig.command(A.ATA_CMD_READ_PIO, 0, 8)
    rig.status()
    for _ in range(3):
        rig.command(A.ATA_CMD_ID_ATA)
    assert rig.inb(PRI_CTL) & A.ATA_DRQ and rig.ide.errors.counts["ide-cmd-busy"] == 3
    rig.outb(PRI_CTL, A.ATA_SRST)
    rig.outb(PRI_CTL, 0)
    assert rig.identify()[0] == 0x0040


def test_set_features_modes_cache_and_keeping_settings(rig: Rig, be: CountingBackend) -> None:
    rig.command(A.ATA_CMD_SET_FEATURES, count=A.XFER_MW_DMA_0 | 2,
                feature=A.SETFEATURES_XFER)
    w = rig.identify()
    assert (w[63], w[88]) == (0x0407, 0x003F)
    rig.command(A.ATA_CMD_SET_FEATURES, count=A.XFER_UDMA_0 | 6, feature=A.SETFEATURES_XFER)
    assert rig.status() & A.ATA_ERR  # UDMA6 not offered
    rig.command(A.ATA_CMD_SET_FEATURES, feature=A.SETFEATURES_WC_OFF)
    assert be.flushes == 1 and not rig.identify()[85] & (1 << 5)
    rig.command(A.ATA_CMD_WRITE_PIO, 1, 1)
    rig.write_block(bytes(512))
    assert be.flushes == 2  # cache off: the write is on the medium before it completes
    rig.command(A.ATA_CMD_SET_MULTI, count=8)
    rig.command(A.ATA_CMD_SET_FEATURES, feature=A.SETFEATURES_REVERT_OFF)
    rig.outb(PRI_CTL, A.ATA_SRST)
    rig.outb(PRI_CTL, 0)
    assert rig.identify()[59] == 0x0108  # kept across SRST
    rig.command(A.ATA_CMD_SET_FEATURES, feature=A.SETFEATURES_REVERT_ON)
    rig.outb(PRI_CTL, A.ATA_SRST)
    rig.outb(PRI_CTL, 0)
    w = rig.identify()
    assert w[59] == 0 and w[85] & (1 << 5)  # power-on defaults again
    rig.command(A.ATA_CMD_SET_FEATURES, feature=0x55)  # read look-ahead: not claimed
    assert rig.status() & A.ATA_ERR


def test_flush_power_modes(rig: Rig, be: CountingBackend) -> None:
    for op in (A.ATA_CMD_FLUSH, A.ATA_CMD_FLUSH_EXT):
        rig.command(op)
        assert rig.status() == A.ATA_DRDY
    assert be.flushes == 2
    rig.command(A.ATA_CMD_STANDBYNOW1)
    rig.command(A.ATA_CMD_CHK_POWER)
    assert rig.inb(PRI + 2) == A.ATA_POWER_STANDBY
    rig.command(A.ATA_CMD_IDLEIMMEDIATE)
    rig.command(A.ATA_CMD_CHK_POWER)
    assert rig.inb(PRI + 2) == A.ATA_POWER_ACTIVE_OR_IDLE


# --- bus-master DMA -------------------------------------------------------------------------
def test_dma_write_and_read_through_several_prds(rig: Rig, mem: GuestMemory,
                                                 image: Path) -> None:
    data = pattern(8 * 512, 2)
    mem.write(BUF, data)
    rig.prd([(BUF, 1024, False), (BUF + 1024, 3072, True)])
    rig.command(A.ATA_CMD_WRITE, 300, 8)
    assert rig.inb(PRI_CTL) == A.ATA_DRDY | A.ATA_DRQ  # waiting for the bus master
    rig.bm_start(to_memory=False)
    assert rig.bm_status() == A.BMISX_IDEINTS  # exact fit: inactive, interrupt
    assert rig.status() == A.ATA_DRDY and rig.irqs() == 1
    rig.bm_stop()
    assert image.read_bytes()[300 * 512:308 * 512] == data
    mem.write(BUF, bytes(8 * 512))
    rig.bm_start(to_memory=True)  # the engine first, then the command: also fine
    assert rig.bm_status() == A.BMISX_BMIDEA
    rig.command(A.ATA_CMD_READ_DMA_EXT, 300, 8, ext=True)
    assert rig.bm_status() == A.BMISX_IDEINTS and mem.read(BUF, 8 * 512) == data


def test_prd_byte_count_zero_is_64k_and_count_zero_is_65536_sectors(
        mem: GuestMemory, tmp_path: Path) -> None:
    big = tmp_path / "b.img"
    data = os.urandom(40 * MiB)
    big.write_bytes(data)
    with GuestMemory([(0, 64 * MiB)]) as m:
        b = CountingBackend(str(big))
        r = Rig(m, {(0, 0): b})
        r.prd([(BUF + 0x10000 * i, 0, i == 511) for i in range(512)])  # 512 x 64 KiB
        r.command(A.ATA_CMD_READ_DMA_EXT, 16, 0, ext=True)  # 0: 65536 sectors, 32 MiB
        r.bm_start(to_memory=True)
        assert r.bm_status() == A.BMISX_IDEINTS and r.status() == A.ATA_DRDY
        assert m.read(BUF, 32 * MiB) == data[16 * 512:16 * 512 + 32 * MiB]
        b.close()


def test_prds_larger_than_the_transfer_leave_the_engine_active(rig: Rig,
                                                               mem: GuestMemory) -> None:
    rig.prd([(BUF, 4096, False)])  # no EOT, and more than one sector
    rig.command(A.ATA_CMD_READ, 0, 1)
    rig.bm_start(to_memory=True)
    assert rig.bm_status() == A.BMISX_BMIDEA | A.BMISX_IDEINTS
    rig.bm_stop()
    assert rig.bm_status() == A.BMISX_IDEINTS


def test_prds_shorter_than_the_transfer(rig: Rig, mem: GuestMemory, image: Path) -> None:
    mem.write(BUF, bytes(4096))
    rig.prd([(BUF, 512, True)])
    rig.command(A.ATA_CMD_READ, 0, 2)
    rig.bm_start(to_memory=True)
    assert rig.bm_status() == 0 and rig.irqs() == 0  # inactive, no interrupt
    assert mem.read(BUF, 1024) == bytes(1024)  # nothing moved
    assert rig.inb(PRI_CTL) == A.ATA_DRDY | A.ATA_DRQ  # the device still waits
    rig.bm_stop()
    rig.prd([(BUF, 1024, True)])  # a good table: the same command goes on
    rig.bm_start(to_memory=True)
    assert rig.bm_status() == A.BMISX_IDEINTS and mem.read(BUF, 1024) == image.read_bytes()[:1024]


def test_prd_table_without_eot_is_walked_at_most_8192_entries(rig: Rig,
                                                              mem: GuestMemory) -> None:
    rig.prd([(BUF, 2, False)] * 8192, at=0x200000)  # 64 KiB of table, 16 KiB covered
    rig.command(A.ATA_CMD_READ, 0, 64)  # 32 KiB
    rig.bm_start(to_memory=True, table=0x200000)
    cur = rig.ide.channels[0].bm.cursor
    assert isinstance(cur, PrdCursor) and cur.entries == A.PRD_TABLE_MAX_ENTRIES
    assert rig.bm_status() == 0 and rig.ide.errors.counts["ide-bm-short"] == 1


def test_dma_outside_ram_sets_error(rig: Rig, mem: GuestMemory, image: Path) -> None:
    before = image.read_bytes()
    for table, entries in ((PRD, [(0xF0000000, 512, True)]), (0x7FFFFFF0, [])):
        rig.outb(PRI_CTL, A.ATA_SRST)
        rig.outb(PRI_CTL, 0)
        if entries:
            rig.prd(entries)
        rig.command(A.ATA_CMD_WRITE, 9, 1)
        rig.bm_start(to_memory=False, table=table)
        assert rig.bm_status() == A.BMISX_IDEDMA_ERR | A.BMISX_IDEINTS
        assert rig.status() == A.ATA_DRDY | A.ATA_ERR and rig.inb(PRI + 1) == A.ATA_ABORTED
        rig.bm_stop()
    assert image.read_bytes() == before
    assert rig.ide.metrics()["bus_master_errors"] == 2


def test_bus_mastering_off_waits_then_runs(rig: Rig, mem: GuestMemory, image: Path) -> None:
    rig.cfg(P.PCI_COMMAND, 2, P.PCI_COMMAND_IO)
    mem.write(BUF, b"\xee" * 512)
    rig.prd([(BUF, 512, True)])
    rig.command(A.ATA_CMD_READ, 7, 1)
    rig.bm_start(to_memory=True)
    assert rig.bm_status() == A.BMISX_BMIDEA and rig.irqs() == 0
    assert mem.read(BUF, 512) == b"\xee" * 512
    rig.cfg(P.PCI_COMMAND, 2, P.PCI_COMMAND_IO | P.PCI_COMMAND_MASTER)
    assert rig.bm_status() == A.BMISX_IDEINTS and mem.read(BUF, 512) == image.read_bytes()[
        7 * 512:8 * 512]


def test_status_register_bits(rig: Rig) -> None:
    b = rig.bm + A.BMISX
    rig.outb(b, A.BMISX_DMA0CAP | A.BMISX_BMIDEA)  # active is read-only
    assert rig.inb(b) == A.BMISX_DMA0CAP
    rig.ide.channels[0].bm.status |= A.BMISX_IDEINTS | A.BMISX_IDEDMA_ERR
    rig.outb(b, A.BMISX_IDEINTS | A.BMISX_DMA0CAP)  # write 1 to clear
    assert rig.inb(b) == A.BMISX_DMA0CAP | A.BMISX_IDEDMA_ERR
    rig.pio.write(rig.bm + A.BMIDTPX, 4, 0x12345677)
    assert rig.pio.read(rig.bm + A.BMIDTPX, 4) == 0x12345674


# --- config, registry, spec ---------------------------------------------------------------
class Ctx:
    def __init__(self, mem: GuestMemory) -> None:
        self.mem, self.index, self.name = mem, 0, "ide0"
        self._shared: dict[str, object] = {}
        self.closers: list[object] = []

    def line(self, index: int = 0) -> RecordingLine:
        return RecordingLine()

    def shared(self, key: str, make: object) -> object:
        if key not in self._shared:
            self._shared[key] = make()  # type: ignore[operator]
        return self._shared[key]

    def on_close(self, fn: object) -> None:
        self.closers.append(fn)


def test_disks_share_one_function(mem: GuestMemory, image: Path, tmp_path: Path) -> None:
    from pyvmm.machine.config import MachineConfig
    other = tmp_path / "o.img"
    other.write_bytes(bytes(MiB))
    cfg = MachineConfig.from_dict({"kernel": "k", "devices": [
        {"type": "ide", "path": str(image)},
        {"type": "ide", "path": str(other), "bus": 1, "unit": 1, "readonly": True}]})
    ctx = Ctx(mem)
    devs = [ide.create(d.config, ctx) for d in cfg.devices]  # type: ignore[arg-type]
    assert devs[0] is devs[1]
    assert [(c.index, d.unit) for c in devs[0].channels for d in c.disks()] == [(0, 0), (1, 1)]
    with pytest.raises(ConfigError, match="bus 0 unit 0 is given twice"):
        ide.create(cfg.devices[0].config, ctx)  # type: ignore[arg-type]
    for fn in ctx.closers:
        fn()  # type: ignore[operator]


def test_command_line_spelling() -> None:
    from pyvmm.cli import device_from_arg
    d = device_from_arg("disk", "path=x.img,if=ide,bus=1,unit=1,readonly=on")
    assert d == {"type": "ide", "path": "x.img", "bus": "1", "unit": "1", "readonly": "on"}
    cfg = ide.IdeConfig(path="x", bus=2)
    with pytest.raises(ValueError, match="bus 2"):
        cfg.check()


def test_opcodes_match_linux_hdreg_h() -> None:
    """The only ATA header userspace has (include/uapi/linux/hdreg.h) agrees."""
    hdr = Path("/usr/include/linux/hdreg.h")
    if not hdr.exists():
        pytest.skip("no linux/hdreg.h")
    defs = {m[1]: int(m[2], 16) for m in re.finditer(
        r"#define\s+(\w+)\s+0x([0-9A-Fa-f]+)", hdr.read_text())}
    pairs = {"WIN_READ": A.ATA_CMD_READ_PIO, "WIN_READ_EXT": A.ATA_CMD_READ_PIO_EXT,
             "WIN_WRITE": A.ATA_CMD_WRITE_PIO, "WIN_WRITE_EXT": A.ATA_CMD_WRITE_PIO_EXT,
             "WIN_MULTREAD": A.ATA_CMD_READ_MULTI, "WIN_MULTREAD_EXT": A.ATA_CMD_READ_MULTI_EXT,
             "WIN_MULTWRITE": A.ATA_CMD_WRITE_MULTI,
             "WIN_MULTWRITE_EXT": A.ATA_CMD_WRITE_MULTI_EXT, "WIN_SETMULT": A.ATA_CMD_SET_MULTI,
             "WIN_READDMA": A.ATA_CMD_READ, "WIN_READDMA_EXT": A.ATA_CMD_READ_DMA_EXT,
             "WIN_WRITEDMA": A.ATA_CMD_WRITE, "WIN_WRITEDMA_EXT": A.ATA_CMD_WRITE_DMA_EXT,
             "WIN_FLUSH_CACHE": A.ATA_CMD_FLUSH, "WIN_FLUSH_CACHE_EXT": A.ATA_CMD_FLUSH_EXT,
             "WIN_IDENTIFY": A.ATA_CMD_ID_ATA, "WIN_SETFEATURES": A.ATA_CMD_SET_FEATURES,
             "WIN_DIAGNOSE": A.ATA_CMD_EDD, "WIN_DEVICE_RESET": A.ATA_CMD_DEV_RESET,
             "WIN_STANDBYNOW1": A.ATA_CMD_STANDBYNOW1, "WIN_STANDBY": A.ATA_CMD_STANDBY,
             "WIN_IDLEIMMEDIATE": A.ATA_CMD_IDLEIMMEDIATE,
             "WIN_CHECKPOWERMODE1": A.ATA_CMD_CHK_POWER,
             "SETFEATURES_EN_WCACHE": A.SETFEATURES_WC_ON,
             "SETFEATURES_DIS_WCACHE": A.SETFEATURES_WC_OFF,
             "SETFEATURES_DIS_RPOD": A.SETFEATURES_REVERT_OFF,
             "SETFEATURES_EN_RPOD": A.SETFEATURES_REVERT_ON}
    assert {k: defs[k] for k in pairs} == pairs


# --- a hostile driver ------------------------------------------------------------------------
PORTS = [PRI + i for i in range(8)] + [PRI_CTL, SEC + 7, SEC_CTL]
_op = st.one_of(
    st.tuples(st.just("pio"), st.sampled_from(PORTS), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFFFFFF), st.booleans()),
    st.tuples(st.just("cmd"), st.just(PRI + 7), st.just(1),
              st.sampled_from([*A.__dict__.values(), 0x0F, 0xFF]).filter(
                  lambda v: isinstance(v, int) and 0 <= v < 256), st.just(True)),
    st.tuples(st.just("bm"), st.integers(0, 15), st.sampled_from([1, 2, 4]),
              st.integers(0, 0xFFFFFFFF), st.booleans()),
    st.tuples(st.just("bm"), st.just(A.BMIDTPX), st.just(4), st.just(PRD), st.just(True)),
    st.tuples(st.just("burst"), st.just(PRI), st.just(2), st.integers(0, 0xFFFF),
              st.booleans()),  # a whole sector through the Data register
    st.tuples(st.just("cfg"), st.sampled_from([P.PCI_COMMAND, A.PIIX_IDETIM_PRI, 0x20]),
              st.just(2), st.integers(0, 0xFFFF), st.just(True)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_op, max_size=100), st.binary(min_size=64, max_size=64))
def test_random_register_sequences_never_raise(ops: list[tuple[str, int, int, int, bool]],
                                               table: bytes) -> None:
    """Any sequence of port, bus-master and config accesses over a PRD table of random
    bytes: the device answers, errs or waits, but never raises; afterwards SRST (with the
    decode and bus mastering put back) brings it back to a usable disk."""
    import tempfile
    with tempfile.NamedTemporaryFile() as f, GuestMemory([(0, 2 * MiB)]) as m:
        f.write(pattern(MiB, 1))
        f.flush()
        b = CountingBackend(f.name)
        r = Rig(m, {(0, 0): b})
        m.write(PRD, table)
        for kind, where, size, value, write in ops:
            if kind == "burst":
                for _ in range(256):
                    if write:
                        r.pio.write(where, 2, value)
                    else:
                        r.pio.read(where, 2)
            elif kind in ("pio", "cmd"):
                if write:
                    r.pio.write(where, size, value & ((1 << (8 * size)) - 1))
                else:
                    r.pio.read(where, size)
            elif kind == "bm":
                off = where & ~(size - 1)
                if write:
                    r.pio.write(r.bm + off, size, value & ((1 << (8 * size)) - 1))
                else:
                    r.pio.read(r.bm + off, size)
            else:
                r.cfg(where, size, value)
        r.cfg(0x20, 4, r.bm | 1)
        r.cfg(A.PIIX_IDETIM_PRI, 2, A.PIIX_IDETIM_IDE)
        r.cfg(P.PCI_COMMAND, 2, P.PCI_COMMAND_IO | P.PCI_COMMAND_MASTER)
        r.bm_stop()
        r.outb(PRI_CTL, A.ATA_SRST)
        r.outb(PRI_CTL, 0)
        assert r.status() == A.ATA_DRDY
        r.command(A.ATA_CMD_READ_PIO, 0, 1)
        assert r.read_block(1) == os.pread(b.fd, 512, 0)
        b.close()
