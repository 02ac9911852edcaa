"""An interrupt line as a device sees it: a level it drives, nothing about the chip.

The chips that drive lines into KVM (``pyvmm.irqchip``) sit above the devices; this
module is what devices import, and it imports nothing.
"""

from __future__ import annotations

from typing import Protocol


class InterruptLine(Protocol):
    def set_level(self, level: bool) -> None: ...

    def pulse(self) -> None: ...


class NullLine:
    """A line connected to nothing (a device without an interrupt)."""

    def set_level(self, level: bool) -> None:
        pass

    def pulse(self) -> None:
        pass
