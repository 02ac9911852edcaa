from __future__ import annotations

from pyvmm.bus import IoBus
from pyvmm.devices.legacy.debug_exit import DebugExit
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.testdev import TestDev


def test_i8042_pulse_reset_ends_the_machine() -> None:
    resets: list[int] = []
    bus = IoBus()
    kbc = I8042(on_reset=lambda: resets.append(1))
    bus.insert(kbc, 0x60, 1)
    bus.insert(kbc, 0x64, 1)
    bus.write(0x64, 1, 0xFE)
    assert resets == [1]


def test_i8042_output_port_reset_bit_low_resets() -> None:
    resets: list[int] = []
    bus = IoBus()
    k = I8042(on_reset=lambda: resets.append(1))
    bus.insert(k, 0x60, 1)
    bus.insert(k, 0x64, 1)
    bus.write(0x64, 1, 0xD1)
    bus.write(0x60, 1, 0x03)  # reset bit high: nothing
    assert resets == []
    bus.write(0x64, 1, 0xD1)
    bus.write(0x60, 1, 0x02)
    assert resets == [1]


def test_i8042_self_test_and_command_byte() -> None:
    bus = IoBus()
    k = I8042(on_reset=lambda: None)
    bus.insert(k, 0x60, 1)
    bus.insert(k, 0x64, 1)
    bus.write(0x64, 1, 0xAA)
    assert bus.read(0x64, 1) & 0x01
    assert bus.read(0x60, 1) == 0x55
    assert not bus.read(0x64, 1) & 0x01
    bus.write(0x64, 1, 0x60)
    bus.write(0x60, 1, 0x65)
    bus.write(0x64, 1, 0x20)
    assert bus.read(0x60, 1) == 0x65


def test_debug_exit_code_is_qemu_compatible() -> None:
    codes: list[int] = []
    d = DebugExit(codes.append, size=4)
    d.write(0xF4, 0, 4, 0x10)
    d.write(0xF4, 0, 4, 0)
    assert codes == [0x21, 1]
    one = DebugExit(codes.append, size=1)
    one.write(0xF4, 0, 4, 0x1FF)  # a 1-byte port sees only the low byte
    assert codes[-1] == (0xFF << 1) | 1


def test_testdev_counts_writes() -> None:
    t = TestDev()
    for i in range(5):
        t.write(0, 0, 4, i)
    assert t.read(0, 0, 4) == 4
    assert t.read(0, 4, 4) == 5
    assert t.read(0, 8, 4) == 0
