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

import contextlib
import errno
import os
import socket
import stat
from collections.abc import Callable

from pyvmm.errors import ConfigError
from pyvmm.event import EventManager
from pyvmm.ratelimit_log import OnceLog

_OUT_OF_FDS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"{path} exists and is not a socket; not replacing it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)  # a live server with a full backlog must not block us
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: what a killed server left
        return
    except BlockingIOError:
        pass  # a backlog full of connections: very much alive
    except OSError as e:
        raise ConfigError(f"{path} is a socket we cannot probe: {e.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"{path}: another server is listening on this socket")


class UnixListener:
    def __init__(self, path: str, events: EventManager,
                 on_connection: Callable[[socket.socket], None], *, backlog: int = 8,
                 errors: OnceLog | None = None, pause: float = 0.5) -> None:
        self.path, self.events, self.on_connection = path, events, on_connection
        self.errors = errors or OnceLog()
        self.pause = pause
        self.paused = 0  # times accept ran out of fds
        self.closed = False
        _clear_stale(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.sock.bind(path)
            st = os.lstat(path)
            self._inode = (st.st_dev, st.st_ino)
            self.sock.listen(backlog)
            self.sock.setblocking(False)  # a connection gone before accept: EAGAIN
        except BaseException:
            self.sock.close()
            raise
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
        self.sock.close()
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:  # still ours, not a successor's
                os.unlink(self.path)
