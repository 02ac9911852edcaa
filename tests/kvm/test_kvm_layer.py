"""The ioctl layer against the real /dev/kvm: capabilities, state round trips,
ioeventfd/irqfd, MSI, routing, PIT, split irqchip, and kicking a vCPU."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from pyvmm.errors import KvmUnavailable
from pyvmm.kvm import Kvm, Vm, exits
from pyvmm.kvm.vcpu import install_kick_handler
from pyvmm.kvm.vm import IrqchipRoute, MsiRoute
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.vm import Machine
from pyvmm.uapi import kvm as K


@pytest.fixture
def kvm() -> Kvm:
    k = Kvm()
    yield k  # type: ignore[misc]
    k.close()


def test_system_queries(kvm: Kvm) -> None:
    assert kvm.vcpu_mmap_size >= K.KVM_RUN_SIZE
    assert kvm.check_extension(K.KVM_CAP_USER_MEMORY) > 0
    cpuid = kvm.supported_cpuid()
    assert cpuid.nent > 10  # type: ignore[attr-defined]
    leaves = {cpuid.entries[i].function for i in range(cpuid.nent)}  # type: ignore[attr-defined]
    assert 0 in leaves and 1 in leaves
    msrs = kvm.msr_index_list()
    assert 0x10 in msrs or 0xC0000080 in msrs  # TSC or EFER


def test_require_names_the_missing_capability(kvm: Kvm) -> None:
    K.CAP_NAMES[9999] = "KVM_CAP_IMAGINARY"
    try:
        with pytest.raises(KvmUnavailable, match="KVM_CAP_IMAGINARY"):
            kvm.require([K.KVM_CAP_USER_MEMORY, 9999])
    finally:
        del K.CAP_NAMES[9999]


def test_vcpu_state_round_trips(kvm: Kvm) -> None:
    vm = Vm(kvm)
    try:
        vm.create_irqchip()
        v = vm.create_vcpu(0)
        regs = v.get_regs()
        regs.rax, regs.r15, regs.rip = 0x1234, 0xFEED, 0x100000
        v.set_regs(regs)
        got = v.get_regs()
        assert (got.rax, got.r15, got.rip) == (0x1234, 0xFEED, 0x100000)
        s = v.get_sregs()
        s.cr3 = 0x9000
        v.set_sregs(s)
        assert v.get_sregs().cr3 == 0x9000
        fpu = v.get_fpu()
        fpu.fcw = 0x27F
        fpu.xmm[0][0] = 0xAB
        v.set_fpu(fpu)
        got_fpu = v.get_fpu()
        # fcw and xmm round-trip; mxcsr does not on the PVM host this was written on
        # (reads back 0), so it is not asserted.
        assert (got_fpu.fcw, got_fpu.xmm[0][0]) == (0x27F, 0xAB)
        v.set_cpuid2(kvm.supported_cpuid())
        assert v.set_msrs({0x10: 12345}) == 1  # IA32_TSC
        assert 0x10 in v.get_msrs([0x10])
        lapic = v.get_lapic()
        lapic.regs[0xF0] = 0xFF
        lapic.regs[0xF1] = 0x01  # SVR: software enable, spurious vector 0xff
        v.set_lapic(lapic)
        assert v.get_lapic().regs[0xF1] & 1
        assert v.get_mp_state() == K.KVM_MP_STATE_RUNNABLE
        ev = v.get_vcpu_events()
        v.set_vcpu_events(ev)
    finally:
        vm.close()


def test_interrupt_plumbing_ioctls_are_accepted(kvm: Kvm) -> None:
    vm = Vm(kvm)
    try:
        vm.create_irqchip()
        vm.create_pit2()
        vm.create_vcpu(0)
        vm.set_gsi_routing([IrqchipRoute(4, K.KVM_IRQCHIP_IOAPIC, 4),
                            IrqchipRoute(4, K.KVM_IRQCHIP_PIC_MASTER, 4),
                            MsiRoute(24, 0xFEE00000, 0x41)])
        efd, rfd = os.eventfd(0), os.eventfd(0)
        vm.irqfd(efd, 4, resamplefd=rfd)
        vm.irqfd(efd, 4, resamplefd=rfd, deassign=True)
        vm.irqfd(efd, 24)
        vm.irqfd(efd, 24, deassign=True)
        vm.irq_line(4, 1)
        vm.irq_line(4, 0)
        assert vm.signal_msi(0xFEE00000, 0x41) >= 0
        os.close(efd)
        os.close(rfd)
    finally:
        vm.close()


def test_split_irqchip_must_precede_vcpus(kvm: Kvm) -> None:
    vm = Vm(kvm)
    try:
        vm.enable_split_irqchip(24)
        vm.create_vcpu(0)
    finally:
        vm.close()


def test_ioeventfd_takes_mmio_writes_without_exits(guests: Path) -> None:
    """The fast path: with an ioeventfd on the test register, mmio-loop's writes
    signal the eventfd in the kernel and never reach pyvmm."""
    iters = 5000
    cfg = MachineConfig.from_dict({"kernel": str(guests / "mmio_loop.elf"), "quiet": True,
                                   "cmdline": f"iters={iters}", "serial": "none"})
    with Machine(cfg) as m:
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        m.vm.ioeventfd(efd, 0xFEF00000, 4)
        assert m.run().exit_code == 0
        assert m.exit_counts[K.KVM_EXIT_MMIO] == 0
        assert m.testdev.writes == 0
        # eventfd counts add up: one signal per guest write
        assert os.eventfd_read(efd) == iters
        m.vm.ioeventfd(efd, 0xFEF00000, 4, deassign=True)
        os.close(efd)


def test_kick_interrupts_kvm_run(guests: Path) -> None:
    """A vCPU spinning natively at CPL3 leaves KVM_RUN only when kicked."""
    install_kick_handler()
    cfg = MachineConfig.from_dict({"kernel": str(guests / "spin.elf"), "quiet": True,
                                   "serial": "none"})
    with Machine(cfg) as m:
        got: list[exits.Exit] = []

        def loop() -> None:
            m.vcpu.thread_id = threading.get_ident()
            while True:
                e = m.vcpu.run()
                if isinstance(e, exits.IoExit) and not e.is_write:
                    m.vcpu.run_page[e.data_offset] = 0x60  # LSR: THR empty
                if isinstance(e, exits.InterruptedExit):
                    got.append(e)
                    return

        t = threading.Thread(target=loop)
        t.start()
        time.sleep(0.3)
        m.vcpu.kick()
        t.join(10)
        assert not t.is_alive()
        assert got == [exits.InterruptedExit()]


def test_acpi_tables_are_in_guest_memory_and_pvh_points_at_them(guests: Path) -> None:
    import struct

    from pyvmm.machine import layout as L

    cfg = MachineConfig.from_dict({"kernel": str(guests / "hello.elf"), "quiet": True,
                                   "serial": "none"})
    with Machine(cfg) as m:
        for addr, blob in m.acpi.blobs.values():
            assert m.mem.read(addr, len(blob)) == blob
        rsdp_paddr = struct.unpack("<Q", m.mem.read(L.PVH_START_INFO + 32, 8))[0]
        assert rsdp_paddr == m.acpi.rsdp_addr
        assert m.mem.read(rsdp_paddr, 8) == b"RSD PTR "


def test_pause_parks_the_vcpu_and_resume_lets_it_go_on(guests: Path) -> None:
    """The lifecycle (#10): CREATED -> RUNNING <-> PAUSED -> STOPPED; a pause parks the
    vCPU outside KVM_RUN, resume lets it run on, wrong-state calls raise StateError."""
    from pyvmm.errors import StateError
    from pyvmm.machine.vm import VmState

    cfg = MachineConfig.from_dict({"kernel": str(guests / "spin.elf"), "quiet": True,
                                   "serial": "none", "timeout": 120})
    with Machine(cfg) as m:
        with pytest.raises(StateError):
            m.pause()  # not running yet
        seen: dict[str, object] = {}

        def control() -> None:
            deadline = time.monotonic() + 60
            while m.state is not VmState.RUNNING or not m.serial.tx_bytes:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.01)  # polling for a state, not waiting a fixed time
            seen["paused"] = m.pause(timeout=30)
            seen["state"] = m.state
            seen["parked"] = m.flags.parked.is_set()
            try:
                m.resume()
                m.resume()  # resuming a running VM is the wrong state
            except StateError:
                seen["state_error"] = True
            seen["after"] = m.state
            m.stop("interrupted", 130, "stopped by the test")

        t = threading.Thread(target=control)
        t.start()
        r = m.run()
        t.join(30)
        assert not t.is_alive()
        assert seen == {"paused": True, "state": VmState.PAUSED, "parked": True,
                        "state_error": True, "after": VmState.RUNNING}
        assert (r.reason, r.exit_code) == ("interrupted", 130)
        assert m.state is VmState.STOPPED
        with pytest.raises(StateError):
            m.run()  # a stopped VM does not run again
