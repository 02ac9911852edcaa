"""Test helpers shipped with pyvmm, for its own tests and for device authors."""

from pyvmm.testing.lines import RecordingLine

__all__ = ["RecordingLine"]
