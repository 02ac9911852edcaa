"""The host bridge at 00:00.0: present so enumeration finds a root, otherwise inert."""

from __future__ import annotations

from pyvmm.devices.pci.config_space import PCIConfigSpace
from pyvmm.devices.pci.device import PCIDevice

# Red Hat / QEMU "PCIe host bridge" IDs (gpex), class 06 00 00 (host bridge):
# a generic bridge no guest driver special-cases.
HOST_BRIDGE_VENDOR = 0x1B36
HOST_BRIDGE_DEVICE = 0x0008


class HostBridge(PCIDevice):
    name = "host-bridge"

    def __init__(self) -> None:
        super().__init__()
        self.config = PCIConfigSpace(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, 0x060000)
