"""KVM memslots for device memory (shared-memory BARs), after the RAM slots.

A slot is created with KVM_SET_USER_MEMORY_REGION and removed by setting it again with
size 0; freed slot numbers are reused. KVM refuses a slot overlapping another, so a
guest that moves a shared BAR onto RAM gets a KvmError here — the caller treats that as
a BAR it cannot map (its accesses then trap, as for any other BAR)."""

from __future__ import annotations

from pyvmm.kvm.vm import Vm
from pyvmm.uapi import kvm as K


class MemslotMapper:
    def __init__(self, vm: Vm, first_slot: int, max_slots: int = 32) -> None:
        self.vm = vm
        self._free = list(range(first_slot + max_slots - 1, first_slot - 1, -1))

    def map(self, gpa: int, size: int, host_addr: int, *, log_dirty: bool = False) -> object:
        if not self._free:
            raise RuntimeError("no free KVM memory slot for a device BAR")
        slot = self._free.pop()
        flags = K.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0
        try:
            self.vm.set_user_memory_region(slot, gpa, size, host_addr, flags)
        except BaseException:
            self._free.append(slot)
            raise
        return (slot, gpa, size)

    def unmap(self, handle: object) -> None:
        assert isinstance(handle, tuple)
        slot, gpa, _ = handle
        self.vm.set_user_memory_region(slot, gpa, 0, 0)
        self._free.append(slot)

    def dirty(self, handle: object) -> bytes:
        """The slot's dirty bitmap since the last call (KVM_GET_DIRTY_LOG clears it)."""
        assert isinstance(handle, tuple)
        slot, _, size = handle
        return bytes(self.vm.get_dirty_log(slot, size // 4096))


class DirtyLoggedSlots:
    """The ``DirtyLogMapper`` of ``TrackedMemory`` in a VM: memslots with
    KVM_MEM_LOG_DIRTY_PAGES from the machine's one ``MemslotMapper``."""

    def __init__(self, slots: MemslotMapper) -> None:
        self.slots = slots
        self.maps = 0  # how many times a tracked region was placed (reports, tests)

    def map(self, gpa: int, size: int, host_addr: int) -> object:
        h = self.slots.map(gpa, size, host_addr, log_dirty=True)
        self.maps += 1
        return h

    def unmap(self, handle: object) -> None:
        self.slots.unmap(handle)

    def dirty(self, handle: object) -> bytes:
        return self.slots.dirty(handle)
