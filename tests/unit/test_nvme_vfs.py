"""Virtual functions' building blocks: the slice view of a shared image refuses
everything outside its window, an NVMe controller on a slice answers LBA Out of Range
for LBAs past its namespace and leaves the other slices untouched, and a VF's rate
limit holds commands in the guest's queue until its buckets refill."""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.backends.block import RawBlockBackend, SliceBackend
from pyvmm.devices.nvme.controller import NvmeController
from pyvmm.errors import ConfigError
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.memory import GuestMemory
from pyvmm.sharing.ratelimit import Limits
from pyvmm.uapi import nvme as N
from tests.unit.test_nvme import BUF, LIST, Host, mem  # noqa: F401  (mem is a fixture)

MiB = 1 << 20
SLICE = MiB  # four slices of 1 MiB = 2048 blocks each


@pytest.fixture
def shared(tmp_path: Path) -> tuple[Path, bytes]:
    p = tmp_path / "shared.img"
    before = os.urandom(4 * SLICE)
    p.write_bytes(before)
    return p, before


def test_slice_view_refuses_anything_outside(shared: tuple[Path, bytes]) -> None:
    img, before = shared
    base = RawBlockBackend(str(img))
    v = SliceBackend(base, SLICE, SLICE)
    assert v.size == SLICE and not v.read_only
    buf = bytearray(512)
    assert v.readv(0, [memoryview(buf)]) == 512
    assert bytes(buf) == before[SLICE:SLICE + 512]  # slice 0 is image offset SLICE
    last = bytearray(512)
    assert v.readv(SLICE - 512, [memoryview(last)]) == 512
    assert bytes(last) == before[2 * SLICE - 512:2 * SLICE]
    refused = [
        lambda: v.readv(SLICE - 256, [memoryview(bytearray(512))]),  # straddles the end
        lambda: v.writev(SLICE, [memoryview(b"x" * 512)]),  # just past
        lambda: v.writev(-512, [memoryview(b"x" * 512)]),  # before
        lambda: v.writev(SLICE - 512, [memoryview(b"x" * 256), memoryview(b"y" * 512)]),
        lambda: v.readv_nowait(SLICE, [memoryview(bytearray(1))]),
        lambda: v.writev_nowait(1 << 62, [memoryview(b"x")]),
        lambda: v.discard(SLICE - 512, 1024),
        lambda: v.write_zeroes(0, SLICE + 1),
        lambda: v.write_zeroes(-1, 1),
    ]
    for fn in refused:
        with pytest.raises(OSError) as e:
            fn()
        assert e.value.errno == errno.EINVAL
    v.writev(0, [memoryview(b"\xAA" * 512)])
    v.write_zeroes(512, 512)
    base.close()
    data = img.read_bytes()
    assert data[SLICE:SLICE + 512] == b"\xAA" * 512
    assert data[SLICE + 512:SLICE + 1024] == bytes(512)
    assert data[:SLICE] == before[:SLICE]  # the neighbours never saw a byte
    assert data[SLICE + 1024:] == before[SLICE + 1024:]


def test_slice_must_fit_the_image(shared: tuple[Path, bytes]) -> None:
    base = RawBlockBackend(str(shared[0]))
    for off, n in [(3 * SLICE, 2 * SLICE), (-512, 1024), (0, 256)]:
        with pytest.raises(ConfigError):
            SliceBackend(base, off, n)
    base.close()


def test_nvme_on_a_slice_lba_out_of_range_others_untouched(
        mem: GuestMemory, shared: tuple[Path, bytes]) -> None:  # noqa: F811
    img, before = shared
    base = RawBlockBackend(str(img))
    c = NvmeController(SliceBackend(base, 2 * SLICE, SLICE), mem, RecordingMsiSink())
    assert c.nsze == SLICE // 512
    h = Host(c, mem)
    h.io_pair()
    mem.write(BUF, b"\x5A" * 4096)
    blocks = SLICE // 512
    for slba, nlb in [(blocks, 1), (blocks - 4, 8), (1 << 40, 1), ((1 << 64) - 1, 1)]:
        h.put(1, N.nvme_cmd_write, 1, BUF, 0, slba & 0xFFFFFFFF, slba >> 32, nlb - 1)
        e = h.take(1)
        assert e is not None and e[1] == N.NVME_SC_LBA_RANGE | N.NVME_SC_DNR, hex(slba)
        h.put(1, N.nvme_cmd_read, 1, BUF, 0, slba & 0xFFFFFFFF, slba >> 32, nlb - 1)
        e = h.take(1)
        assert e is not None and e[1] == N.NVME_SC_LBA_RANGE | N.NVME_SC_DNR
        h.put(1, N.nvme_cmd_write_zeroes, 1, 0, 0, slba & 0xFFFFFFFF, slba >> 32, nlb - 1)
        e = h.take(1)
        assert e is not None and e[1] == N.NVME_SC_LBA_RANGE | N.NVME_SC_DNR
    # The slice's own last 4 KiB is writable, and lands in the image's third quarter.
    h.put(1, N.nvme_cmd_write, 1, BUF, 0, blocks - 8, 0, 7)
    assert h.take(1)[1] == 0  # type: ignore[index]
    assert c.failures == 12 and not c.csts & N.NVME_CSTS_CFS
    base.close()
    data = img.read_bytes()
    assert data[3 * SLICE - 4096:3 * SLICE] == b"\x5A" * 4096
    assert data[:3 * SLICE - 4096] == before[:3 * SLICE - 4096]
    assert data[3 * SLICE:] == before[3 * SLICE:]


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.timers: list[tuple[float, Callable[[], None]]] = []

    def call_later(self, delay: float, fn: Callable[[], None]) -> None:
        self.timers.append((self.now + delay, fn))

    def advance(self, dt: float) -> None:
        self.now += dt
        due = [t for t in self.timers if t[0] <= self.now]
        self.timers = [t for t in self.timers if t[0] > self.now]
        for _, fn in due:
            fn()


def test_vf_rate_limit_holds_commands_in_the_queue(
        mem: GuestMemory, shared: tuple[Path, bytes]) -> None:  # noqa: F811
    img, _ = shared
    base = RawBlockBackend(str(img))
    t = FakeTime()
    c = NvmeController(SliceBackend(base, 0, SLICE), mem, RecordingMsiSink(),
                       limits=Limits(iops=2, iops_burst=2), call_later=t.call_later,
                       clock=lambda: t.now)
    h = Host(c, mem)
    h.io_pair()  # admin commands are never limited
    for _ in range(5):
        h.put(1, N.nvme_cmd_read, 1, BUF, 0, 0, 0, 0)
    done = [h.take(1) for _ in range(5)]
    assert [e is not None for e in done] == [True, True, False, False, False]
    assert c.limiter is not None and c.limiter.throttled >= 1 and t.timers
    t.advance(0.5)  # one more token
    assert h.take(1) is not None and h.take(1) is None
    t.advance(1.0)  # two more: the last two
    assert h.take(1) is not None and h.take(1) is not None
    assert c.metrics()["throttled"] == c.limiter.throttled and c.bytes == 5 * 512
    base.close()


@pytest.mark.parametrize("extra,want", [
    (["--vfs", "2", "--socket", "S0"], "needs 2 --socket"),
    (["--vfs", "2", "--socket", "S0", "--socket", "S0"], "a socket of its own"),
    (["--vfs", "0", "--socket", "S0"], "needs 0 --socket"),
    (["--vfs", "1", "--socket", "S0"], "NVMe's"),  # with --device virtio-blk
    (["--vfs", "4", "--socket", "S0", "--socket", "S1", "--socket", "S2", "--socket", "S3"],
     "at least 1 MiB"),  # an image 512 bytes short of 4 MiB
    (["--vfs", "2", "--socket", "S0", "--socket", "S1", "--vf-size", "3M"],
     "do not fit in the image"),
    (["--vfs", "2", "--socket", "S0", "--socket", "S1", "--vf-size", "1.5M"],
     "is not a size"),
    (["--vfs", "2", "--socket", "S0", "--socket", "S1", "--vf-limit", "iops=1",
      "--vf-limit", "none", "--vf-limit", "none"], "once per VF"),
    (["--vfs", "2", "--socket", "S0", "--socket", "S1", "--vf-limit", "iops=0"],
     "positive"),
    (["--socket", "S0", "--vf-size", "1M"], "need --vfs"),
])
def test_vf_cli_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      extra: list[str], want: str) -> None:
    from pyvmm.cli import EXIT_CONFIG, main

    img = tmp_path / "i.img"
    img.write_bytes(bytes(4 * MiB if "at least" not in want else 4 * MiB - 512))
    dev = "virtio-blk" if want == "NVMe's" else "nvme"
    argv = ["backend", "vfio-user", "--device", dev, "--disk", str(img)]
    argv += [str(tmp_path / a) if a in ("S0", "S1", "S2", "S3") else a for a in extra]
    assert main(argv) == EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert want in err and "\n" not in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["i.img"]  # no socket left


def test_slice_size_splits_in_whole_blocks() -> None:
    from pyvmm.vfio_user.vfs import slice_size

    assert slice_size(4 * MiB + 1000, 4, None) == MiB  # the remainder is no VF's
    assert slice_size(3 * MiB + 1536, 3, None) == MiB + 512
    assert slice_size(8 * MiB, 2, 3 * MiB) == 3 * MiB
    with pytest.raises(ConfigError):
        slice_size(8 * MiB, 2, 3 * MiB + 100)
    with pytest.raises(ConfigError):
        slice_size(8 * MiB, 65, None)


def test_no_command_of_a_vf_reaches_outside_its_slice(tmp_path: Path) -> None:
    """Random reads, writes, write-zeroes and deallocates, LBAs anywhere in 64 bits
    (mostly near the slice's edges): the bytes before and after the window never change,
    and what fails, fails with LBA Out of Range (or Invalid Field for size over MDTS)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    img = tmp_path / "h.img"
    before = os.urandom(3 * SLICE)
    img.write_bytes(before)
    base = RawBlockBackend(str(img))
    m = GuestMemory([(0, 4 * MiB)])
    c = NvmeController(SliceBackend(base, SLICE, SLICE), m, RecordingMsiSink())
    h = Host(c, m)
    h.io_pair()
    m.write(BUF, os.urandom(128 << 10))
    import struct

    m.write(LIST, struct.pack("<64Q", *(BUF + 4096 * i for i in range(1, 65))))
    blocks = SLICE // 512
    edge = st.integers(-300, 300).map(lambda d: max(0, blocks + d))
    lba = st.one_of(edge, st.integers(0, blocks), st.integers(0, (1 << 64) - 1))
    ops = st.sampled_from([N.nvme_cmd_read, N.nvme_cmd_write, N.nvme_cmd_write_zeroes,
                           N.nvme_cmd_dsm])
    allowed = {0, N.NVME_SC_LBA_RANGE | N.NVME_SC_DNR, N.NVME_SC_INVALID_FIELD | N.NVME_SC_DNR}

    @settings(max_examples=150, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(op=ops, slba=lba, nlb=st.integers(1, 300))
    def one(op: int, slba: int, nlb: int) -> None:
        if op == N.nvme_cmd_dsm:  # one range, in a list at BUF + 64 KiB
            m.write(BUF + (64 << 10), struct.pack("<IIQ", 0, nlb, slba))
            h.put(1, op, 1, BUF + (64 << 10), 0, 0, N.NVME_DSMGMT_AD)
        else:
            # PRP2: the second page, or a list of the pages after the first
            prp2 = BUF + 4096 if nlb * 512 <= 8192 else LIST
            h.put(1, op, 1, BUF, prp2, slba & 0xFFFFFFFF, slba >> 32, nlb - 1)
        e = h.take(1)
        assert e is not None and e[1] in allowed, (op, slba, nlb, e)
        if slba + nlb > blocks:
            assert e[1] == N.NVME_SC_LBA_RANGE | N.NVME_SC_DNR

    one()
    base.close()
    m.close()
    data = img.read_bytes()
    assert data[:SLICE] == before[:SLICE] and data[2 * SLICE:] == before[2 * SLICE:]
