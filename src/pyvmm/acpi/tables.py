"""RSDP, XSDT, FADT, MADT, MCFG and DSDT for pyvmm's machine (ACPI 6.5 §5).

Every address and interrupt comes from ``pyvmm.machine.layout``, so the tables and
the devices the VMM actually placed cannot disagree (a test compares them). The FADT
declares a hardware-reduced platform (as Firecracker and Cloud Hypervisor do: no
PM1 blocks, no SCI) whose reset register is the i8042's command port (0x64 <- 0xFE).
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

from pyvmm.acpi import aml
from pyvmm.machine import layout as L

OEM_ID = b"PYVMM "
OEM_TABLE_ID = b"PYVMMACP"
CREATOR_ID = b"PYVM"
SDT_HEADER_LEN = 36

MADT_LOCAL_APIC, MADT_IO_APIC, MADT_INT_SRC_OVR, MADT_LOCAL_APIC_NMI = 0, 1, 2, 4
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_HW_REDUCED_ACPI = 1 << 20
IAPC_BOOT_ARCH_LEGACY_DEVICES = 1 << 0
IAPC_BOOT_ARCH_8042 = 1 << 1
GAS_SYSTEM_IO = 1


def checksum(data: bytes) -> int:
    return (-sum(data)) & 0xFF


def sdt(signature: bytes, revision: int, body: bytes) -> bytes:
    length = SDT_HEADER_LEN + len(body)
    hdr = struct.pack("<4sIBB6s8sI4sI", signature, length, revision, 0, OEM_ID, OEM_TABLE_ID,
                      1, CREATOR_ID, 1)
    table = bytearray(hdr + body)
    table[9] = checksum(bytes(table))
    return bytes(table)


def gas(space: int, bit_width: int, address: int, access_size: int = 1) -> bytes:
    """Generic Address Structure (§5.2.3.2)."""
    return struct.pack("<BBBBQ", space, bit_width, 0, access_size, address)


def fadt(dsdt_addr: int) -> bytes:
    body = bytearray(276 - SDT_HEADER_LEN)

    def put(off: int, fmt: str, *v: int) -> None:
        struct.pack_into(fmt, body, off - SDT_HEADER_LEN, *v)

    put(40, "<I", dsdt_addr)  # DSDT (32-bit)
    put(109, "<H", IAPC_BOOT_ARCH_LEGACY_DEVICES | IAPC_BOOT_ARCH_8042)
    put(112, "<I", FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP)
    body[116 - SDT_HEADER_LEN:128 - SDT_HEADER_LEN] = gas(GAS_SYSTEM_IO, 8, L.I8042_STATUS_PORT)
    put(128, "<B", 0xFE)  # RESET_VALUE: the i8042 pulse-reset command
    put(131, "<B", 5)  # FADT minor version (6.5)
    put(140, "<Q", dsdt_addr)  # X_DSDT
    return sdt(b"FACP", 6, bytes(body))


def madt() -> bytes:
    body = struct.pack("<II", L.LAPIC_BASE, 1)  # PCAT_COMPAT: the 8259s are present
    body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, 0, 0, 1)  # CPU 0, APIC ID 0, enabled
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, 0, 0, L.IOAPIC_BASE, 0)
    # ISA IRQ 0 (the PIT) arrives on IOAPIC pin 2, as on every PC and in both irqchips.
    body += struct.pack("<BBBBIH", MADT_INT_SRC_OVR, 10, 0, 0, 2, 0)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, 0xFF, 0, 1)  # LINT1 is NMI
    return sdt(b"APIC", 6, body)


def mcfg() -> bytes:
    end_bus = (L.PCI_ECAM_SIZE >> 20) - 1
    body = bytes(8) + struct.pack("<QHBBI", L.PCI_ECAM_BASE, 0, 0, end_bus, 0)
    return sdt(b"MCFG", 1, body)


def dsdt(mmio_slots: Sequence[tuple[int, int]] = ()) -> bytes:
    pci_crs = aml.resource_template(
        aml.word_bus_number(0, (L.PCI_ECAM_SIZE >> 20) - 1),
        aml.io_port(L.PCI_CONFIG_PORT, 8),
        aml.word_io(0x0000, 0x0CF7),
        aml.word_io(L.PCI_IO_BASE, L.PCI_IO_BASE + L.PCI_IO_SIZE - 1),
        aml.dword_memory(L.PCI_MEM_BASE, L.PCI_MEM_BASE + L.PCI_MEM_SIZE - 1),
    )
    pci0 = aml.device(
        "PCI0",
        aml.name("_HID", aml.eisa_id("PNP0A08")),
        aml.name("_CID", aml.eisa_id("PNP0A03")),
        aml.name("_ADR", aml.integer(0)),
        aml.name("_SEG", aml.integer(0)),
        aml.name("_UID", aml.integer(0)),
        aml.name("_BBN", aml.integer(0)),
        aml.name("_CRS", pci_crs),
    )
    com1 = aml.device(
        "COM1",
        aml.name("_HID", aml.eisa_id("PNP0501")),
        aml.name("_UID", aml.integer(1)),
        aml.name("_CRS", aml.resource_template(aml.io_port(L.COM1_BASE, 8),
                                               aml.irq_no_flags(L.COM1_GSI))),
    )
    rtc = aml.device(
        "RTC",
        aml.name("_HID", aml.eisa_id("PNP0B00")),
        aml.name("_CRS", aml.resource_template(aml.io_port(L.RTC_BASE, 2),
                                               aml.irq_no_flags(L.RTC_GSI))),
    )
    kbd = aml.device(
        "KBD",
        aml.name("_HID", aml.eisa_id("PNP0303")),
        aml.name("_CRS", aml.resource_template(aml.io_port(L.I8042_DATA_PORT, 1),
                                               aml.io_port(L.I8042_STATUS_PORT, 1),
                                               aml.irq_no_flags(L.I8042_KBD_GSI))),
    )
    # The mouse port: without it Linux's i8042 PNP probe takes the aux port as absent.
    mouse = aml.device(
        "PS2M",
        aml.name("_HID", aml.eisa_id("PNP0F13")),
        aml.name("_CRS", aml.resource_template(aml.irq_no_flags(L.I8042_AUX_GSI))),
    )
    virtio = [
        aml.device(
            f"VR{i:02X}",
            aml.name("_HID", aml.string("LNRO0005")),  # virtio-mmio, as Linux matches it
            aml.name("_UID", aml.integer(i)),
            aml.name("_CRS", aml.resource_template(
                aml.memory32_fixed(base, L.VIRTIO_MMIO_SLOT_SIZE),
                aml.extended_interrupt(gsi))),
        )
        for i, (base, gsi) in enumerate(mmio_slots)
    ]
    return sdt(b"DSDT", 2, aml.scope("\\_SB", pci0, com1, rtc, kbd, mouse, *virtio))


@dataclass(frozen=True)
class AcpiTables:
    rsdp_addr: int
    blobs: dict[str, tuple[int, bytes]]  # signature -> (guest address, bytes)


def build(base: int = L.ACPI_BASE, mmio_slots: Sequence[tuple[int, int]] = ()) -> AcpiTables:
    """Lay the tables out from ``base`` (RSDP first, 16-byte aligned, as guests scan
    0xE0000-0xFFFFF for it) and return them with their addresses. ``mmio_slots`` are the
    (base, GSI) of the virtio-mmio devices the machine has: the DSDT describes exactly
    those."""
    blobs: dict[str, tuple[int, bytes]] = {}
    addr = base + 64  # after the 36-byte RSDP

    def place(sig: str, data: bytes) -> int:
        nonlocal addr
        a = addr
        blobs[sig] = (a, data)
        addr = (addr + len(data) + 15) & ~15
        return a

    d = place("DSDT", dsdt(mmio_slots))
    f = place("FACP", fadt(d))
    m = place("APIC", madt())
    c = place("MCFG", mcfg())
    xsdt = sdt(b"XSDT", 1, struct.pack("<3Q", f, m, c))
    x = place("XSDT", xsdt)
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3s", b"RSD PTR ", 0, OEM_ID, 2, 0, 36, x, 0,
                                 bytes(3)))
    rsdp[8] = checksum(bytes(rsdp[:20]))
    rsdp[32] = checksum(bytes(rsdp))
    blobs["RSDP"] = (base, bytes(rsdp))
    if addr > base + L.ACPI_SIZE:
        raise ValueError("ACPI tables outgrew their area")
    return AcpiTables(base, blobs)
