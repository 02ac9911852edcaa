"""Loader tests: real images built by the guest Makefile and hand-made bad ones."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from pyvmm.errors import LoaderError
from pyvmm.loader import EntryMode, load_kernel
from pyvmm.loader.boot import write_multiboot_info, write_pvh_start_info
from pyvmm.loader.e820 import E820_RAM, E820_RESERVED, e820_map
from pyvmm.loader.image import Format
from pyvmm.memory import GuestMemory

MiB = 1 << 20


@pytest.fixture
def mem() -> GuestMemory:
    m = GuestMemory([(0, 16 * MiB)])
    yield m  # type: ignore[misc]
    m.close()


def _symbol(elf: Path, name: str) -> int:
    from elftools.elf.elffile import ELFFile

    with elf.open("rb") as f:
        sym = ELFFile(f).get_section_by_name(".symtab").get_symbol_by_name(name)[0]
        return int(sym["st_value"])


def test_pvh_elf_loads_segments_and_uses_the_note_entry(guests: Path, mem: GuestMemory) -> None:
    elf = guests / "hello.elf"
    img = load_kernel(elf, mem)
    assert img.format is Format.PVH and img.mode is EntryMode.PROTECTED_32
    assert img.entry == _symbol(elf, "_start32")
    flat = (guests / "hello.bin").read_bytes()
    assert mem.read(0x100000, len(flat)) == flat
    assert img.load_end > img.load_start + len(flat)  # bss counted


def test_multiboot_aout_kludge(guests: Path, mem: GuestMemory) -> None:
    img = load_kernel(guests / "hello.mb", mem)
    assert img.format is Format.MULTIBOOT
    assert img.entry == _symbol(guests / "hello.elf", "_start32")
    assert img.load_start == 0x100000


def test_flat_binary_with_load_address(guests: Path, mem: GuestMemory) -> None:
    img = load_kernel(guests / "hello.bin", mem, load_addr=0x200000)
    assert img.format is Format.FLAT and img.mode is EntryMode.LONG_64
    assert img.entry == 0x200000


def test_elf64_without_pvh_note_enters_long_mode(tmp_path: Path, guests: Path,
                                                 mem: GuestMemory) -> None:
    import subprocess

    out = tmp_path / "nonote.elf"
    subprocess.run(["objcopy", "--remove-section=.note.Xen", str(guests / "hello.elf"),
                    str(out)], check=True)
    img = load_kernel(out, mem)
    assert img.format is Format.ELF64 and img.mode is EntryMode.LONG_64


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"\x7fELF" + b"\x00" * 10, "malformed ELF"),
    (b"just some text, no header", "not an ELF or multiboot"),
])
def test_bad_images_are_one_line_errors(tmp_path: Path, mem: GuestMemory, content: bytes,
                                        match: str) -> None:
    p = tmp_path / "k"
    p.write_bytes(content)
    with pytest.raises(LoaderError, match=match) as ei:
        load_kernel(p, mem)
    assert "\n" not in str(ei.value)


def test_missing_kernel(tmp_path: Path, mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="not found"):
        load_kernel(tmp_path / "nope", mem)


def test_segment_beyond_guest_memory_is_refused(guests: Path) -> None:
    with GuestMemory([(0, 1 * MiB)]) as small, pytest.raises(LoaderError, match="does not fit"):
        load_kernel(guests / "hello.elf", small)


def test_multiboot_header_with_bad_addresses(tmp_path: Path, mem: GuestMemory) -> None:
    hdr = struct.pack("<III", 0x1BADB002, 0x10000, (-(0x1BADB002 + 0x10000)) & 0xFFFFFFFF)
    hdr += struct.pack("<5I", 0x100000, 0x200000, 0, 0, 0x100000)  # load_addr > header_addr
    p = tmp_path / "mb"
    p.write_bytes(hdr + bytes(64))
    with pytest.raises(LoaderError, match="inconsistent"):
        load_kernel(p, mem)


def test_flat_entry_outside_image(guests: Path, mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="outside"):
        load_kernel(guests / "hello.bin", mem, load_addr=0x100000, entry=0x900000)


def test_e820_map_and_boot_structures(mem: GuestMemory) -> None:
    e820 = e820_map(16 * MiB)
    assert [(e.addr, e.type) for e in e820] == [(0, E820_RAM), (0x9FC00, E820_RESERVED),
                                               (0x100000, E820_RAM)]
    write_pvh_start_info(mem, 0x6000, 0x7000, 0x6100, e820)
    magic, version, _flags, nmods = struct.unpack_from("<IIII", mem.read(0x6000, 16))
    assert (magic, version, nmods) == (0x336EC578, 1, 0)
    cmdline, _rsdp, memmap, n = struct.unpack("<QQQI", mem.read(0x6000 + 24, 28))
    assert (cmdline, memmap, n) == (0x7000, 0x6100, 3)
    addr, size, typ = struct.unpack("<QQI", mem.read(0x6100 + 2 * 24, 20))
    assert (addr, size, typ) == (0x100000, 15 * MiB, E820_RAM)
    write_multiboot_info(mem, 0x6800, 0x7000, 0x6900, e820)
    flags, lower, upper = struct.unpack("<III", mem.read(0x6800, 12))
    assert flags & 0x45 == 0x45 and lower == 639 and upper == 15 * 1024


def test_the_loaders_elf_reading_agrees_with_pyelftools(guests: Path) -> None:
    """The loader reads ELF itself (start-up cost); pyelftools is the reference."""
    from elftools.elf.elffile import ELFFile

    from pyvmm.loader.image import _elf_segments, _pvh_entry

    for elf in sorted(guests.glob("*.elf")):
        data = elf.read_bytes()
        cls, machine, entry, segs = _elf_segments(data, str(elf))
        with elf.open("rb") as f:
            ref = ELFFile(f)
            assert (cls == 2) == (ref.elfclass == 64) and entry == ref["e_entry"]
            assert machine == 62 and ref["e_machine"] == "EM_X86_64"
            want = [(s["p_type"], s["p_offset"], s["p_paddr"], s["p_filesz"], s["p_memsz"])
                    for s in ref.iter_segments()]
            names = {"PT_LOAD": 1, "PT_NOTE": 4}
            got = [(t, s.offset, s.paddr, s.filesz, s.memsz) for t, s in
                   ((next((k for k, v in names.items() if v == s.type), s.type), s)
                    for s in segs)]
            assert [g for g in got if g[0] in names] == [w for w in want if w[0] in names]
            notes = [n for s in ref.iter_segments() if s["p_type"] == "PT_NOTE"
                     for n in s.iter_notes()]
            pvh = [n for n in notes if n["n_name"] == "Xen" and n["n_type"] == 18]
            mine = [_pvh_entry(data, s, str(elf)) for s in segs if s.type == 4]
            if pvh:
                d = pvh[0]["n_descdata"]
                d = d.encode("latin-1") if isinstance(d, str) else bytes(d)
                assert int.from_bytes(d[:8], "little") in mine


@pytest.mark.parametrize("cut", [7, 30, 63, 64, 100, 200])
def test_truncated_elf_is_a_loader_error(guests: Path, mem: GuestMemory, tmp_path: Path,
                                         cut: int) -> None:
    k = tmp_path / "cut.elf"
    k.write_bytes((guests / "hello.elf").read_bytes()[:cut])
    with pytest.raises(LoaderError):
        load_kernel(k, mem)
