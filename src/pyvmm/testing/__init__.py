"""Test helpers shipped with pyvmm, for its own tests and for device authors."""

from pyvmm.testing.driver_queue import DriverQueue
from pyvmm.testing.lines import RecordingLine
from pyvmm.testing.virtio_driver import RecordingInterrupt, VirtioDriver

__all__ = ["DriverQueue", "RecordingInterrupt", "RecordingLine", "VirtioDriver"]
