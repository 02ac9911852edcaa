"""Guest RAM: memfd-backed, mmap'd, shareable with other processes, bounds-checked."""

from pyvmm.memory.guest_memory import GuestMemory, GuestRegion, check_mappable, sealed_memfd

__all__ = ["GuestMemory", "GuestRegion", "check_mappable", "sealed_memfd"]
