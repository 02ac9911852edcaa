"""Guest-physical memory as the VMM and its device models see it.

Each region is a memfd mapped MAP_SHARED, so another process (a vhost-user or
vfio-user backend) can map the same pages from the fd. Its size is sealed
(F_SEAL_SHRINK | F_SEAL_GROW), which such a process requires: a peer that could
shrink a file it mapped could make every later access a SIGBUS. The same holds the
other way round: ``add_mapped`` maps another process's fd only if it is sealed
against shrinking and long enough. Devices use the consumer API
only — ``read``, ``write``, ``view`` — and every access is bounds-checked: a guest
address outside RAM raises :class:`GuestMemoryError`, which a device turns into a
failed request, never into a crash.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import fcntl
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from pyvmm.errors import GuestMemoryError


def sealed_memfd(name: str, size: int) -> int:
    """A memfd of ``size`` bytes that can neither shrink nor grow: safe to hand to a
    process that maps it (and what pyvmm requires of the fds it is handed)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
    except OSError:
        os.close(fd)
        raise
    return fd


def check_mappable(fd: int, offset: int, size: int) -> None:
    """GuestMemoryError unless another process's ``fd`` is safe to map ``size`` bytes of
    at ``offset``: sealed against shrinking (else the owner can truncate it under our
    mapping, and the next access is SIGBUS) and at least ``offset + size`` long.
    QEMU's ``memory-backend-memfd`` seals by default; a plain file cannot be sealed."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        seals = 0  # not a memfd (a file on disk, a device): it cannot be sealed
    if not seals & fcntl.F_SEAL_SHRINK:
        raise GuestMemoryError("shared memory fd is not sealed against shrinking "
                               "(F_SEAL_SHRINK): use a sealed memfd (memory-backend-memfd)")
    try:
        length = os.fstat(fd).st_size
    except OSError as e:
        raise GuestMemoryError(f"shared memory fd: {e.strerror}") from None
    if size <= 0 or offset < 0 or offset + size > length:
        raise GuestMemoryError(f"{size:#x} bytes at offset {offset:#x} do not fit a shared "
                               f"memory fd of {length:#x} bytes")


@dataclass(eq=False)
class GuestRegion:
    guest_addr: int
    size: int
    fd: int
    map: mmap.mmap
    name: str = "ram"
    map_offset: int = 0  # where the region starts inside ``map`` (vhost-user mmap_offset)
    host_addr: int = field(init=False)

    def __post_init__(self) -> None:
        # The address KVM_SET_USER_MEMORY_REGION needs. from_buffer keeps an export
        # on the mmap for the region's lifetime, which is what we want.
        self._anchor = ctypes.c_char.from_buffer(self.map)
        self.host_addr = ctypes.addressof(self._anchor) + self.map_offset

    @property
    def end(self) -> int:
        return self.guest_addr + self.size


class GuestMemory:
    """A sorted set of non-overlapping RAM regions."""

    def __init__(self, layout: Sequence[tuple[int, int]] = (), name: str = "pyvmm-ram") -> None:
        self._regions: list[GuestRegion] = []
        self._starts: list[int] = []
        for gpa, size in layout:
            self.add_region(gpa, size, name)

    def add_region(self, guest_addr: int, size: int, name: str = "pyvmm-ram") -> GuestRegion:
        if size <= 0 or size % mmap.PAGESIZE or guest_addr % mmap.PAGESIZE:
            raise GuestMemoryError(f"region {guest_addr:#x}+{size:#x} is not page-aligned")
        for r in self._regions:
            if guest_addr < r.end and r.guest_addr < guest_addr + size:
                raise GuestMemoryError(f"region {guest_addr:#x}+{size:#x} overlaps {r.name}")
        fd = sealed_memfd(name, size)
        try:
            m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except OSError:
            os.close(fd)
            raise
        region = GuestRegion(guest_addr, size, fd, m, name)
        i = bisect.bisect(self._starts, guest_addr)
        self._regions.insert(i, region)
        self._starts.insert(i, guest_addr)
        return region

    def add_mapped(self, guest_addr: int, size: int, fd: int, file_offset: int,
                   name: str = "shared") -> GuestRegion:
        """Map another process's guest RAM from its fd (vhost-user SET_MEM_TABLE,
        vfio-user DMA_MAP). On success the region owns ``fd``; on GuestMemoryError it
        stays the caller's. ``file_offset`` need not be aligned. The fd must pass
        ``check_mappable``, which also bounds size and offset below 2^63."""
        check_mappable(fd, file_offset, size)
        for r in self._regions:
            if guest_addr < r.end and r.guest_addr < guest_addr + size:
                raise GuestMemoryError(f"region {guest_addr:#x}+{size:#x} overlaps {r.name}")
        start = file_offset & ~(mmap.PAGESIZE - 1)
        try:
            m = mmap.mmap(fd, file_offset - start + size, mmap.MAP_SHARED,
                          mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        except (OSError, ValueError, OverflowError) as e:
            raise GuestMemoryError(f"cannot map region {guest_addr:#x}+{size:#x}: {e}") from None
        region = GuestRegion(guest_addr, size, fd, m, name, map_offset=file_offset - start)
        i = bisect.bisect(self._starts, guest_addr)
        self._regions.insert(i, region)
        self._starts.insert(i, guest_addr)
        return region

    def remove_region(self, guest_addr: int) -> GuestRegion:
        """Unmap the region starting at ``guest_addr`` (vfio-user DMA_UNMAP)."""
        for i, r in enumerate(self._regions):
            if r.guest_addr == guest_addr:
                del self._regions[i]
                del self._starts[i]
                del r._anchor
                with contextlib.suppress(BufferError):
                    r.map.close()
                os.close(r.fd)
                return r
        raise GuestMemoryError(f"no region starts at {guest_addr:#x}")

    def regions(self) -> Iterator[GuestRegion]:
        return iter(self._regions)

    @property
    def total_size(self) -> int:
        return sum(r.size for r in self._regions)

    def close(self) -> None:
        for r in self._regions:
            del r._anchor
            # A device may still hold a view; then the mapping goes with the last one.
            with contextlib.suppress(BufferError):
                r.map.close()
            os.close(r.fd)
        self._regions.clear()
        self._starts.clear()

    # --- consumer API --------------------------------------------------------------
    def _locate(self, addr: int, n: int) -> tuple[GuestRegion, int]:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0 and n >= 0:
            r = self._regions[i]
            off = addr - r.guest_addr
            if off + n <= r.size:
                return r, off + r.map_offset
        raise GuestMemoryError(f"guest range {addr:#x}+{n:#x} is not in guest RAM")

    def contains(self, addr: int, n: int = 1) -> bool:
        try:
            self._locate(addr, n)
        except GuestMemoryError:
            return False
        return True

    def view(self, addr: int, n: int) -> memoryview:
        """A zero-copy view of ``n`` bytes; the range must lie within one region."""
        r, off = self._locate(addr, n)
        return memoryview(r.map)[off : off + n]

    def read(self, addr: int, n: int) -> bytes:
        r, off = self._locate(addr, n)
        return r.map[off : off + n]

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        r, off = self._locate(addr, len(data))
        r.map[off : off + len(data)] = data

    def read_int(self, addr: int, size: int) -> int:
        return int.from_bytes(self.read(addr, size), "little")

    def write_int(self, addr: int, size: int, value: int) -> None:
        self.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
