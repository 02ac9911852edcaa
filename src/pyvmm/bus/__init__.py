"""Address-range buses (PIO and MMIO) with per-device exit accounting."""

from pyvmm.bus.bus import Bus, BusDevice, BusRange, IoBus, MmioBus

__all__ = ["Bus", "BusDevice", "BusRange", "IoBus", "MmioBus"]
