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
import io
import struct
from dataclasses import dataclass
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

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


def _load_elf(data: bytes, mem: GuestMemory, path: str) -> BootImage:
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] not in ("EM_X86_64", "EM_386"):
            raise LoaderError(f"{path}: ELF for {elf['e_machine']}, not x86")
        pvh_entry = None
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_NOTE":
                continue
            for note in seg.iter_notes():  # type: ignore[attr-defined]
                if note["n_name"] == "Xen" and note["n_type"] == XEN_ELFNOTE_PHYS32_ENTRY:
                    desc = note["n_descdata"]
                    if isinstance(desc, str):
                        desc = desc.encode("latin-1")
                    pvh_entry = int.from_bytes(bytes(desc)[:8], "little")
        lo, hi = 1 << 64, 0
        for seg in elf.iter_segments():
            if seg["p_type"] != "PT_LOAD":
                continue
            paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            if filesz > memsz:
                raise LoaderError(f"{path}: segment with filesz > memsz")
            _check_range(mem, paddr, memsz, f"{path}: segment")
            mem.write(paddr, seg.data())
            if memsz > filesz:
                mem.write(paddr + filesz, bytes(memsz - filesz))
            lo, hi = min(lo, paddr), max(hi, paddr + memsz)
        if hi == 0:
            raise LoaderError(f"{path}: ELF has no loadable segments")
        if pvh_entry is not None:
            return BootImage(Format.PVH, pvh_entry, EntryMode.PROTECTED_32, lo, hi)
        if elf.elfclass != 64:
            raise LoaderError(f"{path}: 32-bit ELF without a PVH note or multiboot header")
        return BootImage(Format.ELF64, elf["e_entry"], EntryMode.LONG_64, lo, hi)
    except ELFError as e:
        raise LoaderError(f"{path}: malformed ELF ({e})") from None
    except GuestMemoryError as e:
        raise LoaderError(f"{path}: {e}") from None
    except LoaderError:
        raise
    except Exception as e:
        # pyelftools documents no complete set of exceptions for a malformed file
        # (struct.error, ValueError, KeyError, IndexError and its construct errors have
        # all been seen): any of them means the image is not one we can load.
        raise LoaderError(f"{path}: malformed ELF ({type(e).__name__}: {e})") from None


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
