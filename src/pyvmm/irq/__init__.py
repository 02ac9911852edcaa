"""Interrupt lines and messages; the irqchips that deliver them."""

from pyvmm.irq.line import InterruptLine, KvmIrqLine, NullLine

__all__ = ["InterruptLine", "KvmIrqLine", "NullLine"]
