"""8259A pair behaviour from the datasheet, at ports 0x20/0x21, 0xA0/0xA1, 0x4D0/1."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.bus import IoBus
from pyvmm.devices.legacy.pic import Elcr, PicPair


def make(auto_eoi: bool = False) -> tuple[IoBus, PicPair, list[bool]]:
    out: list[bool] = []
    pair = PicPair(output=out.append)
    bus = IoBus()
    bus.insert(pair.master, 0x20, 2)
    bus.insert(pair.slave, 0xA0, 2)
    bus.insert(Elcr(pair), 0x4D0, 2)
    icw4 = 0x03 if auto_eoi else 0x01
    for port, base, icw3 in ((0x20, 0x20, 0x04), (0xA0, 0x28, 0x02)):
        bus.write(port, 1, 0x11)
        bus.write(port + 1, 1, base)
        bus.write(port + 1, 1, icw3)
        bus.write(port + 1, 1, icw4)
    bus.write(0x21, 1, 0x00)
    bus.write(0xA1, 1, 0x00)
    return bus, pair, out


def test_edge_irq_vector_isr_and_eoi() -> None:
    bus, pair, out = make()
    pair.set_irq(3, True)
    assert out == [True]
    assert pair.acknowledge() == 0x23
    assert bus.read(0x20, 1) == 0  # IRR cleared on ack (edge)
    bus.write(0x20, 1, 0x0B)  # OCW3: read ISR
    assert bus.read(0x20, 1) == 1 << 3
    pair.set_irq(3, False)
    pair.set_irq(3, True)  # another edge while in service: latched, not presented
    assert pair.master.pending_irq() == -1
    bus.write(0x20, 1, 0x20)  # non-specific EOI
    assert bus.read(0x20, 1) == 0 and pair.acknowledge() == 0x23


def test_priority_and_masking() -> None:
    bus, pair, _ = make()
    pair.set_irq(5, True)
    pair.set_irq(1, True)
    assert pair.acknowledge() == 0x21  # IRQ1 beats IRQ5
    bus.write(0x20, 1, 0x20)
    bus.write(0x21, 1, 1 << 5)  # mask IRQ5
    assert pair.master.pending_irq() == -1
    bus.write(0x21, 1, 0)
    assert pair.acknowledge() == 0x25
    assert bus.read(0x21, 1) == 0


def test_slave_cascade_through_irq2() -> None:
    bus, pair, _ = make()
    pair.set_irq(10, True)
    assert pair.acknowledge() == 0x2A
    bus.write(0xA0, 1, 0x0B)
    assert bus.read(0xA0, 1) == 1 << 2  # slave ISR bit 2 (IRQ10)


def test_spurious_irq7_when_nothing_pending() -> None:
    _, pair, _ = make()
    assert pair.acknowledge() == 0x27 and pair.spurious == 1


def test_auto_eoi_leaves_isr_clear() -> None:
    bus, pair, _ = make(auto_eoi=True)
    pair.set_irq(0, True)
    assert pair.acknowledge() == 0x20
    bus.write(0x20, 1, 0x0B)
    assert bus.read(0x20, 1) == 0


def test_level_mode_through_elcr() -> None:
    bus, pair, _ = make()
    bus.write(0x4D1, 1, 1 << 3)  # IRQ11 level
    assert bus.read(0x4D1, 1) == 1 << 3
    bus.write(0x4D0, 1, 0x07)  # IRQ0-2 are not level-capable: masked off
    assert bus.read(0x4D0, 1) == 0
    pair.set_irq(11, True)
    assert pair.acknowledge() == 0x2B
    bus.write(0xA0, 1, 0x20)
    bus.write(0x20, 1, 0x20)
    assert pair.slave.pending_irq() == 3  # still asserted: presented again
    pair.set_irq(11, False)
    assert pair.slave.pending_irq() == -1


def test_poll_mode_and_specific_eoi_and_rotation() -> None:
    bus, pair, _ = make()
    pair.set_irq(4, True)
    bus.write(0x20, 1, 0x0C)  # OCW3 poll
    assert bus.read(0x20, 1) == 0x84
    bus.write(0x20, 1, 0x60 | 4)  # specific EOI IRQ4
    bus.write(0x20, 1, 0x0B)
    assert bus.read(0x20, 1) == 0
    bus.write(0x20, 1, 0xC0 | 3)  # set priority: IRQ3 lowest, IRQ4 highest
    pair.set_irq(2 + 0, False)
    pair.set_irq(1, True)
    pair.set_irq(6, True)
    assert pair.acknowledge() == 0x26  # IRQ6 outranks IRQ1 after rotation


@settings(max_examples=150)
@given(st.lists(st.tuples(st.sampled_from([0x20, 0x21, 0xA0, 0xA1, 0x4D0, 0x4D1]),
                          st.booleans(), st.integers(0, 255)), max_size=150),
       st.lists(st.tuples(st.integers(0, 15), st.booleans()), max_size=40))
def test_random_sequences_keep_registers_8bit(ops: list[tuple[int, bool, int]],
                                              lines: list[tuple[int, bool]]) -> None:
    bus, pair, _ = make()
    for (port, is_write, value), (irq, level) in zip(ops, lines + [(0, False)] * len(ops),
                                                     strict=False):
        if is_write:
            bus.write(port, 1, value)
        else:
            assert 0 <= bus.read(port, 1) <= 0xFF
        pair.set_irq(irq, level)
        vec = pair.acknowledge()
        assert 0 <= vec <= 0xFF
    for chip in (pair.master, pair.slave):
        for reg in (chip.irr, chip.imr, chip.isr, chip.elcr, chip.irq_base):
            assert 0 <= reg <= 0xFF
        assert 0 <= chip.priority_add < 8
