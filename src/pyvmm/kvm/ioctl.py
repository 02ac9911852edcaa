"""ioctl(2) through ctypes.

ctypes.CDLL releases the GIL for the duration of the call, so a vCPU thread blocked
in KVM_RUN does not stop the event loop or other vCPUs. EINTR is never retried here:
it is how a vCPU is kicked, and the caller decides what it means.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
from typing import Any

from pyvmm.errors import KvmError

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)

# Two prototypes: one for integer arguments, one for pointers. Fixed argtypes keep
# the per-call conversion cost down (KVM_RUN is on the hot path).
ioctl_int = _libc.ioctl
ioctl_int.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong]
ioctl_int.restype = ctypes.c_int

_ioctl_ptr = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p, use_errno=True
)(("ioctl", _libc))

get_errno = ctypes.get_errno


def ioctl(fd: int, request: int, arg: int = 0, name: str = "ioctl") -> int:
    """Integer-argument ioctl; returns its non-negative result or raises :class:`KvmError`."""
    ret: int = ioctl_int(fd, request, arg)
    if ret < 0:
        raise KvmError(name, ctypes.get_errno())
    return ret


def ioctl_ptr(fd: int, request: int, obj: Any, name: str = "ioctl") -> int:
    """Pointer-argument ioctl on a ctypes object (read, written or both by the kernel)."""
    ret: int = _ioctl_ptr(fd, request, ctypes.addressof(obj))
    if ret < 0:
        raise KvmError(name, ctypes.get_errno())
    return ret


EINTR = errno.EINTR
EAGAIN = errno.EAGAIN
