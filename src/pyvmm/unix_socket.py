"""Listening on a Unix socket path without harming what is already there.

A path pyvmm is told to listen on may hold a stale socket of an earlier run (nobody
accepts: replaced), a live socket of another process (refused: a second VMM or backend
must not silently take over a live one), or something that is not a socket at all (a
regular file, a directory: refused — pyvmm never deletes a file the user did not ask it
to write). On close, the path is removed only if it is still the socket we made.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat

from pyvmm.errors import ConfigError

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 for the NUL


def listen_unix(path: str, what: str, backlog: int = 4
                ) -> tuple[socket.socket, tuple[int, int]]:
    """A listening SOCK_STREAM socket at ``path`` and its (device, inode), for
    ``close_unix``."""
    if "\0" in path:
        raise ConfigError(f"{what} {path!r}: the path contains a NUL byte")
    try:
        raw = os.fsencode(path)
    except UnicodeError:
        raise ConfigError(f"{what} {path!r}: the path is not valid text") from None
    if len(raw) > SUN_PATH_MAX:
        raise ConfigError(f"{what} {path!r}: {len(raw)} bytes, over the {SUN_PATH_MAX}-byte "
                          "limit of a Unix socket path (use a shorter or relative path)")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
    if st is not None:
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{what} {path}: something that is not a socket is there; "
                              "not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.setblocking(False)  # a live server with a full backlog must not block us
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # stale: left by a process that is gone
        except BlockingIOError:
            raise ConfigError(f"{what} {path}: another process is listening there "
                              "(its backlog is full)") from None
        except OSError as e:
            raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
        else:
            raise ConfigError(f"{what} {path}: another process is listening there")
        finally:
            probe.close()
    # Bound and listening under a temporary name first, then renamed into place: the
    # path appears only once connections are accepted (a client that connects as soon
    # as it sees the path must not be refused), and it replaces nothing: the check
    # above already refused anything that was there.
    tmp = f"{path}.{os.getpid()}~"
    if len(os.fsencode(tmp)) > SUN_PATH_MAX:
        tmp = path  # no room for the suffix: bind in place (a short window, no harm)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.bind(tmp)
        s.listen(backlog)
        if tmp != path:
            os.rename(tmp, path)
        st = os.lstat(path)
    except OSError as e:
        s.close()
        if tmp != path:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise ConfigError(f"{what} {path}: {e.strerror or e}") from None
    return s, (st.st_dev, st.st_ino)


def close_unix(sock: socket.socket, path: str, inode: tuple[int, int]) -> None:
    """Close ``sock`` and remove ``path`` if it is still the socket ``listen_unix`` made
    (not a successor's that took the path meanwhile)."""
    sock.close()
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == inode:
            os.unlink(path)


def check_socket_path(path: str, what: str) -> None:
    """A client's config check before the VM is built: a socket is at ``path``
    (connecting comes later). Raises ValueError with one line."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise ValueError(f"{what} socket {path!r} does not exist") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{what} socket {path!r}: "
                         f"{getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISSOCK(st.st_mode):
        raise ValueError(f"{what} socket {path!r} is not a socket")
