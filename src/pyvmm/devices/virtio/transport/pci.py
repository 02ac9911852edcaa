"""Virtio over PCI, modern interface (virtio 1.2 §4.1).

BAR 0 (16 KiB memory) holds the common configuration at 0x0000, the ISR byte at
0x1000, the device configuration at 0x2000 and the notification area at 0x3000
(queue n at 0x3000 + 4n; notify_off_multiplier 4). BAR 1 holds the MSI-X table and
PBA, one vector per queue plus one for configuration changes. A
VIRTIO_PCI_CAP_PCI_CFG capability reaches both BARs through config space. Interrupts go by MSI-X
when the driver enables it, else by INTx with the ISR byte (read-to-clear).

Notifications: when BAR 0 is mapped, each queue's notify address gets an ioeventfd,
so a guest kick never exits to the VMM; the event loop runs the device. Without one
(a unit test, or a host without the capability), the write exits and is handed to
the event loop the same way. A device whose queues another process serves (vhost-user)
may take a queue's ioeventfd and its MSI-X vector's irqfd (``notify_fd``,
``interrupt_fd``): then neither a kick nor its interrupt passes through the VMM. The
event loop watches the ioeventfd again once the driver resets the device.

What a malicious driver can do: write any register at any width. Accesses that do
not match a field are ignored (reads return 0) and counted; queue selection beyond
the device's queues reads as size 0; everything about queues is checked at
DRIVER_OK by the core, which answers mistakes with DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import functools
import os
import struct
from collections.abc import Callable
from typing import Protocol

from pyvmm.devices.pci.config_space import BarChange, PCIConfigSpace
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.devices.pci.msix import MsixCapability
from pyvmm.devices.virtio.core import VirtioCore, VirtioDevice
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.irq.msi import MsiSink
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import pci as P
from pyvmm.uapi import virtio as V

COMMON_OFF, ISR_OFF, DEVICE_OFF, NOTIFY_OFF = 0x0000, 0x1000, 0x2000, 0x3000
NOTIFY_MULTIPLIER = 4
BAR_REGS, BAR_MSIX = 0, 1
REGS_SIZE = 0x4000
CLASS_BY_TYPE = {V.VIRTIO_ID_BLOCK: 0x018000, V.VIRTIO_ID_NET: 0x020000,
                 V.VIRTIO_ID_CONSOLE: 0x078000, V.VIRTIO_ID_RNG: 0x00FF00}


class NotifyFastPath(Protocol):
    """The machine's ioeventfd service: a guest write of ``length`` bytes at ``addr``
    runs ``callback`` on the event loop without a vCPU exit."""

    def add(self, addr: int, length: int, callback: Callable[[], None],
            datamatch: int | None = None) -> object: ...

    def remove(self, handle: object) -> None: ...

    def detach(self, handle: object) -> int:
        """Stop running the callback (another process reads the eventfd); the fd."""
        ...

    def reattach(self, handle: object) -> None: ...


def _immediate(fn: Callable[[], None]) -> None:
    fn()


class VirtioPciDevice(PCIDevice):
    def __init__(self, device: VirtioDevice, mem: GuestMemory, msi: MsiSink, *,
                 defer: Callable[[Callable[[], None]], None] = _immediate,
                 fast_path: NotifyFastPath | None = None) -> None:
        super().__init__()
        self.device = device
        self.name = f"virtio-pci-{type(device).__name__.lower().removeprefix('virtio')}"
        self.core = VirtioCore(device, mem)
        self.core.irq = self
        self.defer, self.fast_path = defer, fast_path
        self.errors = OnceLog()
        self.bad_accesses = 0
        self.queue_sel = 0
        self.dfselect = self.gfselect = 0
        self.msix_config = V.VIRTIO_MSI_NO_VECTOR
        self.isr = 0
        self.interrupts = 0
        self._notify_handles: list[object] = []
        self._handed: set[int] = set()  # queues whose ioeventfd a device took
        nq = len(device.queue_max_sizes)
        c = self.config = PCIConfigSpace(
            V.PCI_VENDOR_ID_REDHAT_QUMRANET,
            V.VIRTIO_PCI_MODERN_DEVICE_ID_BASE + device.device_type,
            CLASS_BY_TYPE.get(device.device_type, 0xFF0000), revision=1,
            subsystem_vendor_id=V.PCI_VENDOR_ID_REDHAT_QUMRANET, subsystem_id=0x40)
        c.data[P.PCI_INTERRUPT_PIN] = 1
        c.add_bar(BAR_REGS, REGS_SIZE)
        c.add_bar(BAR_MSIX, 0x1000)
        for cfg_type, off, length in ((V.VIRTIO_PCI_CAP_COMMON_CFG, COMMON_OFF,
                                       V.VIRTIO_PCI_COMMON_SIZE),
                                      (V.VIRTIO_PCI_CAP_ISR_CFG, ISR_OFF, 1),
                                      (V.VIRTIO_PCI_CAP_DEVICE_CFG, DEVICE_OFF, 0x1000)):
            c.add_capability(P.PCI_CAP_ID_VNDR, struct.pack("<BBBB2xII", 16, cfg_type,
                                                            BAR_REGS, 0, off, length))
        c.add_capability(P.PCI_CAP_ID_VNDR, struct.pack(
            "<BBBB2xIII", 20, V.VIRTIO_PCI_CAP_NOTIFY_CFG, BAR_REGS, 0, NOTIFY_OFF,
            NOTIFY_MULTIPLIER * nq, NOTIFY_MULTIPLIER))
        # VIRTIO_PCI_CAP_PCI_CFG (§4.1.4.9): a window in config space onto any BAR, for
        # drivers (firmware) that cannot map BARs. The driver writes bar/offset/length
        # into the capability; pci_cfg_data then reads or writes those BAR bytes.
        self.cfg_cap = c.add_capability(
            P.PCI_CAP_ID_VNDR, struct.pack("<BBBB2xII4x", 20, V.VIRTIO_PCI_CAP_PCI_CFG, 0, 0,
                                           0, 0),
            body_wmask=struct.pack("<BBBB2xII4s", 0, 0, 0xFF, 0, 0xFFFFFFFF, 0xFFFFFFFF,
                                   b"\xff" * 4))
        self.msix = MsixCapability(c, msi, vectors=nq + 1, bar=BAR_MSIX)

    # --- VirtioInterrupt -----------------------------------------------------------------
    def signal_queue(self, vq: Virtqueue) -> None:
        self.interrupts += 1
        if self.msix.enabled or self.msix.direct is not None:
            if vq.msix_vector != V.VIRTIO_MSI_NO_VECTOR:
                self.msix.trigger(vq.msix_vector)
            return
        self.isr |= V.VIRTIO_PCI_ISR_QUEUE
        self.set_intx(True)

    def signal_config(self) -> None:
        self.interrupts += 1
        if self.msix.enabled or self.msix.direct is not None:
            if self.msix_config != V.VIRTIO_MSI_NO_VECTOR:
                self.msix.trigger(self.msix_config)
            return
        self.isr |= V.VIRTIO_PCI_ISR_CONFIG
        self.set_intx(True)

    # --- QueueEventfds: for a device whose queues another process serves ------------------
    def notify_fd(self, queue: int) -> int | None:
        fp = self.fast_path
        if fp is None or not 0 <= queue < len(self._notify_handles):
            return None
        fd = os.dup(fp.detach(self._notify_handles[queue]))
        self._handed.add(queue)
        return fd

    def interrupt_fd(self, queue: int) -> int | None:
        if not self.msix.enabled or not 0 <= queue < len(self.core.queues):
            return None  # INTx: the ISR byte needs the VMM
        fd = self.msix.irqfd(self.core.queues[queue].msix_vector)  # None for NO_VECTOR
        return None if fd is None else os.dup(fd)

    def _reclaim_notify(self) -> None:
        """The device was reset: the event loop watches the handed-over ioeventfds again."""
        if self.fast_path is not None:
            for q in self._handed:
                if q < len(self._notify_handles):
                    self.fast_path.reattach(self._notify_handles[q])
        self._handed.clear()

    # --- the PCI configuration access capability ----------------------------------------
    def _cfg_window(self, offset: int, size: int) -> tuple[int, int, int] | None:
        """(bar, bar offset, length) if this access is to pci_cfg_data and the window the
        driver set up is usable; None for every other config access."""
        data = self.cfg_cap + 16
        if not (data <= offset and offset + size <= data + 4) or size not in (1, 2, 4):
            return None
        c = self.config
        bar, off, length = c.data[self.cfg_cap + 4], c.get32(self.cfg_cap + 8), c.get32(
            self.cfg_cap + 12)
        if length not in (1, 2, 4) or off % length or bar not in (BAR_REGS, BAR_MSIX):
            self._bad("pci-cfg-window", off, length)  # the spec leaves this undefined
            return (-1, 0, 0)
        return bar, off, length

    def config_read(self, offset: int, size: int) -> int:
        w = self._cfg_window(offset, size)
        if w is None:
            return super().config_read(offset, size)
        bar, off, length = w
        return 0 if bar < 0 else self.read_bar(bar, off, length) & ((1 << (8 * size)) - 1)

    def config_write(self, offset: int, size: int, value: int) -> list[BarChange]:
        w = self._cfg_window(offset, size)
        if w is None:
            return super().config_write(offset, size, value)
        bar, off, length = w
        if bar >= 0:
            self.write_bar(bar, off, length, value & ((1 << (8 * length)) - 1))
        return []

    # --- BARs ------------------------------------------------------------------------------
    def bar_moved(self, index: int, new: int | None) -> None:
        if index != BAR_REGS or self.fast_path is None:
            return
        for h in self._notify_handles:
            self.fast_path.remove(h)
        self._notify_handles = []
        # A device holding the old eventfds keeps its dups; the guest's kicks at the new
        # address are watched by the event loop and reach it through process_queue.
        self._handed.clear()
        if new is None:
            return
        for q in range(len(self.core.queues)):
            self._notify_handles.append(self.fast_path.add(
                new + NOTIFY_OFF + NOTIFY_MULTIPLIER * q, 2,
                functools.partial(self.core.notify, q)))

    def read_bar(self, index: int, offset: int, size: int) -> int:
        with self.core.lock:
            if index == BAR_MSIX:
                return self.msix.read(offset, size)
            if index != BAR_REGS:
                return 0
            if offset < ISR_OFF:
                return self._common_read(offset, size)
            if offset == ISR_OFF:
                v, self.isr = self.isr, 0
                self.set_intx(False)
                return v
            if DEVICE_OFF <= offset < NOTIFY_OFF:
                return self.device.read_config(offset - DEVICE_OFF, size)
            return 0

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        if index == BAR_REGS and offset >= NOTIFY_OFF:
            q = (offset - NOTIFY_OFF) // NOTIFY_MULTIPLIER
            self.defer(lambda: self.core.notify(q))
            return
        with self.core.lock:
            if index == BAR_MSIX:
                self.msix.write(offset, size, value)
            elif index == BAR_REGS and offset < ISR_OFF:
                self._common_write(offset, size, value)
            elif index == BAR_REGS and DEVICE_OFF <= offset < NOTIFY_OFF:
                self.device.write_config(offset - DEVICE_OFF, size, value)

    # --- common configuration -------------------------------------------------------------
    def _bad(self, what: str, offset: int, size: int) -> int:
        self.bad_accesses += 1
        self.errors.warn(f"common-{what}", f"{self.name}: {what} of {size} bytes at common "
                         f"config offset {offset:#x} matches no field; ignored")
        return 0

    def _queue(self) -> object | None:
        qs = self.core.queues
        return qs[self.queue_sel] if self.queue_sel < len(qs) else None

    def _common_read(self, off: int, size: int) -> int:
        core, q = self.core, self._queue()
        simple = {
            (V.VIRTIO_PCI_COMMON_DFSELECT, 4): lambda: self.dfselect,
            (V.VIRTIO_PCI_COMMON_DF, 4): lambda: core.device_features_word(self.dfselect),
            (V.VIRTIO_PCI_COMMON_GFSELECT, 4): lambda: self.gfselect,
            (V.VIRTIO_PCI_COMMON_GF, 4): lambda: (
                core.driver_features >> (32 * self.gfselect)) & 0xFFFFFFFF
            if self.gfselect < 2 else 0,
            (V.VIRTIO_PCI_COMMON_MSIX, 2): lambda: self.msix_config,
            (V.VIRTIO_PCI_COMMON_NUMQ, 2): lambda: len(core.queues),
            (V.VIRTIO_PCI_COMMON_STATUS, 1): lambda: core.status,
            (V.VIRTIO_PCI_COMMON_CFGGENERATION, 1): lambda: core.config_generation,
            (V.VIRTIO_PCI_COMMON_Q_SELECT, 2): lambda: self.queue_sel,
            (V.VIRTIO_PCI_COMMON_Q_NOFF, 2): lambda: self.queue_sel,
        }
        fn = simple.get((off, size))
        if fn is not None:
            return int(fn())
        if q is None:
            return 0 if (off, size) in _QUEUE_FIELDS else self._bad("read", off, size)
        field = _QUEUE_FIELDS.get((off, size))
        if field is None:
            return self._bad("read", off, size)
        attr, shift = field
        return (int(getattr(q, attr)) >> shift) & ((1 << (8 * size)) - 1)

    def _common_write(self, off: int, size: int, value: int) -> None:
        core, q = self.core, self._queue()
        if (off, size) == (V.VIRTIO_PCI_COMMON_DFSELECT, 4):
            self.dfselect = value
        elif (off, size) == (V.VIRTIO_PCI_COMMON_GFSELECT, 4):
            self.gfselect = value
        elif (off, size) == (V.VIRTIO_PCI_COMMON_GF, 4):
            core.set_driver_features_word(self.gfselect, value)
        elif (off, size) == (V.VIRTIO_PCI_COMMON_MSIX, 2):
            self.msix_config = value
        elif (off, size) == (V.VIRTIO_PCI_COMMON_STATUS, 1):
            core.set_status(value)
            if value == 0:
                self.msix_config = V.VIRTIO_MSI_NO_VECTOR
                self.isr = 0
                self.set_intx(False)
                self._reclaim_notify()
        elif (off, size) == (V.VIRTIO_PCI_COMMON_Q_SELECT, 2):
            self.queue_sel = value
        elif (off, size) in _QUEUE_FIELDS:
            if q is None or core.status & V.VIRTIO_CONFIG_S_DRIVER_OK:
                # Queue registers are frozen once the device runs (§4.1.4.3.2).
                self._bad("late-queue-write", off, size)
                return
            attr, shift = _QUEUE_FIELDS[(off, size)]
            if attr == "max_size":
                return  # read-only
            if attr == "ready":
                q.ready = bool(value & 1)  # type: ignore[attr-defined]
            elif shift or (size == 4 and attr in ("desc", "avail", "used")):
                old = int(getattr(q, attr))
                mask = 0xFFFFFFFF << shift
                setattr(q, attr, (old & ~mask) | ((value & 0xFFFFFFFF) << shift))
            else:
                setattr(q, attr, value & ((1 << (8 * size)) - 1))
        else:
            self._bad("write", off, size)

    def metrics(self) -> dict[str, int]:
        return {**self.device.metrics(), **self.core.metrics(), "interrupts": self.interrupts}

    def reset(self) -> None:
        with self.core.lock:
            self.core.set_status(0)
            self._reclaim_notify()

    def dma_unmapped(self, start: int, size: int) -> None:
        self.core.memory_removed(start, size)


# (offset, size) -> (QueueConfig attribute, bit shift)
_QUEUE_FIELDS: dict[tuple[int, int], tuple[str, int]] = {
    (V.VIRTIO_PCI_COMMON_Q_SIZE, 2): ("size", 0),
    (V.VIRTIO_PCI_COMMON_Q_MSIX, 2): ("msix_vector", 0),
    (V.VIRTIO_PCI_COMMON_Q_ENABLE, 2): ("ready", 0),
    (V.VIRTIO_PCI_COMMON_Q_DESCLO, 4): ("desc", 0),
    (V.VIRTIO_PCI_COMMON_Q_DESCHI, 4): ("desc", 32),
    (V.VIRTIO_PCI_COMMON_Q_AVAILLO, 4): ("avail", 0),
    (V.VIRTIO_PCI_COMMON_Q_AVAILHI, 4): ("avail", 32),
    (V.VIRTIO_PCI_COMMON_Q_USEDLO, 4): ("used", 0),
    (V.VIRTIO_PCI_COMMON_Q_USEDHI, 4): ("used", 32),
}
