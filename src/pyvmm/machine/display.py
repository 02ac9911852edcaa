"""``--display png:DIR[,every=S]``: the screen of the machine's display written as PNG
files while it runs (every S seconds, only when the picture changed) and once at the
stop. The PNGs are named screen-NNNN.png; the last one is also screen.png."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pyvmm.errors import ConfigError

if TYPE_CHECKING:
    from pyvmm.machine.vm import Machine


@dataclass(frozen=True)
class PngOutput:
    folder: str
    every: float = 1.0

    @classmethod
    def parse(cls, text: str) -> PngOutput:
        kind, _, rest = text.partition(":")
        if kind != "png" or not rest:
            raise ValueError(f"display {text!r}: png:DIR[,every=SECONDS]")
        folder, *opts = rest.split(",")
        every = 1.0
        for o in opts:
            k, _, v = o.partition("=")
            if k != "every":
                raise ValueError(f"display {text!r}: unknown option {k!r} (every=SECONDS)")
            try:
                every = float(v)
            except ValueError:
                raise ValueError(f"display {text!r}: every={v!r} is not a number") from None
            if not 0.05 <= every <= 3600:
                raise ValueError(f"display {text!r}: every= from 0.05 to 3600 seconds")
        if not folder:
            raise ValueError(f"display {text!r}: png:DIR needs a folder")
        return cls(folder, every)

    def validate(self) -> None:
        if not os.path.isdir(self.folder):
            raise ConfigError(f"display: folder {self.folder!r} does not exist")


class ScreenWriter:
    """Writes the screen when due; called from the thread that waits for the run (the
    caller's, unfiltered by seccomp), between its waits."""

    def __init__(self, machine: Machine, out: PngOutput) -> None:
        self.m, self.out = machine, out
        self.written = 0
        self._last: bytes | None = None
        self._next = time.monotonic() + out.every

    def due(self) -> float:
        """Seconds until the next picture (0 when it is due)."""
        return max(0.0, self._next - time.monotonic())

    def tick(self) -> None:
        if self.due() > 0 or self.m.flags.stopping:
            return
        self._next = time.monotonic() + self.out.every
        try:
            self.write()
        except OSError as e:
            self.m.guest_errors.warn("display-write", f"display: cannot write a PNG: "
                                     f"{e.strerror}")

    def write(self) -> None:
        img: Any = self.m.screen()
        raw = img.tobytes()
        if raw == self._last:
            return
        self._last = raw
        path = os.path.join(self.out.folder, f"screen-{self.written:04d}.png")
        img.save(path)
        img.save(os.path.join(self.out.folder, "screen.png"))
        self.written += 1
