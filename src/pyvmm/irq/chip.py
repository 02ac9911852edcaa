"""Interrupt controllers as devices see them: lines by GSI and MSI messages.

``KernelIrqChip`` is KVM's in-kernel PIC/IOAPIC/LAPIC: a line is KVM_IRQ_LINE on its
GSI, an MSI is KVM_SIGNAL_MSI. A message whose address is not in the x86 LAPIC
window (0xFEExxxxx) is a guest programming error: it is dropped and counted, never
passed to the kernel. The Python PIC/IOAPIC split chip is the next step
(see issue notes); devices will not notice the difference.
"""

from __future__ import annotations

from typing import NamedTuple, Protocol

from pyvmm.irq.line import InterruptLine, KvmIrqLine
from pyvmm.kvm.vm import IrqchipRoute, Vm
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import kvm as K
from pyvmm.uapi.pci import MSI_ADDRESS_BASE, MSI_ADDRESS_MASK


def isa_routes() -> list[IrqchipRoute]:
    """GSI routing as on a PC (and as QEMU sets it): GSIs 0-15 reach the PIC pair and
    the IOAPIC, ISA IRQ 0 on IOAPIC pin 2 (the MADT's source override) and nothing on
    pin 0; GSIs 16-23 reach the IOAPIC only. The split chip applies the same map."""
    routes = []
    for gsi in range(16):
        chip = K.KVM_IRQCHIP_PIC_MASTER if gsi < 8 else K.KVM_IRQCHIP_PIC_SLAVE
        routes.append(IrqchipRoute(gsi, chip, gsi % 8))
        if gsi != 2:
            routes.append(IrqchipRoute(gsi, K.KVM_IRQCHIP_IOAPIC, 2 if gsi == 0 else gsi))
    routes += [IrqchipRoute(gsi, K.KVM_IRQCHIP_IOAPIC, gsi) for gsi in range(16, 24)]
    return routes


class MsiMessage(NamedTuple):
    address: int
    data: int

    @property
    def valid(self) -> bool:
        return (self.address & MSI_ADDRESS_MASK) == MSI_ADDRESS_BASE and self.data <= 0xFFFF

    @property
    def vector(self) -> int:
        return self.data & 0xFF


class MsiSink(Protocol):
    def send_msi(self, msg: MsiMessage) -> None: ...


class IrqChip(MsiSink, Protocol):
    def line(self, gsi: int) -> InterruptLine: ...


class MsiToKvm:
    """MSI delivery shared by both irqchips: messages outside the LAPIC window are a
    guest programming error, dropped and counted; the rest go to KVM_SIGNAL_MSI."""

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.errors = OnceLog()
        self.msis_sent = 0
        self.msis_dropped = 0

    def send_msi(self, msg: MsiMessage) -> None:
        if not msg.valid:
            self.msis_dropped += 1
            self.errors.warn("msi-address", f"MSI to {msg.address:#x} (data {msg.data:#x}) "
                             "is outside the LAPIC window; dropped")
            return
        self.msis_sent += 1
        self.vm.signal_msi(msg.address, msg.data)


class KernelIrqChip(MsiToKvm):
    def __init__(self, vm: Vm) -> None:
        super().__init__(vm)
        self._lines: dict[int, KvmIrqLine] = {}

    def create(self) -> None:
        self.vm.create_irqchip()
        self.vm.set_gsi_routing(isa_routes())

    def line(self, gsi: int) -> KvmIrqLine:
        if gsi not in self._lines:
            self._lines[gsi] = KvmIrqLine(self.vm, gsi)
        return self._lines[gsi]


class RecordingMsiSink:
    """Collects messages (tests)."""

    def __init__(self) -> None:
        self.sent: list[MsiMessage] = []

    def send_msi(self, msg: MsiMessage) -> None:
        self.sent.append(msg)
