"""A vCPU fd: register state, CPUID/MSRs/LAPIC, and KVM_RUN on its mmap'd run page."""

from __future__ import annotations

import ctypes
import mmap
import os
import signal
import threading

from pyvmm.kvm import exits
from pyvmm.kvm.ioctl import EINTR, get_errno, ioctl_int, ioctl_ptr
from pyvmm.uapi import kvm as K

# The signal used to kick a vCPU thread out of KVM_RUN. Its Python handler does
# nothing; the point is that the blocking ioctl returns EINTR.
KICK_SIGNAL = signal.SIGUSR1
_kick_installed = False


def install_kick_handler() -> None:
    """Install the no-op kick handler (must run on the main thread, once)."""
    global _kick_installed
    if not _kick_installed:
        signal.signal(KICK_SIGNAL, lambda *_: None)
        # Python installs handlers without SA_RESTART; make it explicit for KVM_RUN.
        signal.siginterrupt(KICK_SIGNAL, True)
        _kick_installed = True


class Vcpu:
    def __init__(self, fd: int, index: int, mmap_size: int) -> None:
        self.fd = fd
        self.index = index
        self.run_map = mmap.mmap(fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.run_page = memoryview(self.run_map)
        self.thread_id: int | None = None
        self._kicked = threading.Event()

    def close(self) -> None:
        if self.fd >= 0:
            self.run_page.release()
            self.run_map.close()
            os.close(self.fd)
            self.fd = -1

    # --- running -----------------------------------------------------------------------
    def run_raw(self) -> bool:
        """One KVM_RUN. True when the guest exited normally (read ``run_page``),
        False on EINTR (kicked). Other errors raise :class:`KvmError`."""
        if ioctl_int(self.fd, K.KVM_RUN, 0) < 0:
            err = get_errno()
            if err == EINTR:
                self.run_page[K.KVM_RUN_IMMEDIATE_EXIT] = 0
                return False
            from pyvmm.errors import KvmError

            raise KvmError("KVM_RUN", err)
        return True

    def run(self) -> exits.Exit:
        """KVM_RUN and decode the exit."""
        if not self.run_raw():
            return exits.InterruptedExit()
        return exits.decode(self.run_page)

    def kick(self) -> None:
        """Force the vCPU out of KVM_RUN from another thread.

        ``immediate_exit`` covers the window where the thread is about to enter
        KVM_RUN; the signal interrupts it if it is already inside.
        """
        self.run_page[K.KVM_RUN_IMMEDIATE_EXIT] = 1
        if self.thread_id is not None:
            signal.pthread_kill(self.thread_id, KICK_SIGNAL)

    # --- state -------------------------------------------------------------------------
    def get_regs(self) -> K.kvm_regs:
        r = K.kvm_regs()
        ioctl_ptr(self.fd, K.KVM_GET_REGS, r, "KVM_GET_REGS")
        return r

    def set_regs(self, r: K.kvm_regs) -> None:
        ioctl_ptr(self.fd, K.KVM_SET_REGS, r, "KVM_SET_REGS")

    def get_sregs(self) -> K.kvm_sregs:
        s = K.kvm_sregs()
        ioctl_ptr(self.fd, K.KVM_GET_SREGS, s, "KVM_GET_SREGS")
        return s

    def set_sregs(self, s: K.kvm_sregs) -> None:
        ioctl_ptr(self.fd, K.KVM_SET_SREGS, s, "KVM_SET_SREGS")

    def get_fpu(self) -> K.kvm_fpu:
        f = K.kvm_fpu()
        ioctl_ptr(self.fd, K.KVM_GET_FPU, f, "KVM_GET_FPU")
        return f

    def set_fpu(self, f: K.kvm_fpu) -> None:
        ioctl_ptr(self.fd, K.KVM_SET_FPU, f, "KVM_SET_FPU")

    def set_cpuid2(self, cpuid: ctypes.Structure) -> None:
        ioctl_ptr(self.fd, K.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        m = K.kvm_msrs_with(len(indices))()
        m.nmsrs = len(indices)
        for i, idx in enumerate(indices):
            m.entries[i].index = idx
        n = ioctl_ptr(self.fd, K.KVM_GET_MSRS, m, "KVM_GET_MSRS")
        return {m.entries[i].index: m.entries[i].data for i in range(n)}

    def set_msrs(self, values: dict[int, int]) -> int:
        m = K.kvm_msrs_with(len(values))()
        m.nmsrs = len(values)
        for i, (idx, val) in enumerate(values.items()):
            m.entries[i].index = idx
            m.entries[i].data = val
        return ioctl_ptr(self.fd, K.KVM_SET_MSRS, m, "KVM_SET_MSRS")

    def get_lapic(self) -> K.kvm_lapic_state:
        s = K.kvm_lapic_state()
        ioctl_ptr(self.fd, K.KVM_GET_LAPIC, s, "KVM_GET_LAPIC")
        return s

    def set_lapic(self, s: K.kvm_lapic_state) -> None:
        ioctl_ptr(self.fd, K.KVM_SET_LAPIC, s, "KVM_SET_LAPIC")

    def get_mp_state(self) -> int:
        s = K.kvm_mp_state()
        ioctl_ptr(self.fd, K.KVM_GET_MP_STATE, s, "KVM_GET_MP_STATE")
        return int(s.mp_state)

    def set_mp_state(self, state: int) -> None:
        ioctl_ptr(self.fd, K.KVM_SET_MP_STATE, K.kvm_mp_state(state), "KVM_SET_MP_STATE")

    def get_vcpu_events(self) -> K.kvm_vcpu_events:
        e = K.kvm_vcpu_events()
        ioctl_ptr(self.fd, K.KVM_GET_VCPU_EVENTS, e, "KVM_GET_VCPU_EVENTS")
        return e

    def set_vcpu_events(self, e: K.kvm_vcpu_events) -> None:
        ioctl_ptr(self.fd, K.KVM_SET_VCPU_EVENTS, e, "KVM_SET_VCPU_EVENTS")

    def interrupt(self, vector: int) -> None:
        """Queue an external interrupt (no in-kernel irqchip, or split irqchip)."""
        ioctl_ptr(self.fd, K.KVM_INTERRUPT, K.kvm_interrupt(vector), "KVM_INTERRUPT")
