"""QEMU's firmware configuration device (fw_cfg), as firmware and test kernels find it:
fixed ports, probed by reading the signature (QEMU docs/specs/fw_cfg.rst).

Modelled: the selector (0x510, 16-bit), the data port (0x511, bytes in sequence, 0 past
an item's end), the DMA interface (0x514: a big-endian 64-bit address of an
``FWCfgDmaAccess`` {be32 control, be32 length, be64 address}; writing the low half
starts it; reading gives "QEMU CFG"), items SIGNATURE, ID (traditional + DMA), UUID
(zero), RAM_SIZE, NOGRAPHIC, NB_CPUS/MAX_CPUS, FILE_DIR (big-endian, sorted by name),
the file ``etc/e820`` (the guest's memory map as the boot protocol gives it) and user
files (``--fw-cfg file=opt/NAME=@PATH`` or ``file=opt/NAME=TEXT``).
Not modelled: writes (every item is read-only: a DMA write sets ERROR), the MMIO
variant of other architectures, kernel/initrd/cmdline items (pyvmm loads kernels
itself), the ACPI description (QEMU0002 in the DSDT).

Threats: a guest selects any key (unknown ones read as empty), reads past an item
(zeros), and points DMA anywhere: the access structure and every transfer go through
guest-memory bounds checks, a transfer outside RAM sets ERROR, and a transfer is at
most the item's size (the rest is zeros, written in bounded chunks): no guest value
sizes a host allocation beyond the item itself.
"""

from __future__ import annotations

import contextlib
import struct
from dataclasses import dataclass
from pathlib import Path

from pyvmm.devices.spec import DeviceConfig, DeviceSpec, HostContext, IsaRange, Kind
from pyvmm.errors import ConfigError, GuestMemoryError
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.schema import option
from pyvmm.uapi import fw_cfg as F

MAX_FILE_BYTES = 16 << 20
_dma = struct.Struct(">IIQ")
ZERO_CHUNK = bytes(4096)


class FwCfg:
    def __init__(self, mem: GuestMemory, items: dict[int, bytes],
                 files: dict[str, bytes]) -> None:
        self.mem = mem
        self.items = dict(items)
        names = sorted(files)
        if len(names) > F.FW_CFG_WRITE_CHANNEL - F.FW_CFG_FILE_FIRST:
            raise ConfigError("fw_cfg: too many files")
        directory = struct.pack(">I", len(names))
        for i, name in enumerate(names):
            key = F.FW_CFG_FILE_FIRST + i
            self.items[key] = files[name]
            directory += struct.pack(">IHH56s", len(files[name]), key, 0, name.encode())
        self.items[F.FW_CFG_FILE_DIR] = directory
        self.selector = 0
        self.offset = 0
        self.dma_high = 0
        self.errors = OnceLog()
        self.dma_transfers = 0
        self.dma_errors = 0

    def _item(self) -> bytes:
        return self.items.get(self.selector & ~(F.FW_CFG_WRITE_CHANNEL), b"")

    def select(self, key: int) -> None:
        self.selector, self.offset = key & 0xFFFF, 0

    # --- bus device: both ranges land here, told apart by base ---------------------------
    def read(self, base: int, offset: int, size: int) -> int:
        if base == F.FW_CFG_DMA_IO_BASE:
            sig = F.FW_CFG_DMA_SIGNATURE.to_bytes(8, "big")
            return int.from_bytes(sig[offset:offset + size], "little")
        if offset == 1:  # data: bytes in sequence (a wider read takes several)
            data = self._item()
            chunk = data[self.offset:self.offset + size].ljust(size, b"\0")
            self.offset = min(self.offset + size, len(data))
            return int.from_bytes(chunk, "little")
        return 0  # the selector reads as 0 on QEMU's x86 machines

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        if base == F.FW_CFG_DMA_IO_BASE:
            raw = value.to_bytes(size, "little")  # the register itself is big-endian
            if offset == 0 and size == 8:
                self._dma(int.from_bytes(raw, "big"))
            elif offset == 0 and size == 4:
                self.dma_high = int.from_bytes(raw, "big")
            elif offset == 4 and size == 4:
                self._dma((self.dma_high << 32) | int.from_bytes(raw, "big"))
                self.dma_high = 0
            else:
                self.errors.warn("dma-size", f"fw_cfg: {size}-byte DMA register write at "
                                 f"+{offset}; ignored")
            return
        if offset == 0 and size == 2:
            self.select(value)
        elif offset == 0 and size == 1:
            self.select(value)  # an 8-bit selector write on QEMU selects too
        else:
            self.errors.warn("data-write", "fw_cfg: write to the data port; items are "
                             "read-only")

    def _dma(self, addr: int) -> None:
        self.dma_transfers += 1
        try:
            control, length, dest = _dma.unpack(self.mem.read(addr, _dma.size))
        except GuestMemoryError:
            self.dma_errors += 1
            self.errors.warn("dma-desc", f"fw_cfg: DMA access structure at {addr:#x} is "
                             "outside RAM")
            return  # nowhere to report it: the guest polls a control word we cannot reach
        status = 0
        if control & F.FW_CFG_DMA_CTL_SELECT:
            self.select(control >> 16)
        try:
            if control & F.FW_CFG_DMA_CTL_WRITE:
                status = F.FW_CFG_DMA_CTL_ERROR  # read-only items
            elif control & F.FW_CFG_DMA_CTL_READ:
                data = self._item()
                chunk = data[self.offset:self.offset + length]
                self.mem.write(dest, chunk)  # bounds-checked before a byte is written
                pos = len(chunk)
                while pos < length:  # past the item: zeros, in bounded pieces
                    n = min(length - pos, len(ZERO_CHUNK))
                    self.mem.write(dest + pos, ZERO_CHUNK[:n])
                    pos += n
                self.offset = min(self.offset + length, len(data))
            elif control & F.FW_CFG_DMA_CTL_SKIP:
                self.offset = min(self.offset + length, len(self._item()))
        except GuestMemoryError:
            status = F.FW_CFG_DMA_CTL_ERROR
        if status:
            self.dma_errors += 1
        with contextlib.suppress(GuestMemoryError):  # the structure moved out: unreported
            self.mem.write(addr, struct.pack(">I", status))

    def metrics(self) -> dict[str, int]:
        return {"dma_transfers": self.dma_transfers, "dma_errors": self.dma_errors}


# --- registry entry ---------------------------------------------------------------------
@dataclass(kw_only=True)
class FwCfgConfig(DeviceConfig):
    file: list[str] = option(factory=list, doc="a user file: NAME=@PATH (its contents) or "
                             "NAME=TEXT; NAME under opt/ as QEMU asks")

    def check(self) -> None:
        for spec in self.file:
            name, eq, _ = spec.partition("=")
            if not eq or not name:
                raise ValueError(f"file {spec!r}: use NAME=@PATH or NAME=TEXT")
            if len(name.encode()) >= F.FW_CFG_MAX_FILE_PATH:
                raise ValueError(f"file name {name!r} is longer than "
                                 f"{F.FW_CFG_MAX_FILE_PATH - 1} bytes")
            if not name.startswith("opt/"):
                raise ValueError(f"file name {name!r}: user files go under opt/")

    def files(self) -> dict[str, bytes]:
        out: dict[str, bytes] = {}
        for spec in self.file:
            name, _, value = spec.partition("=")
            if name in out:
                raise ConfigError(f"fw-cfg: file {name!r} given twice")
            if value.startswith("@"):
                path = Path(value[1:])
                try:
                    if path.stat().st_size > MAX_FILE_BYTES:
                        raise ConfigError(f"fw-cfg: {path} is larger than "
                                          f"{MAX_FILE_BYTES >> 20} MiB")
                    out[name] = path.read_bytes()
                except OSError as e:
                    raise ConfigError(f"fw-cfg: cannot read {path}: {e.strerror}") from None
            else:
                out[name] = value.encode()
        return out

    def validate(self) -> None:
        self.files()  # every file readable before the VM is built


def create(cfg: FwCfgConfig, ctx: HostContext) -> FwCfg:
    e820 = b"".join(struct.pack("<QQI", a, n, t) for a, n, t in ctx.memory_map())
    ram = sum(r.size for r in ctx.mem.regions())
    items = {
        F.FW_CFG_SIGNATURE: b"QEMU",
        F.FW_CFG_ID: struct.pack("<I", F.FW_CFG_VERSION | F.FW_CFG_VERSION_DMA),
        F.FW_CFG_UUID: bytes(16),
        F.FW_CFG_RAM_SIZE: struct.pack("<Q", ram),
        F.FW_CFG_NOGRAPHIC: struct.pack("<H", 1),
        F.FW_CFG_NB_CPUS: struct.pack("<H", ctx.cpus()),
        F.FW_CFG_MAX_CPUS: struct.pack("<H", ctx.cpus()),
    }
    return FwCfg(ctx.mem, items, {"etc/e820": e820, **cfg.files()})


SPEC = DeviceSpec("fw-cfg", FwCfgConfig, Kind.ISA, create,
                  "QEMU's fw_cfg: signature, RAM size, CPUs, etc/e820, user files, DMA",
                  option="fw-cfg", isa=(IsaRange("pio", F.FW_CFG_IO_BASE, F.FW_CFG_IO_SIZE),
                                        IsaRange("pio", F.FW_CFG_DMA_IO_BASE,
                                                 F.FW_CFG_DMA_IO_SIZE)),
                  exportable=False, doc="fw-cfg")
