"""The std-VGA display with tiny guests on a real vCPU: a text-mode driver (vga_text) and
a Bochs VBE driver (bochs). The text buffer and the framebuffer are dirty-logged
memslots: the guest's stores take no exit, the VMM learns which pages changed from
KVM_GET_DIRTY_LOG, and the screen drawn from them shows what the guest wrote."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from pyvmm.devices.display.render import PsfFont
from pyvmm.devices.display.spec import DEFAULT_FONT
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.vm import Machine
from tests.conftest import pyvmm_cmd

pytest.importorskip("PIL", reason="Pillow (a pyvmm dependency) is not installed")
if not Path(DEFAULT_FONT).exists():
    pytest.skip(f"the console font {DEFAULT_FONT} (Debian console-setup-linux) is not "
                "installed", allow_module_level=True)

COLS, ROWS = 80, 25


def machine(guest: Path, cmdline: str = "") -> Machine:
    return Machine(MachineConfig.from_dict({
        "kernel": str(guest), "quiet": True, "serial": "none", "timeout": 60,
        "cmdline": cmdline, "devices": [{"type": "vga"}]}))


def expected_text() -> list[tuple[int, int]]:
    """The 80x25 cells vga_text.c writes, computed independently of the device."""
    cells = [(0x20, 0x07)] * (COLS * ROWS)

    def put(row: int, col: int, text: bytes, attr: int) -> None:
        for i, ch in enumerate(text[:COLS - col]):
            cells[row * COLS + col + i] = (ch, attr)

    put(0, 0, b"pyvmm VGA text mode: 0xB8000 in a dirty-logged memslot", 0x1F)
    for row in range(2, ROWS - 2):
        line = f"row {row:2d}: fg {row & 15:x} bg {(row >> 2) & 7:x}  ".encode() + \
            b"\xb0\xb1\xdb \xc9\xcd\xbb"
        put(row, 2, line, (row & 15) | ((row >> 2) & 7) << 4)
    for c in range(256):
        cells[(2 + c // 32) * COLS + 44 + c % 32] = (c, 0x70)
    put(ROWS - 1, 0, b"the end", 0x4E)
    return cells


def bus_range(m: Machine, name: str) -> dict[str, Any]:
    for bus in m.exit_report()["buses"]:
        for d in bus["devices"]:
            if d["name"] == name:
                return dict(d)
    raise AssertionError(f"no bus range {name}")


def test_text_mode_cells_cursor_screen_and_no_exits_for_buffer_stores(guests: Path) -> None:
    with machine(guests / "vga_text.elf", "rounds=20") as m:
        vga = m.display()
        assert vga.window.dirty_pages() == list(range(32))  # nothing drawn yet: all
        r = m.run()
        assert (r.reason, r.exit_code) == ("reset", 0), r.message
        # 21 rewrites of 2000 cells and the table: not one exit in the window, and the
        # model saw none of the stores either (they went to the memslot).
        window = bus_range(m, "vga.window")
        assert window["reads"] == window["writes"] == 0
        assert vga.window.trapped == 0
        assert bus_range(m, "vga.ports")["writes"] > 0  # the registers do trap
        # KVM's log names exactly the page of the window the buffer is in (0xB8000).
        assert vga.window.dirty_pages() == [0x18000 // 4096]
        renderer = vga.renderer()
        assert renderer.text_cells() == expected_text()
        assert vga.cursor() == ((ROWS - 1) * COLS + 7, 13, 15)
        img = m.screen()
        assert img.size == (COLS * 8, ROWS * 16)
        # Cell (0, 0) is 'p' white on blue, drawn with the font file's glyph bits.
        font = PsfFont.load(DEFAULT_FONT)
        glyph = font.cp437_glyph_bitmaps()[ord("p")]
        for y in range(16):
            for x in range(8):
                on = glyph[y] >> (7 - x) & 1
                assert img.getpixel((x, y)) == ((255, 255, 255) if on else (0, 0, 168))
        # The cursor: scan lines 13-15 of the (blank, attribute 0x07) cell after "the
        # end", in that cell's foreground colour; the lines above it stay background.
        cx, cy = 7 * 8, (ROWS - 1) * 16
        assert all(img.getpixel((cx + x, cy + y)) == (168, 168, 168)
                   for x in range(8) for y in (13, 14, 15))
        assert all(img.getpixel((cx + x, cy + y)) == (0, 0, 0)
                   for x in range(8) for y in range(13))
        assert vga.metrics()["errors"] == {"crtc-index": 1, "gfx-index": 1, "seq-index": 1}


def test_dispi_mode_pattern_read_back_and_no_exits_per_framebuffer_store(
        guests: Path) -> None:
    w, h = 640, 480
    with machine(guests / "bochs.elf", f"w={w} h={h}") as m:
        vga = m.display()
        vga.vram.dirty_pages()  # drop the initial "everything"
        r = m.run()
        assert (r.reason, r.exit_code) == ("reset", 0), r.message
        assert vga.dispi_mode() == (w, h, 32, w * 4, 0)
        # The pattern bochs.c draws, computed here, against the framebuffer's bytes.
        bars = [0xFFFFFF, 0xFFFF00, 0x00FFFF, 0x00FF00, 0xFF00FF, 0xFF0000, 0x0000FF, 0]

        def pattern(x: int, y: int) -> int:
            if x in (0, w - 1) or y in (0, h - 1):
                return 0xFFFFFF
            if y < h // 2:
                return bars[x * 8 // w]
            g = (x * 255 // w) & 0xFF
            return g << 16 | ((y * 255 // h) & 0xFF) << 8 | (255 - g)

        fb = bytes(vga.vram.map[:w * h * 4])
        want = b"".join(pattern(x, y).to_bytes(4, "little") for y in range(h) for x in range(w))
        assert fb == want
        # 307200 pixel stores and as many loads: no exit and no trapped access; the
        # DISPI registers (ports and BAR2) did exit.
        bar0 = bus_range(m, "vga.bar0") if any(
            d["name"] == "vga.bar0" for b in m.exit_report()["buses"] for d in b["devices"]
        ) else {"reads": 0, "writes": 0}
        assert bar0["reads"] == bar0["writes"] == 0
        assert vga.vram.trapped == 0
        assert bus_range(m, "vga.dispi")["writes"] > 0
        assert bus_range(m, "vga.bar2")["writes"] >= 4
        # Dirty, and bounded: what the mode sets cleared (the fixed-up bad mode's
        # 16000x480x8 is the larger) and the guest's stores inside it; none beyond.
        pages = vga.vram.dirty_pages()
        assert pages == list(range(-(-16000 * 480 // 4096)))
        img = m.screen()
        assert img.size == (w, h)
        for x, y in ((0, 0), (100, 100), (639, 479), (320, 300), (500, 470)):
            c = pattern(x, y)
            assert img.getpixel((x, y)) == (c >> 16, c >> 8 & 0xFF, c & 0xFF)
        errs = vga.metrics()["errors"]
        assert errs == {"dispi-id": 1, "dispi-bpp": 1, "dispi-xres": 1, "dispi-offset": 1}


def test_cli_display_png_and_dirty_counters(guests: Path, tmp_path: Path) -> None:
    js = tmp_path / "exits.json"
    p = subprocess.run(pyvmm_cmd("run", "-q", "--kernel", str(guests / "vga_text.elf"),
                                 "--device", "vga", "--display", f"png:{tmp_path}",
                                 "--exits-json", str(js), "--timeout", "60"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr
    assert "vga-text: all passed" in p.stdout
    from PIL import Image

    with Image.open(tmp_path / "screen.png") as img:
        assert img.size == (640, 400)
        assert img.getpixel((0, 0)) == (0, 0, 168)  # the title row's blue background
        assert len(img.getcolors(1 << 16) or ()) >= 16  # the 16 text colours all appear
    dev = next(d for d in json.loads(js.read_text())["devices"] if d["type"] == "vga")
    assert 0 < dev["window"]["dirty_pages"] <= 32 and dev["window"]["trapped"] == 0
    assert dev["render"]["pages_read"] >= 1


def test_display_without_a_vga_is_one_line(guests: Path, tmp_path: Path) -> None:
    p = subprocess.run(pyvmm_cmd("run", "--kernel", str(guests / "hello.elf"),
                                 "--display", f"png:{tmp_path}"),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode != 0
    assert p.stderr.strip().count("\n") == 0 and "no display" in p.stderr
    assert list(tmp_path.iterdir()) == []
