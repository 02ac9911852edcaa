"""Guest RAM: memfd-backed, mmap'd, shareable with other processes, bounds-checked."""

from pyvmm.memory.guest_memory import GuestMemory, GuestRegion

__all__ = ["GuestMemory", "GuestRegion"]
