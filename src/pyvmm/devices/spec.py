"""What a device module declares so that the builder, the command line, the JSON config,
``pyvmm info``, the vfio-user export and docs/config.md can all use it.

A device module ends with one ``DeviceSpec``: its name (the JSON ``"type"`` and
``--device NAME``), its typed config class (a dataclass of ``schema.option`` fields),
what kind of device it is — which decides where the builder puts it — and
``create(cfg, ctx)``. ``pyvmm.registry.DEVICES`` lists the specs explicitly (no
import-time registration). The device sees only a ``HostContext``: guest memory, the
event loop, its interrupt, a shared block I/O pool, and a place to register what must
be closed — never the machine.

Kinds:
- ``VIRTIO``: ``create`` returns a ``VirtioDevice``; the builder wraps it in the
  transport the config names (virtio-pci in the next free slot, or a virtio-mmio slot
  described in the DSDT).
- ``PCI``: ``create`` returns a ``PCIDevice``; it gets the next free slot, its BARs in the
  PCI windows, INTx on its slot's GSI.
- ``ISA``: fixed resources, found by probing, not enumeration: ``create`` returns a bus
  device and the spec lists its port/MMIO ranges and GSI.

A PCI function may have fixed legacy resources too (an IDE function in compatibility
mode decodes 0x1F0 and drives IRQ 14 besides its BARs): the spec's ``isa`` ranges are
then placed as well, with the function itself as their bus device, and ``gsi`` names
its ISA lines.

Several entries may make one device between them: ``ctx.shared(key, make)`` returns
the host's one object for ``key`` (the IDE disks attach to one PIIX function). A
device an earlier entry already returned is placed only once.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypeVar

from pyvmm.backends.block import RawBlockBackend
from pyvmm.schema import option
from pyvmm.sharing.ratelimit import Limits

if TYPE_CHECKING:
    from pyvmm.backends.io_pool import IoPool
    from pyvmm.devices.assigned.shmem import BarMapper
    from pyvmm.event import EventManager
    from pyvmm.irq.line import InterruptLine
    from pyvmm.irq.msi import MsiSink
    from pyvmm.memory import GuestMemory, TrackedMemory

T = TypeVar("T")


class Kind(enum.StrEnum):
    VIRTIO = "virtio"
    PCI = "pci"
    ISA = "isa"


class Mode(enum.StrEnum):
    """How the guest's accesses reach the device's logic (what docs/api.md reports)."""

    EMULATED = "emulated"  # registers trapped: every access an exit to the VMM
    PARAVIRTUAL = "paravirtual"  # virtio: rings in guest memory, kicks by ioeventfd
    OUT_OF_PROCESS = "out-of-process"  # virtio rings served by another process
    ASSIGNED = "assigned"  # BARs mapped into the guest, interrupts by irqfd


class Transport(enum.StrEnum):
    PCI = "pci"
    MMIO = "mmio"


@dataclass(kw_only=True)
class DeviceConfig:
    """Base of every device's config (fields common to all: none yet)."""


@dataclass(kw_only=True)
class VirtioConfig(DeviceConfig):
    transport: Transport = option(Transport.PCI, "virtio-pci, or a virtio-mmio slot in the "
                                  "DSDT")


@dataclass(kw_only=True)
class LimitsConfig(DeviceConfig):
    """Token buckets for a device's operations and bytes (Firecracker's semantics: each
    refills at its rate up to its burst; a request waits in the ring while either is
    empty, nothing is dropped)."""

    iops: int | None = option(None, "at most this many requests per second (none: no limit)")
    iops_burst: int | None = option(None, "requests that may go at once after idling "
                                    "(default: one second's worth)")
    bps: int | None = option(None, "at most this many bytes per second (none: no limit)")
    bps_burst: int | None = option(None, "bytes that may go at once after idling "
                                   "(default: one second's worth)")

    def check(self) -> None:
        if (more := getattr(super(), "check", None)) is not None:
            more()  # a config that mixes this in with others checks theirs too
        for key in ("iops", "iops_burst", "bps", "bps_burst"):
            v = getattr(self, key)
            if v is not None and v <= 0:
                raise ValueError(f"{key} must be a positive number")
        if self.iops_burst is not None and self.iops is None:
            raise ValueError("iops_burst needs iops")
        if self.bps_burst is not None and self.bps is None:
            raise ValueError("bps_burst needs bps")

    def limits(self) -> Limits:
        return Limits(self.iops, self.iops_burst, self.bps, self.bps_burst)


@dataclass(kw_only=True)
class DiskConfig(DeviceConfig):
    """What every disk device takes, whatever its interface."""

    path: str = option(doc="raw disk image", metavar="IMG")
    readonly: bool = option(False, "serve the image read-only (the guest sees a "
                            "write-protected disk)")
    serial: str | None = option(None, "the serial number the driver reads (20 printable "
                                "ASCII characters at most; default: made from the device "
                                "and its index)")

    def check(self) -> None:
        if (more := getattr(super(), "check", None)) is not None:
            more()
        if self.serial is not None and (len(self.serial) > 20 or not self.serial.isascii()
                                        or not self.serial.isprintable()):
            raise ValueError(f"serial {self.serial!r}: at most 20 printable ASCII characters")

    def validate(self) -> None:
        """Before the VM is built: the image opens (and locks) as asked, or one line."""
        RawBlockBackend(self.path, self.readonly).close()

    def open(self, ctx: HostContext) -> RawBlockBackend:
        """The image, closed with the host."""
        be = RawBlockBackend(self.path, self.readonly)
        ctx.on_close(be.close)
        return be


class IsaRange(NamedTuple):
    space: str  # "pio" or "mmio"
    base: int
    size: int
    name: str = ""  # the range's name in the exit table: "<device>.<name>" (or "<device>")


class HostContext(Protocol):
    """What a device gets from whoever hosts it (the VMM's builder, the vfio-user
    export, a test)."""

    mem: GuestMemory
    events: EventManager
    name: str  # this instance, e.g. "virtio-blk0"
    index: int  # how many devices of this type came before it
    msi: MsiSink

    def line(self, index: int = 0) -> InterruptLine:
        """An ISA interrupt line of the device: its spec's ``gsi`` (the ``index``-th of
        a tuple)."""
        ...

    def shared(self, key: str, make: Callable[[], T]) -> T:
        """The host's one object for ``key``, made by ``make`` the first time: a
        controller several config entries attach to."""
        ...

    def io_pool(self) -> IoPool:
        """The block I/O pool shared by the host's disks (made on first use)."""
        ...

    def on_close(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` when the host tears down (after the guest has stopped)."""
        ...

    def memory_map(self) -> list[tuple[int, int, int]]:
        """The guest's e820 map as the boot protocol hands it over: (address, size,
        type) with type 1 RAM, 2 reserved (firmware interfaces such as fw_cfg's
        ``etc/e820``)."""
        ...

    def cpus(self) -> int:
        """How many vCPUs the guest has."""
        ...

    def tracked_memory(self, size: int, name: str) -> TrackedMemory:
        """Device memory the guest maps at memory speed and whose writes the host learns
        from a dirty log (a display's framebuffer): the VMM's is a dirty-logged KVM
        memslot wherever the device ``moved()`` it, other hosts' trap and track. Closed
        with the host."""
        ...

    def bar_mapper(self) -> BarMapper | None:
        """Maps host memory into the guest at a BAR's address (KVM memslots in a VM),
        so the guest's accesses there never exit; None where the host cannot (the
        vfio-user export, tests): such BARs are trapped."""
        ...


class DeviceSpec(NamedTuple):
    # A NamedTuple, not a frozen dataclass: every device module makes one at import,
    # and start-up is measured (a dataclass's class creation costs ~0.4 ms each).
    name: str
    config: type[DeviceConfig]
    kind: Kind
    create: Callable[[Any, HostContext], Any]
    summary: str
    option: str | None = None  # a command-line shortcut (--disk, --net, --rng)
    select: tuple[str, str] | None = None  # (key, value): which device a shared option means
    positional: str | None = None  # the key a bare value sets (--disk IMG)
    isa: tuple[IsaRange, ...] = ()  # fixed ranges: an ISA device's, or a PCI function's
    gsi: int | tuple[int, ...] | None = None  # fixed ISA interrupt line(s): ctx.line(i)
    exportable: bool = True  # can be served over vfio-user (PCI and virtio kinds)
    doc: str = ""  # docs/devices/<page>.md
    mode: Mode | None = None  # default: PARAVIRTUAL for VIRTIO, else EMULATED

    @property
    def io_mode(self) -> Mode:
        if self.mode is not None:
            return self.mode
        return Mode.PARAVIRTUAL if self.kind is Kind.VIRTIO else Mode.EMULATED
