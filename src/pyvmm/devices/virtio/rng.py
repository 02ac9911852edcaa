"""virtio-rng / entropy device (virtio 1.2 §5.4): one queue of device-writable
buffers, filled from the host's getrandom(2).

Threat model: the driver chooses buffer sizes; each request is capped at 64 KiB of
entropy, so a huge descriptor cannot make the VMM allocate unbounded memory. Readable
descriptors are ignored (the spec says buffers are write-only).
"""

from __future__ import annotations

import os

from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.uapi import virtio as V

MAX_REQUEST = 64 * 1024


class VirtioRng(VirtioDevice):
    device_type = V.VIRTIO_ID_RNG
    queue_max_sizes = (256,)
    features = (1 << V.VIRTIO_F_VERSION_1) | (1 << V.VIRTIO_RING_F_EVENT_IDX) | (
        1 << V.VIRTIO_RING_F_INDIRECT_DESC)

    def process_queue(self, index: int) -> None:
        vq, mem = self.queue(index), self.mem
        assert mem is not None
        while (chain := vq.pop()) is not None:
            budget, written = MAX_REQUEST, 0
            for d in chain:
                if not d.write or budget == 0:
                    continue
                n = min(d.len, budget)
                mem.write(d.addr, os.getrandom(n))
                written += n
                budget -= n
            self.requests += 1
            self.bytes += written
            self.complete(vq, chain, written)
