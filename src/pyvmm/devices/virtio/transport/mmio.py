"""Virtio over MMIO, version 2 (virtio 1.2 §4.2), in the slots the DSDT describes.

Registers as the spec names them; device configuration from 0x100. QueueNotify
(0x050) takes the queue index; with the fast path, one ioeventfd per queue with a
datamatch on the index, so kicks never exit. The interrupt is the slot's GSI, held
high while InterruptStatus is non-zero and dropped by InterruptACK. A device whose
queues another process serves (vhost-user) may take a queue's ioeventfd
(``notify_fd``); its interrupts still need the VMM, to set InterruptStatus
(``interrupt_fd`` gives none).

What a malicious driver can do: write any register. Unknown offsets and wrong widths
(registers are 32-bit; config space takes 1/2/4) are ignored and counted; queue
registers are frozen once DRIVER_OK is set; everything else is checked by the core
at DRIVER_OK (-> DEVICE_NEEDS_RESET).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from pyvmm.devices.virtio.core import VirtioCore, VirtioDevice
from pyvmm.devices.virtio.queue import QueueConfig, Virtqueue
from pyvmm.devices.virtio.transport.pci import NotifyFastPath, _immediate
from pyvmm.irq.line import InterruptLine
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import virtio as V

VIRTIO_MMIO_VENDOR = 0x4D565950  # "PYVM"


class VirtioMmioDevice:
    def __init__(self, device: VirtioDevice, mem: GuestMemory, irq: InterruptLine, *,
                 defer: Callable[[Callable[[], None]], None] = _immediate,
                 fast_path: NotifyFastPath | None = None) -> None:
        self.device = device
        self.name = f"virtio-mmio-{type(device).__name__.lower().removeprefix('virtio')}"
        self.core = VirtioCore(device, mem)
        self.core.irq = self
        self.line, self.defer, self.fast_path = irq, defer, fast_path
        self.errors = OnceLog()
        self.bad_accesses = 0
        self.interrupts = 0
        self.dfsel = self.gfsel = self.queue_sel = 0
        self.int_status = 0
        self._handles: list[object] = []
        self._handed: set[int] = set()  # queues whose ioeventfd a device took

    def attach(self, base: int) -> None:
        """Register the per-queue ioeventfds once the slot's address is known."""
        if self.fast_path is None:
            return
        for q in range(len(self.core.queues)):
            self._handles.append(self.fast_path.add(
                base + V.VIRTIO_MMIO_QUEUE_NOTIFY, 4, functools.partial(self.core.notify, q),
                datamatch=q))

    # --- QueueEventfds: for a device whose queues another process serves ----------------
    def notify_fd(self, queue: int) -> int | None:
        fp = self.fast_path
        if fp is None or not 0 <= queue < len(self._handles):
            return None
        fd = os.dup(fp.detach(self._handles[queue]))
        self._handed.add(queue)
        return fd

    def interrupt_fd(self, queue: int) -> int | None:
        return None  # InterruptStatus must say why the line is up: the VMM raises it

    def _reclaim_notify(self) -> None:
        if self.fast_path is not None:
            for q in self._handed:
                self.fast_path.reattach(self._handles[q])
        self._handed.clear()

    # --- VirtioInterrupt ----------------------------------------------------------------
    def signal_queue(self, vq: Virtqueue) -> None:
        self._raise(V.VIRTIO_MMIO_INT_VRING)

    def signal_config(self) -> None:
        self._raise(V.VIRTIO_MMIO_INT_CONFIG)

    def _raise(self, bit: int) -> None:
        self.interrupts += 1
        self.int_status |= bit
        self.line.set_level(True)

    # --- registers ----------------------------------------------------------------------
    def _q(self) -> QueueConfig | None:
        qs = self.core.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _bad(self, what: str, offset: int, size: int) -> int:
        self.bad_accesses += 1
        self.errors.warn(what, f"{self.name}: {what} of {size} bytes at {offset:#x}; ignored")
        return 0

    def read(self, base: int, offset: int, size: int) -> int:
        with self.core.lock:
            if offset >= V.VIRTIO_MMIO_CONFIG:
                return self.device.read_config(offset - V.VIRTIO_MMIO_CONFIG, size)
            if size != 4:
                return self._bad("narrow register read", offset, size)
            core, q = self.core, self._q()
            if offset == V.VIRTIO_MMIO_MAGIC_VALUE:
                return V.VIRTIO_MMIO_MAGIC
            if offset == V.VIRTIO_MMIO_VERSION:
                return 2
            if offset == V.VIRTIO_MMIO_DEVICE_ID:
                return self.device.device_type
            if offset == V.VIRTIO_MMIO_VENDOR_ID:
                return VIRTIO_MMIO_VENDOR
            if offset == V.VIRTIO_MMIO_DEVICE_FEATURES:
                return core.device_features_word(self.dfsel)
            if offset == V.VIRTIO_MMIO_QUEUE_NUM_MAX:
                return q.max_size if q else 0
            if offset == V.VIRTIO_MMIO_QUEUE_READY:
                return int(q.ready) if q else 0
            if offset == V.VIRTIO_MMIO_INTERRUPT_STATUS:
                return self.int_status
            if offset == V.VIRTIO_MMIO_STATUS:
                return core.status
            if offset == V.VIRTIO_MMIO_CONFIG_GENERATION:
                return core.config_generation
            return self._bad("read of an unknown register", offset, size)

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        if offset == V.VIRTIO_MMIO_QUEUE_NOTIFY and size == 4:
            q = value & 0xFFFF
            self.defer(lambda: self.core.notify(q))
            return
        with self.core.lock:
            if offset >= V.VIRTIO_MMIO_CONFIG:
                self.device.write_config(offset - V.VIRTIO_MMIO_CONFIG, size, value)
                return
            if size != 4:
                self._bad("narrow register write", offset, size)
                return
            self._write32(offset, value & 0xFFFFFFFF)

    def _write32(self, offset: int, value: int) -> None:
        core, q = self.core, self._q()
        if offset == V.VIRTIO_MMIO_DEVICE_FEATURES_SEL:
            self.dfsel = value
        elif offset == V.VIRTIO_MMIO_DRIVER_FEATURES_SEL:
            self.gfsel = value
        elif offset == V.VIRTIO_MMIO_DRIVER_FEATURES:
            core.set_driver_features_word(self.gfsel, value)
        elif offset == V.VIRTIO_MMIO_QUEUE_SEL:
            self.queue_sel = value
        elif offset == V.VIRTIO_MMIO_INTERRUPT_ACK:
            self.int_status &= ~value
            self.line.set_level(self.int_status != 0)
        elif offset == V.VIRTIO_MMIO_STATUS:
            core.set_status(value)
            if value == 0:
                self.int_status = 0
                self.line.set_level(False)
                self._reclaim_notify()
        elif offset in _QUEUE_REGS:
            if q is None or core.status & V.VIRTIO_CONFIG_S_DRIVER_OK:
                self._bad("queue register write after DRIVER_OK or for no queue", offset, 4)
                return
            attr, shift = _QUEUE_REGS[offset]
            if attr == "ready":
                q.ready = bool(value & 1)
            elif attr == "size":
                q.size = value
            else:
                old = int(getattr(q, attr))
                setattr(q, attr, (old & ~(0xFFFFFFFF << shift)) | (value << shift))
        else:
            self._bad("write of an unknown or read-only register", offset, 4)

    def metrics(self) -> dict[str, int]:
        return {**self.device.metrics(), **self.core.metrics(), "interrupts": self.interrupts}

_QUEUE_REGS: dict[int, tuple[str, int]] = {
    V.VIRTIO_MMIO_QUEUE_NUM: ("size", 0),
    V.VIRTIO_MMIO_QUEUE_READY: ("ready", 0),
    V.VIRTIO_MMIO_QUEUE_DESC_LOW: ("desc", 0),
    V.VIRTIO_MMIO_QUEUE_DESC_HIGH: ("desc", 32),
    V.VIRTIO_MMIO_QUEUE_AVAIL_LOW: ("avail", 0),
    V.VIRTIO_MMIO_QUEUE_AVAIL_HIGH: ("avail", 32),
    V.VIRTIO_MMIO_QUEUE_USED_LOW: ("used", 0),
    V.VIRTIO_MMIO_QUEUE_USED_HIGH: ("used", 32),
}
