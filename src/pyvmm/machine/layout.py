"""The x86 machine map in one table: every port range, MMIO window, boot structure
and GSI pyvmm uses. Devices and loaders take their addresses from here, and
``pyvmm info --machine`` prints it.
"""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1 << 20
GiB = 1 << 30


@dataclass(frozen=True, slots=True)
class MapEntry:
    name: str
    space: str  # "pio", "mmio", "ram" (boot structures in RAM)
    base: int
    size: int
    gsi: int | None = None
    what: str = ""


# --- boot structures in low RAM (below the 1 MiB image area) ---------------------------
BOOT_GDT = 0x500
PVH_START_INFO = 0x6000
PVH_MEMMAP = 0x6100
MULTIBOOT_INFO = 0x6800
MULTIBOOT_MMAP = 0x6900
CMDLINE = 0x7000
CMDLINE_MAX = 0x1000
IDENTITY_PML4 = 0x9000  # + PDPT + 4 PDs = 0x9000..0xEFFF
KERNEL_DEFAULT_LOAD = 0x100000
# KVM needs three pages for the real-mode TSS (VMX only; harmless elsewhere).
KVM_TSS_ADDR = 0xFFFBD000

# --- RAM ---------------------------------------------------------------------------------
PCI_HOLE_START = 0xC0000000  # RAM above this is remapped above 4 GiB
RAM_ABOVE_4G = 1 << 32
HIGH_MEMORY_START = 0x100000

# --- the legacy VGA window (decoded by a display when one is configured) -----------------
VGA_WINDOW_BASE, VGA_WINDOW_SIZE = 0xA0000, 0x20000  # 0xA0000-0xBFFFF

# --- devices -----------------------------------------------------------------------------
COM1_BASE, COM1_GSI = 0x3F8, 4
I8042_DATA_PORT, I8042_STATUS_PORT = 0x60, 0x64
I8042_KBD_GSI, I8042_AUX_GSI = 1, 12  # ISA IRQ 1 (keyboard) and IRQ 12 (PS/2 mouse)
DEBUG_EXIT_BASE = 0xF4
POST_PORT = 0x80
TESTDEV_MMIO = 0xFEF00000
PIC_MASTER, PIC_SLAVE, ELCR = 0x20, 0xA0, 0x4D0
PIT_BASE, PORT61 = 0x40, 0x61
RTC_BASE, RTC_GSI = 0x70, 8
IOAPIC_BASE = 0xFEC00000
LAPIC_BASE = 0xFEE00000
ACPI_BASE, ACPI_SIZE = 0xE0000, 0x10000  # in the e820-reserved BIOS area
VIRTIO_MMIO_BASE, VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_SLOTS = 0xFEB00000, 0x1000, 4
VIRTIO_MMIO_GSI_BASE = 20  # GSIs 20-23 (16-19 are PCI INTx)
PCI_CONFIG_PORT = 0xCF8  # CONFIG_ADDRESS 0xCF8, CONFIG_DATA 0xCFC-0xCFF
PCI_ECAM_BASE, PCI_ECAM_SIZE = 0xB0000000, 1 << 20  # bus 0 only
# The 32-bit BAR window ends where the virtio-mmio slots begin: the window the DSDT
# declares for the host bridge must not contain another device's registers.
PCI_MEM_BASE, PCI_MEM_SIZE = 0xC0000000, VIRTIO_MMIO_BASE - 0xC0000000
PCI_IO_BASE, PCI_IO_SIZE = 0xC000, 0x4000
PCI_HOST_BRIDGE_SLOT = 0
PCI_TESTDEV_SLOT = 1
PCI_FIRST_FREE_SLOT = 2

MACHINE_MAP: tuple[MapEntry, ...] = (
    MapEntry("boot-gdt", "ram", BOOT_GDT, 0x20, what="GDT for the kernel's entry"),
    MapEntry("pvh-start-info", "ram", PVH_START_INFO, 0x100, what="struct hvm_start_info"),
    MapEntry("pvh-memmap", "ram", PVH_MEMMAP, 0x700, what="PVH e820 table"),
    MapEntry("multiboot-info", "ram", MULTIBOOT_INFO, 0x100, what="struct multiboot_info"),
    MapEntry("multiboot-mmap", "ram", MULTIBOOT_MMAP, 0x700, what="multiboot memory map"),
    MapEntry("cmdline", "ram", CMDLINE, CMDLINE_MAX, what="kernel command line"),
    MapEntry("identity-pt", "ram", IDENTITY_PML4, 0x6000, what="page tables, 64-bit start"),
    MapEntry("acpi", "ram", ACPI_BASE, ACPI_SIZE, what="RSDP, XSDT, FADT, MADT, MCFG, DSDT"),
    MapEntry("kernel", "ram", KERNEL_DEFAULT_LOAD, 0, what="kernel image (ELF p_paddr)"),
    MapEntry("i8042", "pio", I8042_DATA_PORT, 1, gsi=I8042_KBD_GSI,
             what="keyboard controller data (PS/2 keyboard IRQ 1)"),
    MapEntry("i8042", "pio", I8042_STATUS_PORT, 1, gsi=I8042_AUX_GSI,
             what="keyboard controller status/cmd (PS/2 mouse IRQ 12)"),
    MapEntry("post", "pio", POST_PORT, 1, what="POST code sink (I/O delay port)"),
    MapEntry("pic-master", "pio", PIC_MASTER, 2, what="8259A master (split chip; else KVM)"),
    MapEntry("pic-slave", "pio", PIC_SLAVE, 2, what="8259A slave (split chip; else KVM)"),
    MapEntry("elcr", "pio", ELCR, 2, what="edge/level control (split chip; else KVM)"),
    MapEntry("pit", "pio", PIT_BASE, 4, gsi=0, what="8254 PIT (split chip; else KVM's)"),
    MapEntry("port61", "pio", PORT61, 1, what="system control port B (PIT gate 2)"),
    MapEntry("rtc", "pio", RTC_BASE, 2, gsi=RTC_GSI, what="MC146818 RTC + CMOS"),
    MapEntry("ioapic", "mmio", IOAPIC_BASE, 0x100, what="82093AA IOAPIC (split; else KVM)"),
    MapEntry("lapic", "mmio", LAPIC_BASE, 0x1000, what="local APIC (always in KVM)"),
    *(MapEntry(f"virtio-mmio{i}", "mmio", VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SLOT_SIZE,
               VIRTIO_MMIO_SLOT_SIZE, gsi=VIRTIO_MMIO_GSI_BASE + i,
               what="virtio-mmio slot (ACPI LNRO0005)") for i in range(VIRTIO_MMIO_SLOTS)),
    MapEntry("debug-exit", "pio", DEBUG_EXIT_BASE, 4, what="isa-debug-exit compatible"),
    MapEntry("serial0", "pio", COM1_BASE, 8, gsi=COM1_GSI, what="16550A UART (COM1)"),
    MapEntry("pci-config", "pio", PCI_CONFIG_PORT, 8, what="PCI CONFIG_ADDRESS/CONFIG_DATA"),
    MapEntry("pci-io", "pio", PCI_IO_BASE, PCI_IO_SIZE, what="PCI I/O BAR window"),
    MapEntry("pci-ecam", "mmio", PCI_ECAM_BASE, PCI_ECAM_SIZE, what="PCIe ECAM, bus 0"),
    MapEntry("pci-mem", "mmio", PCI_MEM_BASE, PCI_MEM_SIZE, what="PCI memory BAR window"),
    MapEntry("testdev", "mmio", TESTDEV_MMIO, 0x1000, what="pyvmm test register"),
)


def virtio_mmio_slots() -> list[tuple[int, int]]:
    """(base, GSI) of each virtio-mmio slot, as the DSDT describes them."""
    return [(VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SLOT_SIZE, VIRTIO_MMIO_GSI_BASE + i)
            for i in range(VIRTIO_MMIO_SLOTS)]


def ram_layout(size: int, holes: tuple[tuple[int, int], ...] = ()) -> list[tuple[int, int]]:
    """(guest address, size) of RAM regions for ``size`` bytes of guest memory.

    ``holes`` are (base, size) ranges below 1 MiB that a configured device decodes
    itself and that must not be RAM (KVM memslots cannot overlap): the VGA window
    0xA0000-0xBFFFF when a display is configured. They lie in the e820-reserved legacy
    area, so no guest was told it is RAM; without a display that area stays RAM, as
    before (one memslot)."""
    low = min(size, PCI_HOLE_START)
    regions: list[tuple[int, int]] = []
    at = 0
    for base, n in sorted(holes):
        if not (at <= base and base + n <= HIGH_MEMORY_START < low):
            raise ValueError(f"RAM hole {base:#x}+{n:#x} is not below 1 MiB or overlaps")
        if base > at:
            regions.append((at, base - at))
        at = base + n
    regions.append((at, low - at))
    if size > PCI_HOLE_START:
        regions.append((RAM_ABOVE_4G, size - PCI_HOLE_START))
    return regions
