"""Boot information structures and the CPU state at the kernel's entry.

Where pyvmm puts things in low memory (below the 1 MiB image area) is listed in
``pyvmm.machine.layout``; this module only writes them.
"""

from __future__ import annotations

import struct

from pyvmm.kvm.vcpu import Vcpu
from pyvmm.loader.e820 import E820Entry
from pyvmm.loader.image import MULTIBOOT_BOOTLOADER_MAGIC, BootImage, EntryMode, Format
from pyvmm.memory import GuestMemory
from pyvmm.uapi import kvm as K

XEN_HVM_START_MAGIC_VALUE = 0x336EC578

# x86 control bits (names as in arch/x86/include/uapi/asm/processor-flags.h)
X86_CR0_PE = 1 << 0
X86_CR0_MP = 1 << 1
X86_CR0_ET = 1 << 4
X86_CR0_NE = 1 << 5
X86_CR0_WP = 1 << 16
X86_CR0_PG = 1 << 31
X86_CR4_PAE = 1 << 5
X86_CR4_OSFXSR = 1 << 9
X86_CR4_OSXMMEXCPT = 1 << 10
EFER_LME = 1 << 8
EFER_LMA = 1 << 10

# Boot GDT: null, code64 (0x08), data (0x10), code32 (0x18); PVH and the direct
# start load from it, and it stays valid until the kernel loads its own.
BOOT_GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CF9B000000FFFF)


def write_pvh_start_info(
    mem: GuestMemory, addr: int, cmdline_addr: int, memmap_addr: int, e820: list[E820Entry],
    rsdp_addr: int = 0,
) -> None:
    """struct hvm_start_info (version 1) followed by its memmap table at memmap_addr."""
    info = struct.pack(
        "<IIIIQQQQII",
        XEN_HVM_START_MAGIC_VALUE, 1, 0, 0,  # magic, version, flags, nr_modules
        0, cmdline_addr, rsdp_addr, memmap_addr, len(e820), 0,
    )
    mem.write(addr, info)
    table = b"".join(struct.pack("<QQII", e.addr, e.size, e.type, 0) for e in e820)
    mem.write(memmap_addr, table)


def write_multiboot_info(
    mem: GuestMemory, addr: int, cmdline_addr: int, mmap_addr: int, e820: list[E820Entry]
) -> None:
    """struct multiboot_info with mem_lower/upper (bit 0), cmdline (bit 2), mmap (bit 6)."""
    mmap = b"".join(struct.pack("<IQQI", 20, e.addr, e.size, e.type) for e in e820)
    mem.write(mmap_addr, mmap)
    lower = 639
    upper = 0
    for e in e820:
        if e.type == 1 and e.addr == 0x100000:
            upper = e.size >> 10
    info = bytearray(116)
    struct.pack_into("<III", info, 0, (1 << 0) | (1 << 2) | (1 << 6), lower, upper)
    struct.pack_into("<I", info, 16, cmdline_addr)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    mem.write(addr, bytes(info))


def write_identity_page_tables(mem: GuestMemory, pml4: int) -> None:
    """PML4 at ``pml4``, PDPT at +0x1000, four PDs after it: 4 GiB in 2 MiB pages,
    U/S set so a CPL3 kernel may use them too."""
    pdpt, pd = pml4 + 0x1000, pml4 + 0x2000
    mem.write(pml4, struct.pack("<Q", pdpt | 0x7) + bytes(4088))
    mem.write(pdpt, struct.pack("<4Q", *(pd + i * 0x1000 | 0x7 for i in range(4))) + bytes(4064))
    mem.write(pd, struct.pack("<2048Q", *((i << 21) | 0x87 for i in range(2048))))


def _seg(selector: int, code: bool, long_mode: bool) -> K.kvm_segment:
    s = K.kvm_segment()
    s.base, s.limit, s.selector = 0, 0xFFFFFFFF, selector
    s.type = 0xB if code else 0x3
    s.present, s.dpl, s.s, s.g = 1, 0, 1, 1
    s.l = 1 if (code and long_mode) else 0
    s.db = 0 if (code and long_mode) else 1
    return s


def setup_entry_state(
    vcpu: Vcpu, mem: GuestMemory, img: BootImage, *, gdt_addr: int, pml4_addr: int,
    info_addr: int,
) -> None:
    """Registers as the image's boot protocol specifies them at entry."""
    mem.write(gdt_addr, struct.pack(f"<{len(BOOT_GDT)}Q", *BOOT_GDT))
    sregs = vcpu.get_sregs()
    sregs.gdt.base, sregs.gdt.limit = gdt_addr, len(BOOT_GDT) * 8 - 1
    sregs.idt.base, sregs.idt.limit = 0, 0
    tr = K.kvm_segment()
    tr.base, tr.limit, tr.selector, tr.type, tr.present, tr.s = 0, 0x67, 0, 0xB, 1, 0
    sregs.tr = tr
    regs = K.kvm_regs()
    regs.rflags = 0x2
    regs.rip = img.entry
    regs.rbx = info_addr
    if img.mode is EntryMode.PROTECTED_32:
        code, data = _seg(0x18, True, False), _seg(0x10, False, False)
        sregs.cr0 = X86_CR0_PE | X86_CR0_ET
        sregs.cr4 = 0
        sregs.efer = 0
        if img.format is Format.MULTIBOOT:
            regs.rax = MULTIBOOT_BOOTLOADER_MAGIC
    else:
        write_identity_page_tables(mem, pml4_addr)
        code, data = _seg(0x08, True, True), _seg(0x10, False, True)
        sregs.cr3 = pml4_addr
        sregs.cr4 = X86_CR4_PAE | X86_CR4_OSFXSR | X86_CR4_OSXMMEXCPT
        sregs.cr0 = X86_CR0_PE | X86_CR0_MP | X86_CR0_ET | X86_CR0_NE | X86_CR0_WP | X86_CR0_PG
        sregs.efer = EFER_LME | EFER_LMA
        regs.rsp = 0x8FF0  # a scratch stack in low memory until the kernel sets its own
    sregs.cs = code
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data
    vcpu.set_sregs(sregs)
    vcpu.set_regs(regs)
