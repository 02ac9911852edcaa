"""Intel 8042 keyboard controller with a PS/2 keyboard and mouse on its two ports.

Ports 0x60 (data) and 0x64 (status on read, command on write); names as in Linux
``drivers/input/serio/i8042.h``. Modelled:

- status: OBF, IBF (never set: every write is taken at once), SYS (the command
  byte's), A2/CMD (last write went to 0x64), INH (set: keyboard not inhibited), AUXB
  (the output buffer holds mouse data); timeout and parity stay clear (no line errors);
- command byte (0x20/0x60, and the rest of the 32-byte RAM at 0x21-0x3F/0x61-0x7F):
  INT/INT2 (IRQ 1/IRQ 12 while the output buffer holds keyboard/mouse data), SYS,
  keyboard/aux disable (their bytes wait in the device), XLATE (set 2 -> set 1
  translation of keyboard bytes, 0xF0 prefix folded into bit 7 of the next);
- controller commands: self test 0xAA -> 0x55, keyboard/aux interface tests 0xAB/0xA9
  -> 0x00, password test 0xA4 -> 0xF1 (none), disable/enable keyboard 0xAD/0xAE and
  aux 0xA7/0xA8, write to aux 0xD4, read/write output port 0xD0/0xD1, write keyboard/
  aux output buffer 0xD2/0xD3, read input port 0xC0, test inputs 0xE0, A20 0xDD/0xDF,
  pulse output lines 0xF0-0xFF (bit 0 low: the reset pulse, which ends the VM the way
  Firecracker and QEMU's -no-reboot do; so does an output-port write with bit 0 low);
- one output buffer fed from a small controller queue, the keyboard's and the mouse's
  bounded queues (``devices/input/``), alternating between the two devices.

Reading the data port with the output buffer empty returns the last byte again, as
the chip's output register keeps it. Threat model in docs/devices/i8042.md: state is
a few registers and bounded queues; any byte sequence is answered per spec.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

from pyvmm.devices.input.ps2 import Ps2Port
from pyvmm.devices.input.ps2_kbd import Ps2Keyboard
from pyvmm.devices.input.ps2_mouse import Ps2Mouse
from pyvmm.irq.line import InterruptLine, NullLine
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi.input import XLATE

I8042_DATA = 0x0  # port 0x60 & 7
I8042_STATUS = 0x4  # port 0x64 & 7

I8042_STR_OBF = 0x01
I8042_STR_IBF = 0x02
I8042_STR_SYSFLAG = 0x04
I8042_STR_CMDDAT = 0x08
I8042_STR_KEYLOCK = 0x10  # set: not inhibited
I8042_STR_AUXDATA = 0x20
I8042_STR_TIMEOUT = 0x40
I8042_STR_PARITY = 0x80

I8042_CTR_KBDINT = 0x01
I8042_CTR_AUXINT = 0x02
I8042_CTR_SYSFLAG = 0x04
I8042_CTR_IGNKEYLOCK = 0x08
I8042_CTR_KBDDIS = 0x10
I8042_CTR_AUXDIS = 0x20
I8042_CTR_XLATE = 0x40

I8042_CMD_CTL_RCTR = 0x20  # 0x20-0x3F: read controller RAM
I8042_CMD_CTL_WCTR = 0x60  # 0x60-0x7F: write controller RAM
I8042_CMD_PWD_TEST = 0xA4
I8042_CMD_AUX_DISABLE = 0xA7
I8042_CMD_AUX_ENABLE = 0xA8
I8042_CMD_AUX_TEST = 0xA9
I8042_CMD_CTL_TEST = 0xAA
I8042_CMD_KBD_TEST = 0xAB
I8042_CMD_KBD_DISABLE = 0xAD
I8042_CMD_KBD_ENABLE = 0xAE
I8042_CMD_READ_INPORT = 0xC0
I8042_CMD_READ_OUTPORT = 0xD0
I8042_CMD_WRITE_OUTPORT = 0xD1
I8042_CMD_KBD_LOOP = 0xD2
I8042_CMD_AUX_LOOP = 0xD3
I8042_CMD_AUX_SEND = 0xD4
I8042_CMD_A20_OFF = 0xDD
I8042_CMD_A20_ON = 0xDF
I8042_CMD_READ_TEST = 0xE0
I8042_CMD_PULSE_RESET = 0xFE  # 0xF0-0xFF pulse the output port lines whose bit is 0

I8042_OUTPORT_RESET = 0x01  # active low: writing 0 here resets the CPU
I8042_OUTPORT_A20 = 0x02
I8042_OUTPORT_KBD_OBF = 0x10  # the IRQ 1 output
I8042_OUTPORT_AUX_OBF = 0x20  # the IRQ 12 output
I8042_INPORT_KEYLOCK_OPEN = 0x80

I8042_RET_SELFTEST_OK = 0x55
I8042_RET_PORT_OK = 0x00
I8042_RET_NO_PASSWORD = 0xF1

# What a BIOS leaves: keyboard interrupt, system flag, translation on; the mouse
# port's interrupt enabled but nothing drives it until a driver enables the mouse.
CTR_AT_BOOT = I8042_CTR_XLATE | I8042_CTR_SYSFLAG | I8042_CTR_AUXINT | I8042_CTR_KBDINT
CTL_QUEUE_MAX = 16  # controller replies waiting for the output buffer

KBD, AUX = 0, 1  # where an output byte came from (controller replies count as KBD)
WITH_ARGUMENT = (I8042_CMD_WRITE_OUTPORT, I8042_CMD_KBD_LOOP, I8042_CMD_AUX_LOOP,
                 I8042_CMD_AUX_SEND)


class I8042:
    def __init__(self, on_reset: Callable[[], None], irq1: InterruptLine | None = None,
                 irq12: InterruptLine | None = None, keyboard: Ps2Keyboard | None = None,
                 mouse: Ps2Mouse | None = None) -> None:
        self.on_reset = on_reset
        self.irq1: InterruptLine = irq1 or NullLine()
        self.irq12: InterruptLine = irq12 or NullLine()
        # Guest (vCPU thread) and host input (any thread) both enter; the devices use
        # this lock too, so a key press and a register access never interleave.
        self.lock = threading.RLock()
        self.keyboard = keyboard or Ps2Keyboard()
        self.mouse = mouse or Ps2Mouse()
        for dev in (self.keyboard, self.mouse):
            dev.lock = self.lock
            dev.notify = self._fill
        self.errors = OnceLog()
        self.ram = bytearray(32)
        self.ram[0] = CTR_AT_BOOT
        self.status = I8042_STR_SYSFLAG | I8042_STR_KEYLOCK
        self.outport = I8042_OUTPORT_RESET | I8042_OUTPORT_A20
        self.out = 0  # the output register: read again while the buffer is empty
        self.out_src = KBD
        self.ctl: deque[tuple[int, int]] = deque()  # (byte, source) replies
        self.pending_cmd: int | None = None
        self.xlate_break = False  # a set 2 0xF0 seen: the next translated byte is a break
        self.next_src = KBD  # which device fills the buffer first when both have data
        self.levels = [False, False]
        self.resets = 0
        self.ctl_dropped = 0

    @property
    def ctr(self) -> int:
        return self.ram[0]

    # --- the output buffer ----------------------------------------------------------
    def _queue_ctl(self, value: int, src: int = KBD) -> None:
        if len(self.ctl) >= CTL_QUEUE_MAX:
            self.ctl_dropped += 1
            self.errors.warn("ctl-flood", "i8042: controller command flood, replies "
                             f"beyond {CTL_QUEUE_MAX} unread dropped")
            return
        self.ctl.append((value & 0xFF, src))
        self._fill()

    def _take(self, dev: Ps2Port, src: int) -> int | None:
        """The next byte of a device as the controller passes it on."""
        while dev.pending():
            b = dev.pop()
            if src == AUX or not self.ctr & I8042_CTR_XLATE:
                return b
            if b == 0xF0:  # set 2 break prefix: folded into the next byte
                self.xlate_break = True
                continue
            b = XLATE[b] | (0x80 if self.xlate_break else 0)
            self.xlate_break = False
            return b
        return None

    def _fill(self) -> None:
        """Load the output buffer if it is empty and a byte is waiting; then the lines."""
        if not self.status & I8042_STR_OBF:
            got: tuple[int, int] | None = self.ctl.popleft() if self.ctl else None
            if got is None:
                order = (KBD, AUX) if self.next_src == KBD else (AUX, KBD)
                for src in order:
                    dev, off = ((self.keyboard, I8042_CTR_KBDDIS) if src == KBD
                                else (self.mouse, I8042_CTR_AUXDIS))
                    if self.ctr & off:
                        continue  # its clock is held: the byte waits in the device
                    b = self._take(dev, src)
                    if b is not None:
                        got = (b, src)
                        self.next_src = AUX if src == KBD else KBD
                        break
            if got is not None:
                self.out, self.out_src = got
                self.status |= I8042_STR_OBF
                if self.out_src == AUX:
                    self.status |= I8042_STR_AUXDATA
                else:
                    self.status &= ~I8042_STR_AUXDATA
        self._update_irq()

    def _update_irq(self) -> None:
        full = bool(self.status & I8042_STR_OBF)
        kbd = full and self.out_src == KBD and bool(self.ctr & I8042_CTR_KBDINT)
        aux = full and self.out_src == AUX and bool(self.ctr & I8042_CTR_AUXINT)
        if kbd != self.levels[0]:
            self.levels[0] = kbd
            self.irq1.set_level(kbd)
        if aux != self.levels[1]:
            self.levels[1] = aux
            self.irq12.set_level(aux)

    # --- the guest's registers ------------------------------------------------------
    # Inserted as two one-port ranges (0x60 and 0x64: port 0x61 belongs to the PIT's
    # system control port), so the register is told apart by base + offset.
    def read(self, base: int, offset: int, size: int) -> int:
        offset = (base + offset) & 7
        with self.lock:
            if offset == I8042_STATUS:
                return self.status
            if offset == I8042_DATA:
                value = self.out
                if self.status & I8042_STR_OBF:
                    self.status &= ~(I8042_STR_OBF | I8042_STR_AUXDATA)
                    self._update_irq()  # the line falls, and rises again for a next byte
                    self._fill()
                return value
        return 0xFF

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        offset = (base + offset) & 7
        with self.lock:
            if offset == I8042_STATUS:
                self.status |= I8042_STR_CMDDAT
                self._command(value)
            elif offset == I8042_DATA:
                self.status &= ~I8042_STR_CMDDAT
                self._data(value)

    def _data(self, value: int) -> None:
        cmd, self.pending_cmd = self.pending_cmd, None
        if cmd is not None and I8042_CMD_CTL_WCTR <= cmd < I8042_CMD_CTL_WCTR + 32:
            self.ram[cmd & 0x1F] = value
            if cmd == I8042_CMD_CTL_WCTR:
                self._ctr_written()
        elif cmd == I8042_CMD_WRITE_OUTPORT:
            self.outport = value
            if not value & I8042_OUTPORT_RESET:
                self._reset()
        elif cmd == I8042_CMD_KBD_LOOP:
            self._queue_ctl(value, KBD)
        elif cmd == I8042_CMD_AUX_LOOP:
            self._queue_ctl(value, AUX)
        elif cmd == I8042_CMD_AUX_SEND:
            self.mouse.receive(value)
        else:
            # A byte for the keyboard; sending it re-enables the keyboard interface
            # (as QEMU's pckbd does; the controller clocks the byte out).
            if self.ctr & I8042_CTR_KBDDIS:
                self.ram[0] &= ~I8042_CTR_KBDDIS
            self.keyboard.receive(value)
            self._fill()

    def _ctr_written(self) -> None:
        if self.ctr & I8042_CTR_SYSFLAG:
            self.status |= I8042_STR_SYSFLAG
        else:
            self.status &= ~I8042_STR_SYSFLAG
        if not self.ctr & I8042_CTR_XLATE:
            self.xlate_break = False
        self._fill()  # an enabled port or interrupt may take effect now

    def _command(self, cmd: int) -> None:
        self.pending_cmd = None
        if I8042_CMD_CTL_RCTR <= cmd < I8042_CMD_CTL_RCTR + 32:
            self._queue_ctl(self.ram[cmd & 0x1F])
        elif I8042_CMD_CTL_WCTR <= cmd < I8042_CMD_CTL_WCTR + 32 or cmd in WITH_ARGUMENT:
            self.pending_cmd = cmd
        elif cmd == I8042_CMD_CTL_TEST:
            self.status |= I8042_STR_SYSFLAG
            self._queue_ctl(I8042_RET_SELFTEST_OK)
        elif cmd in (I8042_CMD_KBD_TEST, I8042_CMD_AUX_TEST):
            self._queue_ctl(I8042_RET_PORT_OK)
        elif cmd == I8042_CMD_PWD_TEST:
            self._queue_ctl(I8042_RET_NO_PASSWORD)
        elif cmd in (I8042_CMD_KBD_DISABLE, I8042_CMD_KBD_ENABLE):
            bit = I8042_CTR_KBDDIS
            self.ram[0] = (self.ctr | bit) if cmd == I8042_CMD_KBD_DISABLE else self.ctr & ~bit
            self._fill()
        elif cmd in (I8042_CMD_AUX_DISABLE, I8042_CMD_AUX_ENABLE):
            bit = I8042_CTR_AUXDIS
            self.ram[0] = (self.ctr | bit) if cmd == I8042_CMD_AUX_DISABLE else self.ctr & ~bit
            self._fill()
        elif cmd == I8042_CMD_READ_INPORT:
            self._queue_ctl(I8042_INPORT_KEYLOCK_OPEN)
        elif cmd == I8042_CMD_READ_OUTPORT:
            obf = ((I8042_OUTPORT_KBD_OBF if self.levels[0] else 0)
                   | (I8042_OUTPORT_AUX_OBF if self.levels[1] else 0))
            self._queue_ctl((self.outport & 0xCF) | obf)
        elif cmd == I8042_CMD_READ_TEST:
            self._queue_ctl(0x00)
        elif cmd in (I8042_CMD_A20_OFF, I8042_CMD_A20_ON):
            self.outport = ((self.outport | I8042_OUTPORT_A20) if cmd == I8042_CMD_A20_ON
                            else self.outport & ~I8042_OUTPORT_A20)
        elif cmd >= 0xF0:
            if not cmd & I8042_OUTPORT_RESET:  # the pulse drives the reset line low
                self._reset()
        else:
            self.errors.warn("ctl-cmd", f"i8042: unknown controller command {cmd:#04x} "
                             "ignored")

    def _reset(self) -> None:
        self.resets += 1
        self.on_reset()

    def metrics(self) -> dict[str, int]:
        return {"resets": self.resets, "ctl_dropped": self.ctl_dropped,
                "kbd_host_dropped": self.keyboard.host_dropped,
                "kbd_replies_dropped": self.keyboard.replies_dropped,
                "mouse_host_dropped": self.mouse.host_dropped,
                "mouse_replies_dropped": self.mouse.replies_dropped}
