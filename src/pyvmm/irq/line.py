"""An interrupt line as a device sees it: a level it drives, nothing about the chip.

The full IrqChip (kernel vs split, MSI routing, resample) arrives with the chipset
work; the foundation needs only a level-triggered ISA line into KVM's in-kernel PIC
and IOAPIC (KVM_IRQ_LINE), and a recording line for tests.
"""

from __future__ import annotations

from typing import Protocol

from pyvmm.kvm.vm import Vm


class InterruptLine(Protocol):
    def set_level(self, level: bool) -> None: ...

    def pulse(self) -> None: ...


class NullLine:
    """A line connected to nothing (a device without an interrupt)."""

    def set_level(self, level: bool) -> None:
        pass

    def pulse(self) -> None:
        pass


class KvmIrqLine:
    """A GSI of the in-kernel irqchip driven with KVM_IRQ_LINE.

    Only level changes reach the kernel, so a device may call ``set_level`` after
    every register access without an ioctl each time.
    """

    def __init__(self, vm: Vm, gsi: int) -> None:
        self.vm = vm
        self.gsi = gsi
        self.level = False
        self.raised = 0  # number of low->high transitions, for accounting

    def set_level(self, level: bool) -> None:
        if level != self.level:
            self.level = level
            if level:
                self.raised += 1
            self.vm.irq_line(self.gsi, int(level))

    def pulse(self) -> None:
        self.raised += 1
        self.vm.irq_line(self.gsi, 1)
        self.vm.irq_line(self.gsi, 0)
        self.level = False
