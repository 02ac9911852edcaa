"""The std VGA without KVM: DISPI register semantics and QEMU's fix-ups of bad values,
the VGA index/data registers, the attribute flip-flop and retrace bit, BAR2's aliases,
the PSF font parser, the renderer drawing only what the dirty log names, and
hypothesis sequences of register writes that must never raise or leave the
framebuffer."""

from __future__ import annotations

import gzip
import logging
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.devices.display.render import MAX_PIXELS, FontError, PsfFont, Renderer
from pyvmm.devices.display.spec import DEFAULT_FONT, SPEC, VgaConfig
from pyvmm.devices.display.vga import BAR_FB, BAR_MMIO, StdVga
from pyvmm.memory import TrackedMemory
from pyvmm.uapi import vga as V

MiB = 1 << 20
ID, XRES, YRES, BPP, ENABLE, BANK, VW, VH, XOFF, YOFF, VMEM = range(11)


def make(vram: int = 16 * MiB) -> StdVga:
    return StdVga(TrackedMemory(vram), TrackedMemory(V.VGA_WINDOW_SIZE))


def dw(v: StdVga, index: int, value: int) -> None:
    v.write(0x1CE, 0, 2, index)
    v.write(0x1CE, 1, 2, value)


def dr(v: StdVga, index: int) -> int:
    v.write(0x1CE, 0, 2, index)
    return v.read(0x1CE, 1, 2)


def port_w(v: StdVga, port: int, value: int) -> None:
    v.write(V.VGA_PORT_BASE, port - V.VGA_PORT_BASE, 1, value)


def port_r(v: StdVga, port: int) -> int:
    return v.read(V.VGA_PORT_BASE, port - V.VGA_PORT_BASE, 1)


def font() -> PsfFont:
    if not Path(DEFAULT_FONT).exists():
        pytest.skip(f"{DEFAULT_FONT} (Debian console-setup-linux) is not installed")
    return PsfFont.load(DEFAULT_FONT)


def test_pci_identity_and_bars() -> None:
    v = make()
    c = v.config
    assert (c.data[0:2], c.data[2:4]) == (b"\x34\x12", b"\x11\x11")
    assert c.data[0x0B] == 0x03 and c.data[0x0A] == 0x00  # display, VGA-compatible
    assert c.data[0x10] & 0x08  # BAR0 prefetchable memory
    assert SPEC.kind.value == "pci" and {r.name for r in SPEC.isa} == {
        "ports", "dispi", "window"}
    v.close()


def test_dispi_id_and_memory_size() -> None:
    v = make(8 * MiB)
    assert dr(v, ID) == V.VBE_DISPI_ID5
    dw(v, ID, 0xB0C2)
    assert dr(v, ID) == 0xB0C2
    dw(v, ID, 0xB0C6)
    assert dr(v, ID) == 0xB0C2 and v.errors.counts["dispi-id"] == 1
    assert dr(v, VMEM) == 8 * MiB >> 16
    dw(v, VMEM, 1)
    assert dr(v, VMEM) == 128
    v.close()


def test_getcaps_reports_the_maximum() -> None:
    v = make()
    dw(v, XRES, 800)
    dw(v, ENABLE, V.VBE_DISPI_GETCAPS)
    assert (dr(v, XRES), dr(v, YRES), dr(v, BPP)) == (16000, 12000, 32)
    dw(v, ENABLE, 0)
    assert dr(v, XRES) == 800
    v.close()


def test_mode_set_clears_memory_unless_noclearmem() -> None:
    v = make()
    v.vram.map[0:8] = b"\xaa" * 8
    dw(v, XRES, 640), dw(v, YRES, 480), dw(v, BPP, 32)
    dw(v, ENABLE, V.VBE_DISPI_ENABLED | V.VBE_DISPI_LFB_ENABLED | V.VBE_DISPI_NOCLEARMEM)
    assert v.vram.map[0:8] == b"\xaa" * 8
    assert v.dispi_mode() == (640, 480, 32, 2560, 0)
    assert dr(v, VW) == 640 and dr(v, VH) == 16 * MiB // 2560
    dw(v, ENABLE, 0)
    v.vram.dirty_pages()
    dw(v, ENABLE, V.VBE_DISPI_ENABLED)
    assert v.vram.map[0:8] == bytes(8)
    assert v.vram.dirty_pages() == list(range(2560 * 480 // 4096))  # the clear
    v.close()


@pytest.mark.parametrize(("bpp", "want", "line"), [(7, 8, 640), (0, 8, 640), (15, 15, 1280),
                                                    (16, 16, 1280), (24, 24, 1920),
                                                    (32, 32, 2560), (33, 8, 640)])
def test_bpp_values(bpp: int, want: int, line: int) -> None:
    v = make()
    dw(v, XRES, 640), dw(v, YRES, 480), dw(v, BPP, bpp)
    dw(v, ENABLE, V.VBE_DISPI_ENABLED)
    assert dr(v, BPP) == want and v.line_offset == line
    assert (v.errors.counts["dispi-bpp"] == 1) == (want != bpp)
    v.close()


def test_huge_and_odd_resolutions_are_fixed_up() -> None:
    v = make(16 * MiB)
    dw(v, ENABLE, V.VBE_DISPI_ENABLED)
    dw(v, BPP, 32)
    dw(v, XRES, 0xFFFF)
    assert dr(v, XRES) == 16000
    dw(v, XRES, 645)
    assert dr(v, XRES) == 640  # a multiple of 8
    dw(v, XRES, 3)
    assert dr(v, XRES) == 8
    dw(v, XRES, 16000)
    dw(v, YRES, 12000)  # 16000 * 4 bytes a line: 16 MiB hold 262 lines
    assert dr(v, YRES) == 16 * MiB // (16000 * 4)
    dw(v, YRES, 0)
    assert dr(v, YRES) == 1
    # YRES 0 -> 1 is silent, as in QEMU; only the clamp is logged
    assert v.errors.counts["dispi-xres"] == 1 and v.errors.counts["dispi-yres"] == 1
    v.close()


def test_offsets_past_the_framebuffer_go_to_zero() -> None:
    v = make(4 * MiB)
    dw(v, XRES, 1024), dw(v, YRES, 768), dw(v, BPP, 32)
    dw(v, ENABLE, V.VBE_DISPI_ENABLED)
    dw(v, VW, 1024)
    dw(v, YOFF, 300)  # 4096 bytes x (768 + 300) lines > 4 MiB
    assert dr(v, YOFF) == 0 and v.start_addr == 0
    dw(v, XOFF, 8)
    assert dr(v, XOFF) == 8 and v.start_addr == 32
    dw(v, YRES, 200)
    dw(v, YOFF, 50)
    assert dr(v, YOFF) == 50 and v.start_addr == 32 + 50 * 4096
    v.close()


def test_bank_is_masked_to_the_memory() -> None:
    v = make(4 * MiB)
    dw(v, BANK, 0xFFFF)
    assert dr(v, BANK) == 63
    v.close()


def test_bad_dispi_indices() -> None:
    v = make()
    dw(v, 0x20, 5)
    assert dr(v, 0x20) == 0
    assert v.errors.counts["dispi-index"] == 2
    v.close()


def test_bar2_aliases_dispi_and_vga_ports() -> None:
    v = make()
    v.write_bar(BAR_MMIO, 0x500 + 2 * XRES, 2, 800)
    assert dr(v, XRES) == 800
    assert v.read_bar(BAR_MMIO, 0x500 + 2 * ID, 2) == V.VBE_DISPI_ID5
    assert v.read_bar(BAR_MMIO, 0x500 + 2 * XRES, 4) == 0  # 16-bit registers only
    assert v.errors.counts["dispi-mmio-size"] == 1
    # 0x400 + (port - 0x3C0): a word write to 0x3D4 is the index and data byte.
    v.write_bar(BAR_MMIO, 0x400 + 0x14, 2, 0x0E | 0x07 << 8)
    assert v.crtc[0x0E] == 0x07
    assert v.read_bar(BAR_MMIO, 0x400 + 0x0C, 1) == 0x67  # misc output read
    assert v.read_bar(BAR_MMIO, 0x604, 4) == V.QEXT_LITTLE_ENDIAN
    assert v.read_bar(BAR_MMIO, 0x100, 4) == 0  # no EDID
    v.close()


def test_framebuffer_bar_traps_into_tracked_memory_without_a_mapper() -> None:
    v = make()
    v.vram.dirty_pages()
    v.write_bar(BAR_FB, 0x5000, 4, 0x11223344)
    assert v.read_bar(BAR_FB, 0x5000, 4) == 0x11223344
    assert v.vram.dirty_pages() == [5] and v.vram.trapped == 2
    v.close()


def test_crtc_index_data_protection_and_mono_decode() -> None:
    v = make()
    port_w(v, 0x3D4, 0x0F)
    port_w(v, 0x3D5, 0x42)
    assert port_r(v, 0x3D5) == 0x42 and v.crtc[0x0F] == 0x42
    port_w(v, 0x3D4, 0x30)
    port_w(v, 0x3D5, 1)
    assert port_r(v, 0x3D5) == 0xFF and v.errors.counts["crtc-index"] == 1
    port_w(v, 0x3D4, 0x11), port_w(v, 0x3D5, 0x8E)
    port_w(v, 0x3D4, 0x01), port_w(v, 0x3D5, 0x27)
    assert v.crtc[1] == 0x4F  # protected
    port_w(v, 0x3D4, 0x11), port_w(v, 0x3D5, 0x0E)
    port_w(v, 0x3D4, 0x01), port_w(v, 0x3D5, 0x27)
    assert v.crtc[1] == 0x27
    # Misc output bit 0 clear: the CRTC moves to 0x3B4/0x3B5, 0x3Dx answers nothing.
    port_w(v, 0x3C2, 0x66)
    assert port_r(v, 0x3D5) == 0xFF
    port_w(v, 0x3B4, 0x0F)
    assert port_r(v, 0x3B5) == 0x42
    v.close()


def test_attribute_flip_flop_and_retrace() -> None:
    v = make()
    a, b = port_r(v, 0x3DA), port_r(v, 0x3DA)
    assert (a ^ b) & V.VGA_IS1_VR
    port_w(v, 0x3C0, 0x01)  # index 1
    port_w(v, 0x3C0, 0x2A)  # data
    assert v.att[1] == 0x2A
    port_w(v, 0x3C0, 0x02)  # the flip-flop is back at index
    port_r(v, 0x3DA)  # reset: the next write is an index again
    port_w(v, 0x3C0, 0x21)
    assert port_r(v, 0x3C0) == 0x21 and port_r(v, 0x3C1) == 0x2A
    port_w(v, 0x3C0, 0x3F)  # data for index 1 (with PAS)
    assert v.att[1] == 0x3F
    port_r(v, 0x3DA)
    port_w(v, 0x3C0, 0x1F), port_w(v, 0x3C0, 1)
    assert v.errors.counts["att-index"] == 1
    v.close()


def test_sequencer_graphics_and_dac() -> None:
    v = make()
    port_w(v, 0x3C4, 0x02), port_w(v, 0x3C5, 0xFF)
    assert port_r(v, 0x3C5) == 0x0F  # map mask: 4 bits
    port_w(v, 0x3CE, 0x06), port_w(v, 0x3CF, 0xFF)
    assert port_r(v, 0x3CF) == 0x0F
    port_w(v, 0x3C8, 5)
    for c in (1, 2, 0x7F):
        port_w(v, 0x3C9, c)
    port_w(v, 0x3C7, 5)
    assert [port_r(v, 0x3C9) for _ in range(3)] == [1, 2, 0x3F]  # 6-bit DAC
    assert port_r(v, 0x3C7) == 3
    v.close()


def test_text_colours_as_mode_3_sets_them() -> None:
    v = make()
    assert v.text_colour(1) == (0, 0, 168)
    assert v.text_colour(6) == (168, 87, 0)  # brown: attribute 6 selects DAC 0x14
    assert v.text_colour(14) == (255, 255, 87)
    assert v.text_colour(15) == (255, 255, 255)
    v.close()


def test_psf_parsers_and_bad_fonts(tmp_path: Path) -> None:
    glyphs = bytes(range(256)) * 16
    table = b"".join(struct.pack("<HH", 0x41 + (i % 26), 0xFFFF) for i in range(256))
    p1 = tmp_path / "f1.psf.gz"
    p1.write_bytes(gzip.compress(b"\x36\x04\x02\x10" + glyphs + table))
    f = PsfFont.load(str(p1))
    assert (f.width, f.height, len(f.glyphs)) == (8, 16, 256) and f.unicode["A"] == 0
    hdr = struct.pack("<4sIIIIIII", b"\x72\xb5\x4a\x86", 0, 32, 1, 2, 32, 16, 10)
    p2 = tmp_path / "f2.psf"
    p2.write_bytes(hdr + bytes(64) + b"x\xff" + "\u2588".encode() + b"\xff")
    f2 = PsfFont.load(str(p2))
    assert (f2.width, f2.height) == (10, 16) and f2.unicode == {"x": 0, "\u2588": 1}
    for bad in (b"", b"\x36\x04\x00\x10" + bytes(10), b"junk" * 10, hdr[:20]):
        (tmp_path / "bad").write_bytes(bad)
        with pytest.raises(FontError):
            PsfFont.load(str(tmp_path / "bad"))
    with pytest.raises(FontError):
        PsfFont.load(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="font"):
        VgaConfig(font=str(tmp_path / "missing")).validate()
    with pytest.raises(ValueError, match="power of two"):
        VgaConfig(vram=3).check()


def test_renderer_redraws_only_dirty_pages() -> None:
    v = make()
    r = Renderer(v, font())
    for i, ch in enumerate(b"AB"):
        v.write(V.VGA_WINDOW_BASE, 0x18000 + 2 * i, 2, ch | 0x0700)
    img = r.screen()
    assert img.size == (640, 400) and r.full_redraws == 1
    before = r.pages_read
    r.screen()  # nothing changed: no page read
    assert r.pages_read == before and r.partial_redraws == 1
    v.write(V.VGA_WINDOW_BASE, 0x18000 + 160, 2, ord("C") | 0x0F00)  # row 1
    img2 = r.screen()
    assert r.pages_read == before + 1
    assert img2.getpixel((0, 16)) == (0, 0, 0) and img2.getbbox() is not None
    assert r.text_cells()[80] == (ord("C"), 0x0F)
    v.close()


def test_framebuffer_render_modes() -> None:
    v = make()
    r = Renderer(v, font())
    dw(v, XRES, 16), dw(v, YRES, 8), dw(v, BPP, 32), dw(v, ENABLE, V.VBE_DISPI_ENABLED)
    v.vram.map[0:4] = bytes((0x30, 0x20, 0x10, 0))  # B G R X
    v.vram.touch(0, 4)
    assert r.screen().getpixel((0, 0)) == (0x10, 0x20, 0x30)
    dw(v, ENABLE, 0), dw(v, BPP, 16), dw(v, ENABLE, V.VBE_DISPI_ENABLED)
    v.vram.map[0:2] = (0xF800).to_bytes(2, "little")  # RGB565 red
    v.vram.touch(0, 2)
    assert r.screen().getpixel((0, 0)) == (0xFF, 0, 0)  # 5 bits widened
    dw(v, ENABLE, 0), dw(v, BPP, 8), dw(v, ENABLE, V.VBE_DISPI_ENABLED)
    v.vram.map[0] = 1  # DAC 1: EGA blue
    v.vram.touch(0, 1)
    assert r.screen().getpixel((0, 0)) == (0, 0, 168)
    v.close()


OPS = st.lists(st.tuples(st.sampled_from(["dispi", "port", "mmio", "fb"]),
                         st.integers(0, 0xFFF), st.integers(0, 0xFFFF)), max_size=60)


@settings(max_examples=150, deadline=None)
@given(OPS)
def test_register_sequences_never_raise_or_leave_the_framebuffer(
        ops: list[tuple[str, int, int]]) -> None:
    logging.disable(logging.CRITICAL)
    v = make(1 * MiB)
    try:
        for kind, a, b in ops:
            if kind == "dispi":
                dw(v, a % 16, b)
            elif kind == "port":
                v.write(V.VGA_PORT_BASE, a % V.VGA_PORT_COUNT, 1, b & 0xFF)
                v.read(V.VGA_PORT_BASE, (a + b) % V.VGA_PORT_COUNT, 1)
            elif kind == "mmio":
                v.write_bar(BAR_MMIO, a, 2, b)
            else:
                v.write_bar(BAR_FB, a * 256, 4, b)
            if v.dispi_enabled:
                x, y, bpp, line, start = v.dispi_mode()
                assert bpp in (4, 8, 15, 16, 24, 32) and 8 <= x <= 16000 and x % 8 == 0
                assert y >= 1 and start + y * line <= v.vram.size
            cols, rows, _ = v.text_geometry()
            assert v.text_start() + 0 <= v.window.size and cols * rows * 2 <= 0x4000
        assert v.read(0x1CE, 1, 2) < 1 << 16
    finally:
        v.close()
        logging.disable(logging.NOTSET)


def test_drawings_are_bounded() -> None:
    assert MAX_PIXELS <= 4096 * 4096
