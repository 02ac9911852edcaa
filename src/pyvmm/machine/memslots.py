"""KVM memslots for device memory (shared-memory BARs), after the RAM slots.

A slot is created with KVM_SET_USER_MEMORY_REGION and removed by setting it again with
size 0; freed slot numbers are reused. KVM refuses a slot overlapping another, so a
guest that moves a shared BAR onto RAM gets a KvmError here — the caller treats that as
a BAR it cannot map (its accesses then trap, as for any other BAR)."""

from __future__ import annotations

from pyvmm.kvm.vm import Vm


class MemslotMapper:
    def __init__(self, vm: Vm, first_slot: int, max_slots: int = 32) -> None:
        self.vm = vm
        self._free = list(range(first_slot + max_slots - 1, first_slot - 1, -1))

    def map(self, gpa: int, size: int, host_addr: int) -> object:
        if not self._free:
            raise RuntimeError("no free KVM memory slot for a device BAR")
        slot = self._free.pop()
        try:
            self.vm.set_user_memory_region(slot, gpa, size, host_addr)
        except BaseException:
            self._free.append(slot)
            raise
        return (slot, gpa)

    def unmap(self, handle: object) -> None:
        assert isinstance(handle, tuple)
        slot, gpa = handle
        self.vm.set_user_memory_region(slot, gpa, 0, 0)
        self._free.append(slot)
