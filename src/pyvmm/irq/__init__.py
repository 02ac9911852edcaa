from pyvmm.irq.line import InterruptLine, NullLine
from pyvmm.irq.msi import MsiMessage, MsiSink

__all__ = ["InterruptLine", "MsiMessage", "MsiSink", "NullLine"]
