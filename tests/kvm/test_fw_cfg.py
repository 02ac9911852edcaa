"""fw_cfg found and read by a tiny guest, through the data port and by DMA; the same
guest passes under QEMU's fw_cfg (tests/e2e/test_qemu_boots_our_guests.py)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import pyvmm_cmd


@pytest.mark.parametrize("chip", ["kernel", "split"])
def test_fw_cfg_guest_reads_a_host_file(guests: Path, tmp_path: Path, chip: str) -> None:
    f = tmp_path / "greeting"
    f.write_bytes(b"hello-from-host")
    p = subprocess.run(pyvmm_cmd("run", "-q", "--irqchip", chip, "--memory", "128M",
                                 "--kernel", str(guests / "fw_cfg.elf"), "--fw-cfg",
                                 f"file=opt/pyvmm/test=@{f},file=opt/other=x"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    assert "fw_cfg signature=QEMU" in out and "dma signature=51454d5520434647" in out
    assert f"fw_cfg id=3 ram={128 << 20:#x} cpus=1" in out
    assert "fw_cfg files=3" in out  # etc/e820, opt/other, opt/pyvmm/test
    assert "fw_cfg data hello-from-host" in out
    assert "fw_cfg dma control=0 hello-from-host tail=0000" in out
    assert "fw_cfg dma outside-ram control=1" in out
    # etc/e820 is the map the PVH start info carries
    assert "fw_cfg e820 0x0+0x9fc00 type=1" in out
    assert f"fw_cfg e820 0x100000+{(128 << 20) - 0x100000:#x} type=1" in out
    assert "fw_cfg ok" in out


def test_without_fw_cfg_the_probe_finds_nothing(guests: Path) -> None:
    p = subprocess.run(pyvmm_cmd("run", "-q", "--kernel", str(guests / "fw_cfg.elf")),
                       capture_output=True, timeout=60)
    # The floating bus reads all-ones where no chip answers: no signature.
    assert b"signature=\xff\xff\xff\xff" in p.stdout and b"FAIL: no fw_cfg" in p.stdout
    assert p.returncode == 7  # exit(3) -> (3 << 1) | 1
