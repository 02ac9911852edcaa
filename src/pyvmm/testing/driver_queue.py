"""The driver's side of a split virtqueue, over guest memory, for device tests.

``DriverQueue`` lays out a descriptor table and rings in a ``GuestMemory``, places
buffers, publishes chains (direct or through an indirect table), and reads the used
ring back — what a virtio driver does, so a device can be tested without a guest.
It can also write deliberately broken chains (loops, bad addresses) for the tests
of malicious input.
"""

from __future__ import annotations

import struct

from pyvmm.devices.virtio.queue import QueueConfig
from pyvmm.memory import GuestMemory
from pyvmm.uapi import virtio as V


class DriverQueue:
    def __init__(self, mem: GuestMemory, size: int = 16, base: int = 0x10000,
                 buffers: int = 0x40000) -> None:
        self.mem, self.size = mem, size
        self.desc = base
        self.avail = base + 16 * size
        self.used = (self.avail + 6 + 2 * size + 3) & ~3
        self.next_buf = buffers
        self.free = 0
        self.avail_idx = 0
        self.last_used = 0
        mem.write(self.desc, bytes(16 * size))
        mem.write(self.avail, bytes(6 + 2 * size))
        mem.write(self.used, bytes(6 + 8 * size))

    def config(self) -> QueueConfig:
        q = QueueConfig(self.size)
        q.desc, q.avail, q.used, q.ready = self.desc, self.avail, self.used, True
        return q

    def alloc(self, data: bytes | int) -> int:
        """Place a buffer (bytes, or a size to zero-fill); returns its address."""
        raw = bytes(data) if isinstance(data, int) else data
        addr = self.next_buf
        self.mem.write(addr, raw)
        self.next_buf = (addr + max(len(raw), 1) + 63) & ~63
        return addr

    def write_desc(self, table: int, i: int, addr: int, length: int, flags: int,
                   nxt: int) -> None:
        self.mem.write(table + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))

    def add(self, bufs: list[tuple[int, int, bool]], indirect: bool = False) -> int:
        """Publish a chain of (addr, len, device_writable); returns its head index."""
        head = self.free
        if indirect:
            table = self.alloc(16 * len(bufs))
            for i, (a, n, w) in enumerate(bufs):
                more = i + 1 < len(bufs)
                self.write_desc(table, i, a, n, (V.VRING_DESC_F_WRITE if w else 0)
                                | (V.VRING_DESC_F_NEXT if more else 0), i + 1 if more else 0)
            self.write_desc(self.desc, head, table, 16 * len(bufs), V.VRING_DESC_F_INDIRECT, 0)
            self.free = (self.free + 1) % self.size
        else:
            for i, (a, n, w) in enumerate(bufs):
                idx = (head + i) % self.size
                more = i + 1 < len(bufs)
                self.write_desc(self.desc, idx, a, n, (V.VRING_DESC_F_WRITE if w else 0)
                                | (V.VRING_DESC_F_NEXT if more else 0),
                                (idx + 1) % self.size if more else 0)
            self.free = (self.free + len(bufs)) % self.size
        self.publish(head)
        return head

    def publish(self, head: int) -> None:
        self.mem.write(self.avail + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def set_avail_idx(self, idx: int) -> None:
        self.mem.write(self.avail + 2, struct.pack("<H", idx & 0xFFFF))

    def used_idx(self) -> int:
        return int(struct.unpack("<H", self.mem.read(self.used + 2, 2))[0])

    def take_used(self) -> list[tuple[int, int]]:
        """(head, written) for every used element since the last call."""
        out = []
        while self.last_used != self.used_idx():
            slot = self.last_used % self.size
            out.append(struct.unpack("<II", self.mem.read(self.used + 4 + 8 * slot, 8)))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def set_used_event(self, v: int) -> None:
        self.mem.write(self.avail + 4 + 2 * self.size, struct.pack("<H", v))

    def set_no_interrupt(self, on: bool) -> None:
        self.mem.write(self.avail, struct.pack("<H", V.VRING_AVAIL_F_NO_INTERRUPT if on else 0))
