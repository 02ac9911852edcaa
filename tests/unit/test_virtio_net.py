"""virtio-net device logic with a socketpair standing in for the TAP."""

from __future__ import annotations

import os
import socket
import struct

import pytest

from pyvmm.devices.virtio.core import VirtioCore
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.event import EventManager
from pyvmm.memory import GuestMemory
from pyvmm.testing import DriverQueue, VirtioDriver
from pyvmm.uapi import virtio as V


class FakeTap:
    def __init__(self) -> None:
        self.host, guest_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        guest_end.setblocking(False)
        self._sock = guest_end
        self.fd = guest_end.fileno()
        self.offload = -1

    def set_offload(self, flags: int) -> None:
        self.offload = flags

    def read(self, n: int = 65562) -> bytes | None:
        try:
            return self._sock.recv(n)
        except BlockingIOError:
            return None

    def writev(self, bufs: list[memoryview]) -> int:
        return os.writev(self.fd, bufs)


def setup(mrg: bool) -> tuple[VirtioCore, VirtioNet, FakeTap, DriverQueue, DriverQueue,
                              EventManager, GuestMemory]:
    mem = GuestMemory([(0, 4 << 20)])
    ev, tap = EventManager(), FakeTap()
    dev = VirtioNet(tap, bytes.fromhex("525400000001"), ev)  # type: ignore[arg-type]
    f = (1 << V.VIRTIO_F_VERSION_1) | (1 << V.VIRTIO_NET_F_GUEST_CSUM) | (
        (1 << V.VIRTIO_NET_F_MRG_RXBUF) if mrg else 0)
    d = VirtioDriver(dev, mem, features=f, size=8)
    rx, tx = d.queues
    return d.core, dev, tap, rx, tx, ev, mem


def test_transmit_writes_header_and_frame_to_the_tap() -> None:
    core, _, tap, _, tx, _, _ = setup(True)
    hdr, body = bytes(12), b"\xff" * 6 + b"\x02" * 6 + b"\x88\xb5" + b"data"
    tx.add([(tx.alloc(hdr), 12, False), (tx.alloc(body), len(body), False)])
    core.notify(1)
    assert tap.host.recv(100) == hdr + body
    assert tap.offload == 1  # GUEST_CSUM accepted -> TUN_F_CSUM


def test_receive_merges_and_holds_when_out_of_buffers() -> None:
    core, dev, tap, rx, _, ev, mem = setup(True)
    bufs = [rx.alloc(1024) for _ in range(2)]
    for b in bufs:
        rx.add([(b, 1024, True)])
    frame = bytes(12) + os.urandom(1500)
    tap.host.send(frame)
    ev.run_once(1)
    used = rx.take_used()
    assert [n for _, n in used] == [1024, len(frame) - 1024]
    assert struct.unpack("<H", mem.read(bufs[0] + 10, 2))[0] == 2  # num_buffers
    assert mem.read(bufs[0] + 12, 1012) + mem.read(bufs[1], len(frame) - 1024) == frame[12:]
    tap.host.send(bytes(12) + b"next")  # no buffers left: held, not lost
    ev.run_once(0.2)
    assert dev.pending is not None and not dev.watching
    b3 = rx.alloc(256)
    rx.add([(b3, 256, True)])
    core.notify(0)
    assert rx.take_used() == [(2, 16)] and mem.read(b3 + 12, 4) == b"next"


def test_without_mrg_a_frame_too_big_for_one_chain_is_dropped() -> None:
    core, dev, tap, rx, _, ev, _ = setup(False)
    rx.add([(rx.alloc(100), 100, True)])
    tap.host.send(bytes(12) + bytes(500))
    ev.run_once(1)
    assert dev.rx_dropped == 1 and rx.take_used() == [(0, 0)] and core.active


def test_short_receive_buffer_needs_reset() -> None:
    core, _, tap, rx, _, ev, _ = setup(True)
    rx.add([(rx.alloc(4), 4, True)])
    tap.host.send(bytes(12) + b"x")
    ev.run_once(1)
    assert core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET


@pytest.mark.parametrize("size", [0, 12, 70000])
def test_bad_transmit_sizes_are_dropped(size: int) -> None:
    core, dev, _, _, tx, _, _ = setup(True)
    tx.add([(tx.alloc(max(size, 1)), size, False)])
    core.notify(1)
    assert dev.tx_dropped == 1 and tx.take_used() == [(0, 0)] and core.active
