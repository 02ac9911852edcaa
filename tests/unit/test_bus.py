from __future__ import annotations

import contextlib
import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pyvmm.bus import IoBus, MmioBus
from pyvmm.errors import BusError


class Reg:
    def __init__(self) -> None:
        self.log: list[tuple[str, int, int, int, int]] = []

    def read(self, base: int, offset: int, size: int) -> int:
        self.log.append(("r", base, offset, size, 0))
        return 0x11 * (offset + 1)

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        self.log.append(("w", base, offset, size, value))


def test_device_sees_base_and_offset_not_address() -> None:
    bus, dev = MmioBus(), Reg()
    bus.insert(dev, 0x1000, 0x100, "a")
    bus.insert(dev, 0x8000, 0x100, "b")
    assert bus.read(0x1004, 4) == 0x55
    bus.write(0x8010, 2, 0xBEEF)
    assert dev.log == [("r", 0x1000, 4, 4, 0), ("w", 0x8000, 0x10, 2, 0xBEEF)]


@pytest.mark.parametrize("base,size", [(0x10F0, 0x20), (0x0FF0, 0x11), (0x1000, 1), (0x0, 0x2000)])
def test_overlap_is_rejected(base: int, size: int) -> None:
    bus = MmioBus()
    bus.insert(Reg(), 0x1000, 0x100, "first")
    with pytest.raises(BusError, match="overlaps first"):
        bus.insert(Reg(), base, size)


def test_adjacent_ranges_and_remove() -> None:
    bus = IoBus()
    a, b = Reg(), Reg()
    bus.insert(a, 0x3F8, 8)
    bus.insert(b, 0x400, 8)
    assert bus.find(0x3FF).device is a  # type: ignore[union-attr]
    assert bus.find(0x400).device is b  # type: ignore[union-attr]
    bus.remove(0x3F8)
    assert bus.find(0x3FF) is None
    with pytest.raises(BusError):
        bus.remove(0x3F8)
    bus.insert(Reg(), 0x3F8, 8)  # the space is free again


def test_accounting_per_device_offset_and_kind() -> None:
    bus = IoBus()
    rng = bus.insert(Reg(), 0x3F8, 8, "serial0")
    for _ in range(3):
        bus.write(0x3F8, 1, 0x41)
    bus.read(0x3FD, 1)
    assert (rng.reads, rng.writes) == (1, 3)
    assert rng.count("w", 0, 1) == 3
    assert rng.count("r", 5, 1) == 1
    snap = bus.snapshot()
    assert snap["devices"][0]["writes"] == 3  # type: ignore[index]


@pytest.mark.parametrize("size,ones", [(1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)])
def test_unclaimed_reads_are_all_ones_and_counted(size: int, ones: int) -> None:
    for bus in (IoBus(), MmioBus()):
        assert bus.read(0x2F0, size) == ones
        assert bus.write(0x2F0, size, 1) is False
        assert bus.unclaimed[("r", 0x2F0)] == 1
        assert bus.unclaimed[("w", 0x2F0)] == 1


def test_pio_bus_rejects_ports_beyond_64k() -> None:
    with pytest.raises(BusError):
        IoBus().insert(Reg(), 0xFFFC, 8)


@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.integers(1, 0x400)), max_size=30),
       st.lists(st.integers(0, 0x10400), max_size=50))
def test_random_inserts_never_overlap_and_lookup_agrees(
    ranges: list[tuple[int, int]], probes: list[int]
) -> None:
    bus = MmioBus()
    for base, size in ranges:
        with contextlib.suppress(BusError):
            bus.insert(Reg(), base, size)
    rs = bus.ranges()
    for x, y in itertools.pairwise(rs):
        assert x.end <= y.base
    for p in probes:
        expect = [r for r in rs if r.base <= p < r.end]
        assert bus.find(p) is (expect[0] if expect else None)
