"""The registry entry of the IDE disks: their typed config and ``create``. Kept apart
from the device (``controller.py`` and what it imports: ~10 ms measured with
``-X importtime``) so that a machine without an IDE disk does not import it at start-up;
``create`` imports it when one is configured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm import __version__
from pyvmm.devices.spec import DeviceSpec, DiskConfig, HostContext, IsaRange, Kind
from pyvmm.errors import ConfigError
from pyvmm.schema import option
from pyvmm.uapi import ata as A

if TYPE_CHECKING:
    from pyvmm.devices.emulated.ide.controller import PiixIde


@dataclass(kw_only=True)
class IdeConfig(DiskConfig):
    """A raw image at a position of the one PIIX3 IDE function (the serial number
    defaults to PYVMM-IDE-<bus><unit>)."""

    bus: int = option(0, "channel: 0 primary (ports 0x1f0/0x3f6, IRQ 14), 1 secondary "
                      "(0x170/0x376, IRQ 15)")
    unit: int = option(0, "position on the channel: 0 (device 0, master) or 1 (device 1, "
                       "slave)")
    native: bool = option(False, "the function in native-PCI mode: both channels in I/O "
                          "BARs 0-3 on INTx instead of the legacy ports and IRQs 14/15 "
                          "(what exports over vfio-user); one mode per function")

    def check(self) -> None:
        super().check()
        if self.bus not in (0, 1):
            raise ValueError(f"bus {self.bus}: 0 (primary) or 1 (secondary)")
        if self.unit not in (0, 1):
            raise ValueError(f"unit {self.unit}: 0 or 1")


def create(cfg: IdeConfig, ctx: HostContext) -> PiixIde:
    """Every IDE disk of a machine attaches to one PIIX function, made by the first."""
    from pyvmm.devices.emulated.ide.controller import MODEL, PiixIde
    from pyvmm.devices.emulated.ide.disk import AtaDisk

    def make() -> PiixIde:
        if cfg.native:
            return PiixIde(ctx.mem, None, native=True)
        try:
            lines = (ctx.line(0), ctx.line(1))
        except ConfigError:  # exported: no ISA lines there
            raise ConfigError("ide: compatibility mode's fixed ports and IRQs 14/15 are no "
                              "PCI region or interrupt; export it with native=on") from None
        return PiixIde(ctx.mem, lines)

    ctrl = ctx.shared("piix-ide", make)
    if ctrl.native != cfg.native:
        mode = "on" if cfg.native else "off"
        raise ConfigError(f"ide: bus {cfg.bus} unit {cfg.unit}: native={mode} but the "
                          "function's other disks say otherwise (one mode per function)")
    ctrl.check_free(cfg.bus, cfg.unit)  # before the image is opened (and locked)
    ctrl.attach(cfg.bus, cfg.unit, AtaDisk(
        cfg.open(ctx), cfg.unit, serial=cfg.serial or f"PYVMM-IDE-{cfg.bus}{cfg.unit}",
        model=MODEL, firmware=__version__, errors=ctrl.errors))
    return ctrl


SPEC = DeviceSpec("ide", IdeConfig, Kind.PCI, create,
                  "IDE/ATA disk on a PIIX3 IDE function (legacy ports, bus-master DMA)",
                  option="disk", select=("if", "ide"), positional="path",
                  isa=(IsaRange("pio", A.ATA_PRIMARY_CMD, 8, "pri"),
                       IsaRange("pio", A.ATA_PRIMARY_CTL, 1, "pri-ctl"),
                       IsaRange("pio", A.ATA_SECONDARY_CMD, 8, "sec"),
                       IsaRange("pio", A.ATA_SECONDARY_CTL, 1, "sec-ctl")),
                  gsi=(A.ATA_PRIMARY_IRQ, A.ATA_SECONDARY_IRQ), exportable=True, doc="ide")
