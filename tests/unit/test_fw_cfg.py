"""fw_cfg at its ports: the data port, the directory, DMA, and what a hostile guest can
do to it."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices.legacy.fw_cfg import FwCfg, FwCfgConfig
from pyvmm.errors import ConfigError
from pyvmm.machine.config import MachineConfig
from pyvmm.memory import GuestMemory
from pyvmm.uapi import fw_cfg as F

SEL, DMA = F.FW_CFG_IO_BASE, F.FW_CFG_DMA_IO_BASE


@pytest.fixture
def dev() -> FwCfg:
    mem = GuestMemory([(0, 1 << 20)])
    return FwCfg(mem, {F.FW_CFG_SIGNATURE: b"QEMU"},
                 {"opt/b": b"second", "opt/a": b"first", "etc/e820": bytes(20)})


def read_item(d: FwCfg, key: int, n: int) -> bytes:
    d.write(SEL, 0, 2, key)
    return bytes(d.read(SEL, 1, 1) for _ in range(n))


def test_signature_and_reading_past_the_end(dev: FwCfg) -> None:
    assert read_item(dev, F.FW_CFG_SIGNATURE, 6) == b"QEMU\0\0"
    assert read_item(dev, 0x1234, 4) == bytes(4)  # an unknown key is empty


def test_directory_is_big_endian_and_sorted(dev: FwCfg) -> None:
    raw = read_item(dev, F.FW_CFG_FILE_DIR, 4 + 3 * 64)
    assert struct.unpack(">I", raw[:4])[0] == 3
    names = []
    for i in range(3):
        size, key, _, name = struct.unpack(">IHH56s", raw[4 + 64 * i:4 + 64 * (i + 1)])
        names.append(name.rstrip(b"\0").decode())
        assert read_item(dev, key, size) == {"opt/a": b"first", "opt/b": b"second",
                                             "etc/e820": bytes(20)}[names[-1]]
    assert names == sorted(names)


def dma(d: FwCfg, access: int) -> None:
    d.write(DMA, 0, 4, int.from_bytes((access >> 32).to_bytes(4, "big"), "little"))
    d.write(DMA, 4, 4, int.from_bytes((access & 0xFFFFFFFF).to_bytes(4, "big"), "little"))


def test_dma_select_read_skip_and_write(dev: FwCfg) -> None:
    mem = dev.mem
    key = F.FW_CFG_FILE_FIRST + 2  # opt/b: files are keyed in name order (etc/e820, opt/a, opt/b)
    ctl = (key << 16) | F.FW_CFG_DMA_CTL_SELECT | F.FW_CFG_DMA_CTL_SKIP
    mem.write(0x1000, struct.pack(">IIQ", ctl, 2, 0))
    dma(dev, 0x1000)
    assert mem.read(0x1000, 4) == bytes(4)  # done, no error
    mem.write(0x2000, b"\xff" * 16)
    mem.write(0x1000, struct.pack(">IIQ", F.FW_CFG_DMA_CTL_READ, 8, 0x2000))
    dma(dev, 0x1000)
    assert mem.read(0x2000, 9) == b"cond\0\0\0\0\xff"  # after the skip; zeros past the end
    mem.write(0x1000, struct.pack(">IIQ", F.FW_CFG_DMA_CTL_WRITE, 4, 0x2000))
    dma(dev, 0x1000)
    assert struct.unpack(">I", mem.read(0x1000, 4))[0] == F.FW_CFG_DMA_CTL_ERROR


def test_dma_outside_ram_is_an_error_not_a_crash(dev: FwCfg) -> None:
    mem = dev.mem
    mem.write(0x1000, struct.pack(">IIQ", (F.FW_CFG_SIGNATURE << 16) | 0x0A, 4, 1 << 40))
    dma(dev, 0x1000)
    assert struct.unpack(">I", mem.read(0x1000, 4))[0] == F.FW_CFG_DMA_CTL_ERROR
    dma(dev, 1 << 40)  # the access structure itself outside RAM: counted, nothing else
    # A huge length into RAM: zeros up to the end of RAM, then an error; bounded work.
    mem.write(0x1000, struct.pack(">IIQ", (F.FW_CFG_SIGNATURE << 16) | 0x0A, 0xFFFFFFFF,
                                  0x3000))
    dma(dev, 0x1000)
    assert struct.unpack(">I", mem.read(0x1000, 4))[0] == F.FW_CFG_DMA_CTL_ERROR
    assert dev.dma_errors == 3


def test_the_dma_register_reads_its_signature(dev: FwCfg) -> None:
    raw = dev.read(DMA, 0, 4).to_bytes(4, "little") + dev.read(DMA, 4, 4).to_bytes(4, "little")
    assert raw == b"QEMU CFG"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([(SEL, 0), (SEL, 1), (DMA, 0), (DMA, 4)]),
                          st.sampled_from([1, 2, 4, 8]), st.integers(0, (1 << 64) - 1),
                          st.booleans()), max_size=40))
def test_random_port_accesses_never_raise(ops: list[tuple[tuple[int, int], int, int, bool]]
                                          ) -> None:
    d = FwCfg(GuestMemory([(0, 1 << 20)]), {0: b"QEMU"}, {"opt/x": b"y" * 100})
    for (base, off), size, value, is_write in ops:
        if is_write:
            d.write(base, off, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= d.read(base, off, size) < 1 << (8 * size)


@pytest.mark.parametrize("spec,text", [("opt/x", "use NAME=@PATH"),
                                       ("etc/x=1", "user files go under opt/"),
                                       ("opt/" + "x" * 60 + "=1", "longer than 55 bytes")])
def test_bad_file_options(spec: str, text: str) -> None:
    with pytest.raises(ConfigError) as e:
        MachineConfig.from_dict({"kernel": "k", "devices": [{"type": "fw-cfg",
                                                             "file": [spec]}]})
    assert text in str(e.value)


def test_a_missing_file_is_one_line_before_the_vm_is_built(tmp_path: Path) -> None:
    cfg = FwCfgConfig(file=[f"opt/x=@{tmp_path / 'missing'}"])
    with pytest.raises(ConfigError) as e:
        cfg.validate()
    assert "cannot read" in str(e.value)
