"""ioeventfd as a service: a guest write to an address signals an eventfd in the
kernel (no vCPU exit) and the event loop runs the device's callback."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.event import EventManager
from pyvmm.kvm.vm import Vm


@dataclass(frozen=True)
class Handle:
    fd: int
    addr: int
    length: int
    datamatch: int | None = None


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
        return Handle(fd, addr, length, datamatch)

    def remove(self, handle: object) -> None:
        assert isinstance(handle, Handle)
        self.vm.ioeventfd(handle.fd, handle.addr, handle.length, datamatch=handle.datamatch,
                          deassign=True)
        self.events.remove(handle.fd)
        os.close(handle.fd)
