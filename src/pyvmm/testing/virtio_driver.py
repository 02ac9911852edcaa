"""A virtio driver's bring-up in one call, for device tests: status ACKNOWLEDGE|DRIVER,
features, FEATURES_OK, every queue laid out by a ``DriverQueue``, DRIVER_OK — the
sequence of virtio 1.2 §3.1.1, through the device's ``VirtioCore`` as a transport
would drive it."""

from __future__ import annotations

from pyvmm.devices.virtio.core import VirtioCore, VirtioDevice
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.memory import GuestMemory
from pyvmm.testing.driver_queue import DriverQueue
from pyvmm.uapi import virtio as V

OK_STATUS = (V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER
             | V.VIRTIO_CONFIG_S_FEATURES_OK)


class RecordingInterrupt:
    """The transport's interrupt, counted."""

    def __init__(self) -> None:
        self.queue = 0
        self.config = 0

    def signal_queue(self, vq: Virtqueue) -> None:
        self.queue += 1

    def signal_config(self) -> None:
        self.config += 1


class VirtioDriver:
    """``VirtioDriver(device, mem)`` brings ``device`` up; ``queues[i]`` is queue i's
    driver side. Queue i's rings are at ``0x10000 * (i + 1)`` and its buffers at
    ``buffers[i]`` (default: 0x40000 for one queue, else ``0x100000 * (i + 1)``)."""

    def __init__(self, device: VirtioDevice, mem: GuestMemory, *,
                 features: int | None = None, size: int = 16,
                 buffers: list[int] | None = None) -> None:
        self.device, self.mem = device, mem
        self.core = VirtioCore(device, mem)
        self.irq = RecordingInterrupt()
        self.core.irq = self.irq
        n = len(self.core.queues)
        bufs = buffers or ([0x40000] if n == 1 else [0x100000 * (i + 1) for i in range(n)])
        self.core.set_status(V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER)
        f = device.features if features is None else features
        self.core.set_driver_features_word(0, f & 0xFFFFFFFF)
        self.core.set_driver_features_word(1, f >> 32)
        self.core.set_status(OK_STATUS)
        self.queues: list[DriverQueue] = []
        for i, q in enumerate(self.core.queues):
            dq = DriverQueue(mem, size, base=0x10000 * (i + 1), buffers=bufs[i])
            q.size, q.desc, q.avail, q.used, q.ready = size, dq.desc, dq.avail, dq.used, True
            self.queues.append(dq)
        self.core.set_status(OK_STATUS | V.VIRTIO_CONFIG_S_DRIVER_OK)

    @property
    def needs_reset(self) -> bool:
        return bool(self.core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET)

    def kick(self, index: int = 0) -> None:
        """What an ioeventfd notification makes the event loop do."""
        self.core.notify(index)
