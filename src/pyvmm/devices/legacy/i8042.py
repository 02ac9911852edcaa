"""Intel 8042 keyboard controller: enough of it for a guest to reset the machine.

Ports 0x60 (data) and 0x64 (status/command). Modelled: status register, the
command byte (0x20/0x60), self test (0xAA -> 0x55), interface test (0xAB -> 0x00),
enable/disable keyboard (0xAE/0xAD), read/write output port (0xD0/0xD1), and the
reset pulse (0xFE, or an output-port write with the reset bit low), which ends the
VM the way Firecracker and QEMU's -no-reboot do. No keyboard or mouse is attached:
keyboard commands written to 0x60 are answered with 0xFE (resend) so drivers do not
wait. Threat model: one pending output byte and two registers; any sequence is
harmless, and a reset only ends the guest's own VM.
"""

from __future__ import annotations

from collections.abc import Callable

I8042_DATA = 0x0  # port 0x60 & 7
I8042_STATUS = 0x4  # port 0x64 & 7

I8042_STR_OBF = 0x01
I8042_STR_IBF = 0x02
I8042_STR_SYSFLAG = 0x04
I8042_STR_CMDDAT = 0x08
I8042_STR_KEYLOCK = 0x10

I8042_CMD_CTL_RCTR = 0x20
I8042_CMD_CTL_WCTR = 0x60
I8042_CMD_CTL_TEST = 0xAA
I8042_CMD_KBD_TEST = 0xAB
I8042_CMD_KBD_DISABLE = 0xAD
I8042_CMD_KBD_ENABLE = 0xAE
I8042_CMD_READ_OUTPORT = 0xD0
I8042_CMD_WRITE_OUTPORT = 0xD1
I8042_CMD_PULSE_RESET = 0xFE

I8042_OUTPORT_RESET = 0x01  # active low: writing 0 here resets the CPU


class I8042:
    def __init__(self, on_reset: Callable[[], None]) -> None:
        self.on_reset = on_reset
        self.status = I8042_STR_SYSFLAG | I8042_STR_KEYLOCK
        self.ctr = 0x47  # kbd interrupt, sysflag, translation
        self.outport = I8042_OUTPORT_RESET | 0x02  # A20 enabled
        self.out: int | None = None
        self.pending_cmd: int | None = None
        self.resets = 0

    def _push(self, value: int) -> None:
        self.out = value & 0xFF
        self.status |= I8042_STR_OBF

    # Inserted as two one-port ranges (0x60 and 0x64: port 0x61 belongs to the PIT's
    # system control port), so the register is told apart by base + offset.
    def read(self, base: int, offset: int, size: int) -> int:
        offset = (base + offset) & 7
        if offset == I8042_STATUS:
            return self.status
        if offset == I8042_DATA:
            value = self.out if self.out is not None else 0
            self.out = None
            self.status &= ~I8042_STR_OBF
            return value
        return 0xFF

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        offset = (base + offset) & 7
        if offset == I8042_STATUS:
            self.status |= I8042_STR_CMDDAT
            self._command(value)
        elif offset == I8042_DATA:
            self.status &= ~I8042_STR_CMDDAT
            cmd, self.pending_cmd = self.pending_cmd, None
            if cmd == I8042_CMD_CTL_WCTR:
                self.ctr = value
            elif cmd == I8042_CMD_WRITE_OUTPORT:
                self.outport = value
                if not value & I8042_OUTPORT_RESET:
                    self._reset()
            else:
                self._push(0xFE)  # no keyboard attached: "resend"

    def _command(self, cmd: int) -> None:
        if cmd == I8042_CMD_CTL_RCTR:
            self._push(self.ctr)
        elif cmd in (I8042_CMD_CTL_WCTR, I8042_CMD_WRITE_OUTPORT):
            self.pending_cmd = cmd
        elif cmd == I8042_CMD_CTL_TEST:
            self._push(0x55)
        elif cmd == I8042_CMD_KBD_TEST:
            self._push(0x00)
        elif cmd == I8042_CMD_KBD_DISABLE:
            self.ctr |= 0x10
        elif cmd == I8042_CMD_KBD_ENABLE:
            self.ctr &= ~0x10
        elif cmd == I8042_CMD_READ_OUTPORT:
            self._push(self.outport)
        elif cmd == I8042_CMD_PULSE_RESET:
            self._reset()
        # other commands (password, mouse) are ignored, as a controller without them does

    def _reset(self) -> None:
        self.resets += 1
        self.on_reset()
