"""PS/2 mouse, with the IntelliMouse wheel extension.

Commands (IBM PS/2 Technical Reference; names as in Linux ``psmouse.h``/``libps2.h``):
reset 0xFF -> ACK, 0xAA, ID 0x00; get ID 0xF2 -> ACK, 0x00, or 0x03 once the sample
rate has been set to 200, 100, 80 in a row (Microsoft IntelliMouse: 4-byte packets
with a wheel byte from then on); set resolution 0xE8 + 0..3; scaling 1:1 0xE6 / 2:1
0xE7; status request 0xE9 -> ACK + 3 bytes; set sample rate 0xF3 + rate; enable 0xF4 /
disable 0xF5 data reporting; set defaults 0xF6; stream 0xEA / remote 0xF0 mode, read
data 0xEB; wrap (echo) mode 0xEE / 0xEC; resend 0xFE. Anything else is answered 0xFE.

A packet: byte 0 = buttons (bit 0 left, 1 right, 2 middle) | bit 3 (always 1) |
X sign (4) | Y sign (5) | X overflow (6) | Y overflow (7); bytes 1-2 = X, Y as 9-bit
two's complement with the sign bits (Y up is positive); byte 3 (ID 3) = wheel, -8..7.
One ``move`` is one packet; a movement beyond -256..255 is clamped there with the
overflow bit set, as a mouse whose counter overflowed reports it. Not modelled: the
resolution does not scale host movement (the host gives counts).
"""

from __future__ import annotations

from pyvmm.devices.input.ps2 import PS2_RET_ACK, PS2_RET_BAT, PS2_RET_NAK, Ps2Port

PSMOUSE_CMD_SETSCALE11 = 0xE6
PSMOUSE_CMD_SETSCALE21 = 0xE7
PSMOUSE_CMD_SETRES = 0xE8
PSMOUSE_CMD_GETINFO = 0xE9
PSMOUSE_CMD_SETSTREAM = 0xEA
PSMOUSE_CMD_POLL = 0xEB
PSMOUSE_CMD_RESET_WRAP = 0xEC
PSMOUSE_CMD_SETWRAP = 0xEE
PSMOUSE_CMD_SETPOLL = 0xF0  # remote mode
PSMOUSE_CMD_GETID = 0xF2
PSMOUSE_CMD_SETRATE = 0xF3
PSMOUSE_CMD_ENABLE = 0xF4
PSMOUSE_CMD_DISABLE = 0xF5
PSMOUSE_CMD_RESET_DIS = 0xF6  # set defaults
PSMOUSE_CMD_RESEND = 0xFE
PSMOUSE_CMD_RESET_BAT = 0xFF

MOUSE_ID_PS2 = 0x00
MOUSE_ID_IMPS = 0x03  # IntelliMouse: wheel
IMPS_KNOCK = (200, 100, 80)
DEFAULT_RATE, DEFAULT_RESOLUTION = 100, 2  # 100 samples/s, 4 counts/mm

BUTTON_LEFT, BUTTON_RIGHT, BUTTON_MIDDLE = 0x01, 0x02, 0x04
PACKET_ALWAYS_1 = 0x08
PACKET_X_SIGN, PACKET_Y_SIGN = 0x10, 0x20
PACKET_X_OVERFLOW, PACKET_Y_OVERFLOW = 0x40, 0x80
STATUS_REMOTE, STATUS_ENABLED, STATUS_SCALE21 = 0x40, 0x20, 0x10


def scale21(v: int) -> int:
    """2:1 scaling, applied to stream-mode reports (IBM's table: 1->1, 2->1, 3->3,
    4->6, 5->9, n->2n beyond)."""
    a = abs(v)
    s = {0: 0, 1: 1, 2: 1, 3: 3, 4: 6, 5: 9}.get(a, 2 * a)
    return s if v >= 0 else -s


def packet(dx: int, dy: int, dz: int, buttons: int, wheel: bool) -> bytes:
    b0 = (buttons & 0x07) | PACKET_ALWAYS_1
    if not -256 <= dx <= 255:
        dx, b0 = max(-256, min(255, dx)), b0 | PACKET_X_OVERFLOW
    if not -256 <= dy <= 255:
        dy, b0 = max(-256, min(255, dy)), b0 | PACKET_Y_OVERFLOW
    b0 |= (PACKET_X_SIGN if dx < 0 else 0) | (PACKET_Y_SIGN if dy < 0 else 0)
    out = bytes([b0, dx & 0xFF, dy & 0xFF])
    if wheel:
        out += bytes([max(-8, min(7, dz)) & 0x0F])
    return out


class Ps2Mouse(Ps2Port):
    def __init__(self) -> None:
        super().__init__()
        self.device_id = MOUSE_ID_PS2
        self._defaults()
        self.wrap = False
        self.expect: int | None = None
        self.rates: list[int] = []  # the last sample rates set, for the knock
        self.last_sent = b"\xfa"
        self.buttons = 0
        self.acc = [0, 0, 0]  # remote mode: movement since the last read

    def _defaults(self) -> None:
        self.rate, self.resolution = DEFAULT_RATE, DEFAULT_RESOLUTION
        self.scaling21 = False
        self.reporting = False
        self.remote = False

    def _send(self, *data: int) -> None:
        self.last_sent = bytes(data)
        self._reply(*data)

    # --- the controller writes a byte to the mouse (0xD4) ------------------------------
    def receive(self, byte: int) -> None:
        with self.lock:
            byte &= 0xFF
            if self.wrap and byte not in (PSMOUSE_CMD_RESET_WRAP, PSMOUSE_CMD_RESET_BAT):
                self._reply(byte)  # wrap mode: echo
                return
            cmd, self.expect = self.expect, None
            if cmd is not None:
                self._argument(cmd, byte)
            else:
                self._command(byte)

    def _argument(self, cmd: int, arg: int) -> None:
        if cmd == PSMOUSE_CMD_SETRES:
            if arg > 3:
                self.errors.warn("mouse-res", f"mouse: resolution {arg:#x} (resend)")
                self._send(PS2_RET_NAK)
                return
            self.resolution = arg
        else:  # PSMOUSE_CMD_SETRATE; any value is taken, as Linux's own rates vary
            self.rate = arg
            self.rates = [*self.rates, arg][-3:]
            if tuple(self.rates) == IMPS_KNOCK:
                self.device_id = MOUSE_ID_IMPS
        self._send(PS2_RET_ACK)

    def _command(self, cmd: int) -> None:
        if cmd in (PSMOUSE_CMD_SETRES, PSMOUSE_CMD_SETRATE):
            self.expect = cmd
            self._send(PS2_RET_ACK)
        elif cmd in (PSMOUSE_CMD_SETSCALE11, PSMOUSE_CMD_SETSCALE21):
            self.scaling21 = cmd == PSMOUSE_CMD_SETSCALE21
            self._send(PS2_RET_ACK)
        elif cmd == PSMOUSE_CMD_GETINFO:
            status = ((STATUS_REMOTE if self.remote else 0)
                      | (STATUS_ENABLED if self.reporting else 0)
                      | (STATUS_SCALE21 if self.scaling21 else 0)
                      | (BUTTON_LEFT << 2 if self.buttons & BUTTON_LEFT else 0)
                      | (BUTTON_MIDDLE >> 1 if self.buttons & BUTTON_MIDDLE else 0)
                      | (BUTTON_RIGHT >> 1 if self.buttons & BUTTON_RIGHT else 0))
            self._send(PS2_RET_ACK, status, self.resolution, self.rate)
        elif cmd in (PSMOUSE_CMD_SETSTREAM, PSMOUSE_CMD_SETPOLL):
            self.remote = cmd == PSMOUSE_CMD_SETPOLL
            self.acc = [0, 0, 0]
            self._send(PS2_RET_ACK)
        elif cmd == PSMOUSE_CMD_POLL:
            dx, dy, dz = self.acc
            self.acc = [0, 0, 0]
            self._send(PS2_RET_ACK, *packet(dx, dy, dz, self.buttons,
                                            self.device_id == MOUSE_ID_IMPS))
        elif cmd == PSMOUSE_CMD_SETWRAP:
            self.wrap = True
            self._send(PS2_RET_ACK)
        elif cmd == PSMOUSE_CMD_RESET_WRAP:
            self.wrap = False
            self._send(PS2_RET_ACK)
        elif cmd == PSMOUSE_CMD_GETID:
            self._send(PS2_RET_ACK, self.device_id)
        elif cmd in (PSMOUSE_CMD_ENABLE, PSMOUSE_CMD_DISABLE):
            self.reporting = cmd == PSMOUSE_CMD_ENABLE
            self.acc = [0, 0, 0]
            self._send(PS2_RET_ACK)
        elif cmd == PSMOUSE_CMD_RESET_DIS:
            self._defaults()
            self._send(PS2_RET_ACK)
        elif cmd == PSMOUSE_CMD_RESEND:
            self._reply(*self.last_sent)
        elif cmd == PSMOUSE_CMD_RESET_BAT:
            self.queue.clear()
            self._defaults()
            self.wrap = False
            self.device_id = MOUSE_ID_PS2
            self.rates = []
            self._send(PS2_RET_ACK, PS2_RET_BAT, MOUSE_ID_PS2)
        else:
            self.errors.warn("mouse-cmd", f"mouse: unknown command {cmd:#04x} (resend)")
            self._send(PS2_RET_NAK)

    # --- host input -------------------------------------------------------------------
    def move(self, dx: int, dy: int, dz: int = 0, buttons: int = 0) -> bool:
        """One movement report: dy > 0 is up; dz goes into the wheel byte as given
        (Linux reports it negated as REL_WHEEL: positive is a turn toward the user).
        Returns False if no packet was queued: reporting disabled, remote mode (the
        movement then accumulates for a read-data command), or the buffer full."""
        with self.lock:
            self.buttons = buttons & 0x07
            if self.remote:
                self.acc = [self.acc[0] + dx, self.acc[1] + dy, self.acc[2] + dz]
                return False
            if not self.reporting or self.wrap:
                self.host_dropped += 1
                return False
            if self.scaling21:
                dx, dy = scale21(dx), scale21(dy)
            return self._host(packet(dx, dy, dz, self.buttons,
                                     self.device_id == MOUSE_ID_IMPS))
