"""The IDE function in native-PCI mode (``native=on``): both channels in I/O BARs 0-3,
the Control Block register at offset 2 of BAR1/BAR3, one INTx pin for both channels
(their OR), the legacy ports silent. What Linux's libata needs to drive it by its BARs
(the e2e test binds ata_piix to it over vfio-user); and the mode rules of the spec."""

from __future__ import annotations

import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pyvmm.backends.block import RawBlockBackend
from pyvmm.bus import IoBus, MmioBus
from pyvmm.devices.emulated.ide import spec as ide
from pyvmm.devices.emulated.ide.controller import MODEL, PiixIde
from pyvmm.devices.emulated.ide.disk import AtaDisk
from pyvmm.errors import ConfigError
from pyvmm.event import EventManager
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.machine.export import ExportContext
from pyvmm.machine.pci import build_pci
from pyvmm.memory import GuestMemory
from pyvmm.testing.lines import RecordingLine
from pyvmm.uapi import ata as A
from pyvmm.uapi import pci as P

MiB = 1 << 20


class Native:
    def __init__(self, mem: GuestMemory, images: list[Path]) -> None:
        self.ide = PiixIde(mem, None, native=True)
        self.backends = [RawBlockBackend(str(i)) for i in images]
        for bus, be in enumerate(self.backends):  # a disk on each channel, unit 0
            self.ide.attach(bus, 0, AtaDisk(be, 0, serial=f"N{bus}", model=MODEL,
                                            firmware="1", errors=self.ide.errors))
        self.pio, self.mmio = IoBus(), MmioBus()
        for r in ide.SPEC.isa:  # the builder still places them; they must stay silent
            self.pio.insert(self.ide, r.base, r.size, f"piix-ide.{r.name}")
        self.root = build_pci(self.pio, self.mmio, mem, RecordingMsiSink(), False, [self.ide])
        self.intx = RecordingLine()
        self.ide.intx = self.intx
        self.cmd = [self.ide.config.bar_address(2 * ch) for ch in range(2)]
        self.ctl = [self.ide.config.bar_address(2 * ch + 1) + A.PCI_IDE_CTL_OFFSET
                    for ch in range(2)]

    def close(self) -> None:
        for be in self.backends:
            be.close()


@pytest.fixture
def fn(tmp_path: Path) -> Iterator[Native]:
    images = [tmp_path / f"d{i}.img" for i in range(2)]
    for i in images:
        i.write_bytes(os.urandom(MiB))
    with GuestMemory([(0, 4 * MiB)]) as mem:
        n = Native(mem, images)
        yield n
        n.close()


def test_native_function_identity_and_bars(fn: Native) -> None:
    c = fn.ide.config
    assert c.data[P.PCI_CLASS_PROG:P.PCI_CLASS_PROG + 3] == bytes((0x85, 0x01, 0x01))
    assert c.data[P.PCI_INTERRUPT_PIN] == 1
    sizes = [(b.size, b.is_io) if b is not None else None for b in c.bars[:5]]
    assert sizes == [(8, True), (4, True), (8, True), (4, True), (16, True)]
    assert all(a >= 0x1000 for a in fn.cmd + fn.ctl)  # assigned in the PCI I/O window


def test_legacy_ports_are_silent_in_native_mode(fn: Native) -> None:
    for port in (0x1F7, 0x3F6, 0x177, 0x376):
        assert fn.pio.read(port, 1) == 0xFF
    fn.pio.write(0x1F7, 1, A.ATA_CMD_ID_ATA)  # ignored: no command, no interrupt
    assert not fn.intx.history and fn.pio.read(fn.cmd[0] + 7, 1) == A.ATA_DRDY


def test_both_channels_by_bars_share_one_intx(fn: Native) -> None:
    pio = fn.pio
    for ch in range(2):
        pio.write(fn.cmd[ch] + 6, 1, A.ATA_LBA)
        pio.write(fn.cmd[ch] + 7, 1, A.ATA_CMD_ID_ATA)
    assert fn.intx.level and fn.intx.history == [True]  # one pin, the OR of two INTRQs
    assert pio.read(fn.ctl[0], 1) & A.ATA_DRQ  # alternate status: does not acknowledge
    words = [pio.read(fn.cmd[0], 2) for _ in range(256)]
    assert bytes(b for w in words[27:47] for b in struct.pack(">H", w)).rstrip() == \
        MODEL.encode()
    pio.read(fn.cmd[0] + 7, 1)  # status acknowledges channel 0 ...
    assert fn.intx.level  # ... channel 1 still pending
    pio.read(fn.cmd[1] + 7, 1)
    assert not fn.intx.level
    pio.write(fn.ctl[1], 1, A.ATA_NIEN)  # Device Control by BAR3 + 2
    pio.write(fn.cmd[1] + 7, 1, A.ATA_CMD_ID_ATA)
    assert not fn.intx.level
    assert pio.read(fn.ide.config.bar_address(1), 1) == 0xFF  # BAR1 + 0: nothing there


def test_mode_rules_of_the_spec(tmp_path: Path) -> None:
    image = tmp_path / "d.img"
    image.write_bytes(bytes(MiB))
    with GuestMemory([(0, MiB)]) as mem:
        ctx = ExportContext(ide.SPEC, mem, EventManager())
        with pytest.raises(ConfigError, match="native=on"):
            ide.create(ide.IdeConfig(path=str(image)), ctx)  # compatibility: not exportable
        fn = ide.create(ide.IdeConfig(path=str(image), native=True), ctx)
        ctx.attach(fn)
        assert fn.native
        with pytest.raises(ConfigError, match="one mode per function"):
            ide.create(ide.IdeConfig(path=str(image), bus=1), ctx)
        fn.close()
