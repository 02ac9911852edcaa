"""Device memory the guest uses at memory speed while the host learns what changed.

A display's text buffer or framebuffer is written by the guest far more often than
anything reads it. Trapping every store (an MMIO exit each) would cost a round trip to
the VMM per pixel; instead the memory is a memfd the host maps into the guest (a KVM
memslot) with **dirty logging** on: the guest's stores run natively, and the host asks
which pages were written since it last asked (KVM_GET_DIRTY_LOG) when it wants to
render. This is the third way of intercepting a device besides port and MMIO traps.

``TrackedMemory`` is what a device holds; it does not know about KVM. Its host side is a
``DirtyLogMapper`` (the VMM's wraps KVM memslots): ``map`` places the memory at a guest
address with dirty logging, ``dirty`` returns the page bitmap since the last call,
``unmap`` removes it. Without a mapper (unit tests, the vfio-user export, or a guest
address the mapper refused) the guest's accesses arrive trapped through ``read`` and
``write``, which mark their pages themselves: the same answers, only slower, and the
``trapped`` counter tells the two apart.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from typing import Protocol

from pyvmm.errors import PyvmmError
from pyvmm.memory.guest_memory import sealed_memfd

PAGE = mmap.PAGESIZE


class DirtyLogMapper(Protocol):
    def map(self, gpa: int, size: int, host_addr: int) -> object:
        """Map ``size`` bytes at ``host_addr`` into the guest at ``gpa``, dirty-logged."""
        ...

    def unmap(self, handle: object) -> None: ...

    def dirty(self, handle: object) -> bytes:
        """One bit per page (LSB first) written by the guest since the last call."""
        ...


class TrackedMemory:
    def __init__(self, size: int, name: str = "pyvmm-tracked",
                 mapper: DirtyLogMapper | None = None) -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"tracked memory of {size:#x} bytes: a whole number of pages")
        self.size = size
        self.npages = size // PAGE
        self.fd = sealed_memfd(name, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.host_addr = ctypes.addressof(self._anchor)
        self.mapper = mapper
        self._handle: object | None = None
        self.mapped_at: int | None = None
        # Pages the host has not yet reported: all of them at first (nothing has been
        # rendered yet), then what trapped writes and host-side stores touched.
        self._pending = bytearray(b"\xff" * ((self.npages + 7) // 8))
        self._trim()
        # Counters (the device's report).
        self.trapped = 0  # guest accesses that reached the model instead of memory
        self.map_failures = 0
        self.dirty_queries = 0
        self.dirty_reported = 0  # pages reported dirty, summed over queries

    def _trim(self) -> None:
        extra = len(self._pending) * 8 - self.npages
        if extra:
            self._pending[-1] &= 0xFF >> extra

    # --- host side ------------------------------------------------------------------
    def moved(self, gpa: int | None) -> None:
        """Map at ``gpa`` (a BAR placed or moved, a window enabled), or unmap (None).
        After a move everything counts as dirty once: what the guest saw changed."""
        if self.mapper is None:
            return
        if self._handle is not None:
            self._pending_from_log()  # keep what the old mapping logged
            self.mapper.unmap(self._handle)
            self._handle, self.mapped_at = None, None
        if gpa is not None:
            try:
                self._handle = self.mapper.map(gpa, self.size, self.host_addr)
            except (PyvmmError, RuntimeError, OSError):
                self.map_failures += 1  # e.g. over RAM: the accesses trap instead
                return
            self.mapped_at = gpa
        self.touch(0, self.size)

    def _pending_from_log(self) -> None:
        if self.mapper is None or self._handle is None:
            return
        log = self.mapper.dirty(self._handle)
        for i in range(min(len(log), len(self._pending))):
            self._pending[i] |= log[i]

    def touch(self, offset: int, n: int) -> None:
        """Mark bytes the host itself wrote (a mode set clearing memory) as dirty."""
        if n <= 0:
            return
        first = max(0, offset) // PAGE
        last = min(self.size - 1, offset + n - 1) // PAGE
        for p in range(first, last + 1):
            self._pending[p >> 3] |= 1 << (p & 7)

    def dirty_pages(self) -> list[int]:
        """Page numbers written since the last call (the log is cleared by reading)."""
        self._pending_from_log()
        pages: list[int] = []
        for i, b in enumerate(self._pending):
            if b:
                pages.extend(i * 8 + j for j in range(8) if b >> j & 1)
        self._pending[:] = bytes(len(self._pending))
        self.dirty_queries += 1
        self.dirty_reported += len(pages)
        return pages

    def counters(self) -> dict[str, int]:
        return {"trapped": self.trapped, "map_failures": self.map_failures,
                "dirty_queries": self.dirty_queries, "dirty_pages": self.dirty_reported}

    # --- the trapped path (no mapping) -----------------------------------------------
    def read(self, offset: int, size: int) -> int:
        self.trapped += 1
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self.size:
            return (1 << (8 * max(0, min(size, 8)))) - 1
        return int.from_bytes(self.map[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        self.trapped += 1
        if size not in (1, 2, 4, 8) or offset < 0 or offset + size > self.size:
            return
        self.map[offset:offset + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(
            size, "little")
        self.touch(offset, size)

    def close(self) -> None:
        """Unmap and free; a second call does nothing (the device and its host may both
        close it)."""
        if self.fd < 0:
            return
        if self.mapper is not None and self._handle is not None:
            with contextlib.suppress(PyvmmError, OSError):
                self.mapper.unmap(self._handle)
        self._handle = None
        del self._anchor
        with contextlib.suppress(BufferError):
            self.map.close()
        os.close(self.fd)
        self.fd = -1
