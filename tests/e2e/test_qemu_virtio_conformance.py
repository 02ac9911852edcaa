"""The same virtio-blk guest binary against QEMU's virtio-blk-pci (modern only): the
conformance cross-check of our guest driver, and so of what pyvmm's device must do.
QEMU runs with -accel kvm -cpu host,arch-capabilities=off, as the issue asks."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import wait_for_path
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


def qemu_cmd(guests: Path, guest: str, *extra: str) -> list[str]:
    exe = shutil.which("qemu-system-x86_64")
    assert exe
    return [exe, "-accel", "kvm", "-cpu", "host,arch-capabilities=off", "-M", "q35", "-m",
            "64", "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none",
            "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", str(guests / f"{guest}.elf"), *extra]


def test_virtio_rng_guest_passes_against_qemu(guests: Path) -> None:
    p = subprocess.run(qemu_cmd(guests, "virtio_rng", "-device",
                                "virtio-rng-pci,disable-legacy=on"), capture_output=True,
                       timeout=180)
    assert p.returncode == 0 and b"virtio-rng ok" in p.stdout, p.stdout[-500:]


def test_virtio_console_guest_passes_against_qemu(guests: Path, tmp_path: Path) -> None:
    import socket

    path = tmp_path / "qc.sock"
    proc = subprocess.Popen(qemu_cmd(
        guests, "virtio_console", "-chardev", f"socket,id=c0,path={path},server=on,wait=off",
        "-device", "virtio-serial-pci,disable-legacy=on", "-device", "virtconsole,chardev=c0"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert wait_for_path(path)
        s = socket.socket(socket.AF_UNIX)
        s.connect(str(path))
        s.settimeout(60)
        got = b""
        while b"console ready\n" not in got:
            chunk = s.recv(4096)
            assert chunk
            got += chunk
        s.sendall(b"abc\n")
        echo = b""
        while not echo.endswith(b"\n"):
            echo += s.recv(100)
        s.close()
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert echo == b"ABC\n" and proc.returncode == ((4 << 1) | 1)


def test_virtio_net_guest_passes_against_qemu(guests: Path, tap: str) -> None:
    import socket

    from tests.kvm.test_virtio_net import ETH_P_EXP, csum

    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_EXP))
    sock.bind((tap, 0))
    sock.settimeout(60)
    proc = subprocess.Popen(qemu_cmd(
        guests, "virtio_net", "-append", "seed=12",
        "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
        "-device", "virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:aa:bb:dd"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        frame = sock.recv(65536)
        assert frame[14:].rstrip(b"\0") == b"pyvmm-tx 12"
        payloads = [b"hello-guest", os.urandom(4000), b"pyvmm-end"]
        for pl in payloads:
            sock.send(frame[6:12] + bytes.fromhex("020000000001") + b"\x88\xb5" + pl)
        out, _ = proc.communicate(timeout=60)
    finally:
        sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-600:]
    rx = [line for line in text.splitlines() if line.startswith("rx ")]
    assert len(rx) == 3
    for line, pl in zip(rx, payloads, strict=True):
        assert f"len={14 + len(pl)} " in line and f"sum={csum(pl):x} " in line


def microvm_cmd(guests: Path, guest: str, *extra: str) -> list[str]:
    """QEMU microvm with ACPI and modern (version 2) virtio-mmio; it has no i8042, so a
    guest's clean exit(0) reaches the test-exit port as 0 and QEMU exits 1."""
    exe = shutil.which("qemu-system-x86_64")
    assert exe
    return [exe, "-accel", "kvm", "-cpu", "host,arch-capabilities=off", "-M", "microvm,acpi=on",
            "-m", "64", "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none",
            "-no-reboot", "-global", "virtio-mmio.force-legacy=false",
            "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
            "-kernel", str(guests / f"{guest}.elf"), *extra]


def test_virtio_mmio_blk_guest_passes_against_qemu_microvm(guests: Path, tmp_path: Path) -> None:
    img = tmp_path / "m.img"
    img.write_bytes(os.urandom(1 << 20))
    before = img.read_bytes()
    p = subprocess.run(microvm_cmd(guests, "virtio_blk", "-append", "seed=6 mmio=1",
                                   "-drive", f"file={img},format=raw,if=none,id=d0",
                                   "-device", "virtio-blk-device,drive=d0,serial=qemu-mmio"),
                       capture_output=True, timeout=120)
    out = p.stdout.decode(errors="replace")
    assert p.returncode == 1 and "read past the end -> IOERR" in out, out[-800:]
    assert "acpi: " in out and "virtio-blk at mmio" in out and "id=qemu-mmio" in out
    assert f"sector0 sum={sector0_sum(before):x}" in out
    assert img.read_bytes()[8 * 512:16 * 512] == pattern(6)


def test_virtio_mmio_rng_guest_passes_against_qemu_microvm(guests: Path) -> None:
    p = subprocess.run(microvm_cmd(guests, "virtio_rng", "-append", "mmio=1",
                                   "-device", "virtio-rng-device"), capture_output=True,
                       timeout=120)
    assert p.returncode == 1 and b"virtio-rng ok" in p.stdout, p.stdout[-500:]
