"""PCI config space, BARs, capabilities, MSI and MSI-X against the PCI Local Bus spec."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices.pci.config_space import BarChange, PCIConfigSpace
from pyvmm.devices.pci.msi import MsiCapability
from pyvmm.devices.pci.msix import MsixCapability
from pyvmm.irq.msi import MsiMessage, RecordingMsiSink
from pyvmm.uapi import pci as P


def cfg() -> PCIConfigSpace:
    return PCIConfigSpace(0x1234, 0x5678, 0x020000, revision=3)


def test_identity_is_read_only() -> None:
    c = cfg()
    c.write(0, 4, 0xFFFFFFFF)
    c.write(8, 4, 0xFFFFFFFF)
    assert c.read(0, 4) == 0x56781234
    assert c.read(8, 4) == 0x02000003


def test_bar_sizing_by_all_ones_32bit_mem_io_and_64bit() -> None:
    c = cfg()
    c.add_bar(0, 0x1000)
    c.add_bar(1, 0x20, is_io=True)
    c.add_bar(2, 1 << 33, is_64bit=True, prefetchable=True)
    for off in (0x10, 0x14, 0x18, 0x1C):
        c.write(off, 4, 0xFFFFFFFF)
    assert c.read(0x10, 4) == 0xFFFFF000
    assert c.read(0x14, 4) == 0xFFFFFFE1  # IO: bit 0 set
    assert c.read(0x18, 4) == 0x0000000C  # 64-bit, prefetchable; 8 GiB: low bits all size
    assert c.read(0x1C, 4) == 0xFFFFFFFE


def test_bar_move_and_decode_toggle_return_changes() -> None:
    c = cfg()
    c.add_bar(0, 0x1000)
    assert c.write(0x10, 4, 0xC0000000) == []  # decoding off: nothing to map yet
    assert c.write(P.PCI_COMMAND, 2, P.PCI_COMMAND_MEMORY) == [
        BarChange(0, None, 0xC0000000, 0x1000, False)]
    assert c.write(0x10, 4, 0xC0010123) == [BarChange(0, 0xC0000000, 0xC0010000, 0x1000, False)]
    assert c.write(P.PCI_COMMAND, 2, 0) == [BarChange(0, 0xC0010000, None, 0x1000, False)]


def test_status_bits_are_write_one_to_clear() -> None:
    c = cfg()
    c.set16(P.PCI_STATUS, 0x8000 | P.PCI_STATUS_CAP_LIST)
    c.write(P.PCI_STATUS, 2, 0x8000)
    assert c.read(P.PCI_STATUS, 2) == P.PCI_STATUS_CAP_LIST


def test_capability_chain() -> None:
    c = cfg()
    a = c.add_capability(P.PCI_CAP_ID_VNDR, b"\x04\x00")
    b = c.add_capability(P.PCI_CAP_ID_VNDR, b"\x04\x00")
    assert c.read(P.PCI_CAPABILITY_LIST, 1) == a
    assert c.read(a + 1, 1) == b and c.read(b + 1, 1) == 0
    assert c.read(P.PCI_STATUS, 2) & P.PCI_STATUS_CAP_LIST


def test_out_of_range_and_odd_sizes() -> None:
    c = cfg()
    assert c.read(0x100, 4) == 0xFFFFFFFF
    assert c.read(0, 3) == 0xFFFFFF
    assert c.write(0x100, 4, 0) == [] and c.write(0, 3, 0) == []


def test_msi_mask_pending_and_unmask_delivery() -> None:
    c, sink = cfg(), RecordingMsiSink()
    msi = MsiCapability(c, sink, vectors=4)
    o = msi.off
    c.write(o + P.PCI_MSI_ADDRESS_LO, 4, 0xFEE00000)
    c.write(o + P.PCI_MSI_DATA_64, 2, 0x40)
    assert not msi.trigger(0)  # not enabled
    c.write(o + P.PCI_MSI_FLAGS, 2, P.PCI_MSI_FLAGS_ENABLE | (2 << 4))  # 4 vectors
    assert msi.trigger(3)
    assert sink.sent == [MsiMessage(0xFEE00000, 0x43)]
    c.write(o + P.PCI_MSI_MASK_64, 4, 0b0010)
    assert not msi.trigger(1)
    assert c.read(o + P.PCI_MSI_PENDING_64, 4) == 0b0010
    c.write(o + P.PCI_MSI_MASK_64, 4, 0)
    assert sink.sent[-1] == MsiMessage(0xFEE00000, 0x41)
    assert c.read(o + P.PCI_MSI_PENDING_64, 4) == 0


def test_msix_table_masking_pba_and_function_mask() -> None:
    c, sink = cfg(), RecordingMsiSink()
    x = MsixCapability(c, sink, vectors=3, bar=1)
    x.write(0x10, 4, 0xFEE00000)
    x.write(0x18, 4, 0x51)
    c.write(x.off + P.PCI_MSIX_FLAGS, 2, P.PCI_MSIX_FLAGS_ENABLE)
    assert not x.trigger(1)  # entries start masked
    assert x.read(x.pba_offset, 8) == 0b010
    x.write(0x1C, 4, 0)  # unmask entry 1
    assert sink.sent == [MsiMessage(0xFEE00000, 0x51)] and x.read(x.pba_offset, 8) == 0
    c.write(x.off + P.PCI_MSIX_FLAGS, 2, P.PCI_MSIX_FLAGS_ENABLE | P.PCI_MSIX_FLAGS_MASKALL)
    assert not x.trigger(1)
    c.write(x.off + P.PCI_MSIX_FLAGS, 2, P.PCI_MSIX_FLAGS_ENABLE)
    assert len(sink.sent) == 2
    assert not x.trigger(7)  # no such vector


@pytest.mark.parametrize("offset,size", [(3 * 16, 4), (1, 4), (2, 2), (0x800, 4)])
def test_msix_bad_accesses_are_ignored_and_counted(offset: int, size: int) -> None:
    c = cfg()
    x = MsixCapability(c, RecordingMsiSink(), vectors=3, bar=1)
    before = bytes(x.table)
    x.write(offset, size, 0xFFFFFFFF)
    assert bytes(x.table) == before and x.bad_accesses == 1


def test_msix_pba_is_read_only() -> None:
    x = MsixCapability(cfg(), RecordingMsiSink(), vectors=3, bar=1)
    x.write(x.pba_offset, 8, 0xFF)
    assert x.read(x.pba_offset, 8) == 0


@settings(max_examples=150)
@given(st.lists(st.tuples(st.integers(0, 0x103), st.sampled_from([1, 2, 3, 4, 8]),
                          st.integers(0, 0xFFFFFFFF)), max_size=120))
def test_random_config_writes_keep_invariants(ops: list[tuple[int, int, int]]) -> None:
    c, sink = cfg(), RecordingMsiSink()
    c.add_bar(0, 0x1000)
    c.add_bar(2, 0x100, is_io=True)
    c.add_bar(4, 1 << 20, is_64bit=True)
    msi = MsiCapability(c, sink)
    msix = MsixCapability(c, sink, vectors=4, bar=0, table_offset=0x800)
    for off, size, value in ops:
        for ch in c.write(off, size, value):
            if ch.new is not None:
                assert ch.new % ch.size == 0  # BARs stay naturally aligned
        msi.trigger(0)
        msix.trigger(off % 5)
    assert c.read(0, 4) == 0x56781234
    assert c.read(0x10, 4) & 0xFFF == 0
    assert c.read(0x18, 4) & 0x3 == 1
    assert len(c.data) == 256
