"""Kernel loading: PVH ELF, multiboot v1, flat binaries; entry CPU state; e820."""

from pyvmm.loader.image import BootImage, EntryMode, load_kernel

__all__ = ["BootImage", "EntryMode", "load_kernel"]
