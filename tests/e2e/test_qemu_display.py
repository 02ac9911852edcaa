"""The display guests against QEMU's own std VGA (-device VGA, TCG): the same drivers
pass there; QEMU's screendump of the bochs guest's 640x480x32 mode equals pyvmm's
screen pixel for pixel; the vga_text guest's screen matches cell by cell in colours, and
pixel for pixel in every blank cell (the glyphs come from different fonts: QEMU's
built-in one, pyvmm's PSF file; QEMU draws 9-dot cells). tests/kvm/test_display.py runs
the same guests under pyvmm."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pyvmm.machine.config import MachineConfig
from pyvmm.machine.vm import Machine

pytestmark = pytest.mark.qemu
Image = pytest.importorskip("PIL.Image", reason="Pillow (a pyvmm dependency) is missing")


def qemu_screendump(guest: Path, cmdline: str, done: str, tmp: Path) -> tuple[str, Path]:
    """Run ``guest`` under QEMU until ``done`` is on its serial port, then take a
    screendump through the HMP monitor; returns (serial output, PPM path)."""
    exe = shutil.which("qemu-system-x86_64")
    if exe is None:
        pytest.skip("qemu-system-x86_64 is not installed")
    mon, serial, ppm = tmp / "mon.sock", tmp / "serial.txt", tmp / "screen.ppm"
    proc = subprocess.Popen(
        [exe, "-accel", "tcg", "-M", "q35", "-m", "64", "-nodefaults", "-display", "none",
         "-serial", f"file:{serial}", "-monitor", f"unix:{mon},server=on,wait=off",
         "-no-reboot", "-device", "VGA", "-kernel", str(guest), "-append", cmdline],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        out = ""
        while done not in out and "FAIL" not in out:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"QEMU ended or timed out before {done!r}: {out[-2000:]}"
                                     f"{proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.2)
            out = serial.read_text(errors="replace") if serial.exists() else ""
        assert "FAIL" not in out, out[-2000:]
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(mon))
            s.sendall(f"screendump {ppm}\n".encode())
            for _ in range(100):  # the monitor writes the file before its next prompt
                if ppm.exists() and ppm.stat().st_size >= 640 * 480 * 3:
                    break
                time.sleep(0.1)
        return out, ppm
    finally:
        proc.kill()
        proc.wait()


def test_bochs_guest_screen_matches_qemus_std_vga(guests: Path, tmp_path: Path) -> None:
    out, ppm = qemu_screendump(guests / "bochs.elf", "hold=1", "bochs: all passed", tmp_path)
    assert "bochs: mode 640x480x32 pattern sum" in out
    with Machine(MachineConfig.from_dict({
            "kernel": str(guests / "bochs.elf"), "quiet": True,
            "serial": f"file:{tmp_path / 'pyvmm-serial.txt'}",
            "timeout": 60, "devices": [{"type": "vga"}]})) as m:
        assert m.run().exit_code == 0
        ours = m.screen()
    with Image.open(ppm) as theirs:
        theirs = theirs.convert("RGB")
        assert theirs.size == ours.size == (640, 480)
        assert theirs.tobytes() == ours.tobytes()
    # The guest read the same capabilities and fixed-up values, and drew the same
    # pattern, under both.
    ours_out = (tmp_path / "pyvmm-serial.txt").read_text(errors="replace")

    def facts(text: str) -> list[str]:
        return [ln.strip() for ln in text.splitlines()
                if ln.startswith(("bochs: caps", "bochs: bad mode", "bochs: mode", "bochs: video"))]

    assert facts(out) == facts(ours_out) and len(facts(out)) == 4


def test_vga_text_guest_screen_matches_qemus_std_vga(guests: Path, tmp_path: Path) -> None:
    out, ppm = qemu_screendump(guests / "vga_text.elf", "hold=1", "vga-text: all passed",
                               tmp_path)
    assert "vga-text: cursor 1927 shape 13-15" in out and "CRTC 0x7f reads aa" in out
    with Machine(MachineConfig.from_dict({
            "kernel": str(guests / "vga_text.elf"), "quiet": True, "serial": "none",
            "timeout": 60, "devices": [{"type": "vga"}]})) as m:
        assert m.run().exit_code == 0
        ours = m.screen()
        vga = m.display()
        cells = vga.renderer().text_cells()
        cursor = vga.cursor()[0]
        colour = vga.text_colour
    with Image.open(ppm) as theirs:
        theirs = theirs.convert("RGB")
        assert theirs.size == (720, 400) and ours.size == (640, 400)  # 9- vs 8-dot cells
        blank = 0
        for i, (ch, attr) in enumerate(cells):
            if i == cursor:
                continue  # QEMU's cursor blinks
            row, col = divmod(i, 80)
            q = theirs.crop((col * 9, row * 16, col * 9 + 8, row * 16 + 16))
            o = ours.crop((col * 8, row * 16, col * 8 + 8, row * 16 + 16))
            fg, bg = colour(attr & 0xF), colour(attr >> 4 & 0x7)
            for img in (q, o):
                assert {c for _, c in img.getcolors(256) or ()} <= {fg, bg}, (row, col)
            if ch in (0x00, 0x20):
                blank += 1
                assert q.tobytes() == o.tobytes(), (row, col)
        assert blank > 1000
