"""INFLIGHT_SHMFD: the back end records taken-but-unused heads in the front end's
shared region; a back end started on a region a crashed one left serves exactly
those again, in the order they were taken, even when completions were out of order
— where the used index alone would skip one request and repeat another."""

from __future__ import annotations

import array
import os
import socket
import struct
from pathlib import Path

import pytest

from pyvmm.backends.block import RawBlockBackend
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.memory import GuestMemory
from pyvmm.testing import DriverQueue
from pyvmm.vhost_user.backend import VhostUserServer
from pyvmm.vhost_user.inflight import InflightArea, queue_region_size
from pyvmm.vhost_user.protocol import HEADER, INFLIGHT, ProtocolError, Request
from tests.unit.test_vhost_user import UADDR, Frontend
from tests.unit.test_vhost_user import start_ring as start_vring

INFLIGHT_BIT = 1 << 12


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "d.img"
    p.write_bytes(os.urandom(64 * 1024))
    return p


def reply_with_fd(fe: Frontend) -> tuple[bytes, int]:
    fe.sock.settimeout(2)
    fds = array.array("i")
    raw, anc, _, _ = fe.sock.recvmsg(HEADER.size + INFLIGHT.size, socket.CMSG_LEN(4))
    for _lvl, _typ, data in anc:
        fds.frombytes(data[:4])
    return raw[HEADER.size:], fds[0]


def start_ring(fe: Frontend, mem: GuestMemory, dq: DriverQueue, base: int) -> tuple[int, int]:
    region = next(mem.regions())
    fe.send(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack(
        "<QQQQ", 0, 2 << 20, UADDR, 0), fds=[os.dup(region.fd)])
    return start_vring(fe, dq, base)


def read_req(dq: DriverQueue, sector: int) -> int:
    hdr = dq.alloc(struct.pack("<IIQ", 0, 0, sector))
    return dq.add([(hdr, 16, False), (dq.alloc(512), 512, True), (dq.alloc(b"\xff"), 1, True)])


def connect(tmp_path: Path, image: Path) -> tuple[VhostUserServer, Frontend]:
    """A blk backend on a socket and a front end that negotiated INFLIGHT_SHMFD."""
    server = VhostUserServer()
    server.listen(str(tmp_path / "s"), lambda: VirtioBlk(RawBlockBackend(str(image))))
    fe = Frontend(server, tmp_path / "s")
    fe.send(Request.SET_FEATURES, struct.pack("<Q", (1 << 32) | (1 << 30)))
    fe.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", INFLIGHT_BIT))
    return server, fe


def test_running_back_end_keeps_the_region_current(tmp_path: Path, image: Path) -> None:
    server, fe = connect(tmp_path, image)
    try:
        fe.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, 1, 8))
        payload, fd = reply_with_fd(fe)
        size, off, nq, qs = INFLIGHT.unpack(payload)
        assert (size, off, nq, qs) == (queue_region_size(8), 0, 1, 8)
        with GuestMemory([(0, 2 << 20)]) as mem:
            dq = DriverQueue(mem, size=8)
            kick, call = start_ring(fe, mem, dq, 0)
            for s in (1, 2):
                read_req(dq, s)
            os.eventfd_write(kick, 1)
            fe.pump()
            assert len(dq.take_used()) == 2
            region = os.pread(fd, size, 0)
            _f, version, desc_num, last_batch, used = struct.unpack_from("<QHHHH", region)
            assert (version, desc_num, last_batch, used) == (1, 8, 3, 2)
            assert [region[16 + 16 * h] for h in (0, 3)] == [0, 0]  # none left in flight
            assert struct.unpack_from("<Q", region, 16 + 16 * 3 + 8)[0] == 1  # taken second
            for f in (kick, call, fd):
                os.close(f)
    finally:
        server.close()


def test_successor_serves_what_the_crashed_back_end_left(tmp_path: Path, image: Path) -> None:
    """Three reads A, B, C (heads 0, 3, 6); the dead back end completed only C. The
    front end restores the ring base to the used index (1), as QEMU does when
    GET_VRING_BASE fails; the region says A and B were taken."""
    area = InflightArea.create(1, 16)
    with GuestMemory([(0, 2 << 20)]) as mem:
        dq = DriverQueue(mem, size=16)  # 9 descriptors must fit
        heads = [read_req(dq, s) for s in (4, 5, 6)]
        assert heads == [0, 3, 6]
        mem.write(dq.used + 4, struct.pack("<II", 6, 513))  # C completed ...
        mem.write(dq.used + 2, struct.pack("<H", 1))
        q = area.map
        struct.pack_into("<QHHHH", q, 0, 0, 1, 16, 6, 1)  # ... and recorded
        for head, counter in ((0, 10), (3, 11)):
            struct.pack_into("<B5xHQ", q, 16 + 16 * head, 1, 0, counter)
        server, fe = connect(tmp_path, image)
        try:
            fe.send(Request.SET_INFLIGHT_FD, INFLIGHT.pack(area.size, 0, 1, 16),
                    fds=[os.dup(area.fd)])
            kick, call = start_ring(fe, mem, dq, base=1)
            fe.pump()
            dq.last_used = 1
            assert dq.take_used() == [(0, 513), (3, 513)]  # A then B; C not again
            data = image.read_bytes()
            for head, sector in ((0, 4), (3, 5)):
                buf = struct.unpack_from("<Q", mem.read(dq.desc + 16 * (head + 1), 8))[0]
                assert mem.read(buf, 512) == data[512 * sector:512 * sector + 512]
            fe.send(Request.GET_VRING_BASE, struct.pack("<II", 0, 0))
            assert struct.unpack("<II", fe.reply()) == (0, 3)  # continues after C
            assert q[16] == 0 and q[16 + 48] == 0  # and the region is clean again
            os.close(kick)
            os.close(call)
        finally:
            server.close()
    area.close()


@pytest.mark.parametrize("fields", [(1, 8, 99, 2),    # last_batch_head beyond the table
                                    (7, 8, 0, 0),     # unknown version
                                    (1, 4, 0, 0)])    # fewer descriptors than the ring
def test_corrupt_region_is_refused(fields: tuple[int, int, int, int]) -> None:
    area = InflightArea.create(1, 8)
    try:
        struct.pack_into("<QHHHH", area.map, 0, 0, *fields)
        with pytest.raises(ProtocolError):
            area.queues[0].recover(ring_used_idx=1, ring_size=8)
    finally:
        area.close()


def test_region_sizes_are_checked() -> None:
    fd = os.memfd_create("t")
    os.ftruncate(fd, 64)
    try:
        with pytest.raises(ProtocolError):
            InflightArea(fd, 64, 0, 1, 256)  # too small for 256 descriptors
        with pytest.raises(ProtocolError):
            InflightArea(fd, 4096, 0, 1, 8)  # larger than the file: the mmap fails
    finally:
        os.close(fd)
