"""Guest RAM: memfd-backed, mmap'd, shareable with other processes, bounds-checked;
and device memory whose guest writes the host learns from a dirty log."""

from pyvmm.memory.guest_memory import GuestMemory, GuestRegion, check_mappable, sealed_memfd
from pyvmm.memory.tracked import DirtyLogMapper, TrackedMemory

__all__ = ["DirtyLogMapper", "GuestMemory", "GuestRegion", "TrackedMemory", "check_mappable",
           "sealed_memfd"]
