"""The e820 memory map handed to guests (as PVH memmap or multiboot mmap)."""

from __future__ import annotations

from dataclasses import dataclass

E820_RAM = 1
E820_RESERVED = 2
E820_ACPI = 3

# The legacy hole below 1 MiB: EBDA, VGA, option ROMs and the BIOS are not RAM.
EBDA_START = 0x9FC00
HIGH_MEMORY = 0x100000


@dataclass(frozen=True, slots=True)
class E820Entry:
    addr: int
    size: int
    type: int


def e820_map(ram_size: int, below_4g_end: int = 0xC0000000) -> list[E820Entry]:
    """RAM from 0 to the EBDA, reserved to 1 MiB, RAM above; RAM past the 32-bit
    PCI hole is remapped above 4 GiB."""
    entries = [
        E820Entry(0, EBDA_START, E820_RAM),
        E820Entry(EBDA_START, HIGH_MEMORY - EBDA_START, E820_RESERVED),
    ]
    low_end = min(ram_size, below_4g_end)
    if low_end > HIGH_MEMORY:
        entries.append(E820Entry(HIGH_MEMORY, low_end - HIGH_MEMORY, E820_RAM))
    if ram_size > below_4g_end:
        entries.append(E820Entry(1 << 32, ram_size - below_4g_end, E820_RAM))
    return entries
