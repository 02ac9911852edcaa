"""The ``_IOC`` encoding of ``<asm-generic/ioctl.h>`` (x86 uses the generic layout)."""

from __future__ import annotations

import ctypes

_IOC_NRBITS = 8
_IOC_TYPEBITS = 8
_IOC_SIZEBITS = 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS

_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2

type_ctype = type[ctypes._SimpleCData] | type[ctypes.Structure] | int  # type: ignore[type-arg]


def _size(t: type_ctype) -> int:
    return t if isinstance(t, int) else ctypes.sizeof(t)


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return (
        (direction << _IOC_DIRSHIFT)
        | (typ << _IOC_TYPESHIFT)
        | (nr << _IOC_NRSHIFT)
        | (size << _IOC_SIZESHIFT)
    )


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, t: type_ctype) -> int:
    return _IOC(_IOC_READ, typ, nr, _size(t))


def _IOW(typ: int, nr: int, t: type_ctype) -> int:
    return _IOC(_IOC_WRITE, typ, nr, _size(t))


def _IOWR(typ: int, nr: int, t: type_ctype) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, _size(t))
