from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from pyvmm.devices.legacy.ioapic import IOAPIC_LVT_REMOTE_IRR, IoApic
from pyvmm.irq.msi import MsiMessage, RecordingMsiSink


def program(io: IoApic, pin: int, low: int, high: int = 0) -> None:
    io.write(0, 0, 4, 0x11 + 2 * pin)
    io.write(0, 0x10, 4, high)
    io.write(0, 0, 4, 0x10 + 2 * pin)
    io.write(0, 0x10, 4, low)


def test_version_and_masked_reset_state() -> None:
    io = IoApic(RecordingMsiSink())
    io.write(0, 0, 4, 1)
    assert io.read(0, 0x10, 4) == 0x170011  # 24 entries, version 0x11
    io.write(0, 0, 4, 0x10)
    assert io.read(0, 0x10, 4) & (1 << 16)  # masked


def test_edge_delivers_on_rising_edge_as_msi() -> None:
    sink = RecordingMsiSink()
    io = IoApic(sink)
    program(io, 5, 0x31, high=3 << 24)
    io.set_irq(5, True)
    io.set_irq(5, True)  # no new edge
    io.set_irq(5, False)
    io.set_irq(5, True)
    assert sink.sent == [MsiMessage(0xFEE03000, 0x31)] * 2


def test_level_remote_irr_and_eoi_redelivery() -> None:
    sink = RecordingMsiSink()
    io = IoApic(sink)
    program(io, 17, 0x42 | (1 << 15))
    io.set_irq(17, True)
    io.set_irq(17, True)
    assert len(sink.sent) == 1 and io.redtbl[17] & IOAPIC_LVT_REMOTE_IRR
    assert sink.sent[0].data == 0x42 | (1 << 15)
    io.eoi(0x42)  # still asserted: delivered again
    assert len(sink.sent) == 2
    io.set_irq(17, False)
    io.eoi(0x42)
    assert len(sink.sent) == 2 and not io.redtbl[17] & IOAPIC_LVT_REMOTE_IRR


def test_masked_pin_does_not_deliver_and_routes_list_unmasked() -> None:
    sink = RecordingMsiSink()
    io = IoApic(sink)
    program(io, 3, 0x33 | (1 << 16))
    io.set_irq(3, True)
    assert sink.sent == [] and io.routes() == []
    program(io, 4, 0x34)
    assert [pin for pin, _ in io.routes()] == [4]


def test_remote_irr_is_read_only() -> None:
    io = IoApic(RecordingMsiSink())
    program(io, 1, 0x21 | (1 << 15) | IOAPIC_LVT_REMOTE_IRR)
    assert not io.redtbl[1] & IOAPIC_LVT_REMOTE_IRR


@given(st.lists(st.tuples(st.sampled_from([0, 0x10, 0x40, 0x20]), st.integers(0, 2**32 - 1)),
                max_size=100))
def test_random_register_writes_stay_in_range(ops: list[tuple[int, int]]) -> None:
    io = IoApic(RecordingMsiSink())
    for off, v in ops:
        io.write(0, off, 4, v)
        assert 0 <= io.read(0, 0x10, 4) <= 0xFFFFFFFF
    assert len(io.redtbl) == 24 and all(0 <= e < 2**64 for e in io.redtbl)
