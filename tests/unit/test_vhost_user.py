"""The vhost-user backend driven by a front end written here: the full data path, and
each class of malformed message closing only its own session."""

from __future__ import annotations

import os
import socket
import struct
from pathlib import Path

import pytest

from pyvmm.backends.block import RawBlockBackend
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import GuestMemory
from pyvmm.testing import DriverQueue
from pyvmm.vhost_user.backend import VhostUserServer
from pyvmm.vhost_user.protocol import (
    HEADER,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    Request,
    encode,
)

UADDR = 0x7F0000000000  # the front end's "user address" of guest RAM


class Frontend:
    def __init__(self, server: VhostUserServer, path: Path) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))
        self.pump()

    def pump(self) -> None:
        for _ in range(5):
            self.server.events.run_once(0.01)

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None,
             flags: int = 0, raw: bytes | None = None) -> None:
        data = raw if raw is not None else encode(req, payload, flags)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        self.sock.sendmsg([data], anc)
        self.pump()

    def reply(self) -> bytes:
        self.sock.settimeout(2)
        hdr = self.sock.recv(HEADER.size)
        _req, _flags, size = HEADER.unpack(hdr)
        return self.sock.recv(size) if size else b""

    def closed(self) -> bool:
        self.sock.settimeout(0.5)
        try:
            return self.sock.recv(1) == b""
        except TimeoutError:
            return False


@pytest.fixture
def served(tmp_path: Path) -> tuple[VhostUserServer, Path, Path]:
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(64 * 1024))
    server = VhostUserServer()
    a, b = tmp_path / "a.sock", tmp_path / "b.sock"
    server.listen(str(a), lambda: VirtioBlk(RawBlockBackend(str(img))))
    server.listen(str(b), VirtioRng)
    yield server, a, b  # type: ignore[misc]
    server.close()


def test_handshake_and_config(served: tuple[VhostUserServer, Path, Path]) -> None:
    server, a, _ = served
    fe = Frontend(server, a)
    fe.send(Request.GET_FEATURES)
    f = struct.unpack("<Q", fe.reply())[0]
    assert f & (1 << 32) and f & (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    fe.send(Request.GET_CONFIG, struct.pack("<III", 0, 8, 0) + bytes(8))
    off, size, _flags, cap = struct.unpack("<IIIQ", fe.reply())
    assert (off, size, cap) == (0, 8, 128)


def test_full_data_path_with_memfd_kick_and_call(served: tuple[VhostUserServer, Path, Path],
                                                 tmp_path: Path) -> None:
    server, a, _ = served
    data_path(Frontend(server, a), Path(str(a)).parent / "d.img")


def test_get_vring_base_waits_for_requests_in_the_io_pool(tmp_path: Path) -> None:
    """With the I/O pool a read may still be in flight when the front end stops the
    ring; GET_VRING_BASE answers only once it completed, so the base it returns has
    every earlier request in the used ring (what QEMU restores from)."""
    import threading

    from pyvmm.backends.io_pool import IoPool
    from tests.unit.test_blk_io_pool import ColdDisk

    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(64 * 1024))
    disk, pool = ColdDisk(str(img)), IoPool(workers=2)
    server = VhostUserServer()
    try:
        server.listen(str(tmp_path / "a.sock"), lambda: VirtioBlk(disk, pool=pool))
        opened = threading.Timer(0.3, disk.gate.set)
        data_path(Frontend(server, tmp_path / "a.sock"), img, slow=opened)
    finally:
        server.close()
        pool.close()


def data_path(fe: Frontend, img: Path, slow: object | None = None) -> None:
    """Mem table, one ring, one 512-byte read of sector 0 (sector 1 when not slow),
    call eventfd, GET_VRING_BASE. With ``slow`` (a started-later gate), the read is
    still in the pool when GET_VRING_BASE is sent."""
    sector = 0 if slow is not None else 1
    with GuestMemory([(0, 2 << 20)]) as mem:
        region = next(mem.regions())
        dq = DriverQueue(mem, size=8)
        fe.send(Request.SET_FEATURES, struct.pack("<Q", (1 << 32) | (1 << 30)))
        fe.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 3))  # REPLY_ACK
        fe.send(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack(
            "<QQQQ", 0, 2 << 20, UADDR, 0), fds=[os.dup(region.fd)],
            flags=VHOST_USER_NEED_REPLY_MASK)
        assert struct.unpack("<Q", fe.reply())[0] == 0  # acked
        kick, call = start_ring(fe, dq, base=0)
        hdr = dq.alloc(struct.pack("<IIQ", 0, 0, sector))
        buf, st = dq.alloc(512), dq.alloc(b"\xff")
        dq.add([(hdr, 16, False), (buf, 512, True), (st, 1, True)])
        os.eventfd_write(kick, 1)
        fe.pump()
        if slow is not None:
            assert dq.used_idx() == 0  # in the pool, waiting for the "disk"
            slow.start()  # type: ignore[attr-defined]
        else:
            assert dq.take_used() == [(0, 513)]
        fe.send(Request.GET_VRING_BASE, struct.pack("<II", 0, 0))
        assert struct.unpack("<II", fe.reply()) == (0, 1)
        if slow is not None:
            assert dq.take_used() == [(0, 513)]  # complete before the base was returned
        assert mem.read(st, 1) == b"\0" and os.eventfd_read(call) >= 1
        assert mem.read(buf, 512) == img.read_bytes()[512 * sector:512 * sector + 512]
        os.close(kick)
        os.close(call)


def start_ring(fe: Frontend, dq: DriverQueue, base: int) -> tuple[int, int]:
    """Ring 0 over ``dq`` (memory table already sent): size, base, addresses, call and
    kick eventfds, enable. Returns (kick, call)."""
    fe.send(Request.SET_VRING_NUM, struct.pack("<II", 0, dq.size))
    fe.send(Request.SET_VRING_BASE, struct.pack("<II", 0, base))
    fe.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, UADDR + dq.desc,
                                                 UADDR + dq.used, UADDR + dq.avail, 0))
    kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
    fe.send(Request.SET_VRING_CALL, struct.pack("<Q", 0), fds=[os.dup(call)])
    fe.send(Request.SET_VRING_KICK, struct.pack("<Q", 0), fds=[os.dup(kick)])
    fe.send(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
    return kick, call


BAD = {
    "short payload": dict(req=Request.SET_FEATURES, payload=b"\0" * 4),
    "mem table without fds": dict(req=Request.SET_MEM_TABLE, payload=struct.pack(
        "<II", 1, 0) + struct.pack("<QQQQ", 0, 4096, UADDR, 0)),
    "mem table count lies": dict(req=Request.SET_MEM_TABLE, payload=struct.pack("<II", 9, 0)),
    "kick without fd": dict(req=Request.SET_VRING_KICK, payload=struct.pack("<Q", 0)),
    "ring index out of range": dict(req=Request.SET_VRING_NUM, payload=struct.pack("<II", 7, 8)),
    "ring size not a power of two": dict(req=Request.SET_VRING_NUM,
                                         payload=struct.pack("<II", 0, 7)),
    "ring in no mapped region": dict(req=Request.SET_VRING_ADDR, payload=struct.pack(
        "<IIQQQQ", 0, 0, 0x1000, 0x2000, 0x3000, 0)),
    "unknown request": dict(req=99, payload=b""),
    "oversized payload": dict(req=0, raw=HEADER.pack(Request.SET_FEATURES, 1, 1 << 20)),
    "wrong version": dict(req=0, raw=HEADER.pack(Request.GET_FEATURES, 0, 0)),
    "features not offered": dict(req=Request.SET_FEATURES, payload=struct.pack("<Q", 1 << 60)),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_message_closes_only_its_session(
        served: tuple[VhostUserServer, Path, Path], case: str) -> None:
    server, a, b = served
    other = Frontend(server, b)
    bad = Frontend(server, a)
    spec = BAD[case]
    bad.send(spec["req"], spec.get("payload", b""), raw=spec.get("raw"))  # type: ignore[arg-type]
    assert bad.closed(), case
    other.send(Request.GET_FEATURES)
    assert struct.unpack("<Q", other.reply())[0] & (1 << 32)  # unaffected
    assert server.closed_sessions == 1
