"""The vfio-user client against a fake server on a socketpair: a well-behaved server
first (what is asked, what the guest sees of config space and BARs, memslots that
follow the BAR, MSI-X handed over), then a malicious one — malformed replies, wrong
message ids, absurd or overlapping regions, fds that cannot be mapped, silence, a
hang-up — each a one-line BackendError at creation or a clean device failure at run
time, with no fd left open (counted around every test)."""

from __future__ import annotations

import array
import contextlib
import errno
import gc
import json
import os
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvmm.devices.assigned.vfio_user import (
    AREA,
    CAP_HEADER,
    SPARSE,
    VFIO_REGION_INFO_CAP_SPARSE_MMAP,
    VFIO_REGION_INFO_FLAG_CAPS,
    Client,
    VfioUserConfig,
    VfioUserDevice,
    create,
)
from pyvmm.errors import BackendError, ConfigError
from pyvmm.event import EventManager
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.memory import GuestMemory, sealed_memfd
from pyvmm.uapi import pci as PC
from pyvmm.vfio_user import protocol as P

TIMEOUT = 0.3
C = P.Command
Script = Callable[[int, int, bytes], "tuple[bytes, list[int]] | None"]


class Hangup(bytes):
    """A scripted answer: send these bytes, then close the connection."""


def open_fds() -> dict[int, str]:
    gc.collect()
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def ok(msg_id: int, cmd: int, payload: bytes = b"") -> bytes:
    return P.reply(msg_id, cmd, payload)


def base_config() -> bytearray:
    c = bytearray(256)
    struct.pack_into("<HH", c, 0, 0x1234, 0xABCD)
    c[9:12] = (0x00FF00).to_bytes(3, "little")
    struct.pack_into("<H", c, PC.PCI_STATUS, PC.PCI_STATUS_CAP_LIST)
    c[PC.PCI_CAPABILITY_LIST] = 0x40
    struct.pack_into("<I", c, 0x18, 0xC)  # BAR2: 64-bit prefetchable
    c[PC.PCI_INTERRUPT_PIN] = 1
    c[0x40], c[0x41] = PC.PCI_CAP_ID_MSIX, 0x50
    struct.pack_into("<HII", c, 0x42, 1, 0 | 1, 0x800 | 1)  # 2 vectors, table/PBA in BAR1
    c[0x50], c[0x51] = 0x09, 0  # a vendor capability after it, served by the server
    c[0x52:0x56] = b"VEND"
    return c


class FakeServer:
    """Answers like a small well-behaved PCI function unless ``script`` says otherwise
    for a command: a function returning (raw bytes, fds) to send (None: say nothing)."""

    def __init__(self, sock: socket.socket, script: dict[int, Script] | None = None,
                 sizes: dict[int, int] | None = None, irqs: dict[int, int] | None = None,
                 msi: bool = False) -> None:
        self.sock, self.script = sock, dict(script or {})
        self.config = base_config()
        self.irqs = irqs or {2: 2}  # IRQ index -> count
        if msi:  # a 64-bit maskable MSI capability after the vendor one
            self.config[0x51] = 0x60
            self.config[0x60], self.config[0x61] = PC.PCI_CAP_ID_MSI, 0
            struct.pack_into("<H", self.config, 0x62,
                             PC.PCI_MSI_FLAGS_64BIT | PC.PCI_MSI_FLAGS_MASKBIT)
        self.sizes = {0: 0x1000, 1: 0x1000, 2: 0x4000, 7: 256, **(sizes or {})}
        self.shm = sealed_memfd("fake-bar2", self.sizes[2] or 4096)
        self.log: list[tuple[int, bytes, int]] = []  # command, payload, fds
        self.flags: list[tuple[int, int]] = []  # command, header flags
        self.irq_fds: list[int] = []
        self.writes: list[tuple[int, int, bytes]] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def commands(self) -> list[int]:
        return [c for c, *_ in self.log]

    def _recv(self) -> tuple[int, int, int, bytes, list[int]] | None:
        raw, anc, _, _ = self.sock.recvmsg(P.HEADER.size, socket.CMSG_SPACE(4 * 32))
        if len(raw) < P.HEADER.size:
            return None
        fds: list[int] = []
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                a = array.array("i")
                a.frombytes(data[:len(data) - len(data) % 4])
                fds.extend(a)
        msg_id, cmd, size, flags, _err = P.HEADER.unpack(raw)
        payload = self.sock.recv(size - P.HEADER.size, socket.MSG_WAITALL) if (
            size > P.HEADER.size) else b""
        return msg_id, cmd, flags, payload, fds

    def _answer(self, msg_id: int, cmd: int, p: bytes) -> tuple[bytes, list[int]]:
        if cmd == C.VERSION:
            caps = json.dumps({"capabilities": {"max_msg_fds": 8}}).encode() + b"\0"
            return ok(msg_id, cmd, struct.pack("<HH", 0, 1) + caps), []
        if cmd == C.DEVICE_GET_INFO:
            return ok(msg_id, cmd, P.DEVICE_INFO.pack(16, P.VFIO_DEVICE_FLAGS_PCI, 9, 5)), []
        if cmd == C.DEVICE_GET_REGION_INFO:
            index = P.REGION_INFO.unpack_from(p)[2]
            size = self.sizes.get(index, 0)
            flags = (P.VFIO_REGION_INFO_FLAG_READ | P.VFIO_REGION_INFO_FLAG_WRITE) if size else 0
            if index == 2 and size:
                flags |= P.VFIO_REGION_INFO_FLAG_MMAP
                return ok(msg_id, cmd, P.REGION_INFO.pack(32, flags, index, 0, size, 0)), [
                    self.shm]
            return ok(msg_id, cmd, P.REGION_INFO.pack(32, flags, index, 0, size, 0)), []
        if cmd == C.DEVICE_GET_IRQ_INFO:
            index = P.IRQ_INFO.unpack_from(p)[2]
            return ok(msg_id, cmd, P.IRQ_INFO.pack(16, P.VFIO_IRQ_INFO_EVENTFD, index,
                                                   self.irqs.get(index, 0))), []
        if cmd == C.REGION_READ:
            off, region, count = P.REGION_ACCESS.unpack_from(p)
            if region == 7:
                data = bytes(self.config[off:off + count])
            else:
                data = (0xA0000000 + off).to_bytes(8, "little")[:count]
            return ok(msg_id, cmd, p[:16] + data), []
        if cmd == C.REGION_WRITE:
            off, region, count = P.REGION_ACCESS.unpack_from(p)
            self.writes.append((region, off, p[16:]))
            if region == 7:
                self.config[off:off + count] = p[16:]
            return ok(msg_id, cmd, p[:16]), []
        return ok(msg_id, cmd), []

    def _run(self) -> None:
        try:
            while True:
                m = self._recv()
                if m is None:
                    return
                msg_id, cmd, flags, payload, fds = m
                self.log.append((cmd, payload, len(fds)))
                self.flags.append((cmd, flags))
                if cmd == C.DEVICE_SET_IRQS:
                    self.irq_fds += fds
                else:
                    for fd in fds:
                        os.close(fd)  # the fake keeps no DMA map
                scripted = cmd in self.script
                if scripted:
                    ans = self.script[cmd](msg_id, cmd, payload)
                    if ans is None:
                        continue
                else:
                    ans = self._answer(msg_id, cmd, payload)
                data, out = ans
                if flags & P.FLAG_NO_REPLY:  # a posted write: answered by nothing
                    data = b""
                if data:
                    socket.send_fds(self.sock, [data], out) if out else self.sock.sendall(data)
                if scripted:  # made for this answer (the good one sends its own BAR memfd)
                    for fd in out:
                        os.close(fd)
                if isinstance(data, Hangup):
                    self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.sock.close()
        for fd in [self.shm, *self.irq_fds]:
            os.close(fd)


class Mapper:
    def __init__(self) -> None:
        self.maps: dict[int, tuple[int, int, int]] = {}
        self.n = 0

    def map(self, gpa: int, size: int, host_addr: int) -> object:
        self.n += 1
        self.maps[self.n] = (gpa, size, host_addr)
        return self.n

    def unmap(self, handle: object) -> None:
        assert isinstance(handle, int)
        del self.maps[handle]


class Rig:
    def __init__(self, **fake: Any) -> None:
        self.events = EventManager()
        self.mem = GuestMemory([(0, 1 << 20)])
        self.msi = RecordingMsiSink()
        self.mapper = Mapper()
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.fake = FakeServer(b, **fake)
        self.sock = a
        self.dev: VfioUserDevice | None = None

    def make(self, **kw: Any) -> VfioUserDevice:
        self.dev = VfioUserDevice(Client(self.sock, TIMEOUT), name="vfio-user0", mem=self.mem,
                                  events=self.events, msi=self.msi, bar_mapper=self.mapper,
                                  path="fake.sock", **kw)
        return self.dev

    def close(self) -> None:
        if self.dev is not None:
            self.dev.close()
        self.sock.close()
        self.fake.close()
        self.mem.close()
        self.events.close()


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    """Rigs closed after the test, and the process's fds counted around all of it."""
    before = open_fds()
    rigs: list[Rig] = []

    def make(**fake: Any) -> Rig:
        rigs.append(Rig(**fake))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()
    after = open_fds()
    leaked = {fd: what for fd, what in after.items() if before.get(fd) != what}
    assert not leaked, f"fds left open: {leaked}"


# --- a well-behaved server ------------------------------------------------------------------
def test_handshake_asks_for_everything_and_maps_guest_ram(rig_factory: Callable[..., Rig]
                                                          ) -> None:
    rig = rig_factory()
    dev = rig.make()
    cmds = rig.fake.commands()
    assert cmds[:3] == [C.VERSION, C.DEVICE_GET_INFO, C.DEVICE_GET_REGION_INFO]
    assert cmds.count(C.DEVICE_GET_REGION_INFO) == 7  # config + BARs 0-5
    dma = [(p, n) for c, p, n in rig.fake.log if c == C.DMA_MAP]
    assert len(dma) == 1 and dma[0][1] == 1  # guest RAM, with its memfd
    _argsz, _flags, _off, iova, size = P.DMA_MAP.unpack(dma[0][0])
    assert (iova, size) == (0, 1 << 20)
    assert dev.config.get16(0) == 0x1234 and dev.config_read(0, 4) == 0xABCD1234


def test_bars_size_like_hardware_and_the_vmm_owns_them(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    dev = rig.make()
    c = dev.config
    assert [(b.index, b.size, b.is_64bit) for b in c.bars if b] == [
        (0, 0x1000, False), (1, 0x1000, False), (2, 0x4000, True)]
    dev.config_write(0x10, 4, 0xFFFFFFFF)
    assert dev.config_read(0x10, 4) == 0xFFFFF000  # sizing: the mask, not the server
    assert not any(r == 7 and o == 0x10 for r, o, _ in rig.fake.writes)  # never forwarded
    assert dev.config_read(PC.PCI_INTERRUPT_PIN, 1) == 0  # no INTx offered
    assert dev.config_read(0x52, 4) == int.from_bytes(b"VEND", "little")  # the server's


def test_mmapable_bar_follows_the_bar_as_a_memslot(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    dev = rig.make()
    dev.bar_moved(2, 0xC0004000)
    assert [(g, s) for g, s, _ in rig.mapper.maps.values()] == [(0xC0004000, 0x4000)]
    dev.bar_moved(2, 0xC0010000)
    assert [(g, s) for g, s, _ in rig.mapper.maps.values()] == [(0xC0010000, 0x4000)]
    dev.bar_moved(2, None)
    assert rig.mapper.maps == {} and dev.metrics()["mapped_areas"] == 0


def test_trapped_bar_accesses_are_region_messages(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    dev = rig.make(posted_writes=True)
    assert dev.read_bar(0, 0x20, 4) == 0xA0000020
    dev.write_bar(0, 0x24, 2, 0xBEEF)
    assert dev.read_bar(0, 0x28, 4) == 0xA0000028  # ordered after the posted write
    assert rig.fake.writes[-1] == (0, 0x24, b"\xef\xbe")
    flags = [f for c, f in rig.fake.flags if c == C.REGION_WRITE]
    assert flags == [P.FLAG_NO_REPLY]  # a memory write is posted
    assert dev.metrics()["trapped_reads"] == 2 and dev.metrics()["trapped_writes"] == 1


def test_writes_wait_while_an_area_is_mapped(rig_factory: Callable[..., Rig]) -> None:
    """A guest access through the mapping must not overtake a write (PCI ordering)."""
    rig = rig_factory()
    dev = rig.make(posted_writes=True)
    dev.bar_moved(2, 0xC0004000)
    dev.write_bar(0, 0x24, 4, 7)
    assert rig.fake.writes[-1] == (0, 0x24, b"\x07\0\0\0")  # there before we returned
    assert [f for c, f in rig.fake.flags if c == C.REGION_WRITE] == [0]


def test_unposted_writes_wait_for_their_reply(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    dev = rig.make()  # the default
    dev.write_bar(0, 0x24, 4, 7)
    assert rig.fake.writes[-1] == (0, 0x24, b"\x07\0\0\0")  # there before we returned
    assert [f for c, f in rig.fake.flags if c == C.REGION_WRITE] == [0]


def test_msix_enable_hands_over_eventfds_and_the_table_is_ours(rig_factory: Callable[..., Rig]
                                                               ) -> None:
    rig = rig_factory()
    dev = rig.make()
    before = len(rig.fake.log)
    dev.write_bar(1, 0, 4, 0xFEE00000)  # vector 0: address, data, unmask
    dev.write_bar(1, 8, 4, 0x41)
    dev.write_bar(1, 12, 4, 0)
    assert len(rig.fake.log) == before  # the table is the VMM's: no messages
    dev.config_write(0x42, 2, PC.PCI_MSIX_FLAGS_ENABLE)
    sets = [(p, n) for c, p, n in rig.fake.log if c == C.DEVICE_SET_IRQS]
    assert len(sets) == 1 and sets[0][1] == 2
    _a, flags, index, start, count = P.IRQ_SET.unpack(sets[0][0])
    assert (index, start, count) == (P.VFIO_PCI_MSIX_IRQ_INDEX, 0, 2)
    assert flags & P.VFIO_IRQ_SET_DATA_EVENTFD
    # The test sink has no irqfds: the VMM forwards, honouring the mask.
    assert len(rig.fake.irq_fds) == 2  # kept before it answered
    os.eventfd_write(rig.fake.irq_fds[0], 1)
    os.eventfd_write(rig.fake.irq_fds[1], 1)  # vector 1 is still masked
    rig.events.run_once(1)
    rig.events.run_once(0.1)
    assert [m.data for m in rig.msi.sent] == [0x41]
    assert dev.metrics()["interrupt_forwards"] == 2
    dev.config_write(0x42, 2, 0)
    _a, flags, *_ = P.IRQ_SET.unpack([p for c, p, _ in rig.fake.log
                                      if c == C.DEVICE_SET_IRQS][-1])
    assert flags & P.VFIO_IRQ_SET_DATA_NONE


# --- a malicious server: creation --------------------------------------------------------
def _replace(payload: Callable[[bytes], bytes] | None = None, *, msg_id: int | None = None,
             cmd: int | None = None, flags: int = P.FLAG_TYPE_REPLY, fds: int = 0) -> Script:
    """An answer built from what the good fake says, then spoiled."""

    def script(mid: int, c: int, p: bytes) -> tuple[bytes, list[int]]:
        good = FakeServer._answer(GOOD, mid, c, p)[0]
        body = good[P.HEADER.size:]
        if payload is not None:
            body = payload(body)
        out = [os.eventfd(0) for _ in range(fds)]
        return P.encode(mid if msg_id is None else msg_id, c if cmd is None else cmd, body,
                        flags), out

    return script


class _Good(FakeServer):
    def __init__(self) -> None:  # only _answer is used, no thread, no socket
        self.config = base_config()
        self.sizes = {0: 0x1000, 1: 0x1000, 2: 0, 7: 256}
        self.irqs = {2: 2}


GOOD = _Good()


def _region(index: int, fn: Callable[[bytes], bytes]) -> Script:
    def script(mid: int, c: int, p: bytes) -> tuple[bytes, list[int]] | None:
        if P.REGION_INFO.unpack_from(p)[2] != index:
            return FakeServer._answer(GOOD, mid, c, p)
        return P.reply(mid, c, fn(FakeServer._answer(GOOD, mid, c, p)[0][16:])), []
    return script


def _region_size(index: int, size: int) -> Script:
    return _region(index, lambda b: b[:16] + struct.pack("<QQ", size, 0))


def _cfg(patch: Callable[[bytearray], None]) -> Script:
    def script(mid: int, c: int, p: bytes) -> tuple[bytes, list[int]]:
        off, _region, count = P.REGION_ACCESS.unpack_from(p)
        cfg = base_config()
        patch(cfg)
        return P.reply(mid, c, p[:16] + bytes(cfg[off:off + count])), []
    return script


def _upper_half(cfg: bytearray) -> None:
    struct.pack_into("<I", cfg, 0x10, 0x4)  # BAR0 64-bit: BAR1 is its upper half


BAD: dict[str, tuple[dict[int, Script], str]] = {
    "wrong message id": ({C.VERSION: _replace(msg_id=999)}, "message 999"),
    "wrong command": ({C.DEVICE_GET_INFO: _replace(cmd=C.VERSION)}, "with command 1"),
    "not a reply": ({C.VERSION: _replace(flags=0)}, "flags 0x0"),
    "version 1": ({C.VERSION: _replace(lambda b: struct.pack("<HH", 1, 0))}, "version 1"),
    "caps not json": ({C.VERSION: _replace(lambda b: b[:4] + b"{nope\0")}, "not JSON"),
    "short device info": ({C.DEVICE_GET_INFO: _replace(lambda b: b[:8])}, "8 bytes"),
    "not pci": ({C.DEVICE_GET_INFO: _replace(lambda b: P.DEVICE_INFO.pack(16, 0, 9, 5))},
                "not a PCI device"),
    "absurd region count": ({C.DEVICE_GET_INFO: _replace(
        lambda b: P.DEVICE_INFO.pack(16, 2, 100000, 5))}, "100000 regions"),
    "bar not power of two": ({C.DEVICE_GET_REGION_INFO: _region_size(0, 0x3000)},
                             "not a power of two"),
    "absurd bar": ({C.DEVICE_GET_REGION_INFO: _region_size(0, 1 << 50)}, "absurd"),
    "32-bit bar over 2 GiB": ({C.DEVICE_GET_REGION_INFO: _region_size(0, 1 << 32)},
                              "cannot be placed"),
    "tiny config region": ({C.DEVICE_GET_REGION_INFO: _region_size(7, 16)}, "config region"),
    "region info for another region": ({C.DEVICE_GET_REGION_INFO: _region(
        0, lambda b: b[:8] + struct.pack("<I", 3) + b[12:])}, "for region 3"),
    "upper half with a size": ({C.REGION_READ: _cfg(_upper_half)}, "upper half"),
    "capability loop": ({C.REGION_READ: _cfg(lambda c: c.__setitem__(slice(0x50, 0x52),
                                                                      b"\x09\x50")
                                             or c.__setitem__(0x34, 0x50))},
                        "capability list broken"),
    "msix table outside its bar": ({C.REGION_READ: _cfg(lambda c: struct.pack_into(
        "<I", c, 0x44, 0xFF8 | 1))}, "does not fit"),
    "msix vectors disagree": ({C.DEVICE_GET_IRQ_INFO: _replace(
        lambda b: P.IRQ_INFO.pack(16, 1, 2, 7))}, "IRQ_INFO 7"),
    "config read echoes another offset": ({C.REGION_READ: _replace(
        lambda b: P.REGION_ACCESS.pack(4, 7, 256) + b[16:])}, "region access reply"),
    "stray fds": ({C.DEVICE_GET_INFO: _replace(fds=3)}, "3 fds"),
    "error reply": ({C.DMA_MAP: _replace(flags=P.FLAG_TYPE_REPLY | P.FLAG_ERROR)},
                    "refused DMA_MAP"),
    "silence": ({C.DEVICE_GET_INFO: lambda m, c, p: None}, "no answer"),
    "hang-up": ({C.VERSION: lambda m, c, p: (Hangup(b"\x01"), [])}, "closed the connection"),
}


@pytest.mark.parametrize("what", list(BAD))
def test_bad_server_is_one_error_at_creation(rig_factory: Callable[..., Rig], what: str) -> None:
    script, says = BAD[what]
    rig = rig_factory(script=script)
    with pytest.raises(BackendError) as e:
        rig.make()
    assert says in str(e.value) and "\n" not in str(e.value)


def _sparse(areas: list[tuple[int, int]]) -> Script:
    def script(mid: int, c: int, p: bytes) -> tuple[bytes, list[int]]:
        index = P.REGION_INFO.unpack_from(p)[2]
        if index != 2:
            return FakeServer._answer(GOOD, mid, c, p)
        caps = CAP_HEADER.pack(VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 0) + SPARSE.pack(
            len(areas), 0) + b"".join(AREA.pack(a, s) for a, s in areas)
        flags = 7 | VFIO_REGION_INFO_FLAG_CAPS
        fd = sealed_memfd("fake-sparse", 0x4000)
        return P.reply(mid, c, P.REGION_INFO.pack(32 + len(caps), flags, 2, 32, 0x4000, 0)
                       + caps), [fd]
    return script


@pytest.mark.parametrize("areas,says", [
    ([(0, 0x2000), (0x1000, 0x1000)], "overlapping"),
    ([(0x3000, 0x2000)], "outside"),
    ([(0x100, 0x1000)], "unaligned"),
])
def test_bad_sparse_areas_are_refused(rig_factory: Callable[..., Rig], areas: list[tuple[int, int]],
                                      says: str) -> None:
    rig = rig_factory(script={C.DEVICE_GET_REGION_INFO: _sparse(areas)},
                      sizes={2: 0x4000})
    with pytest.raises(BackendError, match="outside, unaligned or overlapping"):
        rig.make()


def test_sparse_areas_become_their_own_memslots(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(script={C.DEVICE_GET_REGION_INFO: _sparse([(0, 0x1000), (0x2000, 0x2000)])},
                      sizes={2: 0x4000})
    dev = rig.make()
    dev.bar_moved(2, 0xC0000000)
    assert sorted((g, s) for g, s, _ in rig.mapper.maps.values()) == [
        (0xC0000000, 0x1000), (0xC0002000, 0x2000)]


def _mmap_fd(make: Callable[[], int]) -> Script:
    def script(mid: int, c: int, p: bytes) -> tuple[bytes, list[int]]:
        index = P.REGION_INFO.unpack_from(p)[2]
        if index != 2:
            return FakeServer._answer(GOOD, mid, c, p)
        return P.reply(mid, c, P.REGION_INFO.pack(32, 7, 2, 0, 0x4000, 0)), [make()]
    return script


def _unsealed() -> int:
    fd = os.memfd_create("fake-unsealed")
    os.ftruncate(fd, 0x4000)
    return fd


def _pipe() -> int:
    r, w = os.pipe()
    os.close(w)
    return r


def _short() -> int:
    return sealed_memfd("fake-short", 0x1000)


@pytest.mark.parametrize("make", [_unsealed, _pipe, _short], ids=["unsealed", "pipe", "short"])
def test_unmappable_region_fd_stays_trapped(rig_factory: Callable[..., Rig],
                                            make: Callable[[], int],
                                            caplog: pytest.LogCaptureFixture) -> None:
    rig = rig_factory(script={C.DEVICE_GET_REGION_INFO: _mmap_fd(make)}, sizes={2: 0x4000})
    dev = rig.make()
    dev.bar_moved(2, 0xC0000000)
    assert rig.mapper.maps == {} and dev.metrics()["map_failures"] == 1
    assert dev.read_bar(2, 8, 4) == 0xA0000008  # forwarded instead
    assert "BAR 2 cannot be mapped" in caplog.text


def test_fd_without_mmap_flag_is_refused(rig_factory: Callable[..., Rig]) -> None:
    def script(mid: int, c: int, p: bytes) -> tuple[bytes, list[int]]:
        good = FakeServer._answer(GOOD, mid, c, p)[0]
        return good, [os.eventfd(0)]
    rig = rig_factory(script={C.DEVICE_GET_REGION_INFO: script})
    with pytest.raises(BackendError, match="no VFIO_REGION_INFO_FLAG_MMAP"):
        rig.make()


def test_create_says_one_line_and_closes_the_socket(tmp_path: Path) -> None:
    class Ctx:
        name, index = "vfio-user0", 0

        def __init__(self) -> None:
            self.events, self.mem, self.msi = EventManager(), GuestMemory([(0, 1 << 20)]), None

        def bar_mapper(self) -> None:
            return None

        def on_close(self, fn: Callable[[], None]) -> None:
            raise AssertionError("nothing to close")

    before = open_fds()
    ctx = Ctx()
    with pytest.raises(ConfigError, match="does not exist"):
        create(VfioUserConfig(socket=str(tmp_path / "none")), ctx)  # type: ignore[arg-type]
    srv = socket.socket(socket.AF_UNIX)
    srv.bind(str(tmp_path / "s"))
    srv.listen()

    def hang_up() -> None:
        conn, _ = srv.accept()
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    with pytest.raises(ConfigError, match=r"vfio-user0: vfio-user server .*: "
                       r"(closed|connection failed|cannot send)"):
        create(VfioUserConfig(socket=str(tmp_path / "s"), timeout=2), ctx)  # type: ignore[arg-type]
    t.join()
    srv.close()
    ctx.events.close()
    ctx.mem.close()
    assert open_fds() == before


# --- a malicious server: run time ------------------------------------------------------------
def test_hangup_seen_by_the_event_loop_fails_the_device(rig_factory: Callable[..., Rig],
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    rig = rig_factory()
    dev = rig.make()
    dev.bar_moved(2, 0xC0004000)
    assert rig.mapper.maps
    rig.fake.sock.shutdown(socket.SHUT_WR)
    for _ in range(20):
        rig.events.run_once(0.1)
        if dev.failed:
            break
    assert dev.failed == "closed the connection" and not dev.connected
    assert rig.mapper.maps == {}  # its memslots are gone with it
    assert dev.read_bar(0, 0, 4) == 0xFFFFFFFF and dev.config_read(0, 4) == 0xFFFFFFFF
    dev.write_bar(0, 0, 4, 1)  # dropped, no raise
    assert dev.config_write(4, 2, 2) == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "closed the connection; the device is failed" in lines[0]


def test_unasked_message_fails_the_device(rig_factory: Callable[..., Rig]) -> None:
    """Seen by the next request: its reply is not the one it waits for."""
    rig = rig_factory()
    dev = rig.make()
    rig.fake.sock.sendall(P.encode(1, C.DMA_READ))
    assert dev.read_bar(0, 0, 4) == 0xFFFFFFFF
    assert dev.failed is not None and "with command 11" in dev.failed


def test_unasked_message_then_hangup_is_seen_on_the_event_loop(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    dev = rig.make()
    rig.fake.sock.sendall(P.encode(1, C.DMA_READ))
    rig.fake.sock.shutdown(socket.SHUT_WR)
    for _ in range(20):
        rig.events.run_once(0.1)
        if dev.failed:
            break
    assert dev.failed == "sent a message unasked"


@pytest.mark.parametrize("spoil,says", [
    (_replace(msg_id=7777), "message 7777"),
    (_replace(lambda b: b[:16]), "region access reply of 16 bytes"),
    (lambda m, c, p: None, "no answer"),
])
def test_bad_reply_at_run_time_fails_the_device(rig_factory: Callable[..., Rig], spoil: Script,
                                                says: str) -> None:
    rig = rig_factory()
    dev = rig.make()
    rig.fake.script[C.REGION_READ] = spoil
    assert dev.read_bar(0, 0, 4) == 0xFFFFFFFF
    assert dev.failed is not None and says in dev.failed
    assert dev.read_bar(0, 0, 4) == 0xFFFFFFFF  # no further message


def test_refused_access_is_all_ones_and_the_device_goes_on(rig_factory: Callable[..., Rig]
                                                           ) -> None:
    rig = rig_factory()
    dev = rig.make()
    rig.fake.script[C.REGION_READ] = lambda m, c, p: (P.error_reply(m, c, errno.EINVAL), [])
    assert dev.read_bar(0, 0, 4) == 0xFFFFFFFF and dev.failed is None
    del rig.fake.script[C.REGION_READ]
    assert dev.read_bar(0, 0, 4) == 0xA0000000
    assert dev.metrics()["refusals"] == 1


# --- masking on the irqfd path ---------------------------------------------------------------
class IrqfdVector(RecordingMsiSink):
    """A vector sink with an eventfd, as the irqchip's irqfd vectors have; what the VMM
    itself sends through it is recorded (``sent``)."""

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)

    def eventfd(self, msg: Any) -> int:
        return self.fd

    def route(self, msg: Any) -> None:
        pass


class IrqfdChip(RecordingMsiSink):
    def __init__(self) -> None:
        super().__init__()
        self.vectors: list[IrqfdVector] = []

    def vector_sink(self) -> IrqfdVector:
        self.vectors.append(IrqfdVector())
        return self.vectors[-1]


def _handed(rig: Rig) -> list[tuple[int, int, int]]:
    """(start, count, fds) of every MSI-X SET_IRQS the server got."""
    return [(P.IRQ_SET.unpack(p)[3], P.IRQ_SET.unpack(p)[4], n) for c, p, n in rig.fake.log
            if c == C.DEVICE_SET_IRQS and P.IRQ_SET.unpack(p)[1] & P.VFIO_IRQ_SET_DATA_EVENTFD]


def test_masking_swaps_the_irqfd_for_a_pba_eventfd(rig_factory: Callable[..., Rig]) -> None:
    """A masked vector's server side signals the VMM's eventfd (→ PBA bit), an unmasked
    one's the irqfd; unmasking swaps back and delivers what is pending."""
    rig = rig_factory()
    chip = IrqfdChip()
    rig.msi = chip
    try:
        dev = rig.make()
        msix = dev.msix
        assert msix is not None
        dev.write_bar(1, 0, 4, 0xFEE00000)
        dev.write_bar(1, 8, 4, 0x41)
        dev.write_bar(1, 12, 4, 0)  # vector 0 unmasked, vector 1 masked (reset state)
        dev.config_write(0x42, 2, PC.PCI_MSIX_FLAGS_ENABLE)
        assert _handed(rig) == [(0, 2, 2)] and dev.metrics()["fast_vectors"] == 1
        server0, server1 = rig.fake.irq_fds[0], rig.fake.irq_fds[1]
        # The server's fd for vector 0 is the irqfd: written by it, nothing for the VMM.
        os.eventfd_write(server0, 1)
        assert os.eventfd_read(chip.vectors[0].fd) == 1
        # Vector 1 is masked: its signal becomes a PBA bit, not an interrupt.
        os.eventfd_write(server1, 1)
        rig.events.run_once(1)
        assert msix.pending(1) and chip.vectors[1].sent == []
        # Masking vector 0 hands the server the VMM's eventfd for it.
        dev.write_bar(1, 12, 4, 1)
        assert _handed(rig)[-1] == (0, 1, 1) and dev.metrics()["fast_vectors"] == 0
        # Unmasking vector 1 delivers its pending interrupt and hands over its irqfd.
        dev.write_bar(1, 16, 4, 0xFEE00000)
        dev.write_bar(1, 24, 4, 0x42)
        dev.write_bar(1, 28, 4, 0)
        assert not msix.pending(1) and [m.data for m in chip.vectors[1].sent] == [0x42]
        assert _handed(rig)[-1] == (1, 1, 1) and dev.metrics()["fast_vectors"] == 1
        # The function mask masks every vector: both go to the VMM's eventfds.
        dev.config_write(0x42, 2, PC.PCI_MSIX_FLAGS_ENABLE | PC.PCI_MSIX_FLAGS_MASKALL)
        assert dev.metrics()["fast_vectors"] == 0
    finally:
        if rig.dev is not None:
            rig.dev.close()
            rig.dev = None
        for v in chip.vectors:
            os.close(v.fd)


# --- MSI and INTx ----------------------------------------------------------------------------
def test_msi_is_emulated_at_the_servers_offset_and_forwarded(rig_factory: Callable[..., Rig]
                                                             ) -> None:
    rig = rig_factory(msi=True, irqs={1: 1, 2: 2})
    dev = rig.make()
    assert dev.msi is not None and dev.msi.off == 0x60
    assert dev.config_read(0x51, 1) == 0x60  # the server's list, our capability in it
    dev.config_write(0x64, 4, 0xFEE00000)  # address, data, then enable
    dev.config_write(0x6C, 2, 0x45)
    assert not any(r == 7 and 0x60 <= o < 0x78 for r, o, _ in rig.fake.writes)  # ours
    dev.config_write(0x62, 2, PC.PCI_MSI_FLAGS_ENABLE)
    sets = [P.IRQ_SET.unpack(p) for c, p, _ in rig.fake.log if c == C.DEVICE_SET_IRQS]
    assert sets and sets[-1][2:] == (P.VFIO_PCI_MSI_IRQ_INDEX, 0, 1)
    os.eventfd_write(rig.fake.irq_fds[-1], 1)
    rig.events.run_once(1)
    assert [m.data for m in rig.msi.sent] == [0x45]
    dev.config_write(0x70, 4, 1)  # mask vector 0: the next one is pending, not sent
    os.eventfd_write(rig.fake.irq_fds[-1], 1)
    rig.events.run_once(1)
    assert len(rig.msi.sent) == 1 and dev.config_read(0x74, 4) & 1
    dev.config_write(0x70, 4, 0)
    assert len(rig.msi.sent) == 2


def test_intx_is_the_servers_eventfd_pulsing_the_line(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(irqs={0: 1, 2: 2})
    dev = rig.make()
    assert dev.config_read(PC.PCI_INTERRUPT_PIN, 1) == 1
    sets = [P.IRQ_SET.unpack(p) for c, p, n in rig.fake.log if c == C.DEVICE_SET_IRQS]
    assert sets == [(P.IRQ_SET.size, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER,
                     P.VFIO_PCI_INTX_IRQ_INDEX, 0, 1)]

    class Line:
        pulses = 0

        def set_level(self, level: bool) -> None:
            raise AssertionError("INTx is pulsed")

        def pulse(self) -> None:
            Line.pulses += 1

    dev.intx = Line()
    os.eventfd_write(rig.fake.irq_fds[0], 1)
    rig.events.run_once(1)
    assert Line.pulses == 1 and dev.metrics()["intx_forwards"] == 1


def test_msi_vector_count_must_agree(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(msi=True, irqs={1: 4, 2: 2})
    with pytest.raises(BackendError, match="MSI capability has 1 vectors, IRQ_INFO 4"):
        rig.make()


def test_running_out_of_fds_fails_the_device_cleanly(rig_factory: Callable[..., Rig],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A server offering many vectors the guest leaves masked costs one eventfd each;
    when the VMM may open no more, the function fails — nothing raises into the vCPU."""
    rig = rig_factory()
    dev = rig.make()

    def emfile(*a: object) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(os, "eventfd", emfile)
    assert dev.config_write(0x42, 2, PC.PCI_MSIX_FLAGS_ENABLE) == []
    monkeypatch.undo()
    assert dev.failed is not None and "more eventfds" in dev.failed
    assert dev.read_bar(0, 0, 4) == 0xFFFFFFFF
