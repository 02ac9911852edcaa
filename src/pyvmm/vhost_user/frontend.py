"""A vhost-user front end: a virtio device of pyvmm's own VM whose queues are served by
another process (QEMU docs/interop/vhost-user.rst, the "front-end" side).

``VhostUserFrontend`` is a ``VirtioDevice`` like any other, behind ``VirtioPciDevice``
or ``VirtioMmioDevice``: the transport, status machine and feature negotiation with
the guest are pyvmm's; the rings are the backend's.

- **At creation** it connects to the backend's socket (bounded), asks GET_FEATURES,
  GET/SET_PROTOCOL_FEATURES (REPLY_ACK, CONFIG, MQ, INFLIGHT_SHMFD, RESET_DEVICE as
  offered), GET_QUEUE_NUM and GET_CONFIG (virtio-blk's config space is the backend's;
  virtio-net's, as in QEMU, is the VMM's: MAC and link status). A socket that is not
  there, refuses, or a backend that answers wrongly is a one-line ``ConfigError``.
- **At DRIVER_OK** (``activate``): SET_OWNER, SET_FEATURES, SET_MEM_TABLE with the
  VMM's guest-RAM memfds (user addresses are this process's mappings),
  GET/SET_INFLIGHT_FD, and per ready queue SET_VRING_NUM/BASE/ADDR/CALL/KICK, then
  SET_VRING_ENABLE. **The fast path:** the kick fd is the KVM ioeventfd of the
  queue's notify address (the transport stops watching it) and the call fd is the
  irqfd of the queue's MSI-X vector, so a request goes guest → KVM → backend →
  KVM → guest with no pyvmm thread on the way. Where the transport has no such fd
  (virtio-mmio's InterruptStatus, INTx, ``--msi signal``, no ioeventfd, or
  ``fast_path=off``) the VMM forwards: a trapped kick reaches ``process_queue``,
  which signals the kick eventfd, and the event loop watches the call eventfd and
  raises the interrupt itself. Both are counted (``metrics()``).
- **At reset** (the driver writes status 0): GET_VRING_BASE for each started ring
  (which stops it), then RESET_DEVICE (or RESET_OWNER).

Every reply is untrusted: its request, flags and size are checked before its payload
is read, fds are counted and closed when unexpected, values are range-checked, and
every wait is bounded (``timeout``, 5 s by default) — status writes arrive on the
vCPU thread, which a silent backend must not hold. Any violation, a timeout, or the
socket's EOF/HUP (watched on the event loop) drops the connection and puts the
device in DEVICE_NEEDS_RESET, logged once; the VM goes on. Nothing raises out of the
device into the transport.

With ``reconnect`` (seconds) a backend that went away is awaited instead: the event
loop reconnects with a doubling back-off (50 ms to 1 s), a successor must offer the
same features, queues and config, and running rings are handed to it again — the
same kick and call fds, SET_VRING_BASE from the used index in guest memory, and the
predecessor's inflight region, from which the backend serves what was taken and not
completed. Past the deadline the device needs a reset as above.
"""

from __future__ import annotations

import functools
import os
import select
import socket
import stat
import struct
import time
from dataclasses import dataclass

from pyvmm.devices.virtio.core import QueueEventfds, VirtioDevice, VirtioInterrupt
from pyvmm.devices.virtio.queue import Virtqueue
from pyvmm.errors import BackendError, ConfigError
from pyvmm.event import EventManager
from pyvmm.memory import GuestMemory
from pyvmm.peer.requester import Requester
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import virtio as V
from pyvmm.vhost_user.inflight import queue_region_size
from pyvmm.vhost_user.protocol import (
    HEADER,
    INFLIGHT,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_MAX_RAM_SLOTS,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    VHOST_USER_VERSION_MASK,
    ProtocolFeature,
    Request,
    encode,
)

WANTED_PROTOCOL = ((1 << ProtocolFeature.REPLY_ACK) | (1 << ProtocolFeature.CONFIG)
                   | (1 << ProtocolFeature.MQ) | (1 << ProtocolFeature.INFLIGHT_SHMFD)
                   | (1 << ProtocolFeature.RESET_DEVICE))
# Transport features the front end can pass through: the rings are split rings in
# guest RAM (no packed ring, IOMMU, notification data, ring reset, ...).
TRANSPORT_FEATURES = ((1 << V.VIRTIO_RING_F_INDIRECT_DESC) | (1 << V.VIRTIO_RING_F_EVENT_IDX)
                      | (1 << V.VIRTIO_F_VERSION_1))
MAX_QUEUE_NUM = 1024  # a GET_QUEUE_NUM answer above this is not a real device
MAX_INFLIGHT = 1 << 26
MAX_FDS = 8  # per reply; only GET_INFLIGHT_FD carries one

VIRTIO_BLK_F_GEOMETRY, VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_MQ = 4, 10, 12
VIRTIO_BLK_CONFIG_SIZE = 60  # struct virtio_blk_config up to write_zeroes_may_unmap
VIRTIO_BLK_CONFIG_NUM_QUEUES = 34


@dataclass(frozen=True)
class Model:
    """What differs between the devices a front end can stand for."""

    name: str
    device_type: int
    max_queues: int  # virtqueues the guest gets at most
    device_features: int  # device-specific bits passed through from the backend
    own_features: int  # bits the front end itself provides (its own config fields)
    config_size: int  # bytes of config space asked with GET_CONFIG; 0: the VMM's own


BLK = Model("vhost-user-blk", V.VIRTIO_ID_BLOCK, 16,
            sum(1 << b for b in (V.VIRTIO_BLK_F_SIZE_MAX, V.VIRTIO_BLK_F_SEG_MAX,
                                 VIRTIO_BLK_F_GEOMETRY, V.VIRTIO_BLK_F_RO,
                                 V.VIRTIO_BLK_F_BLK_SIZE, V.VIRTIO_BLK_F_FLUSH,
                                 VIRTIO_BLK_F_TOPOLOGY, VIRTIO_BLK_F_MQ,
                                 V.VIRTIO_BLK_F_DISCARD, V.VIRTIO_BLK_F_WRITE_ZEROES)),
            0, VIRTIO_BLK_CONFIG_SIZE)
# virtio-net: rx and tx only (the control queue, MQ, MTU, announce need the VMM to
# implement them, as QEMU does); the MAC and link status are the VMM's config.
NET = Model("vhost-user-net", V.VIRTIO_ID_NET, 2,
            sum(1 << b for b in (V.VIRTIO_NET_F_CSUM, V.VIRTIO_NET_F_GUEST_CSUM,
                                 V.VIRTIO_NET_F_GUEST_TSO4, V.VIRTIO_NET_F_GUEST_TSO6,
                                 V.VIRTIO_NET_F_GUEST_ECN, V.VIRTIO_NET_F_GUEST_UFO,
                                 V.VIRTIO_NET_F_HOST_TSO4, V.VIRTIO_NET_F_HOST_TSO6,
                                 V.VIRTIO_NET_F_HOST_ECN, V.VIRTIO_NET_F_HOST_UFO,
                                 V.VIRTIO_NET_F_MRG_RXBUF)),
            (1 << V.VIRTIO_NET_F_MAC) | (1 << V.VIRTIO_NET_F_STATUS), 0)

_u64 = struct.Struct("<Q")
_state = struct.Struct("<II")


class Channel(Requester):
    """The front end's end of the socket: one request at a time, every wait bounded by
    ``timeout`` seconds, every reply checked before its payload is read."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__(sock, timeout, MAX_FDS)

    def send(self, req: Request, payload: bytes = b"", fds: list[int] | None = None,
             need_reply: bool = False) -> None:
        data = encode(req, payload, VHOST_USER_NEED_REPLY_MASK if need_reply else 0)
        self.send_all(data, fds, self.deadline(), req.name)
        self.messages += 1

    def reply(self, req: Request, size: int, *, nfds: int = 0) -> tuple[bytes, list[int]]:
        """The answer to ``req``: exactly ``size`` payload bytes and ``nfds`` fds."""
        deadline = time.monotonic() + self.timeout
        fds: list[int] = []
        try:
            r, flags, n = HEADER.unpack(self.read_exact(HEADER.size, deadline, req.name, fds))
            if r != req:
                raise BackendError(f"answered {req.name} with request {r}")
            if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION or not (
                    flags & VHOST_USER_REPLY_MASK):
                raise BackendError(f"reply to {req.name} has flags {flags:#x}")
            if n != size:
                raise BackendError(f"reply to {req.name} has {n} payload bytes, "
                                   f"not {size}")
            payload = self.read_exact(n, deadline, req.name, fds) if n else b""
            if len(fds) != nfds:
                raise BackendError(f"reply to {req.name} came with {len(fds)} fds, "
                                   f"not {nfds}")
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        self.messages += 1
        return payload, fds

    def get_u64(self, req: Request) -> int:
        self.send(req)
        return int(_u64.unpack(self.reply(req, 8)[0])[0])


@dataclass
class _Ring:
    """One started queue: the fds the backend got (ours to close)."""

    kick: int  # KVM's ioeventfd (a dup) or our own eventfd: process_queue writes it
    call: int | None  # our eventfd the event loop watches, or None: the irqfd
    fast_kick: bool


def connect_socket(path: str, timeout: float) -> socket.socket:
    """A connected socket, or a one-line ConfigError saying why not."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except BaseException as e:
        s.close()
        reasons: dict[type[BaseException], str] = {
            FileNotFoundError: "does not exist",
            ConnectionRefusedError: "refuses connections (no backend listens on it)",
            TimeoutError: f"did not accept within {timeout:g} s",
            BlockingIOError: "has a full listen queue"}
        why = reasons.get(type(e))
        if why is None:
            if not isinstance(e, OSError):
                raise
            why = f"cannot be connected to ({e.strerror or e})"
        raise ConfigError(f"vhost-user socket {path!r} {why}") from None
    return s


class VhostUserFrontend(VirtioDevice):
    """A virtio device whose queues a vhost-user backend serves (see the module doc)."""

    def __init__(self, chan: Channel, model: Model, *, name: str, events: EventManager,
                 path: str = "", queue_size: int = 256, fast_path: bool = True,
                 mac: bytes | None = None, reconnect: float = 0.0) -> None:
        super().__init__()
        self.model, self.name, self.events, self.path = model, name, events, path
        self.fast_path, self.queue_size, self.mac = fast_path, queue_size, mac
        self.reconnect = reconnect if path else 0.0  # seconds to keep trying; 0: never
        self.timeout = chan.timeout
        self.device_type = model.device_type
        self.errors = OnceLog()
        self._chan: Channel | None = chan
        self._conn = 0  # connection generation: callbacks of an old socket do nothing
        self._gen = 0  # activation generation: callbacks of old rings do nothing
        self._rings: list[_Ring | None] = []
        self._inflight: tuple[int, int, int] | None = None  # fd, size, offset
        self._activated = False
        self._retry: tuple[float, float] | None = None  # (give up at, next delay)
        self.kick_forwards = 0
        self.interrupt_forwards = 0
        self.fast_kicks = 0
        self.fast_interrupts = 0
        self.backend_errors = 0
        self.activations = 0
        self.reconnects = 0
        try:
            hs = self._handshake(chan)
        except BaseException:
            chan.close()
            self._chan = None
            raise
        (self.backend_features, self.protocol, self.features, self._config,
         self.queue_max_sizes) = hs
        self._rings = [None] * len(self.queue_max_sizes)
        self._watch(chan)

    # --- creation ------------------------------------------------------------------------
    def _handshake(self, ch: Channel) -> tuple[int, int, int, bytes, tuple[int, ...]]:
        """(backend features, protocol features, guest-visible features, config space,
        queue sizes) as this backend offers them."""
        m = self.model
        features = ch.get_u64(Request.GET_FEATURES)
        if not features & (1 << V.VIRTIO_F_VERSION_1):
            raise BackendError(f"offers features {features:#x} without VIRTIO_F_VERSION_1")
        protocol = 0
        if features & (1 << VHOST_USER_F_PROTOCOL_FEATURES):
            protocol = ch.get_u64(Request.GET_PROTOCOL_FEATURES) & WANTED_PROTOCOL
            ch.send(Request.SET_PROTOCOL_FEATURES, _u64.pack(protocol))
        queues = 1
        if protocol & (1 << ProtocolFeature.MQ):
            queues = ch.get_u64(Request.GET_QUEUE_NUM)
            if not 1 <= queues <= MAX_QUEUE_NUM:
                raise BackendError(f"says it has {queues} queues")
        if m.device_type == V.VIRTIO_ID_NET:
            queues = 2  # one rx/tx pair (GET_QUEUE_NUM counts pairs for net)
        visible = (features & (TRANSPORT_FEATURES | m.device_features)) | m.own_features
        if m.config_size:
            if not protocol & (1 << ProtocolFeature.CONFIG):
                raise BackendError("does not offer VHOST_USER_PROTOCOL_F_CONFIG (the "
                                   "device's configuration space is the backend's)")
            ch.send(Request.GET_CONFIG, struct.pack("<III", 0, m.config_size, 0)
                    + bytes(m.config_size))
            raw, _ = ch.reply(Request.GET_CONFIG, 12 + m.config_size)
            offset, size, _flags = struct.unpack_from("<III", raw)
            if (offset, size) != (0, m.config_size):
                raise BackendError(f"answered GET_CONFIG with offset {offset} size {size}")
            config = bytearray(raw[12:])
        else:
            config = bytearray((self.mac or bytes(6))
                               + struct.pack("<HH", V.VIRTIO_NET_S_LINK_UP, 1))
        if m.device_type == V.VIRTIO_ID_BLOCK:
            if visible & (1 << VIRTIO_BLK_F_MQ):
                said = int.from_bytes(config[VIRTIO_BLK_CONFIG_NUM_QUEUES:][:2], "little")
                if said == 0:
                    raise BackendError("offers VIRTIO_BLK_F_MQ with num_queues 0")
                queues = min(queues, said, m.max_queues)
                config[VIRTIO_BLK_CONFIG_NUM_QUEUES:VIRTIO_BLK_CONFIG_NUM_QUEUES + 2] = (
                    queues.to_bytes(2, "little"))
            else:
                queues = 1
        if not protocol & (1 << ProtocolFeature.REPLY_ACK):
            ch.get_u64(Request.GET_FEATURES)  # a round trip: SET_PROTOCOL_FEATURES arrived
        return (features, protocol, visible, bytes(config),
                (self.queue_size,) * min(queues, m.max_queues))

    def _has(self, f: ProtocolFeature) -> bool:
        return bool(self.protocol & (1 << f))

    # --- the connection ------------------------------------------------------------------
    def _watch(self, ch: Channel) -> None:
        self._conn += 1
        self.events.add(ch.fileno(), functools.partial(self._on_socket, self._conn),
                        select.EPOLLIN | select.EPOLLRDHUP)

    def _on_socket(self, conn: int, fd: int, ev: int) -> None:
        """The socket is readable outside a request: the backend closed it (or sent
        what no one asked for, which is as bad)."""
        with self.core_lock:
            ch = self._chan
            if ch is None or conn != self._conn:
                return
            why = ch.unasked()
            if why is not None:
                self._lost(BackendError(why))

    def _where(self) -> str:
        return f"vhost-user backend {self.path or self.name}"

    def _lost(self, e: BackendError) -> None:
        """The backend is unusable (seen on the event loop). Without ``reconnect`` the
        device needs a reset (logged once by the core); with it, the rings stay as they
        are while a successor is awaited. Called with ``core_lock`` held."""
        self.backend_errors += 1
        self._disconnect()
        if self.reconnect > 0:
            self.errors.warn("lost", f"{self.name}: {self._where()}: {e}; reconnecting "
                             f"for up to {self.reconnect:g} s")
            self._start_retrying()
            return
        self._teardown_rings()
        self.fail(0, BackendError(f"{self._where()}: {e}"))

    def _disconnect(self) -> None:
        ch, self._chan = self._chan, None
        if ch is not None:
            self.events.remove(ch.fileno())
            ch.close()

    def _drop(self) -> None:
        """Give up on the backend and on the rings it had."""
        self._teardown_rings()
        self._disconnect()
        if self.reconnect > 0:
            self._start_retrying()  # so the driver's next reset finds a successor

    # --- reconnecting (``reconnect`` > 0) ------------------------------------------------
    def _start_retrying(self) -> None:
        if self._retry is None:
            self._retry = (time.monotonic() + self.reconnect, 0.05)
            self.events.call_later(0.05, functools.partial(self._try_reconnect, self._conn))

    def _try_reconnect(self, conn: int) -> None:
        """One attempt (event loop); on failure the next after twice the wait (at most
        1 s), until ``reconnect`` seconds have passed. A successor must offer what the
        guest was given; running rings are resumed from the used index in guest memory
        and the inflight region kept from the predecessor, which the backend serves
        again first."""
        with self.core_lock:
            if self._chan is not None or conn != self._conn or self._retry is None:
                return
            give_up, delay = self._retry
            try:
                ch = Channel(connect_socket(self.path, self.timeout), self.timeout)
            except ConfigError as e:
                self._retry_later(give_up, delay, str(e))
                return
            try:
                got = self._handshake(ch)
                want = (self.backend_features, self.protocol, self.features, self._config,
                        self.queue_max_sizes)
                if got != want:
                    raise BackendError("came back offering other features, queues or "
                                       "configuration than the guest was given")
                self._chan = ch
                if self._activated:
                    assert self.mem is not None and self.irq is not None
                    self._start(self.mem, self.queues, self.irq, resume=True)
            except (BackendError, OSError) as e:
                if self._chan is None:
                    ch.close()
                self._disconnect()
                self._retry_later(give_up, delay, str(e))
                return
            self._retry = None
            self.reconnects += 1
            self._watch(ch)
            what = "its rings resumed" if self._activated else "connected"
            self.errors.warn("reconnected", f"{self.name}: {self._where()} is back, {what}")

    def _retry_later(self, give_up: float, delay: float, why: str) -> None:
        if time.monotonic() + delay > give_up:
            self._retry = None
            self._teardown_rings()
            e = BackendError(f"{self._where()} did not come back within "
                             f"{self.reconnect:g} s ({why})")
            if self._activated:
                self.fail(0, e)  # the running device needs a reset
            else:
                self.errors.warn("gone", f"{self.name}: {e}")
            return
        self._retry = (give_up, min(2 * delay, 1.0))
        self.events.call_later(delay, functools.partial(self._try_reconnect, self._conn))

    def _set(self, req: Request, payload: bytes = b"", fds: list[int] | None = None) -> None:
        """A request with no answer of its own: with REPLY_ACK, wait for its status."""
        ch = self._chan
        assert ch is not None
        ack = self._has(ProtocolFeature.REPLY_ACK)
        ch.send(req, payload, fds, need_reply=ack)
        if ack:
            status = int(_u64.unpack(ch.reply(req, 8)[0])[0])
            if status:
                raise BackendError(f"refused {req.name} (status {status:#x})")

    # --- VirtioDevice --------------------------------------------------------------------
    def config_bytes(self) -> bytes:
        return self._config

    def write_config(self, offset: int, size: int, value: int) -> None:
        self.errors.warn("config-write", f"{self.name}: the guest wrote config offset "
                         f"{offset:#x}; config space is read-only here (not forwarded)")

    def activate(self, mem: GuestMemory, queues: list[Virtqueue | None],
                 irq: VirtioInterrupt) -> None:
        """DRIVER_OK: hand the rings to the backend. A failure raises BackendError
        (the core sets NEEDS_RESET) with the connection already dropped."""
        super().activate(mem, queues, irq)
        self._gen += 1
        self.activations += 1
        try:
            if self._chan is None:
                raise BackendError("the backend is gone" + (
                    " (reconnecting)" if self._retry is not None else ""))
            self._start(mem, queues, irq)
        except BackendError as e:
            if self._chan is not None:
                self.backend_errors += 1
            self._drop()
            raise BackendError(f"{self._where()}: {e}") from None
        except OSError as e:  # our own eventfds (EMFILE): the same outcome, said as such
            self._drop()
            raise BackendError(f"{self.name}: cannot set up the rings: {e}") from None

    def _start(self, mem: GuestMemory, queues: list[Virtqueue | None],
               irq: VirtioInterrupt, resume: bool = False) -> None:
        """The activation messages. ``resume``: the same rings, to a successor backend,
        each from the used index the guest's memory shows (its predecessor's inflight
        region says what was taken and not used)."""
        self._activated = True
        pf = self.backend_features & (1 << VHOST_USER_F_PROTOCOL_FEATURES)
        self._set(Request.SET_OWNER)
        self._set(Request.SET_FEATURES, _u64.pack((self.acked & self.backend_features) | pf))
        regions = list(mem.regions())
        if not 1 <= len(regions) <= VHOST_USER_MAX_RAM_SLOTS:
            raise BackendError(f"guest RAM has {len(regions)} regions")
        table = struct.pack("<II", len(regions), 0) + b"".join(
            struct.pack("<QQQQ", r.guest_addr, r.size, r.host_addr, 0) for r in regions)
        self._set(Request.SET_MEM_TABLE, table, [r.fd for r in regions])
        if self._has(ProtocolFeature.INFLIGHT_SHMFD):
            if resume and self._inflight is not None:
                fd, size, offset = self._inflight
                self._set(Request.SET_INFLIGHT_FD, INFLIGHT.pack(
                    size, offset, len(self._rings), self.queue_size), [fd])
            else:
                self._set_inflight()
        direct = irq if self.fast_path and isinstance(irq, QueueEventfds) else None
        if not resume:
            self.fast_kicks = self.fast_interrupts = 0
        started = []
        for i, vq in enumerate(queues):
            if vq is None:
                continue
            old = self._rings[i]
            if resume and old is None:
                continue  # a ring the predecessor never had
            self._set(Request.SET_VRING_NUM, _state.pack(i, vq.size))
            self._set(Request.SET_VRING_BASE, _state.pack(
                i, vq.ring_used_idx() if resume else 0))
            self._set(Request.SET_VRING_ADDR, struct.pack(
                "<IIQQQQ", i, 0, self._uaddr(vq.desc), self._uaddr(vq.used),
                self._uaddr(vq.avail), 0))
            if old is not None and resume:
                ring = old
            else:
                kick = direct.notify_fd(i) if direct is not None else None
                ring = self._rings[i] = _Ring(
                    kick if kick is not None else os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC),
                    None, kick is not None)
            irqfd = direct.interrupt_fd(i) if direct is not None and ring.call is None else None
            if irqfd is not None:
                try:
                    self._set(Request.SET_VRING_CALL, _u64.pack(i), [irqfd])
                finally:
                    os.close(irqfd)  # the backend has its own; the VMM never writes it
                self.fast_interrupts += not resume
            else:
                if ring.call is None:
                    ring.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
                    self.events.add(ring.call, functools.partial(self._on_call, i, self._gen))
                self._set(Request.SET_VRING_CALL, _u64.pack(i), [ring.call])
            self._set(Request.SET_VRING_KICK, _u64.pack(i), [ring.kick])
            self.fast_kicks += ring.fast_kick and not resume
            started.append(i)
        if pf:
            for i in started:
                self._set(Request.SET_VRING_ENABLE, _state.pack(i, 1))
        if not self._has(ProtocolFeature.REPLY_ACK):
            ch = self._chan
            assert ch is not None
            if ch.get_u64(Request.GET_FEATURES) != self.backend_features:  # the barrier
                raise BackendError("changed its features while running")
        if resume:
            # Requests the guest made available before (or while) the predecessor died
            # wait in the rings, and the guest may not kick again (it is waiting for
            # their completions): kick each resumed ring once so the successor looks
            # (as QEMU does at vhost-user-blk start; a spurious kick costs one ring check).
            for i in started:
                resumed = self._rings[i]
                assert resumed is not None
                os.eventfd_write(resumed.kick, 1)

    def _uaddr(self, gpa: int) -> int:
        """The user address in this process of a guest-physical address (the
        Virtqueue has checked that the ring lies in RAM)."""
        assert self.mem is not None
        for r in self.mem.regions():
            if r.guest_addr <= gpa < r.end:
                return r.host_addr + gpa - r.guest_addr
        raise BackendError(f"ring address {gpa:#x} is not in guest RAM")

    def _set_inflight(self) -> None:
        """GET_INFLIGHT_FD, then SET_INFLIGHT_FD with what came back (the region a
        successor backend recovers from; kept until the device is reset)."""
        ch = self._chan
        assert ch is not None
        nq, qs = len(self._rings), self.queue_size
        ch.send(Request.GET_INFLIGHT_FD, INFLIGHT.pack(0, 0, nq, qs))
        raw, fds = ch.reply(Request.GET_INFLIGHT_FD, INFLIGHT.size, nfds=1)
        fd = fds[0]
        try:
            size, offset, _nq, _qs = INFLIGHT.unpack(raw)
            st = os.fstat(fd)
            if (not queue_region_size(qs) * nq <= size <= MAX_INFLIGHT or offset % 4096
                    or not stat.S_ISREG(st.st_mode) or st.st_size < offset + size):
                raise BackendError(f"inflight region of {size} bytes at {offset:#x} (a file of "
                                   f"{st.st_size}) for {nq} queues of {qs}")
            self._set(Request.SET_INFLIGHT_FD, INFLIGHT.pack(size, offset, nq, qs), [fd])
        except BaseException:
            os.close(fd)
            raise
        self._close_inflight()
        self._inflight = (fd, size, offset)

    def _close_inflight(self) -> None:
        if self._inflight is not None:
            os.close(self._inflight[0])
            self._inflight = None

    def _teardown_rings(self) -> None:
        for i, ring in enumerate(self._rings):
            if ring is None:
                continue
            self._rings[i] = None
            os.close(ring.kick)
            if ring.call is not None:
                self.events.remove(ring.call)
                os.close(ring.call)

    def _on_call(self, index: int, gen: int, fd: int, ev: int) -> None:
        """The fallback: the backend signalled our call eventfd; raise the interrupt."""
        with self.core_lock:
            ring = self._rings[index] if gen == self._gen else None
            if ring is None or ring.call is None:
                return
            try:
                os.eventfd_read(ring.call)
            except BlockingIOError:
                return
            self.interrupt_forwards += 1
            vq = self.queues[index] if index < len(self.queues) else None
            if vq is not None and self.irq is not None:
                self.irq.signal_queue(vq)

    def process_queue(self, index: int) -> None:
        """A kick the VMM saw (no ioeventfd handed over, or one that exited): pass it on
        (while reconnecting too: the successor finds it pending)."""
        ring = self._rings[index] if index < len(self._rings) else None
        if ring is None:
            return
        os.eventfd_write(ring.kick, 1)
        self.kick_forwards += 1

    def reset(self) -> None:
        """The driver reset the device: stop the backend's rings (GET_VRING_BASE), reset
        it, and let go of the rings' fds. A failing backend is dropped, never raised."""
        if self._chan is not None and self._activated:
            try:
                for i, ring in enumerate(self._rings):
                    if ring is not None:
                        self._get_vring_base(i)
                self._set(Request.RESET_DEVICE if self._has(ProtocolFeature.RESET_DEVICE)
                          else Request.RESET_OWNER)
            except BackendError as e:
                self.backend_errors += 1
                self.errors.warn("reset", f"{self.name}: {self._where()}: {e}; dropped")
                self._drop()
        self._activated = False
        self._gen += 1
        self._teardown_rings()
        self._close_inflight()
        super().reset()

    def _get_vring_base(self, index: int) -> int:
        ch = self._chan
        assert ch is not None
        ch.send(Request.GET_VRING_BASE, _state.pack(index, 0))
        i, base = _state.unpack(ch.reply(Request.GET_VRING_BASE, 8)[0])
        if i != index:
            raise BackendError(f"answered GET_VRING_BASE for ring {index} with ring {i}")
        return int(base)

    def close(self) -> None:
        """The VM is going away (after its vCPU stopped)."""
        with self.core_lock:
            self.reconnect = 0.0
            self._retry = None
            self._drop()
            self._close_inflight()
            self.mem, self.queues, self.irq = None, [], None  # no views into guest RAM

    @property
    def connected(self) -> bool:
        return self._chan is not None

    def metrics(self) -> dict[str, int]:
        ch = self._chan
        return {"kick_forwards": self.kick_forwards,
                "interrupt_forwards": self.interrupt_forwards,
                "fast_kicks": self.fast_kicks, "fast_interrupts": self.fast_interrupts,
                "activations": self.activations, "backend_errors": self.backend_errors,
                "reconnects": self.reconnects,
                "backend_messages": 0 if ch is None else ch.messages,
                "connected": int(ch is not None)}


__all__ = ["BLK", "NET", "Channel", "Model", "VhostUserFrontend", "connect_socket"]
