"""NVMe queues and PRP lists (NVM Express Base 1.4 §4.1-§4.3, §4.6).

A submission queue is a ring of 64-byte commands in guest memory that the host fills
and announces with its tail doorbell; a completion queue is a ring of 16-byte entries
the controller fills, each carrying the phase tag (inverted on every wrap) so the
host can tell new entries from old, and the host frees them with its head doorbell.
A full completion queue stops its submission queues until the host frees entries.

Data is described by PRPs: PRP1 points into the first page (with an offset), PRP2 is
the second page or, for transfers past two pages, a PRP list — an array of page
pointers that may chain to another list page in its last entry. The walk is bounded
by the transfer length (itself capped by MDTS): each list page must yield at least one
data page, so a list cannot make it loop.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory
from pyvmm.uapi import nvme as N

CMD_SIZE, CQE_SIZE, PAGE = 64, 16, 4096
_cqe = struct.Struct("<IIHHHH")  # result, reserved, SQ head, SQ id, command id, status|P


class PrpError(Exception):
    """A PRP the controller cannot use; ``status`` is the NVMe status to return."""

    def __init__(self, status: int) -> None:
        self.status = status


@dataclass
class CompletionQueue:
    qid: int
    base: int
    size: int
    vector: int = 0
    irq_enabled: bool = True
    head: int = 0
    tail: int = 0
    phase: int = 1
    sqs: list[SubmissionQueue] = field(default_factory=list)

    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    def pending(self) -> bool:
        """Entries the host has not consumed yet (the INTx level)."""
        return self.head != self.tail

    def post(self, mem: GuestMemory, sq: SubmissionQueue, cid: int, status: int,
             result: int = 0) -> None:
        """Write one entry (the caller checked ``full``). GuestMemoryError if the queue
        is not in guest RAM (checked at creation; RAM does not move)."""
        mem.write(self.base + self.tail * CQE_SIZE, _cqe.pack(
            result & 0xFFFFFFFF, 0, sq.head, sq.qid, cid, ((status & 0x7FFF) << 1) | self.phase))
        self.tail += 1
        if self.tail == self.size:
            self.tail, self.phase = 0, self.phase ^ 1


@dataclass
class SubmissionQueue:
    qid: int
    base: int
    size: int
    cq: CompletionQueue
    head: int = 0
    tail: int = 0

    def fetch(self, mem: GuestMemory) -> bytes:
        cmd = mem.read(self.base + self.head * CMD_SIZE, CMD_SIZE)
        self.head = (self.head + 1) % self.size
        return cmd


def prp_segments(mem: GuestMemory, prp1: int, prp2: int, length: int) -> list[tuple[int, int]]:
    """(address, length) runs of guest memory for a transfer of ``length`` bytes,
    adjacent pages merged. Raises PrpError for a misaligned entry, or a list outside
    guest RAM."""
    if length <= 0:
        return []
    first = min(length, PAGE - prp1 % PAGE)
    runs = [(prp1, first)]
    left = length - first
    if 0 < left <= PAGE:
        if prp2 % PAGE:
            raise PrpError(N.NVME_SC_INVALID_PRP_OFFSET)
        runs.append((prp2, left))
        left = 0
    entry = prp2
    if left and entry % 8:
        raise PrpError(N.NVME_SC_INVALID_PRP_OFFSET)
    while left:
        pages = -(-left // PAGE)
        room = (PAGE - entry % PAGE) // 8  # entries left in this list page
        chained = pages > room  # the last entry then points at the next list page
        n = room - 1 if chained else pages
        if n == 0:
            # A list page whose only entry is the chain pointer yields no page: followed,
            # a pointer to itself (or two such slots pointing at each other) would loop
            # forever. Every list page must give at least one entry, so the walk visits
            # at most as many list pages as the transfer has pages.
            raise PrpError(N.NVME_SC_INVALID_PRP_OFFSET)
        try:
            raw = mem.read(entry, 8 * (n + int(chained)))
        except GuestMemoryError:
            raise PrpError(N.NVME_SC_DATA_XFER_ERROR) from None
        ptrs = struct.unpack(f"<{n + int(chained)}Q", raw)
        for p in ptrs[:n]:
            if p % PAGE:
                raise PrpError(N.NVME_SC_INVALID_PRP_OFFSET)
            take = min(left, PAGE)
            runs.append((p, take))
            left -= take
        if chained:
            entry = ptrs[-1]
            if entry % 8:
                raise PrpError(N.NVME_SC_INVALID_PRP_OFFSET)
    merged: list[tuple[int, int]] = []
    for a, n in runs:
        if merged and merged[-1][0] + merged[-1][1] == a:
            merged[-1] = (merged[-1][0], merged[-1][1] + n)
        else:
            merged.append((a, n))
    return merged


def prp_views(mem: GuestMemory, prp1: int, prp2: int, length: int) -> list[memoryview]:
    """Views of the transfer's guest memory (for preadv/pwritev straight into it)."""
    try:
        return [mem.view(a, n) for a, n in prp_segments(mem, prp1, prp2, length)]
    except GuestMemoryError:
        raise PrpError(N.NVME_SC_DATA_XFER_ERROR) from None
