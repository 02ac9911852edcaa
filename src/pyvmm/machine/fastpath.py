"""ioeventfd as a service: a guest write to an address signals an eventfd in the
kernel (no vCPU exit) and the event loop runs the device's callback.

A handle's eventfd can also be handed to another process (a vhost-user backend takes
it as its kick fd): ``detach`` stops the event loop watching it — the guest's write
then wakes only that process — and ``reattach`` watches it again (after the device's
reset). The KVM registration is the same in both cases."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pyvmm.event import EventManager
from pyvmm.kvm.vm import Vm


@dataclass(frozen=True)
class Handle:
    fd: int
    addr: int
    length: int
    datamatch: int | None = None
    ready: Callable[[int, int], None] | None = field(default=None, compare=False)


class IoeventfdFastPath:
    def __init__(self, vm: Vm, events: EventManager) -> None:
        self.vm, self.events = vm, events
        self.signals = 0  # eventfd wake-ups handled (each may carry several kicks)

    def add(self, addr: int, length: int, callback: Callable[[], None],
            datamatch: int | None = None) -> object:
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.vm.ioeventfd(fd, addr, length, datamatch=datamatch)

        def ready(_fd: int, _ev: int) -> None:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            self.signals += 1
            callback()

        self.events.add(fd, ready)
        return Handle(fd, addr, length, datamatch, ready)

    def detach(self, handle: object) -> int:
        """Stop watching the handle's eventfd (someone else reads it now); its fd."""
        assert isinstance(handle, Handle)
        self.events.remove(handle.fd)
        return handle.fd

    def reattach(self, handle: object) -> None:
        """Watch the handle's eventfd again (a no-op if it is watched)."""
        assert isinstance(handle, Handle) and handle.ready is not None
        if not self.events.watching(handle.fd):
            self.events.add(handle.fd, handle.ready)

    def remove(self, handle: object) -> None:
        assert isinstance(handle, Handle)
        self.vm.ioeventfd(handle.fd, handle.addr, handle.length, datamatch=handle.datamatch,
                          deassign=True)
        self.events.remove(handle.fd)
        os.close(handle.fd)
