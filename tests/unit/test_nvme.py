"""NVMe controller through its BAR0 registers over real guest memory: PRP walks, the
phase tag across a wrap, a full completion queue stalling its submission queue, a
controller reset, and whatever a hostile driver writes to registers and doorbells."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.backends.block import RawBlockBackend
from pyvmm.devices.nvme.controller import NvmeController
from pyvmm.devices.nvme.queues import PrpError, prp_segments
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.memory import GuestMemory
from pyvmm.uapi import nvme as N

MiB = 1 << 20
ASQ, ACQ, IOSQ, IOCQ, BUF, LIST = 0x10000, 0x11000, 0x12000, 0x13000, 0x100000, 0x20000


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory([(0, 4 * MiB)])
    yield m  # type: ignore[misc]
    m.close()


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "n.img"
    p.write_bytes(os.urandom(MiB))
    return p


class Host:
    """A driver's side: admin queue of 4 (so a wrap comes quickly), one I/O pair."""

    def __init__(self, ctrl: NvmeController, mem: GuestMemory, asize: int = 4) -> None:
        self.c, self.mem = ctrl, mem
        self.tails = {0: 0, 1: 0}
        self.heads = {0: 0, 1: 0}
        self.phase = {0: 1, 1: 1}
        self.size = {0: asize, 1: 8}
        self.cid = 0
        ctrl.write_bar(0, N.NVME_REG_AQA, 4, ((asize - 1) << 16) | (asize - 1))
        ctrl.write_bar(0, N.NVME_REG_ASQ, 8, ASQ)
        ctrl.write_bar(0, N.NVME_REG_ACQ, 8, ACQ)
        ctrl.write_bar(0, N.NVME_REG_CC, 4, (6 << 16) | (4 << 20) | 1)
        assert ctrl.read_bar(0, N.NVME_REG_CSTS, 4) == N.NVME_CSTS_RDY

    def put(self, q: int, op: int, nsid: int = 1, prp1: int = 0, prp2: int = 0,
            *cdw: int, ring: bool = True) -> int:
        self.cid += 1
        base = ASQ if q == 0 else IOSQ
        words = list(cdw) + [0] * (6 - len(cdw))
        self.mem.write(base + 64 * self.tails[q], struct.pack(
            "<BBHI8xQQQ6I", op, 0, self.cid, nsid, 0, prp1, prp2, *words))
        self.tails[q] = (self.tails[q] + 1) % self.size[q]
        if ring:
            self.c.write_bar(0, 0x1000 + 8 * q, 4, self.tails[q])
        return self.cid

    def take(self, q: int, free: bool = True) -> tuple[int, int, int] | None:
        """(cid, status, result) of the next completion, or None."""
        base = ACQ if q == 0 else IOCQ
        res, _, _sqhd, _sqid, cid, sp = struct.unpack(
            "<IIHHHH", self.mem.read(base + 16 * self.heads[q], 16))
        if sp & 1 != self.phase[q]:
            return None
        self.heads[q] += 1
        if self.heads[q] == self.size[q]:
            self.heads[q], self.phase[q] = 0, self.phase[q] ^ 1
        if free:
            self.c.write_bar(0, 0x1000 + 8 * q + 4, 4, self.heads[q])
        return cid, sp >> 1, res

    def io_pair(self) -> None:
        self.put(0, N.nvme_admin_create_cq, 0, IOCQ, 0, (7 << 16) | 1, (1 << 16) | 3)
        self.put(0, N.nvme_admin_create_sq, 0, IOSQ, 0, (7 << 16) | 1, (1 << 16) | 1)
        assert [self.take(0)[1], self.take(0)[1]] == [0, 0]  # type: ignore[index]


def ctrl(mem: GuestMemory, image: Path, read_only: bool = False
         ) -> tuple[NvmeController, RecordingMsiSink]:
    sink = RecordingMsiSink()
    return NvmeController(RawBlockBackend(str(image), read_only), mem, sink), sink


def test_prp_first_page_second_page_and_chained_list(mem: GuestMemory) -> None:
    assert prp_segments(mem, 0x1100, 0, 0x100) == [(0x1100, 0x100)]
    assert prp_segments(mem, 0x1800, 0x5000, 0x1000) == [(0x1800, 0x800), (0x5000, 0x800)]
    with pytest.raises(PrpError) as e:
        prp_segments(mem, 0x1000, 0x5008, 0x2000)  # second page pointer with an offset
    assert e.value.status == N.NVME_SC_INVALID_PRP_OFFSET
    # A list starting 16 bytes before its page's end: 1 entry, then a chain pointer.
    lst = LIST + 4096 - 16
    mem.write(lst, struct.pack("<QQ", 0x40000, LIST + 4096))
    mem.write(LIST + 4096, struct.pack("<QQ", 0x41000, 0x80000))
    segs = prp_segments(mem, 0x3F000, lst, 4 * 4096)
    assert segs == [(0x3F000, 0x3000), (0x80000, 0x1000)]  # 3F000-41FFF merged
    mem.write(lst, struct.pack("<QQ", 0x40000, 0x3FFFFFFF00))  # chain outside RAM
    with pytest.raises(PrpError) as e:
        prp_segments(mem, 0x3F000, lst, 4 * 4096)
    assert e.value.status == N.NVME_SC_DATA_XFER_ERROR


def test_write_read_through_a_prp_list(mem: GuestMemory, image: Path) -> None:
    c, sink = ctrl(mem, image)
    h = Host(c, mem)
    h.io_pair()
    data = os.urandom(5 * 4096)
    mem.write(BUF, data)
    mem.write(LIST, struct.pack("<4Q", *(BUF + 4096 * i for i in range(1, 5))))
    h.put(1, N.nvme_cmd_write, 1, BUF, LIST, 16, 0, 5 * 8 - 1)
    assert h.take(1)[1] == 0  # type: ignore[index]
    assert image.read_bytes()[16 * 512:16 * 512 + len(data)] == data
    mem.write(BUF, bytes(len(data)))
    h.put(1, N.nvme_cmd_read, 1, BUF, LIST, 16, 0, 5 * 8 - 1)
    assert h.take(1)[1] == 0 and mem.read(BUF, len(data)) == data  # type: ignore[index]
    assert c.bytes == 2 * len(data)
    assert not sink.sent  # MSI-X is not enabled: nothing was sent by MSI


def test_phase_tag_flips_on_wrap_and_full_cq_stalls(mem: GuestMemory, image: Path) -> None:
    c, _ = ctrl(mem, image)
    h = Host(c, mem, asize=4)  # 4 entries: at most 3 completions outstanding
    got = []
    for _ in range(5):  # past one wrap
        cid = h.put(0, N.nvme_admin_get_features, 0, 0, 0, N.NVME_FEAT_NUM_QUEUES)
        e = h.take(0)
        assert e is not None and e[0] == cid and e[1] == 0 and e[2] == 0x30003
        got.append(e)
    assert h.phase[0] == 0  # wrapped once
    # Fill the CQ without freeing entries: the fourth command stays in the SQ.
    for _ in range(3):
        h.put(0, N.nvme_admin_get_features, 0, 0, 0, N.NVME_FEAT_VOLATILE_WC)
    first = [h.take(0, free=False) for _ in range(3)]
    assert all(e is not None for e in first)
    h.put(0, N.nvme_admin_get_features, 0, 0, 0, N.NVME_FEAT_VOLATILE_WC, ring=True)
    assert h.take(0, free=False) is None  # stalled on the full CQ
    c.write_bar(0, 0x1004, 4, h.heads[0])  # the host frees the entries
    assert h.take(0) is not None  # and the stalled command completes


@pytest.mark.parametrize("cmd,want", [
    (dict(op=0x7F), N.NVME_SC_INVALID_OPCODE),
    (dict(op=N.nvme_cmd_read, nsid=2), N.NVME_SC_INVALID_NS),
    (dict(op=N.nvme_cmd_read, cdw=(2047, 0, 7)), N.NVME_SC_LBA_RANGE),  # past 2048 blocks
    (dict(op=N.nvme_cmd_read, cdw=(0, 0, 511)), N.NVME_SC_INVALID_FIELD),  # 256K > MDTS
    (dict(op=N.nvme_cmd_read, prp1=0x3FFFFF000, cdw=(0, 0, 7)), N.NVME_SC_DATA_XFER_ERROR),
    (dict(op=N.nvme_cmd_read, prp1=BUF, prp2=BUF + 0x1010, cdw=(0, 0, 15)),
     N.NVME_SC_INVALID_PRP_OFFSET),
    (dict(op=N.nvme_cmd_write, cdw=(0, 0, 0), ro=True), N.NVME_SC_NS_WRITE_PROTECTED),
])
def test_bad_io_commands_fail_with_the_spec_status(mem: GuestMemory, image: Path,
                                                   cmd: dict, want: int) -> None:
    before = image.read_bytes()
    c, _ = ctrl(mem, image, read_only=bool(cmd.get("ro")))
    h = Host(c, mem)
    h.io_pair()
    h.put(1, cmd["op"], cmd.get("nsid", 1), cmd.get("prp1", BUF), cmd.get("prp2", 0),
          *cmd.get("cdw", ()))
    e = h.take(1)
    assert e is not None and e[1] == want | N.NVME_SC_DNR
    assert image.read_bytes() == before and not c.csts & N.NVME_CSTS_CFS
    h.put(1, N.nvme_cmd_read, 1, BUF, 0, 0, 0, 0)  # the controller goes on
    assert h.take(1)[1] == 0  # type: ignore[index]


def test_queue_creation_checks(mem: GuestMemory, image: Path) -> None:
    c, _ = ctrl(mem, image)
    h = Host(c, mem)
    cases = [
        ((N.nvme_admin_create_sq, 0, IOSQ, 0, (7 << 16) | 1, (1 << 16) | 1), N.NVME_SC_CQ_INVALID),
        ((N.nvme_admin_create_cq, 0, IOCQ, 0, (7 << 16) | 9, 3), N.NVME_SC_QID_INVALID),
        ((N.nvme_admin_create_cq, 0, IOCQ, 0, (0 << 16) | 1, 3), N.NVME_SC_QUEUE_SIZE),
        ((N.nvme_admin_create_cq, 0, 0x3FFFFF000, 0, (7 << 16) | 1, 3),
         N.NVME_SC_INVALID_FIELD),  # outside RAM
        ((N.nvme_admin_create_cq, 0, IOCQ, 0, (7 << 16) | 1, (9 << 16) | 3),
         N.NVME_SC_INVALID_VECTOR),
        ((N.nvme_admin_delete_cq, 0, 0, 0, 0), N.NVME_SC_QID_INVALID),
    ]
    for args, want in cases:
        h.put(0, *args)
        e = h.take(0)
        assert e is not None and e[1] == want | N.NVME_SC_DNR, (args, e)
    h.io_pair()
    h.put(0, N.nvme_admin_delete_cq, 0, 0, 0, 1)
    assert h.take(0)[1] == N.NVME_SC_DELETE_INVALID | N.NVME_SC_DNR  # type: ignore[index]


def test_reset_clears_queues_and_a_bad_admin_queue_is_fatal(mem: GuestMemory,
                                                            image: Path) -> None:
    c, _ = ctrl(mem, image)
    h = Host(c, mem)
    h.io_pair()
    c.write_bar(0, N.NVME_REG_CC, 4, 0)
    assert c.read_bar(0, N.NVME_REG_CSTS, 4) == 0 and not c.sqs and not c.cqs
    c.write_bar(0, N.NVME_REG_ASQ, 8, 0x7FFF0000000)  # outside RAM
    c.write_bar(0, N.NVME_REG_CC, 4, (6 << 16) | (4 << 20) | 1)
    assert c.read_bar(0, N.NVME_REG_CSTS, 4) & N.NVME_CSTS_CFS
    c.write_bar(0, 0x1000, 4, 1)  # doorbells of a fatal controller are ignored
    c.write_bar(0, N.NVME_REG_CC, 4, 0)
    assert c.read_bar(0, N.NVME_REG_CSTS, 4) == 0  # a reset recovers


@settings(max_examples=150, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([0x0, 0x4, 0xC, 0x10, 0x14, 0x1C, 0x24, 0x28,
                                           0x2C, 0x30, 0x34, 0x1000, 0x1004, 0x1008,
                                           0x100C, 0x1010, 0x1FFC, 0x3FFC]),
                          st.sampled_from([4, 8]), st.integers(0, 2**64 - 1)),
                max_size=40),
       st.binary(min_size=64 * 4, max_size=64 * 4))
def test_random_register_and_doorbell_writes_never_raise(
        ops: list[tuple[int, int, int]], sq: bytes) -> None:
    """Random register values and doorbells over an admin queue of random commands: the
    controller answers or goes fatal, but never raises and never touches host memory."""
    import tempfile
    with tempfile.NamedTemporaryFile() as f, GuestMemory([(0, 4 * MiB)]) as m:
        f.write(bytes(64 * 1024))
        f.flush()
        c, _ = ctrl(m, Path(f.name))
        m.write(ASQ, sq)
        c.write_bar(0, N.NVME_REG_AQA, 4, (3 << 16) | 3)
        c.write_bar(0, N.NVME_REG_ASQ, 8, ASQ)
        c.write_bar(0, N.NVME_REG_ACQ, 8, ACQ)
        c.write_bar(0, N.NVME_REG_CC, 4, (6 << 16) | (4 << 20) | 1)
        c.write_bar(0, 0x1000, 4, 3)  # run the random commands
        for off, size, value in ops:
            c.write_bar(0, off, size, value & ((1 << (8 * size)) - 1))
            c.read_bar(0, off, size)
