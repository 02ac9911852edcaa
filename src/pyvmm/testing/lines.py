"""An InterruptLine that records what a device does with it."""

from __future__ import annotations


class RecordingLine:
    def __init__(self) -> None:
        self.level = False
        self.history: list[bool] = []
        self.pulses = 0

    def set_level(self, level: bool) -> None:
        if level != self.level:
            self.history.append(level)
        self.level = level

    def pulse(self) -> None:
        self.pulses += 1
