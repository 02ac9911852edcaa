"""The control API's responses as small dataclasses: the server builds these (never
loose dicts), and ``api/openapi.py`` makes the OpenAPI document from the same
declarations, so what is served and what is documented cannot drift apart.

A field's documentation is its ``doc(...)`` text. ``config`` values are the typed
config as JSON (``machine/config.py``'s schema, referenced as ``MachineConfig`` /
``DeviceConfig`` in the document).
"""

from __future__ import annotations

import dataclasses
from typing import Any


def doc(text: str, default: Any = dataclasses.MISSING) -> Any:
    """A response field with its one line of documentation."""
    return dataclasses.field(default=default, metadata={"doc": text})


@dataclasses.dataclass
class Error:
    """Every error answer, with a 4xx or 5xx status."""

    error: str = doc("what went wrong, one line")


@dataclasses.dataclass
class RunResult:
    """Why the VM stopped (null while it runs)."""

    reason: str = doc("debug-exit, reset, shutdown, error, timeout, interrupted, terminated "
                      "or api")
    exit_code: int = doc("the exit code pyvmm will exit with")
    message: str = doc("what happened, one line")


@dataclasses.dataclass
class VmInfo:
    """GET /api/v1/vm."""

    state: str = doc("created, running, paused or stopped")
    uptime_s: float = doc("seconds since the VM started running (0 before)")
    pid: int = doc("the VMM's process id")
    stopping: bool = doc("a stop was requested and the vCPU is leaving")
    result: RunResult | None = doc("why the VM stopped (null while it runs)")
    config: dict[str, Any] = doc("the machine's typed configuration, as the JSON config "
                                 "file spells it", dataclasses.MISSING)


@dataclasses.dataclass
class VmAction:
    """The answer to PUT vm.pause / vm.resume / vm.stop."""

    state: str = doc("the VM's state after the action")
    stopping: bool = doc("a stop was requested and the vCPU is leaving")
    parked: bool = doc("vm.pause: the vCPU is parked outside KVM_RUN (false: the pause is "
                       "requested but the vCPU was not seen to park within 5 s)", True)


@dataclasses.dataclass
class MapEntry:
    """One entry of the fixed machine map (machine/layout.py)."""

    name: str = doc("what the entry is called in the exit table")
    space: str = doc("ram, pio or mmio")
    base: int = doc("first address or port")
    size: int = doc("bytes or ports (0: as large as the kernel image)")
    gsi: int | None = doc("its interrupt line, if any")
    what: str = doc("description")


@dataclasses.dataclass
class BusRange:
    """A range a device decodes on a bus right now, with its access counts."""

    name: str = doc("the range's name (device, or device.barN)")
    bus: str = doc("pio or mmio")
    base: int = doc("first address or port")
    size: int = doc("bytes or ports")
    reads: int = doc("guest reads that trapped to this range")
    writes: int = doc("guest writes that trapped to this range")


@dataclasses.dataclass
class MachineMap:
    """GET /api/v1/vm.map: the fixed map `pyvmm info --machine` prints, and what each
    bus decodes in this VM now (BARs where the guest put them)."""

    map: list[MapEntry] = doc("the fixed machine map")
    pio: list[BusRange] = doc("port ranges decoded now")
    mmio: list[BusRange] = doc("MMIO ranges decoded now")


@dataclasses.dataclass
class PciBar:
    index: int = doc("BAR number")
    kind: str = doc("io, mem or mem64")
    address: int = doc("where the BAR is programmed now")
    size: int = doc("bytes")


@dataclasses.dataclass
class PciFunction:
    """One function of bus 0."""

    bdf: str = doc("bus:device.function, e.g. 00:02.0")
    name: str = doc("the device's name")
    vendor_id: int = doc("PCI vendor id")
    device_id: int = doc("PCI device id")
    class_code: int = doc("class, subclass and programming interface")
    intx_pin: str | None = doc("INTx pin A-D, if the function has one")
    intx_gsi: int | None = doc("the GSI its INTx pin is wired to")
    msix_vectors: int = doc("MSI-X table size (0: none)")
    bars: list[PciBar] = doc("its BARs")
    line: str = doc("the line `pyvmm info` and the pci_enum guest print")


@dataclasses.dataclass
class PciTree:
    """GET /api/v1/pci."""

    functions: list[PciFunction] = doc("every function, in slot order")


@dataclasses.dataclass
class Device:
    """One device: how the guest reaches it and what it counted."""

    name: str = doc("instance name (virtio-blk0, serial0)")
    type: str = doc("registry type (docs/config.md), or board for the chipset devices")
    kind: str = doc("virtio, pci, isa, or board")
    mode: str = doc("emulated, paravirtual, out-of-process or assigned")
    config: dict[str, Any] | None = doc("its typed config as JSON (null for the board)")
    ranges: list[BusRange] = doc("what it decodes, with trapped-access counts")
    exits: int = doc("trapped accesses over all its ranges")
    counters: dict[str, float] = doc("the device's own counters (requests, bytes, "
                                     "notifications, throttled, ...)")


@dataclasses.dataclass
class DeviceList:
    """GET /api/v1/devices."""

    devices: list[Device] = doc("board devices first, then the configured ones")


@dataclasses.dataclass
class DeviceExits:
    name: str = doc("the device (as in /api/v1/devices)")
    reads: int = doc("trapped reads")
    writes: int = doc("trapped writes")


@dataclasses.dataclass
class Interrupt:
    """One interrupt source as the VMM raises it."""

    route: str = doc("KVM_IRQ_LINE (a GSI of KVM's irqchip), split (pyvmm's PIC/IOAPIC), "
                     "irqfd (an MSI route of its own) or KVM_SIGNAL_MSI")
    gsi: int | None = doc("the GSI (null for KVM_SIGNAL_MSI)")
    vector: int | None = doc("the MSI vector it is routed to, where known")
    source: str | None = doc("the device that raises it, where known")
    count: int = doc("raised (lines: low-to-high edges; MSI: messages)")


@dataclasses.dataclass
class Counters:
    """GET /api/v1/vm.counters. Everything is a running total since the VM started."""

    uptime_s: float = doc("seconds since the VM started running")
    exits: dict[str, int] = doc("exits by kind; io and mmio counted as trapped bus "
                                "accesses while the VM runs (a rep string instruction is "
                                "one exit and several accesses)")
    devices: list[DeviceExits] = doc("trapped accesses by device")
    unclaimed: dict[str, int] = doc("accesses no device claimed, by bus")
    interrupts: list[Interrupt] = doc("interrupts by GSI/vector and route")
    msi: dict[str, int] = doc("MSI totals: sent, dropped (outside the LAPIC window), "
                              "by_irqfd, by_signal")


@dataclasses.dataclass
class TraceEntry:
    """One trapped access, decoded."""

    t_s: float = doc("seconds since the VM started running")
    vcpu: int | None = doc("the vCPU that made the access (null: not a vCPU thread)")
    bus: str = doc("pio or mmio")
    range: str = doc("the bus range (device, or device.barN)")
    offset: int = doc("offset into the range")
    size: int = doc("access size in bytes")
    access: str = doc("read or write")
    register: str = doc("the register's name from the device's spec (LCR, CONFIG_DATA), "
                        "or +offset where pyvmm has no decoder")
    value: int = doc("the value read or written")
    meaning: str = doc("the value decoded (8N1, DLAB=0; 00:02.0 VENDOR_ID)")


@dataclasses.dataclass
class Trace:
    """GET/PUT /api/v1/devices/{name}/trace."""

    device: str = doc("the device")
    enabled: bool = doc("accesses are being recorded")
    depth: int = doc("the ring's size: the newest this many accesses are kept")
    entries: list[TraceEntry] = doc("the ring, oldest first")


MODELS: tuple[type, ...] = (Error, RunResult, VmInfo, VmAction, MapEntry, BusRange,
                            MachineMap, PciBar, PciFunction, PciTree, Device, DeviceList,
                            DeviceExits, Interrupt, Counters, TraceEntry, Trace)


def to_json(obj: Any) -> Any:
    """A model as JSON-ready data."""
    return dataclasses.asdict(obj)
