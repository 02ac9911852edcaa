"""The Intel 82540EM (e1000) as every hypervisor offers it: a PCI function (vendor 8086
device 100E, class 02 00 00) with its registers in BAR0 (128 KiB of MMIO) and again
through BAR1's I/O window (IOADDR selects a register, IODATA reads or writes it), one
INTx pin, and a net backend — a TAP or a switch port, the same ends virtio-net uses
(frames with a 12-byte virtio_net_hdr_v1 in front; this device always sends a zero one
and ignores what arrives in it).

What a driver sees (8254x SDM chapters 3, 5, 13):
- CTRL (RST resets the function, PHY_RST the PHY, SLU lets the MAC see the PHY's link),
  STATUS (LU = the host link and SLU; 1000 Mb/s full duplex), EEPROM by EERD or the
  EECD microwire pins, the PHY by MDIC (``eeprom.py``).
- ICR (read clears it; a write clears the bits written), ICS sets causes, IMS/IMC set
  and clear the mask; INTx is asserted while ICR & IMS is not zero. RDTR/RADV/TIDV/
  TADV/ITR are kept but every interrupt is immediate.
- Receive: RCTL (EN, UPE, MPE, BAM, MO, BSIZE/BSEX, LPE, SECRC), legacy descriptors
  from RDH to RDT-1 of the RDBA/RDLEN ring; a frame spans as many buffers as it needs
  (EOP on the last); the four FCS bytes are counted (and written) unless SECRC, as the
  wire delivers them; RXT0 per frame, RXDMT0 when the free descriptors fall to the
  RCTL.RDMTS fraction. Filtering: RAL/RAH entries with AV (exact, unicast or
  multicast), the 4096-bit MTA hash (RCTL.MO), promiscuous UPE/MPE, broadcast by BAM.
  When the ring has no free descriptors the frame is held and the backend not read
  until RDT moves: backpressure (RNBC counts it), no loss.
- Transmit: TCTL.EN, legacy and extended (DEXT) data descriptors from TDH to TDT-1;
  context descriptors set up checksum offload (IXSM/TXSM: the IP and TCP/UDP sums are
  computed and inserted), the legacy IC/CSO/CSS sum likewise; VLE inserts an 802.1Q
  tag when CTRL.VME is set. TCP segmentation (TSE, as Linux's e1000 uses it for TSO):
  HDRLEN/MSS from the context, one frame per MSS with lengths, IP id, sequence number,
  flags and both checksums made per segment. RS gets DD written back and TXDW; TXQE
  when the ring is empty.

Bad input from the guest (SDM-ish behaviour, logged once, counted, the VM goes on):
a ring of zero length or a head/tail beyond it stops that ring's processing until the
driver fixes it; a descriptor outside RAM stops the ring at it; a transmit buffer
outside RAM or a frame past 16 KiB drops that frame (its descriptors still complete);
a receive buffer outside RAM gets the RXE error in its descriptor; a segmentation
job is capped at 64 KiB of payload, one without a usable MSS/HDRLEN is dropped; a frame
that needs
more descriptors than the ring has is dropped. Every loop is bounded by the ring size.
"""

from __future__ import annotations

import struct
import threading
import zlib
from collections.abc import Callable, Sequence
from typing import Protocol

from pyvmm.devices.emulated.e1000.eeprom import Microwire, Phy, eeprom_image
from pyvmm.devices.pci.config_space import PCIConfigSpace
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.errors import GuestMemoryError
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import e1000 as E
from pyvmm.uapi import pci as P
from pyvmm.uapi import virtio as V

MAX_TX_FRAME = 16384  # without TSO the 82540 sends at most 16 KiB frames (jumbo)
MAX_TSO = 65535 + 256  # a TCP segmentation job: 64 KiB of payload and its headers
MAX_RX_FRAME = 16384 + E.ETH_FCS_LEN
STD_RX_FRAME = 1522  # without RCTL.LPE: 1518 bytes + an 802.1Q tag, FCS included
RX_BATCH = 64  # frames per readiness callback, then the event loop serves others
_VNET_HDR = bytes(V.VIRTIO_NET_HDR_SIZE)

# Registers with no side effects: kept as written (reset value 0 unless in _DEFAULTS).
_PLAIN = frozenset((
    E.E1000_CTRL_EXT, E.E1000_FLA, E.E1000_FCAL, E.E1000_FCAH, E.E1000_FCT, E.E1000_VET,
    E.E1000_ITR, E.E1000_FCTTV, E.E1000_TXCW, E.E1000_RXCW, E.E1000_TIPG, E.E1000_LEDCTL,
    E.E1000_PBA, E.E1000_FCRTL, E.E1000_FCRTH, E.E1000_RDTR, E.E1000_RXDCTL, E.E1000_RADV,
    E.E1000_RSRPD, E.E1000_TIDV, E.E1000_TXDCTL, E.E1000_TADV, E.E1000_TSPMT,
    E.E1000_RXCSUM, E.E1000_WUC, E.E1000_WUFC, E.E1000_WUS, E.E1000_MANC,
    E.E1000_RCTL, E.E1000_TCTL, E.E1000_RDBAL, E.E1000_RDBAH, E.E1000_RDLEN,
    E.E1000_TDBAL, E.E1000_TDBAH, E.E1000_TDLEN))
_DEFAULTS = {E.E1000_PBA: 0x00000030,  # 48 KiB receive, 16 KiB transmit packet buffer
             E.E1000_LEDCTL: 0x07068302, E.E1000_VET: E.ETH_P_8021Q,
             E.E1000_TIPG: 0x00602008, E.E1000_TXDCTL: 0x00000000}
_WMASK = {E.E1000_RDBAL: 0xFFFFFFF0, E.E1000_TDBAL: 0xFFFFFFF0,  # 16-byte aligned
          E.E1000_RDLEN: 0x000FFF80, E.E1000_TDLEN: 0x000FFF80,  # multiples of 128 bytes
          E.E1000_VET: 0xFFFF}


class NetBackend(Protocol):
    """A TAP or a switch port (what ``devices/virtio/net.py`` drives too)."""

    fd: int

    def read(self, n: int = ...) -> bytes | None: ...

    def writev(self, bufs: Sequence[memoryview | bytes]) -> int: ...


class Events(Protocol):
    """The part of ``EventManager`` the device uses: watch the backend's fd."""

    def add(self, fd: int, callback: Callable[[int, int], None]) -> None: ...

    def remove(self, fd: int) -> None: ...


def csum16(data: bytes | bytearray, start: int, end: int) -> int:
    """The Internet checksum (RFC 1071) of data[start:end], complemented."""
    chunk = bytes(data[start:end])
    if len(chunk) & 1:
        chunk += b"\0"
    s: int = sum(struct.unpack(f">{len(chunk) // 2}H", chunk))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class E1000(PCIDevice):
    name = "e1000"

    def __init__(self, mem: GuestMemory, backend: NetBackend, mac: bytes,
                 events: Events | None) -> None:
        super().__init__()
        self.mem, self.backend, self.mac, self.events = mem, backend, mac, events
        self.errors = OnceLog()
        self.lock = threading.RLock()  # vCPU thread (registers) and event loop (receive)
        c = self.config = PCIConfigSpace(E.PCI_VENDOR_ID_INTEL, E.E1000_DEV_ID_82540EM,
                                         E.E1000_PCI_CLASS, revision=0x03,
                                         subsystem_vendor_id=E.PCI_VENDOR_ID_INTEL,
                                         subsystem_id=0x001E)
        c.data[P.PCI_INTERRUPT_PIN] = 1
        c.add_bar(0, E.E1000_MMIO_SIZE)
        c.add_bar(1, E.E1000_IO_SIZE, is_io=True)
        self.eeprom = eeprom_image(mac, 0x001E, E.PCI_VENDOR_ID_INTEL)
        self.wire = Microwire(self.eeprom)
        self.phy = Phy()
        self.host_link = True
        self.watching = False
        self.pending: bytes | None = None
        self.stats: dict[int, int] = {}
        self.counts = {"tx_frames": 0, "rx_frames": 0, "tx_dropped": 0, "rx_dropped": 0,
                       "rx_filtered": 0, "rx_held": 0, "interrupts": 0}
        self.ioaddr = 0
        self._reset_regs()
        self._watch(True)

    # --- state ---------------------------------------------------------------------------
    def _reset_regs(self) -> None:
        self.regs = dict.fromkeys(_PLAIN, 0) | _DEFAULTS
        self.ctrl = E.E1000_CTRL_SLU | E.E1000_CTRL_SPD_1000 | E.E1000_CTRL_FD
        self.status = 0
        self.icr = self.ims = 0
        self.eecd_req = 0
        self.eerd = 0
        self.mdic = E.E1000_MDIC_READY
        self.rdh = self.rdt = self.tdh = self.tdt = 0
        self.mta = [0] * E.E1000_MTA_SIZE
        self.vfta = [0] * E.E1000_VFTA_SIZE
        self.ra = [0] * (2 * E.E1000_RAR_ENTRIES)
        # What the 8254x loads from the EEPROM after a reset: receive address 0 = the MAC.
        self.ra[0] = int.from_bytes(self.mac[:4], "little")
        self.ra[1] = int.from_bytes(self.mac[4:6], "little") | E.E1000_RAH_AV
        self.tx_pkt = bytearray()
        self.tx_bad = self.tx_tse = False
        self.tx_first = True
        self.tx_popts = 0
        self.tx_legacy_css = self.tx_legacy_cso = -1
        self.tx_ctx = (0, 0, 0, 0, 0, 0)  # ipcss, ipcso, ipcse, tucss, tucso, tucse
        self.tx_tso = (0, 0, 0)  # the context's command (TSE, IP, TCP), HDRLEN, MSS
        self.wire.reset()
        self.phy.reset()
        self._update_link(signal=False)
        self._update_irq()

    def reset(self) -> None:
        with self.lock:
            self._full_reset()

    def _full_reset(self) -> None:
        self.pending = None  # a frame held for the old rings is lost, as in the FIFO
        self._reset_regs()
        self.stats.clear()
        self._watch(True)

    def set_link(self, up: bool) -> None:
        """The host side's cable: LSC when it changes what the MAC sees."""
        with self.lock:
            self.host_link = self.phy.link = up
            self._update_link()

    def _update_link(self, signal: bool = True) -> None:
        lu = self.host_link and bool(self.ctrl & E.E1000_CTRL_SLU)
        was = bool(self.status & E.E1000_STATUS_LU)
        self.status = (E.E1000_STATUS_FD | E.E1000_STATUS_SPEED_1000
                       | E.E1000_STATUS_ASDV_1000 | E.E1000_STATUS_GIO_MASTER_ENABLE
                       | (E.E1000_STATUS_LU if lu else 0))
        if signal and lu != was:
            self._cause(E.E1000_ICR_LSC)

    def _cause(self, bits: int) -> None:
        self.icr |= bits & E.E1000_ICR_VALID
        self._update_irq()

    def _update_irq(self) -> None:
        level = bool(self.icr & self.ims)
        if level and not self._intx_level:
            self.counts["interrupts"] += 1
        self.set_intx(level)

    def _watch(self, on: bool) -> None:
        if self.events is None or on == self.watching:
            return
        if on:
            self.events.add(self.backend.fd, self._on_backend)
        else:
            self.events.remove(self.backend.fd)
        self.watching = on

    def close(self) -> None:
        with self.lock:
            self._watch(False)

    def metrics(self) -> dict[str, object]:
        return {**self.counts, "errors": dict(self.errors.counts)}

    # --- BAR accesses ----------------------------------------------------------------------
    def read_bar(self, index: int, offset: int, size: int) -> int:
        with self.lock:
            if index == 1:
                if offset == E.E1000_IOADDR and size == 4:
                    return self.ioaddr
                if offset == E.E1000_IODATA and size == 4:
                    return self._read_reg(self.ioaddr & (E.E1000_MMIO_SIZE - 4))
                return 0
            if index != 0:
                return (1 << (8 * size)) - 1
            if size == 8:
                return self._read_reg(offset) | self._read_reg(offset + 4) << 32
            value = self._read_reg(offset & ~3)
            if size != 4:
                self.errors.warn("subdword", f"e1000: {size}-byte read at {offset:#x}: the "
                                 "8254x decodes dword accesses (served from the dword)")
            return value >> (8 * (offset & 3)) & ((1 << (8 * size)) - 1)

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            if index == 1:
                if offset == E.E1000_IOADDR and size == 4:
                    self.ioaddr = value & 0x7FFFC  # a dword register of the 128 KiB space
                elif offset == E.E1000_IODATA and size == 4:
                    self._write_reg(self.ioaddr & (E.E1000_MMIO_SIZE - 4), value)
                return
            if index != 0:
                return
            if size == 8:
                self._write_reg(offset, value & 0xFFFFFFFF)
                self._write_reg(offset + 4, value >> 32)
                return
            if size != 4:
                self.errors.warn("subdword", f"e1000: {size}-byte write at {offset:#x}: the "
                                 "8254x decodes dword accesses (merged into the dword)")
                shift = 8 * (offset & 3)
                mask = ((1 << (8 * size)) - 1) << shift
                offset &= ~3
                value = (self._peek(offset) & ~mask) | (value << shift & mask)
            self._write_reg(offset, value & 0xFFFFFFFF)

    def _peek(self, off: int) -> int:
        """A register's value without read side effects (for merging narrow writes)."""
        if off in (E.E1000_ICR, E.E1000_ICS, E.E1000_IMC) or \
                E.E1000_STATS_BASE <= off < E.E1000_STATS_END:
            return 0
        return self._read_reg(off)

    def _read_reg(self, off: int) -> int:
        if off in self.regs:
            return self.regs[off]
        if off == E.E1000_CTRL:
            return self.ctrl
        if off == E.E1000_STATUS:
            return self.status
        if off == E.E1000_EECD:
            return (E.E1000_EECD_PRES | self.eecd_req | self.wire.pins | self.wire.do()
                    | (E.E1000_EECD_GNT if self.eecd_req else 0))
        if off == E.E1000_EERD:
            return self.eerd
        if off == E.E1000_MDIC:
            return self.mdic
        if off == E.E1000_ICR:  # read to clear (SDM 13.4.17)
            v, self.icr = self.icr, 0
            self._update_irq()
            return v
        if off == E.E1000_ICS:
            return self.icr
        if off == E.E1000_IMS:
            return self.ims
        if off == E.E1000_IMC:
            return 0  # write-only
        if off == E.E1000_RDH:
            return self.rdh
        if off == E.E1000_RDT:
            return self.rdt
        if off == E.E1000_TDH:
            return self.tdh
        if off == E.E1000_TDT:
            return self.tdt
        if E.E1000_STATS_BASE <= off < E.E1000_STATS_END:
            return self.stats.pop(off, 0)  # clear on read
        if E.E1000_MTA <= off < E.E1000_MTA + 4 * E.E1000_MTA_SIZE:
            return self.mta[(off - E.E1000_MTA) // 4]
        if E.E1000_RA <= off < E.E1000_RA + 8 * E.E1000_RAR_ENTRIES:
            return self.ra[(off - E.E1000_RA) // 4]
        if E.E1000_VFTA <= off < E.E1000_VFTA + 4 * E.E1000_VFTA_SIZE:
            return self.vfta[(off - E.E1000_VFTA) // 4]
        self.errors.warn("reg", f"e1000: read of unmodelled register {off:#x} (reads 0)")
        return 0

    def _write_reg(self, off: int, v: int) -> None:
        if off in self.regs:
            old = self.regs[off]
            self.regs[off] = v & _WMASK.get(off, 0xFFFFFFFF)
            if off == E.E1000_TCTL and v & E.E1000_TCTL_EN and not old & E.E1000_TCTL_EN:
                self._transmit()  # descriptors queued while the transmitter was off go now
            return
        if off == E.E1000_CTRL:
            if v & E.E1000_CTRL_RST:  # self-clearing; the whole function resets
                self._full_reset()
                return
            if v & E.E1000_CTRL_PHY_RST:
                self.phy.reset()
            self.ctrl = v & ~(E.E1000_CTRL_RST | E.E1000_CTRL_PHY_RST)
            self._update_link()
        elif off == E.E1000_EECD:
            self.eecd_req = v & E.E1000_EECD_REQ
            self.wire.write(v)
        elif off == E.E1000_EERD:
            if v & E.E1000_EERD_START:
                addr = v >> E.E1000_EERD_ADDR_SHIFT & 0xFF
                if addr < E.EEPROM_WORDS:
                    data = self.eeprom[addr]
                else:
                    self.errors.warn("eerd", f"e1000: EERD read of word {addr:#x} past the "
                                     f"{E.EEPROM_WORDS}-word EEPROM (reads 0)")
                    data = 0
                self.eerd = (data << E.E1000_EERD_DATA_SHIFT
                             | addr << E.E1000_EERD_ADDR_SHIFT | E.E1000_EERD_DONE)
            else:
                self.eerd = v & 0xFF00
        elif off == E.E1000_MDIC:
            self._mdic(v)
        elif off == E.E1000_ICR:  # writing 1s clears those causes
            self.icr &= ~v
            self._update_irq()
        elif off == E.E1000_ICS:
            self._cause(v)
        elif off == E.E1000_IMS:
            self.ims |= v & E.E1000_ICR_VALID
            self._update_irq()
        elif off == E.E1000_IMC:
            self.ims &= ~v
            self._update_irq()
        elif off == E.E1000_RDH:
            self.rdh = v & 0xFFFF
        elif off == E.E1000_RDT:
            self.rdt = v & 0xFFFF
            if self.pending is not None:
                self._receive()  # new buffers: deliver what is held, resume reading
        elif off == E.E1000_TDH:
            self.tdh = v & 0xFFFF
        elif off == E.E1000_TDT:
            self.tdt = v & 0xFFFF
            self._transmit()
        elif E.E1000_MTA <= off < E.E1000_MTA + 4 * E.E1000_MTA_SIZE:
            self.mta[(off - E.E1000_MTA) // 4] = v
        elif E.E1000_RA <= off < E.E1000_RA + 8 * E.E1000_RAR_ENTRIES:
            i = (off - E.E1000_RA) // 4
            self.ra[i] = v if i % 2 == 0 else v & (E.E1000_RAH_AV | 0x3FFFF)
        elif E.E1000_VFTA <= off < E.E1000_VFTA + 4 * E.E1000_VFTA_SIZE:
            self.vfta[(off - E.E1000_VFTA) // 4] = v
        elif off == E.E1000_STATUS or E.E1000_STATS_BASE <= off < E.E1000_STATS_END:
            pass  # read-only
        else:
            self.errors.warn("reg", f"e1000: write of unmodelled register {off:#x} "
                             "(ignored)")

    def _mdic(self, v: int) -> None:
        phy = (v & E.E1000_MDIC_PHY_MASK) >> E.E1000_MDIC_PHY_SHIFT
        reg = (v & E.E1000_MDIC_REG_MASK) >> E.E1000_MDIC_REG_SHIFT
        op = v & (E.E1000_MDIC_OP_READ | E.E1000_MDIC_OP_WRITE)
        data = v & E.E1000_MDIC_DATA_MASK
        keep = v & ~(E.E1000_MDIC_READY | E.E1000_MDIC_ERROR | E.E1000_MDIC_DATA_MASK)
        if phy != E.E1000_PHY_ADDRESS or op not in (E.E1000_MDIC_OP_READ,
                                                     E.E1000_MDIC_OP_WRITE):
            # no PHY answers at that address (or no operation): the MDIO read fails
            self.mdic = keep | E.E1000_MDIC_READY | E.E1000_MDIC_ERROR
        elif op == E.E1000_MDIC_OP_READ:
            self.mdic = keep | E.E1000_MDIC_READY | self.phy.read(reg)
        else:
            lost = reg == E.PHY_CTRL and data & (E.MII_CR_RESET | E.MII_CR_RESTART_AUTO_NEG)
            self.phy.write(reg, data)
            self.mdic = keep | E.E1000_MDIC_READY | data
            if lost and self.status & E.E1000_STATUS_LU:
                # the link goes down while the PHY renegotiates and is back at once:
                # one link status change, as a driver restarting autonegotiation expects
                self._cause(E.E1000_ICR_LSC)
        if v & E.E1000_MDIC_INT_EN:
            self._cause(E.E1000_ICR_MDAC)

    def _count(self, reg: int, n: int = 1) -> None:
        self.stats[reg] = min(self.stats.get(reg, 0) + n, 0xFFFFFFFF)

    def _count64(self, low: int, n: int) -> None:
        total = self.stats.get(low, 0) | self.stats.get(low + 4, 0) << 32
        total = min(total + n, (1 << 64) - 1)
        self.stats[low], self.stats[low + 4] = total & 0xFFFFFFFF, total >> 32

    # --- transmit --------------------------------------------------------------------------
    def _ring(self, kind: str, bal: int, bah: int, dlen: int, head: int,
              tail: int) -> tuple[int, int] | None:
        """(base, descriptors) of a ring a driver set up consistently, or None."""
        n = self.regs[dlen] // E.E1000_DESC_SIZE
        if n == 0:
            self.errors.warn(f"{kind}:len0", f"e1000: {kind} ring has length 0 "
                             "(nothing processed)")
            return None
        if head >= n or tail >= n:
            self.errors.warn(f"{kind}:bounds", f"e1000: {kind} head {head} or tail {tail} "
                             f"beyond the {n}-descriptor ring (ring stopped)")
            return None
        return self.regs[bal] | self.regs[bah] << 32, n

    def _transmit(self) -> None:
        if not self.regs[E.E1000_TCTL] & E.E1000_TCTL_EN or self.tdh == self.tdt:
            return
        ring = self._ring("tx", E.E1000_TDBAL, E.E1000_TDBAH, E.E1000_TDLEN, self.tdh,
                          self.tdt)
        if ring is None:
            return
        base, n = ring
        cause = 0
        for _ in range(n):
            if self.tdh == self.tdt:
                break
            addr = base + self.tdh * E.E1000_DESC_SIZE
            try:
                desc = self.mem.read(addr, E.E1000_DESC_SIZE)
            except GuestMemoryError:
                self.errors.warn("tx:desc", f"e1000: transmit descriptor at {addr:#x} is "
                                 "outside guest RAM (ring stopped at it)")
                break
            buf, lower, upper = struct.unpack("<QII", desc)
            self._tx_desc(buf, lower, upper, desc)
            if lower & (E.E1000_TXD_CMD_RS | E.E1000_TXD_CMD_RPS):
                self.mem.write(addr + 12, struct.pack("<I", upper | E.E1000_TXD_STAT_DD))
                cause |= E.E1000_ICR_TXDW
            self.tdh = (self.tdh + 1) % n
        if self.tdh == self.tdt:
            cause |= E.E1000_ICR_TXQE
        if cause:
            self._cause(cause)

    def _tx_desc(self, buf: int, lower: int, upper: int, raw: bytes) -> None:
        if lower & E.E1000_TXD_CMD_DEXT:
            dtyp = lower & E.E1000_TXD_DTYP_MASK
            if dtyp == E.E1000_TXD_DTYP_C:  # context: the offload set-up, no data
                ipcss, ipcso, ipcse, tucss, tucso, tucse = struct.unpack_from("<BBHBBH", raw)
                self.tx_ctx = (ipcss, ipcso, ipcse, tucss, tucso, tucse)
                _, hdr_len, mss = struct.unpack_from("<BBH", raw, 12)
                self.tx_tso = (lower, hdr_len, mss)
                return
            if dtyp != E.E1000_TXD_DTYP_D:
                self.errors.warn("tx:dtyp", f"e1000: transmit descriptor type "
                                 f"{dtyp >> 20:#x} is reserved (skipped)")
                return
            length = lower & 0xFFFFF
            if self.tx_first:
                self.tx_popts = upper >> 8 & 0xFF
                self.tx_legacy_css = -1
            if lower & E.E1000_TXD_CMD_TSE:
                self.tx_tse = True
        else:
            length = lower & 0xFFFF
            if self.tx_first:
                self.tx_popts = 0
                self.tx_legacy_css = upper >> 8 & 0xFF if lower & E.E1000_TXD_CMD_IC else -1
                self.tx_legacy_cso = lower >> 16 & 0xFF
        self.tx_first = False
        if len(self.tx_pkt) + length > (MAX_TSO if self.tx_tse else MAX_TX_FRAME):
            if not self.tx_bad:
                self.errors.warn("tx:big", f"e1000: transmit frame longer than "
                                 f"{MAX_TX_FRAME} bytes (dropped)")
            self.tx_bad = True
        elif length and not self.tx_bad:
            try:
                self.tx_pkt += self.mem.read(buf, length)
            except GuestMemoryError:
                self.errors.warn("tx:buf", f"e1000: transmit buffer {buf:#x}+{length:#x} is "
                                 "outside guest RAM (frame dropped)")
                self.tx_bad = True
        if lower & E.E1000_TXD_CMD_EOP:
            self._tx_frame(lower, upper)

    def _tx_frame(self, lower: int, upper: int) -> None:
        pkt, bad, tse = self.tx_pkt, self.tx_bad, self.tx_tse
        self.tx_pkt, self.tx_bad, self.tx_tse, self.tx_first = bytearray(), False, False, True
        if not bad and len(pkt) < 14:
            self.errors.warn("tx:runt", f"e1000: {len(pkt)}-byte transmit frame is shorter "
                             "than an Ethernet header (dropped)")
            bad = True
        if bad:
            self.counts["tx_dropped"] += 1
            return
        if tse:
            for seg in self._segments(pkt):
                self._offload(seg)
                self._send(seg, lower, upper)
            return
        self._offload(pkt)
        self._send(pkt, lower, upper)

    def _segments(self, pkt: bytearray) -> list[bytearray]:
        """TCP segmentation (SDM 3.5): HDRLEN bytes of headers in front of every MSS
        bytes of payload, with the IPv4 total length and identification (or the IPv6
        payload length), the TCP sequence number and flags (FIN and PSH on the last
        segment only, CWR on the first only) or the UDP length made per segment, and
        the segment's L4 length added to the pseudo-header sum the driver left in the
        checksum field (it leaves the sum without a length)."""
        cmd, hdr_len, mss = self.tx_tso
        ipcss, _, _, tucss, tucso, _ = self.tx_ctx
        tcp = bool(cmd & E.E1000_TXD_CMD_TCP)
        if (mss == 0 or hdr_len > len(pkt) or tucss + (20 if tcp else 8) > hdr_len
                or ipcss + 20 > hdr_len or tucso + 2 > hdr_len):
            self.errors.warn("tx:tso", f"e1000: TCP segmentation with HDRLEN {hdr_len}, "
                             f"MSS {mss}, TUCSS {tucss} does not fit a {len(pkt)}-byte "
                             "frame (dropped)")
            self.counts["tx_dropped"] += 1
            return []
        hdr, payload = pkt[:hdr_len], pkt[hdr_len:]
        ip_id = int.from_bytes(hdr[ipcss + 4:ipcss + 6], "big")
        seq = int.from_bytes(hdr[tucss + 4:tucss + 8], "big")
        flags = hdr[tucss + 13] if tcp else 0
        out = []
        offsets = range(0, max(len(payload), 1), mss)
        for k, off in enumerate(offsets):
            seg = bytearray(hdr) + payload[off:off + mss]
            if cmd & E.E1000_TXD_CMD_IP:  # IPv4
                seg[ipcss + 2:ipcss + 4] = (len(seg) - ipcss).to_bytes(2, "big")
                seg[ipcss + 4:ipcss + 6] = ((ip_id + k) & 0xFFFF).to_bytes(2, "big")
            else:  # IPv6: the payload length behind the 40-byte header
                seg[ipcss + 4:ipcss + 6] = (len(seg) - ipcss - 40 & 0xFFFF).to_bytes(2, "big")
            l4 = len(seg) - tucss
            if tcp:
                seg[tucss + 4:tucss + 8] = ((seq + off) & 0xFFFFFFFF).to_bytes(4, "big")
                f = flags
                if k != len(offsets) - 1:
                    f &= ~0x09  # FIN, PSH
                if k:
                    f &= ~0x80  # CWR
                seg[tucss + 13] = f
            else:
                seg[tucss + 4:tucss + 6] = l4.to_bytes(2, "big")
            if self.tx_popts & E.E1000_TXD_POPTS_TXSM:
                ph = int.from_bytes(seg[tucso:tucso + 2], "big") + l4
                seg[tucso:tucso + 2] = ((ph & 0xFFFF) + (ph >> 16)).to_bytes(2, "big")
            out.append(seg)
        return out

    def _send(self, pkt: bytearray, lower: int, upper: int) -> None:
        if lower & E.E1000_TXD_CMD_VLE and self.ctrl & E.E1000_CTRL_VME:
            pkt[12:12] = struct.pack(">HH", self.regs[E.E1000_VET], upper >> 16)
        if self.regs[E.E1000_TCTL] & E.E1000_TCTL_PSP and len(pkt) < E.ETH_ZLEN:
            pkt += bytes(E.ETH_ZLEN - len(pkt))
        try:
            self.backend.writev([_VNET_HDR, bytes(pkt)])
        except OSError as e:
            self.counts["tx_dropped"] += 1
            self.errors.warn(f"tx:{e.errno}", f"e1000: host refused a {len(pkt)}-byte frame: "
                             f"{e.strerror} (dropped)")
            return
        self.counts["tx_frames"] += 1
        self._count(E.E1000_GPTC)
        self._count(E.E1000_TPT)
        self._count64(E.E1000_GOTCL, len(pkt) + E.ETH_FCS_LEN)
        self._count64(E.E1000_TOTL, len(pkt) + E.ETH_FCS_LEN)
        if pkt[0] & 1:
            self._count(E.E1000_BPTC if pkt[:6] == b"\xff" * 6 else E.E1000_MPTC)

    def _offload(self, pkt: bytearray) -> None:
        """Insert the checksums the descriptors asked for (SDM 3.3.5-3.3.7)."""
        if self.tx_legacy_css >= 0:
            self._insert(pkt, self.tx_legacy_css, self.tx_legacy_cso, 0)
        ipcss, ipcso, ipcse, tucss, tucso, tucse = self.tx_ctx
        if self.tx_popts & E.E1000_TXD_POPTS_IXSM:
            self._insert(pkt, ipcss, ipcso, ipcse)
        if self.tx_popts & E.E1000_TXD_POPTS_TXSM:
            self._insert(pkt, tucss, tucso, tucse)

    def _insert(self, pkt: bytearray, css: int, cso: int, cse: int) -> None:
        end = len(pkt) if cse == 0 else min(cse + 1, len(pkt))
        if css >= end or cso + 2 > len(pkt):
            self.errors.warn("tx:csum", f"e1000: checksum offsets start={css} end={cse} "
                             f"offset={cso} outside a {len(pkt)}-byte frame (not inserted)")
            return
        pkt[cso:cso + 2] = csum16(pkt, css, end).to_bytes(2, "big")

    # --- receive ---------------------------------------------------------------------------
    def _on_backend(self, fd: int, events: int) -> None:
        with self.lock:
            self._receive()

    def _receive(self) -> None:
        for _ in range(RX_BATCH):
            if self.pending is None:
                try:
                    frame = self.backend.read()
                except OSError as e:  # a host-side read error loses no guest state
                    self.errors.warn(f"rx:{e.errno}", f"e1000: reading the host end failed: "
                                     f"{e.strerror}")
                    frame = None
                if frame is None:
                    self._watch(True)
                    return
                self.pending = frame[V.VIRTIO_NET_HDR_SIZE:]
            if not self._deliver(self.pending):
                self._watch(False)  # no descriptors: hold it, wait for RDT to move
                return
            self.pending = None
        self._watch(True)

    def accepts(self, dst: bytes) -> bool:
        """The receive filter (SDM 3.2.1): exact addresses, then promiscuous modes, then
        broadcast, then the multicast hash."""
        rctl = self.regs[E.E1000_RCTL]
        for i in range(E.E1000_RAR_ENTRIES):
            rah = self.ra[2 * i + 1]
            if rah & E.E1000_RAH_AV and dst == (self.ra[2 * i].to_bytes(4, "little")
                                                + (rah & 0xFFFF).to_bytes(2, "little")):
                return True
        if not dst[0] & 1:
            return bool(rctl & E.E1000_RCTL_UPE)
        if rctl & E.E1000_RCTL_MPE:
            return True
        if dst == b"\xff" * 6 and rctl & E.E1000_RCTL_BAM:
            return True
        mo = (rctl & E.E1000_RCTL_MO_MASK) >> E.E1000_RCTL_MO_SHIFT
        word = dst[4] | dst[5] << 8
        h = (word >> (4 - mo) if mo < 3 else word) & 0xFFF
        return bool(self.mta[h >> 5] >> (h & 31) & 1)

    def _buffer_size(self) -> int:
        rctl = self.regs[E.E1000_RCTL]
        sz = (rctl & E.E1000_RCTL_SZ_MASK) >> E.E1000_RCTL_SZ_SHIFT
        if rctl & E.E1000_RCTL_BSEX and sz:
            return 32768 >> sz  # 16384, 8192, 4096
        return 2048 >> sz

    def _deliver(self, frame: bytes) -> bool:
        """Place one frame; False when the ring has too few free descriptors (held)."""
        rctl = self.regs[E.E1000_RCTL]
        if not rctl & E.E1000_RCTL_EN or not self.status & E.E1000_STATUS_LU:
            self.counts["rx_dropped"] += 1  # receiver off or no link: the wire's frame is gone
            return True
        if len(frame) < 14:
            self.counts["rx_dropped"] += 1
            return True
        if not self.accepts(frame[:6]):
            self.counts["rx_filtered"] += 1
            return True
        special, vp = 0, 0
        if self.ctrl & E.E1000_CTRL_VME and \
                int.from_bytes(frame[12:14], "big") == self.regs[E.E1000_VET] and len(frame) >= 18:
            special = int.from_bytes(frame[14:16], "big")  # strip the tag into the descriptor
            frame = frame[:12] + frame[16:]
            vp = E.E1000_RXD_STAT_VP
        if len(frame) < E.ETH_ZLEN:
            frame += bytes(E.ETH_ZLEN - len(frame))  # the wire pads short frames
        if not rctl & E.E1000_RCTL_SECRC:
            frame += zlib.crc32(frame).to_bytes(4, "little")
        limit = MAX_RX_FRAME if rctl & E.E1000_RCTL_LPE else STD_RX_FRAME
        if len(frame) > limit:
            self.counts["rx_dropped"] += 1
            return True
        ring = self._ring("rx", E.E1000_RDBAL, E.E1000_RDBAH, E.E1000_RDLEN, self.rdh,
                          self.rdt)
        if ring is None:
            self._count(E.E1000_MPC)
            self.counts["rx_dropped"] += 1
            return True
        base, n = ring
        bsize = self._buffer_size()
        need = -(-len(frame) // bsize)
        free = (self.rdt - self.rdh) % n
        if need > n - 1:
            self.errors.warn("rx:ring", f"e1000: a {len(frame)}-byte frame needs {need} "
                             f"buffers of {bsize}; the ring has {n} (dropped)")
            self._count(E.E1000_MPC)
            self.counts["rx_dropped"] += 1
            return True
        if free < need:
            self._count(E.E1000_RNBC)
            self.counts["rx_held"] += 1
            return False
        for k in range(need):
            addr = base + self.rdh * E.E1000_DESC_SIZE
            chunk = frame[k * bsize:(k + 1) * bsize]
            try:
                buf = struct.unpack_from("<Q", self.mem.read(addr, E.E1000_DESC_SIZE))[0]
            except GuestMemoryError:
                self.errors.warn("rx:desc", f"e1000: receive descriptor at {addr:#x} is "
                                 "outside guest RAM (frame dropped, ring stopped at it)")
                self.counts["rx_dropped"] += 1
                return True
            err = 0
            try:
                self.mem.write(buf, chunk)
            except GuestMemoryError:
                self.errors.warn("rx:buf", f"e1000: receive buffer {buf:#x} is outside guest "
                                 "RAM (descriptor completed with RXE)")
                err = E.E1000_RXD_ERR_RXE
            status = (E.E1000_RXD_STAT_DD | E.E1000_RXD_STAT_IXSM | vp
                      | (E.E1000_RXD_STAT_EOP if k == need - 1 else 0))
            self.mem.write(addr + 8, struct.pack("<HHBBH", len(chunk), 0, status, err,
                                                 special))
            self.rdh = (self.rdh + 1) % n
        self.counts["rx_frames"] += 1
        self._count(E.E1000_GPRC)
        self._count(E.E1000_TPR)
        self._count64(E.E1000_GORCL, len(frame))
        self._count64(E.E1000_TORL, len(frame))
        if frame[0] & 1:
            self._count(E.E1000_BPRC if frame[:6] == b"\xff" * 6 else E.E1000_MPRC)
        cause = E.E1000_ICR_RXT0
        rdmts = (rctl & E.E1000_RCTL_RDMTS_MASK) >> E.E1000_RCTL_RDMTS_SHIFT
        if (self.rdt - self.rdh) % n <= n >> (rdmts + 1):
            cause |= E.E1000_ICR_RXDMT0
        self._cause(cause)
        return True
