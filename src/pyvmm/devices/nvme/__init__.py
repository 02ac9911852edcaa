"""NVMe controller: full emulation of a PCIe SSD (see controller.py)."""
