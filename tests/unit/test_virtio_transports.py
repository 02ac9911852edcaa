"""virtio-pci and virtio-mmio register interfaces, driven as a driver would, plus the
malformed accesses a hostile driver can make."""

from __future__ import annotations

import struct

import pytest

from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.transport.mmio import VirtioMmioDevice
from pyvmm.devices.virtio.transport.pci import COMMON_OFF, ISR_OFF, NOTIFY_OFF, VirtioPciDevice
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.memory import GuestMemory
from pyvmm.testing import DriverQueue, RecordingLine
from pyvmm.uapi import pci as P
from pyvmm.uapi import virtio as V


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory([(0, 4 << 20)])
    yield m  # type: ignore[misc]
    m.close()


def pci_bringup(dev: VirtioPciDevice, dq: DriverQueue, msix: bool) -> None:
    w = dev.write_bar
    w(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_STATUS, 1, 3)
    w(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_GFSELECT, 4, 1)
    w(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_GF, 4, 1)
    w(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_STATUS, 1, 11)
    w(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    w(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_Q_SIZE, 2, dq.size)
    for off, val in ((V.VIRTIO_PCI_COMMON_Q_DESCLO, dq.desc),
                     (V.VIRTIO_PCI_COMMON_Q_AVAILLO, dq.avail),
                     (V.VIRTIO_PCI_COMMON_Q_USEDLO, dq.used)):
        w(0, COMMON_OFF + off, 4, val)
    if msix:
        w(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_Q_MSIX, 2, 0)
        dev.msix.write(0, 4, 0xFEE00000)
        dev.msix.write(8, 4, 0x45)
        dev.msix.write(12, 4, 0)
        dev.config.write(dev.msix.off + 2, 2, P.PCI_MSIX_FLAGS_ENABLE)
    w(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_Q_ENABLE, 2, 1)
    w(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_STATUS, 1, 15)


def test_pci_ids_and_capabilities(mem: GuestMemory) -> None:
    dev = VirtioPciDevice(VirtioRng(), mem, RecordingMsiSink())
    c = dev.config
    assert (c.get16(0), c.get16(2)) == (0x1AF4, 0x1044)
    p, types = c.data[P.PCI_CAPABILITY_LIST], []
    while p:
        if c.data[p] == P.PCI_CAP_ID_VNDR:
            types.append(c.data[p + 3])
        p = c.data[p + 1]
    assert sorted(types) == [1, 2, 3, 4, 5]


def _find_cap(dev: VirtioPciDevice, cfg_type: int) -> int:
    c, p = dev.config, dev.config.data[P.PCI_CAPABILITY_LIST]
    while p:
        if c.data[p] == P.PCI_CAP_ID_VNDR and c.data[p + 3] == cfg_type:
            return p
        p = c.data[p + 1]
    raise AssertionError("no such capability")


def test_pci_cfg_access_capability_reaches_the_bars(mem: GuestMemory) -> None:
    """The driver points the window at BAR 0's common config and reads/writes it
    through pci_cfg_data; a broken window (length 3, BAR 5) reads 0 and does nothing."""
    dev = VirtioPciDevice(VirtioRng(), mem, RecordingMsiSink())
    cap = _find_cap(dev, V.VIRTIO_PCI_CAP_PCI_CFG)
    data = cap + 16
    dev.config_write(cap + 4, 1, 0)  # bar
    dev.config_write(cap + 8, 4, COMMON_OFF + V.VIRTIO_PCI_COMMON_NUMQ)
    dev.config_write(cap + 12, 4, 2)
    assert dev.config_read(data, 2) == 1  # one queue
    dev.config_write(cap + 8, 4, COMMON_OFF + V.VIRTIO_PCI_COMMON_STATUS)
    dev.config_write(cap + 12, 4, 1)
    dev.config_write(data, 1, 3)  # ACKNOWLEDGE | DRIVER through config space
    assert dev.core.status == 3
    assert dev.config_read(cap + 8, 4) == COMMON_OFF + V.VIRTIO_PCI_COMMON_STATUS  # fields
    dev.config_write(cap + 12, 4, 3)
    assert dev.config_read(data, 4) == 0 and dev.bad_accesses == 1
    dev.config_write(cap + 12, 4, 1)
    dev.config_write(cap + 4, 1, 5)
    dev.config_write(data, 1, 0)  # would reset the device if it reached BAR 0
    assert dev.core.status == 3 and dev.bad_accesses == 2


@pytest.mark.parametrize("msix", [False, True])
def test_pci_request_with_msix_or_intx(mem: GuestMemory, msix: bool) -> None:
    sink = RecordingMsiSink()
    dev = VirtioPciDevice(VirtioRng(), mem, sink)
    line = RecordingLine()
    dev.intx = line
    dq = DriverQueue(mem, size=8)
    pci_bringup(dev, dq, msix)
    assert dev.core.active
    dq.add([(dq.alloc(32), 32, True)])
    dev.write_bar(0, NOTIFY_OFF, 2, 0)
    assert dq.take_used()[0][1] == 32
    if msix:
        assert sink.sent and sink.sent[0].data == 0x45 and not line.level
    else:
        assert line.level and dev.read_bar(0, ISR_OFF, 1) == 1
        assert not line.level and dev.read_bar(0, ISR_OFF, 1) == 0


def test_pci_malformed_register_accesses(mem: GuestMemory) -> None:
    dev = VirtioPciDevice(VirtioRng(), mem, RecordingMsiSink())
    dq = DriverQueue(mem, size=8)
    dev.write_bar(0, COMMON_OFF + 0x13, 1, 0xFF)  # middle of a field
    assert dev.read_bar(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_DF, 2) == 0  # wrong width
    dev.write_bar(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 9)
    assert dev.read_bar(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_Q_SIZE, 2) == 0  # no such queue
    dev.write_bar(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_Q_SELECT, 2, 0)
    pci_bringup(dev, dq, msix=False)
    dev.write_bar(0, COMMON_OFF + V.VIRTIO_PCI_COMMON_Q_DESCLO, 4, 0x123)  # after DRIVER_OK
    assert dev.core.queues[0].desc == dq.desc
    assert dev.bad_accesses == 3
    dev.write_bar(0, NOTIFY_OFF + 4 * 7, 2, 7)  # notify for a queue that does not exist
    assert dev.core.ignored_notifications == 1 and dev.core.active


def mmio_bringup(dev: VirtioMmioDevice, dq: DriverQueue) -> None:
    w = dev.write
    w(0, V.VIRTIO_MMIO_STATUS, 4, 3)
    w(0, V.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 4, 1)
    w(0, V.VIRTIO_MMIO_DRIVER_FEATURES, 4, 1)
    w(0, V.VIRTIO_MMIO_STATUS, 4, 11)
    w(0, V.VIRTIO_MMIO_QUEUE_SEL, 4, 0)
    w(0, V.VIRTIO_MMIO_QUEUE_NUM, 4, dq.size)
    w(0, V.VIRTIO_MMIO_QUEUE_DESC_LOW, 4, dq.desc)
    w(0, V.VIRTIO_MMIO_QUEUE_AVAIL_LOW, 4, dq.avail)
    w(0, V.VIRTIO_MMIO_QUEUE_USED_LOW, 4, dq.used)
    w(0, V.VIRTIO_MMIO_QUEUE_READY, 4, 1)
    w(0, V.VIRTIO_MMIO_STATUS, 4, 15)


def test_mmio_identity_request_and_interrupt_ack(mem: GuestMemory) -> None:
    line = RecordingLine()
    dev = VirtioMmioDevice(VirtioRng(), mem, line)
    r = dev.read
    assert (r(0, 0, 4), r(0, 4, 4), r(0, 8, 4)) == (V.VIRTIO_MMIO_MAGIC, 2, V.VIRTIO_ID_RNG)
    assert r(0, V.VIRTIO_MMIO_QUEUE_NUM_MAX, 4) == 256
    dq = DriverQueue(mem, size=8)
    mmio_bringup(dev, dq)
    assert dev.core.active
    dq.add([(dq.alloc(16), 16, True)])
    dev.write(0, V.VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0)
    assert dq.take_used() == [(0, 16)]
    assert line.level and r(0, V.VIRTIO_MMIO_INTERRUPT_STATUS, 4) == V.VIRTIO_MMIO_INT_VRING
    dev.write(0, V.VIRTIO_MMIO_INTERRUPT_ACK, 4, V.VIRTIO_MMIO_INT_VRING)
    assert not line.level


def test_mmio_malformed_accesses(mem: GuestMemory) -> None:
    dev = VirtioMmioDevice(VirtioRng(), mem, RecordingLine())
    assert dev.read(0, 0x004, 2) == 0  # narrow
    dev.write(0, 0x0F0, 4, 1)  # no register there
    assert dev.read(0, 0x0F8, 4) == 0
    dq = DriverQueue(mem, size=8)
    mmio_bringup(dev, dq)
    dev.write(0, V.VIRTIO_MMIO_QUEUE_DESC_LOW, 4, 0x40)  # after DRIVER_OK
    assert dev.core.queues[0].desc == dq.desc and dev.bad_accesses == 4
    dev.write(0, V.VIRTIO_MMIO_QUEUE_NOTIFY, 4, 0xFFFF)  # no such queue
    assert dev.core.ignored_notifications == 1 and dev.core.active
    # status cleared without reset is ignored; reset (0) really resets
    dev.write(0, V.VIRTIO_MMIO_STATUS, 4, 1)
    assert dev.core.status & V.VIRTIO_CONFIG_S_DRIVER_OK
    dev.write(0, V.VIRTIO_MMIO_STATUS, 4, 0)
    assert dev.core.status == 0 and not dev.core.active
    assert struct.unpack("<H", mem.read(dq.used + 2, 2))[0] == 0
