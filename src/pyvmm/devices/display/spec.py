"""The registry entry of the std-VGA display. Kept apart from the device and its renderer
so that a machine without a display imports neither (nor Pillow) at start-up."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.devices.spec import DeviceConfig, DeviceSpec, HostContext, IsaRange, Kind
from pyvmm.schema import option
from pyvmm.uapi import vga as V

if TYPE_CHECKING:
    from pyvmm.devices.display.vga import StdVga

# Debian console-setup-linux: the IBM VGA 8x16 glyphs, with a Unicode table.
DEFAULT_FONT = "/usr/share/consolefonts/Uni2-VGA16.psf.gz"


@dataclass(kw_only=True)
class VgaConfig(DeviceConfig):
    """QEMU's -device VGA: VGA text mode in the legacy window, the Bochs VBE DISPI
    registers and a linear framebuffer in BAR0."""

    vram: int = option(16, "framebuffer (BAR0) size in MiB: a power of two, 1-256",
                       metavar="MIB")
    font: str = option(DEFAULT_FONT, "PSF console font (.psf or .psf.gz) text mode is "
                       "drawn with", metavar="PATH")

    def check(self) -> None:
        if not 1 <= self.vram <= 256 or self.vram & (self.vram - 1):
            raise ValueError(f"vram {self.vram}: a power of two from 1 to 256 (MiB)")

    def validate(self) -> None:
        """Before the VM is built: the font loads, or one line."""
        from pyvmm.devices.display.render import PsfFont

        PsfFont.load(self.font)


def create(cfg: VgaConfig, ctx: HostContext) -> StdVga:
    from pyvmm.devices.display.vga import StdVga

    vram = ctx.tracked_memory(cfg.vram << 20, f"pyvmm-{ctx.name}-vram")
    window = ctx.tracked_memory(V.VGA_WINDOW_SIZE, f"pyvmm-{ctx.name}-window")
    window.moved(V.VGA_WINDOW_BASE)  # fixed: the legacy window is always decoded
    return StdVga(vram, window, font_path=cfg.font)


SPEC = DeviceSpec("vga", VgaConfig, Kind.PCI, create,
                  "std VGA (QEMU -device VGA): text mode, Bochs VBE DISPI, linear "
                  "framebuffer; dirty-logged memory",
                  isa=(IsaRange("pio", V.VGA_PORT_BASE, V.VGA_PORT_COUNT, "ports"),
                       IsaRange("pio", V.VBE_DISPI_IOPORT_INDEX, 2, "dispi"),
                       IsaRange("mmio", V.VGA_WINDOW_BASE, V.VGA_WINDOW_SIZE, "window")),
                  exportable=False, doc="vga")
