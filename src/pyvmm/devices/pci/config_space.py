"""PCI configuration space as bytes plus masks, with BAR moves returned as data.

``data`` holds the registers, ``wmask`` the bits a guest may write, ``w1cmask`` the
bits a guest clears by writing 1 (status bits). BAR registers get their wmask from
the BAR size, so sizing (write all-ones, read back) falls out of the masks with no
special case. A write returns the list of :class:`BarChange` it caused — a BAR
moved, or decoding switched on or off through PCI_COMMAND — and the PCI root
applies them to the buses centrally; the device never touches a bus.
Capability handlers can ask to be told of writes to their bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.uapi import pci as P


@dataclass(frozen=True, slots=True)
class BarInfo:
    index: int
    size: int
    is_io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False

    @property
    def type_bits(self) -> int:
        if self.is_io:
            return P.PCI_BASE_ADDRESS_SPACE_IO
        return (P.PCI_BASE_ADDRESS_MEM_TYPE_64 if self.is_64bit else 0) | (
            P.PCI_BASE_ADDRESS_MEM_PREFETCH if self.prefetchable else 0)


@dataclass(frozen=True, slots=True)
class BarChange:
    """BAR ``index`` was decoded at ``old`` (None: not decoded) and now at ``new``."""

    index: int
    old: int | None
    new: int | None
    size: int
    is_io: bool


WriteHook = Callable[[int, int, int], None]  # (offset, size, value) after the write


class PCIConfigSpace:
    def __init__(self, vendor_id: int, device_id: int, class_code: int, *,
                 revision: int = 0, subsystem_vendor_id: int = 0, subsystem_id: int = 0,
                 header_type: int = P.PCI_HEADER_TYPE_NORMAL,
                 size: int = P.PCI_CFG_SPACE_SIZE) -> None:
        self.size = size
        self.data = bytearray(size)
        self.wmask = bytearray(size)
        self.w1cmask = bytearray(size)
        self.bars: list[BarInfo | None] = [None] * P.PCI_STD_NUM_BARS
        self._hooks: list[tuple[int, int, WriteHook]] = []
        self._cap_tail: int | None = None
        self._next_cap = P.PCI_STD_HEADER_SIZEOF
        self.set16(P.PCI_VENDOR_ID, vendor_id)
        self.set16(P.PCI_DEVICE_ID, device_id)
        self.data[P.PCI_REVISION_ID] = revision
        self.data[P.PCI_CLASS_PROG:P.PCI_CLASS_PROG + 3] = class_code.to_bytes(3, "little")
        self.data[P.PCI_HEADER_TYPE] = header_type
        self.set16(P.PCI_SUBSYSTEM_VENDOR_ID, subsystem_vendor_id)
        self.set16(P.PCI_SUBSYSTEM_ID, subsystem_id)
        self._set_wmask16(P.PCI_COMMAND, P.PCI_COMMAND_IO | P.PCI_COMMAND_MEMORY
                          | P.PCI_COMMAND_MASTER | P.PCI_COMMAND_SERR
                          | P.PCI_COMMAND_INTX_DISABLE)
        self.w1cmask[P.PCI_STATUS + 1] = P.PCI_STATUS_DETECTED_PARITY >> 8
        self.wmask[P.PCI_CACHE_LINE_SIZE] = 0xFF
        self.wmask[P.PCI_LATENCY_TIMER] = 0xFF
        self.wmask[P.PCI_INTERRUPT_LINE] = 0xFF

    # --- building (the VMM's side) ---------------------------------------------------
    def set16(self, off: int, v: int) -> None:
        struct.pack_into("<H", self.data, off, v & 0xFFFF)

    def set32(self, off: int, v: int) -> None:
        struct.pack_into("<I", self.data, off, v & 0xFFFFFFFF)

    def get16(self, off: int) -> int:
        return int(struct.unpack_from("<H", self.data, off)[0])

    def get32(self, off: int) -> int:
        return int(struct.unpack_from("<I", self.data, off)[0])

    def _set_wmask16(self, off: int, m: int) -> None:
        struct.pack_into("<H", self.wmask, off, m)

    def _set_wmask32(self, off: int, m: int) -> None:
        struct.pack_into("<I", self.wmask, off, m & 0xFFFFFFFF)

    def add_bar(self, index: int, size: int, *, is_io: bool = False, is_64bit: bool = False,
                prefetchable: bool = False) -> BarInfo:
        if not 0 <= index < P.PCI_STD_NUM_BARS or (is_64bit and index == 5):
            raise ValueError(f"BAR index {index} not available")
        if size & (size - 1) or size < (4 if is_io else 16):
            raise ValueError(f"BAR size {size:#x} must be a power of two (>= 16, IO >= 4)")
        if self.bars[index] is not None or (index and self._is_upper_half(index)):
            raise ValueError(f"BAR {index} already in use")
        bar = BarInfo(index, size, is_io, is_64bit and not is_io, prefetchable and not is_io)
        self.bars[index] = bar
        off = P.PCI_BASE_ADDRESS_0 + 4 * index
        self.set32(off, bar.type_bits)
        low_mask = ~(size - 1) & (0xFFFFFFFC if is_io else 0xFFFFFFF0)
        self._set_wmask32(off, low_mask)
        if bar.is_64bit:
            self._set_wmask32(off + 4, ~((size - 1) >> 32))
        return bar

    def _is_upper_half(self, index: int) -> bool:
        prev = self.bars[index - 1]
        return prev is not None and prev.is_64bit

    def add_capability(self, cap_id: int, body: bytes, body_wmask: bytes | None = None,
                       hook: WriteHook | None = None) -> int:
        """Append a capability (``body`` follows the ID/next bytes); returns its offset."""
        length = 2 + len(body)
        off = (self._next_cap + 3) & ~3
        if off + length > P.PCI_CFG_SPACE_SIZE:
            raise ValueError("no room for the capability in config space")
        self.data[off] = cap_id
        self.data[off + 1] = 0
        self.data[off + 2:off + length] = body
        if body_wmask is not None:
            self.wmask[off + 2:off + 2 + len(body_wmask)] = body_wmask
        if self._cap_tail is None:
            self.data[P.PCI_CAPABILITY_LIST] = off
        else:
            self.data[self._cap_tail + 1] = off
        self._cap_tail = off
        self._next_cap = off + length
        self.set16(P.PCI_STATUS, self.get16(P.PCI_STATUS) | P.PCI_STATUS_CAP_LIST)
        if hook is not None:
            self._hooks.append((off, off + length, hook))
        return off

    # --- state the root and device read ------------------------------------------
    @property
    def command(self) -> int:
        return self.get16(P.PCI_COMMAND)

    def bar_address(self, index: int) -> int:
        bar = self.bars[index]
        assert bar is not None
        off = P.PCI_BASE_ADDRESS_0 + 4 * index
        addr = self.get32(off) & (~0x3 if bar.is_io else ~0xF) & 0xFFFFFFFF
        if bar.is_64bit:
            addr |= self.get32(off + 4) << 32
        return addr

    def decoded(self) -> dict[int, int | None]:
        """BAR index -> address it decodes now (None: decoding off or unassigned)."""
        cmd = self.command
        out: dict[int, int | None] = {}
        for bar in self.bars:
            if bar is None:
                continue
            on = cmd & (P.PCI_COMMAND_IO if bar.is_io else P.PCI_COMMAND_MEMORY)
            addr = self.bar_address(bar.index)
            out[bar.index] = addr if on and addr else None
        return out

    def set_bar_address(self, index: int, addr: int) -> None:
        """Firmware-style assignment by the VMM (not a guest write)."""
        bar = self.bars[index]
        assert bar is not None
        off = P.PCI_BASE_ADDRESS_0 + 4 * index
        self.set32(off, (addr & 0xFFFFFFFF & ~(bar.size - 1)) | bar.type_bits)
        if bar.is_64bit:
            self.set32(off + 4, addr >> 32)

    # --- guest access ------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if size not in (1, 2, 4) or offset < 0 or offset + size > self.size:
            return (1 << (8 * max(1, min(size, 4)))) - 1
        return int.from_bytes(self.data[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> list[BarChange]:
        """Apply a guest write through the masks; returns the BAR changes it caused."""
        if size not in (1, 2, 4) or offset < 0 or offset + size > self.size:
            return []
        before = self.decoded()
        for i in range(size):
            b = (value >> (8 * i)) & 0xFF
            o = offset + i
            wm, w1c = self.wmask[o], self.w1cmask[o]
            self.data[o] = (self.data[o] & ~wm & 0xFF) | (b & wm)
            self.data[o] &= ~(b & w1c) & 0xFF
        for start, end, hook in self._hooks:
            if offset < end and start < offset + size:
                hook(offset, size, value)
        after = self.decoded()
        changes = []
        for index, old in before.items():
            new = after[index]
            if new != old:
                bar = self.bars[index]
                assert bar is not None
                changes.append(BarChange(index, old, new, bar.size, bar.is_io))
        return changes
