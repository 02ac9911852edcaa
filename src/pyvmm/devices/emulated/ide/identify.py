"""The 512-byte IDENTIFY DEVICE page of a parallel ATA disk (ATA8-ACS 7.16), with the
words a driver reads to decide how to talk to it: geometry for CHS-era code, capacity
as LBA28 and LBA48, the DRQ block size of READ/WRITE MULTIPLE, the PIO, multiword DMA
and Ultra DMA modes (supported and selected), the command sets, and the integrity word.

Word values follow what a real PATA disk of the ATA-8 era reports, not an emulator's
shortcuts: obsolete single-word DMA is not offered (word 62 is 0), NOP, SMART and
read look-ahead are not claimed because the device does not implement them.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.uapi import ata as A

MAX_MULTIPLE = 16  # word 47: at most 16 sectors per DRQ block (READ/WRITE MULTIPLE)
LBA28_MAX = (1 << 28) - 1
HEADS, SECTORS_PER_TRACK, MAX_CYLINDERS = 16, 63, 16383  # the ATA default translation


@dataclass(frozen=True)
class Geometry:
    cylinders: int
    heads: int
    sectors: int  # per track

    @classmethod
    def default(cls, total: int) -> Geometry:
        """The default CHS translation (ATA-4 and later: disks over 8.4 GB report
        16383/16/63, which covers their first 8.4 GB only)."""
        return cls(max(1, min(total // (HEADS * SECTORS_PER_TRACK), MAX_CYLINDERS)),
                   HEADS, SECTORS_PER_TRACK)

    @property
    def total(self) -> int:
        return self.cylinders * self.heads * self.sectors


def ata_string(text: str, nbytes: int) -> list[int]:
    """An IDENTIFY string: ASCII, space-padded, two characters per word with the first
    in the high byte (ATA8-ACS 3.3.10)."""
    raw = text.encode("ascii", "replace")[:nbytes].ljust(nbytes, b" ")
    return [raw[i] << 8 | raw[i + 1] for i in range(0, nbytes, 2)]


@dataclass(frozen=True)
class Settings:
    """What SET MULTIPLE MODE and SET FEATURES change, as IDENTIFY reports it."""

    multiple: int = 0  # sectors per DRQ block; 0: multiple mode disabled
    write_cache: bool = True
    xfer_mode: int = A.XFER_UDMA_0 | 5  # a SET FEATURES transfer-mode value


def identify_page(*, sectors: int, serial: str, model: str, firmware: str, unit: int,
                  settings: Settings) -> bytes:
    w = [0] * A.ATA_ID_WORDS
    geo = Geometry.default(sectors)
    w[0] = 0x0040  # ATA device, fixed (not removable) media
    w[1], w[3], w[6] = geo.cylinders, geo.heads, geo.sectors
    w[10:20] = ata_string(serial, 20)
    w[23:27] = ata_string(firmware, 8)
    w[27:47] = ata_string(model, 40)
    w[47] = 0x8000 | MAX_MULTIPLE
    w[49] = 1 << 11 | 1 << 10 | 1 << 9 | 1 << 8  # IORDY, IORDY can be disabled, LBA, DMA
    w[50] = 0x4000  # shall be one
    w[51] = w[52] = 0x0200  # obsolete PIO/DMA timing modes, as drives still fill them
    w[53] = 1 << 2 | 1 << 1 | 1 << 0  # words 88, 64-70 and 54-58 are valid
    w[54], w[55], w[56] = geo.cylinders, geo.heads, geo.sectors
    w[57], w[58] = geo.total & 0xFFFF, geo.total >> 16
    if settings.multiple:
        w[59] = 0x0100 | settings.multiple  # the multiple setting is valid
    lba28 = min(sectors, LBA28_MAX)
    w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16
    mode, n = settings.xfer_mode & 0xF8, settings.xfer_mode & 7
    w[63] = 0x0007 | (1 << (8 + n) if mode == A.XFER_MW_DMA_0 else 0)  # MWDMA 0-2
    w[64] = 0x0003  # PIO modes 3 and 4
    w[65] = w[66] = w[67] = w[68] = 120  # ns: MWDMA and PIO cycle times of mode 2 / 4
    w[80] = 0x01F0  # major version: ATA/ATAPI-4 to ATA8-ACS
    w[81] = 0x0000  # minor version not reported
    w[82] = 1 << 5 | 1 << 3  # write cache, power management feature sets supported
    w[83] = 1 << 14 | 1 << 13 | 1 << 12 | 1 << 10  # FLUSH CACHE (EXT), 48-bit addresses
    w[84] = 1 << 14
    w[85] = (1 << 5 if settings.write_cache else 0) | 1 << 3  # enabled: write cache, PM
    w[86] = 1 << 13 | 1 << 12 | 1 << 10
    w[87] = 1 << 14
    w[88] = 0x003F | (1 << (8 + n) if mode == A.XFER_UDMA_0 else 0)  # UDMA 0-5
    # Hardware reset result: shall be one (14), 80-conductor cable (13), and the
    # device's own part: device 0 passed diagnostics, address set by jumper.
    w[93] = 1 << 14 | 1 << 13 | (0x0300 if unit else 0x000B)
    w[100], w[101] = sectors & 0xFFFF, (sectors >> 16) & 0xFFFF
    w[102], w[103] = (sectors >> 32) & 0xFFFF, (sectors >> 48) & 0xFFFF
    w[106] = 0x4000  # valid; one 512-byte logical sector per physical sector
    w[217] = 0x0001  # non-rotating media (an image file has no spindle)
    page = bytearray(struct.pack("<256H", *w))
    page[510] = 0xA5  # integrity word: signature, then a checksum making the sum 0
    page[511] = -sum(page[:511]) & 0xFF
    return bytes(page)


def valid_xfer_mode(value: int) -> bool:
    """A SET FEATURES transfer-mode value this disk accepts (ATA8-ACS 7.48.9)."""
    mode, n = value & 0xF8, value & 7
    if value in (A.XFER_PIO_DEFAULT, A.XFER_PIO_DEFAULT_NO_IORDY):
        return True
    return ((mode == A.XFER_PIO_0 and n <= 4) or (mode == A.XFER_MW_DMA_0 and n <= 2)
            or (mode == A.XFER_UDMA_0 and n <= 5))
