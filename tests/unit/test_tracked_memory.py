"""TrackedMemory without KVM: trapped writes and host stores mark their pages, a query
clears them, a mapper's log is merged in, and a move reports everything once."""

from __future__ import annotations

import pytest

from pyvmm.machine.layout import VGA_WINDOW_BASE, VGA_WINDOW_SIZE, ram_layout
from pyvmm.memory import TrackedMemory
from pyvmm.memory.tracked import PAGE


class FakeLog:
    """A DirtyLogMapper whose bitmap the test sets, as KVM's log would be."""

    def __init__(self) -> None:
        self.mapped: list[int] = []
        self.bitmap = b""
        self.fail_at: int | None = None

    def map(self, gpa: int, size: int, host_addr: int) -> object:
        if gpa == self.fail_at:
            raise OSError(17, "overlaps")
        self.mapped.append(gpa)
        return gpa

    def unmap(self, handle: object) -> None:
        self.mapped.remove(handle)  # type: ignore[arg-type]

    def dirty(self, handle: object) -> bytes:
        b, self.bitmap = self.bitmap, b""
        return b


def test_everything_is_dirty_once_then_only_what_was_written() -> None:
    t = TrackedMemory(8 * PAGE)
    assert t.dirty_pages() == list(range(8))
    assert t.dirty_pages() == []
    t.write(3 * PAGE + 10, 4, 0xDEADBEEF)
    t.write(PAGE - 1, 1, 0x55)
    assert t.read(3 * PAGE + 10, 4) == 0xDEADBEEF
    assert t.dirty_pages() == [0, 3]
    t.touch(PAGE * 6 - 1, 2)  # straddles pages 5 and 6
    assert t.dirty_pages() == [5, 6]
    assert t.trapped == 3 and t.counters()["dirty_pages"] == 8 + 2 + 2
    t.close()


def test_out_of_range_trapped_accesses_are_ignored() -> None:
    t = TrackedMemory(PAGE)
    t.dirty_pages()
    t.write(PAGE - 2, 4, 0xFFFFFFFF)
    t.write(-1, 1, 1)
    t.write(0, 3, 1)
    assert t.read(PAGE, 1) == 0xFF and t.read(0, 3) == 0xFFFFFF
    assert t.dirty_pages() == [] and bytes(t.map) == bytes(PAGE)
    t.close()


def test_mapper_log_is_merged_and_a_move_reports_all_once() -> None:
    log = FakeLog()
    t = TrackedMemory(16 * PAGE, mapper=log)
    t.moved(0x1000_0000)
    assert log.mapped == [0x1000_0000]
    assert t.dirty_pages() == list(range(16))
    log.bitmap = bytes([0b1000_0001, 0b0000_0100])
    assert t.dirty_pages() == [0, 7, 10]
    log.bitmap = bytes([0b10])
    t.moved(0x2000_0000)  # the old slot's log is kept, and a move dirties everything
    assert log.mapped == [0x2000_0000]
    assert t.dirty_pages() == list(range(16))
    log.fail_at = 0x3000_0000
    t.moved(0x3000_0000)
    assert t.map_failures == 1 and t.mapped_at is None and log.mapped == []
    t.close()


def test_size_must_be_pages() -> None:
    with pytest.raises(ValueError):
        TrackedMemory(100)


def test_ram_layout_leaves_the_vga_window_out_when_asked() -> None:
    hole = ((VGA_WINDOW_BASE, VGA_WINDOW_SIZE),)
    assert ram_layout(64 << 20, hole) == [(0, 0xA0000), (0xC0000, (64 << 20) - 0xC0000)]
    assert ram_layout(4 << 30, hole)[-1] == (1 << 32, (4 << 30) - 0xC0000000)
    with pytest.raises(ValueError):
        ram_layout(64 << 20, ((0x200000, 0x1000),))
