"""Test-exit port, compatible with QEMU's ``isa-debug-exit``.

A guest write of ``value`` ends the VM; the VMM process exits with
``(value << 1) | 1`` — the same code QEMU gives, so a test guest reports the same
result under both. Reads return 0. The guest can only end its own VM, which it
could do anyway.
"""

from __future__ import annotations

from collections.abc import Callable


class DebugExit:
    def __init__(self, on_exit: Callable[[int], None], size: int = 4) -> None:
        if size not in (1, 2, 4):
            raise ValueError("debug-exit size must be 1, 2 or 4")
        self.size = size
        self.on_exit = on_exit

    def read(self, base: int, offset: int, size: int) -> int:
        return 0

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        if offset == 0:
            v = value & ((1 << (8 * min(size, self.size))) - 1)
            self.on_exit(((v << 1) | 1) & 0xFFFFFFFF)
