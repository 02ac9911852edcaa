"""The requesting end of a socket to a peer process — the vhost-user front end's and
the vfio-user client's: one request at a time (callers hold their device's lock), every
wait bounded by ``timeout`` seconds, fds received with CLOEXEC and bounded in number.

The peer is not trusted: a silent peer is a ``BackendError`` at the deadline, never a
hang; a closed connection, a truncated fd list or a failed call is one too. What the
bytes mean is the protocol's business (each caller checks its replies).
"""

from __future__ import annotations

import array
import select
import socket
import time

from pyvmm.errors import BackendError


class Requester:
    def __init__(self, sock: socket.socket, timeout: float, max_fds: int) -> None:
        sock.setblocking(False)
        self.sock, self.timeout, self.max_fds = sock, timeout, max_fds
        self.messages = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def unasked(self) -> str | None:
        """The socket became readable with no request waiting (the event loop saw it):
        why that ends the session, or None if a request has already taken the reply."""
        try:
            data = self.sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):
            return None  # a reply a request has already taken
        except OSError as e:
            return f"connection failed ({e.strerror or e})"
        return "closed the connection" if not data else "sent a message unasked"

    def deadline(self) -> float:
        return time.monotonic() + self.timeout

    def _wait(self, events: int, deadline: float, what: str) -> None:
        p = select.poll()
        p.register(self.sock.fileno(), events)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendError(f"no answer to {what} within {self.timeout:g} s")
            try:
                if p.poll(left * 1000):
                    return
            except InterruptedError:
                continue

    def send_all(self, data: bytes, fds: list[int] | None, deadline: float, what: str) -> None:
        """All of ``data``, the fds with its first byte. MSG_NOSIGNAL: a peer that went
        away is an error here, not a SIGPIPE for the whole VMM."""
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())
               ] if fds else []
        sent = 0
        while sent < len(data):
            try:
                sent += self.sock.sendmsg([data[sent:]], anc if sent == 0 else [],
                                          socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLOUT, deadline, what)
            except OSError as e:
                raise BackendError(f"cannot send {what}: {e.strerror or e}") from None

    def read_exact(self, n: int, deadline: float, what: str, fds: list[int]) -> bytes:
        """Exactly ``n`` bytes; fds that come with them are appended to ``fds`` (the
        caller owns and closes them, whatever happens next)."""
        buf = bytearray()
        while len(buf) < n:
            try:
                data, anc, flags, _ = self.sock.recvmsg(
                    n - len(buf), socket.CMSG_SPACE(4 * self.max_fds),
                    socket.MSG_CMSG_CLOEXEC)
            except (BlockingIOError, InterruptedError):
                self._wait(select.POLLIN, deadline, what)
                continue
            except OSError as e:
                raise BackendError(f"connection failed during {what}: {e.strerror or e}"
                                   ) from None
            for level, typ, raw in anc:
                if level == socket.SOL_SOCKET and typ == socket.SCM_RIGHTS:
                    a = array.array("i")
                    a.frombytes(raw[:len(raw) - len(raw) % a.itemsize])
                    fds.extend(a)
            if flags & socket.MSG_CTRUNC:
                raise BackendError(f"reply to {what} carried more than {self.max_fds} fds")
            if not data:
                raise BackendError(f"closed the connection during {what}")
            buf += data
        return bytes(buf)
