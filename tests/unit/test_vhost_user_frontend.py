"""The vhost-user front end against a scripted fake backend over a socketpair: the
messages it sends and in what order, and every kind of bad answer — wrong request,
wrong flags, short or long payloads, absurd queue counts and config sizes, stray fds,
silence, EOF, unasked messages. Each ends in a bounded time as a one-line error at
creation or DEVICE_NEEDS_RESET at run time; nothing raises out of the device, and
every fd is closed. Also the transport hooks (ioeventfd hand-over and reclaim, the
MSI-X irqfd route following the table) and the whole data path against pyvmm's own
backend in this process."""

from __future__ import annotations

import array
import contextlib
import gc
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from pyvmm.backends.block import RawBlockBackend
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.transport.pci import VirtioPciDevice
from pyvmm.errors import BackendError, ConfigError
from pyvmm.event import EventManager
from pyvmm.irq.msi import MsiMessage, RecordingMsiSink
from pyvmm.memory import GuestMemory
from pyvmm.testing import VirtioDriver
from pyvmm.uapi import virtio as V
from pyvmm.vhost_user.backend import VhostUserServer
from pyvmm.vhost_user.frontend import (
    BLK,
    NET,
    Channel,
    VhostUserFrontend,
    connect_socket,
)
from pyvmm.vhost_user.inflight import queue_region_size
from pyvmm.vhost_user.protocol import (
    HEADER,
    INFLIGHT,
    VHOST_USER_F_PROTOCOL_FEATURES,
    VHOST_USER_NEED_REPLY_MASK,
    VHOST_USER_REPLY_MASK,
    VHOST_USER_VERSION,
    ProtocolFeature,
    Request,
)

R = Request
FEATURES = ((1 << V.VIRTIO_F_VERSION_1) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
            | (1 << V.VIRTIO_BLK_F_FLUSH) | (1 << V.VIRTIO_RING_F_EVENT_IDX)
            | (1 << 34))  # VIRTIO_F_RING_PACKED: offered, never passed to the guest
PROTOCOL = sum(1 << f for f in ProtocolFeature)
TIMEOUT = 0.3


class Hangup(bytes):
    """A scripted answer: send these bytes, then close the connection."""


Reply = Callable[[int, int, bytes], bytes | None]  # (request, flags, payload) -> raw or None


def open_fds() -> dict[int, str]:
    """This process's fds and what they are (collected garbage first)."""
    gc.collect()
    out = {}
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out[int(name)] = os.readlink(f"/proc/self/fd/{name}")
    return out


def raw_reply(req: int, payload: bytes, flags: int = VHOST_USER_VERSION | VHOST_USER_REPLY_MASK
              ) -> bytes:
    return HEADER.pack(req, flags, len(payload)) + payload


class FakeBackend:
    """Answers like a well-behaved backend unless ``script`` says otherwise for a
    request: a function returning the raw bytes to send (None: say nothing)."""

    def __init__(self, sock: socket.socket, *, features: int = FEATURES,
                 protocol: int = PROTOCOL, queue_num: int = 1,
                 config: bytes = bytes(range(60)), script: dict[int, Reply] | None = None
                 ) -> None:
        self.sock, self.features, self.protocol = sock, features, protocol
        self.queue_num, self.config = queue_num, config
        self.script = dict(script or {})
        self.log: list[tuple[int, int, bytes, int]] = []  # request, flags, payload, fds
        self.inflight_fds: list[int] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def requests(self) -> list[int]:
        return [r for r, *_ in self.log]

    def payloads(self, req: int) -> list[bytes]:
        return [p for r, _, p, _ in self.log if r == req]

    def _recv(self) -> tuple[int, int, bytes, int] | None:
        raw, anc, _, _ = self.sock.recvmsg(HEADER.size, socket.CMSG_SPACE(64))
        if len(raw) < HEADER.size:
            return None
        nfds = 0
        for level, typ, data in anc:
            if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(data[:len(data) - len(data) % 4])
                nfds += len(fds)
                for fd in fds:
                    os.close(fd)  # the fake keeps nothing
        req, flags, size = HEADER.unpack(raw)
        payload = self.sock.recv(size, socket.MSG_WAITALL) if size else b""
        return req, flags, payload, nfds

    def _answer(self, req: int, flags: int, payload: bytes) -> tuple[bytes, list[int]]:
        u64 = struct.Struct("<Q")
        fds: list[int] = []
        if req == R.GET_FEATURES:
            out = u64.pack(self.features)
        elif req == R.GET_PROTOCOL_FEATURES:
            out = u64.pack(self.protocol)
        elif req == R.GET_QUEUE_NUM:
            out = u64.pack(self.queue_num)
        elif req == R.GET_CONFIG:
            off, size, _ = struct.unpack_from("<III", payload)
            out = struct.pack("<III", off, size, 0) + self.config[off:off + size]
        elif req == R.GET_VRING_BASE:
            out = struct.pack("<II", struct.unpack("<II", payload)[0], 0)
        elif req == R.GET_INFLIGHT_FD:
            _, _, nq, qs = INFLIGHT.unpack(payload)
            size = queue_region_size(qs) * nq
            fd = os.memfd_create("fake-inflight")
            os.ftruncate(fd, size)
            fds = [fd]
            out = INFLIGHT.pack(size, 0, nq, qs)
        elif flags & VHOST_USER_NEED_REPLY_MASK:
            out = u64.pack(0)
        else:
            return b"", []
        return raw_reply(req, out), fds

    def _run(self) -> None:
        try:
            while True:
                m = self._recv()
                if m is None:
                    return
                self.log.append(m)
                req, flags, payload, _ = m
                if req in self.script:
                    data, fds = self.script[req](req, flags, payload), []
                    if data is None:
                        continue
                else:
                    data, fds = self._answer(req, flags, payload)
                if data:
                    socket.send_fds(self.sock, [data], fds) if fds else self.sock.sendall(data)
                for fd in fds:
                    os.close(fd)
                if isinstance(data, Hangup):
                    self.sock.shutdown(socket.SHUT_WR)
        except OSError:
            return

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.thread.join(5)
        self.sock.close()


class Rig:
    """A front end (made by ``make``), its fake backend, guest memory and event loop."""

    def __init__(self, **fake: Any) -> None:
        self.events = EventManager()
        self.mem = GuestMemory([(0, 4 << 20)])
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.fake = FakeBackend(b, **fake)
        self.chan_sock = a
        self.dev: VhostUserFrontend | None = None

    def make(self, model: Any = BLK, **kw: Any) -> VhostUserFrontend:
        kw.setdefault("path", "fake.sock")
        self.dev = VhostUserFrontend(Channel(self.chan_sock, TIMEOUT), model, name="vu0",
                                     events=self.events, **kw)
        return self.dev

    def close(self) -> None:
        if self.dev is not None:
            self.dev.close()
        else:
            self.chan_sock.close()
        self.fake.close()
        self.mem.close()
        self.events.close()


@pytest.fixture
def rig_factory() -> Iterator[Callable[..., Rig]]:
    """Rigs closed after the test, and the process's fds counted around all of it."""
    before = open_fds()
    rigs: list[Rig] = []

    def make(**fake: Any) -> Rig:
        rigs.append(Rig(**fake))
        return rigs[-1]

    yield make
    for r in rigs:
        r.close()
    after = open_fds()
    leaked = {fd: what for fd, what in after.items() if before.get(fd) != what}
    assert not leaked, f"fds left open: {leaked}"


# --- creation -------------------------------------------------------------------------------
def test_handshake_messages_features_and_config(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    dev = rig.make()
    assert rig.fake.requests() == [R.GET_FEATURES, R.GET_PROTOCOL_FEATURES,
                                   R.SET_PROTOCOL_FEATURES, R.GET_QUEUE_NUM, R.GET_CONFIG]
    asked = struct.unpack("<Q", rig.fake.payloads(R.SET_PROTOCOL_FEATURES)[0])[0]
    assert asked == PROTOCOL & ((1 << 3) | (1 << 9) | (1 << 0) | (1 << 12) | (1 << 13))
    # transport bits the front end cannot carry (packed ring) and vhost's own are dropped
    assert dev.features == FEATURES & ~((1 << 34) | (1 << VHOST_USER_F_PROTOCOL_FEATURES))
    assert dev.device_type == V.VIRTIO_ID_BLOCK and dev.queue_max_sizes == (256,)
    assert dev.config_bytes() == bytes(range(60))  # the backend's config space
    assert dev.read_config(8, 4) == int.from_bytes(bytes(range(8, 12)), "little")


def test_net_config_is_the_vmms_own(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(queue_num=1, features=(1 << 32) | (1 << 30) | (1 << 15) | (1 << 17))
    dev = rig.make(NET, mac=bytes.fromhex("525400123456"))
    assert R.GET_CONFIG not in rig.fake.requests()
    assert dev.config_bytes()[:8] == bytes.fromhex("525400123456") + b"\x01\x00"
    assert dev.queue_max_sizes == (256, 256)  # rx, tx: no control queue
    assert dev.features & (1 << V.VIRTIO_NET_F_MRG_RXBUF)
    assert not dev.features & (1 << 17)  # VIRTIO_NET_F_CTRL_VQ is the VMM's to give
    assert dev.features & (1 << V.VIRTIO_NET_F_MAC) and dev.features & (1 << 16)


def test_without_protocol_features_a_round_trip_confirms(rig_factory: Callable[..., Rig]
                                                         ) -> None:
    rig = rig_factory(features=1 << 32, config=b"")
    dev = rig.make(NET, mac=bytes(6))
    assert rig.fake.requests() == [R.GET_FEATURES, R.GET_FEATURES]
    assert dev.protocol == 0


def _hdr_only(req: int, flags: int, payload: bytes) -> bytes:
    return raw_reply(req, b"\0" * 4)


BAD_HANDSHAKES: list[tuple[str, dict[str, Any], str]] = [
    ("wrong request id", {"script": {R.GET_FEATURES: lambda r, f, p: raw_reply(
        R.GET_PROTOCOL_FEATURES, bytes(8))}}, "answered GET_FEATURES with request 15"),
    ("short payload", {"script": {R.GET_FEATURES: _hdr_only}},
     "reply to GET_FEATURES has 4 payload bytes, not 8"),
    ("huge payload", {"script": {R.GET_FEATURES: lambda r, f, p: HEADER.pack(
        r, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, 1 << 31)}},
     "has 2147483648 payload bytes"),
    ("no reply flag", {"script": {R.GET_FEATURES: lambda r, f, p: raw_reply(
        r, bytes(8), VHOST_USER_VERSION)}}, "reply to GET_FEATURES has flags 0x1"),
    ("wrong version", {"script": {R.GET_FEATURES: lambda r, f, p: raw_reply(
        r, bytes(8), 2 | VHOST_USER_REPLY_MASK)}}, "has flags 0x6"),
    ("no VERSION_1", {"features": 1 << 30}, "without VIRTIO_F_VERSION_1"),
    ("no queues", {"queue_num": 0}, "says it has 0 queues"),
    ("absurd queues", {"queue_num": 1 << 40}, "says it has 1099511627776 queues"),
    ("config size", {"script": {R.GET_CONFIG: lambda r, f, p: raw_reply(
        r, struct.pack("<III", 0, 4096, 0) + bytes(4096))}},
     "reply to GET_CONFIG has 4108 payload bytes, not 72"),
    ("config offset", {"script": {R.GET_CONFIG: lambda r, f, p: raw_reply(
        r, struct.pack("<III", 8, 60, 0) + bytes(60))}},
     "answered GET_CONFIG with offset 8 size 60"),
    ("no CONFIG", {"protocol": 1 << 3}, "VHOST_USER_PROTOCOL_F_CONFIG"),
    ("silence", {"script": {R.GET_QUEUE_NUM: lambda r, f, p: None}},
     f"no answer to GET_QUEUE_NUM within {TIMEOUT:g} s"),
    ("EOF", {"script": {R.GET_PROTOCOL_FEATURES: lambda r, f, p: Hangup(b"\0\0\0")}},
     "closed the connection during GET_PROTOCOL_FEATURES"),
]


@pytest.mark.parametrize("what,fake,text", BAD_HANDSHAKES, ids=[b[0] for b in BAD_HANDSHAKES])
def test_bad_handshake_is_one_error_in_bounded_time(rig_factory: Callable[..., Rig], what: str,
                                                    fake: dict[str, Any], text: str) -> None:
    rig = rig_factory(**fake)
    t0 = time.monotonic()
    with pytest.raises(BackendError) as e:
        rig.make()
    assert time.monotonic() - t0 < 4 * TIMEOUT
    assert text in str(e.value) and "\n" not in str(e.value)
    assert rig.chan_sock.fileno() == -1  # the front end closed its end


def test_stray_fds_in_a_reply_are_closed(rig_factory: Callable[..., Rig]) -> None:
    def with_fds(r: int, f: int, p: bytes) -> None:
        fds = [os.eventfd(0) for _ in range(3)]
        socket.send_fds(rig.fake.sock, [raw_reply(r, struct.pack("<Q", FEATURES))], fds)
        for fd in fds:
            os.close(fd)

    rig = rig_factory(script={R.GET_FEATURES: with_fds})
    with pytest.raises(BackendError, match="came with 3 fds, not 0"):
        rig.make()
    # rig_factory counts the fds at the end: the three were closed


def test_socket_errors_are_one_line_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        connect_socket(str(tmp_path / "none"), 1)
    stale = tmp_path / "stale"
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(stale))
    s.close()
    with pytest.raises(ConfigError, match="refuses connections"):
        connect_socket(str(stale), 1)
    with pytest.raises(ConfigError, match="cannot be connected to"):
        connect_socket(str(tmp_path / ("x" * 120)), 1)


# --- activation and reset -------------------------------------------------------------------
def test_activation_sends_the_rings_with_user_addresses(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    dev = rig.make()
    n0 = len(rig.fake.log)
    drv = VirtioDriver(dev, rig.mem, features=dev.features & ~(1 << 29))
    assert not drv.needs_reset and drv.core.active
    reqs = rig.fake.requests()[n0:]
    assert reqs == [R.SET_OWNER, R.SET_FEATURES, R.SET_MEM_TABLE, R.GET_INFLIGHT_FD,
                    R.SET_INFLIGHT_FD, R.SET_VRING_NUM, R.SET_VRING_BASE, R.SET_VRING_ADDR,
                    R.SET_VRING_CALL, R.SET_VRING_KICK, R.SET_VRING_ENABLE]
    log = rig.fake.log[n0:]
    assert all(f & VHOST_USER_NEED_REPLY_MASK for r, f, _, _ in log if r != R.GET_INFLIGHT_FD)
    acked = struct.unpack("<Q", rig.fake.payloads(R.SET_FEATURES)[0])[0]
    assert acked == (dev.features & ~(1 << 29)) | (1 << VHOST_USER_F_PROTOCOL_FEATURES)
    region = next(rig.mem.regions())
    table = rig.fake.payloads(R.SET_MEM_TABLE)[0]
    assert struct.unpack_from("<IIQQQQ", table) == (1, 0, 0, 4 << 20, region.host_addr, 0)
    assert [n for r, _, _, n in log if r == R.SET_MEM_TABLE] == [1]  # the memfd
    q = drv.queues[0]
    addr = struct.unpack("<IIQQQQ", rig.fake.payloads(R.SET_VRING_ADDR)[0])
    assert addr == (0, 0, region.host_addr + q.desc, region.host_addr + q.used,
                    region.host_addr + q.avail, 0)
    assert [n for r, _, _, n in log if r in (R.SET_VRING_CALL, R.SET_VRING_KICK)] == [1, 1]
    # A unit test has no KVM: both directions are forwarded by the VMM, and counted.
    m = dev.metrics()
    assert m["fast_kicks"] == m["fast_interrupts"] == 0
    drv.kick(0)
    assert dev.metrics()["kick_forwards"] == 1
    n1 = len(rig.fake.log)
    drv.core.set_status(0)  # reset: stop the ring, reset the backend
    assert rig.fake.requests()[n1:] == [R.GET_VRING_BASE, R.RESET_DEVICE]


def test_reset_without_reset_device_uses_reset_owner(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory(protocol=(1 << 3) | (1 << 9))
    dev = rig.make()
    drv = VirtioDriver(dev, rig.mem)
    n = len(rig.fake.log)
    drv.core.set_status(0)
    assert rig.fake.requests()[n:] == [R.GET_VRING_BASE, R.RESET_OWNER]


def _silent(r: int, f: int, p: bytes) -> None:
    return None


BAD_STARTS: list[tuple[str, int, Reply, str]] = [
    ("refused", R.SET_MEM_TABLE, lambda r, f, p: raw_reply(r, struct.pack("<Q", 1)),
     "refused SET_MEM_TABLE (status 0x1)"),
    ("silent ack", R.SET_VRING_ADDR, _silent, f"no answer to SET_VRING_ADDR within {TIMEOUT:g} s"),
    ("wrong ack", R.SET_VRING_KICK, lambda r, f, p: raw_reply(R.SET_VRING_CALL, bytes(8)),
     "answered SET_VRING_KICK with request 13"),
    ("short ack", R.SET_OWNER, _hdr_only, "reply to SET_OWNER has 4 payload bytes"),
    ("inflight without fd", R.GET_INFLIGHT_FD, lambda r, f, p: raw_reply(
        r, INFLIGHT.pack(4096, 0, 1, 256)), "came with 0 fds, not 1"),
]


@pytest.mark.parametrize("what,req,reply,text", BAD_STARTS, ids=[b[0] for b in BAD_STARTS])
def test_bad_answer_at_driver_ok_means_needs_reset(rig_factory: Callable[..., Rig], what: str,
                                                   req: int, reply: Reply, text: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    rig = rig_factory(script={req: reply})
    dev = rig.make()
    t0 = time.monotonic()
    drv = VirtioDriver(dev, rig.mem)  # DRIVER_OK: nothing raises out of the device
    assert time.monotonic() - t0 < 4 * TIMEOUT
    assert drv.needs_reset and not drv.core.active and drv.core.bugs == 0
    assert drv.irq.config == 1  # the driver is told
    assert not dev.connected and dev.metrics()["backend_errors"] == 1
    lines = [r.getMessage() for r in caplog.records if text in r.getMessage()]
    assert len(lines) == 1 and "DEVICE_NEEDS_RESET" in lines[0]
    drv.kick(0)  # ignored, and never reaches the dead backend
    drv.core.set_status(0)
    assert drv.core.status == 0
    # A later bring-up fails at once (no backend), the same way.
    drv2 = VirtioDriver(dev, rig.mem)
    assert drv2.needs_reset


def test_bad_inflight_region_means_needs_reset(rig_factory: Callable[..., Rig]) -> None:
    def tiny(r: int, f: int, p: bytes) -> None:
        fd = os.memfd_create("tiny")
        socket.send_fds(rig.fake.sock, [raw_reply(r, INFLIGHT.pack(1 << 40, 0, 1, 256))], [fd])
        os.close(fd)

    rig = rig_factory(script={R.GET_INFLIGHT_FD: tiny})
    drv = VirtioDriver(rig.make(), rig.mem)
    assert drv.needs_reset and drv.core.bugs == 0


def test_bad_answer_at_reset_drops_the_backend_quietly(rig_factory: Callable[..., Rig],
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    rig = rig_factory(script={R.GET_VRING_BASE: lambda r, f, p: raw_reply(
        r, struct.pack("<II", 7, 0))})
    dev = rig.make()
    drv = VirtioDriver(dev, rig.mem)
    drv.core.set_status(0)  # must not raise
    assert drv.core.status == 0 and not dev.connected
    assert any("ring 0 with ring 7" in r.getMessage() for r in caplog.records)


def test_eof_on_the_event_loop_means_needs_reset(rig_factory: Callable[..., Rig],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    rig = rig_factory()
    dev = rig.make()
    drv = VirtioDriver(dev, rig.mem)
    assert drv.core.active
    rig.fake.sock.shutdown(socket.SHUT_RDWR)  # the backend died
    deadline = time.monotonic() + 5
    while dev.connected and time.monotonic() < deadline:
        rig.events.run_once(0.05)
    assert not dev.connected and drv.needs_reset and drv.irq.config == 1
    lines = [r.getMessage() for r in caplog.records if "closed the connection" in r.getMessage()]
    assert len(lines) == 1
    assert rig.events.bugs == rig.events.faults == 0 and drv.core.bugs == 0


def test_unasked_message_means_needs_reset(rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    dev = rig.make()
    drv = VirtioDriver(dev, rig.mem)
    rig.fake.sock.sendall(raw_reply(R.GET_FEATURES, bytes(8)))
    for _ in range(20):
        rig.events.run_once(0.05)
        if not dev.connected:
            break
    assert drv.needs_reset and dev.metrics()["connected"] == 0


def test_fallback_interrupt_is_forwarded_from_the_event_loop(rig_factory: Callable[..., Rig]
                                                             ) -> None:
    """The backend writes our call eventfd: the event loop raises the queue interrupt."""
    rig = rig_factory()
    dev = rig.make()
    drv = VirtioDriver(dev, rig.mem)
    ring = dev._rings[0]
    assert ring is not None and ring.call is not None
    os.eventfd_write(ring.call, 1)  # what the backend does with its copy
    for _ in range(5):
        rig.events.run_once(0.02)
    assert drv.irq.queue == 1 and dev.metrics()["interrupt_forwards"] == 1


# --- reconnecting ---------------------------------------------------------------------------
def pump_until(rig: Rig, cond: Callable[[], bool], limit: float = 5) -> None:
    deadline = time.monotonic() + limit
    while not cond() and time.monotonic() < deadline:
        rig.events.run_once(0.02)


def test_reconnect_gives_up_after_its_time(rig_factory: Callable[..., Rig], tmp_path: Path,
                                           caplog: pytest.LogCaptureFixture) -> None:
    rig = rig_factory()
    dev = rig.make(path=str(tmp_path / "gone.sock"), reconnect=0.5)
    drv = VirtioDriver(dev, rig.mem)
    rig.fake.sock.shutdown(socket.SHUT_RDWR)
    pump_until(rig, lambda: not dev.connected)
    assert not drv.needs_reset  # the rings are kept while a successor is awaited
    t0 = time.monotonic()
    pump_until(rig, lambda: drv.needs_reset)
    assert drv.needs_reset and 0.3 < time.monotonic() - t0 < 2
    msgs = [r.getMessage() for r in caplog.records]
    assert sum("reconnecting for up to 0.5 s" in m for m in msgs) == 1
    assert sum("did not come back within 0.5 s" in m for m in msgs) == 1
    assert dev._rings == [None] and drv.core.bugs == 0


def test_reconnect_refuses_a_successor_that_offers_something_else(
        rig_factory: Callable[..., Rig], tmp_path: Path) -> None:
    rig = rig_factory()
    path = tmp_path / "b.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(4)
    successors: list[FakeBackend] = []

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            successors.append(FakeBackend(conn, features=FEATURES & ~(1 << 9)))  # no FLUSH

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        dev = rig.make(path=str(path), reconnect=0.6)
        drv = VirtioDriver(dev, rig.mem)
        rig.fake.sock.shutdown(socket.SHUT_RDWR)
        pump_until(rig, lambda: drv.needs_reset)
        assert drv.needs_reset and successors  # it was asked, and refused
        assert all(R.SET_MEM_TABLE not in f.requests() for f in successors)
    finally:
        listener.shutdown(socket.SHUT_RDWR)
        listener.close()
        t.join(5)
        for f in successors:
            f.close()


def test_reconnect_resumes_the_rings_from_the_used_index(rig_factory: Callable[..., Rig],
                                                         tmp_path: Path) -> None:
    rig = rig_factory()
    path = tmp_path / "b.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(path))
    listener.listen(1)
    listener.settimeout(10)
    got: list[FakeBackend] = []
    t = threading.Thread(target=lambda: got.append(FakeBackend(listener.accept()[0])),
                         daemon=True)  # the successor answers from its own thread
    try:
        dev = rig.make(path=str(path), reconnect=5)
        drv = VirtioDriver(dev, rig.mem)
        q = drv.queues[0]
        rig.mem.write(q.used + 2, struct.pack("<H", 7))  # the old backend had used 7
        t.start()
        rig.fake.sock.shutdown(socket.SHUT_RDWR)
        succ: FakeBackend | None = None
        try:
            pump_until(rig, lambda: dev.metrics()["reconnects"] == 1)
            t.join(5)
            succ = got[0]
            assert dev.connected and not drv.needs_reset and drv.core.active
            reqs = succ.requests()
            assert R.SET_INFLIGHT_FD in reqs and R.GET_INFLIGHT_FD not in reqs[5:]
            assert succ.payloads(R.SET_VRING_BASE) == [struct.pack("<II", 0, 7)]
            drv.kick(0)  # a kick the VMM sees still reaches the successor's eventfd
            assert dev.metrics()["kick_forwards"] == 1
        finally:
            dev.close()
            if succ is not None:
                succ.close()
    finally:
        listener.close()


# --- the transport hooks --------------------------------------------------------------------
class FakeFastPath:
    """The ioeventfd service as the transport sees it, without KVM: real eventfds."""

    def __init__(self) -> None:
        self.watched: dict[int, Callable[[], None]] = {}
        self.handles: list[int] = []

    def add(self, addr: int, length: int, callback: Callable[[], None],
            datamatch: int | None = None) -> object:
        fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.watched[fd] = callback
        self.handles.append(fd)
        return fd

    def remove(self, handle: object) -> None:
        assert isinstance(handle, int)
        self.watched.pop(handle, None)
        os.close(handle)

    def detach(self, handle: object) -> int:
        assert isinstance(handle, int)
        self.watched.pop(handle)
        return handle

    def reattach(self, handle: object) -> None:
        assert isinstance(handle, int)
        self.watched[handle] = lambda: None


class EventfdRecorder(RecordingMsiSink):
    """A vector sink with an eventfd, as the irqchip's irqfd vectors have."""

    def __init__(self) -> None:
        super().__init__()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK)
        self.routes: list[MsiMessage] = []

    def eventfd(self, msg: MsiMessage) -> int:
        self.routes.append(msg)
        return self.fd

    def route(self, msg: MsiMessage) -> None:
        self.routes.append(msg)


class VectorChip(RecordingMsiSink):
    def __init__(self) -> None:
        super().__init__()
        self.vectors: list[EventfdRecorder] = []

    def vector_sink(self) -> EventfdRecorder:
        self.vectors.append(EventfdRecorder())
        return self.vectors[-1]


def test_pci_transport_hands_over_ioeventfd_and_irqfd_and_takes_them_back(
        rig_factory: Callable[..., Rig]) -> None:
    rig = rig_factory()
    dev = rig.make()
    chip, fp = VectorChip(), FakeFastPath()
    vp = VirtioPciDevice(dev, rig.mem, chip, fast_path=fp)
    vp.bar_moved(0, 0xC0000000)
    try:
        # MSI-X on, queue 0 on vector 1 with a message programmed, then DRIVER_OK.
        vp.config.data[vp.msix.off + 3] |= 0x80
        vp.msix.write(16, 4, 0xFEE00000)
        vp.msix.write(24, 4, 0x45)
        drv_core = vp.core
        drv_core.set_status(V.VIRTIO_CONFIG_S_ACKNOWLEDGE | V.VIRTIO_CONFIG_S_DRIVER)
        drv_core.set_driver_features_word(1, 1)
        drv_core.set_status(0xB)
        q = drv_core.queues[0]
        q.size, q.desc, q.avail, q.used, q.ready, q.msix_vector = 16, 0x10000, 0x11000, \
            0x12000, True, 1
        drv_core.set_status(0xF)
        assert drv_core.active
        m = dev.metrics()
        assert m["fast_kicks"] == 1 and m["fast_interrupts"] == 1
        assert fp.handles[0] not in fp.watched  # the VMM no longer reads the kick eventfd
        vec = chip.vectors[1]
        assert vec.routes == [MsiMessage(0xFEE00000, 0x45)]
        vp.msix.write(24, 4, 0x46)  # the guest reprograms the vector: the route follows
        assert vec.routes[-1] == MsiMessage(0xFEE00000, 0x46)
        vp.write_bar(0, 0x14, 1, 0)  # reset through the common config
        assert fp.handles[0] in fp.watched  # the event loop watches it again
        assert dev._rings == [None]
    finally:
        vp.bar_moved(0, None)
        for v in chip.vectors:
            os.close(v.fd)


# --- the whole path against pyvmm's backend in this process --------------------------------
def test_data_path_against_pyvmms_backend(tmp_path: Path) -> None:
    img = tmp_path / "d.img"
    img.write_bytes(os.urandom(1 << 20))
    sock = str(tmp_path / "b.sock")
    bev = EventManager()
    server = VhostUserServer(bev)
    server.listen(sock, lambda: VirtioBlk(RawBlockBackend(str(img))))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            bev.run_once(0.02)

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    events = EventManager()
    try:
        with GuestMemory([(0, 4 << 20)]) as mem:
            dev = VhostUserFrontend(Channel(connect_socket(sock, 2), 2), BLK, name="vu0",
                                    events=events, path=sock)
            assert dev.features & (1 << V.VIRTIO_BLK_F_FLUSH)
            drv = VirtioDriver(dev, mem)
            q = drv.queues[0]
            hdr = q.alloc(struct.pack("<IIQ", V.VIRTIO_BLK_T_IN, 0, 1))
            buf, st = q.alloc(512), q.alloc(1)
            q.add([(hdr, 16, False), (buf, 512, True), (st, 1, True)])
            drv.kick(0)
            used: list[tuple[int, int]] = []
            deadline = time.monotonic() + 5
            while not used and time.monotonic() < deadline:
                events.run_once(0.02)
                used = q.take_used()
            assert used == [(0, 513)] and mem.read(st, 1) == b"\0"
            assert mem.read(buf, 512) == img.read_bytes()[512:1024]
            m = dev.metrics()
            assert m["kick_forwards"] == 1 and m["interrupt_forwards"] >= 1
            drv.core.set_status(0)
            dev.close()
    finally:
        stop.set()
        t.join(5)
        server.close()
        bev.close()
        events.close()
