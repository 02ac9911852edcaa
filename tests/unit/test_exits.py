from __future__ import annotations

import struct

from pyvmm.kvm import exits
from pyvmm.uapi import kvm as K


def page(reason: int) -> bytearray:
    run = bytearray(K.KVM_RUN_SIZE)
    struct.pack_into("<I", run, K.KVM_RUN_EXIT_REASON, reason)
    return run


def test_decode_io_out() -> None:
    run = page(K.KVM_EXIT_IO)
    struct.pack_into("<BBHIQ", run, 32, K.KVM_EXIT_IO_OUT, 2, 0x3F8, 1, 0x1000)
    assert exits.decode(run) == exits.IoExit(0x3F8, 2, True, 1, 0x1000)


def test_decode_mmio_write_and_read() -> None:
    run = page(K.KVM_EXIT_MMIO)
    struct.pack_into("<Q8sIB", run, 32, 0xFEF00000, (0xDEADBEEF).to_bytes(8, "little"), 4, 1)
    assert exits.decode(run) == exits.MmioExit(0xFEF00000, 4, True, 0xDEADBEEF)
    struct.pack_into("<B", run, K.KVM_RUN_MMIO_IS_WRITE, 0)
    assert exits.decode(run) == exits.MmioExit(0xFEF00000, 4, False, 0)


def test_decode_internal_error_names_the_instruction_bytes() -> None:
    run = page(K.KVM_EXIT_INTERNAL_ERROR)
    struct.pack_into("<IIQQQ", run, 32, K.KVM_INTERNAL_ERROR_EMULATION, 3, 1, 2, 0xCC0F)
    e = exits.decode(run)
    assert isinstance(e, exits.InternalErrorExit)
    assert "emulation failed" in e.describe() and "0f cc" in e.describe()


def test_decode_system_event_eoi_window_and_unknown() -> None:
    run = page(K.KVM_EXIT_SYSTEM_EVENT)
    struct.pack_into("<IIQ", run, 32, K.KVM_SYSTEM_EVENT_RESET, 1, 7)
    assert exits.decode(run) == exits.SystemEventExit(K.KVM_SYSTEM_EVENT_RESET, (7,))
    run = page(K.KVM_EXIT_IOAPIC_EOI)
    run[32] = 0x31
    assert exits.decode(run) == exits.IoapicEoiExit(0x31)
    run = page(K.KVM_EXIT_IRQ_WINDOW_OPEN)
    run[12], run[13] = 1, 0
    assert exits.decode(run) == exits.IrqWindowOpenExit(True, False)
    assert exits.decode(page(12345)) == exits.UnknownExit(12345)
    assert exits.decode(page(K.KVM_EXIT_SHUTDOWN)) == exits.ShutdownExit()


def test_decode_bounds_ndata_from_a_hostile_run_page() -> None:
    run = page(K.KVM_EXIT_INTERNAL_ERROR)
    struct.pack_into("<II", run, 32, 1, 0xFFFFFFFF)  # ndata far beyond the union
    e = exits.decode(run)
    assert isinstance(e, exits.InternalErrorExit) and len(e.data) == 16
