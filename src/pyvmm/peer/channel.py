"""One peer's message stream: non-blocking, framed, bounded, contained.

Both peer-facing servers (vhost-user, vfio-user) run every session on one event loop
thread, so nothing a peer does may block it or end it. The channel guarantees that
for every session alike:

- The socket is non-blocking. Received bytes accumulate per session; a message is
  handed to the handler only when all of it is there. A protocol-supplied ``frame``
  function turns a header into the message's total length, or raises (bad version,
  oversize): that session closes.
- A message in progress must be complete within ``ChannelLimits.deadline`` seconds of
  its first byte, else the session closes (a peer that announces a payload and sends
  nothing costs one timer, not the thread).
- Replies go out in order. What the socket does not take at once is queued and sent
  on EPOLLOUT; a peer that lets more than ``ChannelLimits.send_cap`` bytes queue up
  (it does not read its replies) is closed. A reply that carries fds is queued with
  them, so they go with its first byte and never overtake an earlier reply.
- Any exception while handling one message closes only this session (the event
  loop's ``fail`` hook), with every fd it owns.

Fd ownership, on every path: **the channel owns every received fd until a handler
takes it by removing it from the message's fd list; whatever that list still holds
after the handler returns — success or error — the channel closes.** Fds that
arrived for a message not yet complete, and fds queued to be sent, are the
channel's too and are closed when it closes. A handler that takes an fd owns it from
then on (and closes it when the session closes).

Each ``recvmsg`` asks for at most the rest of the current message, so the bytes and
the SCM_RIGHTS fds of one call always belong to one message: fds belong to the
message whose bytes they came with (the kernel does not join a chunk that carries fds
to the bytes of another ``sendmsg``).
"""

from __future__ import annotations

import array
import contextlib
import os
import select
import socket
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from pyvmm.errors import PyvmmError
from pyvmm.event import EventManager
from pyvmm.ratelimit_log import OnceLog

Framer = Callable[[bytes], int]  # header -> total message length (header included)
Handler = Callable[[bytes, list[int]], None]  # (whole message, its fds: take what you keep)

_FD = array.array("i").itemsize
# Plain ints: socket's MsgFlag members go through enum.__and__/__call__ on every use,
# which cost a vfio-user message (one trapped BAR access) a few microseconds.
_CTRUNC, _CLOEXEC, _NOSIGNAL = (int(socket.MSG_CTRUNC), int(socket.MSG_CMSG_CLOEXEC),
                                int(socket.MSG_NOSIGNAL))


@dataclass(frozen=True)
class ChannelLimits:
    deadline: float = 5.0  # seconds from a message's first byte to its last
    send_cap: int = 4 << 20  # bytes of replies a peer may leave unread
    max_fds: int = 32  # per received chunk; more is a broken peer (MSG_CTRUNC)


def close_fds(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class _Out:
    __slots__ = ("data", "fds")

    def __init__(self, data: memoryview, fds: list[int]) -> None:
        self.data, self.fds = data, fds


class MessageChannel:
    def __init__(self, sock: socket.socket, events: EventManager, *, header_size: int,
                 frame: Framer, handler: Handler, on_close: Callable[[str], None],
                 name: str, errors: OnceLog, limits: ChannelLimits | None = None) -> None:
        """``on_close(reason)`` is called once when the channel ends the session itself
        (peer closed, deadline, send cap, a failed handler); the owner then closes its
        own state and calls ``close``. The owner ending the session calls ``close``."""
        self.sock, self.events, self.name, self.errors = sock, events, name, errors
        self.header_size, self.frame, self.handler, self.on_close = (header_size, frame,
                                                                      handler, on_close)
        self.limits = limits or ChannelLimits()
        self.closed = False
        self.messages = 0
        self._fd = sock.fileno()
        self._anc = socket.CMSG_SPACE(self.limits.max_fds * _FD)
        self._buf = bytearray()
        self._total: int | None = None  # length of the message in progress, once framed
        self._fds: list[int] = []  # arrived with the message in progress
        self._armed = -1  # the message number whose deadline timer is set
        self._out: deque[_Out] = deque()
        self._queued = 0
        self._handling = False
        self._failed: str | None = None  # a failure seen inside the handler: close after
        sock.setblocking(False)
        events.add(self._fd, self._ready, select.EPOLLIN, fail=self._contained)

    # --- sending ------------------------------------------------------------------------
    def send(self, data: bytes, fds: Sequence[int] = ()) -> None:
        """Send ``data`` (with ``fds``, which stay the caller's: a queued reply carries
        duplicates) after every earlier reply. Never blocks, never raises: a send
        failure or an exceeded cap closes the session."""
        if self.closed or self._failed is not None:
            return
        view = memoryview(data)
        if not self._out:
            try:
                n = self._sendmsg(view, fds)
            except BlockingIOError:
                n = 0
            except OSError as e:
                self._fail(f"send failed: {e.strerror or e}")
                return
            if n == len(view):
                return
            view, fds = view[n:], (() if n else fds)  # the fds went with the first byte
        self._out.append(_Out(view, [os.dup(f) for f in fds]))
        self._queued += len(view)
        if self._queued > self.limits.send_cap:
            self._fail(f"peer leaves its replies unread: over {self.limits.send_cap} bytes "
                       "queued")
            return
        if len(self._out) == 1:
            self.events.modify(self._fd, select.EPOLLIN | select.EPOLLOUT)

    def _sendmsg(self, data: memoryview, fds: Sequence[int]) -> int:
        if not fds:  # the common case, and plain send is cheaper per call
            return self.sock.send(data, _NOSIGNAL)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        return self.sock.sendmsg([data], anc, _NOSIGNAL)

    def _flush(self) -> None:
        while self._out:
            out = self._out[0]
            try:
                n = self._sendmsg(out.data, out.fds)
            except BlockingIOError:
                return
            except OSError as e:
                self._fail(f"send failed: {e.strerror or e}")
                return
            if n and out.fds:
                close_fds(out.fds)  # the kernel passed them with the first byte
                out.fds = []
            self._queued -= n
            if n < len(out.data):
                out.data = out.data[n:]
                return
            self._out.popleft()
        self.events.modify(self._fd, select.EPOLLIN)

    @property
    def queued(self) -> int:
        """Bytes of replies the peer has not taken yet."""
        return self._queued

    # --- receiving ----------------------------------------------------------------------
    def _ready(self, _fd: int, ev: int) -> None:
        if ev & select.EPOLLOUT:
            self._flush()
        if not self.closed and ev & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            self._receive()

    def _receive(self) -> None:
        """Read (at most) one message and hand it over; level-triggered epoll calls again
        for the next, so one busy peer cannot keep the loop from the others."""
        while True:
            want = (self.header_size if self._total is None else self._total) - len(self._buf)
            if want == 0:
                break
            try:
                data, anc, flags, _ = self.sock.recvmsg(want, self._anc, _CLOEXEC)
            except (BlockingIOError, InterruptedError):
                self._arm_deadline()
                return
            except OSError as e:
                self._fail(f"receive failed: {e.strerror or e}")
                return
            for level, typ, raw in anc:  # owned from here on, whatever happens next
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    got = array.array("i")
                    got.frombytes(raw[:len(raw) - len(raw) % _FD])
                    self._fds.extend(got)
            if flags & _CTRUNC:
                self._fail(f"more than {self.limits.max_fds} fds with one message")
                return
            if not data:
                self._fail("connection closed inside a message" if self._buf else "",
                           log=bool(self._buf))
                return
            self._buf += data
            if self._total is None and len(self._buf) == self.header_size:
                try:
                    self._total = self.frame(bytes(self._buf))
                except PyvmmError as e:
                    self._fail(f"bad message header: {e}")
                    return
                if self._total < self.header_size:
                    self._fail(f"message length {self._total} is shorter than its header")
                    return
        message, fds = bytes(self._buf), self._fds
        self._buf, self._fds, self._total = bytearray(), [], None
        self.messages += 1
        self._handling = True
        try:
            self.handler(message, fds)
        finally:
            self._handling = False
            close_fds(fds)  # what the handler did not take
            fds.clear()
            if self._failed is not None:
                reason, self._failed = self._failed, None
                self._fail(reason, log=False)

    def _arm_deadline(self) -> None:
        if self._buf and self._armed != self.messages:
            self._armed = seq = self.messages
            self.events.call_later(self.limits.deadline, lambda: self._expire(seq))

    def _expire(self, seq: int) -> None:
        if not self.closed and self.messages == seq and self._buf:
            self._fail(f"message incomplete {self.limits.deadline:g} s after its first byte")

    # --- ending -------------------------------------------------------------------------
    def _contained(self, reason: str) -> None:
        """The event loop's fail hook: the handler raised (the loop logged what)."""
        self._fail(f"handling a message failed ({reason})")

    def _fail(self, reason: str, log: bool = True) -> None:
        if self.closed:
            return
        if log:
            self.errors.warn(f"{self.name}:{reason.split(':')[0].split('(')[0]}",
                             f"{self.name}: {reason}; closing the session")
        if self._handling:  # let the handler finish on a consistent session first
            self._failed = self._failed or reason
            return
        try:
            self.on_close(reason)
        finally:
            self.close()

    def close(self) -> None:
        """Stop watching; close the socket and every fd the channel still owns."""
        if self.closed:
            return
        self.closed = True
        self.events.remove(self._fd)
        close_fds(self._fds)
        self._fds = []
        for out in self._out:
            close_fds(out.fds)
        self._out.clear()
        self._queued = 0
        self.sock.close()
