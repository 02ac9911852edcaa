"""MSI capability (PCI Local Bus 3.0 §6.8.1): 64-bit address, per-vector masking.

The guest programs address, data, mask and enable in config space; the device calls
``trigger(n)``. A masked vector sets its pending bit and is delivered when unmasked
(the config-write hook). Multiple-message enable gives ``data | n`` for vector n.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

from pyvmm.devices.pci.config_space import PCIConfigSpace
from pyvmm.irq.msi import MsiMessage, MsiSink, vector_sinks
from pyvmm.uapi import pci as P


class MsiCapability:
    def __init__(self, config: PCIConfigSpace, sink: MsiSink, vectors: int = 1) -> None:
        if vectors not in (1, 2, 4, 8, 16, 32):
            raise ValueError("MSI vectors must be a power of two up to 32")
        self.config, self.vectors = config, vectors
        self._sinks = vector_sinks(sink, vectors)  # irqfd per vector where the chip has it
        # Set while the device is exported (vfio-user) and the client has enabled MSI:
        # the client emulates the capability, a trigger goes to the vector's eventfd.
        self.direct: Callable[[int], bool] | None = None
        mmc = (vectors.bit_length() - 1) << 1
        flags = P.PCI_MSI_FLAGS_64BIT | P.PCI_MSI_FLAGS_MASKBIT | mmc
        # body: flags, addr lo, addr hi, data (+2 reserved), mask, pending
        body = struct.pack("<HIIHHII", flags, 0, 0, 0, 0, 0, 0)
        vmask = (1 << vectors) - 1
        wmask = struct.pack("<HIIHHII", P.PCI_MSI_FLAGS_ENABLE | P.PCI_MSI_FLAGS_QSIZE,
                            0xFFFFFFFC, 0xFFFFFFFF, 0xFFFF, 0, vmask, 0)
        self.off = config.add_capability(P.PCI_CAP_ID_MSI, body, wmask, self._on_write)

    @property
    def flags(self) -> int:
        return self.config.get16(self.off + P.PCI_MSI_FLAGS)

    @property
    def enabled(self) -> bool:
        return bool(self.flags & P.PCI_MSI_FLAGS_ENABLE)

    def _mask(self) -> int:
        return self.config.get32(self.off + P.PCI_MSI_MASK_64)

    def _pending(self) -> int:
        return self.config.get32(self.off + P.PCI_MSI_PENDING_64)

    def _set_pending(self, v: int) -> None:
        self.config.set32(self.off + P.PCI_MSI_PENDING_64, v)

    def message(self, n: int) -> MsiMessage:
        c, o = self.config, self.off
        addr = c.get32(o + P.PCI_MSI_ADDRESS_LO) | (c.get32(o + P.PCI_MSI_ADDRESS_HI) << 32)
        enabled_vectors = 1 << ((self.flags & P.PCI_MSI_FLAGS_QSIZE) >> 4)
        data = c.get16(o + P.PCI_MSI_DATA_64)
        if n < enabled_vectors:
            data = (data & ~(enabled_vectors - 1)) | n
        return MsiMessage(addr, data)

    def trigger(self, n: int = 0) -> bool:
        """Signal vector ``n``; returns True if a message was sent."""
        if self.direct is not None:
            return self.direct(n)
        if not self.enabled or n >= self.vectors:
            return False
        if self._mask() & (1 << n):
            self._set_pending(self._pending() | (1 << n))
            return False
        self._sinks[n].send_msi(self.message(n))
        return True

    def _on_write(self, offset: int, size: int, value: int) -> None:
        # An unmask (or enable) delivers what was held pending.
        pending = self._pending() & ~self._mask()
        if self.enabled and pending:
            self._set_pending(self._pending() & ~pending)
            for n in range(self.vectors):
                if pending & (1 << n):
                    self._sinks[n].send_msi(self.message(n))
