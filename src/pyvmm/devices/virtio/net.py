"""virtio-net (virtio 1.2 §5.1) on a TAP with a virtio_net_hdr_v1 in front of frames.

Queues: 0 receive, 1 transmit. Transmit gathers the chain's readable descriptors and
writes them to the TAP with one writev (header included: the TAP understands it).
Receive reads a frame when the TAP is readable and places it in the driver's buffers;
with VIRTIO_NET_F_MRG_RXBUF a frame may span several buffers and ``num_buffers`` says
how many, without it a frame must fit one chain (else it is dropped and counted).
When the driver has posted no buffers, the pending frame is held and the TAP is not
read again until the driver kicks the receive queue: backpressure, no loss.
Offload features the driver accepts (GUEST_CSUM, GUEST_TSO4/6, GUEST_ECN, GUEST_UFO)
are passed to the TAP with TUNSETOFFLOAD; a backend without offloads (a switch port)
gets none of the checksum/TSO features offered.

Threat model: transmit frames are capped at 65562 bytes (larger chains are dropped and
counted); receive placement writes only to device-writable descriptors inside guest
RAM; a driver that never posts buffers only stops its own receive path.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from pyvmm.devices.spec import DeviceSpec, HostContext, Kind, VirtioConfig
from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from pyvmm.event import EventManager
from pyvmm.memory import GuestMemory
from pyvmm.schema import option
from pyvmm.uapi import tun as T
from pyvmm.uapi import virtio as V

RXQ, TXQ = 0, 1
MAX_FRAME = 65562
_OFFLOADS = ((V.VIRTIO_NET_F_GUEST_CSUM, T.TUN_F_CSUM), (V.VIRTIO_NET_F_GUEST_TSO4, T.TUN_F_TSO4),
             (V.VIRTIO_NET_F_GUEST_TSO6, T.TUN_F_TSO6), (V.VIRTIO_NET_F_GUEST_ECN, T.TUN_F_TSO_ECN),
             (V.VIRTIO_NET_F_GUEST_UFO, T.TUN_F_UFO))


class NetBackend(Protocol):
    """A TAP (``backends/tap.py``) or a switch port (``sharing/switch.py``): frames with
    the 12-byte vnet header in front, readiness on ``fd``."""

    fd: int

    def set_offload(self, flags: int) -> None: ...

    def read(self, n: int = ...) -> bytes | None: ...

    def writev(self, bufs: Sequence[memoryview | bytes]) -> int: ...


class VirtioNet(VirtioDevice):
    device_type = V.VIRTIO_ID_NET
    queue_max_sizes = (256, 256)

    def __init__(self, tap: NetBackend, mac: bytes, events: EventManager) -> None:
        super().__init__()
        self.tap, self.mac, self.events = tap, mac, events
        offloads = (V.VIRTIO_NET_F_CSUM, V.VIRTIO_NET_F_GUEST_CSUM, V.VIRTIO_NET_F_GUEST_TSO4,
                    V.VIRTIO_NET_F_GUEST_TSO6, V.VIRTIO_NET_F_GUEST_ECN,
                    V.VIRTIO_NET_F_GUEST_UFO, V.VIRTIO_NET_F_HOST_TSO4,
                    V.VIRTIO_NET_F_HOST_TSO6, V.VIRTIO_NET_F_HOST_ECN, V.VIRTIO_NET_F_HOST_UFO)
        self.features = sum(1 << b for b in (
            V.VIRTIO_F_VERSION_1, V.VIRTIO_RING_F_EVENT_IDX, V.VIRTIO_RING_F_INDIRECT_DESC,
            V.VIRTIO_NET_F_MAC, V.VIRTIO_NET_F_STATUS, V.VIRTIO_NET_F_MRG_RXBUF,
            *(offloads if getattr(tap, "offloads", True) else ())))
        self.pending: bytes | None = None
        self.watching = False
        self.tx_frames = self.rx_frames = self.rx_dropped = self.tx_dropped = 0

    def config_bytes(self) -> bytes:
        return self.mac + struct.pack("<HHH", V.VIRTIO_NET_S_LINK_UP, 1, 1500)

    def activate(self, mem: GuestMemory, queues: list[Virtqueue | None], irq: object) -> None:
        super().activate(mem, queues, irq)  # type: ignore[arg-type]
        self.tap.set_offload(sum(flag for bit, flag in _OFFLOADS if self.has(bit)))
        self._watch(True)

    def reset(self) -> None:
        self._watch(False)
        self.pending = None
        super().reset()

    def _watch(self, on: bool) -> None:
        if on and not self.watching:
            self.events.add(self.tap.fd, self._on_tap)
        elif not on and self.watching:
            self.events.remove(self.tap.fd)
        self.watching = on

    # --- transmit ------------------------------------------------------------------------
    def process_queue(self, index: int) -> None:
        if index == TXQ:
            self._transmit()
        elif index == RXQ:
            self._receive()  # new buffers: deliver what is held, resume reading

    def _transmit(self) -> None:
        vq, mem = self.queue(TXQ), self.mem
        assert mem is not None
        while (chain := vq.pop()) is not None:
            descs = [d for d in chain if not d.write]
            total = sum(d.len for d in descs)
            if total <= V.VIRTIO_NET_HDR_SIZE or total > MAX_FRAME:
                self.tx_dropped += 1
            else:
                bufs = [mem.view(d.addr, d.len) for d in descs if d.len]
                try:
                    self.tap.writev(bufs)
                except OSError as e:
                    # The host end refused the frame (a TAP: EINVAL for a bad vnet/GSO
                    # header or a runt, EIO while the link is down). A NIC drops what its
                    # wire will not take; the guest's queue goes on.
                    self.tx_dropped += 1
                    self.faults.warn(f"tx:{e.errno}", f"virtio-net: host refused a "
                                     f"{total}-byte frame: {e.strerror}; dropped")
                else:
                    self.tx_frames += 1
                    self.bytes += total
            self.requests += 1
            self.complete(vq, chain, 0)

    # --- receive -------------------------------------------------------------------------
    def _on_tap(self, fd: int, events: int) -> None:
        # Event loop, like notifications; the core's lock keeps a concurrent reset from
        # the vCPU thread out. A malformed receive buffer (a broken chain, an address
        # outside RAM) makes the device need a reset, as in a kick; so does anything else
        # that goes wrong here, through the same ``fail``.
        with self.core_lock:
            if not self.queues:
                return
            try:
                self._receive()
            except Exception as e:
                self._watch(False)  # a failed device reads no more frames until reset
                self.fail(RXQ, e)

    def _receive(self) -> None:
        if not self.queues or self.queues[RXQ] is None:
            return
        vq = self.queue(RXQ)
        while True:
            if self.pending is None:
                try:
                    self.pending = self.tap.read()
                except OSError as e:  # a host-side read error loses no guest state
                    self.faults.warn(f"rx:{e.errno}", f"virtio-net: reading the host end "
                                     f"failed: {e.strerror}")
                    self.pending = None
                if self.pending is None:
                    self._watch(True)
                    return
            if not self._place(vq, self.pending):
                self._watch(False)  # no buffers: hold the frame, wait for a kick
                return
            self.pending = None

    def _place(self, vq: Virtqueue, frame: bytes) -> bool:
        """Put one frame (vnet header first) into the driver's buffers."""
        mem = self.mem
        assert mem is not None
        mrg = self.has(V.VIRTIO_NET_F_MRG_RXBUF)
        chains: list[tuple[DescriptorChain, int]] = []
        placed, first_hdr = 0, None
        saved_avail = vq.last_avail
        while placed < len(frame):
            chain = vq.pop()
            if chain is None:
                vq.last_avail = saved_avail  # give the chains back: none were used
                return False
            written = 0
            for d in chain:
                if not d.write or placed >= len(frame):
                    continue
                n = min(d.len, len(frame) - placed)
                mem.write(d.addr, frame[placed:placed + n])
                if first_hdr is None:
                    if d.len < V.VIRTIO_NET_HDR_SIZE:
                        raise VirtqueueError("receive buffer shorter than the net header")
                    first_hdr = d.addr
                placed += n
                written += n
            chains.append((chain, written))
            if not mrg:
                break
        if placed < len(frame) or first_hdr is None:
            self.rx_dropped += 1  # without MRG_RXBUF a frame must fit one chain
        else:
            mem.write(first_hdr + 10, struct.pack("<H", len(chains)))  # num_buffers
        for chain, written in chains:
            vq.add_used(chain, written if placed >= len(frame) else 0)
        self.rx_frames += placed >= len(frame)
        self.bytes += len(frame)
        if vq.needs_interrupt() and self.irq is not None:
            self.irq.signal_queue(vq)
        return True


# --- registry entry ---------------------------------------------------------------------
def check_mac(mac: str) -> None:
    """A guest's unicast MAC as ``52:54:00:12:34:56`` (ValueError says what is wrong);
    shared by every NIC's config."""
    if not re.fullmatch(r"([0-9a-fA-F]{2}:){5}[0-9a-fA-F]{2}", mac):
        raise ValueError("mac must look like 52:54:00:12:34:56")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"mac {mac} is a multicast address")


@dataclass(kw_only=True)
class NetConfig(VirtioConfig):
    tap: str = option("auto", "the TAP to attach (auto: a new one the kernel names)")
    mac: str | None = option(None, "the guest's MAC (default 52:54:00:12:34:56 + index)")

    def check(self) -> None:
        if self.mac is not None:
            check_mac(self.mac)

    def mac_bytes(self, index: int) -> bytes:
        if self.mac is not None:
            return bytes.fromhex(self.mac.replace(":", ""))
        return bytes((0x52, 0x54, 0x00, 0x12, 0x34, (0x56 + index) & 0xFF))


def create(cfg: NetConfig, ctx: HostContext) -> VirtioNet:
    from pyvmm.backends.tap import Tap

    tap = Tap("" if cfg.tap == "auto" else cfg.tap)
    ctx.on_close(tap.close)
    return VirtioNet(tap, cfg.mac_bytes(ctx.index), ctx.events)


SPEC = DeviceSpec("virtio-net", NetConfig, Kind.VIRTIO, create, "virtio-net on a TAP",
                  option="net", select=("model", "virtio"), positional="tap", doc="virtio")
