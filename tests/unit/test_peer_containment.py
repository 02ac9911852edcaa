"""Security issue #17, the peer-facing half: what a vhost-user front end or a vfio-user
client (the peer) can do to pyvmm's backend processes. Each test is named after the
item it reproduces (``test_peer_<n>_...``): the peer attempts it, and the server must
stay up, keep serving another peer (B, doing virtio-blk I/O), and leak nothing."""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
import threading
from pathlib import Path

import pytest

from pyvmm.backends.block import RawBlockBackend
from pyvmm.backends.io_pool import IoPool
from pyvmm.devices.assigned.shmem import SharedMemoryBar
from pyvmm.devices.nvme.controller import NvmeController
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.memory import GuestMemory, sealed_memfd
from pyvmm.uapi import nvme as N
from pyvmm.uapi import virtio as V
from pyvmm.vfio_user import protocol as P
from pyvmm.vfio_user.server import VfioUserServer
from pyvmm.vhost_user.inflight import InflightArea
from pyvmm.vhost_user.protocol import HEADER, INFLIGHT, Request, encode
from tests.unit.peer_frontends import (
    RAM,
    WAIT,
    Loop,
    VfioSetup,
    VfioUser,
    VhostSetup,
    flood_until_closed,
    open_fds,
    vfio_peer,
)
from tests.unit.test_blk_io_pool import ColdDisk

INFLIGHT_SHMFD = 1 << 12


# --- 6: a header announcing a payload, then nothing ------------------------------------
def test_peer_6_header_without_payload_vhost_user(vhost: VhostSetup) -> None:
    b = vhost.blk()
    a = vhost.peer()
    a.peer.raw(HEADER.pack(Request.SET_MEM_TABLE, 1, 40))  # 40 bytes promised, none sent
    b.read(vhost.loop, 3)  # the loop is not parked in A's recv
    assert a.peer.still_open()
    assert a.peer.closed_by_server()  # A's deadline
    b.read(vhost.loop, 4)
    b.close()


def test_peer_6_header_without_payload_vfio_user(vfio: VfioSetup) -> None:
    b = vfio.blk()
    a = vfio.peer()
    a.peer.raw(P.HEADER.pack(1, P.Command.REGION_READ, 16 + 16, 0, 0))  # 16 bytes promised
    b.read(vfio.loop, 3)
    assert a.peer.closed_by_server()
    b.read(vfio.loop, 5)
    b.close()


# --- 7: a peer that never reads its replies ----------------------------------------------
def test_peer_7_unread_replies_vhost_user(vhost: VhostSetup) -> None:
    b = vhost.blk()
    a = vhost.peer()
    get_config = encode(Request.GET_CONFIG, struct.pack("<III", 0, 256, 0) + bytes(256))
    flood_until_closed(vhost.loop, lambda: a.peer.raw(get_config * 16),
                       lambda: vhost.server.closed_sessions == 1)
    b.read(vhost.loop, 1)  # B was never blocked behind A's full socket
    assert len(vhost.server.sessions) == 1
    a.peer.close()
    b.close()


def test_peer_7_unread_replies_vfio_user(vfio: VfioSetup) -> None:
    b = vfio.blk()
    a = vfio.peer()
    read_cfg = P.encode(1, P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 7, 256))
    flood_until_closed(vfio.loop, lambda: a.peer.raw(read_cfg * 16),
                       lambda: vfio.server.closed_sessions == 1)
    b.read(vfio.loop, 2)
    a.peer.close()
    b.close()


# --- 8: sizes and offsets of 2^63 and more ------------------------------------------------
def test_peer_8_region_of_2_63_vhost_user(vhost: VhostSetup) -> None:
    b = vhost.blk()
    for size, offset in ((1 << 63, 0), (RAM, 1 << 63), ((1 << 64) - 4096, 4096)):
        a = vhost.peer()
        a.mem_table(b.mem, size=size, offset=offset)
        assert a.peer.closed_by_server()
        a.peer.close()
        b.read(vhost.loop, 2)
    a = vhost.peer()
    a.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", INFLIGHT_SHMFD))
    area = InflightArea.create(1, 256)
    a.send(Request.SET_INFLIGHT_FD, INFLIGHT.pack(area.size, 1 << 63, 1, 256), [os.dup(area.fd)])
    assert a.peer.closed_by_server()
    area.close()
    b.read(vhost.loop, 3)
    b.close()


def test_peer_8_dma_map_of_2_63_vfio_user(vfio: VfioSetup) -> None:
    b = vfio.blk()
    a = vfio.peer()
    for size, offset in ((1 << 63, 0), (RAM, 1 << 63), ((1 << 64) - 4096, 4096)):
        assert a.dma_map(b.mem, size=size, offset=offset, iova=1 << 32) == errno.EINVAL
    assert a.read(7, 0, 2) == 0x1AF4  # A's session goes on too
    b.read(vfio.loop, 2)
    b.close()


# --- 9: a DMA_MAP whose mmap fails must not close its fd twice ---------------------------------
def test_peer_9_failed_dma_map_closes_its_fd_once(vfio: VfioSetup) -> None:
    b = vfio.blk()
    a = vfio.peer()
    assert a.dma_map(b.mem, iova=0) == 0
    before = open_fds()  # with A's session and its map
    region = next(b.mem.regions())
    read_only = os.open(f"/proc/self/fd/{region.fd}", os.O_RDONLY)  # sealed, but no PROT_WRITE
    assert a.dma_map(b.mem, fd=read_only, iova=1 << 32) == errno.EINVAL  # mmap: EACCES
    assert a.dma_map(b.mem, iova=0x1000) == errno.EINVAL  # overlaps the map at 0
    assert a.read(7, 0, 2) == 0x1AF4  # no EBADF killed anything
    b.read(vfio.loop, 1)
    assert open_fds() == before  # both refused fds closed (once: no EBADF above)
    b.close()


# --- 10: memory the peer could shrink under us ---------------------------------------------
def unsealed_fds(tmp_path: Path) -> list[tuple[str, int]]:
    plain = os.memfd_create("unsealed")
    os.ftruncate(plain, RAM)
    f = tmp_path / "ram.file"
    f.write_bytes(bytes(RAM))
    short = sealed_memfd("short", RAM // 2)
    return [("memfd without seals", plain), ("a file", os.open(f, os.O_RDWR)),
            ("sealed but too short", short)]


def test_peer_10_unsealed_memory_refused_vhost_user(vhost: VhostSetup, tmp_path: Path) -> None:
    b = vhost.blk()
    for what, fd in unsealed_fds(tmp_path):
        a = vhost.peer()
        a.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 3))  # REPLY_ACK
        ack = a.call(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack(
            "<QQQQ", 0, RAM, 0x7F0000000000, 0), [fd], ack=True)
        assert struct.unpack("<Q", ack)[0] != 0, what  # refused, and said so
        assert a.peer.closed_by_server(), what
        a.peer.close()
        b.read(vhost.loop, 5)
    b.close()


def test_peer_10_unsealed_memory_refused_vfio_user(vfio: VfioSetup, tmp_path: Path) -> None:
    b = vfio.blk()
    a = vfio.peer()
    for what, fd in unsealed_fds(tmp_path):
        assert a.dma_map(b.mem, fd=fd, iova=1 << 32) == errno.EINVAL, what
    b.read(vfio.loop, 5)
    b.close()


def test_peer_10_pyvmm_memfds_are_sealed_against_resizing() -> None:
    """pyvmm's own shareable memory passes the check it makes of others: guest RAM,
    the inflight region, the shared BAR. Their owner cannot shrink them either."""
    with GuestMemory([(0, RAM)]) as mem:
        area, bar = InflightArea.create(1, 8), SharedMemoryBar(1 << 20)
        try:
            for fd in (next(mem.regions()).fd, area.fd, bar.fd):
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
                assert seals & fcntl.F_SEAL_SHRINK and seals & fcntl.F_SEAL_GROW
                with pytest.raises(PermissionError):
                    os.ftruncate(fd, 4096)
        finally:
            area.close()
            bar.close()


# --- 11: an inflight region with fewer entries than the ring ---------------------------------
@pytest.mark.parametrize("order", ["region-first", "ring-size-first"])
def test_peer_11_inflight_region_smaller_than_ring(vhost: VhostSetup, order: str) -> None:
    b = vhost.blk()
    a = vhost.peer()
    a.send(Request.SET_FEATURES, struct.pack("<Q", (1 << 32) | (1 << 30)))
    a.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", INFLIGHT_SHMFD))
    with GuestMemory([(0, RAM)]) as mem:
        a.mem_table(mem)
        area = InflightArea.create(1, 4)  # fresh (version 0), 4 entries
        set_region = (Request.SET_INFLIGHT_FD, INFLIGHT.pack(area.size, 0, 1, 4),
                      [os.dup(area.fd)])
        set_num = (Request.SET_VRING_NUM, struct.pack("<II", 0, 8), [])
        for req, payload, fds in ((set_region, set_num) if order == "region-first"
                                  else (set_num, set_region)):
            a.send(req, payload, fds)
        if order == "ring-size-first":  # refused when the ring starts
            a.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, 0x7F0000010000,
                                                       0x7F0000011000, 0x7F0000010800, 0))
            kick = os.eventfd(0, os.EFD_NONBLOCK)
            a.send(Request.SET_VRING_KICK, struct.pack("<Q", 0), [kick])
            a.send(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
        assert a.peer.closed_by_server()
        area.close()
    b.read(vhost.loop, 6)
    b.close()


# --- 12: fds that are not (usable) eventfds ------------------------------------------------
def full_blocking_eventfd() -> int:
    fd = os.eventfd(0)  # blocking
    os.eventfd_write(fd, 0xFFFFFFFFFFFFFFFE)  # the maximum: the next write would block
    return fd


def test_peer_12_eventfds_checked_vhost_user(vhost: VhostSetup) -> None:
    b = vhost.blk()
    for req in (Request.SET_VRING_CALL, Request.SET_VRING_KICK):
        for kind in ("pipe", "socket"):
            r, w = os.pipe() if kind == "pipe" else (lambda p: (p[0].detach(), p[1].detach()))(
                socket.socketpair())
            a = vhost.peer()
            a.send(req, struct.pack("<Q", 0), [w if req == Request.SET_VRING_CALL else r])
            assert a.peer.closed_by_server(), (req, kind)
            a.peer.close()
            os.close(r if req == Request.SET_VRING_CALL else w)
            b.read(vhost.loop, 7)
    call = full_blocking_eventfd()
    a2 = vhost.blk("a", call=call)  # a front end whose interrupts are never read
    assert fcntl.fcntl(call, fcntl.F_GETFL) & os.O_NONBLOCK  # made non-blocking
    a2.read(vhost.loop, 1)  # completing it hits EAGAIN: already pending, not a hang
    assert os.eventfd_read(call) == 0xFFFFFFFFFFFFFFFE
    b.read(vhost.loop, 8)
    a2.close()
    b.close()


def test_peer_12_eventfds_checked_vfio_user(vfio: VfioSetup) -> None:
    b = vfio.blk()
    a = vfio.peer()
    r, w = os.pipe()
    irq = P.IRQ_SET.pack(20, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER,
                         P.VFIO_PCI_MSIX_IRQ_INDEX, 0, 1)
    assert a.call(P.Command.DEVICE_SET_IRQS, irq, [w])[0] == errno.EINVAL
    intx = P.IRQ_SET.pack(20, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER,
                          P.VFIO_PCI_INTX_IRQ_INDEX, 0, 1)
    assert a.call(P.Command.DEVICE_SET_IRQS, intx, [r])[0] == errno.EINVAL  # (both closed)
    call = full_blocking_eventfd()
    a2 = vfio.blk(irq=call)  # MSI-X vector 0 to an eventfd nobody reads
    assert fcntl.fcntl(call, fcntl.F_GETFL) & os.O_NONBLOCK
    a2.read(vfio.loop, 1)
    b.read(vfio.loop, 2)
    os.close(call)
    a2.close()
    b.close()


# --- 13: fds left open -------------------------------------------------------------------------
def test_peer_13_mem_table_failing_midway_closes_the_rest(vhost: VhostSetup) -> None:
    b = vhost.blk()
    before = open_fds()
    a = vhost.peer()
    with GuestMemory([(0, RAM), (RAM, RAM), (2 * RAM, RAM)]) as mem:
        fds = [os.dup(r.fd) for r in mem.regions()]
        table = struct.pack("<II", 3, 0) + b"".join(struct.pack(
            "<QQQQ", gpa, size, 0x7F0000000000 + gpa, 0)
            for gpa, size in ((0, RAM), (0, RAM), (2 * RAM, RAM)))  # the second overlaps
        a.send(Request.SET_MEM_TABLE, table, fds)
        assert a.peer.closed_by_server()
        a.peer.close()
    b.read(vhost.loop, 1)
    assert open_fds() == before  # the server kept none of the three
    b.close()


def test_peer_13_vfio_user_commands_without_fds_close_attached_ones(vfio: VfioSetup) -> None:
    b = vfio.blk()
    a = vfio.peer()
    assert a.read(7, 0, 2) == 0x1AF4
    before = open_fds()  # with A's session
    for _ in range(20):
        fd = os.eventfd(0)
        assert a.call(P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 7, 2), [fd])[0] == 0
    assert open_fds() == before
    b.read(vfio.loop, 1)
    b.close()


def test_peer_13_closed_vfio_user_session_closes_its_device(tmp_path: Path) -> None:
    from pyvmm.devices.pci.testdev import PciTestDev

    devices: list[PciTestDev] = []

    def make(mem: GuestMemory) -> PciTestDev:
        devices.append(PciTestDev(mem, RecordingMsiSink()))
        return devices[-1]

    server = VfioUserServer(str(tmp_path / "t.sock"), make)
    loop = Loop(server.events)
    try:
        before = open_fds()
        for _ in range(5):
            c = VfioUser(vfio_peer(server.path, loop))
            assert c.read(7, 0, 2) == 0x1234
            c.peer.close()
            loop.until(lambda: not server.sessions, "the session to end")
        assert open_fds() == before  # each test device's shared-BAR memfd closed
        assert all(d.shm.map.closed for d in devices)
    finally:
        server.close()


# --- 14: DMA_UNMAP under a running queue ---------------------------------------------------------
def test_peer_14_dma_unmap_stops_the_queue_on_it(vfio: VfioSetup) -> None:
    b = vfio.blk()
    b.read(vfio.loop, 1)
    err, _ = b.c.call(P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0, RAM))
    assert err == 0
    assert b.status() & V.VIRTIO_CONFIG_S_NEEDS_RESET
    core = vfio.devices[0].core
    assert not core.active and core.device.queues == []  # views released
    assert vfio.server.sessions[0].mem.total_size == 0
    used = b.dq.used_idx()
    b.mem.write(b.st, b"\xff")
    b.dq.add([(b.hdr, 16, False), (b.buf, 512, True), (b.st, 1, True)])
    b.kick()
    vfio.loop.steps()
    assert b.dq.used_idx() == used and b.mem.read(b.st, 1) == b"\xff"  # memory untouched
    b.close()


def test_peer_14_dma_unmap_waits_for_pool_io(tmp_path: Path) -> None:
    pool = IoPool(workers=2)
    s = VfioSetup(tmp_path, pool=pool, cold=True)
    disk = s.disk
    assert isinstance(disk, ColdDisk)
    try:
        b = s.blk()
        blk = s.devices[0].device
        assert isinstance(blk, VirtioBlk)
        entered = threading.Event()
        drain = blk.drain

        def drain_and_tell(timeout: float = 30.0) -> bool:
            entered.set()
            return drain(timeout)

        blk.drain = drain_and_tell  # type: ignore[method-assign]
        # The disk answers once the server waits for it in DMA_UNMAP, not before.
        opener = threading.Thread(target=lambda: entered.wait(WAIT) and disk.gate.set())
        opener.start()
        b.mem.write(b.hdr, struct.pack("<IIQ", V.VIRTIO_BLK_T_IN, 0, 0))  # sector 0: slow
        b.dq.add([(b.hdr, 16, False), (b.buf, 512, True), (b.st, 1, True)])
        b.kick()
        assert b.dq.used_idx() == 0  # in the pool
        err, _ = b.c.call(P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0, RAM))
        assert err == 0
        assert b.dq.used_idx() == 1  # completed before the unmap was answered
        assert b.mem.read(b.buf, 512) == s.image[:512]
        opener.join(WAIT)
        b.close()
    finally:
        s.server.close()
        pool.close()


def test_peer_14_nvme_queue_unmapped_is_fatal(tmp_path: Path) -> None:
    img = tmp_path / "n.img"
    img.write_bytes(bytes(64 * 1024))
    with GuestMemory([(0, RAM)]) as mem:
        ctl = NvmeController(RawBlockBackend(str(img)), mem, RecordingMsiSink())
        ctl.write_bar(0, N.NVME_REG_AQA, 4, (7 << 16) | 7)
        ctl.write_bar(0, N.NVME_REG_ASQ, 8, 0x10000)
        ctl.write_bar(0, N.NVME_REG_ACQ, 8, 0x20000)
        ctl.write_bar(0, N.NVME_REG_CC, 4, N.NVME_CC_ENABLE)
        assert ctl.csts & N.NVME_CSTS_RDY
        ctl.dma_unmapped(0x100000, 0x1000)  # elsewhere: nothing happens
        assert not ctl.csts & N.NVME_CSTS_CFS
        ctl.dma_unmapped(0x20000, 0x1000)  # under the admin completion queue
        assert ctl.csts & N.NVME_CSTS_CFS


def test_peer_host_started_work_fault_stops_only_that_ring(vhost: VhostSetup) -> None:
    """A fault in work the host started (a pool completion, a TAP frame) reaches the
    session through ``VirtioDevice.fail``: that ring stops, the session and B go on."""
    from pyvmm.errors import GuestMemoryError

    a, b = vhost.blk("a"), vhost.blk("b")
    session = vhost.server.sessions[0]
    with session.device.core_lock:
        session.device.fail(0, GuestMemoryError("a completion outside guest RAM"))
    assert session.rings[0].vq is None and session.device.queues[0] is None
    a.mem.write(a.st, b"\xff")
    a.dq.add([(a.hdr, 16, False), (a.buf, 512, True), (a.st, 1, True)])
    a.kick()
    vhost.loop.steps()
    assert a.dq.used_idx() == 0 and len(vhost.server.sessions) == 2
    b.read(vhost.loop, 1)
    a.close()
    b.close()
