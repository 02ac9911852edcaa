"""Inflight I/O tracking in shared memory (vhost-user INFLIGHT_SHMFD, split rings).

The front end asks for a region (GET_INFLIGHT_FD), keeps its fd, and hands it to every
back end it connects (SET_INFLIGHT_FD) — also to a new one after the old one died. The
back end records there, per queue, which heads it took from the available ring and
has not yet put in the used ring, so a successor can serve exactly those again. That
matters because completions can be out of order (the I/O pool): a front end that only
knows the used index would make a new back end skip a request still in flight and
serve a completed one twice.

Layout per queue (QEMU's libvhost-user, ``VuVirtqInflight``), ``queue_region_size``
bytes apart: u64 features, u16 version, u16 desc_num, u16 last_batch_head, u16
used_idx, then desc_num 16-byte entries {u8 inflight, 5 pad, u16 next, u64 counter}.
Putting a used element is bracketed: ``last_batch_head`` is written first, then the
used ring, then the head's flag is cleared and ``used_idx`` follows; a crash in
between is detected by ``used_idx`` differing from the ring's and repaired.

Everything here is read from memory another process wrote: sizes are checked against
the mapping, heads against desc_num, and a corrupt region is a ``ProtocolError``. The
region's fd must be sealed against shrinking and long enough (``check_mappable``), as
guest memory must: a front end that truncated it would make the next access SIGBUS.
Ours is a memfd sealed at its size.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct

from pyvmm.errors import GuestMemoryError
from pyvmm.memory import check_mappable, sealed_memfd
from pyvmm.vhost_user.protocol import ProtocolError

INFLIGHT_VERSION = 1
INFLIGHT_ALIGNMENT = 64
HEADER_SIZE = 16
DESC_SIZE = 16
_hdr = struct.Struct("<QHHHH")
_desc = struct.Struct("<B5xHQ")


def queue_region_size(queue_size: int) -> int:
    """As libvhost-user computes it (QEMU sizes the region from our answer)."""
    n = DESC_SIZE * queue_size + 2
    return (n + INFLIGHT_ALIGNMENT - 1) // INFLIGHT_ALIGNMENT * INFLIGHT_ALIGNMENT


class InflightArea:
    """The whole shared region: one ``InflightQueue`` per queue."""

    def __init__(self, fd: int, size: int, offset: int, num_queues: int,
                 queue_size: int) -> None:
        per = queue_region_size(queue_size)
        if not 1 <= num_queues <= 64 or not 1 <= queue_size <= 32768 or size < per * num_queues:
            raise ProtocolError(f"inflight region of {size} bytes for {num_queues} queues "
                                f"of {queue_size}")
        if offset % mmap.PAGESIZE or size > 1 << 26:
            raise ProtocolError(f"inflight region offset {offset:#x} / size {size} unusable")
        try:
            check_mappable(fd, offset, size)
        except GuestMemoryError as e:
            raise ProtocolError(f"inflight region: {e}") from None
        try:
            self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, offset=offset)
        except (OSError, ValueError, OverflowError) as e:
            raise ProtocolError(f"cannot map the inflight region: {e}") from None
        self.fd, self.size = fd, size
        self.queues = [InflightQueue(memoryview(self.map)[i * per:(i + 1) * per], queue_size)
                       for i in range(num_queues)]

    @classmethod
    def create(cls, num_queues: int, queue_size: int) -> InflightArea:
        size = queue_region_size(queue_size) * num_queues
        fd = sealed_memfd("pyvmm-inflight", size)
        try:
            return cls(fd, size, 0, num_queues, queue_size)
        except BaseException:
            os.close(fd)
            raise

    def close(self) -> None:
        for q in self.queues:
            q.release()
        self.queues = []
        self.map.close()
        os.close(self.fd)


class InflightQueue:
    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view, self.queue_size = view, queue_size
        self.counter = 0
        # 16-bit fields through ctypes: single stores, as for the rings themselves.
        self._last_batch = ctypes.c_uint16.from_buffer(view, 12)
        self._used_idx = ctypes.c_uint16.from_buffer(view, 14)

    def release(self) -> None:
        del self._last_batch, self._used_idx
        self.view.release()

    def _flag(self, head: int) -> int:
        return HEADER_SIZE + DESC_SIZE * head

    # --- the running back end -------------------------------------------------------
    def get(self, head: int) -> None:
        """``head`` was taken from the available ring."""
        off = self._flag(head)
        struct.pack_into("<Q", self.view, off + 8, self.counter)
        self.counter += 1
        self.view[off] = 1

    def pre_put(self, head: int) -> None:
        self._last_batch.value = head

    def post_put(self, head: int, used_idx: int) -> None:
        self.view[self._flag(head)] = 0
        self._used_idx.value = used_idx

    # --- a back end starting on a region a predecessor wrote -------------------------
    def recover(self, ring_used_idx: int, ring_size: int) -> tuple[int, list[int]]:
        """(last_avail to use, heads to serve again in the order they were taken).
        A fresh region (version 0) is initialised and gives (ring_used_idx, [])."""
        features, version, desc_num, last_batch, used = _hdr.unpack_from(self.view, 0)
        if version == 0:
            _hdr.pack_into(self.view, 0, features, INFLIGHT_VERSION, self.queue_size, 0,
                           ring_used_idx)
            return ring_used_idx, []
        if version != INFLIGHT_VERSION or desc_num != self.queue_size or ring_size > desc_num:
            raise ProtocolError(f"inflight region version {version} with {desc_num} "
                                f"descriptors does not fit a ring of {ring_size}")
        if used != ring_used_idx:  # died between the used-ring update and clearing
            if last_batch >= desc_num:
                raise ProtocolError(f"inflight last_batch_head {last_batch} out of range")
            self.view[self._flag(last_batch)] = 0
            self._used_idx.value = ring_used_idx
        taken = []
        for head in range(ring_size):
            flag, _nxt, counter = _desc.unpack_from(self.view, self._flag(head))
            if flag:
                taken.append((counter, head))
        taken.sort()
        self.counter = taken[-1][0] + 1 if taken else 0
        return (ring_used_idx + len(taken)) & 0xFFFF, [h for _, h in taken]
