"""pyvmm test device: a small MMIO window for exit benchmarks and bus tests.

Offset 0 is a 32-bit data register (write stores, read returns it); offset 4 counts
writes to offset 0; everything else reads 0 and ignores writes. Any guest access is
harmless.
"""

from __future__ import annotations

TESTDEV_SIZE = 0x1000


class TestDev:
    __test__ = False  # not a pytest class despite the name
    def __init__(self) -> None:
        self.data = 0
        self.writes = 0

    def read(self, base: int, offset: int, size: int) -> int:
        if offset == 0:
            return self.data & ((1 << (8 * size)) - 1)
        if offset == 4:
            return self.writes & ((1 << (8 * size)) - 1)
        return 0

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        if offset == 0:
            self.data = value
            self.writes += 1
