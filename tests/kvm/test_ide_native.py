"""The tiny-guest driver guests/src/ide_native.c against pyvmm's IDE function in
native-PCI mode (``native=on``) on both irqchips: found by enumeration (class 01 01 85),
both channels driven through BAR0-3 with one INTx through the IOAPIC, the legacy ports
silent; a PIO write the host reads back and a bus-master DMA read whose checksum matches
the image. (Linux's ata_piix drives the same mode over vfio-user:
tests/e2e/test_vfio_user_ide.py.)"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import pyvmm_cmd


def csum(data: bytes) -> int:
    s = 0
    for b in data:
        s = (s * 31 + b) & 0xFFFFFFFF
    return s


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_ide_native_guest(guests: Path, tmp_path: Path, chip: str) -> None:
    pri, sec = tmp_path / "p.img", tmp_path / "s.img"
    head = os.urandom(1 << 20)
    pri.write_bytes(head)
    sec.write_bytes(bytes(2 << 20))
    p = subprocess.run(pyvmm_cmd(
        "run", "--timeout", "120", "--irqchip", chip, "--kernel",
        str(guests / "ide_native.elf"), "--disk", f"path={pri},if=ide,native=on",
        "--disk", f"path={sec},if=ide,bus=1,native=on"),
        capture_output=True, text=True, timeout=240)
    out = p.stdout
    assert p.returncode == 0 and "ide-native: all passed" in out, out[-2500:] + p.stderr[-1500:]
    assert "ide-native class=010185 pin=1" in out
    assert f"channel 0 model='PYVMM HARDDISK' sectors={(1 << 20) // 512}" in out
    assert f"channel 1 model='PYVMM HARDDISK' sectors={(2 << 20) // 512}" in out
    assert f"ide-native dma-sum={csum(head[:4096]):08x}" in out  # LBA 0-7 by DMA
    data = pri.read_bytes()
    assert data[8 * 512:9 * 512] == bytes((i * 5 + 3) & 0xFF for i in range(512))
    assert data[:8 * 512] == head[:8 * 512] and data[9 * 512:] == head[9 * 512:]
    assert sec.read_bytes() == bytes(2 << 20)  # IDENTIFY only


def test_ide_native_and_compatibility_on_one_function_is_one_line(
        guests: Path, tmp_path: Path) -> None:
    a, b = tmp_path / "a.img", tmp_path / "b.img"
    a.write_bytes(bytes(1 << 20))
    b.write_bytes(bytes(1 << 20))
    p = subprocess.run(pyvmm_cmd(
        "run", "--timeout", "30", "--kernel", str(guests / "ide_native.elf"),
        "--disk", f"path={a},if=ide,native=on", "--disk", f"path={b},if=ide,bus=1"),
        capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "one mode per function" in p.stderr, p.stderr
    # one error line (the host notice about KVM-PVM may precede it), no traceback
    assert p.stderr.count("error:") == 1 and "Traceback" not in p.stderr
