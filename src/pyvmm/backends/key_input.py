"""Terminal input as key presses: ``pyvmm run --keyboard stdin``.

Bytes read from stdin on the event loop become key presses and releases of the PS/2
keyboard: printable ASCII, Enter, Tab, Backspace and Escape through the keyboard's
US-layout ``type_text``, the terminal's cursor-key sequences (``ESC [ A`` …) as the
cursor keys, Ctrl-letter as Left Ctrl + the letter. A tty is put in cbreak mode (no
echo, no line buffering; Ctrl-C still interrupts pyvmm) and restored at close.

A person types slower than the guest reads, so there is no flow control: a key that
finds the keyboard's queue full (or scanning off) is dropped and counted.
"""

from __future__ import annotations

import contextlib
import logging
import os
import termios
import tty
from typing import Protocol

from pyvmm.event import EventManager

log = logging.getLogger("pyvmm")

# xterm/VT100 cursor and editing keys: what a terminal sends -> Linux key name
ESCAPES = {b"\x1b[A": "KEY_UP", b"\x1b[B": "KEY_DOWN", b"\x1b[C": "KEY_RIGHT",
           b"\x1b[D": "KEY_LEFT", b"\x1b[H": "KEY_HOME", b"\x1b[F": "KEY_END",
           b"\x1b[2~": "KEY_INSERT", b"\x1b[3~": "KEY_DELETE", b"\x1b[5~": "KEY_PAGEUP",
           b"\x1b[6~": "KEY_PAGEDOWN"}
CTRL_KEYS = "abcdefghijklmnopqrstuvwxyz"


class KeySink(Protocol):
    def press(self, name: str) -> bool: ...

    def release(self, name: str) -> bool: ...

    def type_text(self, text: str) -> int: ...


def keys_of(data: bytes) -> list[tuple[str, str]]:
    """Split terminal bytes into ("text", chars) and ("key", name) / ("ctrl", letter)
    items, in order. Bytes with no key (non-ASCII, other controls) are left out."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(data):
        seq = next((s for s in ESCAPES if data.startswith(s, i)), None)
        if seq is not None:
            out.append(("key", ESCAPES[seq]))
            i += len(seq)
            continue
        b = data[i]
        i += 1
        if b == 0x0D:
            b = 0x0A  # a raw tty's Enter
        if b == 0x7F:
            b = 0x08  # the Backspace key sends DEL
        if 0x20 <= b < 0x7F or b in (0x08, 0x09, 0x0A, 0x1B):
            out.append(("text", chr(b)))
        elif 1 <= b <= 26:
            out.append(("ctrl", CTRL_KEYS[b - 1]))
    return out


class KeyInput:
    def __init__(self, events: EventManager, sink: KeySink, fd: int = 0) -> None:
        self.events, self.sink, self.fd = events, sink, fd
        self.dropped = 0
        self._saved: list[int | list[bytes | int]] | None = None
        self._watching = False

    def start(self) -> None:
        if os.isatty(self.fd):
            self._saved = termios.tcgetattr(self.fd)
            tty.setcbreak(self.fd)
        try:
            self.events.add(self.fd, self._on_input)
            self._watching = True
        except OSError as e:  # a regular file or /dev/null cannot be watched
            log.warning("keyboard stdin: cannot watch fd %d (%s); no key input",
                        self.fd, e.strerror)

    def _on_input(self, fd: int, ev: int) -> None:
        try:
            data = os.read(fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:  # EOF: stop watching, the VM goes on
            self.events.remove(fd)
            self._watching = False
            return
        self.feed(data)

    def feed(self, data: bytes) -> None:
        for kind, what in keys_of(data):
            if kind == "text":
                ok = self.sink.type_text(what) == 1
            elif kind == "key":
                ok = self.sink.press(what) and self.sink.release(what)
            else:
                ok = (self.sink.press("KEY_LEFTCTRL") and self.sink.press(f"KEY_{what.upper()}")
                      and self.sink.release(f"KEY_{what.upper()}")
                      and self.sink.release("KEY_LEFTCTRL"))
            self.dropped += not ok

    def close(self) -> None:
        if self._watching:
            with contextlib.suppress(Exception):
                self.events.remove(self.fd)
            self._watching = False
        if self._saved is not None:
            with contextlib.suppress(termios.error):
                termios.tcsetattr(self.fd, termios.TCSADRAIN, self._saved)
            self._saved = None
