"""The screen of a ``StdVga`` as a picture: text mode drawn with a console font read from a
PSF file (the Linux console's format, from Debian's console-setup-linux or kbd), DISPI
framebuffer modes as they are in memory.

The renderer keeps the last picture and redraws only what lies in pages the dirty log
reports (plus everything when a register that changes the picture was written): the
guest's stores are not seen one by one, so this is how the host learns what changed.

Pillow is imported here and only here, when a screen is first asked for: a VMM that never
renders does not pay for it at start-up.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyvmm.memory.tracked import PAGE

if TYPE_CHECKING:
    from pyvmm.devices.display.vga import StdVga

PSF1_MAGIC = b"\x36\x04"
PSF1_MODE512, PSF1_MODEHASTAB = 0x01, 0x02
PSF2_MAGIC = b"\x72\xb5\x4a\x86"
PSF2_HAS_UNICODE_TABLE = 0x01
MAX_PIXELS = 4096 * 4096  # a guest cannot make the host draw a bigger picture
# What the VGA's character generator shows for bytes 0-31 (Python's cp437 codec maps
# them to control codes instead).
CP437_LOW = ("\u0020\u263a\u263b\u2665\u2666\u2663\u2660\u2022\u25d8\u25cb\u25d9\u2642"
             "\u2640\u266a\u266b\u263c\u25ba\u25c4\u2195\u203c\u00b6\u00a7\u25ac\u21a8"
             "\u2191\u2193\u2192\u2190\u221f\u2194\u25b2\u25bc")


class FontError(ValueError):
    pass


@dataclass
class PsfFont:
    width: int
    height: int
    glyphs: list[bytes]  # each height rows of ceil(width / 8) bytes, MSB leftmost
    unicode: dict[str, int]  # character -> glyph index

    @classmethod
    def load(cls, path: str) -> PsfFont:
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 22)
        except OSError as e:
            raise FontError(f"font {path}: {e.strerror}") from None
        if data[:2] == b"\x1f\x8b":
            try:
                with gzip.GzipFile(fileobj=io.BytesIO(data)) as g:
                    data = g.read(1 << 22)  # a font is KiBs: bounded whatever it claims
            except (OSError, EOFError) as e:
                raise FontError(f"font {path}: {e}") from None
        try:
            return cls.parse(data)
        except (IndexError, ValueError, UnicodeDecodeError) as e:
            raise FontError(f"font {path}: not a PSF font ({e})") from None

    @classmethod
    def parse(cls, data: bytes) -> PsfFont:
        uni: dict[str, int] = {}
        if data[:2] == PSF1_MAGIC:
            mode, h = data[2], data[3]
            n = 512 if mode & PSF1_MODE512 else 256
            glyphs = [data[4 + i * h:4 + (i + 1) * h] for i in range(n)]
            if len(glyphs[-1]) != h:
                raise ValueError("truncated glyphs")
            if mode & PSF1_MODEHASTAB:
                pos, g = 4 + n * h, 0
                while g < n and pos + 2 <= len(data):
                    u = int.from_bytes(data[pos:pos + 2], "little")
                    pos += 2
                    if u == 0xFFFF:
                        g += 1
                    elif u == 0xFFFE:  # sequences follow: skip to the terminator
                        while pos + 2 <= len(data) and data[pos:pos + 2] != b"\xff\xff":
                            pos += 2
                    else:
                        uni.setdefault(chr(u), g)
            return cls(8, h, glyphs, uni)
        if data[:4] == PSF2_MAGIC:
            def u32(i: int) -> int:
                return int.from_bytes(data[4 * i:4 * i + 4], "little")
            hdr, flags, n, size, h, w = u32(2), u32(3), u32(4), u32(5), u32(6), u32(7)
            if not (0 < w <= 64 and 0 < h <= 64 and size == h * ((w + 7) // 8) and n <= 4096):
                raise ValueError("bad header")
            glyphs = [data[hdr + i * size:hdr + (i + 1) * size] for i in range(n)]
            if len(glyphs[-1]) != size:
                raise ValueError("truncated glyphs")
            if flags & PSF2_HAS_UNICODE_TABLE:
                table = data[hdr + n * size:]
                for g, entry in enumerate(table.split(b"\xff")[:n]):
                    for ch in entry.split(b"\xfe")[0].decode("utf-8", "replace"):
                        uni.setdefault(ch, g)
            return cls(w, h, glyphs, uni)
        raise ValueError("no PSF magic")

    def cp437_glyph_bitmaps(self) -> list[bytes]:
        """The 256 glyphs a VGA's character generator holds in code page 437 order,
        found through the font's Unicode table (glyph i itself without one)."""
        out = []
        blank = self.unicode.get("?", 0)
        for b in range(256):
            ch = CP437_LOW[b] if b < 32 else "\u2302" if b == 0x7F else bytes([b]).decode("cp437")
            g = self.unicode.get(ch) if self.unicode else b
            if g is None and b == 0:
                g = self.unicode.get(" ", blank)
            out.append(self.glyphs[g if g is not None else blank])
        return out


class Renderer:
    """Draws a StdVga's screen; ``screen()`` returns a Pillow RGB image."""

    def __init__(self, vga: StdVga, font: PsfFont) -> None:
        self.vga, self.font = vga, font
        self._glyph_cache: dict[tuple[int, int, int], Any] = {}
        self._cp437 = font.cp437_glyph_bitmaps()
        self._image: Any = None
        self._key: tuple[Any, ...] | None = None
        self.full_redraws = 0
        self.partial_redraws = 0
        self.pages_read = 0

    def mode(self) -> tuple[Any, ...]:
        v = self.vga
        if v.dispi_enabled:
            return ("dispi", *v.dispi_mode())
        if v.graphics_mode:
            return ("vga-graphics",)
        return ("text", *v.text_geometry(), v.text_start())

    def screen(self) -> Any:
        from PIL import Image

        v = self.vga
        key = (*self.mode(), v.generation)
        window_dirty = v.window.dirty_pages()
        vram_dirty = v.vram.dirty_pages()
        full = key != self._key or self._image is None
        self._key = key
        kind = key[0]
        if kind == "dispi":
            self._framebuffer(Image, vram_dirty, full)
        elif kind == "text":
            self._text(Image, window_dirty, full)
        elif full:
            # Planar and chain-4 VGA graphics modes are not modelled (docs/devices/vga.md).
            self._image = Image.new("RGB", (640, 480))
        if full:
            self.full_redraws += 1
        else:
            self.partial_redraws += 1
        return self._image.copy()

    # --- text ---------------------------------------------------------------------------
    def _glyph(self, ch: int, attr: int) -> Any:
        from PIL import Image

        blink = bool(self.vga.att[0x10] & 0x08)
        bg_index = (attr >> 4) & (0x7 if blink else 0xF)
        k = (ch, attr & 0x0F, bg_index)
        img = self._glyph_cache.get(k)
        if img is None:
            fw, fh = self.font.width, self.font.height
            mask = Image.frombytes("1", (fw, fh), self._cp437[ch])
            img = Image.new("RGB", (fw, fh), self.vga.text_colour(bg_index))
            img.paste(self.vga.text_colour(attr & 0x0F), (0, 0), mask)
            self._glyph_cache[k] = img
        return img

    def _text(self, Image: Any, dirty: list[int], full: bool) -> None:
        v = self.vga
        cols, rows, _ = v.text_geometry()
        fw, fh = self.font.width, self.font.height
        start = v.text_start()
        if full:
            self._glyph_cache.clear()
            self._image = Image.new("RGB", (cols * fw, rows * fh))
        mem = v.window.map
        dirty_set = set(dirty)
        end = min(start + cols * rows * 2, v.window.size)
        first_page, last_page = start // PAGE, max(start, end - 1) // PAGE
        touched = {p for p in range(first_page, last_page + 1) if full or p in dirty_set}
        self.pages_read += len(touched)
        for cell in range(cols * rows):
            off = start + cell * 2
            if off + 1 >= v.window.size:
                break
            if off // PAGE not in touched and (off + 1) // PAGE not in touched:
                continue
            self._image.paste(self._glyph(mem[off], mem[off + 1]),
                              ((cell % cols) * fw, (cell // cols) * fh))
        cur = v.cursor()
        if cur is not None:
            pos, top, bottom = cur
            if 0 <= pos < cols * rows and top <= bottom:
                off = start + pos * 2
                colour = v.text_colour(mem[off + 1] & 0x0F) if off + 1 < v.window.size \
                    else (255, 255, 255)
                x, y = (pos % cols) * fw, (pos // cols) * fh
                y0, y1 = y + min(top, fh - 1), y + min(bottom, fh - 1)
                self._image.paste(colour, (x, y0, x + fw, y1 + 1))

    def text_cells(self) -> list[tuple[int, int]]:
        """(character, attribute) of every shown cell, row by row: the buffer decoded,
        what tests compare with what a guest wrote."""
        v = self.vga
        cols, rows, _ = v.text_geometry()
        start, mem = v.text_start(), v.window.map
        return [(mem[start + 2 * i], mem[start + 2 * i + 1]) for i in range(cols * rows)
                if start + 2 * i + 1 < v.window.size]

    # --- framebuffer --------------------------------------------------------------------
    def _framebuffer(self, Image: Any, dirty: list[int], full: bool) -> None:
        v = self.vga
        xres, yres, bpp, line, start = v.dispi_mode()
        if xres * yres > MAX_PIXELS:
            yres = max(1, MAX_PIXELS // xres)
        if full or self._image is None or self._image.size != (xres, yres):
            self._image = Image.new("RGB", (xres, yres))
            rows = range(yres)
            self.pages_read += (yres * line + PAGE - 1) // PAGE
        else:
            ds = sorted(dirty)
            self.pages_read += len(ds)
            hit: set[int] = set()
            for p in ds:
                lo = max(0, (p * PAGE - start) // line)
                hi = min(yres - 1, ((p + 1) * PAGE - 1 - start) // line)
                hit.update(range(lo, hi + 1))
            rows = sorted(hit)  # type: ignore[assignment]
        for y0, y1 in _runs(rows):
            band = self._band(Image, v, xres, bpp, line, start + y0 * line, y1 - y0)
            self._image.paste(band, (0, y0))

    def _band(self, Image: Any, v: StdVga, xres: int, bpp: int, line: int, off: int,
              n: int) -> Any:
        data = bytes(v.vram.map[off:off + n * line])
        if len(data) < n * line:
            data += bytes(n * line - len(data))
        raw = {32: "BGRX", 24: "BGR", 16: "BGR;16", 15: "BGR;15"}  # Pillow's unpackers
        if bpp in raw:
            return Image.frombuffer("RGB", (xres, n), data, "raw", raw[bpp], line, 1)
        if bpp == 8:
            img = Image.frombuffer("P", (xres, n), data, "raw", "P", line, 1)
            pal = [c for i in range(256) for c in v.dac_rgb(i)]
            img.putpalette(pal)
            return img.convert("RGB")
        return Image.new("RGB", (xres, n))  # 4 bpp planar: not modelled


def _runs(rows: Any) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for y in rows:
        if out and out[-1][1] == y:
            out[-1] = (out[-1][0], y + 1)
        else:
            out.append((y, y + 1))
    return out

