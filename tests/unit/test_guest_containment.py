"""Security issue #17, guest side: what a guest does to a device never takes the VMM down
or hangs it. One test per finding (``test_guest_<item>_...``), each of which failed on
main 7e4beaf, plus the event loop's containment mechanism itself."""

from __future__ import annotations

import errno
import os
import socket
import struct
from pathlib import Path

import pytest

from pyvmm.backends.block import RawBlockBackend
from pyvmm.backends.char import CharSpec, SerialIo
from pyvmm.devices.legacy.ioapic import IoApic
from pyvmm.devices.legacy.uart import Serial
from pyvmm.devices.nvme.queues import PAGE, PrpError, prp_segments
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.console import VirtioConsole
from pyvmm.devices.virtio.core import VirtioCore, VirtioDevice
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.queue import Virtqueue, VirtqueueError
from pyvmm.errors import GuestMemoryError, PyvmmError
from pyvmm.event import EventManager
from pyvmm.memory import GuestMemory
from pyvmm.testing import DriverQueue, RecordingInterrupt, VirtioDriver
from pyvmm.uapi import nvme as N
from pyvmm.uapi import serial as S
from pyvmm.uapi import virtio as V
from tests.unit.test_virtio_net import FakeTap

OUTSIDE_RAM = 1 << 40
FRAME = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + b"x" * 50


def bring_up(dev: VirtioDevice, mem: GuestMemory, features: int = 0,
             size: int = 8) -> tuple[VirtioCore, list[DriverQueue], RecordingInterrupt]:
    d = VirtioDriver(dev, mem, features=(1 << V.VIRTIO_F_VERSION_1) | features, size=size)
    assert d.core.active
    return d.core, d.queues, d.irq


def needs_reset(core: VirtioCore) -> bool:
    return bool(core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET)


# --- 1. virtio-net TX: a frame the host end refuses ---------------------------------------
class RefusingTap(FakeTap):
    def __init__(self, err: int) -> None:
        super().__init__()
        self.err, self.refuse = err, True

    def writev(self, bufs: list[memoryview]) -> int:
        if self.refuse:
            raise OSError(self.err, os.strerror(self.err))
        return super().writev(bufs)


@pytest.mark.parametrize("err", [errno.EINVAL, errno.EIO])
def test_guest_1_tx_frame_the_tap_refuses_is_dropped_and_the_queue_goes_on(err: int) -> None:
    mem = GuestMemory([(0, 4 << 20)])
    tap = RefusingTap(err)
    dev = VirtioNet(tap, bytes(6), EventManager())  # type: ignore[arg-type]
    core, (_, tx), _ = bring_up(dev, mem)
    tx.add([(tx.alloc(bytes(12) + FRAME), 12 + len(FRAME), False)])
    core.notify(1)  # raised OSError out of the event loop before
    assert dev.tx_dropped == 1 and not needs_reset(core)
    assert [h for h, _ in tx.take_used()] == [0]  # the driver got its buffer back
    tap.refuse = False
    tx.add([(tx.alloc(bytes(12) + FRAME), 12 + len(FRAME), False)])
    core.notify(1)
    assert tap.host.recv(100) == bytes(12) + FRAME and dev.tx_frames == 1


def test_guest_1_real_tap_link_down_and_runt_frames_are_dropped() -> None:
    if not os.access("/dev/net/tun", os.R_OK | os.W_OK):
        pytest.skip("/dev/net/tun is not usable here")
    from pyvmm.backends.tap import Tap

    tap = Tap("")  # fresh tap=auto: the link is down, so every write is EIO
    try:
        mem = GuestMemory([(0, 4 << 20)])
        dev = VirtioNet(tap, bytes(6), EventManager())
        core, (_, tx), _ = bring_up(dev, mem)
        tx.add([(tx.alloc(bytes(12) + FRAME), 12 + len(FRAME), False)])
        tx.add([(tx.alloc(bytes(12) + b"ab"), 14, False)])  # a runt: EINVAL
        core.notify(1)
        assert dev.tx_dropped == 2 and not needs_reset(core)
        assert len(tx.take_used()) == 2
    finally:
        tap.close()


# --- 2. virtio-net RX: a receive buffer outside guest RAM --------------------------------
def test_guest_2_rx_buffer_outside_ram_needs_reset_and_the_loop_goes_on() -> None:
    mem = GuestMemory([(0, 4 << 20)])
    ev, tap = EventManager(), FakeTap()
    dev = VirtioNet(tap, bytes(6), ev)  # type: ignore[arg-type]
    core, (rx, _), irq = bring_up(dev, mem)
    rx.add([(OUTSIDE_RAM, 2048, True)])
    core.notify(0)
    tap.host.send(bytes(12) + FRAME)
    ev.run_once(5)  # raised GuestMemoryError out of the loop before
    assert needs_reset(core) and irq.config == 1
    assert ev.bugs == 0 and ev.faults == 0  # contained by the device, not the loop
    tap.host.send(bytes(12) + FRAME)
    ev.run_once(0)  # a failed device reads no more frames: nothing happens
    core.set_status(0)  # the driver resets: a clean device again
    assert not needs_reset(core)


# --- 3. virtio-console RX: host input into a buffer outside guest RAM --------------------
def test_guest_3_console_input_into_a_buffer_outside_ram_needs_reset() -> None:
    mem = GuestMemory([(0, 4 << 20)])
    dev = VirtioConsole(lambda b: None)
    core, (rx, _), _ = bring_up(dev, mem)
    rx.add([(OUTSIDE_RAM, 64, True)])
    dev.enqueue_input(b"hello")  # raised GuestMemoryError before
    assert needs_reset(core)


# --- 4. virtio-blk DISCARD/WRITE_ZEROES: huge segment descriptors ------------------------
class CountingMemory(GuestMemory):
    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.bytes_read = 0
        self.reads_left: int | None = None

    def read(self, addr: int, n: int) -> bytes:
        self.bytes_read += n
        if self.reads_left is not None:
            self.reads_left -= 1
            if self.reads_left < 0:
                raise RuntimeError("the walk did not stop")
        return super().read(addr, n)


@pytest.mark.parametrize("typ", [V.VIRTIO_BLK_T_DISCARD, V.VIRTIO_BLK_T_WRITE_ZEROES])
def test_guest_4_discard_with_ram_sized_segments_is_refused_before_reading(
        tmp_path: Path, typ: int) -> None:
    img = tmp_path / "disk.img"
    img.write_bytes(bytes(1 << 20))
    mem = CountingMemory([(0, 8 << 20)])
    be = RawBlockBackend(str(img), False)
    try:
        dev = VirtioBlk(be)
        core, (q,), _ = bring_up(dev, mem, 1 << V.VIRTIO_RING_F_INDIRECT_DESC, size=32)
        hdr = q.alloc(struct.pack("<IIQ", typ, 0, 0))
        status = q.alloc(1)
        # 20 "segment" descriptors, each spanning 4 MiB of RAM: 80 MiB gathered before.
        segs = [(0, 4 << 20, False)] * 20
        q.add([(hdr, 16, False), *segs, (status, 1, True)], indirect=True)
        mem.bytes_read = 0
        core.notify(0)
        assert mem.read(status, 1)[0] == V.VIRTIO_BLK_S_IOERR
        assert mem.bytes_read < 4096  # the header and the status, not the segments
        assert not needs_reset(core)
    finally:
        be.close()


# --- 5. NVMe PRP list: a chain pointer that yields no entry ------------------------------
def test_guest_5_prp_list_pointing_at_itself_is_refused() -> None:
    mem = CountingMemory([(0, 1 << 20)])
    list_page = 0x10000
    last_slot = list_page + PAGE - 8  # a list whose first entry is the page's last slot
    mem.write(last_slot, struct.pack("<Q", last_slot))  # ... which points at itself
    mem.reads_left = 1000  # looped forever before; now one read and a status
    with pytest.raises(PrpError) as e:
        prp_segments(mem, 0x20000, last_slot, 4 * PAGE)
    assert e.value.status == N.NVME_SC_INVALID_PRP_OFFSET
    # Two such slots pointing at each other.
    other = 0x30000 + PAGE - 8
    mem.write(last_slot, struct.pack("<Q", other))
    mem.write(other, struct.pack("<Q", last_slot))
    mem.reads_left = 1000
    with pytest.raises(PrpError):
        prp_segments(mem, 0x20000, last_slot, 4 * PAGE)


def test_guest_5_a_chained_prp_list_still_works() -> None:
    mem = GuestMemory([(0, 1 << 20)])
    first, second = 0x10000 + PAGE - 16, 0x11000  # one entry, then the chain pointer
    mem.write(first, struct.pack("<QQ", 0x40000, second))
    mem.write(second, struct.pack("<QQ", 0x42000, 0x43000))
    assert prp_segments(mem, 0x3F000, first, 4 * PAGE) == [
        (0x3F000, 2 * PAGE), (0x42000, 2 * PAGE)]


# --- 15. UART: host input resumes however the FIFO got room ------------------------------
@pytest.fixture
def serial_socket(tmp_path: Path) -> tuple[Serial, SerialIo, EventManager, socket.socket]:
    ev = EventManager()
    path = tmp_path / "com1.sock"
    io = SerialIo(CharSpec("socket", str(path)), ev)
    uart = Serial(on_rx_space=io.resume_input)
    io.attach(uart)
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(str(path))
    ev.run_once(5)  # accept
    yield uart, io, ev, client
    client.close()
    io.close()
    ev.close()


def pump(ev: EventManager, rounds: int = 8) -> None:
    for _ in range(rounds):
        ev.run_once(0.05)


def receive(uart: Serial, ev: EventManager, n: int) -> bytes:
    """Read the FIFO as a driver does, letting the host end refill it, until n bytes
    (or the host end has nothing more to give)."""
    out = bytearray()
    for _ in range(4 * n + 8):
        if len(out) >= n:
            break
        if uart.read(0, S.UART_LSR, 1) & S.UART_LSR_DR:
            out.append(uart.read(0, S.UART_RX, 1))
        else:
            ev.run_once(0.05)
    return bytes(out)


def test_guest_15_input_resumes_after_the_guest_clears_a_full_fifo(
        serial_socket: tuple[Serial, SerialIo, EventManager, socket.socket]) -> None:
    uart, _io, ev, client = serial_socket
    client.sendall(bytes(range(40)))
    pump(ev)
    assert len(uart.rx) == 16  # full; the rest is held by the host end
    uart.write(0, S.UART_FCR, 1, S.UART_FCR_ENABLE_FIFO | S.UART_FCR_CLEAR_RCVR)
    pump(ev)  # stalled for good before: resume was tied to one RBR read
    assert receive(uart, ev, 24) == bytes(range(16, 40))


def test_guest_15_input_resumes_after_loopback(
        serial_socket: tuple[Serial, SerialIo, EventManager, socket.socket]) -> None:
    uart, _io, ev, client = serial_socket
    uart.write(0, S.UART_MCR, 1, S.UART_MCR_LOOP | S.UART_MCR_OUT2)
    client.sendall(b"while in loopback")
    pump(ev)
    assert not uart.rx  # the line is disconnected in loopback
    uart.write(0, S.UART_MCR, 1, S.UART_MCR_OUT2)
    assert receive(uart, ev, 17) == b"while in loopback"


# --- 16. IOAPIC: a narrow IOWIN read is no wider than the access -------------------------
@pytest.mark.parametrize("size", [1, 2, 4])
def test_guest_16_ioapic_iowin_read_fits_the_access(size: int) -> None:
    io = IoApic(lambda *a: None)  # type: ignore[arg-type]
    io.write(0, 0x00, 4, 0x01)  # IOREGSEL = version register
    value = io.read(0, 0x10, size)
    assert 0 <= value < 1 << (8 * size)
    assert value == (0x11 | (23 << 16)) & ((1 << (8 * size)) - 1)


# --- 17. a chain through an indirect table is at most queue-size descriptors -------------
def _chain_walk(mem: GuestMemory, size: int, direct: int, table_entries: int) -> int:
    dq = DriverQueue(mem, size)
    vq = Virtqueue(mem, dq.config(), indirect=True)
    table = dq.alloc(16 * table_entries)
    for i in range(table_entries):
        more = i + 1 < table_entries
        dq.write_desc(table, i, 0x200000, 8, V.VRING_DESC_F_NEXT if more else 0,
                      i + 1 if more else 0)
    for i in range(direct):
        dq.write_desc(dq.desc, i, 0x200000, 8, V.VRING_DESC_F_NEXT, i + 1)
    dq.write_desc(dq.desc, direct, table, 16 * table_entries, V.VRING_DESC_F_INDIRECT, 0)
    dq.publish(0)
    chain = vq.pop()
    assert chain is not None
    return len(chain.descriptors())


def test_guest_17_indirect_chain_longer_than_the_queue_is_refused() -> None:
    mem = GuestMemory([(0, 4 << 20)])
    with pytest.raises(VirtqueueError):
        _chain_walk(mem, 8, direct=7, table_entries=8)  # 15 descriptors: 2x8-1
    with pytest.raises(VirtqueueError):
        _chain_walk(GuestMemory([(0, 4 << 20)]), 8, direct=0, table_entries=9)


def test_guest_17_chains_up_to_the_queue_size_are_served() -> None:
    assert _chain_walk(GuestMemory([(0, 4 << 20)]), 8, direct=0, table_entries=8) == 8
    assert _chain_walk(GuestMemory([(0, 4 << 20)]), 8, direct=3, table_entries=5) == 8


# --- the mechanism: nothing a callback raises ends the loop ------------------------------
def test_event_loop_contains_callbacks_and_fails_their_owner() -> None:
    ev = EventManager()
    a, b = socket.socketpair()
    c, d = socket.socketpair()
    failed: list[str] = []
    served: list[bytes] = []

    def bad(fd: int, events: int) -> None:
        a.recv(10)
        raise GuestMemoryError("guest range 0x1 is not in guest RAM")

    def good(fd: int, events: int) -> None:
        served.append(c.recv(10))

    def buggy() -> None:
        raise KeyError("a VMM bug")

    try:
        ev.add(a.fileno(), bad, fail=failed.append)
        ev.add(c.fileno(), good)
        b.send(b"x")
        d.send(b"y")
        ev.call_soon(buggy)
        ev.call_later(0, buggy, fail=failed.append)
        for _ in range(3):
            ev.run_once(0.05)
        assert served == [b"y"]  # the other callback was still served
        assert ev.faults == 1 and ev.bugs == 2
        assert sorted(f.split(":")[0] for f in failed) == ["GuestMemoryError", "KeyError"]
        assert isinstance(GuestMemoryError("x"), PyvmmError)
    finally:
        for s in (a, b, c, d):
            s.close()
        ev.close()


def test_a_vmm_bug_in_device_work_needs_reset_and_is_counted() -> None:
    class Buggy(VirtioDevice):
        def process_queue(self, index: int) -> None:
            raise ZeroDivisionError("oops")

    mem = GuestMemory([(0, 4 << 20)])
    core, _, _ = bring_up(Buggy(), mem)
    core.notify(0)
    assert needs_reset(core) and core.bugs == 1


def test_guest_memory_error_is_a_pyvmm_error() -> None:
    # The loop's classification relies on it: guest faults are PyvmmErrors.
    assert issubclass(GuestMemoryError, PyvmmError) and issubclass(VirtqueueError, PyvmmError)
