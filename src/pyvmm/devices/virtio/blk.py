"""virtio-blk (virtio 1.2 §5.2) over a ``BlockBackend``.

Requests: IN, OUT, FLUSH (fsync: it really reaches the disk), GET_ID, DISCARD and
WRITE_ZEROES. Data moves with preadv/pwritev straight between the image and
guest-memory views — no copy in Python. With an ``IoPool`` (the VMM's case) a
transfer is first tried with RWF_NOWAIT on the event loop; one that would wait for
the disk goes to a pool thread and completes from there, so a cold cache still has
many requests in flight. A request is a header (16 bytes,
device-readable), data, and a status byte (the last byte of the chain,
device-writable); the header and data may be split across descriptors any way the
driver likes.

Failures are reported as the spec says, in the status byte: a sector range past the
end, a length that is not whole sectors, a write to a read-only disk, malformed
discard segments -> VIRTIO_BLK_S_IOERR; an unknown type -> VIRTIO_BLK_S_UNSUPP. A
chain the device cannot even answer (no status byte, no header) or that points
outside guest memory is a virtqueue violation: the core sets DEVICE_NEEDS_RESET.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.backends.block import BlockBackend, skip_buffers
from pyvmm.backends.io_pool import IoPool
from pyvmm.devices.spec import DeviceSpec, DiskConfig, HostContext, Kind, LimitsConfig, VirtioConfig
from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.devices.virtio.queue import Descriptor, DescriptorChain, Virtqueue, VirtqueueError
from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory
from pyvmm.sharing.ratelimit import Limiter, Limits, RateGroup
from pyvmm.uapi import virtio as V

SEG_MAX = 126
MAX_DISCARD_SECTORS = 1 << 22
MAX_DISCARD_SEG = 16
_hdr = struct.Struct("<IIQ")
_seg = struct.Struct("<QII")


class _Deferred(Exception):  # control flow, not an error
    """A transfer the page cache could not finish: the pool takes it from ``moved``."""

    def __init__(self, moved: int) -> None:
        self.moved = moved


def _gather(mem: GuestMemory, descs: list[Descriptor], n: int) -> bytes:
    out = bytearray()
    for d in descs:
        if len(out) >= n:
            break
        out += mem.read(d.addr, min(d.len, n - len(out)))
    return bytes(out)


class VirtioBlk(VirtioDevice):
    device_type = V.VIRTIO_ID_BLOCK
    queue_max_sizes = (256,)

    def __init__(self, backend: BlockBackend, serial: str = "pyvmm-disk",
                 pool: IoPool | None = None, limits: Limits | None = None,
                 call_later: Callable[[float, Callable[[], None]], object] | None = None,
                 group: RateGroup | None = None) -> None:
        super().__init__()
        # Rate limits (operations and bytes, with bursts; alone or in a shared group):
        # a request waits in the ring until its turn, nothing is dropped.
        self.limiter: Limiter | None = None
        if limits is not None and (any(v is not None for v in limits) or group is not None):
            if call_later is None:
                raise ValueError("a rate-limited disk needs call_later")
            self.limiter = Limiter(limits, call_later, self._resume, group)
        self.backend = backend
        self.pool = pool  # None: every request is served inline
        self.deferred = 0  # requests handed to the pool because they would block
        self._inflight = 0
        self._idle = threading.Condition(threading.Lock())
        self.serial = serial.encode()[:V.VIRTIO_BLK_ID_BYTES]
        self.features = ((1 << V.VIRTIO_F_VERSION_1) | (1 << V.VIRTIO_RING_F_EVENT_IDX)
                         | (1 << V.VIRTIO_RING_F_INDIRECT_DESC) | (1 << V.VIRTIO_BLK_F_SEG_MAX)
                         | (1 << V.VIRTIO_BLK_F_BLK_SIZE) | (1 << V.VIRTIO_BLK_F_FLUSH)
                         | (1 << V.VIRTIO_BLK_F_DISCARD) | (1 << V.VIRTIO_BLK_F_WRITE_ZEROES)
                         | ((1 << V.VIRTIO_BLK_F_RO) if backend.read_only else 0))
        self.errors_reported = 0

    @property
    def capacity(self) -> int:
        return self.backend.size // V.SECTOR_SIZE

    def config_bytes(self) -> bytes:
        cfg = bytearray(60)
        struct.pack_into("<QII", cfg, 0, self.capacity, 0, SEG_MAX)
        struct.pack_into("<I", cfg, 20, V.SECTOR_SIZE)  # blk_size
        struct.pack_into("<H", cfg, 34, 1)  # num_queues
        struct.pack_into("<III", cfg, 36, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, 1)
        struct.pack_into("<II", cfg, 48, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG)
        cfg[56] = 1  # write_zeroes_may_unmap
        return bytes(cfg)

    def metrics(self) -> dict[str, int]:
        m = {**super().metrics(), "deferred_to_io_pool": self.deferred}
        if self.limiter is not None:
            m["throttled"] = self.limiter.throttled
        return m

    def process_queue(self, index: int) -> None:
        vq, mem = self.queue(index), self.mem
        assert mem is not None
        lim = self.limiter
        while True:
            if lim is not None and not lim.admit():
                return  # _resume goes on when the limits allow
            chain = vq.pop()
            if chain is None:
                return
            descs = chain.descriptors()
            if lim is not None:  # what a request moves: all but its header and status
                lim.charge(sum(d.len for d in descs[1:-1]))
            if len(descs) == 3 and self._fast(mem, descs, vq, chain):
                continue
            written = self._request(mem, descs, vq, chain)
            if written is not None:
                self.requests += 1
                self.complete(vq, chain, written)

    def _resume(self) -> None:
        """A limiter's timer (the event loop): serve what waited, as a kick would."""
        with self.core_lock:
            if self.mem is None or not self.queues or self.queues[0] is None:
                return  # reset meanwhile: nothing waits any more
            try:
                self.process_queue(0)
            except Exception as e:
                self.fail(0, e)

    def _fast(self, mem: GuestMemory, descs: list[Descriptor], vq: Virtqueue,
              chain: DescriptorChain) -> bool:
        """Linux's request shape — header (16 bytes, readable), one data buffer, status
        (1 byte, writable) — for a read or write in range: what ``_request`` does for
        it, without the generality. Python per request is what limits small I/O, and
        under load (a TCG guest sharing the cores) it runs 2-3x slower than alone
        (docs/benchmarks.md). The transfer itself is ``_transfer``, as for the general
        path; another shape or type, or a host I/O error, returns False having completed
        nothing, and the general path serves it (and reports what is wrong)."""
        h, data, st = descs
        if h.write or h.len != 16 or not st.write or st.len != 1:
            return False
        typ, _, sector = _hdr.unpack(mem.read(h.addr, 16))
        is_in = typ == V.VIRTIO_BLK_T_IN
        if is_in != data.write or (typ != V.VIRTIO_BLK_T_OUT and not is_in):
            return False
        rdata, wdata = ([], [data]) if is_in else ([data], [])
        try:
            status, written, moved, done = self._transfer(mem, typ, sector, rdata, wdata,
                                                          block=self.pool is None)
        except OSError:
            return False  # the general path tries again and reports the error
        if not done:  # the page cache did not have it all: a pool thread finishes
            self._defer(mem, typ, sector, rdata, wdata, vq, chain, st.addr, moved)
            return True
        self._finish(mem, vq, chain, st.addr, status, written, moved)
        return True

    def _finish(self, mem: GuestMemory, vq: Virtqueue, chain: DescriptorChain,
                status_addr: int, status: int, written: int, moved: int) -> None:
        """Status byte, counters, used ring and interrupt for a served request."""
        mem.write(status_addr, bytes((status,)))
        self.requests += 1
        self.bytes += moved
        self.complete(vq, chain, written + 1)

    def _request(self, mem: GuestMemory, descs: list[Descriptor], vq: Virtqueue,
                 chain: DescriptorChain) -> int | None:
        """Serve one request; returns the bytes written into guest memory, or None if
        it went to the I/O pool and completes from there."""
        if not descs or not descs[-1].write or descs[-1].len < 1:
            raise VirtqueueError("virtio-blk request without a status byte")
        status_desc = descs[-1]
        status_addr = status_desc.addr + status_desc.len - 1
        readable: list[Descriptor] = []
        wdata: list[Descriptor] = []
        for d in descs:
            (wdata if d.write else readable).append(d)
        # The data area for IN: every writable byte except the status byte.
        wdata.pop()
        if status_desc.len > 1:
            wdata.append(Descriptor(status_desc.addr, status_desc.len - 1, True))
        first = readable[0] if readable else None
        if first is not None and first.len == 16:  # Linux's layout: header alone
            typ, _, sector = _hdr.unpack(mem.read(first.addr, 16))
            rdata = readable[1:]
        else:
            header = _gather(mem, readable, 16)
            if len(header) < 16:
                raise VirtqueueError("virtio-blk request header shorter than 16 bytes")
            typ, _, sector = _hdr.unpack(header)
            rdata = self._skip(readable, 16)
        try:
            status, written = self._serve(mem, typ, sector, rdata, wdata)
        except _Deferred as d:
            self._defer(mem, typ, sector, rdata, wdata, vq, chain, status_addr, d.moved)
            return None
        except OSError as e:
            self._report(f"host I/O error: {e.strerror}")
            status, written = V.VIRTIO_BLK_S_IOERR, 0
        except GuestMemoryError as e:
            raise VirtqueueError(str(e)) from None
        mem.write(status_addr, bytes((status,)))
        return written + 1

    @staticmethod
    def _skip(descs: list[Descriptor], n: int) -> list[Descriptor]:
        out = []
        for d in descs:
            if n >= d.len:
                n -= d.len
                continue
            out.append(Descriptor(d.addr + n, d.len - n, d.write))
            n = 0
        return out

    def _report(self, why: str) -> None:
        self.errors_reported += 1

    def _range_ok(self, sector: int, nbytes: int) -> bool:
        return nbytes % V.SECTOR_SIZE == 0 and sector + nbytes // V.SECTOR_SIZE <= self.capacity

    def _transfer(self, mem: GuestMemory, typ: int, sector: int, rdata: list[Descriptor],
                  wdata: list[Descriptor], block: bool,
                  skip: int = 0) -> tuple[int, int, int, bool]:
        """A read or write: (status, bytes written to guest memory, bytes moved, done).
        With ``block`` off, only what the page cache serves without waiting is moved;
        ``done`` is False if the rest must be finished blocking (``skip`` = moved)."""
        be = self.backend
        is_in = typ == V.VIRTIO_BLK_T_IN
        descs = wdata if is_in else rdata
        n = sum(d.len for d in descs)
        if (not is_in and be.read_only) or not self._range_ok(sector, n):
            return V.VIRTIO_BLK_S_IOERR, 0, 0, True
        views = [mem.view(d.addr, d.len) for d in descs if d.len]
        if skip:
            views = skip_buffers(views, skip)
        off = sector * V.SECTOR_SIZE + skip
        if block:
            got = skip + (be.readv(off, views) if is_in else be.writev(off, views))
        else:
            got = skip + (be.readv_nowait(off, views) if is_in else be.writev_nowait(off, views))
            if got < n:
                return 0, 0, got, False
        return (V.VIRTIO_BLK_S_OK if got == n else V.VIRTIO_BLK_S_IOERR), (
            got if is_in else 0), got, True

    def _defer(self, mem: GuestMemory, typ: int, sector: int, rdata: list[Descriptor],
               wdata: list[Descriptor], vq: Virtqueue, chain: DescriptorChain,
               status_addr: int, skip: int) -> None:
        """Finish a transfer that would block on a pool thread (from byte ``skip``, what
        the page cache already served), then complete it there under the device lock —
        unless the device was reset meanwhile (its queue is gone), in which case the
        result is dropped as a reset device drops it."""
        assert self.pool is not None
        self.deferred += 1
        with self._idle:
            self._inflight += 1

        def work() -> None:
            try:
                finish()
            finally:
                with self._idle:
                    self._inflight -= 1
                    self._idle.notify_all()

        def finish() -> None:
            try:
                status, written, moved, _ = self._transfer(mem, typ, sector, rdata, wdata,
                                                           block=True, skip=skip)
            except OSError as e:
                self._report(f"host I/O error: {e.strerror}")
                status, written, moved = V.VIRTIO_BLK_S_IOERR, 0, 0
            except GuestMemoryError:
                status, written, moved = V.VIRTIO_BLK_S_IOERR, 0, 0
            with self.core_lock:
                if not self.queues or self.queues[0] is not vq:
                    return
                try:
                    self._finish(mem, vq, chain, status_addr, status, written, moved)
                except Exception as e:
                    self.fail(0, e)

        self.pool.submit(work)

    def drain(self, timeout: float = 30.0) -> bool:
        """Wait until no request is in the pool (before rings stop or guest memory is
        unmapped: vhost-user's GET_VRING_BASE and SET_MEM_TABLE). Must not be called with
        the device lock held, since completions take it. False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)

    def _serve(self, mem: GuestMemory, typ: int, sector: int, rdata: list[Descriptor],
               wdata: list[Descriptor]) -> tuple[int, int]:
        be = self.backend
        if typ in (V.VIRTIO_BLK_T_IN, V.VIRTIO_BLK_T_OUT):
            status, written, moved, finished = self._transfer(mem, typ, sector, rdata, wdata,
                                                              block=self.pool is None)
            if not finished:
                raise _Deferred(moved)
            self.bytes += moved
            return status, written
        if typ == V.VIRTIO_BLK_T_FLUSH:
            if not be.read_only:
                be.flush()
            return V.VIRTIO_BLK_S_OK, 0
        if typ == V.VIRTIO_BLK_T_GET_ID:
            ident = self.serial.ljust(V.VIRTIO_BLK_ID_BYTES, b"\0")
            done = 0
            for d in wdata:
                chunk = ident[done:done + d.len]
                if not chunk:
                    break
                mem.write(d.addr, chunk)
                done += len(chunk)
            return V.VIRTIO_BLK_S_OK, done
        if typ in (V.VIRTIO_BLK_T_DISCARD, V.VIRTIO_BLK_T_WRITE_ZEROES):
            return self._segments(mem, typ, rdata), 0
        return V.VIRTIO_BLK_S_UNSUPP, 0

    def _segments(self, mem: GuestMemory, typ: int, rdata: list[Descriptor]) -> int:
        # The size check comes from the descriptors' lengths, before a byte is read: a
        # chain whose descriptors each span guest RAM would otherwise make one request
        # copy many times RAM (segments are 16 bytes, at most MAX_DISCARD_SEG of them).
        total = sum(d.len for d in rdata)
        if not total or total % 16 or total // 16 > MAX_DISCARD_SEG or self.backend.read_only:
            return V.VIRTIO_BLK_S_IOERR
        raw = _gather(mem, rdata, total)
        segs = [_seg.unpack_from(raw, i) for i in range(0, len(raw), 16)]
        for sector, count, flags in segs:
            if count > MAX_DISCARD_SECTORS or not self._range_ok(sector, count * 512):
                return V.VIRTIO_BLK_S_IOERR
            if typ == V.VIRTIO_BLK_T_DISCARD and flags:
                return V.VIRTIO_BLK_S_UNSUPP
        for sector, count, flags in segs:
            off, length = sector * V.SECTOR_SIZE, count * V.SECTOR_SIZE
            if typ == V.VIRTIO_BLK_T_DISCARD:
                self.backend.discard(off, length)
            elif flags & V.VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP:
                self.backend.discard(off, length)
                self.backend.write_zeroes(off, length)  # reads must return zeroes after
            else:
                self.backend.write_zeroes(off, length)
        return V.VIRTIO_BLK_S_OK


# --- registry entry ---------------------------------------------------------------------
@dataclass(kw_only=True)
class BlkConfig(VirtioConfig, DiskConfig, LimitsConfig):
    """A raw image behind virtio-blk (VIRTIO_BLK_F_RO when read-only)."""


def create(cfg: BlkConfig, ctx: HostContext) -> VirtioBlk:
    return VirtioBlk(cfg.open(ctx), serial=cfg.serial or f"pyvmm-disk{ctx.index}",
                     pool=ctx.io_pool(), limits=cfg.limits(), call_later=ctx.events.call_later)


SPEC = DeviceSpec("virtio-blk", BlkConfig, Kind.VIRTIO, create,
                  "virtio-blk disk on a raw image", option="disk", select=("if", "virtio"),
                  positional="path", doc="virtio")
