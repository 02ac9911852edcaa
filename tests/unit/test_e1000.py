"""The 82540EM model through its BARs, as a driver sees it, with real guest memory for
the rings and a datagram socketpair as the net backend (the switch port's shape: frames
with the 12-byte vnet header in front).

Registers (CTRL/STATUS, EEPROM by EERD and by microwire, MDIC and the PHY, ICR
read-to-clear, ICS/IMS/IMC and INTx), both rings with wrap-around, the receive filter,
checksum offload, TCP segmentation, and what a broken or hostile driver can do:
zero-length rings, heads/tails past the ring, descriptors and buffers outside RAM,
random register sequences — logged, counted, never raised."""

from __future__ import annotations

import socket
import struct
import zlib
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.bus import IoBus, MmioBus
from pyvmm.devices.emulated.e1000.nic import E1000, csum16
from pyvmm.errors import ConfigError
from pyvmm.event import EventManager
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.machine.pci import build_pci
from pyvmm.memory import GuestMemory
from pyvmm.sharing.switch import Switch, SwitchPort, receive_port
from pyvmm.testing.lines import RecordingLine
from pyvmm.uapi import e1000 as E
from pyvmm.uapi import pci as P

MAC = bytes.fromhex("525400123456")
HDR = 12
RX_RING, TX_RING, RX_BUF, TX_BUF = 0x10000, 0x20000, 0x100000, 0x200000
RAM = 4 << 20


class FakeEvents:
    def __init__(self) -> None:
        self.cbs: dict[int, Callable[[int, int], None]] = {}

    def add(self, fd: int, callback: Callable[[int, int], None]) -> None:
        self.cbs[fd] = callback

    def remove(self, fd: int) -> None:
        del self.cbs[fd]


class Rig:
    def __init__(self) -> None:
        self.mem = GuestMemory([(0, RAM)])
        dev, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        dev.setblocking(False)
        self.peer.setblocking(False)
        self.port = SwitchPort(dev, "e1000")
        self.events = FakeEvents()
        self.line = RecordingLine()
        self.nic = E1000(self.mem, self.port, MAC, self.events)
        self.nic.intx = self.line

    def close(self) -> None:
        self.nic.close()
        self.port.close()
        self.peer.close()
        self.mem.close()

    def r(self, off: int) -> int:
        return self.nic.read_bar(0, off, 4)

    def w(self, off: int, v: int) -> None:
        self.nic.write_bar(0, off, 4, v)

    # --- a driver's set-up ---------------------------------------------------------------
    def rx_setup(self, n: int = 8, bsize_bits: int = 0, rctl: int = 0) -> None:
        for i in range(n):
            self.mem.write(RX_RING + 16 * i, struct.pack("<QQ", RX_BUF + 0x4000 * i, 0))
        self.w(E.E1000_RDBAL, RX_RING)
        self.w(E.E1000_RDBAH, 0)
        self.w(E.E1000_RDLEN, 16 * n)
        self.w(E.E1000_RDH, 0)
        self.w(E.E1000_RDT, n - 1)
        self.w(E.E1000_RCTL, E.E1000_RCTL_EN | E.E1000_RCTL_BAM | bsize_bits | rctl)

    def tx_setup(self, n: int = 8) -> None:
        self.w(E.E1000_TDBAL, TX_RING)
        self.w(E.E1000_TDBAH, 0)
        self.w(E.E1000_TDLEN, 16 * n)
        self.w(E.E1000_TDH, 0)
        self.w(E.E1000_TDT, 0)
        self.w(E.E1000_TCTL, E.E1000_TCTL_EN | E.E1000_TCTL_PSP)

    def tx_desc(self, i: int, buf: int, length: int, cmd: int, upper: int = 0) -> None:
        self.mem.write(TX_RING + 16 * i, struct.pack("<QII", buf, length | cmd, upper))

    def inject(self, frame: bytes) -> None:
        self.peer.send(bytes(HDR) + frame)
        if self.port.fd in self.events.cbs:
            self.events.cbs[self.port.fd](self.port.fd, 1)

    def sent(self) -> list[bytes]:
        out: list[bytes] = []
        while True:
            try:
                f = self.peer.recv(65536)
            except BlockingIOError:
                return out
            assert f[:HDR] == bytes(HDR)
            out.append(f[HDR:])

    def rx_desc(self, i: int) -> tuple[int, int, int, int, int, int]:
        return struct.unpack("<QHHBBH", self.mem.read(RX_RING + 16 * i, 16))


@pytest.fixture
def rig() -> Iterator[Rig]:
    r = Rig()
    yield r
    r.close()


def frame(dst: bytes = MAC, n: int = 100, seed: int = 1) -> bytes:
    return dst + bytes.fromhex("020000000001") + b"\x88\xb5" + bytes(
        (i * 7 + seed) & 0xFF for i in range(n))


# --- PCI identity ------------------------------------------------------------------------
def test_pci_function_as_enumerated() -> None:
    mem = GuestMemory([(0, RAM)])
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    nic = E1000(mem, SwitchPort(a, "x"), MAC, None)
    pio, mmio = IoBus(), MmioBus()
    root = build_pci(pio, mmio, mem, RecordingMsiSink(), False, [nic])
    cfg = nic.config
    assert (cfg.get16(P.PCI_VENDOR_ID), cfg.get16(P.PCI_DEVICE_ID)) == (0x8086, 0x100E)
    assert cfg.data[P.PCI_CLASS_PROG:P.PCI_CLASS_PROG + 3] == b"\x00\x00\x02"
    assert cfg.data[P.PCI_INTERRUPT_PIN] == 1
    for idx, size, io in ((0, 0x20000, False), (1, 0x40, True)):
        off = P.PCI_BASE_ADDRESS_0 + 4 * idx
        saved = root.config_read(0, 2, 0, off, 4)
        root.config_write(0, 2, 0, off, 4, 0xFFFFFFFF)
        sized = root.config_read(0, 2, 0, off, 4)
        root.config_write(0, 2, 0, off, 4, saved)
        assert bool(sized & 1) == io
        assert (~(sized & ~(3 if io else 0xF)) + 1) & 0xFFFFFFFF == size
    # the same registers through the I/O window and through BAR0
    root.config_write(0, 2, 0, P.PCI_COMMAND, 2, P.PCI_COMMAND_IO | P.PCI_COMMAND_MEMORY)
    port = cfg.bar_address(1)
    bar0 = cfg.bar_address(0)
    pio.write(port + E.E1000_IOADDR, 4, E.E1000_IMS)
    pio.write(port + E.E1000_IODATA, 4, E.E1000_ICR_RXT0)
    assert mmio.read(bar0 + E.E1000_IMS, 4) == E.E1000_ICR_RXT0
    pio.write(port + E.E1000_IOADDR, 4, E.E1000_STATUS)
    assert pio.read(port + E.E1000_IODATA, 4) & E.E1000_STATUS_LU
    nic.close()
    a.close()
    b.close()
    mem.close()


# --- EEPROM ------------------------------------------------------------------------------
def eerd(rig: Rig, word: int) -> int:
    rig.w(E.E1000_EERD, word << E.E1000_EERD_ADDR_SHIFT | E.E1000_EERD_START)
    v = rig.r(E.E1000_EERD)
    assert v & E.E1000_EERD_DONE
    assert (v >> E.E1000_EERD_ADDR_SHIFT) & 0xFF == word
    return v >> E.E1000_EERD_DATA_SHIFT


def test_eeprom_by_eerd_has_mac_ids_and_checksum(rig: Rig) -> None:
    words = [eerd(rig, i) for i in range(E.EEPROM_WORDS)]
    assert b"".join(w.to_bytes(2, "little") for w in words[:3]) == MAC
    assert words[E.EEPROM_DEVICE_ID] == 0x100E and words[E.EEPROM_VENDOR_ID] == 0x8086
    assert sum(words) & 0xFFFF == E.EEPROM_SUM
    assert eerd(rig, 0x80) == 0 and rig.nic.errors.counts["eerd"] == 1


def microwire_read(rig: Rig, word: int) -> int:
    """Linux's e1000_read_eeprom for a microwire part, pin by pin."""
    eecd = rig.r(E.E1000_EECD)
    rig.w(E.E1000_EECD, eecd | E.E1000_EECD_REQ)
    assert rig.r(E.E1000_EECD) & E.E1000_EECD_GNT
    rig.w(E.E1000_EECD, E.E1000_EECD_REQ | E.E1000_EECD_CS)

    def bit_out(b: int) -> None:
        base = E.E1000_EECD_REQ | E.E1000_EECD_CS | (E.E1000_EECD_DI if b else 0)
        rig.w(E.E1000_EECD, base)
        rig.w(E.E1000_EECD, base | E.E1000_EECD_SK)
        rig.w(E.E1000_EECD, base)

    for i in range(2, -1, -1):
        bit_out(E.EEPROM_READ_OPCODE_MICROWIRE >> i & 1)
    for i in range(5, -1, -1):
        bit_out(word >> i & 1)
    data = 0
    base = E.E1000_EECD_REQ | E.E1000_EECD_CS
    for _ in range(16):
        rig.w(E.E1000_EECD, base | E.E1000_EECD_SK)
        data = data << 1 | bool(rig.r(E.E1000_EECD) & E.E1000_EECD_DO)
        rig.w(E.E1000_EECD, base)
    rig.w(E.E1000_EECD, E.E1000_EECD_REQ)  # CS low: standby
    rig.w(E.E1000_EECD, 0)  # release
    return data


def test_eeprom_by_microwire_matches_eerd(rig: Rig) -> None:
    assert not rig.r(E.E1000_EECD) & E.E1000_EECD_SIZE  # 64 words: 6 address bits
    assert rig.r(E.E1000_EECD) & E.E1000_EECD_PRES
    for w in (0, 1, 2, 0x0D, 0x0E, 0x3F):
        assert microwire_read(rig, w) == eerd(rig, w)


# --- PHY ---------------------------------------------------------------------------------
def mdic(rig: Rig, reg: int, op: int = E.E1000_MDIC_OP_READ, data: int = 0,
         phy: int = 1) -> int:
    rig.w(E.E1000_MDIC, op | reg << E.E1000_MDIC_REG_SHIFT | phy << E.E1000_MDIC_PHY_SHIFT
          | data)
    v = rig.r(E.E1000_MDIC)
    assert v & E.E1000_MDIC_READY
    return v


def test_phy_id_link_and_errors(rig: Rig) -> None:
    ident = (mdic(rig, E.PHY_ID1) & 0xFFFF) << 16 | mdic(rig, E.PHY_ID2) & 0xFFFF
    assert ident == E.M88E1011_I_PHY_ID
    st_ = mdic(rig, E.PHY_STATUS) & 0xFFFF
    assert st_ & E.MII_SR_LINK_STATUS and st_ & E.MII_SR_AUTONEG_COMPLETE
    assert mdic(rig, E.M88E1000_PHY_SPEC_STATUS) & E.M88E1000_PSSR_LINK
    assert not mdic(rig, E.PHY_STATUS) & E.E1000_MDIC_ERROR
    assert mdic(rig, E.PHY_STATUS, phy=2) & E.E1000_MDIC_ERROR  # nobody at address 2
    mdic(rig, E.PHY_AUTONEG_ADV, E.E1000_MDIC_OP_WRITE, 0x01E1)
    assert mdic(rig, E.PHY_AUTONEG_ADV) & 0xFFFF == 0x01E1
    mdic(rig, E.PHY_ID1, E.E1000_MDIC_OP_WRITE, 0x1234)  # read-only
    assert mdic(rig, E.PHY_ID1) & 0xFFFF == 0x0141
    rig.r(E.E1000_ICR)
    rig.w(E.E1000_MDIC, E.E1000_MDIC_OP_READ | E.E1000_MDIC_INT_EN | 1 << 21)
    assert rig.r(E.E1000_ICR) & E.E1000_ICR_MDAC
    rig.nic.set_link(False)
    assert not mdic(rig, E.PHY_STATUS) & E.MII_SR_LINK_STATUS


# --- CTRL / STATUS / interrupts -----------------------------------------------------------
def test_link_follows_slu_and_host_with_lsc(rig: Rig) -> None:
    assert rig.r(E.E1000_STATUS) & E.E1000_STATUS_LU
    assert rig.r(E.E1000_ICR) == 0
    rig.w(E.E1000_CTRL, rig.r(E.E1000_CTRL) & ~E.E1000_CTRL_SLU)
    assert not rig.r(E.E1000_STATUS) & E.E1000_STATUS_LU
    assert rig.r(E.E1000_ICR) == E.E1000_ICR_LSC
    rig.w(E.E1000_IMS, E.E1000_ICR_LSC)
    rig.w(E.E1000_CTRL, rig.r(E.E1000_CTRL) | E.E1000_CTRL_SLU)
    assert rig.line.level  # LSC unmasked: INTx asserted
    assert rig.r(E.E1000_ICR) == E.E1000_ICR_LSC and not rig.line.level
    rig.nic.set_link(False)
    assert rig.r(E.E1000_ICR) == E.E1000_ICR_LSC
    assert not rig.r(E.E1000_STATUS) & E.E1000_STATUS_LU
    rig.nic.set_link(True)
    assert rig.r(E.E1000_STATUS) & E.E1000_STATUS_LU and rig.r(E.E1000_ICR) == E.E1000_ICR_LSC
    # restarting autonegotiation: one link change
    mdic(rig, E.PHY_CTRL, E.E1000_MDIC_OP_WRITE, 0x1140 | E.MII_CR_RESTART_AUTO_NEG)
    assert rig.r(E.E1000_ICR) & E.E1000_ICR_LSC
    assert not mdic(rig, E.PHY_CTRL) & E.MII_CR_RESTART_AUTO_NEG  # self-clearing


def test_icr_read_clears_ics_ims_imc_drive_intx(rig: Rig) -> None:
    rig.w(E.E1000_ICS, E.E1000_ICR_RXT0 | E.E1000_ICR_TXDW)
    assert not rig.line.level  # masked
    assert rig.r(E.E1000_ICS) == E.E1000_ICR_RXT0 | E.E1000_ICR_TXDW  # ICS reads ICR
    rig.w(E.E1000_IMS, E.E1000_ICR_TXDW)
    assert rig.line.level and rig.r(E.E1000_IMS) == E.E1000_ICR_TXDW
    rig.w(E.E1000_IMS, E.E1000_ICR_RXT0)  # IMS ORs
    assert rig.r(E.E1000_IMS) == E.E1000_ICR_TXDW | E.E1000_ICR_RXT0
    rig.w(E.E1000_IMC, E.E1000_ICR_TXDW | E.E1000_ICR_RXT0)
    assert rig.r(E.E1000_IMS) == 0 and not rig.line.level
    rig.w(E.E1000_IMS, E.E1000_ICR_TXDW)
    assert rig.line.level
    assert rig.r(E.E1000_ICR) == E.E1000_ICR_RXT0 | E.E1000_ICR_TXDW
    assert rig.r(E.E1000_ICR) == 0 and not rig.line.level  # read to clear
    rig.w(E.E1000_ICS, E.E1000_ICR_TXDW | E.E1000_ICR_LSC)
    rig.w(E.E1000_ICR, E.E1000_ICR_TXDW)  # a write clears the bits written
    assert rig.r(E.E1000_ICR) == E.E1000_ICR_LSC
    assert rig.line.history == [True, False, True, False, True, False]


def test_ctrl_rst_resets_the_function(rig: Rig) -> None:
    rig.rx_setup()
    rig.w(E.E1000_IMS, 0xFF)
    rig.w(E.E1000_RA + 4, 0)  # invalidate the MAC entry
    rig.w(E.E1000_MTA + 8, 0xFFFF)
    rig.w(E.E1000_CTRL, rig.r(E.E1000_CTRL) | E.E1000_CTRL_RST)
    assert not rig.r(E.E1000_CTRL) & E.E1000_CTRL_RST  # self-clearing
    assert rig.r(E.E1000_IMS) == 0 and rig.r(E.E1000_RCTL) == 0 and rig.r(E.E1000_RDLEN) == 0
    assert rig.r(E.E1000_MTA + 8) == 0
    assert rig.r(E.E1000_RA) == int.from_bytes(MAC[:4], "little")
    assert rig.r(E.E1000_RA + 4) == int.from_bytes(MAC[4:], "little") | E.E1000_RAH_AV
    assert rig.r(E.E1000_STATUS) & E.E1000_STATUS_LU


def test_statistics_clear_on_read(rig: Rig) -> None:
    rig.rx_setup()
    rig.inject(frame())
    rig.inject(frame(b"\xff" * 6))
    assert rig.r(E.E1000_GPRC) == 2 and rig.r(E.E1000_BPRC) == 1
    assert rig.r(E.E1000_GPRC) == 0
    assert rig.r(E.E1000_GORCL) == 2 * (len(frame()) + 4)  # octets with the FCS
    assert rig.r(E.E1000_GORCL) == 0


# --- transmit ----------------------------------------------------------------------------
def test_transmit_legacy_ring_wraps(rig: Rig) -> None:
    n = 8  # RDLEN/TDLEN are multiples of 128 bytes: 8 descriptors at least
    rig.tx_setup(n)
    rig.w(E.E1000_IMS, E.E1000_ICR_TXDW)
    got: list[bytes] = []
    want: list[bytes] = []
    for k in range(10):  # 10 frames over an 8-descriptor ring, two descriptors each
        f = frame(b"\xff" * 6, 50 + k, seed=k)
        want.append(f)
        for j, part in enumerate((f[:20], f[20:])):
            i = (2 * k + j) % n
            rig.mem.write(TX_BUF + 0x1000 * i, part)
            cmd = E.E1000_TXD_CMD_RS | (E.E1000_TXD_CMD_EOP if j else 0)
            rig.tx_desc(i, TX_BUF + 0x1000 * i, len(part), cmd)
        rig.w(E.E1000_TDT, (2 * k + 2) % n)
        assert rig.r(E.E1000_TDH) == (2 * k + 2) % n
        for j in range(2):
            assert rig.mem.read(TX_RING + 16 * ((2 * k + j) % n) + 12, 1)[0] & 1  # DD
        assert rig.r(E.E1000_ICR) == E.E1000_ICR_TXDW | E.E1000_ICR_TXQE
        got += rig.sent()
    assert got == want
    assert rig.nic.counts["tx_frames"] == 10
    assert rig.r(E.E1000_GPTC) == 10 and rig.r(E.E1000_BPTC) == 10


def test_transmit_waits_for_tctl_en(rig: Rig) -> None:
    rig.tx_setup()
    rig.w(E.E1000_TCTL, 0)
    f = frame()
    rig.mem.write(TX_BUF, f)
    rig.tx_desc(0, TX_BUF, len(f), E.E1000_TXD_CMD_EOP | E.E1000_TXD_CMD_RS)
    rig.w(E.E1000_TDT, 1)
    assert rig.sent() == [] and rig.r(E.E1000_TDH) == 0
    rig.w(E.E1000_TCTL, E.E1000_TCTL_EN)
    assert rig.sent() == [f] and rig.r(E.E1000_TDH) == 1


def udp_frame() -> bytearray:
    payload = bytes(range(37))
    udp = struct.pack(">HHHH", 1234, 5678, 8 + len(payload), 0) + payload
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 1, 0, 64, 17, 0,
                     bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
    eth = MAC + bytes.fromhex("020000000001") + b"\x08\x00"
    pkt = bytearray(eth + ip + udp)
    # what a driver leaves in the UDP checksum for offload: the pseudo-header sum
    pseudo = ip[12:20] + struct.pack(">BBH", 0, 17, len(udp))
    pkt[14 + 20 + 6:14 + 20 + 8] = (~csum16(pseudo, 0, len(pseudo)) & 0xFFFF).to_bytes(2, "big")
    return pkt


def test_checksum_offload_by_context_descriptor(rig: Rig) -> None:
    rig.tx_setup()
    pkt = udp_frame()
    # context: IP header 14..33, sum at 24; UDP from 34 to the end, sum at 40
    ctx = struct.pack("<BBHBBHII", 14, 24, 33, 34, 40, 0,
                      E.E1000_TXD_CMD_DEXT | E.E1000_TXD_DTYP_C, 0)
    rig.mem.write(TX_RING, ctx)
    rig.mem.write(TX_BUF, bytes(pkt))
    popts = (E.E1000_TXD_POPTS_IXSM | E.E1000_TXD_POPTS_TXSM) << 8
    rig.tx_desc(1, TX_BUF, len(pkt), E.E1000_TXD_CMD_DEXT | E.E1000_TXD_DTYP_D
                | E.E1000_TXD_CMD_EOP | E.E1000_TXD_CMD_RS, popts)
    rig.w(E.E1000_TDT, 2)
    (out,) = rig.sent()
    assert csum16(out, 14, 34) == 0  # a valid IP header sums to 0xFFFF
    pseudo = out[26:34] + struct.pack(">BBH", 0, 17, len(out) - 34)
    assert csum16(pseudo + out[34:], 0, len(pseudo) + len(out) - 34) == 0
    assert out[:24] == pkt[:24] and out[42:] == pkt[42:]


def test_legacy_insert_checksum_and_vlan_tag(rig: Rig) -> None:
    rig.tx_setup()
    rig.w(E.E1000_CTRL, rig.r(E.E1000_CTRL) | E.E1000_CTRL_VME)
    pkt = udp_frame()
    pkt[24:26] = b"\0\0"
    rig.mem.write(TX_BUF, bytes(pkt))
    # legacy: CSO in the lower dword's byte 2, CSS in the upper's byte 1, VLAN id in special
    rig.tx_desc(0, TX_BUF, len(pkt) | 24 << 16, E.E1000_TXD_CMD_IC | E.E1000_TXD_CMD_EOP
                | E.E1000_TXD_CMD_VLE, 14 << 8 | 0x0123 << 16)
    rig.w(E.E1000_TDT, 1)
    (out,) = rig.sent()
    assert out[12:16] == b"\x81\x00\x01\x23"  # tag after the addresses
    untagged = out[:12] + out[16:]
    assert untagged[24:26] == csum16(pkt, 14, len(pkt)).to_bytes(2, "big")


# --- receive -----------------------------------------------------------------------------
def test_receive_fcs_eop_and_ring_wrap(rig: Rig) -> None:
    n = 8
    rig.rx_setup(n)
    rig.w(E.E1000_IMS, E.E1000_ICR_RXT0)
    for k in range(19):
        f = frame(n=80 + k, seed=k)
        rig.inject(f)
        i = k % n
        buf, length, _, status, err, _ = rig.rx_desc(i)
        assert status & (E.E1000_RXD_STAT_DD | E.E1000_RXD_STAT_EOP) == 3 and err == 0
        assert length == len(f) + 4
        got = rig.mem.read(buf, length)
        assert got[:-4] == f and got[-4:] == zlib.crc32(f).to_bytes(4, "little")
        assert rig.r(E.E1000_RDH) == (i + 1) % n
        assert rig.line.level
        assert rig.r(E.E1000_ICR) & E.E1000_ICR_RXT0
        rig.mem.write(RX_RING + 16 * i + 8, bytes(8))
        rig.w(E.E1000_RDT, i)  # give the descriptor back
    assert rig.nic.counts["rx_frames"] == 19


def test_receive_spans_buffers_secrc_and_pads(rig: Rig) -> None:
    rig.rx_setup(8, bsize_bits=3 << E.E1000_RCTL_SZ_SHIFT, rctl=E.E1000_RCTL_SECRC)  # 256
    f = frame(n=600)
    rig.inject(f)
    parts = [rig.rx_desc(i) for i in range(3)]
    assert [p[1] for p in parts] == [256, 256, len(f) - 512]
    assert [p[3] & E.E1000_RXD_STAT_EOP for p in parts] == [0, 0, E.E1000_RXD_STAT_EOP]
    assert b"".join(rig.mem.read(p[0], p[1]) for p in parts) == f
    rig.inject(frame(n=4))  # 18 bytes: padded to 60 on the wire
    _, length, _, status, _, _ = rig.rx_desc(3)
    assert length == E.ETH_ZLEN and status & E.E1000_RXD_STAT_EOP


def test_receive_held_without_descriptors_then_delivered(rig: Rig) -> None:
    rig.rx_setup(8)  # RDT = 7: seven free descriptors
    for k in range(7):
        rig.inject(frame(seed=k))
    rig.inject(frame(seed=9))  # no descriptor left: held, backend no longer watched
    assert rig.r(E.E1000_RDH) == 7 and rig.nic.pending is not None
    assert rig.port.fd not in rig.events.cbs
    assert rig.r(E.E1000_RNBC) >= 1
    rig.w(E.E1000_RDT, 1)  # two more
    buf, length, _, status, _, _ = rig.rx_desc(7)
    assert status & 1 and length == len(frame(seed=9)) + 4
    assert rig.mem.read(buf, 14) == frame(seed=9)[:14]
    assert rig.port.fd in rig.events.cbs and rig.nic.pending is None


def test_receive_dropped_when_disabled_or_link_down(rig: Rig) -> None:
    rig.rx_setup()
    rig.w(E.E1000_RCTL, 0)
    rig.inject(frame())
    assert rig.r(E.E1000_RDH) == 0 and rig.nic.counts["rx_dropped"] == 1
    rig.w(E.E1000_RCTL, E.E1000_RCTL_EN)
    rig.nic.set_link(False)
    rig.inject(frame())
    assert rig.r(E.E1000_RDH) == 0 and rig.nic.counts["rx_dropped"] == 2


def mta_bit(dst: bytes, mo: int) -> tuple[int, int]:
    h = {0: (dst[4] >> 4) | (dst[5] << 4), 1: (dst[4] >> 3) | (dst[5] << 5),
         2: (dst[4] >> 2) | (dst[5] << 6), 3: dst[4] | (dst[5] << 8)}[mo] & 0xFFF
    return h >> 5, h & 31


@pytest.mark.parametrize("mo", [0, 1, 2, 3])
def test_multicast_hash_filter(rig: Rig, mo: int) -> None:
    rig.rx_setup(rctl=mo << E.E1000_RCTL_MO_SHIFT)
    grp = bytes.fromhex("01005e7f1234")
    rig.inject(frame(grp))
    assert rig.nic.counts["rx_filtered"] == 1
    reg, bit = mta_bit(grp, mo)
    rig.w(E.E1000_MTA + 4 * reg, 1 << bit)
    rig.inject(frame(grp))
    assert rig.nic.counts["rx_frames"] == 1
    assert rig.r(E.E1000_MPRC) == 1


@pytest.mark.parametrize(("dst", "rctl", "accepted"), [
    (MAC, 0, True),
    (bytes.fromhex("525400999999"), 0, False),
    (bytes.fromhex("525400999999"), E.E1000_RCTL_UPE, True),
    (b"\xff" * 6, E.E1000_RCTL_BAM, True),
    (b"\xff" * 6, 0, False),
    (bytes.fromhex("3333000000fb"), 0, False),
    (bytes.fromhex("3333000000fb"), E.E1000_RCTL_MPE, True),
])
def test_receive_filter(rig: Rig, dst: bytes, rctl: int, accepted: bool) -> None:
    rig.rx_setup()
    rig.w(E.E1000_RCTL, E.E1000_RCTL_EN | rctl)
    rig.inject(frame(dst))
    assert rig.nic.counts["rx_frames"] == int(accepted)


def test_receive_address_entries_and_av(rig: Rig) -> None:
    rig.rx_setup()
    other = bytes.fromhex("02aabbccddee")
    rig.w(E.E1000_RA + 8 * 5, int.from_bytes(other[:4], "little"))
    rig.w(E.E1000_RA + 8 * 5 + 4, int.from_bytes(other[4:], "little") | E.E1000_RAH_AV)
    rig.inject(frame(other))
    assert rig.nic.counts["rx_frames"] == 1
    rig.w(E.E1000_RA + 4, int.from_bytes(MAC[4:], "little"))  # entry 0 without AV
    rig.inject(frame(MAC))
    assert rig.nic.counts["rx_frames"] == 1 and rig.nic.counts["rx_filtered"] == 1


def test_vlan_tag_stripped_into_descriptor(rig: Rig) -> None:
    rig.rx_setup(rctl=E.E1000_RCTL_SECRC)
    rig.w(E.E1000_CTRL, rig.r(E.E1000_CTRL) | E.E1000_CTRL_VME)
    f = frame(n=70)
    rig.inject(f[:12] + b"\x81\x00\x20\x07" + f[12:])
    buf, length, _, status, _, special = rig.rx_desc(0)
    assert status & E.E1000_RXD_STAT_VP and special == 0x2007
    assert rig.mem.read(buf, length) == f


# --- what a broken driver does ------------------------------------------------------------
def test_zero_length_and_out_of_ring_heads(rig: Rig) -> None:
    rig.tx_setup(8)
    rig.w(E.E1000_TDLEN, 0)
    rig.w(E.E1000_TDT, 2)
    assert rig.r(E.E1000_TDH) == 0 and rig.nic.errors.counts["tx:len0"] == 1
    rig.w(E.E1000_TDLEN, 64)  # not a multiple of 128 bytes: the low bits are dropped
    assert rig.r(E.E1000_TDLEN) == 0
    rig.w(E.E1000_TDLEN, 128)
    rig.w(E.E1000_TDT, 9)  # past the 8-descriptor ring
    assert rig.r(E.E1000_TDH) == 0 and rig.nic.errors.counts["tx:bounds"] == 1
    rig.rx_setup(8)
    rig.w(E.E1000_RDH, 9)
    rig.inject(frame())
    assert rig.nic.errors.counts["rx:bounds"] == 1 and rig.r(E.E1000_MPC) == 1
    rig.w(E.E1000_RDLEN, 0)
    rig.inject(frame())
    assert rig.nic.errors.counts["rx:len0"] == 1


def test_descriptors_and_buffers_outside_ram(rig: Rig) -> None:
    rig.tx_setup(8)
    rig.tx_desc(0, 1 << 40, 100, E.E1000_TXD_CMD_EOP | E.E1000_TXD_CMD_RS)  # buffer
    rig.w(E.E1000_TDT, 1)
    assert rig.sent() == [] and rig.r(E.E1000_TDH) == 1  # completed, frame dropped
    assert rig.mem.read(TX_RING + 12, 1)[0] & 1
    assert rig.nic.counts["tx_dropped"] == 1
    f = frame()
    rig.mem.write(TX_BUF, f)
    rig.tx_desc(1, TX_BUF, len(f), E.E1000_TXD_CMD_EOP)
    rig.w(E.E1000_TDT, 2)
    assert rig.sent() == [f]  # the next frame is whole: no state left from the bad one
    rig.w(E.E1000_TDBAL, 0xFFFF0000)
    rig.w(E.E1000_TDBAH, 0x10)  # the ring itself outside RAM
    rig.w(E.E1000_TDT, 3)
    assert rig.nic.errors.counts["tx:desc"] == 1 and rig.r(E.E1000_TDH) == 2
    rig.rx_setup(8)
    rig.mem.write(RX_RING, struct.pack("<Q", 1 << 40))
    rig.inject(frame())
    _, _, _, status, err, _ = rig.rx_desc(0)
    assert status & 1 and err == E.E1000_RXD_ERR_RXE
    rig.w(E.E1000_RDBAH, 0x10)
    rig.inject(frame())
    assert rig.nic.errors.counts["rx:desc"] == 1


def tcp_frame(payload: bytes, flags: int = 0x19) -> bytearray:
    """IPv4/TCP as Linux's e1000 hands it to TSO: total length and IP checksum 0, the
    TCP checksum field holding the pseudo-header sum without a length."""
    tcp = struct.pack(">HHIIBBHHH", 1234, 80, 1000, 0, 5 << 4, flags, 512, 0, 0)
    ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 0, 0x100, 0x4000, 64, 6, 0,
                     bytes((10, 0, 0, 1)), bytes((10, 0, 0, 2)))
    pkt = bytearray(MAC + bytes.fromhex("020000000001") + b"\x08\x00" + ip + tcp + payload)
    pseudo = ip[12:20] + struct.pack(">BBH", 0, 6, 0)
    pkt[34 + 16:34 + 18] = (~csum16(pseudo, 0, 12) & 0xFFFF).to_bytes(2, "big")
    return pkt


def test_tcp_segmentation(rig: Rig) -> None:
    rig.tx_setup(8)
    payload = bytes((i * 13) & 0xFF for i in range(2500))
    pkt = tcp_frame(payload)
    hdr_len, mss = 54, 1000
    ctx = struct.pack("<BBHBBHIBBH", 14, 24, 33, 34, 50, 0,
                      E.E1000_TXD_CMD_DEXT | E.E1000_TXD_DTYP_C | E.E1000_TXD_CMD_TSE
                      | E.E1000_TXD_CMD_IP | E.E1000_TXD_CMD_TCP | len(payload), 0, hdr_len, mss)
    rig.mem.write(TX_RING, ctx)
    rig.mem.write(TX_BUF, bytes(pkt[:hdr_len]))
    rig.mem.write(TX_BUF + 0x1000, bytes(pkt[hdr_len:]))
    data = E.E1000_TXD_CMD_DEXT | E.E1000_TXD_DTYP_D | E.E1000_TXD_CMD_TSE
    popts = (E.E1000_TXD_POPTS_IXSM | E.E1000_TXD_POPTS_TXSM) << 8
    rig.tx_desc(1, TX_BUF, hdr_len, data, popts)  # headers and payload in two buffers
    rig.tx_desc(2, TX_BUF + 0x1000, len(payload), data | E.E1000_TXD_CMD_EOP
                | E.E1000_TXD_CMD_RS, popts)
    rig.w(E.E1000_TDT, 3)
    segs = rig.sent()
    assert [len(x) - hdr_len for x in segs] == [1000, 1000, 500]
    assert b"".join(x[hdr_len:] for x in segs) == payload
    for k, seg in enumerate(segs):
        assert seg[:14] == pkt[:14]
        ip, tcp = seg[14:34], seg[34:]
        assert struct.unpack(">H", ip[2:4])[0] == len(seg) - 14  # total length
        assert struct.unpack(">H", ip[4:6])[0] == 0x100 + k  # identification
        assert csum16(ip, 0, 20) == 0  # IP checksum valid
        assert struct.unpack(">I", tcp[4:8])[0] == 1000 + 1000 * k  # sequence
        assert tcp[13] == (0x19 if k == 2 else 0x10)  # FIN|PSH on the last only
        pseudo = ip[12:20] + struct.pack(">BBH", 0, 6, len(tcp))
        assert csum16(pseudo + tcp, 0, 12 + len(tcp)) == 0  # TCP checksum valid
    assert rig.nic.counts["tx_frames"] == 3


def test_oversized_tse_and_runt_frames_dropped(rig: Rig) -> None:
    rig.tx_setup(8)
    rig.tx_desc(0, TX_BUF, 0x3000, 0)
    rig.tx_desc(1, TX_BUF, 0x3000, E.E1000_TXD_CMD_EOP)  # 24 KiB: over 16 KiB
    rig.tx_desc(2, TX_BUF, 100, E.E1000_TXD_CMD_DEXT | E.E1000_TXD_DTYP_D
                | E.E1000_TXD_CMD_TSE | E.E1000_TXD_CMD_EOP)
    rig.tx_desc(3, TX_BUF, 10, E.E1000_TXD_CMD_EOP)  # shorter than a header
    rig.w(E.E1000_TDT, 4)
    assert rig.sent() == [] and rig.nic.counts["tx_dropped"] == 3
    assert {"tx:big", "tx:tso", "tx:runt"} <= set(rig.nic.errors.counts)  # TSE with MSS 0
    rig.rx_setup(8, rctl=E.E1000_RCTL_LPE)  # 2 KiB buffers: 15 KB needs 8, the ring has 7
    rig.inject(frame(n=15000))
    assert rig.nic.errors.counts["rx:ring"] == 1 and rig.nic.pending is None
    rig.w(E.E1000_RCTL, E.E1000_RCTL_EN)  # without LPE: longer than 1522 is dropped
    rig.inject(frame(n=1600))
    assert rig.nic.counts["rx_frames"] == 0


REGS = [E.E1000_CTRL, E.E1000_STATUS, E.E1000_EECD, E.E1000_EERD, E.E1000_MDIC,
        E.E1000_ICR, E.E1000_ICS, E.E1000_IMS, E.E1000_IMC, E.E1000_RCTL, E.E1000_TCTL,
        E.E1000_RDBAL, E.E1000_RDBAH, E.E1000_RDLEN, E.E1000_RDH, E.E1000_RDT,
        E.E1000_TDBAL, E.E1000_TDBAH, E.E1000_TDLEN, E.E1000_TDH, E.E1000_TDT,
        E.E1000_MTA, E.E1000_RA, E.E1000_RA + 4, E.E1000_GPRC, 0x1FFFC, 0x5]
small = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 0x10, 0x20, 0x80, 0xFFFF, 0xFFFFFFFF,
                         RX_RING, TX_RING, E.E1000_RCTL_EN, E.E1000_TCTL_EN,
                         E.E1000_CTRL_RST])
ops = st.lists(st.tuples(st.sampled_from(["r", "w", "rx", "io"]), st.sampled_from(REGS),
                         st.one_of(small, st.integers(0, 0xFFFFFFFF)),
                         st.sampled_from([1, 2, 4, 8])), max_size=60)


@settings(max_examples=150, deadline=None)
@given(ops=ops, garbage=st.binary(min_size=16 * 8, max_size=16 * 8))
def test_random_register_sequences_never_raise(ops: list[tuple[str, int, int, int]],
                                               garbage: bytes) -> None:
    rig = Rig()
    try:
        rig.mem.write(RX_RING, garbage)
        rig.mem.write(TX_RING, garbage)
        for kind, off, v, size in ops:
            if kind == "r":
                rig.nic.read_bar(0, off, size if off % 4 == 0 else 1)
            elif kind == "w":
                rig.nic.write_bar(0, off, size if off % 4 == 0 else 1,
                                  v & ((1 << (8 * size)) - 1))
            elif kind == "io":
                rig.nic.write_bar(1, 0, 4, off)
                rig.nic.write_bar(1, 4, 4, v)
            else:
                rig.inject(frame(MAC if v & 1 else b"\xff" * 6, v % 3000))
            nic = rig.nic
            assert rig.line.level == bool(nic.icr & nic.ims)
            assert nic.icr & ~E.E1000_ICR_VALID == 0
    finally:
        rig.close()


# --- a VMM's NIC on a switch in another process --------------------------------------
def test_remote_switch_port_carries_frames_and_goes_with_its_connection() -> None:
    ev = EventManager()
    sw = Switch(ev)
    local = sw.port("local")
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    sw.serve_port(a, "vmm")  # what the backend does for each --port connection
    remote = receive_port(b, "vmm")  # what connect_port does in the VMM
    mem = GuestMemory([(0, RAM)])
    nic = E1000(mem, remote, MAC, None)  # the e1000 on it, driven directly
    try:
        bcast = frame(b"\xff" * 6)
        remote.writev([bytes(HDR), bcast])
        ev.run_once(0.5)
        assert local.read() == bytes(HDR) + bcast
        back = bytes(HDR) + MAC + bytes.fromhex("020000000009") + b"\x88\xb5" + b"x" * 50
        local.writev([back])  # to the learned MAC: only the remote port
        ev.run_once(0.5)
        assert remote.read() == back
        assert [p.name for p in sw.stats()] == ["local", "vmm"]
        remote.close()  # the VMM goes away: its connection ends, the port goes
        for _ in range(3):
            ev.run_once(0.2)
        assert [p.name for p in sw.stats()] == ["local"] and MAC not in sw.macs
    finally:
        nic.close()
        local.close()
        sw.close()
        ev.close()
        mem.close()


def test_receive_port_refuses_what_is_not_a_switch() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.send(b"hello")
    with pytest.raises(ConfigError, match="not a pyvmm switch port"):
        receive_port(b, "x")
    a.close()
