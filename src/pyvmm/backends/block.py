"""Block backends. ``RawBlockBackend``: a raw image file, read and written with
preadv/pwritev straight into guest-memory views, flushed with fsync, discarded and
zeroed with fallocate (falling back to writing zeros where the filesystem cannot).
Never imports pyvmm.kvm."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import struct
from collections.abc import Callable, Sequence
from typing import Protocol

from pyvmm.errors import ConfigError

# struct flock (x86-64): l_type, l_whence, l_start, l_len, l_pid, native alignment
_flock = struct.Struct("@hhqqi")

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

Buffers = Sequence[memoryview]


def skip_buffers(bufs: Buffers, n: int) -> list[memoryview]:
    """The buffers past their first ``n`` bytes (the rest of a partial transfer)."""
    out = []
    for b in bufs:
        if n >= len(b):
            n -= len(b)
            continue
        out.append(b[n:])
        n = 0
    return out


class BlockBackend(Protocol):
    size: int
    read_only: bool

    def readv(self, offset: int, bufs: Buffers) -> int: ...

    def writev(self, offset: int, bufs: Buffers) -> int: ...

    def readv_nowait(self, offset: int, bufs: Buffers) -> int: ...

    def writev_nowait(self, offset: int, bufs: Buffers) -> int: ...

    def flush(self) -> None: ...

    def discard(self, offset: int, length: int) -> None: ...

    def write_zeroes(self, offset: int, length: int) -> None: ...


class RawBlockBackend:
    def __init__(self, path: str, read_only: bool = False) -> None:
        self.path, self.read_only = path, read_only
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        try:
            self.fd = os.open(path, flags)
        except FileNotFoundError:
            raise ConfigError(f"disk image not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError(f"disk image is a directory: {path}") from None
        except OSError as e:
            raise ConfigError(f"cannot open disk image {path}: {e.strerror}") from None
        self.size = os.fstat(self.fd).st_size
        if self.size < 512:
            os.close(self.fd)
            raise ConfigError(f"disk image {path} is smaller than one 512-byte sector")
        self._lock(path)

    def _lock(self, path: str) -> None:
        """An open-file-description lock on the whole image, as QEMU and Cloud Hypervisor
        take one: a writer excludes every other user, readers share. Two VMs (or two
        --disk of one VM, or a VM and a backend) cannot both write one image."""
        kind = fcntl.F_RDLCK if self.read_only else fcntl.F_WRLCK
        try:
            fcntl.fcntl(self.fd, fcntl.F_OFD_SETLK, _flock.pack(kind, os.SEEK_SET, 0, 0, 0))
        except OSError as e:
            os.close(self.fd)
            if e.errno in (errno.EAGAIN, errno.EACCES):
                raise ConfigError(f"disk image {path} is in use by another user (locked"
                                  f"{'' if self.read_only else '; readonly=on shares it'})"
                                  ) from None
            raise ConfigError(f"cannot lock disk image {path}: {e.strerror}") from None

    def readv(self, offset: int, bufs: Buffers) -> int:
        return os.preadv(self.fd, bufs, offset)

    def writev(self, offset: int, bufs: Buffers) -> int:
        return os.pwritev(self.fd, bufs, offset)

    # Non-blocking attempts (RWF_NOWAIT): as much of the transfer as the page cache
    # allows without waiting for the disk — all of it, part (a read that runs into an
    # uncached page), or 0 (EAGAIN, or a file system without RWF_NOWAIT).
    _nowait = {"read": True, "write": True}

    def _try(self, kind: str, fn: Callable[[int, Buffers, int, int], int], bufs: Buffers,
             offset: int) -> int:
        if not self._nowait[kind]:
            return 0
        try:
            return fn(self.fd, bufs, offset, os.RWF_NOWAIT)
        except BlockingIOError:
            return 0
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):  # not on this file system
                self._nowait = {**self._nowait, kind: False}
                return 0
            raise

    def readv_nowait(self, offset: int, bufs: Buffers) -> int:
        return self._try("read", os.preadv, bufs, offset)

    def writev_nowait(self, offset: int, bufs: Buffers) -> int:
        # Where buffered writes have no RWF_NOWAIT (ext4 says EOPNOTSUPP) every write
        # goes to the pool. Small ones used to stay inline (a page-cache copy), but ext4's
        # buffered write on the event loop made 4k writes behind Linux 0.65-0.82x
        # qemu-storage-daemon, and 1.13-1.16x from a pool thread (docs/benchmarks.md).
        return self._try("write", os.pwritev, bufs, offset)

    def flush(self) -> None:
        os.fsync(self.fd)

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        return bool(_libc.fallocate(self.fd, mode, offset, length) == 0)

    def discard(self, offset: int, length: int) -> None:
        # Advisory: a filesystem without hole punching simply keeps the data.
        self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def write_zeroes(self, offset: int, length: int) -> None:
        if self._fallocate(FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length):
            return
        zero = bytes(min(length, 1 << 20))
        while length > 0:
            n = os.pwrite(self.fd, zero[:min(length, len(zero))], offset)
            offset, length = offset + n, length - n

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class SliceBackend:
    """A window ``[offset, offset + length)`` of another backend, seen as a whole disk
    from 0 to ``length`` — one virtual function's namespace over a shared image.
    Every request is checked against the window before it reaches the image: one that
    does not lie wholly inside it is refused (``OSError`` EINVAL) and nothing is read
    or written, so a bug above (a device model's own range check) still cannot reach
    another slice. The image is not closed here: its owner shares it."""

    def __init__(self, base: BlockBackend, offset: int, length: int) -> None:
        if offset < 0 or length < 512 or offset + length > base.size:
            raise ConfigError(f"slice {offset}+{length} does not fit in an image of "
                              f"{base.size} bytes (or is under one 512-byte sector)")
        self.base, self.offset, self.size = base, offset, length
        self.read_only = base.read_only

    def _at(self, offset: int, length: int) -> int:
        """The image offset of ``[offset, offset + length)``, or refused."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"{offset}+{length} is outside the slice of "
                          f"{self.size} bytes")
        return self.offset + offset

    def readv(self, offset: int, bufs: Buffers) -> int:
        return self.base.readv(self._at(offset, sum(len(b) for b in bufs)), bufs)

    def writev(self, offset: int, bufs: Buffers) -> int:
        return self.base.writev(self._at(offset, sum(len(b) for b in bufs)), bufs)

    def readv_nowait(self, offset: int, bufs: Buffers) -> int:
        return self.base.readv_nowait(self._at(offset, sum(len(b) for b in bufs)), bufs)

    def writev_nowait(self, offset: int, bufs: Buffers) -> int:
        return self.base.writev_nowait(self._at(offset, sum(len(b) for b in bufs)), bufs)

    def flush(self) -> None:
        self.base.flush()  # the image's: fsync has no range

    def discard(self, offset: int, length: int) -> None:
        self.base.discard(self._at(offset, length), length)

    def write_zeroes(self, offset: int, length: int) -> None:
        self.base.write_zeroes(self._at(offset, length), length)
