"""Fuzz targets on every surface a guest or a protocol peer reaches (issue #18 item 3).

Each target takes the fuzzer's bytes and drives one surface through its real entry
points. A *finding* is anything that escapes the surface's contained error path: an
exception where the device must answer as its spec says (the chips, the PCI and virtio
transports, fw_cfg), a virtio or NVMe fault that was not a guest's (``core.bugs``), a
config or image error that is not the one-line kind. Slow inputs and growth are the
fuzzer's own limits (``-timeout``, ``-rss_limit_mb``; see ``run.py``).

Targets are plain functions of ``bytes``: ``run.py`` hands them to atheris, and
``test_fuzz.py`` replays the committed seed corpora through them without atheris.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

from pyvmm.backends.block import RawBlockBackend
from pyvmm.bus import IoBus, MmioBus
from pyvmm.devices.emulated.e1000.nic import E1000
from pyvmm.devices.emulated.ide import spec as ide_spec
from pyvmm.devices.emulated.ide.controller import PiixIde
from pyvmm.devices.emulated.ide.disk import AtaDisk
from pyvmm.devices.input.ps2 import QUEUE_SIZE as PS2_QUEUE_SIZE
from pyvmm.devices.legacy.fw_cfg import FwCfg
from pyvmm.devices.legacy.i8042 import CTL_QUEUE_MAX as I8042_CTL_QUEUE_MAX
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.ioapic import IoApic
from pyvmm.devices.legacy.pic import PicPair
from pyvmm.devices.legacy.pit import Pit
from pyvmm.devices.legacy.rtc import Rtc
from pyvmm.devices.legacy.uart import Serial
from pyvmm.devices.nvme.controller import NvmeController
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.queue import QueueConfig, Virtqueue, VirtqueueError
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.transport.mmio import VirtioMmioDevice
from pyvmm.devices.virtio.transport.pci import VirtioPciDevice
from pyvmm.errors import ConfigError, GuestMemoryError
from pyvmm.event import EventManager
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.loader import load_kernel
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.pci import build_pci
from pyvmm.memory import GuestMemory
from pyvmm.sharing.switch import SwitchPort
from pyvmm.testing import RecordingLine, VirtioDriver
from pyvmm.uapi.input import KEYS
from pyvmm.vhost_user import protocol as vu

Target = Callable[[bytes], None]
RAM = 1 << 20


_RAM: list[GuestMemory] = []


def fresh_ram() -> GuestMemory:
    """One guest RAM for every run, zeroed: a run sees only its own input, and no run
    leaves a memfd behind (GuestMemory holds one until closed)."""
    if not _RAM:
        _RAM.append(GuestMemory([(0, RAM)]))
    mem = _RAM[0]
    mem.write(0, bytes(RAM))
    return mem


class Finding(AssertionError):
    """The surface let something through that its contract says it cannot."""


class Reader:
    """The fuzzer's bytes as a stream of small integers (exhausted: zeros)."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out.ljust(n, b"\0")

    def int(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def left(self) -> bool:
        return self.pos < len(self.data)


def register_ops(dev: object, data: bytes, spans: list[tuple[int, int]],
                 sizes: tuple[int, ...] = (1, 2, 4)) -> None:
    """Random reads and writes of ``dev``'s registers at (base, size) spans; every
    read must fit its access."""
    r = Reader(data)
    for _ in range(256):
        if not r.left():
            return
        base, span = spans[r.int(1) % len(spans)]
        off = r.int(2) % span
        size = sizes[r.int(1) % len(sizes)]
        if r.int(1) & 1:
            dev.write(base, off, size, r.int(size))  # type: ignore[attr-defined]
        else:
            v = dev.read(base, off, size)  # type: ignore[attr-defined]
            if not 0 <= v < 1 << (8 * size):
                raise Finding(f"{type(dev).__name__} read {v:#x} for a {size}-byte access")


# --- legacy chips at their ports -----------------------------------------------------
def uart(data: bytes) -> None:
    s = Serial(irq=RecordingLine())
    register_ops(s, data, [(0x3F8, 8)], (1,))
    s.enqueue_input(data[:64])


def pic(data: bytes) -> None:
    pair = PicPair()
    register_ops(pair.master, data, [(0x20, 2)], (1,))
    r = Reader(data[::-1])
    for _ in range(32):
        pair.set_irq(r.int(1) % 16, bool(r.int(1) & 1))
    for _ in range(4):
        pair.acknowledge()


def pit(data: bytes) -> None:
    register_ops(Pit(irq0=lambda: None, clock=lambda: 123_456_789), data, [(0x40, 4)], (1,))


def rtc(data: bytes) -> None:
    register_ops(Rtc(irq=RecordingLine(), memory_bytes=RAM, now_ns=lambda: 10**18), data,
                 [(0x70, 2)], (1,))


def ioapic(data: bytes) -> None:
    register_ops(IoApic(RecordingMsiSink()), data, [(0xFEC00000, 0x100)], (1, 2, 4, 8))


def i8042(data: bytes) -> None:
    """Guest port accesses interleaved with host key presses and mouse moves: every
    read fits a byte, the queues stay bounded, and the IRQ lines are what the status
    register and command byte say."""
    irq1, irq12 = RecordingLine(), RecordingLine()
    k = I8042(on_reset=lambda: None, irq1=irq1, irq12=irq12)
    names = sorted(KEYS)
    r = Reader(data)
    for _ in range(512):
        if not r.left():
            break
        op = r.int(1) % 6
        if op == 0:
            k.write(0x64, 0, 1, r.int(1))
        elif op in (1, 2):
            k.write(0x60, 0, 1, r.int(1))
        elif op == 3:
            v = k.read(0x60 if r.int(1) & 1 else 0x64, 0, 1)
            if not 0 <= v <= 0xFF:
                raise Finding(f"i8042 read {v:#x}")
        elif op == 4:
            name = names[r.int(1) % len(names)]
            (k.keyboard.press if r.int(1) & 1 else k.keyboard.release)(name)
        else:
            k.mouse.move(r.int(2) - 0x8000, r.int(1) - 0x80, r.int(1) - 0x80, r.int(1))
        if max(len(k.keyboard.queue), len(k.mouse.queue)) > PS2_QUEUE_SIZE:
            raise Finding("a PS/2 queue grew past its bound")
        if len(k.ctl) > I8042_CTL_QUEUE_MAX:
            raise Finding("the controller's reply queue grew past its bound")
        full, aux = bool(k.status & 0x01), bool(k.status & 0x20)
        if k.levels != [full and not aux and bool(k.ctr & 1), full and aux and bool(k.ctr & 2)]:
            raise Finding(f"IRQ lines {k.levels} disagree with status {k.status:#x} "
                          f"and command byte {k.ctr:#x}")


def fw_cfg(data: bytes) -> None:
    mem = fresh_ram()
    mem.write(0x1000, data[:4096])  # DMA access structures land here
    dev = FwCfg(mem, {0: b"QEMU", 1: b"\3\0\0\0"}, {"opt/x": b"y" * 300, "etc/e820": bytes(20)})
    register_ops(dev, data[4096:] or data, [(0x510, 2), (0x514, 8)], (1, 2, 4, 8))


# --- PCI: config space, BARs, MSI/MSI-X through the PCI root ---------------------------
def pci(data: bytes) -> None:
    mem = fresh_ram()
    pio, mmio = IoBus(), MmioBus()
    rng = VirtioPciDevice(VirtioRng(), mem, RecordingMsiSink())
    root = build_pci(pio, mmio, mem, RecordingMsiSink(), True, [rng])
    try:
        _pci_ops(pio, mmio, data)
    finally:
        for _, fn in root.functions():
            fn.close()  # the test device's shared-BAR memfd
    if rng.core.bugs:
        raise Finding("virtio core counted a bug")


def _pci_ops(pio: IoBus, mmio: MmioBus, data: bytes) -> None:
    r = Reader(data)
    for _ in range(256):
        if not r.left():
            return
        kind, size = r.int(1) % 4, (1, 2, 4)[r.int(1) % 3]
        if kind == 0:  # CONFIG_ADDRESS / CONFIG_DATA
            port = 0xCF8 + r.int(1) % 8
            if r.int(1) & 1:
                pio.write(port, size, r.int(size))
            else:
                pio.read(port, size)
        elif kind == 1:  # ECAM
            addr = 0xB0000000 + (r.int(3) % (1 << 20))
            if r.int(1) & 1:
                mmio.write(addr, size, r.int(size))
            else:
                mmio.read(addr, size)
        else:  # wherever the BARs went
            addr = 0xC0000000 + (r.int(3) << 4)
            if kind == 2:
                mmio.write(addr, size, r.int(size))
            else:
                mmio.read(addr, size)


# --- virtio ------------------------------------------------------------------------------
def _rings_from(mem: GuestMemory, data: bytes, size: int) -> QueueConfig:
    q = QueueConfig(size)
    q.desc, q.avail, q.used, q.ready = 0x10000, 0x20000, 0x30000, True
    mem.write(0x10000, data[:16 * size].ljust(16 * size, b"\0"))
    mem.write(0x20000, data[16 * size:16 * size + 6 + 2 * size].ljust(6 + 2 * size, b"\0"))
    mem.write(0x40000, data[:8192])  # indirect tables point here
    return q


def virtqueue(data: bytes) -> None:
    mem = fresh_ram()
    vq = Virtqueue(mem, _rings_from(mem, data, 16), indirect=True)
    for _ in range(32):
        try:
            chain = vq.pop()
        except VirtqueueError:
            return
        if chain is None:
            return
        try:
            descs = chain.descriptors()
        except VirtqueueError:
            continue
        if len(descs) > vq.size:
            raise Finding(f"a chain of {len(descs)} descriptors in a queue of {vq.size}")
        vq.add_used(chain, 0)


def _drive(dev: VirtioDevice, data: bytes, features: int) -> None:
    mem = fresh_ram()
    d = VirtioDriver(dev, mem, features=features, size=16)
    for i, dq in enumerate(d.queues):  # the rings' contents are the fuzzer's
        mem.write(dq.desc, data[:256].ljust(256, b"\0"))
        mem.write(dq.avail + 2, data[256 + 2 * i:258 + 2 * i].ljust(2, b"\0"))
        mem.write(dq.avail + 4, data[260:292].ljust(32, b"\0"))
    mem.write(0x40000, data[292:8192])
    for i in range(len(d.queues)):
        d.kick(i)
    if d.core.bugs:
        raise Finding("virtio core counted a bug")


_IMAGE: list[str] = []


def _image() -> str:
    """A 1 MiB image for the disk targets: unlinked at once and reopened through
    /proc/self/fd, so no run (libFuzzer ends the process with exit(), past any Python
    clean-up) leaves a file behind."""
    if not _IMAGE:
        fd, path = tempfile.mkstemp(prefix="pyvmm-fuzz-", suffix=".img")
        os.ftruncate(fd, 1 << 20)
        os.unlink(path)
        _IMAGE.append(f"/proc/self/fd/{fd}")
    return _IMAGE[0]


def virtio_blk(data: bytes) -> None:
    """Half the inputs are raw ring bytes; the other half requests built from the
    fuzzer's choices (type, sector, how header, data and status are split over
    descriptors, which are writable, direct or indirect): deep into the request path."""
    be = RawBlockBackend(_image())
    try:
        dev = VirtioBlk(be)
        if data[:1] and data[0] & 1:
            _blk_requests(dev, data[1:])
        else:
            _drive(dev, data[1:], dev.features)
    finally:
        be.close()


def _blk_requests(dev: VirtioBlk, data: bytes) -> None:
    mem = fresh_ram()
    d = VirtioDriver(dev, mem, features=dev.features, size=32)
    dq = d.queues[0]
    r = Reader(data)
    types = (0, 1, 4, 8, 11, 13, 0xFF)  # IN OUT FLUSH GET_ID DISCARD WRITE_ZEROES other
    for _ in range(8):
        if not r.left():
            break
        typ = types[r.int(1) % len(types)]
        sector = r.int(1) << (r.int(1) % 40)
        body = r.take(r.int(1) % 64) if typ in (11, 13) else b""
        n = (r.int(1) % 9) * 512 + (r.int(1) % 4 if r.int(1) % 8 == 0 else 0)
        hdr = struct.pack("<IIQ", typ, 0, sector) + body
        parts: list[tuple[int, int, bool]] = []
        cut = r.int(1) % (len(hdr) + 1)
        for piece in (hdr[:cut], hdr[cut:]):
            if piece:
                parts.append((dq.alloc(piece), len(piece), bool(r.int(1) % 16 == 0)))
        if n:
            parts.append((dq.alloc(n), n, typ != 1))
        parts.append((dq.alloc(1), 1 + r.int(1) % 2, r.int(1) % 16 != 0))
        if r.int(1) % 8 == 0:
            a, ln, w = parts[r.int(1) % len(parts)]
            parts[r.int(1) % len(parts)] = (a + (r.int(4) << 20), ln, w)  # outside RAM
        if len(parts) > 12:
            parts = parts[:12]
        try:
            dq.add(parts, indirect=bool(r.int(1) & 1))
        except GuestMemoryError:
            break  # the driver side ran out of buffer space: the input is used up
        d.kick(0)
    if d.core.bugs:
        raise Finding("virtio core counted a bug")


class _Sink:
    offloads = False

    def __init__(self) -> None:
        self.a, self.b = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.fd = self.a

    def set_offload(self, flags: int) -> None:
        pass

    def read(self, n: int = 65562) -> bytes | None:
        return None

    def writev(self, bufs: list[memoryview]) -> int:
        n = sum(len(b) for b in bufs)
        if n < 26:
            raise OSError(22, "Invalid argument")  # as a TAP refuses a runt
        return n

    def close(self) -> None:
        os.close(self.a)
        os.close(self.b)


def virtio_net(data: bytes) -> None:
    ev, sink = EventManager(), _Sink()
    try:
        dev = VirtioNet(sink, bytes(6), ev)  # type: ignore[arg-type]
        _drive(dev, data, dev.features)
    finally:
        sink.close()
        ev.close()


def virtio_pci_regs(data: bytes) -> None:
    mem = fresh_ram()
    dev = VirtioPciDevice(VirtioRng(), mem, RecordingMsiSink())
    r = Reader(data)
    for _ in range(256):
        if not r.left():
            break
        what, size = r.int(1) % 3, (1, 2, 4, 8)[r.int(1) % 4]
        off = r.int(2)
        if what == 0:
            dev.config_write(off % 256, min(size, 4), r.int(4))
        elif what == 1:
            dev.write_bar(r.int(1) % 2, off % 0x4000, size, r.int(size))
        else:
            v = dev.read_bar(r.int(1) % 2, off % 0x4000, size)
            if not 0 <= v < 1 << (8 * size):
                raise Finding(f"BAR read {v:#x} for {size} bytes")
    if dev.core.bugs:
        raise Finding("virtio core counted a bug")


def virtio_mmio_regs(data: bytes) -> None:
    mem = fresh_ram()
    dev = VirtioMmioDevice(VirtioRng(), mem, RecordingLine())
    register_ops(dev, data, [(0xFEB00000, 0x200)], (1, 2, 4, 8))
    if dev.core.bugs:
        raise Finding("virtio core counted a bug")


# --- NVMe --------------------------------------------------------------------------------
def nvme(data: bytes) -> None:
    """Half the inputs are raw register writes over fuzzer-filled memory; the other half
    an enabled controller (admin queues set up as a driver does) given submission
    entries built from the fuzzer's choices: opcodes, queue creation, PRPs and lists
    anywhere, LBAs and lengths."""
    if data[:1] and data[0] & 1:
        _nvme_commands(data[1:])
        return
    _nvme_registers(data[1:])


def _nvme_commands(data: bytes) -> None:
    mem = fresh_ram()
    be = RawBlockBackend(_image())
    try:
        dev = NvmeController(be, mem, RecordingMsiSink())
        asq, acq = 0x10000, 0x11000
        dev.write_bar(0, 0x24, 4, (15 << 16) | 15)  # AQA: 16 entries each
        dev.write_bar(0, 0x28, 4, asq)
        dev.write_bar(0, 0x2C, 4, 0)
        dev.write_bar(0, 0x30, 4, acq)
        dev.write_bar(0, 0x34, 4, 0)
        dev.write_bar(0, 0x14, 4, (6 << 20) | (4 << 16) | 1)  # CC: IOCQES, IOSQES, EN
        mem.write(0x40000, data[:8192])  # PRP lists and data the fuzzer may point at
        r = Reader(data[8192:] if len(data) > 8192 else data)
        ops = (0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x08, 0x09, 0x0A, 0x0C, 0x80, 0x81, 0x82)
        tail = {0: 0, 1: 0}
        for _ in range(24):
            if not r.left():
                break
            qid = 1 if r.int(1) % 3 == 0 else 0
            base = asq if qid == 0 else 0x20000
            op = ops[r.int(1) % len(ops)] if r.int(1) % 8 else r.int(1)
            prp1 = 0x40000 + (r.int(2) << (r.int(1) % 12)) if r.int(1) % 8 else r.int(8)
            prp2 = 0x40000 + (r.int(2) << 3) if r.int(1) % 4 else r.int(8)
            cdw = [r.int(4) for _ in range(6)]
            if qid == 0 and op in (0x01, 0x05):  # create I/O SQ/CQ 1 at fixed places
                prp1 = 0x20000 if op == 0x01 else 0x21000
                cdw[0] = (1 | ((r.int(1) % 16) << 16))
                cdw[1] = 1 | (r.int(1) & 2) | ((1 << 16) if op == 0x01 else 0)
            cmd = struct.pack("<BBHIQQQQ6I", op, 0, r.int(2), r.int(1) % 3, 0, 0, prp1, prp2,
                              *cdw)
            mem.write(base + 64 * tail[qid], cmd)
            tail[qid] = (tail[qid] + 1) % 16
            dev.write_bar(0, 0x1000 + 8 * qid, 4, tail[qid])
            if r.int(1) % 4 == 0:  # the host frees completions now and then
                dev.write_bar(0, 0x1000 + 8 * qid + 4, 4, r.int(1) % 16)
    finally:
        be.close()


def _nvme_registers(data: bytes) -> None:
    mem = fresh_ram()
    mem.write(0x10000, data[:8192])  # queues and PRP lists the fuzzer may point at
    be = RawBlockBackend(_image())
    try:
        dev = NvmeController(be, mem, RecordingMsiSink())
        r = Reader(data[8192:] or data)
        for _ in range(128):
            if not r.left():
                break
            if r.int(1) % 4 == 0:
                v = dev.read_bar(0, r.int(2) % 0x2000, 4)
                if not 0 <= v < 1 << 32:
                    raise Finding("NVMe register wider than its access")
            else:
                dev.write_bar(0, (r.int(2) % 0x1010) & ~3, 4, r.int(4))
    finally:
        be.close()


# --- protocol codecs and loaders ---------------------------------------------------------
def ide(data: bytes) -> None:
    """The PIIX3 IDE function with a disk, at its legacy ports and BMIBA as the builder
    places them (in native-PCI mode, its channels' BARs too), over fuzzer-filled memory
    where the PRD tables and buffers may be:
    register accesses of any width (the engine's table pointer, start bit and the
    command register among them), whole sectors through the Data register so data
    phases complete, and config writes (decode, BMIBA, bus mastering). Every read must
    fit its access; nothing may raise."""
    mem = fresh_ram()
    mem.write(0x10000, data[:4096])  # PRD tables the pointer is steered to
    be = RawBlockBackend(_image())
    try:
        # The last byte's low bit picks native-PCI mode (channels in BAR0-3, one INTx).
        native = bool(data[-1:] and data[-1] & 1)
        dev = (PiixIde(mem, None, native=True) if native
               else PiixIde(mem, (RecordingLine(), RecordingLine())))
        dev.attach(0, 0, AtaDisk(be, 0, serial="FUZZ", model="M", firmware="1",
                                 errors=dev.errors))
        pio, mmio = IoBus(), MmioBus()
        for rng in ide_spec.SPEC.isa:
            pio.insert(dev, rng.base, rng.size, rng.name)
        root = build_pci(pio, mmio, mem, RecordingMsiSink(), False, [dev])
        bm = dev.config.bar_address(4)
        ports = [*range(0x1F0, 0x1F8), 0x3F6, 0x170, 0x177, 0x376, *range(bm, bm + 16)]
        data_port = 0x1F0
        if native:
            bars = [dev.config.bar_address(i) for i in range(4)]
            data_port = bars[0]
            ports += [p for i, b in enumerate(bars) for p in range(b, b + (8, 4)[i % 2])]
        r = Reader(data[4096:] if len(data) > 4096 else data)
        for _ in range(256):
            if not r.left():
                return
            kind, size = r.int(1) % 8, (1, 2, 4)[r.int(1) % 3]
            if kind == 0:  # a PRD table in the fuzzer's bytes
                pio.write(bm + 4 + 8 * (r.int(1) & 1), 4, 0x10000 + (r.int(2) & 0xFF8))
            elif kind == 1:  # a whole sector through the Data register
                write, value = bool(r.int(1) & 1), r.int(2)
                for _ in range(256):
                    if write:
                        pio.write(data_port, 2, value)
                    else:
                        pio.read(data_port, 2)
            elif kind == 2:
                off = (4, 0x40, 0x20)[r.int(1) % 3]
                root.config_write(0, 2, 0, off, 2, r.int(2))
            else:
                port = ports[r.int(1) % len(ports)]
                if r.int(1) & 1:
                    pio.write(port, size, r.int(size))
                elif not 0 <= (v := pio.read(port, size)) < 1 << (8 * size):
                    raise Finding(f"ide read {v:#x} for a {size}-byte access")
    finally:
        be.close()


class _Watch:
    """The two calls the e1000 makes on its event loop, recorded."""

    def __init__(self) -> None:
        self.cbs: dict[int, Callable[[int, int], None]] = {}

    def add(self, fd: int, callback: Callable[[int, int], None]) -> None:
        self.cbs[fd] = callback

    def remove(self, fd: int) -> None:
        self.cbs.pop(fd, None)


_E1000_REGS = (0x0, 0x8, 0x10, 0x14, 0x20, 0xC0, 0xC8, 0xD0, 0xD8, 0x100, 0x400, 0x2800,
               0x2804, 0x2808, 0x2810, 0x2818, 0x3800, 0x3804, 0x3808, 0x3810, 0x3818,
               0x4074, 0x5200, 0x5400, 0x5404, 0x5600)


def e1000(data: bytes) -> None:
    """The 82540EM through BAR0 and the BAR1 window, over fuzzer-filled memory where the
    rings may be (the ring bases are steered there), with frames from the fuzzer arriving
    on its backend: every read must fit its access, INTx must be ICR & IMS, nothing may
    raise."""
    mem = fresh_ram()
    mem.write(0x10000, data[:2048])  # descriptors the ring bases are steered to
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (a, b):
        s.setblocking(False)
    ev, line = _Watch(), RecordingLine()
    try:
        dev = E1000(mem, SwitchPort(a, "fuzz"), bytes.fromhex("525400123456"), ev)
        dev.intx = line
        r = Reader(data[2048:] if len(data) > 2048 else data)
        for _ in range(256):
            if not r.left():
                return
            kind, size = r.int(1) % 8, (1, 2, 4, 8)[r.int(1) % 4]
            if kind == 0:  # a ring base at the fuzzer's descriptors
                dev.write_bar(0, (0x2800, 0x3800)[r.int(1) & 1], 4, 0x10000 + (r.int(2) & 0x7F0))
            elif kind == 1:  # a frame from the host end
                with contextlib.suppress(BlockingIOError):
                    b.send(bytes(12) + r.take(r.int(2) % 2000))
                if a.fileno() in ev.cbs:
                    ev.cbs[a.fileno()](a.fileno(), 1)
            elif kind == 2:  # the I/O window
                dev.write_bar(1, 0, 4, r.int(4))
                if r.int(1) & 1:
                    dev.write_bar(1, 4, 4, r.int(4))
                elif not 0 <= dev.read_bar(1, 4, 4) < 1 << 32:
                    raise Finding("e1000 IODATA read wider than 32 bits")
            else:
                off = (_E1000_REGS[r.int(1) % len(_E1000_REGS)] if kind < 6
                       else r.int(3) % 0x20000) & ~(size - 1)
                if r.int(1) & 1:
                    dev.write_bar(0, off, size, r.int(size))
                elif not 0 <= (v := dev.read_bar(0, off, size)) < 1 << (8 * size):
                    raise Finding(f"e1000 read {v:#x} for a {size}-byte access")
            if line.level != bool(dev.icr & dev.ims):
                raise Finding("e1000 INTx differs from ICR & IMS")
            with contextlib.suppress(BlockingIOError):
                while b.recv(65536):
                    pass
    finally:
        a.close()
        b.close()


def vhost_user_codec(data: bytes) -> None:
    try:
        req, flags, size = vu.decode_header(data[:12])
    except vu.ProtocolError:
        return
    m = vu.Message(req, flags, data[12:12 + size])
    for view in (m.u64, m.vring_state, m.vring_addr, m.mem_table, m.inflight, m.config):
        with contextlib.suppress(vu.ProtocolError):
            view()


def config_json(data: bytes) -> None:
    try:
        raw = json.loads(data.decode("utf-8", "surrogateescape"))
    except (ValueError, RecursionError):
        return
    if not isinstance(raw, dict):
        return
    try:
        MachineConfig.from_dict(raw)
    except ConfigError as e:
        if "\n" in str(e):
            raise Finding(f"a config error of more than one line: {e!r}") from None


def image_loader(data: bytes) -> None:
    with tempfile.NamedTemporaryFile(prefix="pyvmm-fuzz-", suffix=".elf") as f:
        f.write(data)
        f.flush()
        mem = GuestMemory([(0, 4 << 20)])
        try:
            load_kernel(f.name, mem)
        except ConfigError as e:  # LoaderError is one
            if "\n" in str(e):
                raise Finding(f"a loader error of more than one line: {e!r}") from None
        except GuestMemoryError:
            raise Finding("the loader let a guest-memory error escape") from None
        finally:
            mem.close()


# --- peer sessions: a vhost-user backend and a vfio-user server, over a socketpair -------
def _fds_for(r: Reader) -> list[int]:
    """What a peer might attach: an eventfd, a sealed memfd of RAM, a pipe end."""
    from pyvmm.memory.guest_memory import sealed_memfd

    out: list[int] = []
    for _ in range(r.int(1) % 3):
        kind = r.int(1) % 3
        if kind == 0:
            out.append(os.eventfd(0, os.EFD_CLOEXEC))
        elif kind == 1:
            out.append(sealed_memfd("fuzz-ram", RAM))
        else:
            a, b = os.pipe()
            os.close(b)
            out.append(a)
    return out


def _feed(conn_peer: socket.socket, events: EventManager, r: Reader,
          header: Callable[[Reader, int], bytes]) -> None:
    for _ in range(24):
        if not r.left():
            break
        payload = r.take(r.int(1) % 96)
        msg = header(r, len(payload)) + payload
        fds = _fds_for(r)
        try:
            if fds:
                socket.send_fds(conn_peer, [msg], fds)
            else:
                conn_peer.sendall(msg)
        except OSError:
            break  # the server closed the session: what it is allowed to do
        finally:
            for fd in fds:
                os.close(fd)
        for _ in range(3):
            events.run_once(0)
            with contextlib.suppress(BlockingIOError, OSError):
                conn_peer.recv(65536)


def _vhost_header(r: Reader, n: int) -> bytes:
    req = (1, 2, 3, 5, 8, 9, 10, 11, 12, 13, 15, 16, 17, 18, 24, 31, 32, 34, r.int(1))
    return vu.HEADER.pack(req[r.int(1) % len(req)], 1 | (r.int(1) & 0x8), n)


def vhost_user_session(data: bytes) -> None:
    from pyvmm.vhost_user.backend import Session

    events = EventManager()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    closed: list[object] = []
    be = RawBlockBackend(_image())
    try:
        Session(a, VirtioBlk(be), events, closed.append)
        _feed(b, events, Reader(data), _vhost_header)
    finally:
        b.close()
        for _ in range(4):
            events.run_once(0)
        be.close()
        events.close()
    if events.bugs:
        raise Finding(f"the session let a VMM bug through: {dict(events.errors.counts)}")


def _vfio_header(r: Reader, n: int) -> bytes:
    from pyvmm.vfio_user import protocol as P

    cmd = (1, 2, 3, 4, 5, 6, 8, 9, 10, 13, r.int(1))[r.int(1) % 11]
    return P.HEADER.pack(r.int(2), cmd, P.HEADER.size + n, 0, 0)


def vfio_user_session(data: bytes) -> None:
    from pyvmm.devices.pci.testdev import PciTestDev
    from pyvmm.vfio_user.server import Session as VfioSession

    events = EventManager()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    b.setblocking(False)
    try:
        VfioSession(a, lambda mem: PciTestDev(mem, RecordingMsiSink()), events, lambda s: None)
        _feed(b, events, Reader(data), _vfio_header)
    finally:
        b.close()
        for _ in range(4):
            events.run_once(0)
        events.close()
    if events.bugs:
        raise Finding(f"the session let a VMM bug through: {dict(events.errors.counts)}")


def vhost_user_frontend(data: bytes) -> None:
    """pyvmm's own vhost-user front end against a backend whose replies are the
    fuzzer's bytes (then EOF): only a BackendError or ConfigError may come out of the
    handshake, and a device that came up is reset and closed without raising."""
    from pyvmm.errors import BackendError
    from pyvmm.vhost_user.frontend import BLK, Channel, VhostUserFrontend

    events = EventManager()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev = None
    try:
        b.sendall(data[:100_000])
        b.shutdown(socket.SHUT_WR)
        try:
            dev = VhostUserFrontend(Channel(a, 0.5), BLK, name="fuzz", events=events)
        except (BackendError, ConfigError):
            return
        dev.reset()
        for _ in range(2):
            events.run_once(0)
    finally:
        if dev is not None:
            dev.close()
        else:
            a.close()
        b.close()
        events.close()
    if events.bugs:
        raise Finding(f"the front end let a VMM bug through: {dict(events.errors.counts)}")


_FONT: list[object] = []


def vga(data: bytes) -> None:
    """The std VGA at its fixed ranges and BARs: VGA ports (index/data pairs, the
    attribute flip-flop, the DAC), the DISPI ports, BAR2's MMIO view, the window and the
    framebuffer (trapped, as without a memslot), with the screen drawn now and then —
    whatever mode the registers describe. Every read must fit its access; nothing may
    raise, and no drawing may exceed the framebuffer or the pixel bound."""
    from pyvmm.devices.display import spec as vga_spec
    from pyvmm.devices.display.render import MAX_PIXELS, PsfFont, Renderer
    from pyvmm.devices.display.vga import BAR_MMIO, StdVga
    from pyvmm.memory import TrackedMemory

    if not _FONT:
        _FONT.append(PsfFont.load(vga_spec.DEFAULT_FONT))
    dev = StdVga(TrackedMemory(1 << 20), TrackedMemory(0x20000))
    try:
        renderer = Renderer(dev, _FONT[0])  # type: ignore[arg-type]
        r = Reader(data)
        draws = 0
        for _ in range(256):
            if not r.left():
                break
            kind, size = r.int(1) % 8, (1, 2, 4)[r.int(1) % 3]
            if kind == 0 and draws < 3:
                draws += 1
                img = renderer.screen()
                if img.size[0] * img.size[1] > MAX_PIXELS:
                    raise Finding(f"vga drew {img.size}")
                continue
            if kind == 1:  # a DISPI register: index then value
                dev.write(0x1CE, 0, 2, r.int(1) % 16)
                dev.write(0x1CE, 1, 2, r.int(2))
                continue
            if kind == 2:
                off, write = r.int(2) % 0x1000, r.int(1) & 1
                if write:
                    dev.write_bar(BAR_MMIO, off, size, r.int(size))
                else:
                    v = dev.read_bar(BAR_MMIO, off, size)
                    if not 0 <= v < 1 << (8 * size):
                        raise Finding(f"vga BAR2 read {v:#x} for {size} bytes")
                continue
            base, span = ((0x3B0, 0x30), (0x1CE, 2), (0xA0000, 0x20000))[kind % 3]
            off = r.int(3) % span
            if base == 0x1CE:
                size = 2
            if r.int(1) & 1:
                dev.write(base, off, size, r.int(size))
            else:
                v = dev.read(base, off, size)
                if not 0 <= v < 1 << (8 * size):
                    raise Finding(f"vga read {v:#x} at {base + off:#x} for {size} bytes")
        x, y, bpp, line, start = dev.dispi_mode()
        if dev.dispi_enabled and start + min(y, MAX_PIXELS // max(1, x)) * line > 1 << 20:
            raise Finding(f"DISPI mode {x}x{y}x{bpp} at {start} leaves the framebuffer")
    finally:
        dev.close()


TARGETS: dict[str, Target] = {
    "uart": uart, "pic": pic, "pit": pit, "rtc": rtc, "ioapic": ioapic, "i8042": i8042,
    "fw_cfg": fw_cfg, "pci": pci, "virtqueue": virtqueue, "virtio_blk": virtio_blk,
    "virtio_net": virtio_net, "virtio_pci_regs": virtio_pci_regs,
    "virtio_mmio_regs": virtio_mmio_regs, "nvme": nvme, "vhost_user_codec": vhost_user_codec,
    "config_json": config_json, "image_loader": image_loader,
    "vhost_user_session": vhost_user_session, "vfio_user_session": vfio_user_session,
    "vhost_user_frontend": vhost_user_frontend, "ide": ide, "e1000": e1000,
    "vga": vga,
}

CORPUS = Path(__file__).resolve().parent / "corpus"


def _frontend_seed() -> bytes:
    """The replies of a well-behaved vhost-user-blk backend to the front end's handshake
    (features with PROTOCOL_FEATURES, protocol features CONFIG, config space)."""
    from pyvmm.vhost_user.frontend import BLK

    def reply(req: int, payload: bytes) -> bytes:
        return vu.HEADER.pack(req, vu.VHOST_USER_VERSION | vu.VHOST_USER_REPLY_MASK,
                              len(payload)) + payload

    feats = (1 << 32) | (1 << vu.VHOST_USER_F_PROTOCOL_FEATURES) | (1 << 9)
    size = BLK.config_size
    return (reply(vu.Request.GET_FEATURES, struct.pack("<Q", feats))
            + reply(vu.Request.GET_PROTOCOL_FEATURES,
                    struct.pack("<Q", 1 << vu.ProtocolFeature.CONFIG))
            + reply(vu.Request.GET_CONFIG, struct.pack("<III", 0, size, 0)
                    + struct.pack("<Q", 2048).ljust(size, b"\0"))
            + reply(vu.Request.GET_FEATURES, struct.pack("<Q", feats)))  # the round trip


def _ide_seed() -> bytes:
    """A PRD table of one 512-byte entry with EOT, then: bus mastering on, the table
    pointer, READ DMA of one sector at LBA 1, the engine started to memory; and a READ
    SECTORS drained."""
    table = struct.pack("<IHH", 0x20000, 512, 0x8000).ljust(4096, b"\0")
    ports = [*range(0x1F0, 0x1F8), 0x3F6, 0x170, 0x177, 0x376]  # as in ide(), then BMIBA

    def out(port_index: int, value: int) -> bytes:  # kind 3, 1-byte write
        return bytes((3, 0, port_index, 1, value))

    ops = bytes((2, 0, 0, 5, 0))  # kind 2: PCI_COMMAND = I/O space + bus master
    ops += bytes((0, 0, 0, 0, 0))  # kind 0: BMIDTPX of channel 0 = 0x10000
    ops += out(6, 0xE0) + out(2, 1) + out(3, 1) + out(4, 0) + out(5, 0) + out(7, 0xC8)
    ops += out(len(ports), 0x09)  # BMICX: start, to memory
    ops += out(7, 0x20) + bytes((1, 0, 0, 0, 0))  # READ SECTORS, then drain the block
    return table + ops


def _e1000_seed() -> bytes:
    """Eight receive descriptors and eight transmit descriptors (one frame with EOP|RS),
    then: both ring bases, lengths and tails, RCTL.EN|BAM and TCTL.EN, and a frame in."""
    rx = b"".join(struct.pack("<QQ", 0x20000 + 0x800 * i, 0) for i in range(8))
    tx = struct.pack("<QII", 0x30000, 60 | 0x09000000, 0).ljust(128, b"\0")
    descs = (rx + tx).ljust(2048, b"\0")

    def wr(reg_index: int, value: int) -> bytes:  # kind 3, 4-byte write of a listed register
        return bytes((3, 2, reg_index, 1)) + value.to_bytes(4, "little")

    regs = _E1000_REGS
    ops = bytes((0, 0, 0, 0, 0)) + bytes((0, 0, 1, 0x80, 0))  # RDBAL 0x10000, TDBAL 0x10080
    ops += wr(regs.index(0x2808), 128) + wr(regs.index(0x3808), 128)
    ops += wr(regs.index(0x100), 0x8002) + wr(regs.index(0x2818), 7)
    ops += wr(regs.index(0x400), 2) + wr(regs.index(0x3818), 1)
    ops += bytes((1, 0)) + (70).to_bytes(2, "little") + bytes.fromhex("525400123456") + bytes(64)
    return descs + ops


def seeds() -> dict[str, list[bytes]]:
    """A few meaningful inputs per target, so the fuzzer starts inside the protocols."""
    hdr = struct.pack("<IIQ", 1, 0, 0)  # virtio-blk OUT of sector 0
    chain = (struct.pack("<QIHH", 0x40000, 16, 1, 1) + struct.pack("<QIHH", 0x41000, 512, 1, 2)
             + struct.pack("<QIHH", 0x42000, 1, 2, 0)).ljust(256, b"\0")
    ring = struct.pack("<HH", 0, 1).ljust(36, b"\0")
    return {
        "virtio_blk": [chain + ring + hdr],
        "virtio_net": [chain + ring],
        "virtqueue": [chain + struct.pack("<HHH", 0, 1, 0)],
        "config_json": [json.dumps({"kernel": "k", "memory": "64M", "devices": [
            {"type": "virtio-blk", "path": "x"}, {"type": "virtio-rng", "rate": 5}]}).encode()],
        "vhost_user_codec": [vu.encode(vu.Request.SET_VRING_NUM, struct.pack("<II", 0, 256)),
                             vu.encode(vu.Request.SET_MEM_TABLE, struct.pack("<II", 1, 0)
                                       + struct.pack("<QQQQ", 0, 1 << 20, 0, 0))],
        "image_loader": [b"\x7fELF\x02\x01\x01" + bytes(57), b"\x02\xb0\xad\x1b" + bytes(60)],
        "uart": [bytes([0, 3, 1, 0x41, 5, 0]) * 8],
        # keyboard reset + identify, mouse via 0xD4 (reset, enable), a key, a move, reads
        "i8042": [bytes([1, 0xFF, 1, 0xF2, 0, 0xD4, 1, 0xFF, 0, 0xD4, 1, 0xF4, 4, 3, 1,
                         5, 9, 0x80, 0x81, 0x7F, 1]) + bytes([3, 1]) * 16],
        "vhost_user_frontend": [_frontend_seed()],
        "pci": [bytes([0, 2, 0, 1, 0, 0, 0, 0x80]) * 8],
        "ide": [_ide_seed()],
        "e1000": [_e1000_seed()],
        # DISPI 640x480x32 with the LFB, a drawing; then text mode back and a drawing.
        "vga": [b"".join(bytes((1, 0, i)) + v.to_bytes(2, "little") for i, v in
                         ((1, 640), (2, 480), (3, 32), (4, 0x41))) + bytes((0, 0))
                + bytes((1, 0, 4, 0, 0, 0, 0))],
    }
