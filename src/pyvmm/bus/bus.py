"""A bus maps sorted, non-overlapping address ranges to devices.

A device sees the base of the range it was inserted at and an offset into it, never
an absolute address, so the same device can sit at several places (two UARTs) and
be moved (a PCI BAR) without knowing. Every access is counted on the range that
served it — by access kind and offset — so "which device made the VM exit, and
where" is always answerable while the VM runs. Accesses no device claims are
counted per address on the bus; reads of them return all-ones, as on a PC.
"""

from __future__ import annotations

import bisect
import threading
from collections import Counter
from typing import Protocol, runtime_checkable

from pyvmm.errors import BusError


@runtime_checkable
class BusDevice(Protocol):
    """What a bus calls. Values are little-endian integers of ``size`` bytes."""

    def read(self, base: int, offset: int, size: int) -> int: ...

    def write(self, base: int, offset: int, size: int, value: int) -> None: ...


class BusRange:
    """One device's window on a bus, with its access counters."""

    __slots__ = ("base", "counts", "device", "end", "name", "reads", "size", "writes")

    def __init__(self, device: BusDevice, base: int, size: int, name: str) -> None:
        self.device = device
        self.base = base
        self.size = size
        self.end = base + size
        self.name = name
        self.reads = 0
        self.writes = 0
        # Packed key -> count: offset << 4 | size << 1 | is_write. An int key keeps
        # the per-exit work to one dict update with no tuple allocated (see
        # ARCHITECTURE.md, "Known costs"); ``access_counts`` unpacks it.
        self.counts: dict[int, int] = {}

    def snapshot(self) -> dict[str, object]:
        return {
            "name": self.name,
            "base": self.base,
            "size": self.size,
            "reads": self.reads,
            "writes": self.writes,
            "accesses": [
                {"kind": k, "offset": o, "size": s, "count": c}
                for (k, o, s), c in sorted(self.access_counts().items())
            ],
        }

    def access_counts(self) -> dict[tuple[str, int, int], int]:
        """Counts keyed by (kind, offset, size), kind "r" or "w"."""
        return {("w" if k & 1 else "r", k >> 4, (k >> 1) & 7): c for k, c in self.counts.items()}

    def count(self, kind: str, offset: int, size: int) -> int:
        return self.counts.get(offset << 4 | size << 1 | (kind == "w"), 0)


class Bus:
    """Sorted ranges, bisect lookup. Insert/remove are locked; lookups are not, since
    the range list is replaced wholesale (copy-on-write) and reads see either the old
    or the new list."""

    kind = "bus"

    def __init__(self, name: str | None = None) -> None:
        self.name = name or self.kind
        self._ranges: list[BusRange] = []
        self._starts: list[int] = []
        self._lock = threading.Lock()
        self.unclaimed: Counter[tuple[str, int]] = Counter()

    # --- topology ------------------------------------------------------------------
    def insert(self, device: BusDevice, base: int, size: int, name: str | None = None) -> BusRange:
        if size <= 0 or base < 0:
            raise BusError(f"{self.name}: bad range {base:#x}+{size:#x}")
        nm = name or type(device).__name__
        with self._lock:
            for r in self._ranges:
                if base < r.end and r.base < base + size:
                    raise BusError(
                        f"{self.name}: {nm} at {base:#x}+{size:#x} overlaps {r.name} at "
                        f"{r.base:#x}+{r.size:#x}"
                    )
            rng = BusRange(device, base, size, nm)
            ranges = sorted([*self._ranges, rng], key=lambda r: r.base)
            self._starts = [r.base for r in ranges]
            self._ranges = ranges
            self._on_change()
        return rng

    def remove(self, base: int) -> BusRange:
        with self._lock:
            for r in self._ranges:
                if r.base == base:
                    ranges = [x for x in self._ranges if x is not r]
                    self._starts = [x.base for x in ranges]
                    self._ranges = ranges
                    self._on_change()
                    return r
        raise BusError(f"{self.name}: no range at {base:#x}")

    def _on_change(self) -> None:
        """Hook for subclasses that keep a faster index."""

    def ranges(self) -> list[BusRange]:
        return list(self._ranges)

    def find(self, addr: int) -> BusRange | None:
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            r = self._ranges[i]
            if addr < r.end:
                return r
        return None

    # --- access --------------------------------------------------------------------
    def read(self, addr: int, size: int) -> int:
        """The value read; all-ones where no device claims ``addr`` (as a PC's bus
        reads with nobody driving it)."""
        r = self.find(addr)
        if r is None:
            self.unclaimed["r", addr] += 1
            return (1 << (8 * size)) - 1
        off = addr - r.base
        r.reads += 1
        key = off << 4 | size << 1
        counts = r.counts
        counts[key] = counts.get(key, 0) + 1
        return r.device.read(r.base, off, size)

    def write(self, addr: int, size: int, value: int) -> bool:
        """True if a device took the write."""
        r = self.find(addr)
        if r is None:
            self.unclaimed["w", addr] += 1
            return False
        off = addr - r.base
        r.writes += 1
        key = off << 4 | size << 1 | 1
        counts = r.counts
        counts[key] = counts.get(key, 0) + 1
        r.device.write(r.base, off, size, value)
        return True

    def snapshot(self) -> dict[str, object]:
        return {
            "bus": self.name,
            "devices": [r.snapshot() for r in self._ranges],
            "unclaimed": [
                {"kind": k, "addr": a, "count": c} for (k, a), c in sorted(self.unclaimed.items())
            ],
        }


class IoBus(Bus):
    """x86 port I/O space: 64 KiB of ports, with a direct per-port table for O(1) lookup."""

    kind = "pio"
    PORTS = 0x10000

    def __init__(self, name: str | None = None) -> None:
        self._table: list[BusRange | None] = [None] * self.PORTS
        super().__init__(name)

    def insert(self, device: BusDevice, base: int, size: int, name: str | None = None) -> BusRange:
        if base + size > self.PORTS:
            raise BusError(f"{self.name}: ports {base:#x}+{size:#x} beyond 0xffff")
        return super().insert(device, base, size, name)

    def _on_change(self) -> None:
        table: list[BusRange | None] = [None] * self.PORTS
        for r in self._ranges:
            for p in range(r.base, r.end):
                table[p] = r
        self._table = table

    def find(self, addr: int) -> BusRange | None:
        return self._table[addr] if 0 <= addr < self.PORTS else None


class MmioBus(Bus):
    """Guest-physical addresses with no RAM behind them."""

    kind = "mmio"
