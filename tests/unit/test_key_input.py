"""Terminal bytes -> PS/2 key presses (``--keyboard stdin``)."""

from __future__ import annotations

import os

from pyvmm.backends.key_input import KeyInput, keys_of
from pyvmm.devices.input.ps2_kbd import Ps2Keyboard
from pyvmm.event import EventManager


def test_terminal_bytes_split_into_text_keys_and_ctrl() -> None:
    assert keys_of(b"a\x1b[Ab\r\x7f\x03\xc3\xa9\x1b") == [
        ("text", "a"), ("key", "KEY_UP"), ("text", "b"), ("text", "\n"), ("text", "\b"),
        ("ctrl", "c"), ("text", "\x1b")]  # the two bytes of a UTF-8 é have no key


def test_feed_presses_the_keyboard_in_set_2() -> None:
    kb = Ps2Keyboard()
    ki = KeyInput(EventManager(), kb)
    ki.feed(b"A\x1b[D\x01")
    assert bytes(kb.queue) == bytes([
        0x12, 0x1C, 0xF0, 0x1C, 0xF0, 0x12,  # shift + a
        0xE0, 0x6B, 0xE0, 0xF0, 0x6B,  # cursor left
        0x14, 0x1C, 0xF0, 0x1C, 0xF0, 0x14])  # ctrl + a
    assert ki.dropped == 0


def test_keys_are_dropped_and_counted_when_the_keyboard_is_off() -> None:
    kb = Ps2Keyboard()
    kb.receive(0xF5)  # scanning off
    kb.queue.clear()
    ki = KeyInput(EventManager(), kb)
    ki.feed(b"ab\x1b[B")
    assert ki.dropped == 3 and not kb.queue


def test_a_pipe_is_read_on_the_event_loop_until_eof() -> None:
    kb = Ps2Keyboard()
    r, w = os.pipe()
    ev = EventManager()
    ki = KeyInput(ev, kb, fd=r)
    try:
        ki.start()
        os.write(w, b"q")
        os.close(w)
        w = -1
        ki._on_input(r, 0)
        assert bytes(kb.queue) == bytes([0x15, 0xF0, 0x15])
        ki._on_input(r, 0)  # EOF: no longer watched
        assert not ki._watching
    finally:
        ki.close()
        os.close(r)
        if w >= 0:
            os.close(w)
        ev.close()
