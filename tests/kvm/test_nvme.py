"""The tiny-guest NVMe driver against pyvmm's emulated controller (and, as the
conformance cross-check, the same binary against QEMU's): the host reads back what the
guest wrote, bad commands fail with the spec's status, and the VM goes on."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import pyvmm_cmd


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 13 + seed * 7 + 1) & 0xFF for i in range(n))


def check_image(img: Path, before: bytes) -> None:
    data = img.read_bytes()
    for b in range(16):  # 16 x 4 KiB at LBA 8b
        assert data[4096 * b:4096 * (b + 1)] == pattern(4096, b), f"block {b}"
    assert data[1024 * 512:1024 * 512 + 65536] == pattern(65536, 99)
    assert data[65536:1024 * 512] == before[65536:1024 * 512]  # nothing else written


@pytest.fixture
def image(tmp_path: Path) -> tuple[Path, bytes]:
    p = tmp_path / "nvme.img"
    before = os.urandom(2 << 20)
    p.write_bytes(before)
    return p, before


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_nvme_guest_writes_host_reads(guests: Path, image: tuple[Path, bytes], chip: str,
                                      tmp_path: Path) -> None:
    img, before = image
    js = tmp_path / "x.json"
    p = subprocess.run(pyvmm_cmd("run", "--timeout", "60", "--irqchip", chip, "--kernel",
                                 str(guests / "nvme.elf"), "--disk", f"path={img},if=nvme",
                                 "--exits-json", str(js)),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert "nvme model 'pyvmm NVMe'" in p.stdout and "nvme: all passed" in p.stdout
    assert "nvme prp-outside-ram status=4004" in p.stdout  # Data Transfer Error, DNR
    check_image(img, before)
    rep = json.loads(js.read_text())
    nv = rep["nvme"][0]
    assert not nv["fatal"] and nv["commands"] >= 40
    assert nv["bytes"] == 2 * (16 * 4096 + 65536) + 4096  # + the read after bad input
    assert nv["errors"].get("nvme-db") == 2  # the two bad doorbells, logged once
    bar0 = next(d for d in rep["buses"][1]["devices"] if d["name"] == "nvme.bar0")
    assert bar0["writes"] >= 2 * 40  # each command: SQ tail + CQ head doorbell, both trapped


def test_nvme_read_only_image_refuses_writes(guests: Path, image: tuple[Path, bytes]) -> None:
    img, before = image
    p = subprocess.run(pyvmm_cmd("run", "--timeout", "60", "--kernel", str(guests / "nvme.elf"),
                                 "--disk", f"path={img},if=nvme,readonly=on"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0 and "FAIL: write of block 0" in p.stdout, p.stdout[-1500:]
    assert img.read_bytes() == before


def test_nvme_on_mmio_transport_is_a_one_line_error(guests: Path,
                                                    image: tuple[Path, bytes]) -> None:
    img, before = image
    p = subprocess.run(pyvmm_cmd("run", "--kernel", str(guests / "nvme.elf"), "--disk",
                                 f"path={img},if=nvme,transport=mmio"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "(nvme): unknown key 'transport'" in p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and img.read_bytes() == before


@pytest.mark.qemu
def test_nvme_guest_passes_against_qemu(guests: Path, image: tuple[Path, bytes]) -> None:
    exe = shutil.which("qemu-system-x86_64")
    assert exe
    img, before = image
    p = subprocess.run(
        [exe, "-accel", "kvm", "-cpu", "host,arch-capabilities=off", "-M", "q35", "-m", "64",
         "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-kernel", str(guests / "nvme.elf"),
         "-drive", f"file={img},format=raw,if=none,id=d0,cache=none",
         "-device", "nvme,drive=d0,serial=qemu-nvme"],
        capture_output=True, timeout=180)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0 or "nvme: all passed" in out, out[-1500:]
    assert "nvme: all passed" in out
    check_image(img, before)
