"""Virtio core, split virtqueue, virtio-rng and virtio-blk through DriverQueue over
real guest memory, including the malformed input a hostile driver can write."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.backends.block import RawBlockBackend
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.core import VirtioCore, VirtioDevice
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.memory import GuestMemory
from pyvmm.testing import DriverQueue, RecordingInterrupt, VirtioDriver
from pyvmm.uapi import virtio as V

MiB = 1 << 20
OK_STATUS = (V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER
             | V.VIRTIO_CONFIG_S_FEATURES_OK)


Irq = RecordingInterrupt


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory([(0, 4 * MiB)])
    yield m  # type: ignore[misc]
    m.close()


def bring_up(dev: VirtioDevice, mem: GuestMemory, features: int | None = None,
             size: int = 16) -> tuple[VirtioCore, DriverQueue, RecordingInterrupt]:
    d = VirtioDriver(dev, mem, features=features, size=size)
    return d.core, d.queues[0], d.irq


# --- status machine and features -------------------------------------------------------
def test_features_ok_refused_for_unoffered_or_legacy_features(mem: GuestMemory) -> None:
    core = VirtioCore(VirtioRng(), mem)
    core.set_status(3)
    core.set_driver_features_word(0, 1 << 7)  # not offered
    core.set_driver_features_word(1, 1)
    core.set_status(OK_STATUS)
    assert not core.status & V.VIRTIO_CONFIG_S_FEATURES_OK
    core.set_status(0)
    core.set_status(3)
    core.set_status(OK_STATUS)  # VERSION_1 not accepted
    assert not core.status & V.VIRTIO_CONFIG_S_FEATURES_OK


def test_driver_ok_without_features_ok_needs_reset(mem: GuestMemory) -> None:
    core = VirtioCore(VirtioRng(), mem)
    core.irq = Irq()
    core.set_status(3)
    core.set_status(3 | V.VIRTIO_CONFIG_S_DRIVER_OK)
    assert core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET and not core.active
    core.set_status(0)
    assert core.status == 0


def test_bad_queue_size_at_driver_ok_needs_reset(mem: GuestMemory) -> None:
    core = VirtioCore(VirtioRng(), mem)
    irq = Irq()
    core.irq = irq
    core.set_status(3)
    core.set_driver_features_word(1, 1)
    core.set_status(OK_STATUS)
    core.queues[0].size, core.queues[0].ready = 3, True
    core.set_status(OK_STATUS | V.VIRTIO_CONFIG_S_DRIVER_OK)
    assert core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET and irq.config == 1


def test_queue_outside_memory_needs_reset(mem: GuestMemory) -> None:
    core = VirtioCore(VirtioRng(), mem)
    core.irq = Irq()
    core.set_status(3)
    core.set_driver_features_word(1, 1)
    core.set_status(OK_STATUS)
    q = core.queues[0]
    q.size, q.desc, q.avail, q.used, q.ready = 16, 0x7FFF0000, 0x1000, 0x2000, True
    core.set_status(OK_STATUS | V.VIRTIO_CONFIG_S_DRIVER_OK)
    assert core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET


def test_notification_before_driver_ok_or_bad_index_is_ignored(mem: GuestMemory) -> None:
    core = VirtioCore(VirtioRng(), mem)
    core.notify(0)
    assert core.ignored_notifications == 1
    core, _, _ = bring_up(VirtioRng(), mem)
    core.notify(5)
    assert core.ignored_notifications == 1 and core.active


def test_clearing_status_bits_without_reset_is_ignored(mem: GuestMemory) -> None:
    core, _, _ = bring_up(VirtioRng(), mem)
    core.set_status(V.VIRTIO_CONFIG_S_ACKNOWLEDGE)
    assert core.status & V.VIRTIO_CONFIG_S_DRIVER_OK


# --- rng ---------------------------------------------------------------------------------
def test_rng_fills_writable_buffers(mem: GuestMemory) -> None:
    core, dq, irq = bring_up(VirtioRng(), mem)
    a = dq.alloc(64)
    head = dq.add([(a, 64, True)])
    core.notify(0)
    assert dq.take_used() == [(head, 64)]
    assert mem.read(a, 64) != bytes(64) and irq.queue == 1


def test_rng_indirect_chain(mem: GuestMemory) -> None:
    core, dq, _ = bring_up(VirtioRng(), mem)
    a, b = dq.alloc(16), dq.alloc(32)
    head = dq.add([(a, 16, True), (b, 32, True)], indirect=True)
    core.notify(0)
    assert dq.take_used() == [(head, 48)]


def test_event_idx_suppresses_interrupts(mem: GuestMemory) -> None:
    core, dq, irq = bring_up(VirtioRng(), mem)
    dq.set_used_event(5)  # the driver wants an interrupt only after the 6th used entry
    for _ in range(4):
        dq.add([(dq.alloc(8), 8, True)])
    core.notify(0)
    n = irq.queue
    assert n <= 1  # at most the first completion signals
    for _ in range(3):
        dq.add([(dq.alloc(8), 8, True)])
    core.notify(0)
    assert irq.queue == n + 1  # crossing used_event signals once
    # avail_event tells the driver where to notify next
    assert struct.unpack("<H", mem.read(dq.used + 4 + 8 * dq.size, 2))[0] == 7


def test_no_interrupt_flag_without_event_idx(mem: GuestMemory) -> None:
    core, dq, irq = bring_up(VirtioRng(), mem, features=1 << V.VIRTIO_F_VERSION_1)
    dq.set_no_interrupt(True)
    dq.add([(dq.alloc(8), 8, True)])
    core.notify(0)
    assert irq.queue == 0 and dq.used_idx() == 1


# --- malformed chains --------------------------------------------------------------------
def test_descriptor_loop_needs_reset_and_does_not_hang(mem: GuestMemory) -> None:
    core, dq, irq = bring_up(VirtioRng(), mem)
    a = dq.alloc(8)
    dq.write_desc(dq.desc, 0, a, 8, V.VRING_DESC_F_WRITE | V.VRING_DESC_F_NEXT, 1)
    dq.write_desc(dq.desc, 1, a, 8, V.VRING_DESC_F_WRITE | V.VRING_DESC_F_NEXT, 0)
    dq.publish(0)
    core.notify(0)
    assert core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET and irq.config == 1
    core.notify(0)  # after NEEDS_RESET: ignored until reset
    assert core.ignored_notifications == 1


@pytest.mark.parametrize("case", ["addr", "head", "next", "avail_jump", "nested_indirect",
                                  "indirect_len", "indirect_loop_in_a_huge_table",
                                  "indirect_table_outside_ram"])
def test_malformed_input_needs_reset(mem: GuestMemory, case: str) -> None:
    core, dq, _ = bring_up(VirtioRng(), mem)
    a = dq.alloc(8)
    if case == "addr":
        dq.write_desc(dq.desc, 0, 0x7FFFFFFF00, 8, V.VRING_DESC_F_WRITE, 0)
        dq.publish(0)
    elif case == "head":
        dq.publish(200)
    elif case == "next":
        dq.write_desc(dq.desc, 0, a, 8, V.VRING_DESC_F_WRITE | V.VRING_DESC_F_NEXT, 99)
        dq.publish(0)
    elif case == "avail_jump":
        dq.set_avail_idx(1000)
    elif case == "nested_indirect":
        t = dq.alloc(16)
        dq.write_desc(t, 0, t, 16, V.VRING_DESC_F_INDIRECT, 0)
        dq.write_desc(dq.desc, 0, t, 16, V.VRING_DESC_F_INDIRECT, 0)
        dq.publish(0)
    elif case == "indirect_loop_in_a_huge_table":
        # 2 MiB of table (131072 entries) whose first two entries point at each other:
        # the walk must stop after queue-size steps, not table-size steps.
        t = 0x200000
        dq.write_desc(t, 0, a, 8, V.VRING_DESC_F_WRITE | V.VRING_DESC_F_NEXT, 1)
        dq.write_desc(t, 1, a, 8, V.VRING_DESC_F_WRITE | V.VRING_DESC_F_NEXT, 0)
        dq.write_desc(dq.desc, 0, t, 2 << 20, V.VRING_DESC_F_INDIRECT, 0)
        dq.publish(0)
    elif case == "indirect_table_outside_ram":
        dq.write_desc(dq.desc, 0, (4 << 20) - 16, 64, V.VRING_DESC_F_INDIRECT, 0)
        dq.publish(0)
    else:
        dq.write_desc(dq.desc, 0, a, 7, V.VRING_DESC_F_INDIRECT, 0)
        dq.publish(0)
    core.notify(0)
    assert core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET


def test_a_loop_in_a_huge_indirect_table_stops_after_queue_size_steps(
        mem: GuestMemory, monkeypatch: pytest.MonkeyPatch) -> None:
    """No chain may be longer than the queue (§2.7.5.3.1), so a loop in a 2 MiB indirect
    table costs at most queue-size descriptor reads, not 131072."""
    _, dq, _ = bring_up(VirtioRng(), mem)
    from pyvmm.devices.virtio.queue import DescriptorChain, VirtqueueError

    a, t = dq.alloc(8), 0x200000
    dq.write_desc(t, 0, a, 8, V.VRING_DESC_F_WRITE | V.VRING_DESC_F_NEXT, 1)
    dq.write_desc(t, 1, a, 8, V.VRING_DESC_F_WRITE | V.VRING_DESC_F_NEXT, 0)
    dq.write_desc(dq.desc, 0, t, 2 << 20, V.VRING_DESC_F_INDIRECT, 0)
    vq = Virtqueue(mem, dq.config(), indirect=True)
    import pyvmm.devices.virtio.queue as queue_mod
    reads, real = [], queue_mod._desc

    class Counting:  # the queue's descriptor struct, counting the entries it reads
        def unpack_from(self, buf: memoryview, off: int) -> tuple[int, ...]:
            reads.append(off)
            return real.unpack_from(buf, off)

    monkeypatch.setattr(queue_mod, "_desc", Counting())
    with pytest.raises(VirtqueueError, match="longer than the queue"):
        DescriptorChain(vq, 0).descriptors()
    assert len(reads) == 1 + dq.size  # the indirect descriptor, then queue-size entries


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2**40), st.integers(0, 2**20),
                          st.integers(0, 7), st.integers(0, 40)), min_size=1, max_size=16),
       st.integers(0, 0xFFFF))
def test_random_descriptor_tables_never_escape(table: list[tuple[int, int, int, int]],
                                               avail: int) -> None:
    with GuestMemory([(0, 4 * MiB)]) as m:
        core, dq, _ = bring_up(VirtioRng(), m)
        for i, (addr, length, flags, nxt) in enumerate(table):
            dq.write_desc(dq.desc, i, addr, length, flags, nxt)
        for i in range(len(table)):
            dq.publish(i)
        dq.set_avail_idx(avail)
        core.notify(0)  # must return: either served, or NEEDS_RESET
        assert core.active or core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET


# --- blk ---------------------------------------------------------------------------------
@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(64 * 1024))
    return p


def blk_req(dq: DriverQueue, typ: int, sector: int, data: bytes | int,
            split: bool = False) -> tuple[int, int]:
    hdr = dq.alloc(struct.pack("<IIQ", typ, 0, sector))
    status = dq.alloc(b"\xff")
    buf = dq.alloc(data)
    n = data if isinstance(data, int) else len(data)
    w = typ in (V.VIRTIO_BLK_T_IN, V.VIRTIO_BLK_T_GET_ID)
    parts = [(buf, n, w)] if not split else [(buf, n // 2, w), (buf + n // 2, n - n // 2, w)]
    dq.add([(hdr, 16, False), *([p for p in parts if p[1]]), (status, 1, True)])
    return buf, status


def test_blk_read_write_flush_get_id(mem: GuestMemory, image: Path) -> None:
    be = RawBlockBackend(str(image))
    core, dq, _ = bring_up(VirtioBlk(be, serial="disk-7"), mem)
    original = image.read_bytes()
    buf, st = blk_req(dq, V.VIRTIO_BLK_T_IN, 2, 1024, split=True)
    core.notify(0)
    assert mem.read(buf, 1024) == original[1024:2048] and mem.read(st, 1) == b"\0"
    payload = os.urandom(1536)
    _, st = blk_req(dq, V.VIRTIO_BLK_T_OUT, 10, payload)
    _, st2 = blk_req(dq, V.VIRTIO_BLK_T_FLUSH, 0, 0)
    buf3, st3 = blk_req(dq, V.VIRTIO_BLK_T_GET_ID, 0, 20)
    core.notify(0)
    assert mem.read(st, 1) + mem.read(st2, 1) + mem.read(st3, 1) == b"\0\0\0"
    assert image.read_bytes()[5120:5120 + 1536] == payload  # a host process sees it
    assert mem.read(buf3, 20).rstrip(b"\0") == b"disk-7"
    used = dq.take_used()
    assert used[0][1] == 1025 and used[3][1] == 21  # bytes written incl. status


@pytest.mark.parametrize("typ,sector,data,want", [
    (V.VIRTIO_BLK_T_IN, 127, 1024, V.VIRTIO_BLK_S_IOERR),   # runs past the end
    (V.VIRTIO_BLK_T_IN, 0, 100, V.VIRTIO_BLK_S_IOERR),      # not whole sectors
    (V.VIRTIO_BLK_T_OUT, 2**60, 512, V.VIRTIO_BLK_S_IOERR),  # absurd sector
    (77, 0, 512, V.VIRTIO_BLK_S_UNSUPP),                     # unknown type
])
def test_blk_errors_in_status(mem: GuestMemory, image: Path, typ: int, sector: int,
                              data: int, want: int) -> None:
    before = image.read_bytes()
    core, dq, _ = bring_up(VirtioBlk(RawBlockBackend(str(image))), mem)
    _, st = blk_req(dq, typ, sector, data if typ != V.VIRTIO_BLK_T_OUT else bytes(data))
    core.notify(0)
    assert mem.read(st, 1)[0] == want and core.active
    assert image.read_bytes() == before


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([V.VIRTIO_BLK_T_IN, V.VIRTIO_BLK_T_OUT, 77]),
                          st.integers(0, 140), st.sampled_from([0, 100, 512, 1024, 4096])),
                min_size=1, max_size=6),
       st.booleans())
def test_blk_linux_shaped_requests_serve_as_any_other_layout(
        reqs: list[tuple[int, int, int]], read_only: bool) -> None:
    """Linux's layout (header, one data buffer, status byte) takes VirtioBlk's fast path;
    the same requests with the data split in two take the general one. Status bytes,
    used lengths, data read and the image afterwards must be the same either way."""
    import tempfile
    outcome = []
    with tempfile.TemporaryDirectory() as d:
        seed = os.urandom(64 * 1024)
        for split in (False, True):
            img = Path(d) / f"{split}.img"
            img.write_bytes(seed)
            with GuestMemory([(0, 4 * MiB)]) as m:
                core, dq, _ = bring_up(VirtioBlk(RawBlockBackend(str(img), read_only)), m,
                                       size=64)
                sent = []
                for i, (typ, sector, n) in enumerate(reqs):
                    data: bytes | int = bytes([i + 1]) * n if typ == V.VIRTIO_BLK_T_OUT else n
                    sent.append((*blk_req(dq, typ, sector, data, split=split and n > 0), n))
                core.notify(0)
                got = [(m.read(st, 1), m.read(buf, n)) for buf, st, n in sent]
                outcome.append((got, [w for _, w in dq.take_used()], img.read_bytes()))
    assert outcome[0] == outcome[1]


def test_blk_read_only_refuses_writes(mem: GuestMemory, image: Path) -> None:
    before = image.read_bytes()
    dev = VirtioBlk(RawBlockBackend(str(image), read_only=True))
    assert dev.features & (1 << V.VIRTIO_BLK_F_RO)
    core, dq, _ = bring_up(dev, mem)
    _, st = blk_req(dq, V.VIRTIO_BLK_T_OUT, 0, b"x" * 512)
    core.notify(0)
    assert mem.read(st, 1)[0] == V.VIRTIO_BLK_S_IOERR and image.read_bytes() == before


def test_blk_discard_and_write_zeroes(mem: GuestMemory, image: Path) -> None:
    core, dq, _ = bring_up(VirtioBlk(RawBlockBackend(str(image))), mem)
    seg = struct.pack("<QII", 4, 8, 0)
    _, st = blk_req(dq, V.VIRTIO_BLK_T_WRITE_ZEROES, 0, seg)
    _, st2 = blk_req(dq, V.VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", 100, 4, 0))
    _, st3 = blk_req(dq, V.VIRTIO_BLK_T_DISCARD, 0, struct.pack("<QII", 126, 4, 0))
    core.notify(0)
    assert mem.read(st, 1) + mem.read(st2, 1) == b"\0\0"
    assert mem.read(st3, 1)[0] == V.VIRTIO_BLK_S_IOERR  # past the end
    assert image.read_bytes()[2048:2048 + 4096] == bytes(4096)


def test_blk_chain_without_status_byte_needs_reset(mem: GuestMemory, image: Path) -> None:
    core, dq, _ = bring_up(VirtioBlk(RawBlockBackend(str(image))), mem)
    hdr = dq.alloc(struct.pack("<IIQ", 0, 0, 0))
    dq.add([(hdr, 16, False)])
    core.notify(0)
    assert core.status & V.VIRTIO_CONFIG_S_NEEDS_RESET


def test_blk_config_space(image: Path) -> None:
    dev = VirtioBlk(RawBlockBackend(str(image)))
    assert dev.read_config(0, 8) == 128  # 64 KiB / 512
    assert dev.read_config(20, 4) == 512
    assert dev.read_config(1000, 4) == 0
