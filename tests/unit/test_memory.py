from __future__ import annotations

import mmap
import os

import pytest

from pyvmm.errors import GuestMemoryError
from pyvmm.machine.layout import ram_layout
from pyvmm.memory import GuestMemory

MiB = 1 << 20


def test_read_write_view_roundtrip() -> None:
    with GuestMemory([(0, 2 * MiB)]) as mem:
        mem.write(0x1000, b"abcdef")
        assert mem.read(0x1000, 6) == b"abcdef"
        v = mem.view(0x1002, 2)
        v[:] = b"XY"
        assert mem.read(0x1000, 6) == b"abXYef"
        mem.write_int(0x2000, 4, 0x11223344)
        assert mem.read(0x2000, 4) == bytes([0x44, 0x33, 0x22, 0x11])
        assert mem.read_int(0x2000, 2) == 0x3344


@pytest.mark.parametrize("addr,n", [(2 * MiB, 1), (2 * MiB - 2, 4), (-1, 1), (0, 2 * MiB + 1),
                                    (0x10_0000_0000, 8)])
def test_out_of_range_raises(addr: int, n: int) -> None:
    with GuestMemory([(0, 2 * MiB)]) as mem:
        with pytest.raises(GuestMemoryError):
            mem.read(addr, n)
        with pytest.raises(GuestMemoryError):
            mem.write(addr, b"x" * n)
        assert not mem.contains(addr, n)


def test_access_may_not_span_the_hole_between_regions() -> None:
    with GuestMemory([(0, 2 * MiB), (4 * MiB, 2 * MiB)]) as mem:
        mem.write(4 * MiB, b"z")
        with pytest.raises(GuestMemoryError):
            mem.read(2 * MiB - 1, 2)
        with pytest.raises(GuestMemoryError):
            mem.read(3 * MiB, 1)


def test_overlapping_or_unaligned_regions_rejected() -> None:
    with GuestMemory([(0, 2 * MiB)]) as mem:
        with pytest.raises(GuestMemoryError):
            mem.add_region(MiB, 2 * MiB)
        with pytest.raises(GuestMemoryError):
            mem.add_region(8 * MiB, 100)


def test_memory_is_shareable_through_its_fd() -> None:
    """Another mapping of the memfd (as a vhost-user backend makes) sees guest writes."""
    with GuestMemory([(0, 2 * MiB)]) as mem:
        region = next(mem.regions())
        other = mmap.mmap(os.dup(region.fd), region.size)
        mem.write(0x3000, b"shared")
        assert other[0x3000:0x3006] == b"shared"
        other[0x4000:0x4002] = b"ok"
        assert mem.read(0x4000, 2) == b"ok"
        other.close()


def test_ram_layout_remaps_above_the_pci_hole() -> None:
    assert ram_layout(64 * MiB) == [(0, 64 * MiB)]
    lay = ram_layout(4096 * MiB)
    assert lay[0] == (0, 0xC0000000)
    assert lay[1] == (1 << 32, 4096 * MiB - 0xC0000000)
