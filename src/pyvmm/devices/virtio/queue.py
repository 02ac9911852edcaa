"""Split virtqueues (virtio 1.2 §2.7), read from guest memory at the moment of use.

``QueueConfig`` is what the driver programs through the transport; at DRIVER_OK it
becomes a ``Virtqueue``. Chains are walked lazily and never validated up front and
trusted later: each descriptor is read when it is used, every address is
bounds-checked by ``GuestMemory``, an indirect table is followed once (an indirect
descriptor inside one is an error), and a chain stops being walked after as many
descriptors as the queue holds (indirect tables too: §2.7.5.3.1), so a loop cannot
hang the device. Any violation raises :class:`VirtqueueError`; the core then sets
DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import ctypes
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple, Protocol

from pyvmm.errors import GuestMemoryError, PyvmmError
from pyvmm.memory import GuestMemory
from pyvmm.uapi import virtio as V

# Native formats ('@'): CPython packs and unpacks them with one memcpy per field, while
# '<' formats go byte by byte. Ring memory is shared with a running guest, so a 16-bit
# index read or written byte-wise can tear (seen: "available index moved by 130").
# The indices themselves go through ctypes objects: single 16-bit loads and stores.
_desc = struct.Struct("@QIHH")
_u16 = struct.Struct("@H")
_used_elem = struct.Struct("@II")
_F_NEXT, _F_WRITE, _F_INDIRECT = V.VRING_DESC_F_NEXT, V.VRING_DESC_F_WRITE, V.VRING_DESC_F_INDIRECT


class InflightLog(Protocol):
    """Where a queue records the heads it took and has not yet used (vhost-user's
    inflight region), so that a successor process can serve them again."""

    def get(self, head: int) -> None: ...

    def pre_put(self, head: int) -> None: ...

    def post_put(self, head: int, used_idx: int) -> None: ...


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


class Descriptor(NamedTuple):
    # A tuple, not a frozen dataclass: built three times per request, and a frozen
    # dataclass's __init__ costs ~0.5 µs each in CPython 3.11.
    addr: int
    len: int
    write: bool


class DescriptorChain:
    """One request: the head index and its descriptors, walked when asked for."""

    def __init__(self, queue: Virtqueue, head: int) -> None:
        self.queue, self.head = queue, head

    def __iter__(self) -> Iterator[Descriptor]:
        return iter(self.descriptors())

    def descriptors(self) -> list[Descriptor]:
        """Walk the chain now (a plain loop: this is the per-request hot path)."""
        q = self.queue
        table, limit = q.desc_view, q.size
        index, seen, indirect = self.head, 0, False
        # No chain may be longer than the queue (§2.7.5.3.1), indirect or not: this also
        # bounds a loop in a huge indirect table to queue-size steps.
        max_seen = q.size
        out: list[Descriptor] = []
        unpack = _desc.unpack_from
        while True:
            if index >= limit:
                raise VirtqueueError(f"descriptor index {index} beyond table of {limit}")
            seen += 1
            if seen > max_seen:
                raise VirtqueueError("descriptor chain longer than the queue (a loop?)")
            # The main table is a view validated at activation; an indirect table gets a
            # view of its own when it is entered. Entries are read when walked, never
            # validated ahead and trusted later.
            addr, length, flags, nxt = unpack(table, 16 * index)
            if flags & _F_INDIRECT:
                if indirect or not q.indirect_ok:
                    raise VirtqueueError("nested or unnegotiated indirect descriptor")
                if length == 0 or length % 16 or flags & _F_NEXT:
                    raise VirtqueueError(f"bad indirect table length {length}")
                # The indirect descriptor stands for its table's entries: it does not
                # count itself, and ``seen`` carries on (not from 0), so a whole chain —
                # main-table part plus table — is at most queue-size descriptors.
                table, limit, index, indirect = q.view(addr, length), length // 16, 0, True
                seen -= 1
                continue
            out.append(Descriptor(addr, length, bool(flags & _F_WRITE)))
            if not flags & _F_NEXT:
                return out
            index = nxt


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
        # The table and rings must each lie within one RAM region. Checked once here;
        # after that they are accessed through views of exactly their size, so every
        # access stays bounds-checked (by the view) without a region lookup each time,
        # which was most of the per-request cost (docs/benchmarks.md).
        views = []
        for base, n, what in ((self.desc, 16 * self.size, "descriptor table"),
                              (self.avail, 6 + 2 * self.size, "available ring"),
                              (self.used, 6 + 8 * self.size, "used ring")):
            try:
                views.append(mem.view(base, n))
            except GuestMemoryError:
                raise VirtqueueError(f"{what} at {base:#x} is outside guest memory "
                                     "(or spans two regions)") from None
        self.desc_view, self.avail_view, self.used_view = views
        self._avail_idx = ctypes.c_uint16.from_buffer(self.avail_view, 2)
        self._used_idx = ctypes.c_uint16.from_buffer(self.used_view, 2)
        self.inflight: InflightLog | None = None
        self.resubmit: deque[int] = deque()  # heads a predecessor took: served first

    def ranges(self) -> tuple[tuple[int, int], ...]:
        """(guest address, length) of the descriptor table and both rings."""
        return ((self.desc, 16 * self.size), (self.avail, 6 + 2 * self.size),
                (self.used, 6 + 8 * self.size))

    def release(self) -> None:
        """Let go of the views into guest memory (its mapping is going away); the queue
        cannot be used after this."""
        del self._avail_idx, self._used_idx  # ctypes exports first, then the views
        for v in (self.desc_view, self.avail_view, self.used_view):
            v.release()

    def ring_used_idx(self) -> int:
        """The used index as it is in guest memory (a restarted back end's truth)."""
        return int(self._used_idx.value)

    def view(self, addr: int, n: int) -> memoryview:
        """A view of guest memory (an indirect table); outside RAM is the driver's error."""
        try:
            return self.mem.view(addr, n)
        except GuestMemoryError as e:
            raise VirtqueueError(str(e)) from None

    def avail_idx(self) -> int:
        return int(self._avail_idx.value)

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or None."""
        if self.resubmit:
            return DescriptorChain(self, self.resubmit.popleft())
        pending = (self._avail_idx.value - self.last_avail) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            raise VirtqueueError(f"available index moved by {pending} > queue size {self.size}")
        slot = self.last_avail % self.size
        head = int(_u16.unpack_from(self.avail_view, 4 + 2 * slot)[0])
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        if self.inflight is not None and head < self.size:  # a bad head fails in the walk
            self.inflight.get(head)
        if self.event_idx:
            # avail_event: ask to be notified when the driver adds past what we took.
            _u16.pack_into(self.used_view, 4 + 8 * self.size, self.last_avail)
        return DescriptorChain(self, head)

    def add_used(self, chain: DescriptorChain, written: int) -> None:
        if self.inflight is not None:
            self.inflight.pre_put(chain.head)
        slot = self.used_idx % self.size
        _used_elem.pack_into(self.used_view, 4 + 8 * slot, chain.head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used_idx.value = self.used_idx  # one 16-bit store; x86 TSO: entry lands first
        if self.inflight is not None:
            self.inflight.post_put(chain.head, self.used_idx)

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was added since the last one."""
        new = self.used_idx
        old = self.signalled_used
        self.signalled_used = new
        if self.event_idx:
            used_event = int(_u16.unpack_from(self.avail_view, 4 + 2 * self.size)[0])
            if old is None:
                return True
            return ((new - used_event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)
        return not _u16.unpack_from(self.avail_view, 0)[0] & V.VRING_AVAIL_F_NO_INTERRUPT


def start_queue(mem: GuestMemory, cfg: QueueConfig, acked: int) -> Virtqueue:
    """A running queue from what a driver (or a vhost-user front end) programmed, with
    the ring features the device acked — the one activation routine for the in-VMM
    transports and the vhost-user back end. VirtqueueError says why it cannot run."""
    problem = cfg.problem()
    if problem:
        raise VirtqueueError(problem)
    return Virtqueue(mem, cfg, event_idx=bool(acked & (1 << V.VIRTIO_RING_F_EVENT_IDX)),
                     indirect=bool(acked & (1 << V.VIRTIO_RING_F_INDIRECT_DESC)))
