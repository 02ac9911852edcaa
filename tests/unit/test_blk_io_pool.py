"""virtio-blk with an I/O pool: transfers the page cache can serve complete inline;
ones that would block (simulated: RWF_NOWAIT says EAGAIN) complete from a pool thread,
out of order if the disk says so; a reset while one is in flight drops its result."""

from __future__ import annotations

import os
import struct
import threading
import time
from pathlib import Path

import pytest

from pyvmm.backends.block import Buffers, RawBlockBackend
from pyvmm.backends.io_pool import IoPool
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.memory import GuestMemory
from pyvmm.uapi import virtio as V
from tests.unit.test_virtio_core import blk_req, bring_up


class ColdDisk(RawBlockBackend):
    """Every non-blocking attempt would block; blocking reads of sector 0 wait for
    ``gate`` (a slow disk), so later requests overtake it."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.gate = threading.Event()

    def readv_nowait(self, offset: int, bufs: Buffers) -> int:
        return 0

    def writev_nowait(self, offset: int, bufs: Buffers) -> int:
        return 0

    def readv(self, offset: int, bufs: Buffers) -> int:
        if offset == 0:
            self.gate.wait(10)
        return super().readv(offset, bufs)


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory([(0, 4 << 20)])
    yield m  # type: ignore[misc]
    m.close()


@pytest.fixture
def pool() -> IoPool:
    p = IoPool(workers=4)
    yield p  # type: ignore[misc]
    p.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(64 * 1024))
    return p


def wait_used(dq: object, n: int, got: list[tuple[int, int]]) -> None:
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        got += dq.take_used()  # type: ignore[attr-defined]
        time.sleep(0.005)


def test_warm_cache_completes_inline(mem: GuestMemory, image: Path, pool: IoPool) -> None:
    be = RawBlockBackend(str(image))
    image.read_bytes()  # in the page cache
    dev = VirtioBlk(be, pool=pool)
    core, dq, _ = bring_up(dev, mem)
    buf, st = blk_req(dq, V.VIRTIO_BLK_T_IN, 4, 4096)
    core.notify(0)
    assert dq.take_used() and mem.read(st, 1) == b"\0"  # no thread was needed
    assert dev.deferred == 0 and mem.read(buf, 4096) == image.read_bytes()[2048:6144]


def test_cold_requests_complete_from_the_pool_out_of_order(mem: GuestMemory,
                                                          image: Path, pool: IoPool) -> None:
    be = ColdDisk(str(image))
    dev = VirtioBlk(be, pool=pool)
    core, dq, _ = bring_up(dev, mem)
    data = image.read_bytes()
    slow, st0 = blk_req(dq, V.VIRTIO_BLK_T_IN, 0, 512)
    fast, st1 = blk_req(dq, V.VIRTIO_BLK_T_IN, 8, 512)
    payload = os.urandom(1024)
    _, st2 = blk_req(dq, V.VIRTIO_BLK_T_OUT, 20, payload)
    core.notify(0)  # returns at once: all three are in the pool
    got: list[tuple[int, int]] = []
    wait_used(dq, 2, got)
    assert len(got) == 2 and dev.deferred == 3
    be.gate.set()
    wait_used(dq, 3, got)
    # The slow read (head 0) is held by the gate, so it is last; the other two finish in
    # whatever order the pool's threads run them (no order is promised between them).
    assert got[2] == (0, 513)
    assert sorted(got[:2]) == [(3, 513), (6, 1)]
    assert mem.read(slow, 512) == data[:512] and mem.read(fast, 512) == data[4096:4608]
    assert mem.read(st0, 1) + mem.read(st1, 1) + mem.read(st2, 1) == b"\0\0\0"
    assert image.read_bytes()[20 * 512:21 * 512 + 512] == payload
    assert dev.requests == 3 and dev.bytes == 2048


def test_reset_while_in_flight_drops_the_completion(mem: GuestMemory, image: Path,
                                                    pool: IoPool) -> None:
    be = ColdDisk(str(image))
    dev = VirtioBlk(be, pool=pool)
    core, dq, _ = bring_up(dev, mem)
    _, st = blk_req(dq, V.VIRTIO_BLK_T_IN, 0, 512)
    core.notify(0)
    core.set_status(0)  # the driver resets the device with the read outstanding
    be.gate.set()
    pool.close()  # waits for the worker
    assert dq.used_idx() == 0 and mem.read(st, 1) == b"\xff" and dev.requests == 0


class HalfCached(RawBlockBackend):
    """The page cache holds the first 512 bytes of every transfer, no more."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.blocking: list[tuple[int, int]] = []

    def readv_nowait(self, offset: int, bufs: Buffers) -> int:
        return super().readv(offset, bufs[:1]) if bufs else 0

    def readv(self, offset: int, bufs: Buffers) -> int:
        self.blocking.append((offset, sum(len(b) for b in bufs)))
        return super().readv(offset, bufs)


def test_partial_cache_hit_leaves_only_the_rest_to_the_pool(mem: GuestMemory,
                                                            image: Path, pool: IoPool) -> None:
    be = HalfCached(str(image))
    dev = VirtioBlk(be, pool=pool)
    core, dq, _ = bring_up(dev, mem)
    # two descriptors of 512 bytes: the first is "cached", the second is not
    hdr = dq.alloc(struct.pack("<IIQ", V.VIRTIO_BLK_T_IN, 0, 6))
    a, b, st = dq.alloc(512), dq.alloc(512), dq.alloc(b"\xff")
    dq.add([(hdr, 16, False), (a, 512, True), (b, 512, True), (st, 1, True)])
    core.notify(0)
    got: list[tuple[int, int]] = []
    wait_used(dq, 1, got)
    assert got and got[0][1] == 1025 and mem.read(st, 1) == b"\0"
    assert be.blocking == [(6 * 512 + 512, 512)]  # only the uncached half
    data = image.read_bytes()
    assert mem.read(a, 512) + mem.read(b, 512) == data[3072:4096]
    assert dev.bytes == 1024


def test_writes_go_to_the_pool_where_nowait_writes_are_unsupported(image: Path) -> None:
    """On a file system without RWF_NOWAIT for buffered writes, writev_nowait moves
    nothing (the pool does the write), small or large, and remembers not to try again."""
    import errno

    be = RawBlockBackend(str(image))
    real, tries = os.pwritev, []

    def no_nowait(fd: int, bufs: object, off: int, flags: int = 0) -> int:
        tries.append(flags)
        if flags & os.RWF_NOWAIT:
            raise OSError(errno.EOPNOTSUPP, "not supported")
        return real(fd, bufs, off)  # type: ignore[arg-type]

    before = image.read_bytes()
    os.pwritev = no_nowait  # type: ignore[assignment]
    try:
        small = memoryview(bytearray(b"s" * 4096))
        assert be.writev_nowait(0, [small]) == 0
        big = memoryview(bytearray(128 * 1024))
        assert be.writev_nowait(0, [big]) == 0
        assert be.writev(0, [small]) == 4096  # what the pool thread does
    finally:
        os.pwritev = real
        be.close()
    assert tries == [os.RWF_NOWAIT, 0]  # one attempt, then no more NOWAIT tries
    assert image.read_bytes()[:4096] == b"s" * 4096 and image.read_bytes()[4096:] == before[4096:]
