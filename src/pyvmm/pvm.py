"""KVM-PVM detection and the start-up probe of what the tiny-guest runtime relies on.

On KVM-PVM (no VT-x/AMD-V) guest CPL3 code runs natively while CPL0 and real-mode
code go through KVM's instruction emulator; CPL3 ``in``/``out`` fault whatever IOPL
says. pyvmm's tiny guests are built around that (shared/pvm-guest-notes.md). The
probe runs a 30-byte hand-assembled guest that exercises exactly those behaviours —
CPL3 entry, ``int3`` through a DPL3 gate to a CPL0 handler doing port I/O, ``iretq``
back, a CPL3 MMIO write exit, and ``ud2`` reaching a CPL0 #UD handler — and fails
with a clear message if any step differs from what was measured.
"""

from __future__ import annotations

import contextlib
import logging
import struct

from pyvmm.errors import KvmError, PvmProbeError
from pyvmm.kvm import exits
from pyvmm.kvm.system import Kvm
from pyvmm.kvm.vm import Vm
from pyvmm.memory import GuestMemory
from pyvmm.uapi import kvm as K

PVM_NOTICE = (
    "/dev/kvm is KVM-PVM (no VT-x/AMD-V): guest CPL3 code runs natively, "
    "CPL0 and real-mode code run in KVM's instruction emulator (~1M instructions/s)"
)

_probe_result: bool | None = None
_notice_shown = False


def announce() -> None:
    """Say once per process, at INFO (``-v``), that this is PVM: every run on this host
    would otherwise begin with the same warning."""
    global _notice_shown
    if not _notice_shown:
        _notice_shown = True
        logging.getLogger("pyvmm").info(PVM_NOTICE)


# GDT: null, kernel code64, kernel data, user data, user code64, 16-byte TSS.
_GDT = struct.pack(
    "<7Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFF2000000FFFF,
    0x00AFFA000000FFFF, 0x0000890020000067, 0,
)
_INT3_HANDLER = bytes.fromhex("e610" "48cf")  # out %al,$0x10 ; iretq
_UD_HANDLER = bytes.fromhex("b099" "e611" "f4" "ebfd")  # mov $0x99,%al; out %al,$0x11; hlt; jmp
# mov $0x42,%al; int3; mov $0x5a5a5a5a,%eax; movabs %eax,0xf0000000; ud2
_USER_CODE = bytes.fromhex("b042" "cc" "b85a5a5a5a" "a3000000f000000000" "0f0b")
PROBE_MMIO = 0xF0000000


def _gate(handler: int, attr: int) -> bytes:
    return struct.pack("<HHHHII", handler & 0xFFFF, 0x08, attr, (handler >> 16) & 0xFFFF, 0, 0)


def _segment(selector: int, code: bool) -> K.kvm_segment:
    s = K.kvm_segment()
    s.selector, s.base, s.limit = selector, 0, 0xFFFFFFFF
    s.type, s.dpl, s.s, s.present, s.g = (11 if code else 3), 3, 1, 1, 1
    s.l, s.db = (1, 0) if code else (0, 1)
    return s


def run_probe(kvm: Kvm) -> list[str]:
    """Run the probe guest; returns the list of differences (empty: all as expected)."""
    vm = Vm(kvm)
    mem = GuestMemory([(0, 2 << 20)], name="pyvmm-pvm-probe")
    problems: list[str] = []
    try:
        with contextlib.suppress(KvmError):  # not needed on PVM; harmless where it fails
            vm.set_tss_addr(0xFFFBD000)
        r = next(mem.regions())
        vm.set_user_memory_region(0, 0, r.size, r.host_addr)
        mem.write(0x0, _GDT)
        mem.write(0x1000 + 3 * 16, _gate(0x8000, 0xEE00))
        mem.write(0x1000 + 6 * 16, _gate(0x8010, 0x8E00))
        mem.write(0x2004, struct.pack("<Q", 0x7000))
        mem.write(0x2066, struct.pack("<H", 0x68))
        mem.write(0x3000, struct.pack("<Q", 0x4000 | 7))
        mem.write(0x4000, struct.pack("<4Q", 0x5000 | 7, 0, 0, 0x6000 | 7))
        mem.write(0x5000, struct.pack("<Q", 0x87))
        mem.write(0x6000 + 0x180 * 8, struct.pack("<Q", PROBE_MMIO | 0x87))
        mem.write(0x8000, _INT3_HANDLER)
        mem.write(0x8010, _UD_HANDLER)
        mem.write(0x9000, _USER_CODE)
        vcpu = vm.create_vcpu(0)
        vcpu.set_cpuid2(kvm.supported_cpuid())
        s = vcpu.get_sregs()
        s.cs = _segment(0x23, True)
        s.ds = s.es = s.fs = s.gs = s.ss = _segment(0x1B, False)
        tr = K.kvm_segment()
        tr.selector, tr.base, tr.limit, tr.type, tr.present = 0x28, 0x2000, 0x67, 11, 1
        s.tr = tr
        s.gdt.base, s.gdt.limit = 0, len(_GDT) - 1
        s.idt.base, s.idt.limit = 0x1000, 0xFFF
        s.cr0, s.cr3, s.cr4, s.efer = 0x80050033, 0x3000, 0x620, 0x500
        vcpu.set_sregs(s)
        regs = K.kvm_regs()
        regs.rip, regs.rsp, regs.rflags = 0x9000, 0xA000, 0x2
        vcpu.set_regs(regs)

        def expect(what: str, ok: bool, got: exits.Exit) -> None:
            if not ok:
                extra = f" ({got.describe()})" if isinstance(got, exits.InternalErrorExit) else ""
                problems.append(f"{what}: got {got}{extra}")

        e = vcpu.run()
        expect("int3 from CPL3 to a CPL0 'out' on port 0x10",
               isinstance(e, exits.IoExit) and e.port == 0x10 and e.is_write
               and vcpu.run_page[e.data_offset] == 0x42, e)
        if not problems:
            e = vcpu.run()
            expect("iretq to CPL3, then a CPL3 MMIO write exit at 0xf0000000",
                   isinstance(e, exits.MmioExit) and e.addr == PROBE_MMIO and e.is_write
                   and e.data == 0x5A5A5A5A, e)
        if not problems:
            e = vcpu.run()
            expect("ud2 at CPL3 delivered to the CPL0 #UD handler (port 0x11)",
                   isinstance(e, exits.IoExit) and e.port == 0x11, e)
    finally:
        vm.close()
        mem.close()
    return problems


def check(kvm: Kvm, *, quiet: bool = False) -> bool:
    """On a PVM host: announce it and run the probe once per process. Returns is_pvm."""
    global _probe_result
    if not kvm.is_pvm():
        return False
    if not quiet:
        announce()
    if _probe_result is None:
        problems = run_probe(kvm)
        if problems:
            raise PvmProbeError(
                "KVM-PVM behaves differently from what pyvmm's guest runtime needs: "
                + "; ".join(problems)
            )
        _probe_result = True
    return True
