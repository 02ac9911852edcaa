"""The host context of a device exported over vfio-user: the same ``create`` as in the
VMM, but guest memory is the client's (DMA_MAP), interrupts go to the client's eventfds,
and what the device opened is closed with the session's device."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar, cast

from pyvmm.backends.io_pool import IoPool
from pyvmm.devices.assigned.shmem import BarMapper
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.devices.spec import DeviceSpec
from pyvmm.errors import ConfigError
from pyvmm.event import EventManager
from pyvmm.irq.line import InterruptLine
from pyvmm.irq.msi import MsiSink, RecordingMsiSink
from pyvmm.memory import GuestMemory, TrackedMemory

T = TypeVar("T")


class ExportContext:
    def __init__(self, spec: DeviceSpec, mem: GuestMemory, events: EventManager) -> None:
        self.spec, self.mem, self.events = spec, mem, events
        self.msi: MsiSink = RecordingMsiSink()  # unused: MSI-X goes to the client's fds
        self.name, self.index = f"{spec.name}0", 0
        self._closers: list[Callable[[], None]] = []
        self._pool: IoPool | None = None
        self._shared: dict[str, object] = {}

    def line(self, index: int = 0) -> InterruptLine:
        raise ConfigError(f"{self.spec.name}: an ISA device cannot be exported")

    def shared(self, key: str, make: Callable[[], T]) -> T:
        if key not in self._shared:
            self._shared[key] = make()
        return cast(T, self._shared[key])

    def io_pool(self) -> IoPool:
        if self._pool is None:
            self._pool = IoPool()
        return self._pool

    def on_close(self, fn: Callable[[], None]) -> None:
        self._closers.append(fn)

    def memory_map(self) -> list[tuple[int, int, int]]:
        return [(r.guest_addr, r.size, 1) for r in self.mem.regions()]  # what was mapped

    def cpus(self) -> int:
        return 1  # the client's; a PCI function is not told

    def tracked_memory(self, size: int, name: str) -> TrackedMemory:
        # Served over the socket: every guest access arrives as a region access and
        # marks its page (a mappable region with a dirty-page log is vfio-user's
        # DIRTY_PAGES extension, not implemented).
        t = TrackedMemory(size, name)
        self.on_close(t.close)
        return t

    def bar_mapper(self) -> BarMapper | None:
        return None  # the client maps what bar_memory offers (mmap'able regions)

    def attach(self, fn: PCIDevice) -> None:
        """Close what the device opened when the session closes its device."""
        inner = fn.close

        def close() -> None:
            inner()
            if self._pool is not None:
                self._pool.close()
                self._pool = None
            for c in reversed(self._closers):
                c()
            self._closers.clear()

        fn.close = close  # type: ignore[method-assign]
