"""MSI-X (PCI Local Bus 3.0 §6.8.2): capability in config space, table and PBA in a BAR.

One reusable object: a device gives it a BAR index and offsets, routes that BAR's
accesses in the table/PBA range to ``read``/``write``, and calls ``trigger(n)``.
Masking follows the spec: a vector that fires while masked (entry mask or function
mask) sets its PBA bit and is sent when unmasked. Accesses outside the table, of
odd sizes, or to the read-only PBA are ignored and counted; a message to an address
outside the LAPIC window is dropped by the irqchip.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pyvmm.devices.pci.config_space import PCIConfigSpace
from pyvmm.irq.msi import EventfdSink, MsiMessage, MsiSink, vector_sinks
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import pci as P


class MsixCapability:
    def __init__(self, config: PCIConfigSpace, sink: MsiSink, vectors: int, bar: int,
                 table_offset: int = 0, pba_offset: int | None = None) -> None:
        if not 1 <= vectors <= 2048:
            raise ValueError("MSI-X supports 1..2048 vectors")
        self.config, self.vectors, self.bar = config, vectors, bar
        self._sinks = vector_sinks(sink, vectors)  # irqfd per vector where the chip has it
        self.table_offset = table_offset
        table_size = vectors * P.PCI_MSIX_ENTRY_SIZE
        self.pba_offset = pba_offset if pba_offset is not None else (
            (table_offset + table_size + 7) & ~7)
        self.table = bytearray(table_size)
        for n in range(vectors):  # entries start masked (spec)
            self._set_ctrl(n, P.PCI_MSIX_ENTRY_CTRL_MASKBIT)
        self.pba = bytearray(((vectors + 63) // 64) * 8)
        self.bad_accesses = 0
        self.errors = OnceLog()
        # Set when the device is exported (vfio-user): the client emulates the table and
        # hands us one eventfd per vector, so a trigger goes straight to it.
        self.direct: Callable[[int], bool] | None = None
        # Vectors whose eventfd was handed out (``irqfd``): their route follows the table.
        self._exported: set[int] = set()
        body = struct.pack("<HII", vectors - 1, table_offset | bar, self.pba_offset | bar)
        wmask = struct.pack("<HII", P.PCI_MSIX_FLAGS_ENABLE | P.PCI_MSIX_FLAGS_MASKALL, 0, 0)
        self.off = config.add_capability(P.PCI_CAP_ID_MSIX, body, wmask, self._on_cfg_write)

    @property
    def region_end(self) -> int:
        return self.pba_offset + len(self.pba)

    @property
    def flags(self) -> int:
        return self.config.get16(self.off + P.PCI_MSIX_FLAGS)

    @property
    def enabled(self) -> bool:
        return bool(self.flags & P.PCI_MSIX_FLAGS_ENABLE)

    @property
    def function_masked(self) -> bool:
        return bool(self.flags & P.PCI_MSIX_FLAGS_MASKALL)

    def _ctrl(self, n: int) -> int:
        return int(struct.unpack_from("<I", self.table, n * 16 + 12)[0])

    def _set_ctrl(self, n: int, v: int) -> None:
        struct.pack_into("<I", self.table, n * 16 + 12, v)

    def masked(self, n: int) -> bool:
        return self.function_masked or bool(self._ctrl(n) & P.PCI_MSIX_ENTRY_CTRL_MASKBIT)

    def pending(self, n: int) -> bool:
        return bool(self.pba[n // 8] & (1 << (n % 8)))

    def message(self, n: int) -> MsiMessage:
        lo, hi, data = struct.unpack_from("<III", self.table, n * 16)
        return MsiMessage(lo | (hi << 32), data)

    def trigger(self, n: int) -> bool:
        if self.direct is not None:
            return self.direct(n)
        if not self.enabled or not 0 <= n < self.vectors:
            return False
        if self.masked(n):
            self.pba[n // 8] |= 1 << (n % 8)
            return False
        self._sinks[n].send_msi(self.message(n))
        return True

    def irqfd(self, n: int) -> int | None:
        """The eventfd that raises vector ``n`` through KVM when written (its irqfd),
        routed to the entry's current message, or None where the chip has none
        (``--msi signal``, a test sink, a vfio-user export). From now on the route
        follows the table entry. **Not honoured:** the entry's and the function's mask —
        a writer of the eventfd interrupts a masked vector (docs/devices/
        vhost-user-frontend.md: QEMU detaches the irqfd while masked; pyvmm does not)."""
        if self.direct is not None or not 0 <= n < self.vectors:
            return None
        sink = self._sinks[n]
        if not isinstance(sink, EventfdSink):
            return None
        self._exported.add(n)
        return sink.eventfd(self.message(n))

    def _reroute(self, first: int, last: int) -> None:
        for n in range(first, last + 1):
            sink = self._sinks[n]
            if n in self._exported and isinstance(sink, EventfdSink):
                sink.route(self.message(n))

    def _deliver_pending(self) -> None:
        if not self.enabled:
            return
        for n in range(self.vectors):
            if self.pending(n) and not self.masked(n):
                self.pba[n // 8] &= ~(1 << (n % 8)) & 0xFF
                self._sinks[n].send_msi(self.message(n))

    def _on_cfg_write(self, offset: int, size: int, value: int) -> None:
        self._deliver_pending()

    # --- BAR side ------------------------------------------------------------------
    def contains(self, offset: int) -> bool:
        return self.table_offset <= offset < self.table_offset + len(self.table) or (
            self.pba_offset <= offset < self.region_end)

    def read(self, offset: int, size: int) -> int:
        for base, buf in ((self.table_offset, self.table), (self.pba_offset, self.pba)):
            rel = offset - base
            if rel >= 0 and rel + size <= len(buf) and size in (4, 8) and rel % size == 0:
                return int.from_bytes(buf[rel:rel + size], "little")
        self._bad("read", offset, size)
        return (1 << (8 * size)) - 1 if size in (1, 2, 4, 8) else 0

    def _bad(self, kind: str, offset: int, size: int) -> None:
        self.bad_accesses += 1
        self.errors.warn(f"msix-{kind}", f"MSI-X {kind} of {size} bytes at BAR offset "
                         f"{offset:#x} is outside the table or misaligned; ignored")

    def write(self, offset: int, size: int, value: int) -> None:
        rel = offset - self.table_offset
        if not (rel >= 0 and rel + size <= len(self.table) and size in (4, 8)
                and rel % size == 0):
            self._bad("write", offset, size)  # PBA is read-only; other offsets are not ours
            return
        self.table[rel:rel + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
        if self._exported and rel % 16 < 12:  # address or data of a handed-out vector
            self._reroute(rel // 16, (rel + size - 1) // 16)
        # Writes reaching a vector control word may unmask that vector.
        if (rel % 16) + size > 12:
            self._deliver_pending()
