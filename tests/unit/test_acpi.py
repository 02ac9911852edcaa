"""Generated ACPI tables: iasl disassembles every SDT without complaint, and what they
say matches the machine map."""

from __future__ import annotations

import re
import shutil
import struct
import subprocess

import pytest

from pyvmm.acpi import aml, tables
from pyvmm.machine import layout as L


@pytest.fixture(scope="module")
def dsl(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    if not shutil.which("iasl"):
        pytest.skip("iasl (acpica-tools) is not installed")
    d = tmp_path_factory.mktemp("acpi")
    out = {}
    for sig, (_, blob) in tables.build(mmio_slots=L.virtio_mmio_slots()).blobs.items():
        if sig == "RSDP":
            continue  # not an SDT; checked below in Python
        f = d / f"{sig.lower()}.dat"
        f.write_bytes(blob)
        p = subprocess.run(["iasl", "-d", str(f)], capture_output=True, text=True, cwd=d)
        assert p.returncode == 0, p.stdout + p.stderr
        text = (d / f"{sig.lower()}.dsl").read_text()
        assert not re.search(r"(?i)\b(error|invalid|incorrect)\b", p.stdout + p.stderr + text), sig
        out[sig] = text
    return out


def field(text: str, name: str) -> list[str]:
    return re.findall(rf"\]\s+{re.escape(name)} : (\S+)", text)


def test_every_table_disassembles(dsl: dict[str, str]) -> None:
    assert set(dsl) == {"DSDT", "FACP", "APIC", "MCFG", "XSDT"}


def test_madt_matches_machine_map(dsl: dict[str, str]) -> None:
    madt = dsl["APIC"]
    assert int(field(madt, "Local Apic Address")[0], 16) == L.LAPIC_BASE
    assert int(field(madt, "Address")[0], 16) == L.IOAPIC_BASE
    assert "Interrupt Source Override" in madt
    assert int(field(madt, "Source")[0], 16) == 0
    assert int(field(madt, "Interrupt")[1], 16) == 2  # ISA IRQ 0 -> GSI 2


def test_mcfg_matches_ecam(dsl: dict[str, str]) -> None:
    mcfg = dsl["MCFG"]
    assert int(field(mcfg, "Base Address")[0], 16) == L.PCI_ECAM_BASE
    assert int(field(mcfg, "End Bus Number")[0], 16) == (L.PCI_ECAM_SIZE >> 20) - 1


def test_fadt_reset_register_is_the_i8042(dsl: dict[str, str]) -> None:
    fadt = dsl["FACP"]
    assert "Hardware Reduced (V5) : 1" in fadt
    assert re.search(r"Reset Register.*?Address : 0000000000000064", fadt, re.S)
    assert int(field(fadt, "Value to cause reset")[0], 16) == 0xFE


def test_dsdt_describes_pci_root_legacy_devices_and_virtio_slots(dsl: dict[str, str]) -> None:
    d = dsl["DSDT"]
    assert 'EisaId ("PNP0A08")' in d and 'EisaId ("PNP0501")' in d
    assert f"0x{L.PCI_MEM_BASE:08X},         // Range Minimum" in d
    for i, (base, gsi) in enumerate(L.virtio_mmio_slots()):
        assert f"Device (VR{i:02X})" in d
        assert f"0x{base:08X},         // Address Base" in d
        assert f"0x{gsi:08X}," in d
    assert d.count('"LNRO0005"') == L.VIRTIO_MMIO_SLOTS


def test_the_pci_memory_window_holds_no_other_device() -> None:
    # The host bridge's _CRS window must not contain the virtio-mmio slots, the IOAPIC,
    # the LAPIC or the test register (it used to run up to the IOAPIC).
    lo, hi = L.PCI_MEM_BASE, L.PCI_MEM_BASE + L.PCI_MEM_SIZE
    for e in L.MACHINE_MAP:
        if e.space == "mmio" and e.name != "pci-mem":
            assert e.base + e.size <= lo or e.base >= hi, e.name


def test_the_dsdt_describes_only_the_slots_given() -> None:
    dsdt = tables.build(mmio_slots=L.virtio_mmio_slots()[:1]).blobs["DSDT"][1]
    assert dsdt.count(b"LNRO0005") == 1
    assert tables.build().blobs["DSDT"][1].count(b"LNRO0005") == 0


def test_rsdp_checksums_and_xsdt_pointer() -> None:
    t = tables.build()
    addr, rsdp = t.blobs["RSDP"]
    assert addr == t.rsdp_addr and rsdp[:8] == b"RSD PTR " and len(rsdp) == 36
    assert sum(rsdp[:20]) & 0xFF == 0 and sum(rsdp) & 0xFF == 0
    xsdt_addr = struct.unpack_from("<Q", rsdp, 24)[0]
    assert t.blobs["XSDT"][0] == xsdt_addr
    ptrs = struct.unpack_from("<3Q", t.blobs["XSDT"][1], 36)
    assert {t.blobs[s][0] for s in ("FACP", "APIC", "MCFG")} == set(ptrs)
    for sig, (_, blob) in t.blobs.items():
        if sig != "RSDP":
            assert sum(blob) & 0xFF == 0, sig


@pytest.mark.parametrize("n", [0, 1, 62, 63, 64, 4094, 4095, 4096, 1 << 20])
def test_pkg_length_encoding_counts_itself(n: int) -> None:
    enc = aml.pkg_length(n)
    lead = enc[0] >> 6
    assert len(enc) == lead + 1
    total = enc[0] & (0x3F if lead == 0 else 0x0F)
    for i, b in enumerate(enc[1:]):
        total |= b << (4 + 8 * i)
    assert total == n + len(enc)


def test_eisa_id() -> None:
    assert aml.eisa_id("PNP0A03") == b"\x0c" + (0x030AD041).to_bytes(4, "little")
