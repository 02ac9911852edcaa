"""VM exits decoded from ``struct kvm_run`` into small dataclasses.

The machine's run loop handles the two hot exits (port I/O and MMIO) from the raw
run page without building objects; everything else, and every caller outside the
hot loop, uses :func:`decode`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pyvmm.uapi import kvm as K


@dataclass(frozen=True, slots=True)
class IoExit:
    port: int
    size: int
    is_write: bool
    count: int
    data_offset: int


@dataclass(frozen=True, slots=True)
class MmioExit:
    addr: int
    size: int
    is_write: bool
    data: int  # little-endian value written; 0 for reads


@dataclass(frozen=True, slots=True)
class HltExit:
    pass


@dataclass(frozen=True, slots=True)
class ShutdownExit:
    """Triple fault or similar: the vCPU cannot continue."""


@dataclass(frozen=True, slots=True)
class InterruptedExit:
    """KVM_RUN returned EINTR (a kick) or KVM_EXIT_INTR."""


@dataclass(frozen=True, slots=True)
class IrqWindowOpenExit:
    ready: bool
    if_flag: bool


@dataclass(frozen=True, slots=True)
class IoapicEoiExit:
    vector: int


@dataclass(frozen=True, slots=True)
class SystemEventExit:
    type: int
    data: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InternalErrorExit:
    suberror: int
    data: tuple[int, ...]

    def describe(self) -> str:
        names = {
            K.KVM_INTERNAL_ERROR_EMULATION: "instruction emulation failed",
            K.KVM_INTERNAL_ERROR_SIMUL_EX: "exception during exception delivery",
            K.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
        }
        text = names.get(self.suberror, f"suberror {self.suberror}")
        # data[0] flags (1 = instruction bytes present), data[1] length, then bytes.
        if (self.suberror == K.KVM_INTERNAL_ERROR_EMULATION and len(self.data) >= 2
                and self.data[0] & 1):
            n = self.data[1] & 0xFF
            raw = b"".join(d.to_bytes(8, "little") for d in self.data[2:])[:n]
            text += f" (insn bytes {raw.hex(' ')})"
        return text


@dataclass(frozen=True, slots=True)
class FailEntryExit:
    reason: int


@dataclass(frozen=True, slots=True)
class UnknownExit:
    reason: int


Exit = (
    IoExit
    | MmioExit
    | HltExit
    | ShutdownExit
    | InterruptedExit
    | IrqWindowOpenExit
    | IoapicEoiExit
    | SystemEventExit
    | InternalErrorExit
    | FailEntryExit
    | UnknownExit
)

_u8 = struct.Struct("<B")
_u16 = struct.Struct("<H")
_u32 = struct.Struct("<I")
_u64 = struct.Struct("<Q")


def decode(run: memoryview | bytes | bytearray) -> Exit:
    """Decode the exit described by a ``struct kvm_run`` image."""
    reason = _u32.unpack_from(run, K.KVM_RUN_EXIT_REASON)[0]
    if reason == K.KVM_EXIT_IO:
        direction, size, port, count = struct.unpack_from("<BBHI", run, K.KVM_RUN_IO_DIRECTION)
        off = _u64.unpack_from(run, K.KVM_RUN_IO_DATA_OFFSET)[0]
        return IoExit(port, size, direction == K.KVM_EXIT_IO_OUT, count, off)
    if reason == K.KVM_EXIT_MMIO:
        addr = _u64.unpack_from(run, K.KVM_RUN_MMIO_PHYS_ADDR)[0]
        length = _u32.unpack_from(run, K.KVM_RUN_MMIO_LEN)[0]
        is_write = bool(run[K.KVM_RUN_MMIO_IS_WRITE])
        n = min(length, 8)
        data = int.from_bytes(bytes(run[K.KVM_RUN_MMIO_DATA : K.KVM_RUN_MMIO_DATA + n]), "little")
        return MmioExit(addr, length, is_write, data if is_write else 0)
    if reason == K.KVM_EXIT_HLT:
        return HltExit()
    if reason == K.KVM_EXIT_SHUTDOWN:
        return ShutdownExit()
    if reason == K.KVM_EXIT_INTR:
        return InterruptedExit()
    if reason == K.KVM_EXIT_IRQ_WINDOW_OPEN:
        return IrqWindowOpenExit(
            bool(run[K.KVM_RUN_READY_FOR_INTERRUPT_INJECTION]), bool(run[K.KVM_RUN_IF_FLAG])
        )
    if reason == K.KVM_EXIT_IOAPIC_EOI:
        return IoapicEoiExit(run[K.KVM_RUN_EOI_VECTOR])
    if reason == K.KVM_EXIT_SYSTEM_EVENT:
        typ, ndata = struct.unpack_from("<II", run, K.KVM_RUN_SYSTEM_EVENT_TYPE)
        ev = struct.unpack_from(f"<{min(ndata, 16)}Q", run, K.KVM_RUN_SYSTEM_EVENT_TYPE + 8)
        return SystemEventExit(typ, tuple(ev))
    if reason == K.KVM_EXIT_INTERNAL_ERROR:
        sub, ndata = struct.unpack_from("<II", run, K.KVM_RUN_INTERNAL_SUBERROR)
        words = struct.unpack_from(f"<{min(ndata, 16)}Q", run, K.KVM_RUN_INTERNAL_DATA)
        return InternalErrorExit(sub, tuple(words))
    if reason == K.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(_u64.unpack_from(run, K.KVM_RUN_FAIL_ENTRY_REASON)[0])
    return UnknownExit(reason)
