"""A machine's lifecycle: built (``machine/builder.py``), run (``machine/runloop.py`` on
the vCPU thread, the event loop on its own; the caller's thread waits), paused and resumed, stopped,
reported (``machine/report.py``), closed.

States: CREATED → RUNNING ⇄ PAUSED → STOPPED; a call in the wrong state raises
``StateError``. A stop — test-exit port, i8042 reset, triple fault, error, timeout,
Ctrl-C — is recorded once and the vCPU is kicked out of KVM_RUN.
"""

from __future__ import annotations

import enum
import json
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pyvmm import pvm, sandbox
from pyvmm.backends.char import SerialIo
from pyvmm.backends.io_pool import IoPool
from pyvmm.devices.spec import DeviceSpec
from pyvmm.devices.virtio.transport.mmio import VirtioMmioDevice
from pyvmm.devices.virtio.transport.pci import VirtioPciDevice
from pyvmm.errors import (
    EXIT_GUEST_FAULT,
    EXIT_INTERNAL,
    EXIT_KVM,
    ConfigError,
    KvmError,
    StateError,
)
from pyvmm.event import EventManager
from pyvmm.event.timerfd import TimerFd
from pyvmm.irqchip.split import SplitIrqChip
from pyvmm.kvm import Kvm, Vcpu, Vm, exits
from pyvmm.kvm.vcpu import install_kick_handler
from pyvmm.machine import layout as L
from pyvmm.machine import report
from pyvmm.machine.builder import Builder
from pyvmm.machine.config import MachineConfig
from pyvmm.machine.runloop import RunFlags, run_vcpu
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.uapi import kvm as K

if TYPE_CHECKING:
    from pyvmm.acpi.tables import AcpiTables
    from pyvmm.bus import IoBus, MmioBus
    from pyvmm.devices.input.ps2_kbd import Ps2Keyboard
    from pyvmm.devices.input.ps2_mouse import Ps2Mouse
    from pyvmm.devices.legacy.debug_exit import DebugExit
    from pyvmm.devices.legacy.i8042 import I8042
    from pyvmm.devices.legacy.pit import Pit
    from pyvmm.devices.legacy.rtc import Rtc
    from pyvmm.devices.legacy.uart import Serial
    from pyvmm.devices.pci.root import PCIRoot
    from pyvmm.devices.testdev import TestDev
    from pyvmm.irqchip.kernel import KernelIrqChip
    from pyvmm.loader.image import BootImage
    from pyvmm.machine.fastpath import IoeventfdFastPath
    from pyvmm.machine.memslots import MemslotMapper

REQUIRED_CAPS = (
    K.KVM_CAP_USER_MEMORY,
    K.KVM_CAP_IRQCHIP,
    K.KVM_CAP_IOEVENTFD,
    K.KVM_CAP_IRQFD,
    K.KVM_CAP_IMMEDIATE_EXIT,
    K.KVM_CAP_EXT_CPUID,
)
EXIT_NAMES = report.EXIT_NAMES

# How long a stop waits for a vCPU thread to leave KVM_RUN and its exit handler.
VCPU_STOP_GRACE_S = 5.0


class VmState(enum.Enum):
    CREATED = "created"
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"


@dataclass
class RunResult:
    reason: str  # "debug-exit", "reset", "shutdown", "error", "timeout", "interrupted",
    # "terminated" (SIGTERM)
    exit_code: int
    message: str = ""
    wall_time: float = 0.0
    exit_counts: dict[str, int] = field(default_factory=dict)


class Machine:
    # Parts the builder puts in place (machine/builder.py).
    irqchip: KernelIrqChip | SplitIrqChip
    pio: IoBus
    mmio: MmioBus
    serial_io: SerialIo
    serial: Serial
    i8042: I8042
    keyboard: Ps2Keyboard  # host input: press/release/type_text (any thread)
    mouse: Ps2Mouse  # host input: move(dx, dy, dz, buttons) (any thread)
    debug_exit: DebugExit
    testdev: TestDev
    rtc: Rtc
    chipset_lock: threading.RLock
    fast_path: IoeventfdFastPath
    memslots: MemslotMapper
    pci: PCIRoot
    image: BootImage
    vcpu: Vcpu
    acpi: AcpiTables

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
        self.state = VmState.CREATED
        self.started_at: float | None = None  # time.monotonic() when run() began (uptime)
        self.flags = RunFlags()
        self._stop_lock = threading.Lock()
        self.vcpu_stuck = False
        self.vcpu_thread: threading.Thread | None = None
        self.event_loop_cpu = 0.0
        # CPU of the VMM's threads other than the vCPU's during run() (event loop, I/O
        # pool): host work per request. The vCPU thread's own CPU includes guest time.
        self.off_vcpu_cpu = 0.0
        self.vcpu_thread_cpu = 0.0
        self.events = EventManager()
        self.timers: list[TimerFd] = []
        self.closers: list[Callable[[], None]] = []  # devices' host resources
        self.io_pool: IoPool | None = None
        self.pit: Pit | None = None
        self.devices: list[tuple[str, DeviceSpec, object]] = []  # (name, spec, device)
        self.virtio: list[VirtioPciDevice] = []
        self.virtio_mmio: list[VirtioMmioDevice] = []
        self.vm = Vm(self.kvm)
        # Below 1 MiB, a device's fixed MMIO range (the VGA window) is its own, not RAM.
        holes = tuple(sorted({(r.base, r.size) for e in cfg.devices for r in e.spec.isa
                              if r.space == "mmio" and r.base < L.HIGH_MEMORY_START}))
        self.mem = GuestMemory(L.ram_layout(cfg.memory, holes))
        try:
            Builder(self).build()
        except BaseException:
            self.close()
            raise

    def _require(self, *states: VmState) -> None:
        if self.state not in states:
            raise StateError(self.state.value, "/".join(s.value for s in states))

    def virtio_transports(self) -> list[VirtioPciDevice | VirtioMmioDevice]:
        return [*self.virtio, *self.virtio_mmio]

    # --- stopping, pausing ------------------------------------------------------------
    def on_debug_exit(self, code: int) -> None:
        self.stop("debug-exit", code, f"guest wrote {(code - 1) >> 1:#x} to the test-exit port")

    def stop(self, reason: str, code: int, message: str = "") -> None:
        with self._stop_lock:
            if self.result is None:
                self.result = RunResult(reason, code, message)
            self.flags.stopping = True
            self.flags.resume.set()  # a paused vCPU must see the stop
        if threading.get_ident() != self.vcpu.thread_id:
            self.vcpu.kick()
        self.events.call_soon(lambda: None)  # wake the event loop

    def pause(self, timeout: float = 5.0) -> bool:
        """Park the vCPU outside KVM_RUN (from any thread but the vCPU's); True once it
        is parked. Devices on the event loop go on (their queues simply get no kicks)."""
        self._require(VmState.RUNNING)
        self.flags.resume.clear()
        self.flags.paused = True
        self.state = VmState.PAUSED
        self.vcpu.kick()
        deadline = time.monotonic() + timeout
        while not self.flags.parked.is_set() and not self.flags.stopping:
            if time.monotonic() > deadline:
                return False
            self.vcpu.kick()
            self.flags.parked.wait(0.01)
        return True

    def resume(self) -> None:
        self._require(VmState.PAUSED)
        self.flags.paused = False
        self.state = VmState.RUNNING
        self.flags.resume.set()

    # --- running ---------------------------------------------------------------------
    def run(self) -> RunResult:
        self._require(VmState.CREATED)
        self.state = VmState.RUNNING
        install_kick_handler()
        self.serial_io.started()
        # SIGTERM is a clean stop with a report, as Ctrl-C is (the main thread only:
        # Python delivers signals there).
        old_term = None
        if threading.current_thread() is threading.main_thread():
            old_term = signal.signal(signal.SIGTERM, lambda *_: self.stop(
                "terminated", 143, "SIGTERM"))
        sandbox.prepare(self.cfg.seccomp)
        t0 = self.started_at = time.monotonic()
        thread = threading.Thread(target=self._vcpu_thread, name="vcpu0", daemon=True)
        self.vcpu_thread = thread
        # The event loop runs on a thread of its own, so that it can have its own
        # seccomp filter while this thread — which may be a program's main thread —
        # stays unfiltered for what comes after run() (the report, files, close).
        loop = threading.Thread(target=self._event_loop_thread, args=(t0,),
                                name="event-loop", daemon=True)
        proc0 = time.process_time()
        # --display: drawn and written on this (unfiltered) thread between its waits, not
        # on the event loop, whose seccomp filter allows no file creation.
        screens = None
        if self.cfg.display is not None:
            from pyvmm.machine.display import PngOutput, ScreenWriter

            screens = ScreenWriter(self, PngOutput.parse(self.cfg.display))
        thread.start()
        loop.start()
        try:
            while loop.is_alive():
                # A timed wait: Ctrl-C and SIGTERM get through, and the screen is due.
                loop.join(0.5 if screens is None else min(0.5, screens.due()))
                if screens is not None and loop.is_alive():
                    screens.tick()
        except KeyboardInterrupt:
            self.stop("interrupted", 130, "interrupted")
            loop.join(VCPU_STOP_GRACE_S)
        self._join_vcpu(thread)
        if screens is not None and not self.vcpu_stuck:
            try:
                screens.write()  # the screen as the guest left it
            except OSError as e:
                self.result_note(f"display: cannot write a PNG: {e.strerror}")
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        self.state = VmState.STOPPED
        assert self.result is not None
        self.result.wall_time = time.monotonic() - t0
        self.off_vcpu_cpu = max(0.0, time.process_time() - proc0 - self.vcpu_thread_cpu)
        self.result.exit_counts = report.exit_kinds(self.exit_counts)
        self.serial_io.flush()
        return self.result

    def _event_loop_thread(self, t0: float) -> None:
        sandbox.name_thread("event-loop")
        sandbox.apply("event-loop", self.cfg.seccomp)
        cpu0 = time.thread_time()
        deadline = None if self.cfg.timeout is None else t0 + self.cfg.timeout
        try:
            while not self.flags.stopping:
                wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                self.events.run_once(wait)  # contains what its callbacks raise
                if deadline is not None and time.monotonic() >= deadline:
                    self.stop("timeout", 124, f"no result within {self.cfg.timeout:g} s")
        except Exception as e:  # the loop itself failed (not a callback): report, stop
            self.stop("error", EXIT_INTERNAL, f"internal error in the event loop: {e!r}")
        finally:
            self.event_loop_cpu = time.thread_time() - cpu0  # device work + host I/O

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
        sandbox.name_thread("vcpu0")
        sandbox.apply("vcpu", self.cfg.seccomp)
        cpu0 = time.thread_time()
        try:
            run_vcpu(vcpu, self.pio, self.mmio, self.irqchip, self.exit_counts,
                     self.guest_errors, self.flags, self._slow_exit)
        except KvmError as e:
            self.stop("error", EXIT_KVM, f"KVM_RUN failed: {e}")
        except Exception as e:  # a VMM bug: report it, never hang the caller
            self.stop("error", EXIT_INTERNAL, f"internal error in the vCPU loop: {e!r}")
        finally:
            self.vcpu_thread_cpu = time.thread_time() - cpu0  # guest time included

    def _slow_exit(self, e: exits.Exit) -> None:
        if isinstance(e, exits.ShutdownExit):
            r, sr = self.vcpu.get_regs(), self.vcpu.get_sregs()
            self.stop("shutdown", EXIT_GUEST_FAULT,
                      f"guest triple fault (KVM_EXIT_SHUTDOWN) at rip={r.rip:#x} "
                      f"rsp={r.rsp:#x} cs={sr.cs.selector:#x} rflags={r.rflags:#x}")
        elif isinstance(e, exits.SystemEventExit):
            if e.type == K.KVM_SYSTEM_EVENT_RESET:
                self.stop("reset", 0, "guest reset")
            else:
                self.stop("shutdown", 0, f"guest system event {e.type}")
        elif isinstance(e, exits.InternalErrorExit):
            regs = self.vcpu.get_regs()
            self.stop("error", EXIT_GUEST_FAULT,
                      f"KVM internal error at rip={regs.rip:#x}: {e.describe()}")
        elif isinstance(e, exits.FailEntryExit):
            self.stop("error", EXIT_GUEST_FAULT, f"KVM entry failed, hardware reason {e.reason:#x}")
        elif isinstance(e, exits.HltExit):
            self.stop("shutdown", 0, "guest halted")
        elif isinstance(e, exits.IoapicEoiExit):
            if isinstance(self.irqchip, SplitIrqChip):
                self.irqchip.eoi(e.vector)
        elif isinstance(e, exits.InterruptedExit | exits.IrqWindowOpenExit):
            pass  # the loop injects pending PIC interrupts before re-entering
        else:
            self.guest_errors.warn(f"exit:{type(e).__name__}", f"unhandled exit {e}")

    def result_note(self, text: str) -> None:
        if self.result is not None:
            self.result.message += f"; {text}"

    # --- the screen --------------------------------------------------------------------
    def display(self) -> Any:
        """The machine's display device (a ``StdVga``), or None."""
        for _, spec, dev in self.devices:
            if spec.name == "vga":
                return dev
        return None

    def screen(self) -> Any:
        """The display's screen as a Pillow RGB image (text mode drawn with the console
        font, framebuffer modes as they are), redrawn where the dirty log says; callable
        in any state, from any thread that does not race another ``screen()``."""
        dev = self.display()
        if dev is None:
            raise ConfigError("the machine has no display (--device vga)")
        return dev.screen()

    # --- reporting -------------------------------------------------------------------
    def exit_report(self) -> dict[str, Any]:
        return report.exit_report(self)

    def format_exit_table(self) -> str:
        return report.exit_table(self)

    def write_exits_json(self, path: str) -> None:
        try:
            Path(path).write_text(json.dumps(self.exit_report(), indent=2) + "\n")
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot write --exits-json {path}: "
                              f"{getattr(e, 'strerror', None) or e}") from None

    # --- teardown ----------------------------------------------------------------------
    def close(self) -> None:
        if self.vcpu_thread is not None and self.vcpu_thread.is_alive():
            # A vCPU thread still runs device code against this VM, its memory and its
            # backends: freeing them under it could crash the process or reuse fds it
            # still writes to. They go when the process exits.
            return
        for t in self.timers:
            t.close()
        if self.io_pool is not None:
            self.io_pool.close()  # before the image fds close
        for fn in reversed(self.closers):
            fn()
        self.closers.clear()
        if hasattr(self, "serial_io"):
            self.serial_io.close()
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


def run_machine(cfg: MachineConfig, stream: Any = None,
                attach: Callable[[Machine], Callable[[], None]] | None = None) -> RunResult:
    """Build, run and report (the CLI's ``run``). ``attach`` is called with the built
    machine before it runs (the control API) and returns what to call once it stopped."""
    out = stream or sys.stderr
    with Machine(cfg) as m:
        detach = attach(m) if attach is not None else None
        try:
            result = m.run()
        finally:
            if detach is not None:
                detach()  # the API socket goes with the VM, before the report
        if not cfg.quiet:
            print(f"pyvmm: VM stopped: {result.message or result.reason} "
                  f"(exit code {result.exit_code}, {result.wall_time:.3f} s)", file=out)
            print(m.format_exit_table(), file=out)
        if cfg.exits_json:
            m.write_exits_json(cfg.exits_json)
        return result
