"""A vhost-user backend hosting pyvmm's virtio device logic (the very classes the
in-VMM devices use, e.g. ``VirtioBlk``), serving several front ends at once.

Each listening socket has its own device factory (one image per socket); a front end
that connects gets a ``Session``: its memory table is mapped from the fds it sends,
its vrings become ``Virtqueue``s over that memory (vring addresses are translated
from the front end's user addresses to guest-physical ones), kicks arrive on its
kick eventfds and interrupts leave on its call eventfds — all on one epoll loop.

A malformed message (wrong size, missing fd, ring index out of range, ring outside
the mapped memory, unknown request) gets an error answer where the protocol has one
(REPLY_ACK with a non-zero u64, GET_* with an empty answer) and the session is
closed; the process and other sessions go on.
"""

from __future__ import annotations

import array
import contextlib
import functools
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.devices.virtio.queue import QueueConfig, Virtqueue, VirtqueueError
from pyvmm.errors import GuestMemoryError
from pyvmm.event import EventManager
from pyvmm.memory import GuestMemory
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
        for ring in self.session.rings:
            if ring.vq is vq and ring.call is not None:
                self.signals += 1
                os.eventfd_write(ring.call, 1)

    def signal_config(self) -> None:
        pass  # config-change notices need the backend-request channel (not offered)


class Session:
    def __init__(self, conn: socket.socket, device: VirtioDevice, events: EventManager,
                 on_close: Callable[[Session], None]) -> None:
        self.conn, self.device, self.events, self.on_close = conn, device, events, on_close
        self.mem = GuestMemory()
        self.regions: list[MemoryRegion] = []
        self.rings = [Ring() for _ in device.queue_max_sizes]
        self.features = 0
        self.protocol_features = 0
        self.irq = CallInterrupt(self)
        self.errors = OnceLog()
        self.messages = 0
        self.closed = False
        self.inflight: InflightArea | None = None
        events.add(conn.fileno(), self._readable)

    # --- transport ----------------------------------------------------------------------
    def _recv(self) -> Message | None:
        fds = array.array("i")
        try:
            raw, anc, _flags, _ = self.conn.recvmsg(HEADER.size, socket.CMSG_LEN(64 * 4))
        except (BlockingIOError, InterruptedError):
            return None
        except OSError:
            raw, anc = b"", []
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds.frombytes(data[:len(data) - len(data) % fds.itemsize])
        if not raw:
            for fd in fds:
                os.close(fd)
            raise EOFError
        try:
            request, flags, size = decode_header(raw)
            payload = b""
            while len(payload) < size:
                chunk = self.conn.recv(size - len(payload))
                if not chunk:
                    raise ProtocolError("connection closed inside a message")
                payload += chunk
        except (ProtocolError, OSError):
            for fd in fds:
                os.close(fd)
            raise
        return Message(request, flags, payload, list(fds))

    def _send(self, request: int, payload: bytes, fds: list[int] | None = None) -> None:
        data = encode_reply(request, payload)
        if fds:
            socket.send_fds(self.conn, [data], fds)
        else:
            self.conn.sendall(data)

    def _readable(self, fd: int, ev: int) -> None:
        try:
            self.conn.setblocking(True)
            msg = self._recv()
            if msg is None:
                return
            self.messages += 1
            self._handle(msg)
        except EOFError:
            self.close()
        except (ProtocolError, VirtqueueError, GuestMemoryError, OSError, ValueError,
                struct.error) as e:
            self.errors.warn("protocol", f"vhost-user: {e}; closing the session")
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
        extra_fds = list(m.fds)
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
            extra_fds = []
        elif req == R.SET_VRING_NUM:
            i, num = m.vring_state()
            ring = self._ring(i)
            if not num or num & (num - 1) or num > dev.queue_max_sizes[i]:
                raise ProtocolError(f"vring {i} size {num}")
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
            if not v & VHOST_USER_VRING_NOFD_MASK:
                if len(m.fds) != 1:
                    raise ProtocolError(f"request {req} without its eventfd")
                fd = m.fds[0]
                extra_fds = []
            if req == R.SET_VRING_KICK:
                self._set_kick(ring, fd)
            elif req == R.SET_VRING_CALL:
                if ring.call is not None:
                    os.close(ring.call)
                ring.call = fd
            elif fd is not None:
                os.close(fd)  # error eventfd: we never signal it
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
            if len(m.fds) != 1:
                raise ProtocolError("SET_INFLIGHT_FD without its fd")
            extra_fds = []
            try:
                area = InflightArea(m.fds[0], size, off, nq, qs)
            except ProtocolError:
                os.close(m.fds[0])
                raise
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
        for fd in extra_fds:
            os.close(fd)
        if ack is not None and m.need_reply and self.protocol_features & (
                1 << ProtocolFeature.REPLY_ACK):
            self._send(req, struct.pack("<Q", ack))

    def _set_mem_table(self, m: Message) -> None:
        regions = m.mem_table()
        if len(m.fds) != len(regions):
            for fd in m.fds:
                os.close(fd)
            raise ProtocolError(f"{len(regions)} regions but {len(m.fds)} fds")
        self._drain()  # no pool thread may still be writing into the old mappings
        for ring in self.rings:
            self._stop(ring)
        self.mem.close()
        self.mem = GuestMemory()
        try:
            for r, fd in zip(regions, m.fds, strict=True):
                self.mem.add_mapped(r.guest_phys_addr, r.memory_size, fd, r.mmap_offset)
        except GuestMemoryError as e:
            raise ProtocolError(str(e)) from None
        self.regions = regions

    def _set_kick(self, ring: Ring, fd: int | None) -> None:
        if ring.kick is not None:
            self.events.remove(ring.kick)
            os.close(ring.kick)
        ring.kick = fd
        if fd is not None:
            idx = self.rings.index(ring)
            self.events.add(fd, functools.partial(self._on_kick, idx))
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
        problem = cfg.problem()
        if problem:
            raise ProtocolError(problem)
        dev = self.device
        vq = ring.vq = Virtqueue(self.mem, cfg, event_idx=dev.has(29), indirect=dev.has(28))
        vq.last_avail = ring.base
        vq.used_idx = ring.base
        idx = self.rings.index(ring)
        if self.inflight is not None and self.protocol_features & (
                1 << ProtocolFeature.INFLIGHT_SHMFD):
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
        try:
            with self.device.core_lock:  # pool completions take it too (VirtioBlk)
                self.device.process_queue(index)
        except (VirtqueueError, GuestMemoryError) as e:
            self.errors.warn("ring", f"vhost-user: ring {index}: {e}; ring stopped")
            ring.vq = None

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
        if self.closed:
            return
        self.closed = True
        with contextlib.suppress(ProtocolError):  # closing anyway: a timeout changes nothing
            self._drain()  # before the memory the pool writes into is unmapped
        self.events.remove(self.conn.fileno())
        for ring in self.rings:
            if ring.kick is not None:
                self.events.remove(ring.kick)
                os.close(ring.kick)
            if ring.call is not None:
                os.close(ring.call)
        self.device.reset()
        for ring in self.rings:
            ring.vq = None
        if self.inflight is not None:
            self.inflight.close()
            self.inflight = None
        self.mem.close()
        self.conn.close()
        self.on_close(self)


class VhostUserServer:
    """Listening sockets, each with its own device factory; one session per socket at a
    time (a second front end on the same socket waits, as with QEMU's daemons)."""

    def __init__(self, events: EventManager | None = None) -> None:
        self.events = events or EventManager()
        self.listeners: dict[int, tuple[socket.socket, Callable[[], VirtioDevice]]] = {}
        self.sessions: list[Session] = []
        self.closed_sessions = 0

    def listen(self, path: str, factory: Callable[[], VirtioDevice]) -> None:
        if os.path.exists(path):
            os.unlink(path)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.bind(path)
        s.listen(4)
        self.listeners[s.fileno()] = (s, factory)
        self.events.add(s.fileno(), self._accept)

    def _accept(self, fd: int, ev: int) -> None:
        sock, factory = self.listeners[fd]
        conn, _ = sock.accept()
        self.sessions.append(Session(conn, factory(), self.events, self._closed))

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
        for sock, _ in self.listeners.values():
            path = sock.getsockname()
            sock.close()
            if isinstance(path, str) and os.path.exists(path):
                os.unlink(path)
