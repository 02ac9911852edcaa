"""The PCI root's CF8/CFC and ECAM front ends, BAR moves on the buses, garbage."""

from __future__ import annotations

import pytest

from pyvmm.bus import IoBus, MmioBus
from pyvmm.devices.pci.testdev import (
    DMA_CMD_START,
    REG_DMA_CMD,
    REG_DMA_DST,
    REG_DMA_LEN,
    REG_DMA_SRC,
    REG_DMA_SUM,
    REG_STATUS,
    STATUS_DMA_DONE,
    STATUS_DMA_ERROR,
    PciTestDev,
)
from pyvmm.irq.msi import MsiMessage, RecordingMsiSink
from pyvmm.irqchip.kernel import KernelIrqChip
from pyvmm.machine import layout as L
from pyvmm.machine.pci import build_pci, describe
from pyvmm.memory import GuestMemory
from pyvmm.uapi import pci as P


@pytest.fixture
def machine() -> tuple[IoBus, MmioBus, GuestMemory]:
    mem = GuestMemory([(0, 4 << 20)])
    yield IoBus(), MmioBus(), mem  # type: ignore[misc]
    mem.close()


def cf8(bus: IoBus, slot: int, reg: int) -> None:
    bus.write(0xCF8, 4, 0x80000000 | (slot << 11) | reg)


def test_cf8_cfc_reads_ids_and_absent_functions(machine: tuple[IoBus, MmioBus,
                                                                GuestMemory]) -> None:
    pio, mmio, mem = machine
    build_pci(pio, mmio, mem, RecordingMsiSink())
    cf8(pio, 1, 0)
    assert pio.read(0xCFC, 4) == 0x50501234
    assert pio.read(0xCFE, 2) == 0x5050  # word at byte 2 of the dword
    cf8(pio, 7, 0)
    assert pio.read(0xCFC, 4) == 0xFFFFFFFF  # no device: master abort
    pio.write(0xCF8, 4, 0x00000800)  # enable bit clear
    assert pio.read(0xCFC, 4) == 0xFFFFFFFF
    assert pio.read(0xCF8, 4) == 0x00000800


def test_ecam_matches_cf8(machine: tuple[IoBus, MmioBus, GuestMemory]) -> None:
    pio, mmio, mem = machine
    build_pci(pio, mmio, mem, RecordingMsiSink())
    for reg in range(0, 0x40, 4):
        cf8(pio, 1, reg)
        assert mmio.read(L.PCI_ECAM_BASE + (1 << 15) + reg, 4) == pio.read(0xCFC, 4)


def test_firmware_assignment_maps_bars_and_info_describes_them(
        machine: tuple[IoBus, MmioBus, GuestMemory]) -> None:
    pio, mmio, mem = machine
    root = build_pci(pio, mmio, mem, RecordingMsiSink())
    dev = root.devices[(0, 1, 0)]
    addr = dev.config.bar_address(0)
    assert mmio.read(addr, 4) == 0x5050ED01
    assert pio.find(dev.config.bar_address(2)) is not None
    lines = describe(root)
    assert lines[0].startswith("pci 00:00.0 1b36:0008 class=060000")
    assert "bar4=mem64:" in lines[1] and "intx=A:gsi17" in lines[1]


def test_bar_move_outside_window_or_overlapping_is_refused(
        machine: tuple[IoBus, MmioBus, GuestMemory]) -> None:
    pio, mmio, mem = machine
    root = build_pci(pio, mmio, mem, RecordingMsiSink())
    dev = root.devices[(0, 1, 0)]
    bar0 = dev.config.bar_address(0)
    root.config_write(0, 1, 0, 0x14, 4, bar0)  # BAR1 onto BAR0
    assert root.rejected_bars == 1 and mmio.read(bar0, 4) == 0x5050ED01
    root.config_write(0, 1, 0, 0x10, 4, 0xFEE00000)  # outside the window
    assert root.rejected_bars == 2 and mmio.find(0xFEE00000) is None
    root.config_write(0, 1, 0, 0x400, 4, 1)  # beyond config space
    assert root.bad_config_accesses == 1


def test_testdev_dma_is_bounds_checked(machine: tuple[IoBus, MmioBus, GuestMemory]) -> None:
    _, _, mem = machine
    d = PciTestDev(mem, RecordingMsiSink())
    d.config.write(P.PCI_COMMAND, 2, P.PCI_COMMAND_MASTER)
    mem.write(0x1000, bytes(range(16)))
    for off, v in ((REG_DMA_SRC, 0x1000), (REG_DMA_DST, 0x2000), (REG_DMA_LEN, 16)):
        d.write_bar(0, off, 4, v)
    d.write_bar(0, REG_DMA_CMD, 4, DMA_CMD_START)
    assert mem.read(0x2000, 16) == bytes(range(16))
    assert d.read_bar(0, REG_DMA_SUM, 4) == sum(range(16))
    assert d.read_bar(0, REG_STATUS, 4) & STATUS_DMA_DONE
    d.write_bar(0, REG_DMA_DST, 8, (4 << 20) - 8)  # runs off the end of RAM
    d.write_bar(0, REG_DMA_CMD, 4, DMA_CMD_START)
    assert d.read_bar(0, REG_STATUS, 4) & STATUS_DMA_ERROR
    d.write_bar(0, REG_DMA_LEN, 4, 0xFFFFFFFF)  # over the 1 MiB limit
    d.write_bar(0, REG_DMA_DST, 8, 0x2000)
    d.write_bar(0, REG_DMA_CMD, 4, DMA_CMD_START)
    assert d.read_bar(0, REG_STATUS, 4) & STATUS_DMA_ERROR


def test_kernel_chip_drops_msi_outside_lapic_window() -> None:
    class FakeVm:
        def __init__(self) -> None:
            self.sent: list[tuple[int, int]] = []

        def signal_msi(self, a: int, d: int) -> int:
            self.sent.append((a, d))
            return 1

    vm = FakeVm()
    chip = KernelIrqChip(vm)  # type: ignore[arg-type]
    chip.send_msi(MsiMessage(0x12345678, 0x41))
    chip.send_msi(MsiMessage(0xFEE00000, 0x41))
    assert vm.sent == [(0xFEE00000, 0x41)] and chip.msis_dropped == 1


def test_testdev_shared_bar_traps_when_nobody_maps_it() -> None:
    """Without a BarMapper (unit tests, ``pyvmm info``) BAR4 accesses arrive as BAR
    accesses and are served from the same shared memory, and counted."""
    from pyvmm.devices.pci.testdev import REG_SHM_FILL, REG_SHM_SUM, REG_SHM_TRAPS, PciTestDev
    from pyvmm.irq.msi import RecordingMsiSink
    from pyvmm.memory import GuestMemory

    with GuestMemory([(0, 2 << 20)]) as mem:
        dev = PciTestDev(mem, RecordingMsiSink())
        try:
            dev.write_bar(4, 0, 4, 0x01020304)
            dev.write_bar(4, 1 << 20, 4, 0xFF)  # past the end: ignored
            assert dev.read_bar(0, REG_SHM_SUM, 4) == 10
            assert dev.read_bar(4, 0, 2) == 0x0304
            assert dev.read_bar(0, REG_SHM_TRAPS, 4) == 3
            dev.write_bar(0, REG_SHM_FILL, 4, 2)
            assert dev.read_bar(4, 4092, 4) == 0x02020202
            assert dev.bar_memory(4) is not None and dev.bar_memory(0) is None
        finally:
            dev.close()


def test_shared_bar_the_host_cannot_map_traps_instead() -> None:
    """A guest that moves the shared BAR where the host refuses a mapping (onto RAM:
    KVM says EEXIST) gets a BAR that traps and still works; the failure is counted."""
    from pyvmm.devices.assigned.shmem import SharedMemoryBar
    from pyvmm.errors import KvmError

    class Refusing:
        def __init__(self) -> None:
            self.maps: list[int] = []

        def map(self, gpa: int, size: int, host_addr: int) -> object:
            if gpa < 1 << 30:
                raise KvmError("KVM_SET_USER_MEMORY_REGION", 17)
            self.maps.append(gpa)
            return gpa

        def unmap(self, handle: object) -> None:
            self.maps.remove(handle)  # type: ignore[arg-type]

    bar = SharedMemoryBar(1 << 20)
    try:
        bar.mapper = Refusing()
        bar.moved(0x1000_0000)  # over "RAM"
        assert bar.mapped_at is None and bar.map_failures == 1
        bar.write(8, 4, 0xDEADBEEF)
        assert bar.read(8, 4) == 0xDEADBEEF and bar.trapped == 2
        bar.moved(0xE000_0000)
        assert bar.mapped_at == 0xE000_0000 and bar.mapper.maps == [0xE000_0000]
        bar.moved(None)
        assert bar.mapper.maps == [] and bar.mapped_at is None
    finally:
        bar.close()


def test_a_moved_bar_keeps_its_accounting(machine: tuple[IoBus, MmioBus, GuestMemory]
                                          ) -> None:
    """Counts are per BAR (offsets are BAR-relative), so turning decoding off and on or
    moving the BAR must not lose what the exit table says about it."""
    pio, mmio, mem = machine
    root = build_pci(pio, mmio, mem, RecordingMsiSink())
    bar0 = root.devices[(0, 1, 0)].config.bar_address(0)
    assert mmio.read(bar0, 4) == 0x5050ED01
    root.config_write(0, 1, 0, P.PCI_COMMAND, 2, 0)  # decoding off
    root.config_write(0, 1, 0, 0x10, 4, bar0 + 0x100000)
    root.config_write(0, 1, 0, P.PCI_COMMAND, 2, P.PCI_COMMAND_MEMORY)
    assert mmio.read(bar0 + 0x100000, 4) == 0x5050ED01
    r = mmio.find(bar0 + 0x100000)
    assert r is not None and r.name == "pci-testdev.bar0" and r.reads == 2
    assert r.access_counts() == {("r", 0, 4): 2}
