"""The vfio-user server exporting the PCI test device, driven by a client written here:
config space, trapped BARs, DMA into the client's memfd, MSI-X by eventfd, and
malformed requests answered with an errno while the session goes on."""

from __future__ import annotations

import errno
import json
import os
import socket
import struct
from pathlib import Path

import pytest

from pyvmm.devices.pci.testdev import PciTestDev
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.memory import GuestMemory
from pyvmm.vfio_user import protocol as P
from pyvmm.vfio_user.server import VfioUserServer


class Client:
    def __init__(self, server: VfioUserServer) -> None:
        self.server = server
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(server.path)
        self.msg_id = 0
        self.pump()

    def pump(self) -> None:
        for _ in range(5):
            self.server.events.run_once(0.01)

    def call(self, cmd: int, payload: bytes = b"", fds: list[int] | None = None
             ) -> tuple[int, bytes]:
        self.msg_id += 1
        data = P.encode(self.msg_id, cmd, payload)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        self.sock.sendmsg([data], anc)
        self.pump()
        self.sock.settimeout(2)
        hdr = self.sock.recv(P.HEADER.size)
        msg_id, rcmd, size, flags, err = P.HEADER.unpack(hdr)
        assert (msg_id, rcmd) == (self.msg_id, cmd) and flags & P.FLAG_TYPE_REPLY
        body = self.sock.recv(size - P.HEADER.size) if size > P.HEADER.size else b""
        return (err if flags & P.FLAG_ERROR else 0), body

    def read(self, region: int, off: int, n: int) -> int:
        err, body = self.call(P.Command.REGION_READ, P.REGION_ACCESS.pack(off, region, n))
        assert err == 0
        return int.from_bytes(body[P.REGION_ACCESS.size:], "little")

    def write(self, region: int, off: int, n: int, v: int) -> int:
        err, _ = self.call(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(off, region, n)
                           + v.to_bytes(n, "little"))
        return err


@pytest.fixture
def server(tmp_path: Path) -> VfioUserServer:
    s = VfioUserServer(str(tmp_path / "vfu.sock"), lambda mem: PciTestDev(mem, RecordingMsiSink()))
    yield s  # type: ignore[misc]
    s.close()


def test_discovery(server: VfioUserServer) -> None:
    c = Client(server)
    err, body = c.call(P.Command.VERSION, struct.pack("<HH", 0, 0) + b'{"capabilities":{}}\0')
    assert err == 0 and struct.unpack_from("<HH", body) == (0, 0)
    assert "capabilities" in json.loads(body[4:].rstrip(b"\0"))
    _, body = c.call(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(16, 0, 0, 0))
    assert P.DEVICE_INFO.unpack(body)[2:] == (9, 5)
    _, body = c.call(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 7, 0, 0, 0))
    assert P.REGION_INFO.unpack(body)[4] == 256
    _, body = c.call(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 0, 0, 0, 0))
    assert P.REGION_INFO.unpack(body)[4] == 0x1000
    _, body = c.call(P.Command.DEVICE_GET_IRQ_INFO, P.IRQ_INFO.pack(16, 0, 2, 0))
    assert P.IRQ_INFO.unpack(body)[3] == 2  # MSI-X vectors
    assert c.read(7, 0, 4) == 0x50501234
    assert c.read(7, 0, 256) & 0xFFFFFFFF == 0x50501234  # whole config space at once
    assert c.read(0, 0, 4) == 0x5050ED01  # BAR0 ID register, trapped


def test_dma_into_client_memory_with_msix_by_eventfd(server: VfioUserServer) -> None:
    c = Client(server)
    with GuestMemory([(0, 2 << 20)]) as mem:
        region = next(mem.regions())
        err, _ = c.call(P.Command.DMA_MAP, P.DMA_MAP.pack(32, 3, 0, 0, 2 << 20),
                        fds=[os.dup(region.fd)])
        assert err == 0
        efds = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(2)]
        err, _ = c.call(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
            20, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER, 2, 0, 2),
            fds=[os.dup(f) for f in efds])
        assert err == 0
        assert c.write(7, 4, 2, 0x6) == 0  # memory + bus master
        mem.write(0x1000, b"vfio-user DMA ok!")
        for off, v in ((0x40, 0x1000), (0x48, 0x8000), (0x50, 17)):
            assert c.write(0, off, 4, v) == 0
        assert c.write(0, 0x58, 4, 0x5) == 0  # start, interrupt on completion
        assert mem.read(0x8000, 17) == b"vfio-user DMA ok!"
        assert c.read(0, 0x20, 4) & 0x100  # DMA_DONE
        assert os.eventfd_read(efds[0]) == 1  # MSI-X vector 0 by its eventfd
        assert c.write(0, 0x48, 4, 0x300000) == 0  # beyond the mapped memory
        assert c.write(0, 0x58, 4, 0x1) == 0
        assert c.read(0, 0x20, 4) & 0x200  # DMA_ERROR, no crash
        err, _ = c.call(P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0, 2 << 20))
        assert err == 0
        for f in efds:
            os.close(f)


@pytest.mark.parametrize("cmd,payload,want", [
    (P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(32, 0, 42, 0, 0, 0), errno.EINVAL),
    (P.Command.REGION_READ, P.REGION_ACCESS.pack(0xFC, 7, 8), errno.EINVAL),
    (P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 3), errno.EINVAL),
    (P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 0), errno.EINVAL),
    (P.Command.REGION_WRITE, P.REGION_ACCESS.pack(0, 0, 4) + b"\0", errno.EINVAL),
    (P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(20, P.VFIO_IRQ_SET_DATA_EVENTFD, 7, 0, 2),
     errno.EINVAL),
    (P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(20, 1, 2, 5, 9), errno.EINVAL),
    (P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0x123000, 4096), errno.ENOENT),
    (P.Command.DMA_MAP, b"\0" * 8, errno.EINVAL),
    (77, b"", errno.ENOSYS),
])
def test_malformed_requests_get_errno_and_the_session_goes_on(
        server: VfioUserServer, cmd: int, payload: bytes, want: int) -> None:
    c = Client(server)
    err, _ = c.call(cmd, payload)
    assert err == want
    assert c.read(7, 0, 2) == 0x1234  # still serving


def test_garbage_stream_closes_only_that_session(server: VfioUserServer) -> None:
    good, bad = Client(server), Client(server)
    bad.sock.sendall(P.HEADER.pack(1, 1, 1 << 30, 0, 0))
    bad.pump()
    bad.sock.settimeout(1)
    assert bad.sock.recv(1) == b""
    assert good.read(7, 0, 2) == 0x1234


def test_client_disconnect_mid_session_leaves_the_server_serving(server: VfioUserServer) -> None:
    c1 = Client(server)
    c1.read(7, 0, 2)
    c1.sock.close()
    c1.pump()
    assert server.sessions == []
    c2 = Client(server)
    assert c2.read(7, 0, 2) == 0x1234


def test_intx_fires_again_on_unmask_while_still_asserted(server: VfioUserServer) -> None:
    """QEMU's EOI (at the next BAR access) drops its pin and sends UNMASK: a line the
    device still holds high must signal again, one it dropped must not."""
    c = Client(server)
    efd = os.eventfd(0, os.EFD_NONBLOCK)
    err, _ = c.call(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
        20, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER,
        P.VFIO_PCI_INTX_IRQ_INDEX, 0, 1), fds=[os.dup(efd)])
    assert err == 0
    unmask = P.IRQ_SET.pack(20, P.VFIO_IRQ_SET_DATA_NONE | P.VFIO_IRQ_SET_ACTION_UNMASK,
                            P.VFIO_PCI_INTX_IRQ_INDEX, 0, 1)
    assert c.write(7, 4, 2, 0x2) == 0  # memory space
    assert c.write(0, 0x24, 4, 0x1) == 0  # raise: the level rises
    assert os.eventfd_read(efd) == 1
    assert c.call(P.Command.DEVICE_SET_IRQS, unmask)[0] == 0
    assert os.eventfd_read(efd) == 1  # still asserted: fired again
    assert c.write(0, 0x28, 4, 0x1) == 0  # ack: the level falls
    assert c.call(P.Command.DEVICE_SET_IRQS, unmask)[0] == 0
    with pytest.raises(BlockingIOError):
        os.eventfd_read(efd)
    os.close(efd)
