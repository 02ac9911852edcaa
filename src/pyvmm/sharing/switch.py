"""A learning L2 switch between virtio-net devices (and optionally a TAP uplink).

Each port is a datagram socketpair: the device end behaves like a TAP for
``VirtioNet`` (``fd``, ``read``, ``writev``; frames carry the 12-byte
virtio_net_hdr_v1 in front), the switch end sits on the switch's event loop. A frame
read from a port teaches the switch its source MAC; it goes to the port that MAC was
last seen on, or to every other port when the destination is unknown, broadcast or
multicast. A frame never goes back out of the port it came in on.

Sharing: a port may have a ``TokenBucket`` of bytes per second; frames over its rate
are dropped and counted (policing, as a switch does), so one guest flooding the
switch cannot take the others' share. A destination whose socket is full (its guest
posts no receive buffers) drops the frame and counts it; nobody waits for a slow
guest.

A VMM in another process joins by a Unix socket (``pyvmm backend vhost-user-net --port
PATH``): for each connection the switch makes a port and hands the connecting process
the device end of its socketpair by SCM_RIGHTS (``serve_port``; the VMM side is
``connect_port``); the port lives as long as that connection, and is removed (its MACs
forgotten) when the connection ends. So an emulated NIC in a VMM (the e1000) sits on
the same switch as the virtio-net guests of the backend's vhost-user sockets.

Ports carry no offloads: a frame from one guest must be a frame any other guest can
take, so ``offloads = False`` makes ``VirtioNet`` offer no checksum/TSO features.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pyvmm.backends.tap import Tap
from pyvmm.errors import ConfigError
from pyvmm.event import EventManager
from pyvmm.sharing.ratelimit import TokenBucket
from pyvmm.uapi import virtio as V

MAX_FRAME = 65562


PORT_GREETING = b"pyvmm-switch-port"  # the one message serve_port sends, with the fd


class SwitchPort:
    """The device end of a port: what ``VirtioNet`` reads and writes."""

    offloads = False

    def __init__(self, sock: socket.socket, name: str,
                 conn: socket.socket | None = None) -> None:
        self.sock, self.name = sock, name
        self.conn = conn  # a remote port's connection to the switch: the port's lifetime
        self.fd = sock.fileno()

    def set_offload(self, flags: int) -> None:
        pass  # no offloads: the features that would need them are not offered

    def read(self, n: int = MAX_FRAME) -> bytes | None:
        try:
            return self.sock.recv(n)
        except BlockingIOError:
            return None

    def writev(self, bufs: Sequence[memoryview | bytes]) -> int:
        try:
            return self.sock.sendmsg(bufs)
        except BlockingIOError:
            return 0  # the switch is behind: the frame is lost, as on a wire

    def close(self) -> None:
        self.sock.close()
        if self.conn is not None:
            self.conn.close()


def connect_port(path: str) -> SwitchPort:
    """A port of the switch serving ``path`` (``pyvmm backend vhost-user-net --port``);
    ConfigError in one line if there is none."""
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.settimeout(5)  # the switch answers at once or not at all
        conn.connect(path)
    except OSError as e:
        conn.close()
        raise ConfigError(f"switch port {path}: {e.strerror or e}") from None
    return receive_port(conn, path)


def receive_port(conn: socket.socket, path: str) -> SwitchPort:
    """The port ``serve_port`` sends over ``conn`` (which the port then owns)."""
    try:
        msg, fds, _, _ = socket.recv_fds(conn, 64, 1)
    except OSError as e:
        conn.close()
        raise ConfigError(f"switch port {path}: {e.strerror or e}") from None
    if msg != PORT_GREETING or len(fds) != 1:
        for fd in fds:
            os.close(fd)
        conn.close()
        raise ConfigError(f"switch port {path}: not a pyvmm switch port")
    sock = socket.socket(fileno=fds[0])
    if sock.type != socket.SOCK_DGRAM:
        sock.close()
        conn.close()
        raise ConfigError(f"switch port {path}: not a pyvmm switch port")
    sock.setblocking(False)
    return SwitchPort(sock, path, conn)


@dataclass
class PortStats:
    name: str
    rx_frames: int = 0  # into the switch from this port
    tx_frames: int = 0  # out of the switch to this port
    policed: int = 0
    congested: int = 0


@dataclass
class _Port:
    stats: PortStats
    send: Callable[[bytes], object]  # raises BlockingIOError when the port is full
    fd: int
    recv: Callable[[], bytes | None]
    limit: TokenBucket | None = None
    close: Callable[[], None] | None = None  # the switch end of a port; a TAP is not ours


class Switch:
    def __init__(self, events: EventManager) -> None:
        self.events = events
        self.ports: list[_Port] = []
        self.macs: dict[bytes, _Port] = {}
        self.flooded = 0
        self.malformed = 0

    def port(self, name: str, rate: float | None = None) -> SwitchPort:
        """A new port; ``rate`` caps what it may send into the switch (bytes/s)."""
        dev, sw = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (dev, sw):
            s.setblocking(False)
        p = _Port(PortStats(name), sw.send, sw.fileno(), lambda: _recv(sw),
                  TokenBucket(rate) if rate else None, sw.close)
        self._add(p)
        return SwitchPort(dev, name)

    def serve_port(self, conn: socket.socket, name: str, rate: float | None = None) -> None:
        """A port for the process at the other end of ``conn`` (an accepted Unix stream
        connection): the device end goes over it by SCM_RIGHTS; the port is removed when
        ``conn`` closes."""
        dev = self.port(name, rate)
        p = self.ports[-1]
        try:
            socket.send_fds(conn, [PORT_GREETING], [dev.fd])
        except OSError:
            self._remove(p)
            conn.close()
            return
        finally:
            dev.close()  # the other process holds its copy
        conn.setblocking(False)
        fd = conn.fileno()

        def readable(_fd: int, _ev: int) -> None:
            try:
                data = conn.recv(64)  # the peer sends nothing: this is its end
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.events.remove(fd)
                conn.close()
                self._remove(p)

        self.events.add(fd, readable)

    def _remove(self, p: _Port) -> None:
        if p not in self.ports:
            return
        self.ports.remove(p)
        self.events.remove(p.fd)
        if p.close is not None:
            p.close()
        self.macs = {mac: q for mac, q in self.macs.items() if q is not p}

    def uplink(self, tap: Tap) -> None:
        """Connect a TAP (frames with the same vnet header) as one more port."""
        p = _Port(PortStats(f"tap:{tap.name}"), lambda f: tap.writev([f]), tap.fd, tap.read)
        self._add(p)

    def _add(self, p: _Port) -> None:
        self.ports.append(p)
        self.events.add(p.fd, lambda _fd, _ev: self._readable(p))

    def _readable(self, src: _Port) -> None:
        for _ in range(64):  # a bounded batch, then let the loop serve others
            frame = src.recv()
            if not frame:
                return
            self._forward(src, frame)

    def _forward(self, src: _Port, frame: bytes) -> None:
        h = V.VIRTIO_NET_HDR_SIZE
        if len(frame) < h + 14:
            self.malformed += 1
            return
        src.stats.rx_frames += 1
        if src.limit is not None and src.limit.take(len(frame)) < len(frame):
            src.stats.policed += 1
            return
        dst_mac, src_mac = frame[h:h + 6], frame[h + 6:h + 12]
        if not src_mac[0] & 1:
            self.macs[src_mac] = src
        dst = None if dst_mac[0] & 1 else self.macs.get(dst_mac)
        if dst is src:
            return
        targets = [dst] if dst is not None else [p for p in self.ports if p is not src]
        if dst is None:
            self.flooded += 1
        for p in targets:
            try:
                p.send(frame)
                p.stats.tx_frames += 1
            except OSError:
                # Full (BlockingIOError), gone (ConnectionRefusedError), or a TAP uplink
                # that refuses the frame (EIO while down, EINVAL for a bad vnet header):
                # this port loses the frame, the others still get it.
                p.stats.congested += 1

    def stats(self) -> list[PortStats]:
        return [p.stats for p in self.ports]

    def close(self) -> None:
        for p in self.ports:
            self.events.remove(p.fd)
            if p.close is not None:
                p.close()
        self.ports = []


def _recv(sock: socket.socket) -> bytes | None:
    try:
        return sock.recv(MAX_FRAME)
    except BlockingIOError:
        return None

