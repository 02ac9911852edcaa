"""Eventfds a peer hands over (vhost-user kick/call, vfio-user IRQs), checked before use.

A peer can send any fd where an eventfd belongs: a pipe (a short read on the kick
path, EPIPE or EBADF on the completion path), a socket, a blocking eventfd filled to
its maximum (then ``eventfd_write`` blocks the only thread forever). So each one is
checked to be an eventfd and made non-blocking before it is used, or refused.
O_NONBLOCK is a flag of the open file, which the peer shares: QEMU creates its
eventfds non-blocking anyway (``event_notifier_init``), so it sees no change.
"""

from __future__ import annotations

import contextlib
import fcntl
import os

from pyvmm.errors import PyvmmError


class PeerError(PyvmmError):
    """Something a peer handed over is unusable (an fd of the wrong kind); the message
    is refused with a one-line reason."""


def is_eventfd(fd: int) -> bool:
    # The kernel names an eventfd's anonymous inode this way (fs/eventfd.c).
    try:
        return os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:[eventfd]"
    except OSError:
        return False


def checked_eventfd(fd: int, what: str) -> int:
    """``fd`` itself if it is an eventfd, now non-blocking; else PeerError."""
    if not is_eventfd(fd):
        raise PeerError(f"{what}: the fd is not an eventfd")
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    if not flags & os.O_NONBLOCK:
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | os.O_NONBLOCK)
    return fd


def signal_eventfd(fd: int) -> None:
    """Add one to a (checked, non-blocking) eventfd. A full counter refuses with EAGAIN:
    the peer has not read the interrupts already pending, so this one is signalled too."""
    with contextlib.suppress(BlockingIOError):
        os.eventfd_write(fd, 1)
