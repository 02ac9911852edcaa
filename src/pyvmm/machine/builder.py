"""Building a machine from its config: the board (chipset, buses, boot structures) and
the devices the config lists, each made by its registry spec and placed by its kind.

Resources — PCI slots, virtio-mmio slots (each with its GSI), fixed ISA ranges — come
from the one machine map (``machine/layout.py``) through ``Pool``s, so nothing is
placed by hand arithmetic and running out is a one-line error naming the resource.
The DSDT describes exactly the virtio-mmio slots handed out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

from pyvmm import sandbox
from pyvmm.acpi import tables as acpi_tables
from pyvmm.backends.char import CharSpec, SerialIo
from pyvmm.backends.io_pool import IoPool
from pyvmm.backends.key_input import KeyInput
from pyvmm.bus import IoBus, MmioBus
from pyvmm.devices.assigned.shmem import BarMapper
from pyvmm.devices.legacy.debug_exit import DebugExit
from pyvmm.devices.legacy.i8042 import I8042
from pyvmm.devices.legacy.ioapic import IOAPIC_SIZE
from pyvmm.devices.legacy.pic import Elcr
from pyvmm.devices.legacy.pit import Pit, Port61
from pyvmm.devices.legacy.rtc import Rtc
from pyvmm.devices.legacy.uart import Serial
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.devices.spec import DeviceSpec, Kind, Transport
from pyvmm.devices.testdev import TestDev
from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.devices.virtio.transport.mmio import VirtioMmioDevice
from pyvmm.devices.virtio.transport.pci import VirtioPciDevice
from pyvmm.errors import ConfigError
from pyvmm.event import EventManager
from pyvmm.event.timerfd import TimerFd
from pyvmm.irq.line import InterruptLine
from pyvmm.irq.msi import MsiSink
from pyvmm.irqchip.kernel import KernelIrqChip
from pyvmm.irqchip.split import Locked, SplitIrqChip
from pyvmm.loader import load_kernel
from pyvmm.loader.boot import setup_entry_state, write_multiboot_info, write_pvh_start_info
from pyvmm.loader.e820 import e820_map
from pyvmm.loader.image import Format
from pyvmm.machine import layout as L
from pyvmm.machine.config import DeviceEntry, IrqChipKind, MsiPath
from pyvmm.machine.fastpath import IoeventfdFastPath
from pyvmm.machine.memslots import DirtyLoggedSlots, MemslotMapper
from pyvmm.machine.pci import build_pci
from pyvmm.memory import GuestMemory, TrackedMemory
from pyvmm.uapi import kvm as K

if TYPE_CHECKING:
    from pyvmm.machine.vm import Machine

R = TypeVar("R")
T = TypeVar("T")


class Pool(Generic[R]):
    """A machine resource handed out in order (PCI slots, virtio-mmio slots)."""

    def __init__(self, name: str, items: Iterable[R]) -> None:
        self.name = name
        self._items = list(items)
        self._total = len(self._items)
        self.taken: list[R] = []

    def take(self, for_what: str) -> R:
        if not self._items:
            raise ConfigError(f"no free {self.name} for {for_what}: the machine has "
                              f"{self._total}")
        item = self._items.pop(0)
        self.taken.append(item)
        return item


class BuildContext:
    """The ``HostContext`` a device's ``create`` gets from the VMM."""

    def __init__(self, b: Builder, spec: DeviceSpec, index: int) -> None:
        self._b, self._spec = b, spec
        self.mem: GuestMemory = b.m.mem
        self.events: EventManager = b.m.events
        self.msi: MsiSink = b.m.irqchip
        self.index = index
        self.name = f"{spec.name}{index}"

    def line(self, index: int = 0) -> InterruptLine:
        gsi = self._spec.gsi
        gsis = (gsi,) if isinstance(gsi, int) else gsi or ()
        if index >= len(gsis):
            raise ConfigError(f"{self._spec.name}: its spec names no GSI {index}")
        return self._b.m.irqchip.line(gsis[index])

    def shared(self, key: str, make: Callable[[], T]) -> T:
        objs = self._b.shared
        if key not in objs:
            objs[key] = make()
        return cast(T, objs[key])

    def io_pool(self) -> IoPool:
        m = self._b.m
        if m.io_pool is None:
            mode = m.cfg.seccomp
            sandbox.prepare(mode)
            m.io_pool = IoPool(thread_init=lambda: sandbox.apply("io-pool", mode))
            # closed by Machine.close before any image fd
        return m.io_pool

    def on_close(self, fn: Callable[[], None]) -> None:
        self._b.m.closers.append(fn)

    def memory_map(self) -> list[tuple[int, int, int]]:
        return [(e.addr, e.size, e.type)
                for e in e820_map(self._b.m.cfg.memory, L.PCI_HOLE_START)]

    def cpus(self) -> int:
        return 1

    def tracked_memory(self, size: int, name: str) -> TrackedMemory:
        t = TrackedMemory(size, name, DirtyLoggedSlots(self._b.m.memslots))
        # Before the VM and its memslots go (Machine.close runs closers first).
        self.on_close(t.close)
        return t

    def bar_mapper(self) -> BarMapper | None:
        return self._b.m.memslots


class Builder:
    def __init__(self, machine: Machine) -> None:
        self.m = machine
        self.pci_slots: Pool[int] = Pool("PCI slot", range(L.PCI_FIRST_FREE_SLOT, 32))
        self.mmio_slots: Pool[tuple[int, int]] = Pool("virtio-mmio slot",
                                                      L.virtio_mmio_slots())
        self.shared: dict[str, object] = {}  # BuildContext.shared

    def build(self) -> None:
        m = self.m
        cfg, vm = m.cfg, m.vm
        vm.set_tss_addr(L.KVM_TSS_ADDR)
        m.irqchip = (SplitIrqChip(vm) if cfg.irqchip is IrqChipKind.SPLIT
                     else KernelIrqChip(vm))
        m.irqchip.use_irqfd = cfg.msi is MsiPath.IRQFD
        m.irqchip.create()
        for slot, r in enumerate(m.mem.regions()):
            vm.set_user_memory_region(slot, r.guest_addr, r.size, r.host_addr)
        m.pio, m.mmio = IoBus(), MmioBus()
        self._board()
        m.fast_path = IoeventfdFastPath(vm, m.events)
        # Before the devices: an assigned function (vfio-user) maps its BARs with it, a
        # display's tracked memory takes dirty-logged memslots from it.
        m.memslots = MemslotMapper(vm, first_slot=len(list(m.mem.regions())))
        pci_devices = self._devices(cfg.devices)
        m.pci = build_pci(m.pio, m.mmio, m.mem, m.irqchip, cfg.pci_testdev, pci_devices,
                          bar_mapper=m.memslots)
        for _, dev in m.pci.functions():
            pin_gsi = dev.config.data[0x3C] if dev.config.data[0x3D] else None
            if pin_gsi is not None:
                dev.intx = m.irqchip.line(pin_gsi)
        m.image = load_kernel(cfg.kernel, m.mem, load_addr=cfg.load_addr, entry=cfg.entry)
        m.vcpu = vm.create_vcpu(0)
        m.vcpu.set_cpuid2(m.kvm.supported_cpuid())
        if isinstance(m.irqchip, SplitIrqChip):
            m.irqchip.attach(m.vcpu)
        self._boot_info()

    # --- the board: what every machine has ------------------------------------------------
    def _board(self) -> None:
        m, cfg = self.m, self.m.cfg
        m.serial_io = SerialIo(CharSpec.parse(cfg.serial), m.events,
                               read_stdin=cfg.keyboard != "stdin")
        m.serial = Serial(output=m.serial_io.write, irq=m.irqchip.line(L.COM1_GSI),
                          on_rx_space=m.serial_io.resume_input)
        m.serial_io.attach(m.serial)
        m.pio.insert(m.serial, L.COM1_BASE, 8, "serial0")
        m.i8042 = I8042(on_reset=lambda: m.stop("reset", 0, "guest reset via i8042"),
                        irq1=m.irqchip.line(L.I8042_KBD_GSI),
                        irq12=m.irqchip.line(L.I8042_AUX_GSI))
        m.keyboard, m.mouse = m.i8042.keyboard, m.i8042.mouse  # the library's input API
        if cfg.keyboard == "stdin":
            keys = KeyInput(m.events, m.keyboard)
            m.closers.append(keys.close)  # restores the terminal
            keys.start()
        m.pio.insert(m.i8042, L.I8042_DATA_PORT, 1, "i8042")
        m.pio.insert(m.i8042, L.I8042_STATUS_PORT, 1, "i8042")
        m.debug_exit = DebugExit(m.on_debug_exit, cfg.debug_exit_size)
        m.pio.insert(m.debug_exit, cfg.debug_exit_port, cfg.debug_exit_size, "debug-exit")
        m.pio.insert(PostSink(), L.POST_PORT, 1, "post")
        self._chipset()
        m.testdev = TestDev()
        m.mmio.insert(m.testdev, L.TESTDEV_MMIO, 0x1000, "testdev")

    def _timer(self, lock: threading.RLock, on_timer: Callable[[int], None]) -> TimerFd:
        t = TimerFd()
        self.m.timers.append(t)

        def fire(fd: int, ev: int) -> None:
            with lock:
                on_timer(t.read())

        self.m.events.add(t.fd, fire)
        return t

    def _chipset(self) -> None:
        """PIC, IOAPIC and PIT: Python models on the split chip, KVM's own on the kernel
        chip. The RTC is Python in both."""
        m = self.m
        chip, pio = m.irqchip, m.pio
        lock = chip.lock if isinstance(chip, SplitIrqChip) else threading.RLock()
        m.chipset_lock = lock
        if isinstance(chip, SplitIrqChip):
            pio.insert(Locked(chip.pic.master, lock), L.PIC_MASTER, 2, "pic-master")
            pio.insert(Locked(chip.pic.slave, lock), L.PIC_SLAVE, 2, "pic-slave")
            pio.insert(Locked(Elcr(chip.pic), lock), L.ELCR, 2, "elcr")
            m.mmio.insert(Locked(chip.ioapic, lock), L.IOAPIC_BASE, IOAPIC_SIZE, "ioapic")
            pit = Pit(irq0=chip.line(0).pulse, acks_irq0=lambda: chip.pic.unmasked(0))
            chip.pic.on_ack[0] = pit.acked
            pit.timer = self._timer(lock, pit.on_timer)
            pio.insert(Locked(pit, lock), L.PIT_BASE, 4, "pit")
            pio.insert(Locked(Port61(pit), lock), L.PORT61, 1, "port61")
            m.pit = pit
        else:
            m.vm.create_pit2(K.KVM_PIT_SPEAKER_DUMMY)
        m.rtc = Rtc(irq=chip.line(L.RTC_GSI), memory_bytes=m.cfg.memory)
        m.rtc.timer = self._timer(lock, m.rtc.on_timer)
        pio.insert(Locked(m.rtc, lock), L.RTC_BASE, 2, "rtc")

    # --- the configured devices -----------------------------------------------------------
    def _devices(self, entries: list[DeviceEntry]) -> list[PCIDevice]:
        """Make every configured device with its spec and place it by kind; returns the
        PCI functions (virtio-pci included) in slot order for the PCI root."""
        m = self.m
        counts: dict[str, int] = {}
        pci: list[PCIDevice] = []
        for entry in entries:
            spec, cfg = entry.spec, entry.config
            index = counts.get(spec.name, 0)
            counts[spec.name] = index + 1
            ctx = BuildContext(self, spec, index)
            dev: Any = spec.create(cfg, ctx)
            if any(dev is d for _, _, d in m.devices):
                continue  # attached to what an earlier entry made and placed (ctx.shared)
            m.devices.append((ctx.name, spec, dev))
            if spec.kind is Kind.VIRTIO:
                assert isinstance(dev, VirtioDevice)
                transport = getattr(cfg, "transport", Transport.PCI)
                if transport is Transport.MMIO:
                    base, gsi = self.mmio_slots.take(ctx.name)
                    t = VirtioMmioDevice(dev, m.mem, m.irqchip.line(gsi),
                                         defer=m.events.call_soon, fast_path=m.fast_path)
                    m.mmio.insert(t, base, L.VIRTIO_MMIO_SLOT_SIZE, t.name)
                    t.attach(base)
                    m.virtio_mmio.append(t)
                else:
                    self.pci_slots.take(ctx.name)
                    vp = VirtioPciDevice(dev, m.mem, m.irqchip, defer=m.events.call_soon,
                                         fast_path=m.fast_path)
                    m.virtio.append(vp)
                    pci.append(vp)
            elif spec.kind is Kind.PCI:
                assert isinstance(dev, PCIDevice)
                self.pci_slots.take(ctx.name)
                pci.append(dev)
                self._fixed(spec, dev, dev.name)  # legacy ranges it decodes besides BARs
            else:  # ISA: fixed resources, found by probing
                self._fixed(spec, dev, ctx.name)
        return pci

    def _fixed(self, spec: DeviceSpec, dev: Any, name: str) -> None:
        for r in spec.isa:
            bus = self.m.pio if r.space == "pio" else self.m.mmio
            try:
                bus.insert(dev, r.base, r.size, f"{name}.{r.name}" if r.name else name)
            except Exception as e:
                raise ConfigError(f"{name}: {r.space} {r.base:#x}+{r.size:#x} "
                                  f"is taken ({e})") from None

    # --- boot structures ----------------------------------------------------------------
    def _boot_info(self) -> None:
        m = self.m
        img, cfg = m.image, m.cfg
        e820 = e820_map(cfg.memory, L.PCI_HOLE_START)  # as BuildContext.memory_map
        m.mem.write(L.CMDLINE, cfg.cmdline.encode() + b"\0")
        m.acpi = acpi_tables.build(mmio_slots=self.mmio_slots.taken)
        for addr, blob in m.acpi.blobs.values():
            m.mem.write(addr, blob)
        if img.format is Format.MULTIBOOT:
            write_multiboot_info(m.mem, L.MULTIBOOT_INFO, L.CMDLINE, L.MULTIBOOT_MMAP, e820)
            info = L.MULTIBOOT_INFO
        else:
            write_pvh_start_info(m.mem, L.PVH_START_INFO, L.CMDLINE, L.PVH_MEMMAP, e820,
                                 rsdp_addr=m.acpi.rsdp_addr)
            info = L.PVH_START_INFO
        setup_entry_state(m.vcpu, m.mem, img, gdt_addr=L.BOOT_GDT,
                          pml4_addr=L.IDENTITY_PML4, info_addr=info)


class PostSink:
    """Port 0x80: POST codes and I/O delays; writes are dropped, reads see 0xff."""

    def read(self, base: int, offset: int, size: int) -> int:
        return (1 << (8 * size)) - 1

    def write(self, base: int, offset: int, size: int, value: int) -> None:
        pass
