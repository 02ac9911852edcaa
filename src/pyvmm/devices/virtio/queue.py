"""Split virtqueues (virtio 1.2 §2.7), read from guest memory at the moment of use.

``QueueConfig`` is what the driver programs through the transport; at DRIVER_OK it
becomes a ``Virtqueue``. Chains are walked lazily and never validated up front and
trusted later: each descriptor is read when it is used, every address is
bounds-checked by ``GuestMemory``, an indirect table is followed once (an indirect
descriptor inside one is an error), and a chain stops being walked after as many
descriptors as the queue (or table) holds, so a loop cannot hang the device. Any
violation raises :class:`VirtqueueError`; the core then sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

from pyvmm.errors import GuestMemoryError, PyvmmError
from pyvmm.memory import GuestMemory
from pyvmm.uapi import virtio as V

_desc = struct.Struct("<QIHH")
_u16 = struct.Struct("<H")
_used_elem = struct.Struct("<II")


class VirtqueueError(PyvmmError):
    """The driver broke the virtqueue rules; the device must need a reset."""


@dataclass
class QueueConfig:
    max_size: int
    size: int = 0
    ready: bool = False
    desc: int = 0
    avail: int = 0
    used: int = 0
    msix_vector: int = V.VIRTIO_MSI_NO_VECTOR

    def __post_init__(self) -> None:
        self.size = self.max_size

    def reset(self) -> None:
        self.size, self.ready = self.max_size, False
        self.desc = self.avail = self.used = 0
        self.msix_vector = V.VIRTIO_MSI_NO_VECTOR

    def problem(self) -> str | None:
        """Why this configuration cannot be used, or None (checked at activation)."""
        s = self.size
        if s == 0 or s > self.max_size or s & (s - 1):
            return f"queue size {s} is not a power of two up to {self.max_size}"
        if self.desc % 16 or self.avail % 2 or self.used % 4:
            return "queue addresses are misaligned"
        return None


@dataclass(frozen=True, slots=True)
class Descriptor:
    addr: int
    len: int
    write: bool


class DescriptorChain:
    """One request: the head index and its descriptors, walked on iteration."""

    def __init__(self, queue: Virtqueue, head: int) -> None:
        self.queue, self.head = queue, head

    def __iter__(self) -> Iterator[Descriptor]:
        q = self.queue
        table, limit = q.desc, q.size
        index, seen, indirect = self.head, 0, False
        while True:
            if index >= limit:
                raise VirtqueueError(f"descriptor index {index} beyond table of {limit}")
            seen += 1
            if seen > limit:
                raise VirtqueueError("descriptor chain longer than its table (a loop?)")
            addr, length, flags, nxt = _desc.unpack(q.read(table + 16 * index, 16))
            if flags & V.VRING_DESC_F_INDIRECT:
                if indirect or not q.indirect_ok:
                    raise VirtqueueError("nested or unnegotiated indirect descriptor")
                if length == 0 or length % 16 or flags & V.VRING_DESC_F_NEXT:
                    raise VirtqueueError(f"bad indirect table length {length}")
                table, limit, index, seen, indirect = addr, length // 16, 0, 0, True
                continue
            yield Descriptor(addr, length, bool(flags & V.VRING_DESC_F_WRITE))
            if not flags & V.VRING_DESC_F_NEXT:
                return
            index = nxt

    def descriptors(self) -> list[Descriptor]:
        return list(self)


class Virtqueue:
    def __init__(self, mem: GuestMemory, cfg: QueueConfig, *, event_idx: bool = False,
                 indirect: bool = False) -> None:
        self.mem = mem
        self.size = cfg.size
        self.desc, self.avail, self.used = cfg.desc, cfg.avail, cfg.used
        self.msix_vector = cfg.msix_vector
        self.event_idx = event_idx
        self.indirect_ok = indirect
        self.last_avail = 0
        self.used_idx = 0
        self.signalled_used: int | None = None  # used idx at the last interrupt
        # The rings must lie in guest RAM as a whole; checked once here and again on
        # every access (the guest may remove nothing, but a bug must not crash us).
        for base, n, what in ((self.desc, 16 * self.size, "descriptor table"),
                              (self.avail, 6 + 2 * self.size, "available ring"),
                              (self.used, 6 + 8 * self.size, "used ring")):
            if not mem.contains(base, n):
                raise VirtqueueError(f"{what} at {base:#x} is outside guest memory")

    def read(self, addr: int, n: int) -> bytes:
        try:
            return self.mem.read(addr, n)
        except GuestMemoryError as e:
            raise VirtqueueError(str(e)) from None

    def _u16(self, addr: int) -> int:
        return int(_u16.unpack(self.read(addr, 2))[0])

    def _put_u16(self, addr: int, v: int) -> None:
        self.mem.write(addr, _u16.pack(v & 0xFFFF))

    def avail_idx(self) -> int:
        return self._u16(self.avail + 2)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None."""
        avail_idx = self.avail_idx()
        pending = (avail_idx - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(f"available index moved by {pending} > queue size {self.size}")
        slot = self.last_avail % self.size
        head = self._u16(self.avail + 4 + 2 * slot)
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.event_idx:
            # avail_event: ask to be notified when the driver adds past what we took.
            self._put_u16(self.used + 4 + 8 * self.size, self.last_avail)
        return DescriptorChain(self, head)

    def add_used(self, chain: DescriptorChain, written: int) -> None:
        slot = self.used_idx % self.size
        self.mem.write(self.used + 4 + 8 * slot, _used_elem.pack(chain.head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._put_u16(self.used + 2, self.used_idx)  # x86 is TSO: ring entry lands first

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was added since the last one."""
        new = self.used_idx
        old = self.signalled_used
        self.signalled_used = new
        if self.event_idx:
            used_event = self._u16(self.avail + 4 + 2 * self.size)
            if old is None:
                return True
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not self._u16(self.avail) & V.VRING_AVAIL_F_NO_INTERRUPT
