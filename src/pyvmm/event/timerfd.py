"""timerfd through ctypes (``os.timerfd_*`` arrives only in Python 3.13)."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
CLOCK_MONOTONIC = 1
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC


class _timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _timespec), ("it_value", _timespec)]


class TimerFd:
    """A monotonic timer whose fd becomes readable on expiry; ``read()`` returns the
    number of expirations since the last read (missed periods are counted, not lost)."""

    def __init__(self) -> None:
        fd = _libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        self.fd: int = fd

    def set(self, first_ns: int, interval_ns: int = 0) -> None:
        """Arm: first expiry after ``first_ns`` (0 disarms), then every ``interval_ns``."""
        spec = _itimerspec(_timespec(interval_ns // 1_000_000_000, interval_ns % 1_000_000_000),
                           _timespec(first_ns // 1_000_000_000, first_ns % 1_000_000_000))
        if _libc.timerfd_settime(self.fd, 0, ctypes.byref(spec), None) < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))

    def read(self) -> int:
        try:
            return int.from_bytes(os.read(self.fd, 8), "little")
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
