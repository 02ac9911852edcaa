"""A KVM VM fd: memory slots, interrupt controllers, ioeventfd/irqfd, vCPU creation."""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.kvm.ioctl import ioctl, ioctl_ptr
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vcpu import Vcpu
from pyvmm.uapi import kvm as K


@dataclass(frozen=True, slots=True)
class MsiRoute:
    """A GSI routed to an MSI message (KVM_IRQ_ROUTING_MSI)."""

    gsi: int
    address: int
    data: int


@dataclass(frozen=True, slots=True)
class IrqchipRoute:
    """A GSI routed to a pin of the in-kernel PIC or IOAPIC (KVM_IRQ_ROUTING_IRQCHIP)."""

    gsi: int
    irqchip: int
    pin: int


class Vm:
    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.fd = kvm.create_vm()
        self.vcpus: list[Vcpu] = []

    def close(self) -> None:
        for v in self.vcpus:
            v.close()
        self.vcpus.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    # --- memory --------------------------------------------------------------------
    def set_user_memory_region(
        self, slot: int, guest_phys_addr: int, size: int, host_addr: int, flags: int = 0
    ) -> None:
        r = K.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, host_addr)
        ioctl_ptr(self.fd, K.KVM_SET_USER_MEMORY_REGION, r, "KVM_SET_USER_MEMORY_REGION")

    def get_dirty_log(self, slot: int, npages: int) -> bytearray:
        """The slot's dirty bitmap since the last call (bit i: page i was written), one
        bit per page, little-endian 64-bit words as KVM writes them. The slot must have
        been set with KVM_MEM_LOG_DIRTY_PAGES. Without manual protection (the default)
        KVM clears the log and write-protects the pages again in the same call."""
        words = (npages + 63) // 64
        bitmap = (ctypes.c_uint64 * max(1, words))()
        log = K.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap))
        ioctl_ptr(self.fd, K.KVM_GET_DIRTY_LOG, log, "KVM_GET_DIRTY_LOG")
        return bytearray(bytes(bitmap)[: (npages + 7) // 8])

    def set_tss_addr(self, addr: int) -> None:
        ioctl(self.fd, K.KVM_SET_TSS_ADDR, addr, "KVM_SET_TSS_ADDR")

    def set_identity_map_addr(self, addr: int) -> None:
        v = ctypes.c_uint64(addr)
        ioctl_ptr(self.fd, K.KVM_SET_IDENTITY_MAP_ADDR, v, "KVM_SET_IDENTITY_MAP_ADDR")

    # --- interrupt controllers -----------------------------------------------------
    def create_irqchip(self) -> None:
        """In-kernel PIC pair, IOAPIC and LAPICs."""
        ioctl(self.fd, K.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")

    def enable_cap(self, cap: int, *args: int) -> None:
        c = K.kvm_enable_cap()
        c.cap = cap
        for i, a in enumerate(args):
            c.args[i] = a
        ioctl_ptr(self.fd, K.KVM_ENABLE_CAP, c, "KVM_ENABLE_CAP")

    def enable_split_irqchip(self, nr_ioapic_pins: int = 24) -> None:
        """LAPICs in the kernel, PIC and IOAPIC in userspace; must precede vCPU creation."""
        self.enable_cap(K.KVM_CAP_SPLIT_IRQCHIP, nr_ioapic_pins)

    def create_pit2(self, flags: int = 0) -> None:
        c = K.kvm_pit_config()
        c.flags = flags
        ioctl_ptr(self.fd, K.KVM_CREATE_PIT2, c, "KVM_CREATE_PIT2")

    def irq_line(self, irq: int, level: int) -> None:
        lv = K.kvm_irq_level(irq, level)
        ioctl_ptr(self.fd, K.KVM_IRQ_LINE, lv, "KVM_IRQ_LINE")

    def signal_msi(self, address: int, data: int) -> int:
        """Returns >0 if delivered, 0 if the guest blocked it."""
        m = K.kvm_msi()
        m.address_lo = address & 0xFFFFFFFF
        m.address_hi = address >> 32
        m.data = data
        return ioctl_ptr(self.fd, K.KVM_SIGNAL_MSI, m, "KVM_SIGNAL_MSI")

    def set_gsi_routing(self, routes: Sequence[MsiRoute | IrqchipRoute]) -> None:
        table = K.kvm_irq_routing_with(max(1, len(routes)))()
        table.nr = len(routes)
        for i, r in enumerate(routes):
            e = table.entries[i]
            e.gsi = r.gsi
            if isinstance(r, MsiRoute):
                e.type = K.KVM_IRQ_ROUTING_MSI
                e.u.msi.address_lo = r.address & 0xFFFFFFFF
                e.u.msi.address_hi = r.address >> 32
                e.u.msi.data = r.data
            else:
                e.type = K.KVM_IRQ_ROUTING_IRQCHIP
                e.u.irqchip.irqchip = r.irqchip
                e.u.irqchip.pin = r.pin
        ioctl_ptr(self.fd, K.KVM_SET_GSI_ROUTING, table, "KVM_SET_GSI_ROUTING")

    # --- fast paths ------------------------------------------------------------------
    def ioeventfd(
        self,
        fd: int,
        addr: int,
        length: int,
        *,
        pio: bool = False,
        datamatch: int | None = None,
        deassign: bool = False,
    ) -> None:
        """A guest write of ``length`` bytes at ``addr`` signals ``fd`` with no exit."""
        e = K.kvm_ioeventfd()
        e.addr = addr
        e.len = length
        e.fd = fd
        e.flags = (
            (K.KVM_IOEVENTFD_FLAG_PIO if pio else 0)
            | (K.KVM_IOEVENTFD_FLAG_DEASSIGN if deassign else 0)
            | (K.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0)
        )
        e.datamatch = datamatch or 0
        ioctl_ptr(self.fd, K.KVM_IOEVENTFD, e, "KVM_IOEVENTFD")

    def irqfd(
        self, fd: int, gsi: int, *, resamplefd: int | None = None, deassign: bool = False
    ) -> None:
        """Writing to ``fd`` raises ``gsi``; with ``resamplefd``, level-triggered with EOI."""
        r = K.kvm_irqfd()
        r.fd = fd
        r.gsi = gsi
        r.flags = (K.KVM_IRQFD_FLAG_DEASSIGN if deassign else 0) | (
            K.KVM_IRQFD_FLAG_RESAMPLE if resamplefd is not None else 0
        )
        r.resamplefd = resamplefd or 0
        ioctl_ptr(self.fd, K.KVM_IRQFD, r, "KVM_IRQFD")

    # --- vCPUs -------------------------------------------------------------------------
    def create_vcpu(self, index: int) -> Vcpu:
        fd = ioctl(self.fd, K.KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        v = Vcpu(fd, index, self.kvm.vcpu_mmap_size)
        self.vcpus.append(v)
        return v
