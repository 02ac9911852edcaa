"""The mechanism behind issue #17's fixes: ``MessageChannel`` (framing, fds per
message, ordered replies, containment), ``UnixListener`` (socket paths, running out of
fds), the fd-count sweep of malformed messages, and two front ends on one server —
A attacking (items 6, 7, 8, 12, 13 in turn) while B's I/O never stops."""

from __future__ import annotations

import array
import errno
import os
import resource
import socket
import struct
from collections.abc import Callable
from pathlib import Path

import pytest

from pyvmm.errors import ConfigError
from pyvmm.event import EventManager
from pyvmm.memory import GuestMemory, sealed_memfd
from pyvmm.peer import ChannelLimits, MessageChannel, UnixListener
from pyvmm.ratelimit_log import OnceLog
from pyvmm.vfio_user import protocol as P
from pyvmm.vhost_user.protocol import HEADER, INFLIGHT, Request, encode
from tests.unit.peer_frontends import (
    RAM,
    Loop,
    VfioSetup,
    VhostSetup,
    flood_until_closed,
    open_fds,
)
from tests.unit.test_cli import assert_one_line_error, run_main
from tests.unit.test_peer_containment import full_blocking_eventfd
from tests.unit.test_vhost_user import BAD

HDR = struct.Struct("<I")  # the test protocol: u32 total length, then the body


def fds_of(anc: list[tuple[int, int, bytes]]) -> list[int]:
    out = array.array("i")
    for _lvl, _typ, raw in anc:
        out.frombytes(raw[:len(raw) - len(raw) % 4])
    return list(out)


class Bare:
    """A channel over a socketpair with a handler the test writes."""

    def __init__(self, handler: Callable[[bytes, list[int]], None],
                 limits: ChannelLimits | None = None) -> None:
        self.events = EventManager()
        self.loop = Loop(self.events)
        ours, self.peer = socket.socketpair()
        self.ended: list[str] = []
        self.ch = MessageChannel(ours, self.events, header_size=HDR.size,
                                 frame=lambda h: int(HDR.unpack(h)[0]), handler=handler,
                                 on_close=self.ended.append, name="test", errors=OnceLog(),
                                 limits=limits)

    def send(self, body: bytes, fds: list[int] | None = None) -> None:
        """One message (with ``fds``, whose copies here are closed once sent)."""
        self.raw(HDR.pack(HDR.size + len(body)) + body, fds or [])

    def raw(self, data: bytes, fds: list[int]) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        self.peer.sendmsg([data], anc)
        for fd in fds:
            os.close(fd)

    def close(self) -> None:
        self.ch.close()
        self.peer.close()
        self.events.close()


def test_peer_channel_fds_belong_to_the_message_they_came_with() -> None:
    got: list[tuple[bytes, int]] = []

    def handler(msg: bytes, fds: list[int]) -> None:
        got.append((msg[HDR.size:], len(fds)))

    b = Bare(handler)
    try:
        before = open_fds()
        b.send(b"one")
        b.send(b"two", [os.eventfd(0), os.eventfd(0)])
        # A message in two writes, its fds with the second: still its own.
        whole = HDR.pack(HDR.size + 6) + b"three!"
        b.raw(whole[:5], [])
        b.raw(whole[5:], [os.eventfd(0)])
        b.send(b"four")
        b.loop.until(lambda: len(got) == 4, "four messages")
        assert got == [(b"one", 0), (b"two", 2), (b"three!", 1), (b"four", 0)]
        assert open_fds() == before  # the handler took none: the channel closed them
    finally:
        b.close()


def test_peer_channel_replies_in_order_and_fds_with_their_reply() -> None:
    def handler(msg: bytes, fds: list[int]) -> None:
        n = int(msg[HDR.size:])
        b.ch.send(b"%06d" % n + b"x" * 4090, [memfd] if n % 50 == 7 else ())

    memfd = sealed_memfd("reply", 4096)
    b = Bare(handler)
    try:
        b.peer.setblocking(False)
        for n in range(200):  # ~800 KiB of replies: far more than the socket holds
            b.send(b"%d" % n)
            b.loop.steps(1)
        b.loop.until(lambda: b.ch.messages == 200, "all requests")
        assert b.ch.queued > 0  # the peer reads nothing yet: replies wait, in order
        replies: list[tuple[int, int]] = []
        buf = b""

        def pull() -> bool:
            nonlocal buf
            try:
                data, anc, _, _ = b.peer.recvmsg(4096, socket.CMSG_SPACE(16))
            except BlockingIOError:
                return len(replies) == 200
            fds = fds_of(anc)
            if fds:  # fds come with the first byte of their reply
                assert len(buf) % 4096 == 0
                replies.append((len(buf) // 4096, len(fds)))
                for fd in fds:
                    os.close(fd)
            buf += data
            return len(buf) == 200 * 4096

        b.loop.until(pull, "every reply")
        assert [int(buf[i * 4096:i * 4096 + 6]) for i in range(200)] == list(range(200))
        assert replies == [(n, 1) for n in range(200) if n % 50 == 7]
        assert b.ch.queued == 0
    finally:
        b.close()
        os.close(memfd)


def test_peer_channel_handler_exception_closes_its_session_and_fds() -> None:
    def handler(msg: bytes, fds: list[int]) -> None:
        raise ValueError("a bug in a handler")

    b = Bare(handler)
    try:
        before = open_fds()
        b.send(b"boom", [os.eventfd(0) for _ in range(3)])
        b.loop.until(lambda: b.ch.closed, "the session to close")
        assert b.ended and b.events.bugs == 1
        assert open_fds() == before - 1  # its fds, and the channel's socket
        assert b.peer.recv(1) == b""
    finally:
        b.close()


def test_peer_channel_fds_of_an_unfinished_message_are_closed() -> None:
    b = Bare(lambda msg, fds: None)
    try:
        before = open_fds()
        b.raw(HDR.pack(100) + b"part", [os.eventfd(0)])
        b.loop.steps()
        assert open_fds() == before + 1  # held for the message in progress
        b.peer.shutdown(socket.SHUT_WR)
        b.loop.until(lambda: b.ch.closed, "EOF inside a message")
        assert open_fds() == before - 1  # its fds, and the channel's socket
    finally:
        b.close()


# --- the socket path ----------------------------------------------------------------------
def test_peer_socket_path_is_only_replaced_when_stale(tmp_path: Path) -> None:
    events = EventManager()
    path = tmp_path / "s"
    try:
        path.write_text("precious")
        with pytest.raises(ConfigError, match="not a socket"):
            UnixListener(str(path), events, lambda c: None)
        assert path.read_text() == "precious"
        path.unlink()
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(str(path))  # bound, nobody listening: what a killed server leaves
        stale.close()
        live = UnixListener(str(path), events, lambda c: None)  # stale: replaced
        with pytest.raises(ConfigError, match="listening"):
            UnixListener(str(path), events, lambda c: None)
        path.unlink()  # a successor took the path over meanwhile
        successor = socket.socket(socket.AF_UNIX)
        successor.bind(str(path))
        live.close()
        assert path.exists()  # not ours any more: left alone
        successor.close()
        path.unlink()
        again = UnixListener(str(path), events, lambda c: None)
        again.close()
        assert not path.exists()  # ours: removed
    finally:
        events.close()


@pytest.mark.parametrize("kind", ["vhost-user-blk", "vfio-user"])
def test_peer_socket_path_that_is_a_file_is_one_line_from_the_cli(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, kind: str) -> None:
    path, img = tmp_path / "not-a-socket", tmp_path / "d.img"
    path.write_text("precious")
    img.write_bytes(bytes(64 * 1024))
    rc, err = run_main(capsys, "backend", kind, "--socket", str(path), "--disk", str(img))
    assert_one_line_error(rc, err, "is not a socket")
    assert path.read_text() == "precious"


# --- EMFILE on accept ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["vhost-user", "vfio-user"])
def test_peer_13_accept_out_of_fds_pauses_the_listener(tmp_path: Path, kind: str) -> None:
    setup = VhostSetup(tmp_path) if kind == "vhost-user" else VfioSetup(tmp_path)
    listener = setup.server.listeners[0] if isinstance(setup, VhostSetup) else \
        setup.server.listener
    listener.pause = 0.05
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    try:
        c = socket.socket(socket.AF_UNIX)
        c.connect(listener.path)  # queued in the backlog
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_fds() + 16, hard))
        try:
            while True:
                filler.append(os.eventfd(0))
        except OSError as e:
            assert e.errno == errno.EMFILE
        setup.loop.until(lambda: listener.paused > 0, "accept to run out of fds")
        assert not setup.server.events.watching(listener.fd)  # no spinning meanwhile
        setup.loop.steps()
        assert listener.paused == 1
        for fd in filler:
            os.close(fd)
        filler = []
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        setup.loop.until(lambda: len(setup.server.sessions) == 1, "the connection, later")
        c.close()
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        setup.server.close()


# --- malformed messages with fds: nothing may stay open ------------------------------------
def some_fds(n: int = 3) -> list[int]:
    """``n`` fds of mixed kinds: eventfds, pipe ends, sealed memfds."""
    out: list[int] = []
    makers: list[Callable[[], list[int]]] = [lambda: [os.eventfd(0)], lambda: list(os.pipe()),
                                             lambda: [sealed_memfd("x", 4096)]]
    while len(out) < n:
        out += makers[len(out) % 3]()
    for fd in out[n:]:
        os.close(fd)
    return out[:n]


def pipe_end() -> int:
    r, w = os.pipe()
    os.close(r)
    return w


def vhost_bad_messages() -> list[tuple[bytes, list[int]]]:
    out = [(encode(spec["req"], spec.get("payload", b"")) if spec.get("raw") is None  # type: ignore[arg-type]
            else spec["raw"], some_fds()) for spec in BAD.values()]  # type: ignore[misc]
    unsealed = os.memfd_create("unsealed")
    os.ftruncate(unsealed, RAM)
    mem_table = struct.pack("<II", 1, 0) + struct.pack("<QQQQ", 0, RAM, 0x7F0000000000, 0)
    out += [
        (encode(Request.SET_VRING_KICK, struct.pack("<Q", 0)), some_fds(2)),  # two fds
        (encode(Request.SET_VRING_CALL, struct.pack("<Q", 0)), [pipe_end()]),
        (encode(Request.SET_MEM_TABLE, mem_table), [unsealed]),
        (encode(Request.SET_MEM_TABLE, mem_table), some_fds(4)),
        (encode(Request.SET_INFLIGHT_FD, INFLIGHT.pack(1 << 40, 0, 1, 256)), some_fds(1)),
        (encode(Request.SET_VRING_ERR, struct.pack("<Q", 99)), some_fds(1)),  # bad index
        (HEADER.pack(Request.SET_FEATURES, 1, 8) + b"\0\0", some_fds()),  # then EOF
    ]
    return out


def vfio_bad_messages() -> list[tuple[bytes, list[int]]]:
    unsealed = os.memfd_create("unsealed")
    os.ftruncate(unsealed, RAM)
    dma = P.DMA_MAP.pack(32, 3, 0, 1 << 32, RAM)
    irqs = P.IRQ_SET.pack(20, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER,
                          P.VFIO_PCI_MSIX_IRQ_INDEX, 0, 2)
    return [
        (P.encode(1, P.Command.DMA_MAP, dma), [unsealed]),
        (P.encode(2, P.Command.DMA_MAP, dma), some_fds(2)),
        (P.encode(3, P.Command.DMA_MAP, b"short"), some_fds()),
        (P.encode(4, P.Command.DEVICE_SET_IRQS, irqs), [pipe_end(), pipe_end()]),
        (P.encode(5, P.Command.DEVICE_SET_IRQS, irqs), some_fds(3)),  # count differs
        (P.encode(6, P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 7, 4)), some_fds()),
        (P.encode(7, P.Command.DMA_UNMAP, P.DMA_UNMAP.pack(24, 0, 0, 4096)), some_fds()),
        (P.encode(8, 77), some_fds()),
        (P.HEADER.pack(9, 1, 1 << 30, 0, 0), some_fds()),  # oversize: the session closes
        (P.HEADER.pack(10, 1, 64, 0, 0) + b"part", some_fds()),  # then EOF
    ]


def send_and_forget(sock_path: str, loop: Loop, data: bytes, fds: list[int]) -> None:
    """One message with fds on a connection of its own, then EOF; our copies closed."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(sock_path)
    s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())])
    for fd in fds:
        os.close(fd)
    loop.steps(3)
    s.close()


def sweep(path: str, loop: Loop, messages: Callable[[], list[tuple[bytes, list[int]]]],
          sessions: Callable[[], int], rounds: int = 3) -> None:
    """Every message of ``messages()`` (fresh fds each round) on its own connection."""
    for _ in range(rounds):
        for data, fds in messages():
            send_and_forget(path, loop, data, fds)
    loop.until(lambda: sessions() == 0, "every sweep session to end")


def test_peer_13_malformed_sweep_leaks_no_fds_vhost_user(vhost: VhostSetup) -> None:
    before = open_fds()
    sweep(vhost.paths["a"], vhost.loop, vhost_bad_messages, lambda: len(vhost.server.sessions))
    assert open_fds() == before
    assert vhost.server.events.bugs == 0  # each was refused on purpose, none escaped


def test_peer_13_malformed_sweep_leaks_no_fds_vfio_user(vfio: VfioSetup) -> None:
    before = open_fds()
    sweep(vfio.path, vfio.loop, vfio_bad_messages, lambda: len(vfio.server.sessions))
    assert open_fds() == before
    assert vfio.server.events.bugs == 0


# --- two front ends: A attacks, B's I/O goes on ----------------------------------------------
def test_peer_two_front_ends_vhost_user_blk(vhost: VhostSetup) -> None:
    b = vhost.blk("b")
    b.read(vhost.loop, 0)
    start = open_fds()
    server, loop, sector = vhost.server, vhost.loop, iter(range(1, 1000))

    def closed(n: int) -> Callable[[], bool]:
        return lambda: server.closed_sessions == n

    # 6: a header announcing a payload, then nothing (closed at A's deadline)
    a = vhost.peer("a")
    a.peer.raw(HEADER.pack(Request.SET_MEM_TABLE, 1, 40))
    b.read(loop, next(sector))
    loop.until(closed(1), "A's deadline")
    a.peer.close()
    b.read(loop, next(sector))
    # 7: A never reads its replies
    a = vhost.peer("a")
    get_config = encode(Request.GET_CONFIG, struct.pack("<III", 0, 256, 0) + bytes(256))
    flood_until_closed(loop, lambda: a.peer.raw(get_config * 16), closed(2))
    a.peer.close()
    b.read(loop, next(sector))
    # 8: a region of 2^63 bytes
    a = vhost.peer("a")
    with GuestMemory([(0, RAM)]) as mem:
        a.mem_table(mem, size=1 << 63)
        loop.until(closed(3), "the 2^63 region refused")
    a.peer.close()
    b.read(loop, next(sector))
    # 12: a pipe as call fd; then a full blocking eventfd A never reads, with I/O
    a = vhost.peer("a")
    r, w = os.pipe()
    a.send(Request.SET_VRING_CALL, struct.pack("<Q", 0), [w])
    loop.until(closed(4), "the pipe refused")
    os.close(r)
    a.peer.close()
    b.read(loop, next(sector))
    call = full_blocking_eventfd()
    a2 = vhost.blk("a", call=call)
    a2.read(loop, 1)
    b.read(loop, next(sector))
    a2.fe.peer.close()
    a2.close()
    loop.until(closed(5), "A's front end to go")
    # 13: malformed messages with fds, many times
    sweep(vhost.paths["a"], loop, vhost_bad_messages, lambda: len(server.sessions) - 1)
    b.read(loop, next(sector))
    assert b.done == 8
    assert open_fds() == start
    b.close()


def test_peer_two_front_ends_vfio_user(vfio: VfioSetup) -> None:
    b = vfio.blk()
    b.read(vfio.loop, 0)
    start = open_fds()
    server, loop, sector = vfio.server, vfio.loop, iter(range(1, 1000))

    def closed(n: int) -> Callable[[], bool]:
        return lambda: server.closed_sessions == n

    # 6
    a = vfio.peer()
    a.peer.raw(P.HEADER.pack(1, P.Command.REGION_READ, 32, 0, 0))
    b.read(loop, next(sector))
    loop.until(closed(1), "A's deadline")
    a.peer.close()
    b.read(loop, next(sector))
    # 7
    a = vfio.peer()
    read_cfg = P.encode(1, P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 7, 256))
    flood_until_closed(loop, lambda: a.peer.raw(read_cfg * 16), closed(2))
    a.peer.close()
    b.read(loop, next(sector))
    # 8: refused with an errno, A's session goes on
    a = vfio.peer()
    with GuestMemory([(0, RAM)]) as mem:
        assert a.dma_map(mem, size=1 << 63, iova=1 << 32) == errno.EINVAL
        assert a.dma_map(mem, offset=1 << 63, iova=1 << 32) == errno.EINVAL
    b.read(loop, next(sector))
    # 12: a pipe as MSI-X eventfd; then a full blocking eventfd nobody reads, with I/O
    r, w = os.pipe()
    assert a.call(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
        20, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER,
        P.VFIO_PCI_MSIX_IRQ_INDEX, 0, 1), [w])[0] == errno.EINVAL
    os.close(r)
    a.peer.close()
    loop.until(closed(3), "A to go")
    call = full_blocking_eventfd()
    a2 = vfio.blk(irq=call)
    a2.read(loop, 1)
    b.read(loop, next(sector))
    a2.c.peer.close()
    a2.close()
    os.close(call)
    loop.until(closed(4), "A's driver to go")
    # 13
    sweep(vfio.path, loop, vfio_bad_messages, lambda: len(server.sessions) - 1)
    b.read(loop, next(sector))
    assert b.done == 7
    assert open_fds() == start
    b.close()
