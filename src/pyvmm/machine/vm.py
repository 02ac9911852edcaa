"""A running machine: KVM VM, guest RAM, buses, legacy devices, the vCPU run loop.

Threads: the vCPU thread only runs KVM_RUN and dispatches exits to the buses; the
caller's thread runs the event loop (host I/O such as serial input) and waits for
the VM to stop. A stop — test-exit port, i8042 reset, triple fault, error, timeout,
Ctrl-C — is recorded once and the vCPU is kicked out of KVM_RUN.
"""

from __future__ import annotations

import json
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyvmm import pvm
from pyvmm.acpi import tables as acpi_tables
from pyvmm.backends.block import RawBlockBackend
from pyvmm.backends.char import SerialIo
from pyvmm.backends.io_pool import IoPool
from pyvmm.backends.tap import Tap
from pyvmm.bus import IoBus, MmioBus
from pyvmm.devices.legacy.debug_exit import DebugExit
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.ioapic import IOAPIC_SIZE
from pyvmm.devices.legacy.pic import Elcr
from pyvmm.devices.legacy.pit import Pit, Port61
from pyvmm.devices.legacy.rtc import Rtc
from pyvmm.devices.legacy.uart import Serial
from pyvmm.devices.nvme.controller import NvmeController
from pyvmm.devices.pci.testdev import PciTestDev
from pyvmm.devices.testdev import TestDev
from pyvmm.devices.virtio.blk import VirtioBlk
from pyvmm.devices.virtio.console import VirtioConsole
from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.devices.virtio.net import VirtioNet
from pyvmm.devices.virtio.rng import VirtioRng
from pyvmm.devices.virtio.transport.mmio import VirtioMmioDevice
from pyvmm.devices.virtio.transport.pci import VirtioPciDevice
from pyvmm.errors import KvmError
from pyvmm.event import EventManager
from pyvmm.event.timerfd import TimerFd
from pyvmm.irq.chip import KernelIrqChip
from pyvmm.irq.split import Locked, SplitIrqChip
from pyvmm.kvm import Kvm, Vcpu, Vm, exits
from pyvmm.kvm.ioctl import EINTR, get_errno, ioctl_int
from pyvmm.kvm.vcpu import install_kick_handler
from pyvmm.loader import load_kernel
from pyvmm.loader.boot import setup_entry_state, write_multiboot_info, write_pvh_start_info
from pyvmm.loader.e820 import e820_map
from pyvmm.loader.image import BootImage, Format
from pyvmm.machine import layout as L
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.fastpath import IoeventfdFastPath
from pyvmm.machine.memslots import MemslotMapper
from pyvmm.machine.pci import build_pci
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.sharing.ratelimit import TokenBucket
from pyvmm.uapi import kvm as K

REQUIRED_CAPS = (
    K.KVM_CAP_USER_MEMORY,
    K.KVM_CAP_IRQCHIP,
    K.KVM_CAP_IOEVENTFD,
    K.KVM_CAP_IRQFD,
    K.KVM_CAP_IMMEDIATE_EXIT,
    K.KVM_CAP_EXT_CPUID,
)

EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in vars(K).items()
              if k.startswith("KVM_EXIT_") and isinstance(v, int) and k not in (
                  "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


# How long a stop waits for a vCPU thread to leave KVM_RUN and its exit handler.
VCPU_STOP_GRACE_S = 5.0


@dataclass
class RunResult:
    reason: str  # "debug-exit", "reset", "shutdown", "error", "timeout", "interrupted"
    exit_code: int
    message: str = ""
    wall_time: float = 0.0
    exit_counts: dict[str, int] = field(default_factory=dict)


class Machine:
    def __init__(self, cfg: MachineConfig, kvm: Kvm | None = None) -> None:
        cfg.validate()
        self.cfg = cfg
        self.kvm = kvm or Kvm()
        self._own_kvm = kvm is None
        self.kvm.require(REQUIRED_CAPS)
        self.is_pvm = pvm.check(self.kvm, quiet=cfg.quiet)
        self.guest_errors = OnceLog()
        self.exit_counts: Counter[int] = Counter()
        self.result: RunResult | None = None
        self._stop_lock = threading.Lock()
        self._stopping = False
        self.vcpu_stuck = False
        self.vcpu_thread: threading.Thread | None = None
        self.events = EventManager()
        self.vm = Vm(self.kvm)
        self.mem = GuestMemory(L.ram_layout(cfg.memory))
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    # --- assembly --------------------------------------------------------------------
    def _build(self) -> None:
        cfg, vm = self.cfg, self.vm
        vm.set_tss_addr(L.KVM_TSS_ADDR)
        self.irqchip: KernelIrqChip | SplitIrqChip
        if cfg.irqchip == "split":
            self.irqchip = SplitIrqChip(vm)
        else:
            self.irqchip = KernelIrqChip(vm)
        self.irqchip.use_irqfd = cfg.msi == "irqfd"
        self.irqchip.create()
        self.timers: list[TimerFd] = []
        for slot, r in enumerate(self.mem.regions()):
            vm.set_user_memory_region(slot, r.guest_addr, r.size, r.host_addr)

        self.pio = IoBus()
        self.mmio = MmioBus()
        self.serial_io = SerialIo(cfg.serial, self.events)
        self.serial = Serial(
            output=self.serial_io.write,
            irq=self.irqchip.line(L.COM1_GSI),
            on_rx_space=self.serial_io.resume_input,
        )
        self.serial_io.attach(self.serial)
        self.pio.insert(self.serial, L.COM1_BASE, 8, "serial0")
        self.i8042 = I8042(on_reset=lambda: self.stop("reset", 0, "guest reset via i8042"))
        self.pio.insert(self.i8042, L.I8042_DATA_PORT, 1, "i8042")
        self.pio.insert(self.i8042, L.I8042_STATUS_PORT, 1, "i8042")
        self.debug_exit = DebugExit(self._on_debug_exit, cfg.debug_exit_size)
        self.pio.insert(self.debug_exit, cfg.debug_exit_port, cfg.debug_exit_size, "debug-exit")
        self.pio.insert(_Sink(), L.POST_PORT, 1, "post")
        self._build_chipset()
        self.testdev = TestDev()
        self.mmio.insert(self.testdev, L.TESTDEV_MMIO, 0x1000, "testdev")
        self.fast_path = IoeventfdFastPath(vm, self.events)
        self.virtio = self._virtio_devices()
        self.memslots = MemslotMapper(vm, first_slot=len(list(self.mem.regions())))
        self.pci = build_pci(self.pio, self.mmio, self.mem, self.irqchip, cfg.pci_testdev,
                             [*self.virtio, *self.nvme], bar_mapper=self.memslots)
        for _, dev in self.pci.functions():
            pin_gsi = dev.config.data[0x3C] if dev.config.data[0x3D] else None
            if pin_gsi is not None:
                dev.intx = self.irqchip.line(pin_gsi)

        self.image = load_kernel(cfg.kernel, self.mem, load_addr=cfg.load_addr, entry=cfg.entry)
        self.vcpu = vm.create_vcpu(0)
        self.vcpu.set_cpuid2(self.kvm.supported_cpuid())
        if isinstance(self.irqchip, SplitIrqChip):
            self.irqchip.attach(self.vcpu)
        self._write_boot_info(self.image)

    def _virtio_devices(self) -> list[VirtioPciDevice]:
        """virtio-pci devices (returned, for the PCI root) and virtio-mmio devices
        (placed in the ACPI-described slots here)."""
        pci: list[VirtioDevice] = []
        self.block_backends: list[RawBlockBackend] = []
        self.virtio_mmio: list[VirtioMmioDevice] = []
        slots = iter(L.virtio_mmio_slots())

        def place(dev: VirtioDevice, transport: str) -> None:
            if transport != "mmio":
                pci.append(dev)
                return
            base, gsi = next(slots)
            m = VirtioMmioDevice(dev, self.mem, self.irqchip.line(gsi),
                                 defer=self.events.call_soon, fast_path=self.fast_path)
            self.mmio.insert(m, base, L.VIRTIO_MMIO_SLOT_SIZE, m.name)
            m.attach(base)
            self.virtio_mmio.append(m)

        self.io_pool: IoPool | None = IoPool() if self.cfg.disks else None
        self.nvme: list[NvmeController] = []
        for i, d in enumerate(self.cfg.disks):
            be = RawBlockBackend(d.path, d.readonly)
            self.block_backends.append(be)
            if d.interface == "nvme":
                self.nvme.append(NvmeController(be, self.mem, self.irqchip,
                                                serial=f"pyvmm-nvme{i}"))
                continue
            place(VirtioBlk(be, serial=f"pyvmm-disk{i}", pool=self.io_pool), d.transport)
        self.taps: list[Tap] = []
        for i, n in enumerate(self.cfg.nets):
            tap = Tap("" if n.tap == "auto" else n.tap)
            self.taps.append(tap)
            mac = bytes.fromhex(n.mac.replace(":", "")) if n.mac else bytes(
                (0x52, 0x54, 0x00, 0x12, 0x34, 0x56 + i))
            place(VirtioNet(tap, mac, self.events), n.transport)
        self.console_io: SerialIo | None = None
        if self.cfg.console is not None:
            self.console_io = SerialIo(self.cfg.console, self.events)
            console = VirtioConsole(self.console_io.write)
            console.on_rx_space = self.console_io.resume_input
            self.console_io.attach(console)
            place(console, self.cfg.console_transport)
        if self.cfg.rng:
            limit = None if self.cfg.rng_rate is None else TokenBucket(self.cfg.rng_rate)
            place(VirtioRng(limit, self.events.call_later), self.cfg.rng)
        return [VirtioPciDevice(dev, self.mem, self.irqchip, defer=self.events.call_soon,
                                fast_path=self.fast_path) for dev in pci]

    def _timer(self, lock: threading.RLock, on_timer: Callable[[int], None]) -> TimerFd:
        t = TimerFd()
        self.timers.append(t)

        def fire(fd: int, ev: int) -> None:
            with lock:
                on_timer(t.read())

        self.events.add(t.fd, fire)
        return t

    def _build_chipset(self) -> None:
        """PIC, IOAPIC and PIT: Python models on the split chip, KVM's own on the kernel
        chip. The RTC is Python in both."""
        chip, pio = self.irqchip, self.pio
        lock = chip.lock if isinstance(chip, SplitIrqChip) else threading.RLock()
        self.chipset_lock = lock
        self.pit: Pit | None = None
        if isinstance(chip, SplitIrqChip):
            pio.insert(Locked(chip.pic.master, lock), L.PIC_MASTER, 2, "pic-master")
            pio.insert(Locked(chip.pic.slave, lock), L.PIC_SLAVE, 2, "pic-slave")
            pio.insert(Locked(Elcr(chip.pic), lock), L.ELCR, 2, "elcr")
            self.mmio.insert(Locked(chip.ioapic, lock), L.IOAPIC_BASE, IOAPIC_SIZE, "ioapic")
            irq0 = chip.line(0)
            pit = Pit(irq0=irq0.pulse)
            pit.timer = self._timer(lock, pit.on_timer)
            pio.insert(Locked(pit, lock), L.PIT_BASE, 4, "pit")
            pio.insert(Locked(Port61(pit), lock), L.PORT61, 1, "port61")
            self.pit = pit
        else:
            self.vm.create_pit2(K.KVM_PIT_SPEAKER_DUMMY)
        rtc_irq = chip.line(L.RTC_GSI)
        self.rtc = Rtc(irq=rtc_irq.pulse, memory_bytes=self.cfg.memory)
        self.rtc.timer = self._timer(lock, self.rtc.on_timer)
        pio.insert(Locked(self.rtc, lock), L.RTC_BASE, 2, "rtc")

    def _write_boot_info(self, img: BootImage) -> None:
        e820 = e820_map(self.cfg.memory, L.PCI_HOLE_START)
        self.mem.write(L.CMDLINE, self.cfg.cmdline.encode() + b"\0")
        self.acpi = acpi_tables.build()
        for addr, blob in self.acpi.blobs.values():
            self.mem.write(addr, blob)
        if img.format is Format.MULTIBOOT:
            write_multiboot_info(self.mem, L.MULTIBOOT_INFO, L.CMDLINE, L.MULTIBOOT_MMAP, e820)
            info = L.MULTIBOOT_INFO
        else:
            write_pvh_start_info(self.mem, L.PVH_START_INFO, L.CMDLINE, L.PVH_MEMMAP, e820,
                                 rsdp_addr=self.acpi.rsdp_addr)
            info = L.PVH_START_INFO
        setup_entry_state(self.vcpu, self.mem, img, gdt_addr=L.BOOT_GDT,
                          pml4_addr=L.IDENTITY_PML4, info_addr=info)

    # --- stopping --------------------------------------------------------------------
    def _on_debug_exit(self, code: int) -> None:
        self.stop("debug-exit", code, f"guest wrote {(code - 1) >> 1:#x} to the test-exit port")

    def stop(self, reason: str, code: int, message: str = "") -> None:
        with self._stop_lock:
            if self.result is None:
                self.result = RunResult(reason, code, message)
            self._stopping = True
        if threading.get_ident() != self.vcpu.thread_id:
            self.vcpu.kick()
        self.events.call_soon(lambda: None)  # wake the event loop

    # --- running ---------------------------------------------------------------------
    def run(self) -> RunResult:
        install_kick_handler()
        t0 = time.monotonic()
        cpu0 = time.thread_time()
        thread = threading.Thread(target=self._vcpu_thread, name="vcpu0", daemon=True)
        self.vcpu_thread = thread
        thread.start()
        deadline = None if self.cfg.timeout is None else t0 + self.cfg.timeout
        try:
            while not self._stopping:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.events.run_once(wait)  # contains what its callbacks raise
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop("timeout", 124, f"no result within {self.cfg.timeout:g} s")
        except KeyboardInterrupt:
            self.stop("interrupted", 130, "interrupted")
        except Exception as e:  # the loop itself failed (not a callback): report, stop
            self.stop("error", 1, f"internal error in the event loop: {e!r}")
        self._join_vcpu(thread)
        assert self.result is not None
        self.result.wall_time = time.monotonic() - t0
        self.event_loop_cpu = time.thread_time() - cpu0  # device work + host I/O
        self.result.exit_counts = {EXIT_NAMES.get(k, str(k)): v
                                   for k, v in sorted(self.exit_counts.items())}
        self.serial_io.flush()
        return self.result

    def _join_vcpu(self, thread: threading.Thread) -> None:
        """Kick the vCPU out of KVM_RUN until its thread ends — but not forever: a thread
        stuck in device code (a loop a guest found) never sees the kick, and a stop that
        waited for it would make neither --timeout nor Ctrl-C end the VMM. After the
        grace period the thread is abandoned (it is a daemon) and said to be; ``close``
        leaves the VM and guest memory it may still touch alone while it lives."""
        grace = VCPU_STOP_GRACE_S
        give_up = time.monotonic() + grace
        while thread.is_alive():
            try:
                self.vcpu.kick()
                thread.join(0.05)
            except KeyboardInterrupt:
                break  # a second Ctrl-C: stop waiting now
            if time.monotonic() >= give_up:
                break
        if thread.is_alive():
            self.vcpu_stuck = True
            assert self.result is not None
            self.result.message += (f"; vCPU 0 did not stop within {grace:g} s "
                                    "(stuck in device code) and was abandoned")

    def _vcpu_thread(self) -> None:
        vcpu = self.vcpu
        vcpu.thread_id = threading.get_ident()
        try:
            self._run_loop(vcpu)
        except KvmError as e:
            self.stop("error", 1, f"KVM_RUN failed: {e}")
        except Exception as e:  # a VMM bug: report it, never hang the caller
            self.stop("error", 1, f"internal error in the vCPU loop: {e!r}")

    def _run_loop(self, vcpu: Vcpu) -> None:
        # The hot path: raw ioctl, fields unpacked from the run page, bus dispatch.
        # Everything the loop touches is bound to locals first.
        run = vcpu.run_page
        fd = vcpu.fd
        kvm_run = K.KVM_RUN
        io_hdr = struct.Struct("<BBHIQ").unpack_from
        mmio_hdr = struct.Struct("<QQIB").unpack_from
        reason_of = struct.Struct("<I").unpack_from
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        counts = self.exit_counts
        EXIT_IO, EXIT_MMIO = K.KVM_EXIT_IO, K.KVM_EXIT_MMIO
        split = self.irqchip if isinstance(self.irqchip, SplitIrqChip) else None
        pic = split.pic if split is not None else None
        n_io = n_mmio = 0
        try:
            while not self._stopping:
                if pic is not None and (pic.level or run[0]):
                    assert split is not None
                    split.inject(vcpu)
                if ioctl_int(fd, kvm_run, 0) < 0:
                    err = get_errno()
                    if err != EINTR:
                        raise KvmError("KVM_RUN", err)
                    run[K.KVM_RUN_IMMEDIATE_EXIT] = 0
                    counts[K.KVM_EXIT_INTR] += 1
                    continue
                reason = reason_of(run, 8)[0]
                try:
                    if reason == EXIT_IO:
                        n_io += 1
                        direction, size, port, count, off = io_hdr(run, 32)
                        for _ in range(count):
                            if direction:
                                pio_write(port, size, int.from_bytes(run[off:off + size], "little"))
                            else:
                                # Masked: a device that answers wider than the access
                                # (or negative) must not make the conversion raise and
                                # leave stale data in the guest's register.
                                run[off:off + size] = (pio_read(port, size) & (
                                    (1 << (8 * size)) - 1)).to_bytes(size, "little")
                            off += size
                    elif reason == EXIT_MMIO:
                        n_mmio += 1
                        addr, data, length, is_write = mmio_hdr(run, 32)
                        if length > 8:
                            length = 8
                        if is_write:
                            mmio_write(addr, length, data & ((1 << (8 * length)) - 1))
                        else:
                            v = mmio_read(addr, length) & ((1 << (8 * length)) - 1)
                            run[40:40 + length] = v.to_bytes(length, "little")
                    else:
                        counts[reason] += 1
                        self._slow_exit(exits.decode(run))
                except Exception as e:  # a device raised on guest input: contain it
                    self.guest_errors.warn(f"device-error:{type(e).__name__}",
                                           f"device error handling exit {reason}: {e!r}")
        finally:
            counts[EXIT_IO] += n_io
            counts[EXIT_MMIO] += n_mmio

    def _slow_exit(self, e: exits.Exit) -> None:
        if isinstance(e, exits.ShutdownExit):
            r, sr = self.vcpu.get_regs(), self.vcpu.get_sregs()
            self.stop("shutdown", 1, f"guest triple fault (KVM_EXIT_SHUTDOWN) at rip={r.rip:#x} "
                      f"rsp={r.rsp:#x} cs={sr.cs.selector:#x} rflags={r.rflags:#x}")
        elif isinstance(e, exits.SystemEventExit):
            if e.type == K.KVM_SYSTEM_EVENT_RESET:
                self.stop("reset", 0, "guest reset")
            else:
                self.stop("shutdown", 0, f"guest system event {e.type}")
        elif isinstance(e, exits.InternalErrorExit):
            regs = self.vcpu.get_regs()
            self.stop("error", 1, f"KVM internal error at rip={regs.rip:#x}: {e.describe()}")
        elif isinstance(e, exits.FailEntryExit):
            self.stop("error", 1, f"KVM entry failed, hardware reason {e.reason:#x}")
        elif isinstance(e, exits.HltExit):
            self.stop("shutdown", 0, "guest halted")
        elif isinstance(e, exits.IoapicEoiExit):
            if isinstance(self.irqchip, SplitIrqChip):
                self.irqchip.eoi(e.vector)
        elif isinstance(e, exits.InterruptedExit | exits.IrqWindowOpenExit):
            pass  # the loop injects pending PIC interrupts before re-entering
        else:
            self.guest_errors.warn(f"exit:{type(e).__name__}", f"unhandled exit {e}")

    # --- reporting -------------------------------------------------------------------
    def exit_report(self) -> dict[str, Any]:
        r = self.result
        return {
            "result": None if r is None else {
                "reason": r.reason, "exit_code": r.exit_code, "message": r.message,
                "wall_time_s": r.wall_time,
                "event_loop_cpu_s": getattr(self, "event_loop_cpu", 0.0),
            },
            "exits": {EXIT_NAMES.get(k, str(k)): v for k, v in sorted(self.exit_counts.items())},
            "buses": [self.pio.snapshot(), self.mmio.snapshot()],
            "guest_errors": dict(self.guest_errors.counts),
            # Exceptions the event loop contained: faults (PyvmmErrors) and VMM bugs.
            "event_loop": {"faults": self.events.faults, "bugs": self.events.bugs,
                           "errors": dict(self.events.errors.counts)},
            "vcpu_stuck": self.vcpu_stuck,
            "irqchip": self._irqchip_report(),
            "virtio": [{"device": v.name, "requests": v.device.requests,
                        "deferred_to_io_pool": getattr(v.device, "deferred", 0),
                        "bytes": v.device.bytes, "notifications": v.core.notifications,
                        "interrupts": v.interrupts, "needs_reset": v.core.needs_reset_count,
                        "bugs": v.core.bugs}
                       for v in self.virtio_transports()],
            "pci": {"bad_config_accesses": self.pci.bad_config_accesses,
                    "rejected_bars": self.pci.rejected_bars,
                    "msis_sent": self.irqchip.msis_sent,
                    "msis_dropped": self.irqchip.msis_dropped,
                    "msix_bad_accesses": sum(
                        d.msix.bad_accesses for _, d in self.pci.functions()
                        if isinstance(d, PciTestDev))},
            "nvme": [{"device": n.serial, "commands": n.commands, "bytes": n.bytes,
                      "fatal": bool(n.csts & 2), "errors": dict(n.errors.counts)}
                     for n in self.nvme],
            "serial": {"tx_bytes": self.serial.tx_bytes, "rx_dropped": self.serial.rx_dropped},
        }

    def virtio_transports(self) -> list[VirtioPciDevice | VirtioMmioDevice]:
        return [*self.virtio, *self.virtio_mmio]

    def _irqchip_report(self) -> dict[str, Any]:
        chip = self.irqchip
        rep: dict[str, Any] = {"mode": self.cfg.irqchip, "msis_sent": chip.msis_sent,
                               "msis_dropped": chip.msis_dropped, "msi_path": self.cfg.msi,
                               "msis_by_irqfd": chip.msis_by_irqfd,
                               "gsi_route_commits": chip.routing.commits}
        if isinstance(chip, SplitIrqChip):
            rep.update(pic_injected=chip.injected, ioapic_delivered=chip.ioapic.delivered,
                       ioapic_eois=chip.eois, pic_spurious=chip.pic.spurious)
        if self.pit is not None:
            rep.update(pit_ticks=self.pit.ticks, pit_missed=self.pit.missed,
                       pit_due=self.pit.due.due())
        rep.update(rtc_periodic=self.rtc.periodic_interrupts, rtc_missed=self.rtc.periodic_missed,
                   rtc_due=self.rtc.periodic_due.due())
        return rep

    def write_exits_json(self, path: str) -> None:
        Path(path).write_text(json.dumps(self.exit_report(), indent=2) + "\n")

    def format_exit_table(self) -> str:
        rows = [("device", "bus", "base", "reads", "writes", "exits")]
        for bus in (self.pio, self.mmio):
            for r in bus.ranges():
                if r.reads or r.writes:
                    rows.append((r.name, bus.kind, f"{r.base:#x}", str(r.reads), str(r.writes),
                                 str(r.reads + r.writes)))
            unclaimed: Counter[int] = Counter()
            for (_, addr), c in bus.unclaimed.items():
                unclaimed[addr] += c
            for addr, c in sorted(unclaimed.items()):
                rd = bus.unclaimed.get(("r", addr), 0)
                rows.append(("(unclaimed)", bus.kind, f"{addr:#x}", str(rd), str(c - rd), str(c)))
        widths = [max(len(row[i]) for row in rows) for i in range(6)]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                 for row in rows]
        total = sum(self.exit_counts.values())
        kinds = ", ".join(f"{EXIT_NAMES.get(k, k)} {v}"
                          for k, v in sorted(self.exit_counts.items()))
        lines.append(f"total exits: {total} ({kinds})")
        return "\n".join(lines)

    def close(self) -> None:
        if self.vcpu_thread is not None and self.vcpu_thread.is_alive():
            # A vCPU thread still runs device code against this VM, its memory and its
            # backends: freeing them under it could crash the process or reuse fds it
            # still writes to. They go when the process exits.
            return
        for t in getattr(self, "timers", []):
            t.close()
        if getattr(self, "io_pool", None) is not None:
            self.io_pool.close()  # type: ignore[union-attr]  # before the image fds close
        for be in getattr(self, "block_backends", []):
            be.close()
        for tap in getattr(self, "taps", []):
            tap.close()
        if hasattr(self, "serial_io"):
            self.serial_io.close()
        if getattr(self, "console_io", None) is not None:
            self.console_io.close()  # type: ignore[union-attr]
        if hasattr(self, "pci"):
            for _, dev in self.pci.functions():
                dev.close()  # before the VM: a shared BAR's memslot goes with it
        if hasattr(self, "irqchip"):
            self.irqchip.close()
        self.vm.close()
        self.mem.close()
        self.events.close()
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> Machine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Sink:
    """Port 0x80: POST codes and I/O delays; writes are dropped, reads see 0xff."""

    def read(self, base: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        pass


def run_machine(cfg: MachineConfig, stream: Any = None) -> RunResult:
    """Build, run and report (the CLI's ``run``)."""
    out = stream or sys.stderr
    with Machine(cfg) as m:
        result = m.run()
        if not cfg.quiet:
            print(f"pyvmm: VM stopped: {result.message or result.reason} "
                  f"(exit code {result.exit_code}, {result.wall_time:.3f} s)", file=out)
            print(m.format_exit_table(), file=out)
        if cfg.exits_json:
            m.write_exits_json(cfg.exits_json)
        return result
