"""Intel 82093AA I/O APIC: 24 pins, redirection table, delivery as MSI messages.

Modelled: IOREGSEL (0x00) / IOWIN (0x10) indirect access, the EOI register (0x40,
as in version 0x20 parts), ID, version (0x11, 24 entries), arbitration, and 24
redirection entries (vector, delivery mode, destination mode, polarity, remote IRR,
trigger mode, mask, destination). An interrupt is delivered as the MSI message the
APIC bus would carry (address 0xFEE00000 | dest << 12 | dest_mode << 2, data vector
| delivery mode << 8 | trigger << 15), which is how a split irqchip reaches KVM's
in-kernel LAPICs. Level-triggered entries set remote IRR and are re-delivered after
EOI while the line stays asserted. Polarity is recorded but, as in KVM and QEMU,
lines are modelled active-high. ``routes()`` lists the programmed entries so KVM can
learn which vectors need EOI exits.

Threat model: 24 fixed entries, indices are masked; any guest value is stored
within its field.
"""

from __future__ import annotations

from collections.abc import Callable

from pyvmm.irq.msi import MsiMessage, MsiSink

IOAPIC_NUM_PINS = 24
IOAPIC_VERSION = 0x11
IOREGSEL, IOWIN, IOEOI = 0x00, 0x10, 0x40
IOAPIC_REG_ID, IOAPIC_REG_VER, IOAPIC_REG_ARB = 0x00, 0x01, 0x02
IOAPIC_REG_REDTBL = 0x10

IOAPIC_LVT_DELIV_STATUS = 1 << 12
IOAPIC_LVT_REMOTE_IRR = 1 << 14
IOAPIC_LVT_TRIGGER_MODE = 1 << 15
IOAPIC_LVT_MASKED = 1 << 16
IOAPIC_RO_BITS = IOAPIC_LVT_DELIV_STATUS | IOAPIC_LVT_REMOTE_IRR
IOAPIC_SIZE = 0x100


class IoApic:
    def __init__(self, sink: MsiSink, on_routes_changed: Callable[[], None] | None = None,
                 ) -> None:
        self.sink = sink
        self.on_routes_changed = on_routes_changed or (lambda: None)
        self.ioregsel = 0
        self.id = 0
        self.redtbl = [IOAPIC_LVT_MASKED] * IOAPIC_NUM_PINS
        self.levels = [False] * IOAPIC_NUM_PINS
        self.delivered = 0

    # --- lines -------------------------------------------------------------------
    def set_irq(self, pin: int, level: bool) -> None:
        if not 0 <= pin < IOAPIC_NUM_PINS:
            return
        was = self.levels[pin]
        self.levels[pin] = level
        entry = self.redtbl[pin]
        if entry & IOAPIC_LVT_TRIGGER_MODE:
            if level:
                self._service(pin)
        elif level and not was:
            self._service(pin)

    def _service(self, pin: int) -> None:
        entry = self.redtbl[pin]
        if entry & IOAPIC_LVT_MASKED:
            return
        if entry & IOAPIC_LVT_TRIGGER_MODE:
            if entry & IOAPIC_LVT_REMOTE_IRR:
                return
            self.redtbl[pin] = entry | IOAPIC_LVT_REMOTE_IRR
        self.delivered += 1
        self.sink.send_msi(self.message(pin))

    def message(self, pin: int) -> MsiMessage:
        e = self.redtbl[pin]
        vector, delivery, dest_mode = e & 0xFF, (e >> 8) & 7, (e >> 11) & 1
        trigger, dest = (e >> 15) & 1, (e >> 56) & 0xFF
        return MsiMessage(0xFEE00000 | (dest << 12) | (dest_mode << 2),
                          vector | (delivery << 8) | (trigger << 15))

    def eoi(self, vector: int) -> None:
        """An EOI for ``vector`` reached the IOAPIC (KVM_EXIT_IOAPIC_EOI or the EOI reg)."""
        for pin, e in enumerate(self.redtbl):
            if e & 0xFF == vector and e & IOAPIC_LVT_TRIGGER_MODE and e & IOAPIC_LVT_REMOTE_IRR:
                self.redtbl[pin] = e & ~IOAPIC_LVT_REMOTE_IRR
                if self.levels[pin]:
                    self._service(pin)

    def routes(self) -> list[tuple[int, MsiMessage]]:
        """Unmasked pins and their messages (for KVM_SET_GSI_ROUTING in split mode)."""
        return [(pin, self.message(pin)) for pin, e in enumerate(self.redtbl)
                if not e & IOAPIC_LVT_MASKED]

    # --- MMIO ----------------------------------------------------------------------
    def read(self, base: int, offset: int, size: int) -> int:
        # The registers are 32 bits wide; a narrower load sees their low bytes (as the
        # bus guarantees: a value never wider than the access).
        return self._read32(offset) & ((1 << (8 * min(size, 4))) - 1)

    def _read32(self, offset: int) -> int:
        if offset == IOREGSEL:
            return self.ioregsel
        if offset != IOWIN:
            return 0
        r = self.ioregsel
        if r == IOAPIC_REG_ID:
            return self.id << 24
        if r == IOAPIC_REG_VER:
            return IOAPIC_VERSION | ((IOAPIC_NUM_PINS - 1) << 16)
        if r == IOAPIC_REG_ARB:
            return 0
        idx = r - IOAPIC_REG_REDTBL
        if 0 <= idx < 2 * IOAPIC_NUM_PINS:
            e = self.redtbl[idx >> 1]
            return (e >> 32) & 0xFFFFFFFF if idx & 1 else e & 0xFFFFFFFF
        return 0xFFFFFFFF

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        value &= 0xFFFFFFFF
        if offset == IOREGSEL:
            self.ioregsel = value & 0xFF
            return
        if offset == IOEOI:
            self.eoi(value & 0xFF)
            return
        if offset != IOWIN:
            return
        r = self.ioregsel
        if r == IOAPIC_REG_ID:
            self.id = (value >> 24) & 0xF
            return
        idx = r - IOAPIC_REG_REDTBL
        if not 0 <= idx < 2 * IOAPIC_NUM_PINS:
            return
        pin = idx >> 1
        old = self.redtbl[pin]
        if idx & 1:
            new = (old & 0xFFFFFFFF) | (value << 32)
        else:
            new = (old & ~0xFFFFFFFF & ~IOAPIC_RO_BITS) | (value & ~IOAPIC_RO_BITS) | (
                old & IOAPIC_RO_BITS)
        if not new & IOAPIC_LVT_TRIGGER_MODE:
            new &= ~IOAPIC_LVT_REMOTE_IRR  # edge entries have no remote IRR
        self.redtbl[pin] = new
        self.on_routes_changed()
        # Unmasking a level-triggered pin whose line is asserted delivers it now.
        if self.levels[pin] and new & IOAPIC_LVT_TRIGGER_MODE:
            self._service(pin)
