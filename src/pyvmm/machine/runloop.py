"""The vCPU run loop: KVM_RUN, then the exit dispatched to the buses — the hot path.

Port I/O and MMIO exits are decoded straight from the mmap'd run page at the
header-checked ``KVM_RUN_*`` offsets (a dataclass per hot exit costs about a
microsecond); every other exit goes through ``kvm.exits.decode`` to ``slow_exit``.
Anything a device raises while handling a guest access is caught here, logged once
per kind and counted; the VM goes on. Read values are masked to the access size.
"""

from __future__ import annotations

import struct
import threading
from collections import Counter
from collections.abc import Callable
from typing import TYPE_CHECKING

from pyvmm.errors import KvmError
from pyvmm.irqchip.split import SplitIrqChip
from pyvmm.kvm import Vcpu, exits
from pyvmm.kvm.ioctl import EINTR, get_errno, ioctl_int
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import kvm as K

if TYPE_CHECKING:
    from pyvmm.bus import IoBus, MmioBus
    from pyvmm.irqchip.kernel import KernelIrqChip


class RunFlags:
    """What the loop checks: ``stopping`` once per exit (a slot read, as cheap as a
    local); ``paused`` only when a kick has interrupted KVM_RUN, so pausing costs the
    hot path nothing."""

    __slots__ = ("parked", "paused", "resume", "stopping")

    def __init__(self) -> None:
        self.stopping = False
        self.paused = False
        self.resume = threading.Event()  # set while not paused
        self.resume.set()
        self.parked = threading.Event()  # set while the vCPU waits in a pause


def run_vcpu(vcpu: Vcpu, pio: IoBus, mmio: MmioBus, irqchip: KernelIrqChip | SplitIrqChip,
             counts: Counter[int], guest_errors: OnceLog, flags: RunFlags,
             slow_exit: Callable[[exits.Exit], None]) -> None:
    # Everything the loop touches is bound to locals first.
    run = vcpu.run_page
    fd = vcpu.fd
    kvm_run = K.KVM_RUN
    io_hdr = struct.Struct("<BBHIQ").unpack_from
    mmio_hdr = struct.Struct("<QQIB").unpack_from
    reason_of = struct.Struct("<I").unpack_from
    # The layouts above are the kvm_run union's io and mmio members, read from their
    # first field; tests/unit/test_uapi_kvm.py checks the offsets against <linux/kvm.h>.
    OFF_REASON, OFF_EXIT = K.KVM_RUN_EXIT_REASON, K.KVM_RUN_EXIT_UNION
    OFF_MMIO_DATA, OFF_IMMEDIATE = K.KVM_RUN_MMIO_DATA, K.KVM_RUN_IMMEDIATE_EXIT
    OFF_REQ_WINDOW = K.KVM_RUN_REQUEST_INTERRUPT_WINDOW
    pio_read, pio_write = pio.read, pio.write
    mmio_read, mmio_write = mmio.read, mmio.write
    EXIT_IO, EXIT_MMIO = K.KVM_EXIT_IO, K.KVM_EXIT_MMIO
    split = irqchip if isinstance(irqchip, SplitIrqChip) else None
    pic = split.pic if split is not None else None
    n_io = n_mmio = 0
    try:
        while not flags.stopping:
            if pic is not None and (pic.level or run[OFF_REQ_WINDOW]):
                assert split is not None
                split.inject(vcpu)
            if ioctl_int(fd, kvm_run, 0) < 0:
                err = get_errno()
                if err != EINTR:
                    raise KvmError("KVM_RUN", err)
                run[OFF_IMMEDIATE] = 0
                counts[K.KVM_EXIT_INTR] += 1
                if flags.paused:  # out of KVM_RUN by a pause's kick: park until resumed
                    flags.parked.set()
                    flags.resume.wait()
                    flags.parked.clear()
                continue
            reason = reason_of(run, OFF_REASON)[0]
            try:
                if reason == EXIT_IO:
                    n_io += 1
                    direction, size, port, count, off = io_hdr(run, OFF_EXIT)
                    mask = (1 << (8 * size)) - 1
                    for _ in range(count):
                        if direction:
                            pio_write(port, size, int.from_bytes(run[off:off + size], "little"))
                        else:
                            # Masked: a device that answers wider than the access (or
                            # negative) must not make the conversion raise and leave
                            # stale data in the guest's register.
                            run[off:off + size] = (pio_read(port, size) & mask).to_bytes(
                                size, "little")
                        off += size
                elif reason == EXIT_MMIO:
                    n_mmio += 1
                    addr, data, length, is_write = mmio_hdr(run, OFF_EXIT)
                    if length > 8:
                        length = 8
                    if is_write:
                        mmio_write(addr, length, data & ((1 << (8 * length)) - 1))
                    else:
                        v = mmio_read(addr, length) & ((1 << (8 * length)) - 1)
                        run[OFF_MMIO_DATA:OFF_MMIO_DATA + length] = v.to_bytes(length, "little")
                else:
                    counts[reason] += 1
                    slow_exit(exits.decode(run))
            except Exception as e:  # a device raised on guest input: contain it
                guest_errors.warn(f"device-error:{type(e).__name__}",
                                  f"device error handling exit {reason}: {e!r}")
    finally:
        counts[EXIT_IO] += n_io
        counts[EXIT_MMIO] += n_mmio
