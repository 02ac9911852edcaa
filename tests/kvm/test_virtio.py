"""Tiny-guest virtio drivers against pyvmm's virtio-pci devices: the host reads back
what the guest wrote, notifications take the ioeventfd path (no exits), errors come
back in the status byte."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import pyvmm_cmd, wait_for_path


def run(guest: Path, *args: str, chip: str = "kernel") -> subprocess.CompletedProcess[str]:
    return subprocess.run(pyvmm_cmd("run", "--timeout", "60", "--irqchip", chip, "--kernel",
                                    str(guest), *args), capture_output=True, text=True,
                          timeout=120)


def pattern(seed: int) -> bytes:
    return bytes(((i * 131 + seed * 7) >> 2) & 0xFF for i in range(8 * 512))


def sector0_sum(data: bytes) -> int:
    s = 0
    for b in data[:512]:
        s = (s * 31 + b) & 0xFFFFFFFF
    return s


@pytest.fixture
def image(tmp_path: Path) -> Path:
    p = tmp_path / "disk.img"
    p.write_bytes(os.urandom(1 << 20))
    return p


@pytest.mark.parametrize("chip", ["kernel", "split"])
@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_blk_guest_writes_host_reads_and_back(guests: Path, image: Path, tmp_path: Path,
                                              chip: str, transport: str) -> None:
    before = image.read_bytes()
    js = tmp_path / "x.json"
    mmio = int(transport == "mmio")
    p = run(guests / "virtio_blk.elf", "--disk", f"path={image},transport={transport}",
            "--cmdline", f"seed=9 mmio={mmio}", "--exits-json", str(js), chip=chip)
    assert p.returncode == 0, p.stdout + p.stderr
    # host -> guest: the guest saw what the host put in sector 0
    assert f"sector0 sum={sector0_sum(before):x}" in p.stdout
    # guest -> host: the bytes are in the image file, and nothing else changed
    after = image.read_bytes()
    assert after[8 * 512:16 * 512] == pattern(9)
    assert after[:8 * 512] == before[:8 * 512] and after[16 * 512:] == before[16 * 512:]
    assert "id=pyvmm-disk0" in p.stdout and "read past the end -> IOERR" in p.stdout
    rep = json.loads(js.read_text())
    v = rep["virtio"][0]
    assert v["requests"] == 6 and v["needs_reset"] == 0
    # the notify register never exited: ioeventfd took every kick
    regs = next(d for b in rep["buses"] for d in b["devices"] if d["name"].startswith("virtio")
                and not d["name"].endswith(".bar1"))
    notify = range(0x3000, 0x4000) if transport == "pci" else range(0x50, 0x54)
    assert not [a for a in regs["accesses"] if a["offset"] in notify]
    assert v["notifications"] >= 1
    if transport == "mmio":
        assert "acpi: 1 virtio-mmio slots" in p.stdout  # exactly the slots in use


def test_blk_read_only_disk_refuses_the_guest_write(guests: Path, image: Path) -> None:
    before = image.read_bytes()
    p = run(guests / "virtio_blk.elf", "-q", "--disk", f"path={image},readonly=on")
    assert p.returncode == 3 and "FAIL: write" in p.stdout
    assert image.read_bytes() == before


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_rng_guest(guests: Path, transport: str) -> None:
    p = run(guests / "virtio_rng.elf", "-q", f"--rng={transport}", "--cmdline",
            f"mmio={int(transport == 'mmio')}")
    assert p.returncode == 0 and "virtio-rng ok" in p.stdout, p.stdout


def test_rng_rate_limit_makes_the_guest_wait(guests: Path, tmp_path: Path) -> None:
    """--rng rate=64: the first 64-byte read takes the whole bucket, the second waits for
    it to refill (about a second); both are full reads, nothing is dropped."""
    js = tmp_path / "x.json"
    p = run(guests / "virtio_rng.elf", "-q", "--rng", "rate=64", "--exits-json",
            str(js))
    assert p.returncode == 0 and "virtio-rng ok" in p.stdout, p.stdout
    rep = json.loads(js.read_text())
    assert rep["virtio"][0]["bytes"] == 128
    assert rep["result"]["wall_time_s"] >= 0.9  # a lower bound set by the limit itself


@pytest.mark.parametrize("spec,text", [("path=/nonexistent.img", "disk image not found"),
                                       ("file=x", "unknown key"),
                                       ("path=x,readonly=maybe", "readonly: 'maybe' is not a "
                                        "boolean (use on or off)"),
                                       ("path=x,if=scsi", "if must be one of virtio, nvme")])
def test_bad_disk_option_is_one_line(guests: Path, spec: str, text: str) -> None:
    p = run(guests / "hello.elf", "--disk", spec)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0]


def tsc_khz() -> int:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("cpu MHz"):
            return int(float(line.split(":")[1]) * 1000)
    pytest.skip("no cpu MHz in /proc/cpuinfo")


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_qd32_random_reads_take_almost_no_exits(guests: Path, image: Path, tmp_path: Path,
                                                transport: str) -> None:
    """The issue's goal of <= 0.05 userspace exits per request at QD32, counted over the
    whole run (boot and printing included); requests themselves take none."""
    n = 20000
    js = tmp_path / "x.json"
    p = run(guests / "blkload.elf", "-q", "--disk", f"path={image},transport={transport}",
            "--cmdline", f"mode=0 qd=32 n={n} tsc_khz={tsc_khz()} mmio={int(transport == 'mmio')}",
            "--exits-json", str(js))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "blkload mode=0 qd=32" in p.stdout
    rep = json.loads(js.read_text())
    assert rep["virtio"][0]["requests"] == n
    assert sum(rep["exits"].values()) / n <= 0.05
    regs = next(d for b in rep["buses"] for d in b["devices"] if d["name"].startswith("virtio")
                and not d["name"].endswith(".bar1"))
    assert regs["reads"] + regs["writes"] < 60  # setup only, independent of n


@pytest.mark.parametrize("transport", ["pci", "mmio"])
def test_console_over_a_unix_socket(guests: Path, tmp_path: Path, transport: str) -> None:
    """Host input larger than the guest's posted buffers (8 x 64 bytes) arrives whole and
    in order: the socket is paused while the driver has no buffers."""
    import socket

    path = tmp_path / "con.sock"
    proc = subprocess.Popen(pyvmm_cmd("run", "-q", "--timeout", "60", "--kernel",
                                      str(guests / "virtio_console.elf"), "--console",
                                      f"socket:{path},transport={transport}",
                                      "--cmdline", f"mmio={int(transport == 'mmio')}"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for_path(path)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.settimeout(30)
        got = b""
        while b"console ready\n" not in got:
            chunk = s.recv(4096)
            assert chunk
            got += chunk
        text = bytes((i % 26) + 97 for i in range(700)) + b"\n"
        s.sendall(text)
        echo = b""
        while not echo.endswith(b"\n"):
            chunk = s.recv(4096)
            assert chunk
            echo += chunk
        s.close()
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert echo == text.upper()
    assert proc.returncode == ((len(text) & 0x3F) << 1) | 1
    assert f"echoed {len(text)} bytes" in out.decode()
