"""KVM_CAP_SPLIT_IRQCHIP: LAPICs in the kernel, the PIC pair and IOAPIC in Python.

- A line (GSI) goes to the PIC (GSIs 0-15) and to the IOAPIC (ISA IRQ 0 on pin 2, as
  the MADT's interrupt source override says; others on the pin of the same number).
- The IOAPIC delivers by MSI message to the in-kernel LAPICs. Its programmed entries
  are mirrored into KVM's GSI routing table, because that is how KVM learns which
  vectors are level-triggered IOAPIC vectors whose EOI must exit to userspace
  (KVM_EXIT_IOAPIC_EOI -> ``eoi``).
- The PIC's INT output is injected with KVM_INTERRUPT (ExtINT through the BSP's
  LINT0): when it rises the vCPU is asked for an interrupt window and kicked; the
  run loop calls ``inject`` before re-entering, which acknowledges the PIC (the
  INTA cycle) once the guest can take an interrupt.

One lock serialises the chipset: lines change from the vCPU thread (device
registers) and from the event loop (timers).
"""

from __future__ import annotations

import threading

from pyvmm.bus import BusDevice
from pyvmm.devices.legacy.ioapic import IoApic
from pyvmm.devices.legacy.pic import PicPair
from pyvmm.irqchip.kernel import MsiToKvm
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.kvm.vm import MsiRoute, Vm
from pyvmm.uapi import kvm as K

ISA_IRQ0_IOAPIC_PIN = 2


class SplitLine:
    def __init__(self, chip: SplitIrqChip, gsi: int) -> None:
        self.chip, self.gsi = chip, gsi
        self.raised = 0

    def set_level(self, level: bool) -> None:
        if level:
            self.raised += 1
        self.chip.set_irq(self.gsi, level)

    def pulse(self) -> None:
        self.raised += 1
        self.chip.set_irq(self.gsi, True)
        self.chip.set_irq(self.gsi, False)


class Locked:
    """Bus adapter taking the chipset lock around a device's register accesses."""

    def __init__(self, device: BusDevice, lock: threading.RLock) -> None:
        self.device, self.lock = device, lock

    def read(self, base: int, offset: int, size: int) -> int:
        with self.lock:
            return self.device.read(base, offset, size)

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            self.device.write(base, offset, size, value)


class SplitIrqChip(MsiToKvm):
    def __init__(self, vm: Vm) -> None:
        super().__init__(vm)
        self.lock = threading.RLock()
        self.pic = PicPair(output=self._pic_output)
        self.ioapic = IoApic(self, on_routes_changed=self._routes_changed)
        self.vcpu: Vcpu | None = None
        self.injected = 0
        self.eois = 0
        self._lines: dict[int, SplitLine] = {}

    def create(self) -> None:
        self.vm.enable_split_irqchip(24)

    def attach(self, vcpu: Vcpu) -> None:
        self.vcpu = vcpu

    def line(self, gsi: int) -> SplitLine:
        if gsi not in self._lines:
            self._lines[gsi] = SplitLine(self, gsi)
        return self._lines[gsi]

    def set_irq(self, gsi: int, level: bool) -> None:
        with self.lock:
            if gsi < 16:
                self.pic.set_irq(gsi, level)
            self.ioapic.set_irq(ISA_IRQ0_IOAPIC_PIN if gsi == 0 else gsi, level)

    def _routes_changed(self) -> None:
        self.routing.set_fixed([MsiRoute(pin, m.address, m.data)
                                for pin, m in self.ioapic.routes()])

    # --- ExtINT injection -----------------------------------------------------------
    def _pic_output(self, level: bool) -> None:
        v = self.vcpu
        if level and v is not None:
            v.run_page[K.KVM_RUN_REQUEST_INTERRUPT_WINDOW] = 1
            if threading.get_ident() != v.thread_id:
                v.kick()

    def inject(self, vcpu: Vcpu) -> None:
        """Run loop, before KVM_RUN: inject the PIC's vector if the guest can take it."""
        run = vcpu.run_page
        with self.lock:
            if not self.pic.level:
                run[K.KVM_RUN_REQUEST_INTERRUPT_WINDOW] = 0
                return
            if run[K.KVM_RUN_READY_FOR_INTERRUPT_INJECTION] and run[K.KVM_RUN_IF_FLAG]:
                vcpu.interrupt(self.pic.acknowledge())
                self.injected += 1
            run[K.KVM_RUN_REQUEST_INTERRUPT_WINDOW] = int(self.pic.level)

    def eoi(self, vector: int) -> None:
        with self.lock:
            self.eois += 1
            self.ioapic.eoi(vector)
