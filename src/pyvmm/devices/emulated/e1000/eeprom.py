"""The 82540EM's EEPROM and PHY, the two things a driver reads before it touches a ring.

EEPROM (8254x SDM 5.2, 5.6): 64 words — the MAC in words 0-2, the PCI IDs in 0x0B-0x0E,
and word 0x3F chosen so that words 0..0x3F sum to 0xBABA (what every e1000 driver checks
before it trusts the MAC). Two ways in: EERD (start bit, address; the word and DONE
appear at once — the model has no access time), and EECD, the microwire pins a driver
bit-bangs (Linux's e1000 reads the 82540 this way: REQ/GNT, CS, then a 3-bit READ
opcode and a 6-bit address shifted in on DI at SK's rising edges, then data bits out
on DO, most significant first, continuing into the next word while CS stays high).

PHY (a Marvell 88E1011, MDIO address 1; SDM 13.5): the registers a driver reads to
see the link — ID (0x01410C20), status (link up, autonegotiation complete), the
1000BASE-T status and Marvell's specific status (1000 Mb/s full duplex, resolved).
Writes are kept (a driver reads back what it set); reset and restart of
autonegotiation complete at once. An MDIC access to another PHY address sets ERROR,
as an MDIO read no PHY answers does.
"""

from __future__ import annotations

from pyvmm.uapi import e1000 as E


def eeprom_image(mac: bytes, subsystem_id: int = 0, subsystem_vendor: int = 0) -> list[int]:
    words = [0xFFFF] * E.EEPROM_WORDS
    for i in range(3):
        words[E.EEPROM_NODE_ADDRESS_BYTE_0 + i] = mac[2 * i] | mac[2 * i + 1] << 8
    words[3:0x0A] = [0] * 7  # compatibility, OEM fields: nothing special
    words[E.EEPROM_INIT_CONTROL1_REG] = 0x0000
    words[E.EEPROM_SUBSYSTEM_ID] = subsystem_id
    words[E.EEPROM_SUBSYSTEM_VENDOR_ID] = subsystem_vendor
    words[E.EEPROM_DEVICE_ID] = E.E1000_DEV_ID_82540EM
    words[E.EEPROM_VENDOR_ID] = E.PCI_VENDOR_ID_INTEL
    # Init control 2: bits 13:12 = 11b advertise symmetric and asymmetric pause (the
    # driver's default flow control comes from here).
    words[E.EEPROM_INIT_CONTROL2_REG] = 0x3000
    words[E.EEPROM_CHECKSUM_REG] = (E.EEPROM_SUM - sum(words[:E.EEPROM_CHECKSUM_REG])) & 0xFFFF
    return words


class Microwire:
    """The EECD pins of a 64-word microwire EEPROM (read only: ERASE/WRITE opcodes are
    shifted in and ignored, as on a part with writes disabled)."""

    ADDR_BITS = 6

    def __init__(self, words: list[int]) -> None:
        self.words = words
        self.reset()

    def reset(self) -> None:
        self.pins = 0  # SK, CS, DI as last written
        self.bits_in = 0
        self.shift = 0
        self.reading = False
        self.pos = -1  # bit of the output stream on DO; <0: the leading dummy zero
        self.addr = 0

    def do(self) -> int:
        if not self.reading or not self.pins & E.E1000_EECD_CS or self.pos < 0:
            return 0
        word = self.words[(self.addr + self.pos // 16) % E.EEPROM_WORDS]
        return E.E1000_EECD_DO if word >> (15 - self.pos % 16) & 1 else 0

    def write(self, value: int) -> None:
        old, self.pins = self.pins, value & (E.E1000_EECD_SK | E.E1000_EECD_CS
                                             | E.E1000_EECD_DI)
        if not value & E.E1000_EECD_CS:  # deselected: the next select starts a command
            self.bits_in = self.shift = 0
            self.reading, self.pos = False, -1
            return
        if not (old ^ value) & E.E1000_EECD_SK:
            return
        if not value & E.E1000_EECD_SK:  # falling edge: the next output bit
            if self.reading:
                self.pos += 1
            return
        if self.reading:
            return
        # rising edge: one more command bit. A start bit (1) leads the opcode on real
        # parts; Linux's e1000 shifts the opcode with it (110b = start + READ 10b).
        self.shift = (self.shift << 1 | bool(value & E.E1000_EECD_DI)) & 0xFFFF
        self.bits_in += 1
        if self.bits_in == 3 + self.ADDR_BITS and \
                self.shift >> self.ADDR_BITS == E.EEPROM_READ_OPCODE_MICROWIRE:
            self.reading, self.pos = True, -1
            self.addr = self.shift & ((1 << self.ADDR_BITS) - 1)


class Phy:
    def __init__(self) -> None:
        self.link = True
        self.reset()

    def reset(self) -> None:
        self.regs = {
            E.PHY_CTRL: 0x1140,  # autonegotiation on, 1000 Mb/s, full duplex
            E.PHY_ID1: E.M88E1011_I_PHY_ID >> 16,
            E.PHY_ID2: E.M88E1011_I_PHY_ID & 0xFFFF,
            E.PHY_AUTONEG_ADV: 0x0DE1,  # 10/100 half+full, pause
            E.PHY_LP_ABILITY: 0x45E1,  # what a gigabit partner answers
            E.PHY_AUTONEG_EXP: 0x0001,
            E.PHY_NEXT_PAGE_TX: 0x2001,
            E.PHY_1000T_CTRL: 0x0E00,
            E.PHY_1000T_STATUS: 0x3C00,  # partner 1000 half+full, local/remote receiver OK
            E.PHY_EXT_STATUS: 0x3000,
            E.M88E1000_PHY_SPEC_CTRL: 0x0068,
            E.M88E1000_EXT_PHY_SPEC_CTRL: 0x0D60,
        }

    def status(self) -> int:
        # 100BASE-X/10BASE-T half+full capable, extended status, preamble suppression,
        # autonegotiation ability; link and AN complete follow the host link.
        s = 0x7949
        if self.link:
            s |= E.MII_SR_LINK_STATUS | E.MII_SR_AUTONEG_COMPLETE
        return s

    def read(self, reg: int) -> int:
        if reg == E.PHY_STATUS:
            return self.status()
        if reg == E.M88E1000_PHY_SPEC_STATUS:
            return (E.M88E1000_PSSR_1000MBS | E.M88E1000_PSSR_DPLX
                    | E.M88E1000_PSSR_SPD_DPLX_RESOLVED
                    | (E.M88E1000_PSSR_LINK if self.link else 0))
        return self.regs.get(reg, 0)

    def write(self, reg: int, value: int) -> None:
        if reg in (E.PHY_STATUS, E.PHY_ID1, E.PHY_ID2, E.PHY_LP_ABILITY, E.PHY_AUTONEG_EXP,
                   E.PHY_1000T_STATUS, E.PHY_EXT_STATUS, E.M88E1000_PHY_SPEC_STATUS):
            return  # read-only
        if reg == E.PHY_CTRL:
            if value & E.MII_CR_RESET:
                self.reset()
            # reset and restart-autonegotiation self-clear: negotiation is instant here
            value &= ~(E.MII_CR_RESET | E.MII_CR_RESTART_AUTO_NEG)
        self.regs[reg] = value & 0xFFFF
