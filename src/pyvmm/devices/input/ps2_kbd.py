"""PS/2 (AT, MF II) keyboard.

Commands (IBM PS/2 Technical Reference, Keyboard and Auxiliary Device Controller;
names as in Linux ``atkbd.c``): reset 0xFF -> ACK, BAT 0xAA; identify 0xF2 -> ACK,
0xAB 0x83; set LEDs 0xED + byte; echo 0xEE -> 0xEE; scan code set 0xF0 + 0 (get) or
1/2/3; typematic rate 0xF3 + byte; enable 0xF4 (clears the buffer) / default-disable
0xF5; set defaults 0xF6; the set 3 key-type commands 0xF7-0xFD are acknowledged
without effect; resend 0xFE repeats the last byte sent. Anything else is answered
0xFE (resend), as a real keyboard answers a byte it does not understand.

Host input: ``press``/``release``/``type_text`` with Linux key names (``uapi/input.py``),
sent in scan code set 1, 2 or 3 as selected. In set 3 every key sends make and break
codes (what the set 3 commands 0xF8/0xFA select, and Linux sends 0xFA before using
set 3); the per-key types of set 3's power-on default are not modelled.
"""

from __future__ import annotations

from pyvmm.devices.input.ps2 import PS2_RET_ACK, PS2_RET_BAT, PS2_RET_NAK, Ps2Port
from pyvmm.uapi.input import KEYS, Key, break_code, char_keys, make_code

ATKBD_CMD_SETLEDS = 0xED
ATKBD_CMD_ECHO = 0xEE
ATKBD_CMD_SSCANSET = 0xF0  # 0 as its argument: get
ATKBD_CMD_GETID = 0xF2
ATKBD_CMD_SETREP = 0xF3
ATKBD_CMD_ENABLE = 0xF4
ATKBD_CMD_RESET_DIS = 0xF5
ATKBD_CMD_RESET_DEF = 0xF6
ATKBD_CMD_SETALL_MB = 0xF8  # first and last of the set 3 key-type commands
ATKBD_CMD_RESEND = 0xFE
ATKBD_CMD_RESET_BAT = 0xFF
ATKBD_ID = (0xAB, 0x83)  # MF II keyboard
TYPEMATIC_DEFAULT = 0x2B  # 10.9 characters/s after 500 ms


class Ps2Keyboard(Ps2Port):
    def __init__(self) -> None:
        super().__init__()
        self.leds = 0
        self.scan_set = 2
        self.typematic = TYPEMATIC_DEFAULT
        self.scanning = True
        self.expect: int | None = None  # the command whose argument byte comes next
        self.last_sent = PS2_RET_ACK  # for resend
        self.down: set[str] = set()

    def _defaults(self) -> None:
        self.typematic = TYPEMATIC_DEFAULT
        self.scan_set = 2
        self.leds = 0

    def _send(self, *data: int) -> None:
        self.last_sent = data[-1]
        self._reply(*data)

    # --- the controller writes a byte to the keyboard -------------------------------
    def receive(self, byte: int) -> None:
        with self.lock:
            byte &= 0xFF
            cmd, self.expect = self.expect, None
            # A command code where an argument was expected ends the wait and runs
            # (IBM: the keyboard abandons the previous command).
            if cmd is not None and byte < ATKBD_CMD_SETLEDS:
                self._argument(cmd, byte)
            else:
                self._command(byte)

    def _argument(self, cmd: int, arg: int) -> None:
        if cmd == ATKBD_CMD_SETLEDS:
            self.leds = arg & 0x07
            self._send(PS2_RET_ACK)
        elif cmd == ATKBD_CMD_SETREP:
            self.typematic = arg & 0x7F
            self._send(PS2_RET_ACK)
        elif cmd == ATKBD_CMD_SSCANSET:
            if arg == 0:
                self._send(PS2_RET_ACK, self.scan_set)
            elif arg in (1, 2, 3):
                self.scan_set = arg
                self._send(PS2_RET_ACK)
            else:
                self.errors.warn("kbd-set", f"keyboard: scan code set {arg:#x} requested")
                self._send(PS2_RET_NAK)

    def _command(self, cmd: int) -> None:
        if cmd in (ATKBD_CMD_SETLEDS, ATKBD_CMD_SETREP, ATKBD_CMD_SSCANSET):
            self.expect = cmd
            self._send(PS2_RET_ACK)
        elif cmd == ATKBD_CMD_ECHO:
            self._send(ATKBD_CMD_ECHO)
        elif cmd == ATKBD_CMD_GETID:
            self._send(PS2_RET_ACK, *ATKBD_ID)
        elif cmd == ATKBD_CMD_ENABLE:
            self.queue.clear()
            self.scanning = True
            self._send(PS2_RET_ACK)
        elif cmd == ATKBD_CMD_RESET_DIS:
            self._defaults()
            self.scanning = False
            self._send(PS2_RET_ACK)
        elif cmd == ATKBD_CMD_RESET_DEF:
            self._defaults()
            self.scanning = True
            self._send(PS2_RET_ACK)
        elif ATKBD_CMD_SETALL_MB - 1 <= cmd <= 0xFD:  # set 3 key types: no effect here
            self._send(PS2_RET_ACK)
        elif cmd == ATKBD_CMD_RESEND:
            self._reply(self.last_sent)
        elif cmd == ATKBD_CMD_RESET_BAT:
            self.queue.clear()
            self._defaults()
            self.scanning = True
            self.down.clear()
            self._send(PS2_RET_ACK, PS2_RET_BAT)
        else:
            self.errors.warn("kbd-cmd", f"keyboard: unknown command {cmd:#04x} (resend)")
            self._send(PS2_RET_NAK)

    # --- host input -------------------------------------------------------------------
    @staticmethod
    def key(name: str) -> Key:
        k = KEYS.get(name) or KEYS.get(f"KEY_{name.upper()}")
        if k is None:
            raise ValueError(f"unknown key {name!r} (Linux names: KEY_A, KEY_ENTER, ...)")
        return k

    def codes(self, name: str, make: bool) -> bytes:
        """The bytes a key's make or break sends in the current scan code set."""
        k = self.key(name)
        return make_code(k, self.scan_set) if make else break_code(k, self.scan_set)

    def press(self, name: str) -> bool:
        """Key down; False if the keyboard is not scanning or its buffer is full."""
        return self._event(name, True)

    def release(self, name: str) -> bool:
        return self._event(name, False)

    def _event(self, name: str, make: bool) -> bool:
        codes = self.codes(name, make)  # an unknown name raises before any state changes
        with self.lock:
            if not self.scanning:
                self.host_dropped += 1
                return False
            if not self._host(codes):
                return False
            (self.down.add if make else self.down.discard)(name)
            return True

    def type_text(self, text: str) -> int:
        """Press and release the keys of ``text`` (US layout, shift as needed); returns
        how many characters were queued whole."""
        plan = []
        for ch in text:
            ks = char_keys(ch)
            if ks is None:
                raise ValueError(f"no key for {ch!r} on a US keyboard")
            plan.append(ks)
        done = 0
        for name, shift in plan:
            seq = ([("KEY_LEFTSHIFT", True)] if shift else []) + [(name, True), (name, False)]
            seq += [("KEY_LEFTSHIFT", False)] if shift else []
            data = b"".join(self.codes(n, mk) for n, mk in seq)
            with self.lock:
                if not self.scanning:
                    self.host_dropped += 1
                    break
                if not self._host(data):
                    break
            done += 1
        return done
