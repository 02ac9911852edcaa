"""Key names and PS/2 scan codes.

Names and numbers of the keys are Linux's input event codes
(``include/uapi/linux/input-event-codes.h``, ``KEY_*``); a test checks them against the
installed header. The scan codes are those of an IBM PC AT / MF II keyboard as listed in
Microsoft's "Keyboard Scan Code Specification" (revision 1.3a, 2000), appendix C: the
make code of each key in scan code set 1 (the XT set, which an i8042 with translation
on produces) and set 2 (what every AT keyboard sends natively). A set 1 break code is
the make code with bit 7 set; a set 2 break code has 0xF0 before the make code's last
byte. An ``0xE0`` prefix marks the keys the 101-key keyboard added.

A set 3 code is one byte (break: 0xF0 first). Print Screen and Pause, whose set 1/2
codes are multi-key sequences, are not in the table.
"""

from __future__ import annotations

from typing import NamedTuple


class Key(NamedTuple):
    code: int  # Linux KEY_* number
    set1: bytes  # make code, scan code set 1
    set2: bytes  # make code, scan code set 2
    set3: int = 0  # make code, scan code set 3 (one byte, no prefixes)


def _k(code: int, s1: int, s2: int, ext: bool = False) -> Key:
    pre = b"\xe0" if ext else b""
    return Key(code, pre + bytes([s1]), pre + bytes([s2]))


# name: (Linux code, set 1 make, set 2 make[, extended])
KEYS: dict[str, Key] = {
    "KEY_ESC": _k(1, 0x01, 0x76),
    "KEY_1": _k(2, 0x02, 0x16), "KEY_2": _k(3, 0x03, 0x1E), "KEY_3": _k(4, 0x04, 0x26),
    "KEY_4": _k(5, 0x05, 0x25), "KEY_5": _k(6, 0x06, 0x2E), "KEY_6": _k(7, 0x07, 0x36),
    "KEY_7": _k(8, 0x08, 0x3D), "KEY_8": _k(9, 0x09, 0x3E), "KEY_9": _k(10, 0x0A, 0x46),
    "KEY_0": _k(11, 0x0B, 0x45),
    "KEY_MINUS": _k(12, 0x0C, 0x4E), "KEY_EQUAL": _k(13, 0x0D, 0x55),
    "KEY_BACKSPACE": _k(14, 0x0E, 0x66), "KEY_TAB": _k(15, 0x0F, 0x0D),
    "KEY_Q": _k(16, 0x10, 0x15), "KEY_W": _k(17, 0x11, 0x1D), "KEY_E": _k(18, 0x12, 0x24),
    "KEY_R": _k(19, 0x13, 0x2D), "KEY_T": _k(20, 0x14, 0x2C), "KEY_Y": _k(21, 0x15, 0x35),
    "KEY_U": _k(22, 0x16, 0x3C), "KEY_I": _k(23, 0x17, 0x43), "KEY_O": _k(24, 0x18, 0x44),
    "KEY_P": _k(25, 0x19, 0x4D),
    "KEY_LEFTBRACE": _k(26, 0x1A, 0x54), "KEY_RIGHTBRACE": _k(27, 0x1B, 0x5B),
    "KEY_ENTER": _k(28, 0x1C, 0x5A), "KEY_LEFTCTRL": _k(29, 0x1D, 0x14),
    "KEY_A": _k(30, 0x1E, 0x1C), "KEY_S": _k(31, 0x1F, 0x1B), "KEY_D": _k(32, 0x20, 0x23),
    "KEY_F": _k(33, 0x21, 0x2B), "KEY_G": _k(34, 0x22, 0x34), "KEY_H": _k(35, 0x23, 0x33),
    "KEY_J": _k(36, 0x24, 0x3B), "KEY_K": _k(37, 0x25, 0x42), "KEY_L": _k(38, 0x26, 0x4B),
    "KEY_SEMICOLON": _k(39, 0x27, 0x4C), "KEY_APOSTROPHE": _k(40, 0x28, 0x52),
    "KEY_GRAVE": _k(41, 0x29, 0x0E), "KEY_LEFTSHIFT": _k(42, 0x2A, 0x12),
    "KEY_BACKSLASH": _k(43, 0x2B, 0x5D),
    "KEY_Z": _k(44, 0x2C, 0x1A), "KEY_X": _k(45, 0x2D, 0x22), "KEY_C": _k(46, 0x2E, 0x21),
    "KEY_V": _k(47, 0x2F, 0x2A), "KEY_B": _k(48, 0x30, 0x32), "KEY_N": _k(49, 0x31, 0x31),
    "KEY_M": _k(50, 0x32, 0x3A),
    "KEY_COMMA": _k(51, 0x33, 0x41), "KEY_DOT": _k(52, 0x34, 0x49),
    "KEY_SLASH": _k(53, 0x35, 0x4A), "KEY_RIGHTSHIFT": _k(54, 0x36, 0x59),
    "KEY_KPASTERISK": _k(55, 0x37, 0x7C), "KEY_LEFTALT": _k(56, 0x38, 0x11),
    "KEY_SPACE": _k(57, 0x39, 0x29), "KEY_CAPSLOCK": _k(58, 0x3A, 0x58),
    "KEY_F1": _k(59, 0x3B, 0x05), "KEY_F2": _k(60, 0x3C, 0x06), "KEY_F3": _k(61, 0x3D, 0x04),
    "KEY_F4": _k(62, 0x3E, 0x0C), "KEY_F5": _k(63, 0x3F, 0x03), "KEY_F6": _k(64, 0x40, 0x0B),
    "KEY_F7": _k(65, 0x41, 0x83), "KEY_F8": _k(66, 0x42, 0x0A), "KEY_F9": _k(67, 0x43, 0x01),
    "KEY_F10": _k(68, 0x44, 0x09),
    "KEY_NUMLOCK": _k(69, 0x45, 0x77), "KEY_SCROLLLOCK": _k(70, 0x46, 0x7E),
    "KEY_KP7": _k(71, 0x47, 0x6C), "KEY_KP8": _k(72, 0x48, 0x75), "KEY_KP9": _k(73, 0x49, 0x7D),
    "KEY_KPMINUS": _k(74, 0x4A, 0x7B),
    "KEY_KP4": _k(75, 0x4B, 0x6B), "KEY_KP5": _k(76, 0x4C, 0x73), "KEY_KP6": _k(77, 0x4D, 0x74),
    "KEY_KPPLUS": _k(78, 0x4E, 0x79),
    "KEY_KP1": _k(79, 0x4F, 0x69), "KEY_KP2": _k(80, 0x50, 0x72), "KEY_KP3": _k(81, 0x51, 0x7A),
    "KEY_KP0": _k(82, 0x52, 0x70), "KEY_KPDOT": _k(83, 0x53, 0x71),
    "KEY_102ND": _k(86, 0x56, 0x61),
    "KEY_F11": _k(87, 0x57, 0x78), "KEY_F12": _k(88, 0x58, 0x07),
    "KEY_KPENTER": _k(96, 0x1C, 0x5A, ext=True),
    "KEY_RIGHTCTRL": _k(97, 0x1D, 0x14, ext=True),
    "KEY_KPSLASH": _k(98, 0x35, 0x4A, ext=True),
    "KEY_RIGHTALT": _k(100, 0x38, 0x11, ext=True),
    "KEY_HOME": _k(102, 0x47, 0x6C, ext=True), "KEY_UP": _k(103, 0x48, 0x75, ext=True),
    "KEY_PAGEUP": _k(104, 0x49, 0x7D, ext=True), "KEY_LEFT": _k(105, 0x4B, 0x6B, ext=True),
    "KEY_RIGHT": _k(106, 0x4D, 0x74, ext=True), "KEY_END": _k(107, 0x4F, 0x69, ext=True),
    "KEY_DOWN": _k(108, 0x50, 0x72, ext=True),
    "KEY_PAGEDOWN": _k(109, 0x51, 0x7A, ext=True),
    "KEY_INSERT": _k(110, 0x52, 0x70, ext=True),
    "KEY_DELETE": _k(111, 0x53, 0x71, ext=True),
    "KEY_LEFTMETA": _k(125, 0x5B, 0x1F, ext=True),
    "KEY_RIGHTMETA": _k(126, 0x5C, 0x27, ext=True),
    "KEY_COMPOSE": _k(127, 0x5D, 0x2F, ext=True),
}

# Scan code set 3 (the terminal set: one byte per key, break = 0xF0 + make), same
# specification, table C; where a key's set 3 code differs from its set 2 code's last
# byte, and every 0xE0 key.
_SET3 = {
    "KEY_ESC": 0x08, "KEY_LEFTCTRL": 0x11, "KEY_BACKSLASH": 0x5C, "KEY_KPASTERISK": 0x7E,
    "KEY_LEFTALT": 0x19, "KEY_CAPSLOCK": 0x14, "KEY_F1": 0x07, "KEY_F2": 0x0F,
    "KEY_F3": 0x17, "KEY_F4": 0x1F, "KEY_F5": 0x27, "KEY_F6": 0x2F, "KEY_F7": 0x37,
    "KEY_F8": 0x3F, "KEY_F9": 0x47, "KEY_F10": 0x4F, "KEY_F11": 0x56, "KEY_F12": 0x5E,
    "KEY_NUMLOCK": 0x76, "KEY_SCROLLLOCK": 0x5F, "KEY_KPMINUS": 0x84, "KEY_KPPLUS": 0x7C,
    "KEY_102ND": 0x13, "KEY_KPENTER": 0x79, "KEY_RIGHTCTRL": 0x58, "KEY_KPSLASH": 0x77,
    "KEY_RIGHTALT": 0x39, "KEY_HOME": 0x6E, "KEY_UP": 0x63, "KEY_PAGEUP": 0x6F,
    "KEY_LEFT": 0x61, "KEY_RIGHT": 0x6A, "KEY_END": 0x65, "KEY_DOWN": 0x60,
    "KEY_PAGEDOWN": 0x6D, "KEY_INSERT": 0x67, "KEY_DELETE": 0x64, "KEY_LEFTMETA": 0x8B,
    "KEY_RIGHTMETA": 0x8C, "KEY_COMPOSE": 0x8D,
}
KEYS = {name: k._replace(set3=_SET3.get(name, k.set2[-1])) for name, k in KEYS.items()}

KEY_BY_CODE: dict[int, str] = {k.code: name for name, k in KEYS.items()}


def make_code(key: Key, scan_set: int) -> bytes:
    """The key's make code in scan code set 1, 2 or 3."""
    return {1: key.set1, 2: key.set2}.get(scan_set, bytes([key.set3]))


def break_code(key: Key, scan_set: int) -> bytes:
    """The key's break code in scan code set 1, 2 or 3 (set 3 as after the "all keys
    make/break" command 0xF8 or 0xFA, which Linux's atkbd sends before using set 3)."""
    if scan_set == 3:
        return bytes([0xF0, key.set3])
    if scan_set == 1:
        return key.set1[:-1] + bytes([key.set1[-1] | 0x80])
    return key.set2[:-1] + b"\xf0" + key.set2[-1:]


def _xlate_table() -> bytes:
    """The i8042's set 2 -> set 1 translation, made from the key table: each set 2
    make code maps to the same key's set 1 make code. Codes no key sends map to
    themselves (so command replies such as 0xFA, 0xAA, 0xEE pass unchanged), except
    those the real table is known for besides keys: 0x00 (set 2 overrun) -> 0xFF (set 1
    overrun), 0x02 -> 0x41 and 0x84 (Alt+SysRq) -> 0x54; together with 0x01 (F9) and
    0x03 (F5) these are what a driver sees of the "get scan code set" reply with
    translation on (Linux's atkbd accepts the translated forms)."""
    t = bytearray(range(256))
    for k in KEYS.values():
        t[k.set2[-1]] = k.set1[-1]
    t[0x00], t[0x02], t[0x84] = 0xFF, 0x41, 0x54
    return bytes(t)


XLATE = _xlate_table()

# US layout: what type_text presses for a character (shifted characters add LEFTSHIFT).
_PLAIN = {**{c: f"KEY_{c.upper()}" for c in "abcdefghijklmnopqrstuvwxyz0123456789"},
          " ": "KEY_SPACE", "\n": "KEY_ENTER", "\t": "KEY_TAB", "-": "KEY_MINUS",
          "=": "KEY_EQUAL", "[": "KEY_LEFTBRACE", "]": "KEY_RIGHTBRACE",
          ";": "KEY_SEMICOLON", "'": "KEY_APOSTROPHE", "`": "KEY_GRAVE",
          "\\": "KEY_BACKSLASH", ",": "KEY_COMMA", ".": "KEY_DOT", "/": "KEY_SLASH",
          "\b": "KEY_BACKSPACE", "\x1b": "KEY_ESC"}
_SHIFTED = {**{c.upper(): f"KEY_{c.upper()}" for c in "abcdefghijklmnopqrstuvwxyz"},
            **dict(zip("!@#$%^&*()", (f"KEY_{d}" for d in "1234567890"), strict=True)),
            "_": "KEY_MINUS", "+": "KEY_EQUAL", "{": "KEY_LEFTBRACE", "}": "KEY_RIGHTBRACE",
            ":": "KEY_SEMICOLON", '"': "KEY_APOSTROPHE", "~": "KEY_GRAVE",
            "|": "KEY_BACKSLASH", "<": "KEY_COMMA", ">": "KEY_DOT", "?": "KEY_SLASH"}


def char_keys(ch: str) -> tuple[str, bool] | None:
    """(key name, needs shift) for a character on a US keyboard, or None."""
    if ch in _PLAIN:
        return _PLAIN[ch], False
    if ch in _SHIFTED:
        return _SHIFTED[ch], True
    return None
