"""What the PCI root needs from a function: its config space and BAR callbacks.

BAR accesses arrive by BAR index and offset, never by absolute address, so the guest
may move a BAR without the device noticing. PCI methods live here, not on the
generic bus device (crosvm's regretted shortcut).
"""

from __future__ import annotations

from pyvmm.devices.pci.config_space import BarChange, PCIConfigSpace
from pyvmm.irq.line import InterruptLine, NullLine
from pyvmm.uapi import pci as P


class PCIDevice:
    config: PCIConfigSpace
    name = "pci-device"

    def __init__(self) -> None:
        self.intx: InterruptLine = NullLine()
        self._intx_level = False

    def read_bar(self, index: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        pass

    def config_read(self, offset: int, size: int) -> int:
        return self.config.read(offset, size)

    def config_write(self, offset: int, size: int, value: int) -> list[BarChange]:
        changes = self.config.write(offset, size, value)
        if offset <= P.PCI_COMMAND + 1 and offset + size > P.PCI_COMMAND:
            self._update_intx()  # INTX_DISABLE may have changed
        return changes

    def set_intx(self, level: bool) -> None:
        """Drive INTx; PCI_STATUS_INTERRUPT reflects it, PCI_COMMAND_INTX_DISABLE gates it."""
        self._intx_level = level
        self._update_intx()

    def _update_intx(self) -> None:
        c = self.config
        status = c.get16(P.PCI_STATUS) & ~P.PCI_STATUS_INTERRUPT
        if self._intx_level:
            status |= P.PCI_STATUS_INTERRUPT
        c.set16(P.PCI_STATUS, status)
        self.intx.set_level(self._intx_level
                            and not c.command & P.PCI_COMMAND_INTX_DISABLE)

    def bar_moved(self, index: int, new: int | None) -> None:
        """BAR ``index`` now decodes at ``new`` (None: not mapped). For fast paths
        (ioeventfd) that must follow the BAR; most devices need nothing."""

    def reset(self) -> None:
        """Function-level reset; devices extend this."""

    def close(self) -> None:
        """Release host resources (shared memory, fds); most devices have none."""

    def dma_unmapped(self, start: int, size: int) -> None:
        """Guest memory [start, start + size) is about to be unmapped (vfio-user DMA_UNMAP,
        or the session ending): on return nothing of the device may still use it — I/O
        in flight there finished, queues there stopped. Devices that hold nothing into
        guest memory between accesses (each access is bounds-checked) need nothing."""

    def bar_memory(self, index: int) -> tuple[int, int] | None:
        """(fd, offset) if BAR ``index`` is shared memory a host may map into the guest
        (vfio-user's mmap'able regions); None for trapped BARs."""
        return None
