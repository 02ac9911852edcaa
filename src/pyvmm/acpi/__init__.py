"""ACPI tables generated in Python (ACPI 6.x): what a guest OS needs to find the
interrupt controllers, the PCI root with its ECAM window, the legacy devices and the
virtio-mmio slots."""
