"""A vhost-user backend hosting pyvmm's virtio device logic (the very classes the
in-VMM devices use, e.g. ``VirtioBlk``), serving several front ends at once.

Each listening socket has its own device factory (one image per socket); a front end
that connects gets a ``Session``: its memory table is mapped from the fds it sends,
its vrings become ``Virtqueue``s over that memory (vring addresses are translated
from the front end's user addresses to guest-physical ones), kicks arrive on its
kick eventfds and interrupts leave on its call eventfds — all on one epoll loop.

Every session's messages come through a ``MessageChannel`` (``peer/channel.py``):
non-blocking, complete messages only, a deadline for a message in progress, replies
queued in order, and the channel's fd rule — a handler takes the fds it keeps from
``Message.fds``; what is left there after handling, the channel closes. A malformed
message (wrong size, missing fd, ring index out of range, ring outside the mapped
memory, unknown request, an fd of the wrong kind or unsealed memory) gets a non-zero
REPLY_ACK where the front end asked for one and the session is closed; the process and
other sessions go on. Anything else a handler raises closes that session too.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.devices.virtio.queue import QueueConfig, Virtqueue, VirtqueueError, start_queue
from pyvmm.errors import GuestMemoryError, PyvmmError
from pyvmm.event import EventManager
from pyvmm.memory import GuestMemory
from pyvmm.peer import ChannelLimits, MessageChannel, UnixListener, checked_eventfd, signal_eventfd
from pyvmm.ratelimit_log import OnceLog
from pyvmm.vhost_user.inflight import InflightArea
from pyvmm.vhost_user.protocol import (
    HEADER,
    INFLIGHT,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_VRING_IDX_MASK,
    VHOST_USER_VRING_NOFD_MASK,
    MemoryRegion,
    Message,
    ProtocolError,
    ProtocolFeature,
    Request,
    decode_header,
    encode_reply,
    frame,
)

PROTOCOL_FEATURES = (1 << ProtocolFeature.CONFIG) | (1 << ProtocolFeature.REPLY_ACK) | (
    1 << ProtocolFeature.RESET_DEVICE) | (1 << ProtocolFeature.MQ) | (
    1 << ProtocolFeature.INFLIGHT_SHMFD)


@dataclass
class Ring:
    num: int = 0
    base: int = 0
    addrs: tuple[int, int, int] | None = None  # desc, avail, used (guest-physical)
    kick: int | None = None
    call: int | None = None
    enabled: bool = False
    vq: Virtqueue | None = None


class CallInterrupt:
    """VirtioInterrupt over the front end's call eventfds."""

    def __init__(self, session: Session) -> None:
        self.session = session
        self.signals = 0

    def signal_queue(self, vq: Virtqueue) -> None:
        # Event loop or a pool completion, both under the device lock, under which
        # SET_VRING_CALL swaps the fd: it is never closed while being written.
        for ring in self.session.rings:
            if ring.vq is vq and ring.call is not None:
                self.signals += 1
                signal_eventfd(ring.call)  # checked eventfd; full = already pending

    def signal_config(self) -> None:
        pass  # config-change notices need the backend-request channel (not offered)


class Session:
    def __init__(self, conn: socket.socket, device: VirtioDevice, events: EventManager,
                 on_close: Callable[[Session], None], errors: OnceLog | None = None,
                 limits: ChannelLimits | None = None) -> None:
        self.device, self.events, self.on_close = device, events, on_close
        self.mem = GuestMemory()
        self.regions: list[MemoryRegion] = []
        self.rings = [Ring() for _ in device.queue_max_sizes]
        self.features = 0
        self.protocol_features = 0
        self.irq = CallInterrupt(self)
        self.errors = errors or OnceLog()
        self.closed = False
        self.inflight: InflightArea | None = None
        device.on_fault = self._ring_fault  # host-started work: pool completions, TAP frames
        self.channel = MessageChannel(conn, events, header_size=HEADER.size, frame=frame,
                                      handler=self._message, on_close=self._ended,
                                      name="vhost-user", errors=self.errors, limits=limits)

    @property
    def messages(self) -> int:
        return self.channel.messages

    # --- transport ----------------------------------------------------------------------
    def _send(self, request: int, payload: bytes, fds: list[int] | None = None) -> None:
        self.channel.send(encode_reply(request, payload), fds or ())

    def _message(self, data: bytes, fds: list[int]) -> None:
        request, flags, _ = decode_header(data[:HEADER.size])
        m = Message(request, flags, data[HEADER.size:], fds)  # the channel's list: take()
        try:
            self._handle(m)
        except PyvmmError as e:  # the peer broke a rule: refuse, then end the session
            self.errors.warn(f"protocol:{type(e).__name__}",
                             f"vhost-user: request {request}: {e}; closing the session")
            if m.need_reply and self.protocol_features & (1 << ProtocolFeature.REPLY_ACK):
                self._send(request, struct.pack("<Q", 1))  # best effort: a failure ack
            self.close()

    def _ended(self, _reason: str) -> None:
        self.close()

    # --- requests ---------------------------------------------------------------------
    def _ring(self, index: int) -> Ring:
        if not 0 <= index < len(self.rings):
            raise ProtocolError(f"vring index {index} out of range")
        return self.rings[index]

    def _gpa(self, uaddr: int) -> int:
        for r in self.regions:
            if r.userspace_addr <= uaddr < r.userspace_addr + r.memory_size:
                return r.guest_phys_addr + uaddr - r.userspace_addr
        raise ProtocolError(f"vring address {uaddr:#x} is in no mapped region")

    def _handle(self, m: Message) -> None:
        R = Request
        req, dev = m.request, self.device
        ack: int | None = 0
        if req == R.GET_FEATURES:
            self._send(req, struct.pack("<Q", dev.features | (1 << VHOST_USER_F_PROTOCOL_FEATURES)))
            ack = None
        elif req == R.SET_FEATURES:
            f = m.u64()
            if f & ~(dev.features | (1 << VHOST_USER_F_PROTOCOL_FEATURES)):
                raise ProtocolError(f"front end set features {f:#x} we do not offer")
            self.features = f
            dev.acked = f & dev.features
        elif req == R.GET_PROTOCOL_FEATURES:
            self._send(req, struct.pack("<Q", PROTOCOL_FEATURES))
            ack = None
        elif req == R.SET_PROTOCOL_FEATURES:
            self.protocol_features = m.u64() & PROTOCOL_FEATURES
        elif req == R.GET_QUEUE_NUM:
            self._send(req, struct.pack("<Q", len(self.rings)))
            ack = None
        elif req in (R.SET_OWNER, R.RESET_OWNER):
            pass
        elif req == R.RESET_DEVICE:
            self._reset()
        elif req == R.SET_MEM_TABLE:
            self._set_mem_table(m)
        elif req == R.SET_VRING_NUM:
            i, num = m.vring_state()
            ring = self._ring(i)
            if not num or num & (num - 1) or num > dev.queue_max_sizes[i]:
                raise ProtocolError(f"vring {i} size {num}")
            self._inflight_fits(i, num)
            ring.num = num
        elif req == R.SET_VRING_BASE:
            i, base = m.vring_state()
            self._ring(i).base = base & 0xFFFF
        elif req == R.SET_VRING_ADDR:
            i, _flags, desc, used, avail = m.vring_addr()
            self._ring(i).addrs = (self._gpa(desc), self._gpa(avail), self._gpa(used))
        elif req == R.GET_VRING_BASE:
            i, _ = m.vring_state()
            ring = self._ring(i)
            self._drain()  # every request before the base we return is complete
            base = ring.vq.last_avail if ring.vq is not None else ring.base
            self._stop(ring)
            self._send(req, struct.pack("<II", i, base))
            ack = None
        elif req in (R.SET_VRING_KICK, R.SET_VRING_CALL, R.SET_VRING_ERR):
            v = m.u64()
            ring = self._ring(v & VHOST_USER_VRING_IDX_MASK)
            fd = None
            if not v & VHOST_USER_VRING_NOFD_MASK and req != R.SET_VRING_ERR:
                # Checked before it is used: an eventfd, non-blocking (peer/fds.py).
                fd = m.take(checked_eventfd(m.one_fd(), Request(req).name))
            if req == R.SET_VRING_KICK:
                self._set_kick(ring, fd)
            elif req == R.SET_VRING_CALL:
                with dev.core_lock:  # a pool completion may be signalling the old one
                    old, ring.call = ring.call, fd
                if old is not None:
                    os.close(old)
            # SET_VRING_ERR: we never signal it; its fd stays in the message (closed)
        elif req == R.SET_VRING_ENABLE:
            i, on = m.vring_state()
            ring = self._ring(i)
            ring.enabled = bool(on)
            self._maybe_start(ring)
        elif req == R.GET_CONFIG:
            offset, size, _flags, _ = m.config()
            data = dev.config_bytes()[offset:offset + size].ljust(size, b"\0")
            self._send(req, struct.pack("<III", offset, size, 0) + data)
            ack = None
        elif req == R.GET_INFLIGHT_FD:
            _size, _off, nq, qs = m.inflight()
            if nq != len(self.rings) or not qs or qs > max(dev.queue_max_sizes):
                raise ProtocolError(f"inflight region for {nq} queues of {qs}")
            self._set_inflight(InflightArea.create(nq, qs))
            assert self.inflight is not None
            self._send(req, INFLIGHT.pack(self.inflight.size, 0, nq, qs), [self.inflight.fd])
            ack = None
        elif req == R.SET_INFLIGHT_FD:
            size, off, nq, qs = m.inflight()
            area = InflightArea(m.one_fd(), size, off, nq, qs)
            m.take(area.fd)
            if nq != len(self.rings):
                area.close()
                raise ProtocolError(f"inflight region for {nq} queues, device has "
                                    f"{len(self.rings)}")
            self._set_inflight(area)
        elif req == R.SET_CONFIG:
            offset, size, _flags, data = m.config()
            dev.write_config(offset, size, int.from_bytes(data[:8], "little"))
        else:
            raise ProtocolError(f"unsupported request {req}")
        if ack is not None and m.need_reply and self.protocol_features & (
                1 << ProtocolFeature.REPLY_ACK):
            self._send(req, struct.pack("<Q", ack))

    def _set_mem_table(self, m: Message) -> None:
        regions = m.mem_table()
        if len(m.fds) != len(regions):
            raise ProtocolError(f"{len(regions)} regions but {len(m.fds)} fds")
        self._drain()  # no pool thread may still be writing into the old mappings
        for ring in self.rings:
            self._stop(ring)
        self.mem.close()
        self.mem = GuestMemory()
        self.regions = []
        for r, fd in zip(regions, list(m.fds), strict=True):
            try:  # checks the seal and the file's length first (check_mappable)
                self.mem.add_mapped(r.guest_phys_addr, r.memory_size, fd, r.mmap_offset)
            except GuestMemoryError as e:
                raise ProtocolError(str(e)) from None  # fds not yet mapped: still m's
            m.take(fd)
        self.regions = regions

    def _set_kick(self, ring: Ring, fd: int | None) -> None:
        if ring.kick is not None:
            self.events.remove(ring.kick)
            os.close(ring.kick)
        ring.kick = fd
        if fd is not None:
            idx = self.rings.index(ring)
            self.events.add(fd, functools.partial(self._on_kick, idx), fail=self._ended)
        if not self.protocol_features and not self.features & (
                1 << VHOST_USER_F_PROTOCOL_FEATURES):
            ring.enabled = True  # without protocol features a ring starts when kicked
        self._maybe_start(ring)

    def _maybe_start(self, ring: Ring) -> None:
        if ring.vq is not None or not ring.enabled or ring.kick is None or ring.addrs is None:
            return
        desc, avail, used = ring.addrs
        cfg = QueueConfig(ring.num or 1)
        cfg.size, cfg.desc, cfg.avail, cfg.used = ring.num, desc, avail, used
        dev = self.device
        try:
            vq = ring.vq = start_queue(self.mem, cfg, dev.acked)
        except VirtqueueError as e:
            raise ProtocolError(str(e)) from None
        vq.last_avail = ring.base
        vq.used_idx = ring.base
        idx = self.rings.index(ring)
        if self.inflight is not None and self.protocol_features & (
                1 << ProtocolFeature.INFLIGHT_SHMFD):
            self._inflight_fits(idx, ring.num)
            iq = self.inflight.queues[idx]
            # What a predecessor took and never used is served again, first; the
            # available ring continues after it (libvhost-user does the same).
            vq.used_idx = vq.ring_used_idx()
            vq.last_avail, heads = iq.recover(vq.used_idx, ring.num)
            vq.resubmit.extend(heads)
            vq.inflight = iq
            if heads:
                self.errors.warn("resubmit", f"vhost-user: ring {idx}: serving {len(heads)} "
                                 "request(s) a previous back end left in flight")
        dev.activate(self.mem, [r.vq for r in self.rings], self.irq)
        self._kicked(self.rings.index(ring), drain=False)

    def _inflight_fits(self, index: int, num: int) -> None:
        """A ring may not have more entries than its inflight queue tracks: a head past
        them would index beyond that queue's part of the region."""
        if self.inflight is not None and num > self.inflight.queues[index].queue_size:
            raise ProtocolError(f"vring {index} of {num} entries, inflight region tracks "
                                f"{self.inflight.queues[index].queue_size}")

    def _on_kick(self, index: int, _fd: int, _ev: int) -> None:
        self._kicked(index)

    def _kicked(self, index: int, drain: bool = True) -> None:
        ring = self.rings[index]
        if drain and ring.kick is not None:
            try:
                os.eventfd_read(ring.kick)
            except BlockingIOError:
                return
        if ring.vq is None:
            return
        with self.device.core_lock:  # pool completions take it too (VirtioBlk)
            try:
                self.device.process_queue(index)
            except PyvmmError as e:  # VirtqueueError, GuestMemoryError: the ring's own fault
                self._ring_fault(index, e)

    def _ring_fault(self, index: int, e: Exception) -> None:
        """Work on ring ``index`` failed (a kick, or host-started work through
        ``VirtioDevice.fail``; the device lock is held): that ring stops — the device
        drops its queue too, so neither TAP frames nor pool completions touch it."""
        self.errors.warn(f"ring:{type(e).__name__}",
                         f"vhost-user: ring {index}: {e!r}; ring stopped")
        if 0 <= index < len(self.rings):
            self.rings[index].vq = None
        if 0 <= index < len(self.device.queues):
            self.device.queues[index] = None

    def _stop(self, ring: Ring) -> None:
        ring.vq = None

    def _set_inflight(self, area: InflightArea) -> None:
        self._drain()
        for ring in self.rings:  # running queues keep no pointer into the old region
            if ring.vq is not None:
                ring.vq.inflight = None
        if self.inflight is not None:
            self.inflight.close()
        self.inflight = area

    def _drain(self) -> None:
        drain = getattr(self.device, "drain", None)
        if drain is not None and not drain():
            raise ProtocolError("device I/O did not finish within 30 s")

    def _reset(self) -> None:
        self._drain()
        for ring in self.rings:
            self._stop(ring)
            ring.enabled, ring.addrs, ring.num, ring.base = False, None, 0, 0
        self.device.reset()

    def close(self) -> None:
        """End the session: every fd it took (kicks, calls, memory, inflight region)
        and the channel with what it still holds are closed."""
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ProtocolError):  # closing anyway: a timeout changes nothing
            self._drain()  # before the memory the pool writes into is unmapped
        self.channel.close()
        self.device.reset()
        for ring in self.rings:
            ring.vq = None
            if ring.kick is not None:
                self.events.remove(ring.kick)
                os.close(ring.kick)
            if ring.call is not None:
                os.close(ring.call)
            ring.kick = ring.call = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.mem.close()
        self.on_close(self)


class VhostUserServer:
    """Listening sockets, each with its own device factory; every front end that
    connects gets its own session and device. ``limits`` bound what one peer may cost
    (peer/channel.py); problems are logged once per kind for the whole server."""

    def __init__(self, events: EventManager | None = None,
                 limits: ChannelLimits | None = None) -> None:
        self.events = events or EventManager()
        self.limits = limits
        self.errors = OnceLog()
        self.listeners: list[UnixListener] = []
        self.sessions: list[Session] = []
        self.closed_sessions = 0

    def listen(self, path: str, factory: Callable[[], VirtioDevice]) -> None:
        """ConfigError if something other than a stale socket is at ``path``."""
        self.listeners.append(UnixListener(path, self.events,
                                           functools.partial(self._accept, factory),
                                           errors=self.errors))

    def _accept(self, factory: Callable[[], VirtioDevice], conn: socket.socket) -> None:
        self.sessions.append(Session(conn, factory(), self.events, self._closed,
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
        for listener in self.listeners:
            listener.close()
