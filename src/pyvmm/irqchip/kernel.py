"""Interrupt controllers as devices see them: lines by GSI and MSI messages.

``KernelIrqChip`` is KVM's in-kernel PIC/IOAPIC/LAPIC: a line is KVM_IRQ_LINE on its
GSI. MSI goes one of two ways, on either chip: a device that owns its vectors
(MSI-X, MSI) asks for ``vector_sink()`` and gets an irqfd with an MSI route of its
own (the fast path: an eventfd write, no ioctl, usable from another process); the
rest (the split chip's IOAPIC) use KVM_SIGNAL_MSI. ``use_irqfd = False`` sends
everything by KVM_SIGNAL_MSI, for comparison. A message whose address is not in the
x86 LAPIC window (0xFEExxxxx) is a guest programming error: it is dropped and
counted, never passed to the kernel.
"""

from __future__ import annotations

from pyvmm.irq.msi import IrqChip, MsiMessage, MsiSink, RecordingMsiSink, vector_sinks
from pyvmm.irqchip.routing import GsiRouting, IrqfdMsi
from pyvmm.kvm.vm import IrqchipRoute, Vm
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import kvm as K


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


class MsiToKvm:
    """MSI delivery shared by both irqchips: messages outside the LAPIC window are a
    guest programming error, dropped and counted; the rest go to KVM_SIGNAL_MSI, or
    through a per-vector irqfd for sinks made by ``vector_sink``."""

    use_irqfd = True

    def __init__(self, vm: Vm) -> None:
        self.vm = vm
        self.routing = GsiRouting(vm)
        self.errors = OnceLog()
        self.msis_sent = 0
        self.msis_dropped = 0
        self.irqfd_vectors: list[IrqfdVector] = []
        # Messages sent by KVM_SIGNAL_MSI, per vector (the control API's interrupt
        # table); irqfd vectors count their own. One dict update beside an ioctl.
        self.signalled: dict[int, int] = {}

    def accept(self, msg: MsiMessage) -> bool:
        """Count the message; False (dropped, logged once) if it is not deliverable."""
        if not msg.valid:
            self.msis_dropped += 1
            self.errors.warn("msi-address", f"MSI to {msg.address:#x} (data {msg.data:#x}) "
                             "is outside the LAPIC window; dropped")
            return False
        self.msis_sent += 1
        return True

    def send_msi(self, msg: MsiMessage) -> None:
        if self.accept(msg):
            v = msg.data & 0xFF
            self.signalled[v] = self.signalled.get(v, 0) + 1
            self.vm.signal_msi(msg.address, msg.data)

    def vector_sink(self) -> MsiSink:
        """A sink for one device vector; an irqfd unless ``use_irqfd`` is off."""
        if not self.use_irqfd:
            return self
        v = IrqfdVector(self)
        self.irqfd_vectors.append(v)
        return v

    @property
    def msis_by_irqfd(self) -> int:
        return sum(v.sent for v in self.irqfd_vectors)

    def close(self) -> None:
        """Close the vectors' irqfds (before the VM fd, which takes their routes along)."""
        for v in self.irqfd_vectors:
            if v.irqfd is not None:
                v.irqfd.close()


class IrqfdVector:
    """One MSI/MSI-X vector of a device: its irqfd and GSI are made at the first
    message, so vectors a driver never uses cost no routing entry."""

    def __init__(self, chip: MsiToKvm) -> None:
        self.chip = chip
        self.irqfd: IrqfdMsi | None = None
        self.sent = 0

    def send_msi(self, msg: MsiMessage) -> None:
        if not self.chip.accept(msg):
            return
        if self.irqfd is None:
            self.irqfd = IrqfdMsi(self.chip.routing)
        self.irqfd.send(msg.address, msg.data)
        self.sent += 1

    # --- handing the vector to another process (a vhost-user backend's call fd) -------
    def eventfd(self, msg: MsiMessage) -> int:
        """The vector's irqfd eventfd, routed to ``msg``: whoever writes it interrupts
        the guest through KVM with no VMM thread on the path. The fd stays this
        vector's (closed with the chip); the caller dups what it hands on."""
        if self.irqfd is None:
            self.irqfd = IrqfdMsi(self.chip.routing)
        self.route(msg)
        return self.irqfd.fd

    def route(self, msg: MsiMessage) -> None:
        """The guest reprogrammed the vector: the route follows it (a message outside
        the LAPIC window leaves the GSI unrouted, so signals reach no one)."""
        if self.irqfd is None:
            return
        if msg.valid:
            self.irqfd.route(msg.address, msg.data)
        else:
            self.irqfd.unroute()


class KernelIrqChip(MsiToKvm):
    def __init__(self, vm: Vm) -> None:
        super().__init__(vm)
        self._lines: dict[int, KvmIrqLine] = {}

    def create(self) -> None:
        self.vm.create_irqchip()
        self.routing.set_fixed(isa_routes())

    def line(self, gsi: int) -> KvmIrqLine:
        if gsi not in self._lines:
            self._lines[gsi] = KvmIrqLine(self.vm, gsi)
        return self._lines[gsi]


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


__all__ = ["IrqChip", "KernelIrqChip", "KvmIrqLine", "MsiMessage", "MsiSink",
           "RecordingMsiSink", "vector_sinks"]
