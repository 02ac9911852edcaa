"""Export a ``PCIDevice`` over vfio-user: the device lives in this process, the VMM
(QEMU's ``vfio-user-pci``) keeps the guest.

- Config space (region 7) and every BAR (regions 0-5) are trapped: REGION_READ/WRITE
  call the device's ``config_read/config_write`` and ``read_bar/write_bar`` by BAR index
  — except a BAR backed by shared memory (``PCIDevice.bar_memory``): its region is
  offered with VFIO_REGION_INFO_FLAG_MMAP and the memfd, the client maps it into the
  guest, and the guest's accesses never become messages.
  BAR placement is the client's business (it emulates the BAR registers), so BAR moves
  the device reports are ignored here.
- DMA_MAP with an fd maps that part of guest RAM into the device's ``GuestMemory`` at
  its IOVA (= guest-physical address); maps without an fd (ROM, BIOS) are recorded but
  not accessible, and DMA there fails as any out-of-RAM address does. DMA_UNMAP removes.
- DEVICE_SET_IRQS hands eventfds for INTx, MSI or MSI-X; the device's interrupts are
  routed to them while that index is enabled (MSI/MSI-X capability and table
  emulation stay with the client). INTx signals on a rising level and again on the
  client's UNMASK while the level is still high (its EOI dropped its pin).
- DEVICE_RESET resets the device.

Malformed requests (short payloads, unknown regions or IRQ indices, out-of-range
accesses, wrong fd counts, overlapping maps, an fd that is not an eventfd where one
belongs, memory not sealed against shrinking) get an error reply with an errno; the
session goes on. An unparsable stream (bad header, oversize), a message left
incomplete, replies left unread, or anything else a handler raises closes that
session only. Messages arrive through a ``MessageChannel`` (``peer/channel.py``),
whose fd rule holds here: a command takes the fds it keeps out of its list; whatever
is left — every fd of a command that takes none, or of one that failed — the channel
closes.

- DMA_UNMAP first tells the device (``PCIDevice.dma_unmapped``): a virtio device waits
  for its pool I/O and stops a queue whose rings were there (DEVICE_NEEDS_RESET), an
  NVMe controller with a queue there goes fatal; only then is the range unmapped and
  the unmap answered, so nothing writes into the client's memory after that.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import socket
import threading
from collections.abc import Callable

from pyvmm.devices.pci.device import PCIDevice
from pyvmm.errors import GuestMemoryError
from pyvmm.event import EventManager
from pyvmm.memory import GuestMemory
from pyvmm.peer import (
    ChannelLimits,
    MessageChannel,
    PeerError,
    UnixListener,
    checked_eventfd,
    signal_eventfd,
)
from pyvmm.ratelimit_log import OnceLog
from pyvmm.vfio_user import protocol as P

Factory = Callable[[GuestMemory], PCIDevice]


class EventfdLine:
    """INTx over an eventfd: a rising level signals it. ``lock`` is the session's IRQ
    lock: a pool thread may raise the line while SET_IRQS swaps the fd."""

    def __init__(self, lock: threading.Lock) -> None:
        self.fd: int | None = None
        self.level = False
        self.lock = lock

    def set_level(self, level: bool) -> None:
        with self.lock:
            if level and not self.level and self.fd is not None:
                signal_eventfd(self.fd)
            self.level = level

    def resignal(self) -> None:
        """Signal again if the level is still high (after the client's unmask)."""
        with self.lock:
            if self.level and self.fd is not None:
                signal_eventfd(self.fd)

    def pulse(self) -> None:
        with self.lock:
            if self.fd is not None:
                signal_eventfd(self.fd)


class Session:
    def __init__(self, conn: socket.socket, factory: Factory, events: EventManager,
                 on_close: Callable[[Session], None], errors: OnceLog | None = None,
                 limits: ChannelLimits | None = None) -> None:
        self.events, self.on_close = events, on_close
        self.mem = GuestMemory()
        self.device = factory(self.mem)
        # Interrupts are signalled from wherever the device completes work (the event
        # loop, an I/O-pool thread) while SET_IRQS replaces and closes eventfds on the
        # loop: the fds are read and swapped under one lock, never written after close.
        self._irq_lock = threading.Lock()
        self.intx = EventfdLine(self._irq_lock)
        self.device.intx = self.intx
        self.irq_fds: dict[int, list[int | None]] = {}
        self.dma_maps: dict[int, tuple[int, bool]] = {}  # iova -> (size, has memory)
        self.errors = errors or OnceLog()
        self.counts: dict[str, int] = {}
        self.closed = False
        self._reply_fds: list[int] = []  # fds that ride along with the next reply
        try:
            self.channel = MessageChannel(conn, events, header_size=P.HEADER.size,
                                          frame=P.frame, handler=self._message,
                                          on_close=lambda _reason: self.close(),
                                          name="vfio-user", errors=self.errors, limits=limits)
        except BaseException:
            self.device.close()
            raise

    # --- transport ------------------------------------------------------------------
    def _message(self, data: bytes, fds: list[int]) -> None:
        msg_id, cmd, _size, flags, _err = P.HEADER.unpack_from(data)
        payload = data[P.HEADER.size:]
        name = P.Command(cmd).name if cmd in P.Command._value2member_map_ else str(cmd)
        self.counts[name] = self.counts.get(name, 0) + 1
        self._reply_fds = []
        try:
            out = self._handle(cmd, payload, fds)
        except (P.VfioUserError, PeerError) as e:  # refused; the session goes on
            code = e.errno if isinstance(e, P.VfioUserError) else errno.EINVAL
            self.errors.warn(f"req:{name}:{code}", f"vfio-user {name}: {e}")
            if not flags & P.FLAG_NO_REPLY:
                self.channel.send(P.error_reply(msg_id, cmd, code))
            return
        # Anything else (a device model bug) propagates: the channel closes the session.
        if not flags & P.FLAG_NO_REPLY:
            self.channel.send(P.reply(msg_id, cmd, out), self._reply_fds)

    # --- requests -------------------------------------------------------------------
    def _handle(self, cmd: int, p: bytes, fds: list[int]) -> bytes:
        C = P.Command
        if cmd == C.VERSION:
            if len(p) < 4:
                raise P.VfioUserError(errno.EINVAL, "short VERSION")
            caps = {"capabilities": {"max_msg_fds": 16, "max_data_xfer_size": 1 << 20,
                                     "pgsizes": 4096, "max_dma_maps": 65535}}
            return bytes(4) + json.dumps(caps).encode() + b"\0"
        if cmd == C.DMA_MAP:
            return self._dma_map(p, fds)
        if cmd == C.DMA_UNMAP:
            return self._dma_unmap(p)  # takes no fds: any sent with it the channel closes
        if cmd == C.DEVICE_GET_INFO:
            return P.DEVICE_INFO.pack(P.DEVICE_INFO.size,
                                      P.VFIO_DEVICE_FLAGS_PCI | P.VFIO_DEVICE_FLAGS_RESET,
                                      P.VFIO_PCI_NUM_REGIONS, P.VFIO_PCI_NUM_IRQS)
        if cmd == C.DEVICE_GET_REGION_INFO:
            if len(p) < P.REGION_INFO.size:
                raise P.VfioUserError(errno.EINVAL, "short REGION_INFO")
            index = P.REGION_INFO.unpack_from(p)[2]
            size = self._region_size(index)
            flags = (P.VFIO_REGION_INFO_FLAG_READ | P.VFIO_REGION_INFO_FLAG_WRITE) if size else 0
            shared = self.device.bar_memory(index) if index < 6 else None
            if shared is not None:  # the client maps it into the guest: no messages
                flags |= P.VFIO_REGION_INFO_FLAG_MMAP
                self._reply_fds = [shared[0]]
                return P.REGION_INFO.pack(P.REGION_INFO.size, flags, index, 0, size, shared[1])
            return P.REGION_INFO.pack(P.REGION_INFO.size, flags, index, 0, size, 0)
        if cmd == C.DEVICE_GET_IRQ_INFO:
            if len(p) < P.IRQ_INFO.size:
                raise P.VfioUserError(errno.EINVAL, "short IRQ_INFO")
            index = P.IRQ_INFO.unpack_from(p)[2]
            count = self._irq_count(index)
            flags = P.VFIO_IRQ_INFO_EVENTFD | (P.VFIO_IRQ_INFO_MASKABLE if index == 0 else 0) | (
                P.VFIO_IRQ_INFO_NORESIZE if index == P.VFIO_PCI_MSIX_IRQ_INDEX else 0)
            return P.IRQ_INFO.pack(P.IRQ_INFO.size, flags, index, count)
        if cmd == C.DEVICE_SET_IRQS:
            return self._set_irqs(p, fds)
        if cmd in (C.REGION_READ, C.REGION_WRITE):
            return self._region_access(cmd, p)
        if cmd == C.DEVICE_RESET:
            self.device.reset()
            return b""
        raise P.VfioUserError(errno.ENOSYS, f"command {cmd} not supported")

    def _region_size(self, index: int) -> int:
        if index == P.VFIO_PCI_CONFIG_REGION_INDEX:
            return self.device.config.size
        if 0 <= index < 6:
            bar = self.device.config.bars[index]
            return bar.size if bar is not None else 0
        if index < P.VFIO_PCI_NUM_REGIONS:
            return 0  # ROM, VGA: none
        raise P.VfioUserError(errno.EINVAL, f"no region {index}")

    def _irq_count(self, index: int) -> int:
        if index == P.VFIO_PCI_INTX_IRQ_INDEX:
            return 1 if self.device.config.data[0x3D] else 0
        if index == P.VFIO_PCI_MSI_IRQ_INDEX:
            return getattr(getattr(self.device, "msi", None), "vectors", 0)
        if index == P.VFIO_PCI_MSIX_IRQ_INDEX:
            return getattr(getattr(self.device, "msix", None), "vectors", 0)
        if index < P.VFIO_PCI_NUM_IRQS:
            return 0
        raise P.VfioUserError(errno.EINVAL, f"no IRQ index {index}")

    def _region_access(self, cmd: int, p: bytes) -> bytes:
        if len(p) < P.REGION_ACCESS.size:
            raise P.VfioUserError(errno.EINVAL, "short region access")
        offset, region, count = P.REGION_ACCESS.unpack_from(p)
        size = self._region_size(region)
        is_cfg = region == P.VFIO_PCI_CONFIG_REGION_INDEX
        # Config space may be read or written whole (QEMU reads all of it at start-up);
        # BAR accesses are what a CPU does: 1, 2, 4 or 8 bytes.
        if count == 0 or offset + count > size or (not is_cfg and count not in (1, 2, 4, 8)):
            raise P.VfioUserError(errno.EINVAL, f"access {offset:#x}+{count} outside region "
                                  f"{region} of {size:#x} bytes")
        dev = self.device
        if cmd == P.Command.REGION_WRITE:
            data = p[P.REGION_ACCESS.size:]
            if len(data) != count:
                raise P.VfioUserError(errno.EINVAL, "write data length differs from count")
            if is_cfg:  # in dword-or-smaller pieces; BAR moves are the client's affair
                pos = 0
                while pos < count:
                    n = 4 if count - pos >= 4 and (offset + pos) % 4 == 0 else 1
                    dev.config_write(offset + pos, n, int.from_bytes(data[pos:pos + n], "little"))
                    pos += n
            else:
                dev.write_bar(region, offset, count, int.from_bytes(data, "little"))
            return P.REGION_ACCESS.pack(offset, region, count)
        if is_cfg:
            out = bytes(dev.config.data[offset:offset + count]) if count not in (1, 2, 4) else (
                dev.config_read(offset, count).to_bytes(count, "little"))
        else:
            value = dev.read_bar(region, offset, count)
            out = int(value & ((1 << (8 * count)) - 1)).to_bytes(count, "little")
        return P.REGION_ACCESS.pack(offset, region, count) + out

    def _dma_map(self, p: bytes, fds: list[int]) -> bytes:
        if len(p) < P.DMA_MAP.size:
            raise P.VfioUserError(errno.EINVAL, "short DMA_MAP")
        _argsz, _flags, offset, iova, size = P.DMA_MAP.unpack_from(p)
        if len(fds) > 1:
            raise P.VfioUserError(errno.EINVAL, "DMA_MAP with more than one fd")
        if iova in self.dma_maps:
            raise P.VfioUserError(errno.EEXIST, f"DMA map at {iova:#x} exists")
        if not fds:
            self.dma_maps[iova] = (size, False)  # no fd: not accessible to us (ROM, BIOS)
            return b""
        try:  # the fd must be sealed against shrinking and long enough (check_mappable)
            self.mem.add_mapped(iova, size, fds[0], offset)
        except GuestMemoryError as e:
            raise P.VfioUserError(errno.EINVAL, str(e)) from None  # the fd is still ours
        fds.clear()  # the region owns it now
        self.dma_maps[iova] = (size, True)
        return b""

    def _dma_unmap(self, p: bytes) -> bytes:
        if len(p) < P.DMA_UNMAP.size:
            raise P.VfioUserError(errno.EINVAL, "short DMA_UNMAP")
        _argsz, _flags, iova, _size = P.DMA_UNMAP.unpack_from(p)
        entry = self.dma_maps.get(iova)
        if entry is None:
            raise P.VfioUserError(errno.ENOENT, f"no DMA map at {iova:#x}")
        if entry[1]:
            # Users first: in-flight I/O finishes, queues there stop; then unmap.
            self.device.dma_unmapped(iova, entry[0])
            self.mem.remove_region(iova)
        del self.dma_maps[iova]
        return b""

    def _set_irqs(self, p: bytes, fds: list[int]) -> bytes:
        if len(p) < P.IRQ_SET.size:
            raise P.VfioUserError(errno.EINVAL, "short SET_IRQS")
        _argsz, flags, index, start, count = P.IRQ_SET.unpack_from(p)
        total = self._irq_count(index)
        if start + count > total and not (count == 0 and start == 0):
            raise P.VfioUserError(errno.EINVAL, f"IRQ {index} vectors {start}+{count} > {total}")
        slots = self.irq_fds.setdefault(index, [None] * total)
        if flags & P.VFIO_IRQ_SET_DATA_EVENTFD:
            # Either one fd per vector, or none at all: QEMU enables MSI-X with no
            # eventfds yet (the kernel API's fd -1), which unsets those vectors.
            if fds and len(fds) != count:
                raise P.VfioUserError(errno.EINVAL, f"{count} vectors but {len(fds)} fds")
            for fd in fds:  # all checked before any is used: eventfds, non-blocking
                checked_eventfd(fd, f"IRQ index {index}")
            taken, fds[:] = list(fds), []
            with self._irq_lock:
                for i in range(count):
                    old = slots[start + i]
                    if old is not None:
                        os.close(old)
                    slots[start + i] = taken[i] if taken else None
        elif flags & P.VFIO_IRQ_SET_DATA_NONE and count == 0:
            with self._irq_lock:
                for i, old in enumerate(slots):  # disable all of this index
                    if old is not None:
                        os.close(old)
                    slots[i] = None
        if index == P.VFIO_PCI_INTX_IRQ_INDEX:
            with self._irq_lock:
                self.intx.fd = slots[0] if slots else None
            if flags & P.VFIO_IRQ_SET_ACTION_UNMASK:
                # The client deasserts its pin at its EOI (QEMU: on the next BAR access)
                # and unmasks; as with the kernel's vfio-pci, a line still asserted
                # then fires again, or that interrupt would be lost until the level
                # fell and rose.
                self.intx.resignal()
        elif index in (P.VFIO_PCI_MSI_IRQ_INDEX, P.VFIO_PCI_MSIX_IRQ_INDEX):
            # The client emulates the MSI/MSI-X capability; SET_IRQS says which one the
            # guest enabled. While enabled (even before its eventfds arrive), the
            # device's triggers go to the vectors' eventfds; disabled, the device falls
            # back to its next interrupt mode, as a real function would.
            on = bool(flags & P.VFIO_IRQ_SET_DATA_EVENTFD and count)
            cap = getattr(self.device, "msi" if index == P.VFIO_PCI_MSI_IRQ_INDEX else "msix",
                          None)
            if cap is not None:
                cap.direct = functools.partial(self._vector_trigger, index) if on else None
        return b""

    def _vector_trigger(self, index: int, n: int) -> bool:
        with self._irq_lock:
            fds = self.irq_fds.get(index) or []
            fd = fds[n] if 0 <= n < len(fds) else None
            if fd is not None:
                signal_eventfd(fd)
                return True
            return False

    def close(self) -> None:
        """End the session: the device lets go of the client's memory (its I/O done,
        its queues stopped) and its own resources, then every fd the session took."""
        if self.closed:
            return
        self.closed = True
        self.channel.close()
        try:
            # A reset first, as for a function whose host went away (no NEEDS_RESET
            # to report to anyone); then all memory goes: I/O still in flight finishes.
            self.device.reset()
            self.device.dma_unmapped(0, 1 << 64)
            self.device.close()  # e.g. the test device's shared-BAR memfd
        finally:
            with self._irq_lock:
                for slots in self.irq_fds.values():
                    for fd in slots:
                        if fd is not None:
                            os.close(fd)
                self.irq_fds.clear()
                self.intx.fd = None
            self.mem.close()
            self.on_close(self)


class VfioUserServer:
    """One listening socket; every client that connects gets its own session and its
    own device from ``factory``. ``limits`` bound what one client may cost."""

    def __init__(self, path: str, factory: Factory, events: EventManager | None = None,
                 limits: ChannelLimits | None = None) -> None:
        self.events = events or EventManager()
        self.factory = factory
        self.path = path
        self.limits = limits
        self.errors = OnceLog()
        self.sessions: list[Session] = []
        self.closed_sessions = 0
        # ConfigError if something other than a stale socket is at ``path``.
        self.listener = UnixListener(path, self.events, self._accept, errors=self.errors)

    def _accept(self, conn: socket.socket) -> None:
        self.sessions.append(Session(conn, self.factory, self.events, self._closed,
                                     self.errors, self.limits))

    def _closed(self, s: Session) -> None:
        self.closed_sessions += 1
        if s in self.sessions:
            self.sessions.remove(s)

    def serve_forever(self) -> None:
        while True:
            self.events.run_once(None)

    def close(self) -> None:
        for s in list(self.sessions):
            s.close()
        self.listener.close()
