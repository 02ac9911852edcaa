"""A listening AF_UNIX socket for peers, safe at its path and when fds run out.

At start, whatever is at the path is left alone unless it is a *stale* socket: a
socket nobody listens on (a connect is refused), as a killed server leaves behind.
A live socket (another server) or anything that is not a socket (a regular file, a
directory) is refused with a ``ConfigError``, never deleted. At close the path is
removed only if it is still the socket this listener created (same inode).

When the process is out of fds (a peer can hold many), ``accept`` fails with EMFILE
and the pending connection stays queued, so a level-triggered listener would spin.
Then the listener stops being watched for ``pause`` seconds (logged once) and tries
again; sessions already open go on meanwhile.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

from pyvmm.event import EventManager
from pyvmm.ratelimit_log import OnceLog
from pyvmm.unix_socket import close_unix, listen_unix

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class UnixListener:
    def __init__(self, path: str, events: EventManager,
                 on_connection: Callable[[socket.socket], None], *, backlog: int = 8,
                 errors: OnceLog | None = None, pause: float = 0.5) -> None:
        self.path, self.events, self.on_connection = path, events, on_connection
        self.errors = errors or OnceLog()
        self.pause = pause
        self.paused = 0  # times accept ran out of fds
        self.closed = False
        self.sock, self._inode = listen_unix(path, "socket", backlog)
        self.sock.setblocking(False)  # a connection gone before accept: EAGAIN
        self.fd = self.sock.fileno()
        events.add(self.fd, self._accept)

    def _accept(self, _fd: int, _ev: int) -> None:
        try:
            conn, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError as e:
            if e.errno not in _OUT_OF_FDS:
                raise
            self.paused += 1
            self.errors.warn("accept-fds", f"{self.path}: cannot accept a connection "
                             f"({e.strerror}); not accepting for {self.pause:g} s")
            self.events.remove(self.fd)
            self.events.call_later(self.pause, self._resume)
            return
        try:
            self.on_connection(conn)
        except BaseException:
            conn.close()  # a session that could not be set up owns nothing yet
            raise

    def _resume(self) -> None:
        if not self.closed and not self.events.watching(self.fd):
            self.events.add(self.fd, self._accept)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.events.remove(self.fd)
        close_unix(self.sock, self.path, self._inode)
