"""KVM's GSI routing table, owned in one place, and MSI delivered through irqfd.

KVM_SET_GSI_ROUTING replaces the whole table, so whoever sets routes must know all
of them: the fixed part (ISA lines on the kernel chip, or the split chip's IOAPIC
mirror) and one MSI route per irqfd vector. ``GsiRouting`` keeps both and commits
the union.

``IrqfdMsi`` is one MSI source (an MSI-X vector, say) with a GSI of its own, an
eventfd bound to it with KVM_IRQFD, and the message it was last routed to. Sending
a message is an eventfd write; the kernel injects it without KVM_SIGNAL_MSI, and the
same fd could be handed to another process (a vhost-user or vfio-user backend) so
that it interrupts the guest with no VMM in the path. The route is rewritten only
when the guest reprograms the vector's address/data, which drivers do rarely.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from pyvmm.kvm.vm import IrqchipRoute, MsiRoute, Vm

FIRST_MSI_GSI = 24  # GSIs below are the IOAPIC's pins (and the PIC's)


class GsiRouting:
    def __init__(self, vm: Vm, max_routes: int = 4096) -> None:
        self.vm = vm
        self.max_routes = max_routes
        self._fixed: list[MsiRoute | IrqchipRoute] = []
        self._msi: dict[int, MsiRoute] = {}
        self._next_gsi = FIRST_MSI_GSI
        self._free: list[int] = []
        self.commits = 0

    def set_fixed(self, routes: Sequence[MsiRoute | IrqchipRoute]) -> None:
        self._fixed = list(routes)
        self.commit()

    def alloc_gsi(self) -> int:
        if self._free:
            return self._free.pop()
        if len(self._fixed) + self._next_gsi - FIRST_MSI_GSI >= self.max_routes:
            raise RuntimeError("KVM GSI routing table is full")
        gsi, self._next_gsi = self._next_gsi, self._next_gsi + 1
        return gsi

    def release_gsi(self, gsi: int) -> None:
        if self._msi.pop(gsi, None) is not None:
            self.commit()
        self._free.append(gsi)

    def set_msi(self, gsi: int, address: int, data: int) -> None:
        self._msi[gsi] = MsiRoute(gsi, address, data)
        self.commit()

    def clear_msi(self, gsi: int) -> None:
        """No route for ``gsi`` (its irqfd stays bound; a signal then does nothing)."""
        if self._msi.pop(gsi, None) is not None:
            self.commit()

    def routes(self) -> list[MsiRoute | IrqchipRoute]:
        return [*self._fixed, *self._msi.values()]

    def commit(self) -> None:
        self.commits += 1
        self.vm.set_gsi_routing(self.routes())


class IrqfdMsi:
    """One MSI source delivered by irqfd. ``send(address, data)`` expects a message the
    chip has already validated (inside the LAPIC window)."""

    def __init__(self, routing: GsiRouting) -> None:
        self.routing = routing
        self.gsi = routing.alloc_gsi()
        self.fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._routed: tuple[int, int] | None = None
        try:
            routing.vm.irqfd(self.fd, self.gsi)
        except BaseException:
            os.close(self.fd)
            routing.release_gsi(self.gsi)
            raise

    def send(self, address: int, data: int) -> None:
        self.route(address, data)
        os.eventfd_write(self.fd, 1)

    def route(self, address: int, data: int) -> None:
        """Route the GSI to this message (a routing commit only when it changed)."""
        if self._routed != (address, data):
            self.routing.set_msi(self.gsi, address, data)
            self._routed = (address, data)

    def unroute(self) -> None:
        """The message became undeliverable: signals of the fd reach no one."""
        if self._routed is not None:
            self.routing.clear_msi(self.gsi)
            self._routed = None

    def close(self) -> None:
        """The VM is going away (KVM drops its irqfds and routes with it): close the fd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
