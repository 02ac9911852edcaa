"""The machine's PCI topology: built the same way for a running VM and for
``pyvmm info``, so what the guest enumerates is what ``info`` prints."""

from __future__ import annotations

from collections.abc import Sequence

from pyvmm.bus import Bus
from pyvmm.devices.assigned.shmem import BarMapper
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.devices.pci.host_bridge import HostBridge
from pyvmm.devices.pci.root import ConfigAddressPort, Ecam, PCIRoot, Window
from pyvmm.devices.pci.testdev import PciTestDev
from pyvmm.irq.msi import MsiSink
from pyvmm.machine import layout as L
from pyvmm.memory import GuestMemory
from pyvmm.uapi import pci as P


def build_pci(pio: Bus, mmio: Bus, mem: GuestMemory, msi: MsiSink,
              testdev: bool = True, extra: Sequence[PCIDevice] = (),
              bar_mapper: BarMapper | None = None) -> PCIRoot:
    """Host bridge at 00:00.0, the test device at 00:01.0, ``extra`` from 00:02.0 on.
    ``bar_mapper`` maps shared-memory BARs into the guest (KVM memslots in a VM)."""
    root = PCIRoot(pio, mmio, Window(L.PCI_MEM_BASE, L.PCI_MEM_SIZE),
                   Window(L.PCI_IO_BASE, L.PCI_IO_SIZE))
    pio.insert(ConfigAddressPort(root), L.PCI_CONFIG_PORT, 8, "pci-config")
    mmio.insert(Ecam(root), L.PCI_ECAM_BASE, L.PCI_ECAM_SIZE, "pci-ecam")
    root.add(HostBridge(), L.PCI_HOST_BRIDGE_SLOT)
    if testdev:
        root.add(PciTestDev(mem, msi, bar_mapper), L.PCI_TESTDEV_SLOT)
    for i, dev in enumerate(extra):
        root.add(dev, L.PCI_FIRST_FREE_SLOT + i)
    root.assign_bars()
    return root


def describe(root: PCIRoot) -> list[str]:
    """One line per function, the format the pci_enum guest prints."""
    lines = []
    for (bus, slot, fn), dev in root.functions():
        c = dev.config
        cls = int.from_bytes(c.data[P.PCI_CLASS_PROG:P.PCI_CLASS_PROG + 3], "little")
        bars = []
        for bar in c.bars:
            if bar is None:
                continue
            kind = "io" if bar.is_io else ("mem64" if bar.is_64bit else "mem")
            bars.append(f"bar{bar.index}={kind}:{c.bar_address(bar.index):#x}+{bar.size:#x}")
        pin = c.data[P.PCI_INTERRUPT_PIN]
        irq = f" intx={'ABCD'[pin - 1]}:gsi{c.data[P.PCI_INTERRUPT_LINE]}" if pin else ""
        lines.append(f"pci {bus:02x}:{slot:02x}.{fn} {c.get16(0):04x}:{c.get16(2):04x} "
                     f"class={cls:06x}{irq} {' '.join(bars)}".rstrip())
    return lines
