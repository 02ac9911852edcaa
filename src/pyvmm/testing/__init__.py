"""Test helpers shipped with pyvmm, for its own tests and for device authors."""

from pyvmm.testing.driver_queue import DriverQueue
from pyvmm.testing.lines import RecordingLine

__all__ = ["DriverQueue", "RecordingLine"]
