"""Peers for the containment tests: raw vhost-user and vfio-user sockets, and a
virtio-blk front end over each that keeps doing I/O (``BlkOverVhostUser``,
``BlkOverVfioUser``).

The server's event loop runs in the test thread, one ``run_once`` step at a time:
``Loop.until`` steps it until a condition holds, within a generous deadline, so no
test depends on how fast a loaded machine is. Peer sockets are non-blocking; a peer
reads what the server sent while the loop is stepped. Fds given to a peer to send are
the peer's: it closes its copies once sent (pass ``os.dup(fd)`` to keep one), so the
tests' fd counts see only what the server holds.
"""

from __future__ import annotations

import array
import contextlib
import gc
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from pyvmm.backends.block import RawBlockBackend
from pyvmm.backends.io_pool import IoPool
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.transport.pci import COMMON_OFF, NOTIFY_OFF, VirtioPciDevice
from pyvmm.event import EventManager
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.memory import GuestMemory
from pyvmm.peer import ChannelLimits
from pyvmm.testing import DriverQueue
from pyvmm.uapi import virtio as V
from pyvmm.vfio_user import protocol as P
from pyvmm.vfio_user.server import VfioUserServer
from pyvmm.vhost_user.backend import VhostUserServer
from pyvmm.vhost_user.protocol import (
    HEADER,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    Request,
    encode,
)
from tests.unit.test_blk_io_pool import ColdDisk

UADDR = 0x7F0000000000  # the vhost-user front end's "user address" of guest RAM
RAM = 2 << 20
WAIT = 30.0  # seconds: only a broken server takes this long


def open_fds() -> int:
    """The process's open fds (test and server alike); sockets of peers an earlier
    test dropped without closing are collected first."""
    gc.collect()
    return len(os.listdir("/proc/self/fd"))


class Loop:
    def __init__(self, events: EventManager) -> None:
        self.events = events

    def until(self, cond: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.events.run_once(0.01)

    def steps(self, n: int = 5) -> None:
        for _ in range(n):
            self.events.run_once(0)


def flood_until_closed(loop: Loop, send: Callable[[], None], closed: Callable[[], bool]) -> None:
    """``send()`` requests whose replies are never read, until ``closed()``."""
    for _ in range(100000):
        if closed():
            return
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            send()  # the server may have closed us meanwhile: closed() says so next
        loop.steps(1)
    raise AssertionError("the server never closed a peer that reads no replies")


class Peer:
    """A raw stream peer: sends bytes (with fds), collects what comes back."""

    def __init__(self, path: str, loop: Loop, header: struct.Struct,
                 total: Callable[[bytes], int]) -> None:
        self.loop, self.header, self.total = loop, header, total
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.sock.setblocking(False)
        self.rbuf = b""
        self.rfds: list[int] = []
        self.eof = False

    def raw(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        view = memoryview(data)
        deadline = time.monotonic() + WAIT
        while view:
            try:
                n = self.sock.sendmsg([view], anc)
            except BlockingIOError:
                assert time.monotonic() < deadline, "server stopped reading"
                self.loop.steps(1)
                continue
            view, anc = view[n:], []
        for fd in fds:
            os.close(fd)

    def _pull(self) -> None:
        while not self.eof:
            try:
                data, anc, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(64))
            except BlockingIOError:
                return
            except ConnectionResetError:
                self.eof = True
                return
            for _lvl, _typ, raw in anc:
                got = array.array("i")
                got.frombytes(raw[:len(raw) - len(raw) % 4])
                self.rfds.extend(got)
            if not data:
                self.eof = True
            self.rbuf += data

    def _complete(self) -> bool:
        self._pull()
        n = self.header.size
        return len(self.rbuf) >= n and len(self.rbuf) >= self.total(self.rbuf[:n])

    def message(self) -> bytes:
        """The next whole message from the server (header included)."""
        self.loop.until(lambda: self._complete() or self.eof, "a reply")
        assert self._complete(), "the server closed the session instead of replying"
        n = self.total(self.rbuf[:self.header.size])
        msg, self.rbuf = self.rbuf[:n], self.rbuf[n:]
        return msg

    def closed_by_server(self) -> bool:
        self.loop.until(lambda: (self._pull(), self.eof)[1], "the server to close the session")
        return True

    def still_open(self) -> bool:
        self.loop.steps()
        self._pull()
        return not self.eof

    def close(self) -> None:
        for fd in self.rfds:
            os.close(fd)
        self.rfds = []
        self.sock.close()


def vhost_peer(path: str, loop: Loop) -> Peer:
    return Peer(path, loop, HEADER, lambda h: HEADER.size + HEADER.unpack(h)[2])


def vfio_peer(path: str, loop: Loop) -> Peer:
    return Peer(path, loop, P.HEADER, lambda h: P.HEADER.unpack(h)[2])


class VhostUser:
    """Messages of a vhost-user front end over a ``Peer``."""

    def __init__(self, peer: Peer) -> None:
        self.peer = peer

    def send(self, req: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             flags: int = 0) -> None:
        self.peer.raw(encode(req, payload, flags), fds)

    def call(self, req: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             ack: bool = False) -> bytes:
        self.send(req, payload, fds, VHOST_USER_NEED_REPLY_MASK if ack else 0)
        return self.peer.message()[HEADER.size:]

    def mem_table(self, mem: GuestMemory, size: int = RAM, offset: int = 0,
                  fd: int | None = None) -> None:
        region = next(mem.regions())
        self.send(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack(
            "<QQQQ", 0, size, UADDR, offset), [os.dup(region.fd) if fd is None else fd])


class VfioUser:
    """Commands of a vfio-user client over a ``Peer``."""

    def __init__(self, peer: Peer) -> None:
        self.peer, self.msg_id = peer, 0

    def send(self, cmd: int, payload: bytes = b"", fds: list[int] | tuple[int, ...] = (),
             flags: int = 0) -> int:
        self.msg_id = (self.msg_id + 1) & 0xFFFF
        self.peer.raw(P.encode(self.msg_id, cmd, payload, flags), fds)
        return self.msg_id

    def call(self, cmd: int, payload: bytes = b"",
             fds: list[int] | tuple[int, ...] = ()) -> tuple[int, bytes]:
        """(errno or 0, reply payload)."""
        msg_id = self.send(cmd, payload, fds)
        raw = self.peer.message()
        rid, rcmd, _size, flags, err = P.HEADER.unpack_from(raw)
        assert (rid, rcmd) == (msg_id, cmd) and flags & P.FLAG_TYPE_REPLY
        return (err if flags & P.FLAG_ERROR else 0), raw[P.HEADER.size:]

    def write(self, region: int, off: int, n: int, v: int) -> int:
        return self.call(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(off, region, n)
                         + v.to_bytes(n, "little"))[0]

    def read(self, region: int, off: int, n: int) -> int:
        err, body = self.call(P.Command.REGION_READ, P.REGION_ACCESS.pack(off, region, n))
        assert err == 0, err
        return int.from_bytes(body[P.REGION_ACCESS.size:], "little")

    def dma_map(self, mem: GuestMemory, size: int = RAM, offset: int = 0,
                fd: int | None = None, iova: int = 0) -> int:
        region = next(mem.regions())
        return self.call(P.Command.DMA_MAP, P.DMA_MAP.pack(32, 3, offset, iova, size),
                         [os.dup(region.fd) if fd is None else fd])[0]


class _Blk:
    """A virtio-blk driver's queue: one 512-byte read at a time, checked against the
    image. Subclasses set the queue up over their transport and say how to kick."""

    def __init__(self, image: bytes) -> None:
        self.image = image
        self.mem = GuestMemory([(0, RAM)])
        self.dq = DriverQueue(self.mem, size=8)
        self.hdr, self.buf, self.st = self.dq.alloc(16), self.dq.alloc(512), self.dq.alloc(1)
        self.done = 0

    def kick(self) -> None:
        raise NotImplementedError

    def read(self, loop: Loop, sector: int) -> None:
        """Read ``sector``; returns once the device completed it (or fails the test)."""
        self.mem.write(self.hdr, struct.pack("<IIQ", V.VIRTIO_BLK_T_IN, 0, sector))
        self.mem.write(self.st, b"\xff")
        self.dq.add([(self.hdr, 16, False), (self.buf, 512, True), (self.st, 1, True)])
        self.kick()
        used: list[tuple[int, int]] = []
        loop.until(lambda: bool(used.extend(self.dq.take_used()) or used), "B's request")
        assert [w for _, w in used] == [513] and self.mem.read(self.st, 1) == b"\0"
        assert self.mem.read(self.buf, 512) == self.image[512 * sector:512 * sector + 512]
        self.done += 1

    def close(self) -> None:
        self.mem.close()


class BlkOverVhostUser(_Blk):
    def __init__(self, peer: Peer, image: bytes, call: int | None = None) -> None:
        super().__init__(image)
        self.fe = fe = VhostUser(peer)
        fe.send(Request.SET_FEATURES, struct.pack(
            "<Q", (1 << V.VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)))
        fe.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", 1 << 3))  # REPLY_ACK
        region = next(self.mem.regions())
        ack = fe.call(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack(
            "<QQQQ", 0, RAM, UADDR, 0), [os.dup(region.fd)], ack=True)
        assert struct.unpack("<Q", ack)[0] == 0
        dq = self.dq
        fe.send(Request.SET_VRING_NUM, struct.pack("<II", 0, dq.size))
        fe.send(Request.SET_VRING_BASE, struct.pack("<II", 0, 0))
        fe.send(Request.SET_VRING_ADDR, struct.pack("<IIQQQQ", 0, 0, UADDR + dq.desc,
                                                     UADDR + dq.used, UADDR + dq.avail, 0))
        self.kickfd = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK) if call is None else call
        fe.send(Request.SET_VRING_CALL, struct.pack("<Q", 0), [os.dup(self.call)])
        fe.send(Request.SET_VRING_KICK, struct.pack("<Q", 0), [os.dup(self.kickfd)])
        ack = fe.call(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1), ack=True)
        assert struct.unpack("<Q", ack)[0] == 0

    def kick(self) -> None:
        os.eventfd_write(self.kickfd, 1)

    def close(self) -> None:
        os.close(self.kickfd)
        os.close(self.call)
        super().close()


class BlkOverVfioUser(_Blk):
    """Driver of an exported ``VirtioPciDevice(VirtioBlk)``: BAR0 registers by
    REGION_WRITE, the queue in the client's memory by DMA_MAP, kicks by notify writes."""

    def __init__(self, peer: Peer, image: bytes, irq: int | None = None) -> None:
        """``irq``: an eventfd for MSI-X vector 0, the queue's (kept by the caller)."""
        super().__init__(image)
        self.c = c = VfioUser(peer)
        assert c.dma_map(self.mem) == 0
        assert c.write(7, 4, 2, 0x6) == 0  # memory + bus master
        if irq is not None:
            assert c.call(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
                20, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER,
                P.VFIO_PCI_MSIX_IRQ_INDEX, 0, 1), [os.dup(irq)])[0] == 0

        def common(off: int, n: int, v: int) -> None:
            assert c.write(0, COMMON_OFF + off, n, v) == 0

        S = V
        common(S.VIRTIO_PCI_COMMON_STATUS, 1, S.VIRTIO_CONFIG_S_ACKNOWLEDGE
               | S.VIRTIO_CONFIG_S_DRIVER)
        common(S.VIRTIO_PCI_COMMON_GFSELECT, 4, 1)
        common(S.VIRTIO_PCI_COMMON_GF, 4, 1)  # VIRTIO_F_VERSION_1 (bit 32)
        common(S.VIRTIO_PCI_COMMON_STATUS, 1, 11)  # + FEATURES_OK
        common(S.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
        common(S.VIRTIO_PCI_COMMON_Q_SIZE, 2, self.dq.size)
        for off, val in ((S.VIRTIO_PCI_COMMON_Q_DESCLO, self.dq.desc),
                         (S.VIRTIO_PCI_COMMON_Q_AVAILLO, self.dq.avail),
                         (S.VIRTIO_PCI_COMMON_Q_USEDLO, self.dq.used)):
            common(off, 4, val)
        if irq is not None:
            common(S.VIRTIO_PCI_COMMON_Q_MSIX, 2, 0)
        common(S.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
        common(S.VIRTIO_PCI_COMMON_STATUS, 1, 15)  # + DRIVER_OK

    def status(self) -> int:
        return self.c.read(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_STATUS, 1)

    def kick(self) -> None:
        assert self.c.write(0, NOTIFY_OFF, 2, 0) == 0


# --- servers as the tests set them up ----------------------------------------------------
LIMITS = ChannelLimits(deadline=0.3, send_cap=64 << 10)  # small, so tests are quick


class VhostSetup:
    def __init__(self, tmp_path: Path) -> None:
        self.images = {}
        self.server = VhostUserServer(limits=LIMITS)
        self.loop = Loop(self.server.events)
        self.paths = {}
        for name in ("a", "b"):
            img = tmp_path / f"{name}.img"
            img.write_bytes(os.urandom(64 * 1024))
            self.images[name] = img.read_bytes()
            self.paths[name] = str(tmp_path / f"{name}.sock")
            disk = RawBlockBackend(str(img))  # one per socket, as the CLI has it
            self.server.listen(self.paths[name], lambda disk=disk: VirtioBlk(disk))

    def peer(self, name: str = "a") -> VhostUser:
        return VhostUser(vhost_peer(self.paths[name], self.loop))

    def blk(self, name: str = "b", call: int | None = None) -> BlkOverVhostUser:
        return BlkOverVhostUser(vhost_peer(self.paths[name], self.loop), self.images[name],
                                call)


class VfioSetup:
    def __init__(self, tmp_path: Path, pool: IoPool | None = None, cold: bool = False) -> None:
        img = tmp_path / "v.img"
        img.write_bytes(os.urandom(64 * 1024))
        self.image = img.read_bytes()
        self.disk = ColdDisk(str(img)) if cold else RawBlockBackend(str(img))
        self.devices: list[VirtioPciDevice] = []

        def make(mem: GuestMemory) -> VirtioPciDevice:
            dev = VirtioPciDevice(VirtioBlk(self.disk, pool=pool), mem, RecordingMsiSink())
            self.devices.append(dev)
            return dev

        self.path = str(tmp_path / "vfu.sock")
        self.server = VfioUserServer(self.path, make, limits=LIMITS)
        self.loop = Loop(self.server.events)

    def peer(self) -> VfioUser:
        return VfioUser(vfio_peer(self.path, self.loop))

    def blk(self, irq: int | None = None) -> BlkOverVfioUser:
        return BlkOverVfioUser(vfio_peer(self.path, self.loop), self.image, irq)
