"""The host end of a serial port: stdio, a file, a Unix socket, or nothing.

Output is written as the guest sends it; on a socket with no client yet, the last
64 KiB are kept and sent to the first client that connects. Input (stdin, or a socket
client) is read on the event loop and fed to the device (UART FIFO, virtio-console
buffers) only as far as it has room; the source is paused while it is full and
resumed when the guest drains it, so a fast host cannot overrun the guest and no input
is lost.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from pyvmm.errors import ConfigError
from pyvmm.event import EventManager
from pyvmm.unix_socket import close_unix, listen_unix

log = logging.getLogger("pyvmm")

BACKLOG_MAX = 64 * 1024
CHAR_KINDS = ("stdio", "file", "socket", "none")


@dataclass(frozen=True)
class CharSpec:
    """Where a character device's host end goes: ``stdio``, ``file:PATH``,
    ``socket:PATH`` (listening) or ``none``."""

    kind: str = "stdio"
    path: str | None = None

    @classmethod
    def parse(cls, text: str) -> CharSpec:
        """Raises ValueError naming what is wrong (the config layer adds where)."""
        kind, _, path = text.partition(":")
        if kind not in CHAR_KINDS:
            raise ValueError(f"{text!r}: use stdio, file:PATH, socket:PATH or none")
        if kind in ("file", "socket") and not path:
            raise ValueError(f"{text!r}: {kind} needs a path ({kind}:PATH)")
        if kind in ("stdio", "none") and path:
            raise ValueError(f"{text!r}: {kind} takes no path")
        return cls(kind, path or None)


class InputSink(Protocol):
    def rx_space(self) -> int: ...

    def enqueue_input(self, data: bytes) -> int: ...


class SerialIo:
    def __init__(self, cfg: CharSpec, events: EventManager, read_stdin: bool = True) -> None:
        """``read_stdin=False``: stdio is output only (stdin belongs to another reader,
        ``--keyboard stdin``)."""
        self.cfg = cfg
        self.events = events
        self.sink: InputSink | None = None
        self._out_fd: int | None = None
        self._in_fd: int | None = None
        self._listen: socket.socket | None = None
        self._client: socket.socket | None = None
        self._paused = False
        self._lock = threading.Lock()
        self._pending = b""  # input read but not yet accepted by the FIFO
        # Output written before a socket client connects, kept (bounded) for it.
        self._backlog = bytearray()
        self._out_path: str | None = None
        self._inode = (0, 0)
        if cfg.kind == "stdio":
            self._out_fd = 1
            if read_stdin and _pollable(0):
                self._in_fd = 0
        elif cfg.kind == "file":
            assert cfg.path is not None
            _check_writable(cfg.path, "serial file")
            # Opened (and truncated) at the first byte the guest sends, not now: a run
            # that fails before it starts must leave an existing file as it was.
            self._out_path = cfg.path
        elif cfg.kind == "socket":
            assert cfg.path is not None
            s, self._inode = listen_unix(cfg.path, "serial socket", backlog=1)
            s.setblocking(False)
            self._listen = s

    def attach(self, sink: InputSink) -> None:
        self.sink = sink
        if self._in_fd is not None:
            self.events.add(self._in_fd, self._on_input)
        if self._listen is not None:
            self.events.add(self._listen.fileno(), self._on_accept)

    # --- output (vCPU thread) --------------------------------------------------------
    def write(self, data: bytes) -> None:
        if self._out_path is not None:
            self._open_output()
        if self._out_fd is not None:
            try:
                os.write(self._out_fd, data)
            except OSError:
                self._out_fd = None  # the reader went away; the guest goes on
        elif self._client is not None:
            # A slow or gone client loses output rather than stalling the guest.
            with contextlib.suppress(OSError):
                self._client.send(data)
        elif self._listen is not None:
            self._backlog += data
            del self._backlog[:-BACKLOG_MAX]

    def _open_output(self) -> None:
        path, self._out_path = self._out_path, None
        assert path is not None
        try:
            self._out_fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                                   0o644)
        except OSError as e:  # it was writable at start-up; the guest goes on regardless
            log.warning("serial file %s: %s; output dropped", path, e.strerror)

    def started(self) -> None:
        """The VM runs: a file end exists from now on, even if the guest stays silent."""
        if self._out_path is not None:
            self._open_output()

    def flush(self) -> None:
        pass  # writes are unbuffered

    # --- input (event loop) ------------------------------------------------------------
    def _source_fd(self) -> int | None:
        if self._client is not None:
            return self._client.fileno()
        return self._in_fd

    def _on_accept(self, fd: int, ev: int) -> None:
        assert self._listen is not None
        try:
            conn, _ = self._listen.accept()
        except BlockingIOError:
            return
        if self._client is not None:
            conn.close()  # one client at a time
            return
        conn.setblocking(False)
        self._client = conn
        if self._backlog:
            with contextlib.suppress(OSError):
                conn.send(bytes(self._backlog))
            self._backlog.clear()
        self.events.add(conn.fileno(), self._on_input)

    def _on_input(self, fd: int, ev: int) -> None:
        if self.sink is None:
            return
        with self._lock:
            if not self._pending:
                try:
                    data = os.read(fd, 4096)
                except (BlockingIOError, InterruptedError):
                    return
                except OSError:
                    data = b""
                if not data:  # EOF
                    self.events.remove(fd)
                    if self._client is not None and fd == self._client.fileno():
                        self._client.close()
                        self._client = None
                    return
                self._pending = data
            self._feed_locked(fd)

    def _feed_locked(self, fd: int | None) -> None:
        assert self.sink is not None
        n = self.sink.enqueue_input(self._pending)
        self._pending = self._pending[n:]
        if self._pending and fd is not None and not self._paused:
            self.events.remove(fd)  # FIFO full: stop reading until the guest drains it
            self._paused = True

    def resume_input(self) -> None:
        """Called by the UART (vCPU thread) when its FIFO has room again."""
        self.events.call_soon(self._resume)

    def _resume(self) -> None:
        with self._lock:
            fd = self._source_fd()
            if self._pending:
                self._feed_locked(None)
            if self._paused and not self._pending and fd is not None:
                self._paused = False
                self.events.add(fd, self._on_input)

    def close(self) -> None:
        if self.cfg.kind == "file" and self._out_fd is not None:
            os.close(self._out_fd)
            self._out_fd = None
        if self._client is not None:
            self._client.close()
        if self._listen is not None:
            assert self.cfg.path is not None
            close_unix(self._listen, self.cfg.path, self._inode)
            self._listen = None


def _check_writable(path: str, what: str) -> None:
    """That ``path`` can be written (created in an existing folder), checked without
    creating or touching it."""
    p = Path(path)
    try:
        if p.is_dir():
            raise ConfigError(f"{what} {path}: is a directory")
        if p.exists():
            ok = os.access(p, os.W_OK)
        else:
            parent = p.parent
            if not parent.is_dir():
                raise ConfigError(f"{what} {path}: folder {str(parent)!r} does not exist")
            ok = os.access(parent, os.W_OK | os.X_OK)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what} {path!r}: {getattr(e, 'strerror', None) or e}") from None
    if not ok:
        raise ConfigError(f"{what} {path}: not writable")


def _pollable(fd: int) -> bool:
    """stdin can be watched by epoll only if it is a tty, pipe or socket."""
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return False
    if not (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)):
        return False
    ep = select.epoll()
    try:
        ep.register(fd, select.EPOLLIN)
        return True
    except OSError:
        return False
    finally:
        ep.close()
