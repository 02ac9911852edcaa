"""The same tiny-guest images start under QEMU's -kernel (PVH note, multiboot), so a
peer VMM can run them. QEMU uses software emulation (TCG) here: nothing of /dev/kvm."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.qemu


def qemu(kernel: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    exe = shutil.which("qemu-system-x86_64")
    assert exe
    return subprocess.run(
        [exe, "-accel", "tcg", "-M", "q35", "-m", "64", "-nodefaults", "-nographic",
         "-serial", "stdio", "-monitor", "none", "-no-reboot",
         "-device", "isa-debug-exit,iobase=0xf4,iosize=4", "-kernel", str(kernel), *extra],
        capture_output=True, timeout=120,
    )


@pytest.mark.parametrize("image", ["hello.elf", "hello.mb"])
def test_hello_under_qemu(guests: Path, image: str) -> None:
    p = qemu(guests / image)
    assert p.returncode == 0
    assert b"Hello from a pyvmm tiny guest!\n" in p.stdout


def test_exit_code_under_qemu_matches_pyvmm_convention(guests: Path) -> None:
    p = qemu(guests / "exit_code.elf", "-append", "code=9")
    assert p.returncode == (9 << 1) | 1


def test_fw_cfg_guest_passes_against_qemus_fw_cfg(guests: Path) -> None:
    """The guest tests/kvm/test_fw_cfg.py runs under pyvmm, against QEMU's device."""
    p = qemu(guests / "fw_cfg.elf", "-fw_cfg", "name=opt/pyvmm/test,string=hello-from-host")
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 0, out
    assert "fw_cfg data hello-from-host" in out
    assert "fw_cfg dma control=0 hello-from-host tail=0000" in out
    assert "fw_cfg dma outside-ram control=1" in out and "fw_cfg ok" in out
