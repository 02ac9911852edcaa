"""Intel 8259A programmable interrupt controller, the PC's master/slave pair.

Datasheet behaviour: ICW1-ICW4 initialisation, OCW1 (mask), OCW2 (non-specific,
specific and rotating EOI, set priority, rotate in automatic EOI), OCW3 (read
IRR/ISR, poll, special mask), automatic EOI, special fully nested mode, edge or
level triggering per line through the ELCR (ports 0x4D0/0x4D1, as on PIIX/ICH),
spurious IRQ 7/15, the slave cascaded on master IRQ 2.

Ports: master 0x20/0x21, slave 0xA0/0xA1 (``Pic8259`` is one chip, inserted at its
base with size 2), ``Elcr`` at 0x4D0 size 2. The pair's output is a callback; the
split irqchip injects the vector from ``PicPair.acknowledge()`` (the INTA cycle).

Threat model: any byte sequence leaves the state within 8-bit registers; a guest
can at most mask, unmask or storm its own interrupts.
"""

from __future__ import annotations

from collections.abc import Callable


class Pic8259:
    def __init__(self, is_master: bool, elcr_mask: int) -> None:
        self.is_master = is_master
        self.elcr = 0
        self.elcr_mask = elcr_mask
        self.on_change: Callable[[], None] = lambda: None
        self._reset()

    def _reset(self) -> None:
        self.last_irr = 0
        self.irr = 0
        self.imr = 0
        self.isr = 0
        self.priority_add = 0
        self.irq_base = 0
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.init_state = 0
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.special_fully_nested = False
        self.init4 = False
        self.single_mode = False

    # --- priority resolution ------------------------------------------------------
    def _priority(self, mask: int) -> int:
        """Priority (0 highest) of the highest bit set in mask, 8 if none."""
        if mask == 0:
            return 8
        p = 0
        while not mask & (1 << ((p + self.priority_add) & 7)):
            p += 1
        return p

    def pending_irq(self) -> int:
        """The IRQ this chip would present to the CPU now, or -1."""
        p = self._priority(self.irr & ~self.imr)
        if p == 8:
            return -1
        mask = self.isr
        if self.special_mask:
            mask &= ~self.imr
        if self.special_fully_nested and self.is_master:
            mask &= ~(1 << 2)
        return (p + self.priority_add) & 7 if p < self._priority(mask) else -1

    def set_irq(self, irq: int, level: bool) -> None:
        mask = 1 << irq
        if self.elcr & mask:  # level triggered
            if level:
                self.irr |= mask
                self.last_irr |= mask
            else:
                self.irr &= ~mask
                self.last_irr &= ~mask
        elif level:  # edge triggered: a rising edge latches IRR
            if not self.last_irr & mask:
                self.irr |= mask
            self.last_irr |= mask
        else:
            self.last_irr &= ~mask
        self.on_change()

    def intack(self, irq: int) -> None:
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= 1 << irq
        if not self.elcr & (1 << irq):
            self.irr &= ~(1 << irq)  # edge: IRR clears on acknowledge

    # --- ports --------------------------------------------------------------------
    def read(self, base: int, offset: int, size: int) -> int:
        if self.poll:
            self.poll = False
            irq = self.pending_irq()
            if irq < 0:
                return 0
            self.intack(irq)
            self.on_change()
            return irq | 0x80
        if offset & 1:
            return self.imr
        return self.isr if self.read_isr else self.irr

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset & 1:
            self._write_data(value)
        elif value & 0x10:  # ICW1
            elcr = self.elcr
            self._reset()
            self.elcr = elcr
            self.init_state = 1
            self.init4 = bool(value & 0x01)
            self.single_mode = bool(value & 0x02)
        elif value & 0x08:  # OCW3
            if value & 0x04:
                self.poll = True
            if value & 0x02:
                self.read_isr = bool(value & 0x01)
            if value & 0x40:
                self.special_mask = bool(value & 0x20)
        else:  # OCW2
            self._ocw2(value)
        self.on_change()

    def _write_data(self, value: int) -> None:
        if self.init_state == 0:  # OCW1
            self.imr = value
        elif self.init_state == 1:  # ICW2
            self.irq_base = value & 0xF8
            self.init_state = 0 if self.single_mode and not self.init4 else (
                3 if self.single_mode else 2)
        elif self.init_state == 2:  # ICW3 (cascade wiring: fixed on a PC)
            self.init_state = 3 if self.init4 else 0
        else:  # ICW4
            self.special_fully_nested = bool(value & 0x10)
            self.auto_eoi = bool(value & 0x02)
            self.init_state = 0

    def _ocw2(self, value: int) -> None:
        cmd = value >> 5
        if cmd in (0, 4):  # clear/set rotate in automatic EOI
            self.rotate_on_auto_eoi = cmd == 4
        elif cmd in (1, 5):  # non-specific EOI (5: and rotate)
            p = self._priority(self.isr)
            if p != 8:
                irq = (p + self.priority_add) & 7
                self.isr &= ~(1 << irq)
                if cmd == 5:
                    self.priority_add = (irq + 1) & 7
        elif cmd == 3:  # specific EOI
            self.isr &= ~(1 << (value & 7))
        elif cmd == 6:  # set priority: IRQ value&7 becomes lowest
            self.priority_add = ((value & 7) + 1) & 7
        elif cmd == 7:  # rotate on specific EOI
            irq = value & 7
            self.isr &= ~(1 << irq)
            self.priority_add = (irq + 1) & 7


class PicPair:
    """Master and slave cascaded on IRQ 2; ``output`` reports the master's INT line."""

    def __init__(self, output: Callable[[bool], None] = lambda level: None) -> None:
        self.master = Pic8259(True, 0xF8)
        self.slave = Pic8259(False, 0xDE)
        self.output = output
        self.level = False
        self.spurious = 0
        self.master.on_change = self._update
        self.slave.on_change = self._update
        # Called with the IRQ number at its INTA cycle: a timer that reinjects late
        # periods waits for this acknowledgement (the PIT on IRQ 0).
        self.on_ack: dict[int, Callable[[], None]] = {}

    def set_irq(self, irq: int, level: bool) -> None:
        if 0 <= irq < 8:
            self.master.set_irq(irq, level)
        elif 8 <= irq < 16:
            self.slave.set_irq(irq - 8, level)

    def _update(self) -> None:
        # The slave's INT reaches master IR2, which is edge-triggered (ELCR bit 2 is
        # reserved): latch it whenever the slave presents an interrupt, as a pulse.
        m = self.master
        if self.slave.pending_irq() >= 0:
            m.irr |= 1 << 2
        m.last_irr &= ~(1 << 2)
        level = m.pending_irq() >= 0
        if level != self.level:
            self.level = level
            self.output(level)

    def acknowledge(self) -> int:
        """The INTA cycle: returns the vector to inject and updates ISR/IRR."""
        m, s = self.master, self.slave
        irq = m.pending_irq()
        if irq < 0:
            self.spurious += 1
            vector = m.irq_base + 7
        else:
            m.intack(irq)
            acked = irq
            if irq == 2:
                irq2 = s.pending_irq()
                if irq2 >= 0:
                    s.intack(irq2)
                    acked = 8 + irq2
                else:
                    self.spurious += 1
                    irq2 = 7
                    acked = -1
                vector = s.irq_base + irq2
            else:
                vector = m.irq_base + irq
            hook = self.on_ack.get(acked)
            if hook is not None:
                hook()
        self._update()
        return vector

    def unmasked(self, irq: int) -> bool:
        """Whether IRQ ``irq`` is a route the guest set up through the pair: the master
        programmed (ICW2 gave it a vector base; out of reset it has none) and the IRQ
        not masked, for the slave the cascade too."""
        m, s = self.master, self.slave
        if not m.irq_base:
            return False
        if irq < 8:
            return not m.imr & (1 << irq)
        return bool(s.irq_base) and not m.imr & (1 << 2) and not s.imr & (1 << (irq - 8))


class Elcr:
    """Edge/level control registers at 0x4D0 (master) and 0x4D1 (slave)."""

    def __init__(self, pair: PicPair) -> None:
        self.pair = pair

    def read(self, base: int, offset: int, size: int) -> int:
        chip = self.pair.master if offset == 0 else self.pair.slave
        return chip.elcr

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        chip = self.pair.master if offset == 0 else self.pair.slave
        chip.elcr = value & chip.elcr_mask
        self.pair._update()
