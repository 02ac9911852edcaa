"""virtio-rng / entropy device (virtio 1.2 §5.4): one queue of device-writable
buffers, filled from the host's getrandom(2), optionally rate-limited.

Rate limit: a ``TokenBucket`` of bytes (``--rng-rate``). A buffer is filled with as
many bytes as there are tokens (the spec lets the device write fewer bytes than the
buffer holds); when the bucket is empty the device stops taking buffers and asks the
event loop to call it again when ``MIN_CHUNK`` bytes will be there. Buffers wait in
the queue meanwhile, so a guest that reads in a loop gets the configured rate and
no more, and the host's entropy pool is shared fairly between guests.

Threat model: the driver chooses buffer sizes; each request is capped at 64 KiB of
entropy, so a huge descriptor cannot make the VMM allocate unbounded memory. Readable
descriptors are ignored (the spec says buffers are write-only). A driver that kicks
while throttled only re-arms the same single timer.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.devices.spec import DeviceSpec, HostContext, Kind, VirtioConfig
from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.schema import option
from pyvmm.sharing.ratelimit import TokenBucket
from pyvmm.uapi import virtio as V

MAX_REQUEST = 64 * 1024
MIN_CHUNK = 64  # bytes worth waiting for when throttled


class VirtioRng(VirtioDevice):
    device_type = V.VIRTIO_ID_RNG
    queue_max_sizes = (256,)
    features = (1 << V.VIRTIO_F_VERSION_1) | (1 << V.VIRTIO_RING_F_EVENT_IDX) | (
        1 << V.VIRTIO_RING_F_INDIRECT_DESC)

    def __init__(self, limit: TokenBucket | None = None,
                 call_later: Callable[[float, Callable[[], None]], None] | None = None) -> None:
        super().__init__()
        if limit is not None and call_later is None:
            raise ValueError("a rate-limited rng needs call_later")
        self.limit, self.call_later = limit, call_later
        self._waiting = False
        self.throttled = 0

    def process_queue(self, index: int) -> None:
        vq, mem = self.queue(index), self.mem
        assert mem is not None
        while True:
            if self.limit is not None and self.limit.available() < 1:
                self._wait()
                return
            chain = vq.pop()
            if chain is None:
                return
            descs = chain.descriptors()
            budget, written = MAX_REQUEST, 0
            if self.limit is not None:
                want = min(budget, sum(d.len for d in descs if d.write))
                budget = min(want, int(self.limit.available()))  # whole bytes only
                self.limit.take(budget)
            for d in descs:
                if not d.write or budget == 0:
                    continue
                n = min(d.len, budget)
                mem.write(d.addr, os.getrandom(n))
                written += n
                budget -= n
            self.requests += 1
            self.bytes += written
            self.complete(vq, chain, written)

    def _wait(self) -> None:
        self.throttled += 1
        if self._waiting:
            return
        assert self.limit is not None and self.call_later is not None
        self._waiting = True
        self.call_later(self.limit.delay_for(MIN_CHUNK), self._resume)

    def _resume(self) -> None:
        with self.core_lock:
            self._waiting = False
            if self.mem is None or not self.queues or self.queues[0] is None:
                return  # reset meanwhile: the timer finds no queue and does nothing
            try:
                self.process_queue(0)
            except Exception as e:
                self.fail(0, e)


# --- registry entry ---------------------------------------------------------------------
@dataclass(kw_only=True)
class RngConfig(VirtioConfig):
    rate: int | None = option(None, "at most this many bytes per second (a token bucket); "
                              "none: unlimited")

    def check(self) -> None:
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be a positive number of bytes per second")


def create(cfg: RngConfig, ctx: HostContext) -> VirtioRng:
    limit = None if cfg.rate is None else TokenBucket(cfg.rate)
    return VirtioRng(limit, ctx.events.call_later)


SPEC = DeviceSpec("virtio-rng", RngConfig, Kind.VIRTIO, create,
                  "virtio entropy source (host getrandom)", option="rng",
                  positional="transport", doc="virtio")
