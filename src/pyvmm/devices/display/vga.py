"""A QEMU "std VGA"-compatible display: the VGA registers a text-mode driver touches, the
legacy 0xA0000-0xBFFFF window, and a PCI function (1234:1111) with a linear framebuffer
(BAR0), the Bochs VBE "DISPI" registers (ports 0x1CE/0x1CF and BAR2) and QEMU's MMIO
aliases of the VGA ports.

What traps and what does not (docs/devices/vga.md): the registers — VGA ports, DISPI
ports, BAR2 — are port/MMIO exits handled here, because each access has side effects
(an index selects, a read resets a flip-flop, a mode set clears memory). The window and
the framebuffer are ``TrackedMemory``: guest RAM in a dirty-logged memslot, so a store
costs no exit and the renderer asks which pages changed. Where no memslot could be
placed, the same memory serves trapped accesses.

Bad register values never raise: DISPI values are fixed up as QEMU does (an unknown BPP
becomes 8, a huge XRES is clamped, offsets past the framebuffer go to 0), out-of-range
indices read 0 or 0xff and ignore writes, and each class is logged once.
"""

from __future__ import annotations

from typing import Any

from pyvmm.devices.pci.config_space import PCIConfigSpace
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.memory import TrackedMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import vga as V

BAR_FB, BAR_MMIO = 0, 2
MiB = 1 << 20

# Valid bits of each sequencer and graphics controller register (IBM VGA reference).
SEQ_MASK = (0x03, 0x3D, 0x0F, 0x3F, 0x0E)
GFX_MASK = (0x0F, 0x0F, 0x0F, 0x1F, 0x03, 0x7B, 0x0F, 0x0F, 0xFF)

# The state a PC BIOS leaves after setting mode 3 (80x25 colour text, 9x16 cells shown
# as 8x16 here): there is no BIOS in pyvmm, and a guest that only writes 0xB8000 expects
# this. Values from the IBM VGA reference's mode 3 table.
MODE3_MISC = 0x67
MODE3_SEQ = (0x03, 0x00, 0x03, 0x00, 0x02)
MODE3_CRTC = (0x5F, 0x4F, 0x50, 0x82, 0x55, 0x81, 0xBF, 0x1F, 0x00, 0x4F, 0x0D, 0x0E,
              0x00, 0x00, 0x00, 0x00, 0x9C, 0x8E, 0x8F, 0x28, 0x1F, 0x96, 0xB9, 0xA3, 0xFF)
MODE3_GFX = (0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x0E, 0x00, 0xFF)
MODE3_ATT = (0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3A, 0x3B, 0x3C,
             0x3D, 0x3E, 0x3F, 0x0C, 0x00, 0x0F, 0x08, 0x00)


def ega_dac() -> bytearray:
    """The DAC as mode 3 loads it: entries 0-63 the EGA colours (bits rgbRGB: primary
    at 2/3 intensity, secondary at 1/3), the rest black. 6-bit values."""
    dac = bytearray(256 * 3)
    for i in range(64):
        for c, (hi, lo) in enumerate(((2, 5), (1, 4), (0, 3))):  # R, G, B
            dac[i * 3 + c] = 42 * (i >> hi & 1) + 21 * (i >> lo & 1)
    return dac


def _c6(v: int) -> int:
    v &= 0x3F
    return v << 2 | (v & 1) * 3


class StdVga(PCIDevice):
    name = "vga"

    def __init__(self, vram: TrackedMemory, window: TrackedMemory,
                 errors: OnceLog | None = None, font_path: str = "") -> None:
        super().__init__()
        self.font_path = font_path  # what the renderer draws text with (render.py)
        self._renderer: Any = None
        if vram.size < MiB or vram.size & (vram.size - 1) or vram.size > 256 * MiB:
            raise ValueError("vram: a power of two from 1 to 256 MiB")
        self.vram, self.window = vram, window
        self.errors = errors or OnceLog()
        c = self.config = PCIConfigSpace(V.PCI_VENDOR_ID_QEMU, V.PCI_DEVICE_ID_QEMU_VGA,
                                         V.PCI_CLASS_DISPLAY_VGA, revision=2,
                                         subsystem_vendor_id=0x1AF4, subsystem_id=0x1100)
        c.add_bar(BAR_FB, vram.size, prefetchable=True)
        c.add_bar(BAR_MMIO, V.STDVGA_MMIO_SIZE)
        self.generation = 0  # bumped by every register write that changes the picture
        self.bad_accesses = 0
        self.reset()

    def reset(self) -> None:
        self.misc = MODE3_MISC
        self.seq = bytearray(MODE3_SEQ)
        self.seq_index = 0
        self.crtc = bytearray(MODE3_CRTC)
        self.crtc_index = 0
        self.gfx = bytearray(MODE3_GFX)
        self.gfx_index = 0
        self.att = bytearray(MODE3_ATT)
        self.att_index = 0  # with the PAS bit (0x20)
        self.att_flip = False  # False: the next 0x3C0 write is an index
        self.st01 = 0
        self.feature = 0
        self.dac = ega_dac()
        self.dac_read, self.dac_write, self.dac_sub = 0, 0, 0
        self.dac_state = 0  # 0x3C7 read: 0 = last index written was for writing, 3 read
        self.pel_mask = 0xFF
        self.dispi = [0] * V.VBE_DISPI_INDEX_NB
        self.dispi[V.VBE_DISPI_INDEX_ID] = V.VBE_DISPI_ID5
        self.dispi_index = 0
        self.line_offset = 0  # bytes per framebuffer line (DISPI)
        self.start_addr = 0  # byte offset of the first shown pixel (DISPI)
        self.generation += 1

    def close(self) -> None:
        self.vram.close()
        self.window.close()

    def metrics(self) -> dict[str, object]:
        r = self._renderer
        return {"vram": self.vram.counters(), "window": self.window.counters(),
                "bad_accesses": self.bad_accesses, "errors": dict(self.errors.counts),
                "render": {} if r is None else {
                    "full": r.full_redraws, "partial": r.partial_redraws,
                    "pages_read": r.pages_read}}

    def renderer(self) -> Any:
        """The device's ``render.Renderer`` (made, and Pillow imported, on first use)."""
        if self._renderer is None:
            from pyvmm.devices.display.render import PsfFont, Renderer

            self._renderer = Renderer(self, PsfFont.load(self.font_path))
        return self._renderer

    def screen(self) -> Any:
        """The screen as a Pillow RGB image, redrawn where the dirty log says."""
        return self.renderer().screen()

    def _bad(self, key: str, message: str) -> None:
        self.bad_accesses += 1
        self.errors.warn(key, f"vga: {message}")

    # --- what the renderer asks ------------------------------------------------------
    @property
    def dispi_enabled(self) -> bool:
        return bool(self.dispi[V.VBE_DISPI_INDEX_ENABLE] & V.VBE_DISPI_ENABLED)

    @property
    def graphics_mode(self) -> bool:
        return bool(self.gfx[V.VGA_GFX_MISC] & 1)

    def window_base(self) -> int:
        """Where the CPU's view starts in the window: memory map select (GR06 bits 2-3)."""
        return (0x00000, 0x00000, 0x10000, 0x18000)[self.gfx[V.VGA_GFX_MISC] >> 2 & 3]

    def text_geometry(self) -> tuple[int, int, int]:
        """(columns, rows, cell height) from the CRTC, bounded to what fits the
        window's 32 KiB text aperture (a guest's garbage CRTC values cannot make the
        renderer read outside it or draw a huge image)."""
        c = self.crtc
        cols = c[V.VGA_CRTC_H_DISP] + 1
        vde = (c[V.VGA_CRTC_V_DISP_END] | (c[V.VGA_CRTC_OVERFLOW] >> 1 & 1) << 8
               | (c[V.VGA_CRTC_OVERFLOW] >> 6 & 1) << 9) + 1
        cell_h = (c[V.VGA_CRTC_MAX_SCAN] & 0x1F) + 1
        rows = max(1, vde // cell_h)
        cols = min(cols, 132)
        rows = min(rows, 0x4000 // (2 * cols), 60)
        return cols, rows, cell_h

    def text_start(self) -> int:
        """Byte offset in the window of the first cell: the CRTC start address."""
        return self.window_base() + 2 * (self.crtc[V.VGA_CRTC_START_HI] << 8
                                         | self.crtc[V.VGA_CRTC_START_LO])

    def cursor(self) -> tuple[int, int, int] | None:
        """(cell index from the start address, first scan line, last scan line), or None
        when CR0A bit 5 hides it."""
        c = self.crtc
        if c[V.VGA_CRTC_CURSOR_START] & V.VGA_CR0A_CURSOR_OFF:
            return None
        pos = (c[V.VGA_CRTC_CURSOR_HI] << 8 | c[V.VGA_CRTC_CURSOR_LO]) - (
            c[V.VGA_CRTC_START_HI] << 8 | c[V.VGA_CRTC_START_LO])
        return pos, c[V.VGA_CRTC_CURSOR_START] & 0x1F, c[V.VGA_CRTC_CURSOR_END] & 0x1F

    def text_colour(self, index: int) -> tuple[int, int, int]:
        """RGB of attribute colour ``index`` (0-15): attribute palette, then the DAC."""
        a = self.att[index & 15] & 0x3F
        if self.att[V.VGA_ATT_MODE] & 0x80:  # P5-P4 from the colour select register
            a = (a & 0x0F) | (self.att[0x14] & 0x03) << 4
        a |= (self.att[0x14] & 0x0C) << 4
        return self.dac_rgb(a & self.pel_mask)

    def dac_rgb(self, i: int) -> tuple[int, int, int]:
        r, g, b = self.dac[i * 3:i * 3 + 3]
        if self.dispi[V.VBE_DISPI_INDEX_ENABLE] & V.VBE_DISPI_8BIT_DAC:
            return r, g, b
        # 6 to 8 bits as QEMU's std VGA does (shift, then the low bit copied into the
        # two new ones: 42 -> 168, 21 -> 87, 63 -> 255), so screens compare pixel for
        # pixel with QEMU's screendump; a real DAC is analogue and defines no rule.
        return _c6(r), _c6(g), _c6(b)

    def dispi_mode(self) -> tuple[int, int, int, int, int]:
        """(xres, yres, bpp, line length in bytes, start byte) of the enabled mode."""
        r = self.dispi
        bpp = r[V.VBE_DISPI_INDEX_BPP]
        return (r[V.VBE_DISPI_INDEX_XRES], r[V.VBE_DISPI_INDEX_YRES], bpp, self.line_offset,
                self.start_addr)

    # --- BARs --------------------------------------------------------------------------
    def bar_moved(self, index: int, new: int | None) -> None:
        if index == BAR_FB:
            self.vram.moved(new)

    def read_bar(self, index: int, offset: int, size: int) -> int:
        if index == BAR_FB:
            return self.vram.read(offset, size)
        if index != BAR_MMIO:
            return 0
        return self._mmio_read(offset, size)

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        if index == BAR_FB:
            self.vram.write(offset, size, value)
        elif index == BAR_MMIO:
            self._mmio_write(offset, size, value)

    def _mmio_read(self, offset: int, size: int) -> int:
        if V.STDVGA_MMIO_VGA <= offset < V.STDVGA_MMIO_VGA + 0x20:
            v = 0
            for i in range(min(size, V.STDVGA_MMIO_VGA + 0x20 - offset)):
                v |= self.port_read(0x3C0 + offset - V.STDVGA_MMIO_VGA + i) << (8 * i)
            return v
        if V.STDVGA_MMIO_DISPI <= offset < V.STDVGA_MMIO_DISPI + 2 * V.VBE_DISPI_INDEX_NB:
            if size != 2 or offset & 1:
                self._bad("dispi-mmio-size", f"DISPI MMIO read of {size} bytes at "
                          f"{offset:#x} (16-bit registers): reads 0")
                return 0
            return self.dispi_read((offset - V.STDVGA_MMIO_DISPI) >> 1)
        if offset == V.STDVGA_MMIO_QEXT + V.QEXT_SIZE:
            return 8  # the size of the extended register block
        if offset == V.STDVGA_MMIO_QEXT + V.QEXT_BYTEORDER:
            return V.QEXT_LITTLE_ENDIAN
        return 0  # EDID (not provided) and unassigned offsets

    def _mmio_write(self, offset: int, size: int, value: int) -> None:
        if V.STDVGA_MMIO_VGA <= offset < V.STDVGA_MMIO_VGA + 0x20:
            for i in range(min(size, V.STDVGA_MMIO_VGA + 0x20 - offset)):
                self.port_write(0x3C0 + offset - V.STDVGA_MMIO_VGA + i, value >> (8 * i) & 0xFF)
        elif V.STDVGA_MMIO_DISPI <= offset < V.STDVGA_MMIO_DISPI + 2 * V.VBE_DISPI_INDEX_NB:
            if size != 2 or offset & 1:
                self._bad("dispi-mmio-size", f"DISPI MMIO write of {size} bytes at "
                          f"{offset:#x} (16-bit registers): ignored")
                return
            self.dispi_write((offset - V.STDVGA_MMIO_DISPI) >> 1, value & 0xFFFF)
        # EDID, QEMU ext (byte order is fixed little-endian here) and the rest: read-only

    # --- the bus: the device's fixed ranges ------------------------------------------
    def read(self, base: int, offset: int, size: int) -> int:
        if base == V.VGA_WINDOW_BASE:
            return self.window.read(offset, size)
        port = base + offset
        if port in (V.VBE_DISPI_IOPORT_INDEX, V.VBE_DISPI_IOPORT_DATA):
            if port == V.VBE_DISPI_IOPORT_INDEX:
                return self.dispi_index & ((1 << (8 * size)) - 1)
            return self.dispi_read(self.dispi_index) & ((1 << (8 * size)) - 1)
        v = 0
        for i in range(size):  # a word access to an index/data pair is two byte accesses
            v |= self.port_read(port + i) << (8 * i)
        return v

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        if base == V.VGA_WINDOW_BASE:
            self.window.write(offset, size, value)
            return
        port = base + offset
        if port == V.VBE_DISPI_IOPORT_INDEX:
            self.dispi_index = value & 0xFFFF
            return
        if port == V.VBE_DISPI_IOPORT_DATA:
            self.dispi_write(self.dispi_index, value & 0xFFFF)
            return
        for i in range(size):
            self.port_write(port + i, value >> (8 * i) & 0xFF)

    # --- VGA ports ----------------------------------------------------------------------
    def _crtc_port(self, port: int) -> bool:
        """Whether ``port`` is decoded under the current I/O address select: the colour
        ports (0x3Dx) with misc bit 0 set, the mono ones (0x3Bx) without."""
        colour = bool(self.misc & V.VGA_MIS_COLOR)
        return (0x3D0 <= port <= 0x3DF) if colour else (0x3B0 <= port <= 0x3BF)

    def port_read(self, port: int) -> int:
        if port < 0x3C0 or port > 0x3CF:
            if not self._crtc_port(port):
                return 0xFF  # the other decode (mono vs colour): nothing answers
            lo = port & 0xF
            if lo == 0x4:
                return self.crtc_index
            if lo == 0x5:
                if self.crtc_index < V.VGA_CRTC_REGS:
                    return self.crtc[self.crtc_index]
                return 0xFF
            if lo == 0xA:
                # Reading input status 1 resets the attribute flip-flop. There is no
                # beam: the retrace and display-enable bits toggle on each read, so a
                # driver that waits for a retrace edge sees one at once (as QEMU does).
                self.att_flip = False
                self.st01 ^= V.VGA_IS1_VR | V.VGA_IS1_DE
                return self.st01
            return 0xFF
        if port == V.VGA_ATT_W:
            return self.att_index
        if port == V.VGA_ATT_R:
            i = self.att_index & 0x1F
            return self.att[i] if i < V.VGA_ATT_REGS else 0
        if port == V.VGA_IS0_R:
            return 0x10  # switch sense: a colour monitor (as QEMU)
        if port == V.VGA_SEQ_I:
            return self.seq_index
        if port == V.VGA_SEQ_D:
            return self.seq[self.seq_index] if self.seq_index < V.VGA_SEQ_REGS else 0
        if port == V.VGA_PEL_MSK:
            return self.pel_mask
        if port == V.VGA_PEL_IR:
            return self.dac_state
        if port == V.VGA_PEL_IW:
            return self.dac_write
        if port == V.VGA_PEL_D:
            v = self.dac[self.dac_read * 3 + self.dac_sub]
            self.dac_sub += 1
            if self.dac_sub == 3:
                self.dac_sub, self.dac_read = 0, (self.dac_read + 1) & 0xFF
            return v
        if port == V.VGA_FTC_R:
            return self.feature
        if port == V.VGA_MIS_R:
            return self.misc
        if port == V.VGA_GFX_I:
            return self.gfx_index
        if port == V.VGA_GFX_D:
            return self.gfx[self.gfx_index] if self.gfx_index < V.VGA_GFX_REGS else 0
        return 0xFF

    def port_write(self, port: int, value: int) -> None:
        value &= 0xFF
        if port < 0x3C0 or port > 0x3CF:
            if not self._crtc_port(port):
                return
            lo = port & 0xF
            if lo == 0x4:
                self.crtc_index = value
            elif lo == 0x5:
                self._crtc_write(value)
            elif lo == 0xA:
                self.feature = value & 0x03
            return
        self.generation += 1
        if port == V.VGA_ATT_W:
            if not self.att_flip:
                self.att_index = value & 0x3F
            else:
                i = self.att_index & 0x1F
                if i < 0x10:
                    self.att[i] = value & 0x3F
                elif i < V.VGA_ATT_REGS:
                    self.att[i] = value
                else:
                    self._bad("att-index", f"attribute write to index {i:#x} (0-0x14): "
                              "ignored")
            self.att_flip = not self.att_flip
        elif port == V.VGA_MIS_W:
            self.misc = value & 0xEF  # bit 4 is reserved
        elif port == V.VGA_SEQ_I:
            self.seq_index = value & 0x07
        elif port == V.VGA_SEQ_D:
            if self.seq_index < V.VGA_SEQ_REGS:
                self.seq[self.seq_index] = value & SEQ_MASK[self.seq_index]
            else:
                self._bad("seq-index", f"sequencer write to index {self.seq_index}: ignored")
        elif port == V.VGA_PEL_MSK:
            self.pel_mask = value
        elif port == V.VGA_PEL_IR:
            self.dac_read, self.dac_sub, self.dac_state = value, 0, 3
        elif port == V.VGA_PEL_IW:
            self.dac_write, self.dac_sub, self.dac_state = value, 0, 0
        elif port == V.VGA_PEL_D:
            bits = 0xFF if self.dispi[V.VBE_DISPI_INDEX_ENABLE] & V.VBE_DISPI_8BIT_DAC else 0x3F
            self.dac[self.dac_write * 3 + self.dac_sub] = value & bits
            self.dac_sub += 1
            if self.dac_sub == 3:
                self.dac_sub, self.dac_write = 0, (self.dac_write + 1) & 0xFF
        elif port == V.VGA_GFX_I:
            self.gfx_index = value & 0x0F
        elif port == V.VGA_GFX_D:
            if self.gfx_index < V.VGA_GFX_REGS:
                self.gfx[self.gfx_index] = value & GFX_MASK[self.gfx_index]
            else:
                self._bad("gfx-index", f"graphics write to index {self.gfx_index}: ignored")

    def _crtc_write(self, value: int) -> None:
        i = self.crtc_index
        if i >= V.VGA_CRTC_REGS:
            self._bad("crtc-index", f"CRTC write to index {i:#x} (0-0x18): ignored")
            return
        if self.crtc[V.VGA_CRTC_V_SYNC_END] & 0x80 and i <= V.VGA_CRTC_OVERFLOW:
            # CR11 bit 7 protects CR00-CR07, except the line compare bit of CR07.
            if i == V.VGA_CRTC_OVERFLOW:
                self.crtc[i] = (self.crtc[i] & ~0x10) | (value & 0x10)
            return
        self.crtc[i] = value
        self.generation += 1

    # --- DISPI -------------------------------------------------------------------------
    def dispi_read(self, index: int) -> int:
        r = self.dispi
        if index >= V.VBE_DISPI_INDEX_NB:
            self._bad("dispi-index", f"DISPI read of index {index:#x}: reads 0")
            return 0
        if r[V.VBE_DISPI_INDEX_ENABLE] & V.VBE_DISPI_GETCAPS and index in (
                V.VBE_DISPI_INDEX_XRES, V.VBE_DISPI_INDEX_YRES, V.VBE_DISPI_INDEX_BPP):
            return (V.VBE_DISPI_MAX_XRES, V.VBE_DISPI_MAX_YRES, V.VBE_DISPI_MAX_BPP)[index - 1]
        if index == V.VBE_DISPI_INDEX_VIDEO_MEMORY_64K:
            return self.vram.size >> 16
        return r[index]

    def dispi_write(self, index: int, value: int) -> None:
        r = self.dispi
        self.generation += 1
        if index == V.VBE_DISPI_INDEX_ID:
            if V.VBE_DISPI_ID0 <= value <= V.VBE_DISPI_ID5:
                r[index] = value
            else:
                self._bad("dispi-id", f"DISPI ID {value:#x} (0xb0c0-0xb0c5): ignored")
        elif index in (V.VBE_DISPI_INDEX_XRES, V.VBE_DISPI_INDEX_YRES,
                       V.VBE_DISPI_INDEX_BPP, V.VBE_DISPI_INDEX_VIRT_WIDTH,
                       V.VBE_DISPI_INDEX_X_OFFSET, V.VBE_DISPI_INDEX_Y_OFFSET):
            r[index] = value
            self._fixup()
        elif index == V.VBE_DISPI_INDEX_BANK:
            # Only as many 64 KiB banks as there is memory; the bank selects what the
            # 0xA0000 window would show of the framebuffer in banked modes (stored, see
            # docs/devices/vga.md: the window is not banked here).
            r[index] = value & ((self.vram.size >> 16) - 1)
        elif index == V.VBE_DISPI_INDEX_ENABLE:
            old = r[index]
            if value & V.VBE_DISPI_ENABLED and not old & V.VBE_DISPI_ENABLED:
                r[V.VBE_DISPI_INDEX_VIRT_WIDTH] = 0
                r[V.VBE_DISPI_INDEX_X_OFFSET] = r[V.VBE_DISPI_INDEX_Y_OFFSET] = 0
                r[index] = old | V.VBE_DISPI_ENABLED
                self._fixup()
                if not value & V.VBE_DISPI_NOCLEARMEM:
                    n = r[V.VBE_DISPI_INDEX_YRES] * self.line_offset
                    self.vram.map[0:n] = bytes(n)
                    self.vram.touch(0, n)
            r[index] = value
        elif index < V.VBE_DISPI_INDEX_NB:
            # VIRT_HEIGHT and VIDEO_MEMORY_64K are computed: writes are ignored (QEMU).
            pass
        else:
            self._bad("dispi-index", f"DISPI write of {value:#x} to index {index:#x}: "
                      "ignored")

    def _fixup(self) -> None:
        """QEMU's checks of an enabled mode (vbe_fixup_regs), in its order: BPP from the
        set it knows (else 8), XRES a non-zero multiple of 8 up to the maximum, the
        virtual width at least XRES, YRES at most what the memory holds at that line
        length, offsets that leave the visible area inside the memory (else 0)."""
        r = self.dispi
        if not r[V.VBE_DISPI_INDEX_ENABLE] & V.VBE_DISPI_ENABLED:
            return
        bpp = r[V.VBE_DISPI_INDEX_BPP]
        if bpp not in (4, 8, 15, 16, 24, 32):
            self._bad("dispi-bpp", f"DISPI BPP {bpp} (4, 8, 15, 16, 24, 32): set to 8")
            bpp = r[V.VBE_DISPI_INDEX_BPP] = 8
        bits = 16 if bpp == 15 else bpp
        x = r[V.VBE_DISPI_INDEX_XRES] & ~7
        if x == 0:
            x = 8
        if x > V.VBE_DISPI_MAX_XRES:
            self._bad("dispi-xres", f"DISPI XRES {x} > {V.VBE_DISPI_MAX_XRES}: clamped")
            x = V.VBE_DISPI_MAX_XRES
        r[V.VBE_DISPI_INDEX_XRES] = x
        vw = min(r[V.VBE_DISPI_INDEX_VIRT_WIDTH] & ~7, V.VBE_DISPI_MAX_XRES)
        vw = r[V.VBE_DISPI_INDEX_VIRT_WIDTH] = max(vw, x)
        line = vw * bits // 8
        maxy = self.vram.size // line
        y = r[V.VBE_DISPI_INDEX_YRES] or 1
        if y > V.VBE_DISPI_MAX_YRES or y > maxy:
            self._bad("dispi-yres", f"DISPI YRES {y} does not fit the framebuffer at this "
                      "line length: clamped")
            y = min(y, V.VBE_DISPI_MAX_YRES, maxy)
        r[V.VBE_DISPI_INDEX_YRES] = y
        r[V.VBE_DISPI_INDEX_X_OFFSET] = min(r[V.VBE_DISPI_INDEX_X_OFFSET], V.VBE_DISPI_MAX_XRES)
        r[V.VBE_DISPI_INDEX_Y_OFFSET] = min(r[V.VBE_DISPI_INDEX_Y_OFFSET], V.VBE_DISPI_MAX_YRES)
        start = r[V.VBE_DISPI_INDEX_X_OFFSET] * bits // 8 + r[V.VBE_DISPI_INDEX_Y_OFFSET] * line
        if start + y * line > self.vram.size:
            self._bad("dispi-offset", "DISPI offsets put the screen past the framebuffer: "
                      "reset to 0")
            r[V.VBE_DISPI_INDEX_Y_OFFSET] = 0
            start = r[V.VBE_DISPI_INDEX_X_OFFSET] * bits // 8
            if start + y * line > self.vram.size:
                r[V.VBE_DISPI_INDEX_X_OFFSET] = 0
                start = 0
        r[V.VBE_DISPI_INDEX_VIRT_HEIGHT] = min(maxy, 0xFFFF)
        self.line_offset = line
        # QEMU keeps the start in 32-bit units (vbe_start_addr = offset / 4).
        self.start_addr = start & ~3
