"""A memory BAR backed by shared memory (ivshmem-style), mapped straight into the guest.

The BAR's contents are a memfd. Where the host can map it — a KVM memslot at the BAR's
address in the VMM, an mmap'able region over vfio-user — the guest reads and writes it
with no exit and no message: the device is outside the trap path, and the device
model sees the same bytes through its own mapping. Where it cannot (unit tests,
`pyvmm info`, a client that does not map), accesses arrive as trapped BAR accesses
and are served from the same memory, so behaviour is the same, only slower; the
trapped accesses are counted, which is how a test tells the two apart.

``BarMapper`` is the host's side: ``map(gpa, size, host_addr)`` returns a handle,
``unmap(handle)`` removes it. The device calls ``moved(new)`` whenever the guest
moves the BAR or switches decoding, so the mapping follows the BAR.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from typing import Protocol

from pyvmm.errors import PyvmmError
from pyvmm.memory import sealed_memfd


class BarMapper(Protocol):
    def map(self, gpa: int, size: int, host_addr: int) -> object: ...

    def unmap(self, handle: object) -> None: ...


class SharedMemoryBar:
    def __init__(self, size: int, name: str = "pyvmm-shm-bar") -> None:
        self.size = size
        # Sealed at its size: a vfio-user client maps it, and may hand it back in a
        # DMA_MAP (QEMU maps the BAR for peer-to-peer), which requires the seal.
        self.fd = sealed_memfd(name, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.host_addr = ctypes.addressof(self._anchor)
        self.mapper: BarMapper | None = None
        self._handle: object | None = None
        self.mapped_at: int | None = None
        self.trapped = 0  # accesses that reached the device model instead
        self.map_failures = 0

    def moved(self, new: int | None) -> None:
        if self.mapper is None:
            return
        if self._handle is not None:
            self.mapper.unmap(self._handle)
            self._handle, self.mapped_at = None, None
        if new is not None:
            try:
                self._handle = self.mapper.map(new, self.size, self.host_addr)
            except (PyvmmError, RuntimeError, OSError):
                self.map_failures += 1  # e.g. the guest put the BAR over RAM: it traps
                return
            self.mapped_at = new

    def read(self, offset: int, size: int) -> int:
        self.trapped += 1
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self.size:
            return 0
        return int.from_bytes(self.map[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.trapped += 1
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self.size:
            return
        self.map[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")

    def close(self) -> None:
        if self.mapper is not None and self._handle is not None:
            self.mapper.unmap(self._handle)
        self._handle = None
        del self._anchor
        self.map.close()
        os.close(self.fd)
