"""Recognise a kernel file and place it in guest memory.

Three formats, as QEMU's ``-kernel`` and Firecracker accept them:

* **ELF64/ELF32 with a PVH note** (XEN_ELFNOTE_PHYS32_ENTRY): segments at their
  physical addresses; 32-bit protected-mode entry with ``ebx`` = ``hvm_start_info``
  (PVH boot ABI, xen/include/public/arch-x86/hvm/start_info.h).
* **ELF64 without a PVH note**: 64-bit long-mode entry at ``e_entry`` with identity
  page tables (the direct start, as Firecracker does for vmlinux).
* **Multiboot v1** (header magic 0x1BADB002 in the first 8 KiB): the a.out-kludge
  address fields or ELF32 segments; 32-bit entry with ``eax`` = 0x2BADB002 and
  ``ebx`` = the multiboot information structure.
* **Flat binary** with a load address: copied there and entered in 64-bit mode at
  ``entry`` (default: the load address), ``rbx`` = ``hvm_start_info``.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from pathlib import Path

from pyvmm.errors import GuestMemoryError, LoaderError
from pyvmm.memory import GuestMemory

XEN_ELFNOTE_PHYS32_ENTRY = 18
MULTIBOOT_HEADER_MAGIC = 0x1BADB002
MULTIBOOT_BOOTLOADER_MAGIC = 0x2BADB002
MULTIBOOT_SEARCH = 8192
MULTIBOOT_AOUT_KLUDGE = 1 << 16


class EntryMode(enum.Enum):
    PROTECTED_32 = "32-bit protected mode"
    LONG_64 = "64-bit long mode"


class Format(enum.Enum):
    PVH = "pvh"
    ELF64 = "elf64"
    MULTIBOOT = "multiboot"
    FLAT = "flat"


@dataclass(frozen=True)
class BootImage:
    format: Format
    entry: int
    mode: EntryMode
    load_start: int
    load_end: int  # end of the image including bss


def _check_range(mem: GuestMemory, addr: int, size: int, what: str) -> None:
    if not mem.contains(addr, max(size, 1)):
        raise LoaderError(
            f"{what} at {addr:#x}+{size:#x} does not fit in guest memory "
            f"({mem.total_size >> 20} MiB)"
        )


# ELF as far as loading needs it (the System V gABI): the header, the program headers,
# and the notes of PT_NOTE segments. **Why not pyelftools** (which this used): importing
# it cost ~20 ms of a ~130 ms start to the first serial byte, for the 60 lines below.
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
_ehdr = {1: struct.Struct("<16sHHIIIIIHHHHHH"), 2: struct.Struct("<16sHHIQQQIHHHHHH")}
_phdr = {1: struct.Struct("<IIIIIIII"), 2: struct.Struct("<IIQQQQQQ")}


class _Segment:
    def __init__(self, cls: int, raw: tuple[int, ...]) -> None:
        if cls == 2:
            self.type, _flags, self.offset, _v, self.paddr, self.filesz, self.memsz, _a = raw
        else:
            self.type, self.offset, _v, self.paddr, self.filesz, self.memsz, _f, _a = raw


def _elf_segments(data: bytes, path: str) -> tuple[int, int, int, list[_Segment]]:
    """(class, machine, entry, program headers); LoaderError for anything malformed."""
    if len(data) < 20 or data[4] not in (1, 2) or data[5] != 1:
        raise LoaderError(f"{path}: malformed ELF (not a little-endian ELF32/ELF64 header)")
    cls = data[4]
    eh = _ehdr[cls]
    if len(data) < eh.size:
        raise LoaderError(f"{path}: malformed ELF (truncated header)")
    _ident, _type, machine, _ver, entry, phoff, _sh, _fl, _ehs, phentsize, phnum, *_ = (
        eh.unpack_from(data))
    if machine not in (EM_X86_64, EM_386):
        raise LoaderError(f"{path}: ELF for machine {machine}, not x86")
    ph = _phdr[cls]
    if phnum and (phentsize < ph.size or phoff + phnum * phentsize > len(data)):
        raise LoaderError(f"{path}: malformed ELF (program headers beyond the file)")
    segs = [_Segment(cls, ph.unpack_from(data, phoff + i * phentsize)) for i in range(phnum)]
    return cls, machine, entry, segs


def _pvh_entry(data: bytes, seg: _Segment, path: str) -> int | None:
    """XEN_ELFNOTE_PHYS32_ENTRY from a PT_NOTE segment's notes, if it has one."""
    end = seg.offset + seg.filesz
    if end > len(data):
        raise LoaderError(f"{path}: malformed ELF (a note segment beyond the file)")
    pos, found = seg.offset, None
    while pos + 12 <= end:
        namesz, descsz, ntype = struct.unpack_from("<III", data, pos)
        name_at = pos + 12
        desc_at = name_at + (namesz + 3) // 4 * 4
        nxt = desc_at + (descsz + 3) // 4 * 4
        if nxt > end:
            raise LoaderError(f"{path}: malformed ELF (a note runs past its segment)")
        if data[name_at:name_at + namesz].rstrip(b"\0") == b"Xen" and (
                ntype == XEN_ELFNOTE_PHYS32_ENTRY):
            found = int.from_bytes(data[desc_at:desc_at + min(descsz, 8)], "little")
        pos = nxt
    return found


def _load_elf(data: bytes, mem: GuestMemory, path: str) -> BootImage:
    cls, _machine, entry, segs = _elf_segments(data, path)
    pvh_entry = None
    for seg in segs:
        if seg.type == PT_NOTE:
            pvh_entry = _pvh_entry(data, seg, path) or pvh_entry
    lo, hi = 1 << 64, 0
    try:
        for seg in segs:
            if seg.type != PT_LOAD:
                continue
            if seg.filesz > seg.memsz:
                raise LoaderError(f"{path}: segment with filesz > memsz")
            if seg.offset + seg.filesz > len(data):
                raise LoaderError(f"{path}: malformed ELF (a segment beyond the file)")
            _check_range(mem, seg.paddr, seg.memsz, f"{path}: segment")
            mem.write(seg.paddr, data[seg.offset:seg.offset + seg.filesz])
            if seg.memsz > seg.filesz:
                mem.write(seg.paddr + seg.filesz, bytes(seg.memsz - seg.filesz))
            lo, hi = min(lo, seg.paddr), max(hi, seg.paddr + seg.memsz)
    except GuestMemoryError as e:
        raise LoaderError(f"{path}: {e}") from None
    if hi == 0:
        raise LoaderError(f"{path}: ELF has no loadable segments")
    if pvh_entry is not None:
        return BootImage(Format.PVH, pvh_entry, EntryMode.PROTECTED_32, lo, hi)
    if cls != 2:
        raise LoaderError(f"{path}: 32-bit ELF without a PVH note or multiboot header")
    return BootImage(Format.ELF64, entry, EntryMode.LONG_64, lo, hi)


def _find_multiboot(data: bytes) -> int | None:
    for off in range(0, min(len(data), MULTIBOOT_SEARCH) - 11, 4):
        magic, flags, csum = struct.unpack_from("<III", data, off)
        if magic == MULTIBOOT_HEADER_MAGIC and (magic + flags + csum) & 0xFFFFFFFF == 0:
            return off
    return None


def _load_multiboot(data: bytes, off: int, mem: GuestMemory, path: str) -> BootImage:
    flags = struct.unpack_from("<I", data, off + 4)[0]
    if not flags & MULTIBOOT_AOUT_KLUDGE:
        if data[:4] == b"\x7fELF":
            img = _load_elf(data, mem, path)
            return BootImage(Format.MULTIBOOT, img.entry, EntryMode.PROTECTED_32,
                             img.load_start, img.load_end)
        raise LoaderError(f"{path}: multiboot header without address fields in a non-ELF file")
    if len(data) < off + 32:
        raise LoaderError(f"{path}: truncated multiboot header")
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<5I", data, off + 12)
    file_start = off - (header_addr - load_addr)
    if load_addr > header_addr or file_start < 0:
        raise LoaderError(f"{path}: inconsistent multiboot header addresses")
    size = (load_end - load_addr) if load_end else len(data) - file_start
    if size <= 0 or file_start + size > len(data):
        raise LoaderError(f"{path}: multiboot load range exceeds the file")
    end = max(bss_end, load_addr + size)
    _check_range(mem, load_addr, end - load_addr, f"{path}: image")
    mem.write(load_addr, data[file_start : file_start + size])
    if not load_addr <= entry < end:
        raise LoaderError(f"{path}: multiboot entry {entry:#x} outside the image")
    return BootImage(Format.MULTIBOOT, entry, EntryMode.PROTECTED_32, load_addr, end)


def load_kernel(
    path: str | Path,
    mem: GuestMemory,
    *,
    load_addr: int | None = None,
    entry: int | None = None,
) -> BootImage:
    """Load ``path`` into ``mem``. ``load_addr`` forces the flat-binary format."""
    p = str(path)
    try:
        size = Path(path).stat().st_size
        if size > mem.total_size:
            raise LoaderError(f"kernel {p} ({size >> 20} MiB) is larger than guest RAM "
                              f"({mem.total_size >> 20} MiB)")
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise LoaderError(f"kernel file not found: {p}") from None
    except IsADirectoryError:
        raise LoaderError(f"kernel path is a directory: {p}") from None
    except (OSError, ValueError) as e:
        raise LoaderError(f"cannot read kernel {p!r}: {getattr(e, 'strerror', None) or e}"
                          ) from None
    if not data:
        raise LoaderError(f"kernel file is empty: {p}")
    if load_addr is not None:
        _check_range(mem, load_addr, len(data), f"{p}: image")
        mem.write(load_addr, data)
        ent = load_addr if entry is None else entry
        if not load_addr <= ent < load_addr + len(data):
            raise LoaderError(f"{p}: entry {ent:#x} outside the loaded image")
        return BootImage(Format.FLAT, ent, EntryMode.LONG_64, load_addr, load_addr + len(data))
    if data[:4] == b"\x7fELF":
        mb = _find_multiboot(data)
        try:
            return _load_elf(data, mem, p)
        except LoaderError:
            if mb is None:
                raise
            return _load_multiboot(data, mb, mem, p)
    mb = _find_multiboot(data)
    if mb is not None:
        return _load_multiboot(data, mb, mem, p)
    raise LoaderError(
        f"{p}: not an ELF or multiboot image (for a flat binary give a load address)"
    )
