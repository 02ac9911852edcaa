"""The same virtio-blk guest binary against QEMU's virtio-blk-pci (modern only): the
conformance cross-check of our guest driver, and so of what pyvmm's device must do.
QEMU runs with -accel kvm -cpu host,arch-capabilities=off, as the issue asks."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.kvm.test_virtio import pattern, sector0_sum

pytestmark = [pytest.mark.qemu, pytest.mark.kvm]


def test_virtio_blk_guest_passes_against_qemu(guests: Path, tmp_path: Path) -> None:
    exe = shutil.which("qemu-system-x86_64")
    assert exe
    img = tmp_path / "q.img"
    img.write_bytes(os.urandom(1 << 20))
    before = img.read_bytes()
    p = subprocess.run(
        [exe, "-accel", "kvm", "-cpu", "host,arch-capabilities=off", "-M", "q35", "-m", "64",
         "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
         "-kernel", str(guests / "virtio_blk.elf"), "-append", "seed=4",
         "-drive", f"file={img},format=raw,if=none,id=d0,cache=none",
         "-device", "virtio-blk-pci,drive=d0,disable-legacy=on,serial=qemu-disk"],
        capture_output=True, timeout=180)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out[-800:]
    assert f"sector0 sum={sector0_sum(before):x}" in out
    assert "ok write/flush/read-back" in out and "read past the end -> IOERR" in out
    assert "id=qemu-disk" in out
    assert img.read_bytes()[8 * 512:16 * 512] == pattern(4)
