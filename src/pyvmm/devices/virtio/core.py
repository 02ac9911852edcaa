"""The virtio device status machine and feature negotiation, written once (§2.1-§3.1).

``VirtioDevice`` is what a device implements; it knows nothing of its transport.
``VirtioCore`` holds what the driver programs (status, features, ``QueueConfig``s) and
turns it into running ``Virtqueue``s at DRIVER_OK, handing them to the device with
guest memory and an interrupt object (activation, as in Firecracker and crosvm).
Both transports (PCI, MMIO) drive a core. A driver mistake — FEATURES_OK with
features the device does not offer, DRIVER_OK with a broken queue, a malformed chain
while running — never raises into the VMM: the core sets DEVICE_NEEDS_RESET, sends a
configuration-change interrupt, logs once, and stops the device until reset.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Protocol, runtime_checkable

from pyvmm.devices.virtio.queue import (
    DescriptorChain,
    QueueConfig,
    Virtqueue,
    VirtqueueError,
    start_queue,
)
from pyvmm.errors import BackendError, GuestMemoryError
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import virtio as V


class VirtioInterrupt(Protocol):
    def signal_queue(self, vq: Virtqueue) -> None: ...

    def signal_config(self) -> None: ...


@runtime_checkable
class QueueEventfds(Protocol):
    """What a transport can offer a device whose queues another process serves (a
    vhost-user front end): the eventfds the guest's notifications and the queues'
    interrupts already pass through in KVM, so that process uses them directly and
    no VMM thread is on the per-request path. Both return a new fd the caller owns."""

    def notify_fd(self, queue: int) -> int | None:
        """A dup of the eventfd KVM signals when the guest notifies ``queue`` (its
        ioeventfd), or None without one. The VMM stops watching that eventfd until the
        device is reset (a notification that still exits reaches ``process_queue``)."""
        ...

    def interrupt_fd(self, queue: int) -> int | None:
        """A dup of an eventfd that, written, interrupts the guest for ``queue`` through
        KVM (the irqfd of its MSI-X vector), or None where the VMM must raise the
        interrupt itself (INTx, virtio-mmio's interrupt status, no vector, --msi signal)."""
        ...


class VirtioDevice:
    """Base for devices. Subclasses set ``device_type``, ``queue_max_sizes`` and
    ``features`` and implement ``process_queue`` (and config space if they have one)."""

    device_type = 0
    queue_max_sizes: tuple[int, ...] = (256,)
    features = 1 << V.VIRTIO_F_VERSION_1

    def __init__(self) -> None:
        self.acked = 0
        # Set by the host (the core, or a vhost-user session): devices with host-side
        # event sources (a TAP, host input, timers, pool completions) take the lock, and
        # report what goes wrong there through ``fail`` so the host can set NEEDS_RESET
        # (or stop the ring), exactly as for a fault in a kick.
        self.core_lock: threading.RLock = threading.RLock()
        self.on_fault: Callable[[int, Exception], None] | None = None
        self.faults = OnceLog()
        self.mem: GuestMemory | None = None
        self.queues: list[Virtqueue | None] = []
        self.irq: VirtioInterrupt | None = None
        self.requests = 0
        self.bytes = 0

    def config_bytes(self) -> bytes:
        return b""

    def metrics(self) -> dict[str, int]:
        """Counters for the exit report (a device adds its own)."""
        return {"requests": self.requests, "bytes": self.bytes}

    def read_config(self, offset: int, size: int) -> int:
        data = self.config_bytes()
        if offset < 0 or offset + size > len(data):
            return 0
        return int.from_bytes(data[offset:offset + size], "little")

    def write_config(self, offset: int, size: int, value: int) -> None:
        pass  # read-only unless a device says otherwise

    def activate(self, mem: GuestMemory, queues: list[Virtqueue | None],
                 irq: VirtioInterrupt) -> None:
        self.mem, self.queues, self.irq = mem, queues, irq

    def reset(self) -> None:
        self.acked = 0
        self.mem, self.queues, self.irq = None, [], None

    def process_queue(self, index: int) -> None:
        raise NotImplementedError

    def has(self, bit: int) -> bool:
        return bool(self.acked & (1 << bit))

    def queue(self, index: int) -> Virtqueue:
        vq = self.queues[index]
        assert vq is not None and self.mem is not None  # the core checked before calling
        return vq

    def fail(self, index: int, e: Exception) -> None:
        """Device work the host started (not a kick) raised ``e`` on queue ``index``:
        hand it to the host's fault handling, the one place that decides what a fault
        means (the caller holds ``core_lock``)."""
        if self.on_fault is not None:
            self.on_fault(index, e)
        else:  # not attached to a host (a unit test): still log it once
            self.faults.warn(f"{type(e).__name__}", f"virtio {type(self).__name__}: queue "
                             f"{index}: {e!r} with no host to report it to")

    def complete(self, vq: Virtqueue, chain: DescriptorChain, written: int) -> None:
        """add_used and interrupt if the driver wants one (EVENT_IDX honoured)."""
        vq.add_used(chain, written)
        if vq.needs_interrupt() and self.irq is not None:
            self.irq.signal_queue(vq)


class VirtioCore:
    def __init__(self, device: VirtioDevice, mem: GuestMemory) -> None:
        self.device = device
        self.mem = mem
        self.queues = [QueueConfig(n) for n in device.queue_max_sizes]
        self.lock = threading.RLock()  # vCPU (registers) and event loop (queues)
        device.core_lock = self.lock
        device.on_fault = self.fault
        self.errors = OnceLog()
        self.bugs = 0  # exceptions that were not a guest fault: VMM bugs, contained
        self.irq: VirtioInterrupt | None = None
        self.needs_reset_count = 0
        self.notifications = 0
        self.ignored_notifications = 0
        self.reset()

    def metrics(self) -> dict[str, int]:
        return {"notifications": self.notifications, "needs_reset": self.needs_reset_count,
                "bugs": self.bugs}

    def reset(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.config_generation = 0
        self.active = False
        for q in self.queues:
            q.reset()
        self.device.reset()

    # --- features ----------------------------------------------------------------------
    def device_features_word(self, sel: int) -> int:
        return (self.device.features >> (32 * sel)) & 0xFFFFFFFF if sel < 2 else 0

    def set_driver_features_word(self, sel: int, value: int) -> None:
        if self.status & V.VIRTIO_CONFIG_S_FEATURES_OK or sel > 1:
            self.errors.warn("features-late", "driver wrote features after FEATURES_OK or "
                             "beyond word 1; ignored")
            return
        shift = 32 * sel
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (
            (value & 0xFFFFFFFF) << shift)

    # --- status ------------------------------------------------------------------------
    def set_status(self, value: int) -> None:
        value &= 0xFF
        with self.lock:
            if value == 0:
                self.reset()
                return
            if value & ~self.status & V.VIRTIO_CONFIG_S_NEEDS_RESET:
                value &= ~V.VIRTIO_CONFIG_S_NEEDS_RESET  # the driver cannot set it
            if self.status & ~value & ~V.VIRTIO_CONFIG_S_NEEDS_RESET:
                self.errors.warn("status-clear", f"driver cleared status bits "
                                 f"{self.status:#x} -> {value:#x} without reset; ignored")
                return
            new = value & ~self.status
            if new & V.VIRTIO_CONFIG_S_FEATURES_OK and not self._features_ok():
                value &= ~V.VIRTIO_CONFIG_S_FEATURES_OK  # the driver reads back failure
            self.status = value | (self.status & V.VIRTIO_CONFIG_S_NEEDS_RESET)
            if new & V.VIRTIO_CONFIG_S_DRIVER_OK:
                self._activate()

    def _features_ok(self) -> bool:
        f = self.driver_features
        if f & ~self.device.features:
            self.errors.warn("features-extra", f"driver accepted features {f:#x} the device "
                             f"does not offer ({self.device.features:#x})")
            return False
        if not f & (1 << V.VIRTIO_F_VERSION_1):
            self.errors.warn("features-legacy", "driver did not accept VIRTIO_F_VERSION_1")
            return False
        self.device.acked = f
        return True

    def _activate(self) -> None:
        if not self.status & V.VIRTIO_CONFIG_S_FEATURES_OK:
            self.needs_reset("DRIVER_OK without FEATURES_OK")
            return
        if self.irq is None:
            self.needs_reset("no interrupt path")
            return
        vqs: list[Virtqueue | None] = []
        for i, q in enumerate(self.queues):
            if not q.ready:
                vqs.append(None)
                continue
            try:
                vqs.append(start_queue(self.mem, q, self.device.acked))
            except VirtqueueError as e:
                self.needs_reset(f"queue {i}: {e}")
                return
        try:
            self.device.activate(self.mem, vqs, self.irq)
        except Exception as e:  # a device whose start failed (its backend, say) never runs
            self.fault(0, e)
            return
        self.active = True

    def memory_removed(self, start: int, size: int) -> None:
        """Guest memory [start, start + size) goes away (vfio-user DMA_UNMAP). Requests in
        the device's I/O pool finish first (they may write there); a running queue with
        its rings there cannot go on: the device stops (DEVICE_NEEDS_RESET) and the
        queues' views are released, so the unmap really unmaps."""
        drain = getattr(self.device, "drain", None)
        if drain is not None and not drain():  # outside the lock: completions take it
            self.errors.warn("unmap-drain", "virtio: device I/O still in flight at unmap")
        with self.lock:
            end = start + size
            hit = [i for i, vq in enumerate(self.device.queues) if vq is not None and any(
                a < end and start < a + n for a, n in vq.ranges())]
            if not hit:
                return
            queues = list(self.device.queues)
            self.device.reset()  # nothing runs on the old queues any more (TAP reads too)
            for vq in queues:
                if vq is not None:
                    vq.release()
            self.needs_reset(f"queue {hit[0]}: guest memory under its rings was unmapped")

    def needs_reset(self, why: str) -> None:
        self.needs_reset_count += 1
        self.errors.warn(f"needs-reset:{why.split(':')[0]}",
                         f"virtio {type(self.device).__name__}: {why}; DEVICE_NEEDS_RESET")
        self.active = False
        if self.status & V.VIRTIO_CONFIG_S_DRIVER_OK:
            self.status |= V.VIRTIO_CONFIG_S_NEEDS_RESET
            self.config_generation = (self.config_generation + 1) & 0xFF
            if self.irq is not None:
                self.irq.signal_config()
        else:
            self.status |= V.VIRTIO_CONFIG_S_NEEDS_RESET

    # --- notifications (event loop, or the vCPU without ioeventfd) -----------------------
    def notify(self, index: int) -> None:
        with self.lock:
            self.notifications += 1
            if not self.active:
                self.ignored_notifications += 1
                self.errors.warn("notify-inactive", "queue notification before DRIVER_OK "
                                 "or after NEEDS_RESET; ignored")
                return
            if not 0 <= index < len(self.queues) or self.device.queues[index] is None:
                self.ignored_notifications += 1
                self.errors.warn("notify-index", f"notification for queue {index}, which is "
                                 "not set up; ignored")
                return
            try:
                self.device.process_queue(index)
            except Exception as e:
                self.fault(index, e)

    def fault(self, index: int, e: Exception) -> None:
        """Every exception out of device work (kick or host event) ends here: a guest's
        broken ring or address is what NEEDS_RESET is for, and so is a backend process
        that broke the protocol or went away (``BackendError``); anything else is a VMM bug,
        contained the same way (the device's state may be half updated, so it stops
        until the driver resets it) and counted."""
        if isinstance(e, VirtqueueError | GuestMemoryError | BackendError):
            self.needs_reset(f"queue {index}: {e}")
            return
        self.bugs += 1
        self.errors.warn(f"bug:{type(e).__name__}", f"virtio {type(self.device).__name__}: "
                         f"VMM bug on queue {index}: {e!r}; contained")
        self.needs_reset(f"queue {index}: internal error {type(e).__name__}")
