"""What the control API answers, read from a running ``Machine`` (``api/models.py``).

These run on the API's thread while the vCPU and the event loop run. They take no
lock the hot path takes: counters are Python ints (read atomically under the GIL) and
the counting dicts are copied with ``dict(d)`` — one C call, so a key the vCPU thread
adds meanwhile cannot break the copy. The bus range lists are copy-on-write.
"""

from __future__ import annotations

import contextlib
import enum
import os
import time
from typing import TYPE_CHECKING, Any

from pyvmm import schema
from pyvmm.api import models as M
from pyvmm.devices.pci.root import BarWindow
from pyvmm.devices.spec import DeviceConfig
from pyvmm.irqchip.kernel import IrqfdVector, KvmIrqLine
from pyvmm.irqchip.split import Locked, SplitLine
from pyvmm.machine import layout as L
from pyvmm.machine.pci import describe
from pyvmm.machine.report import EXIT_NAMES
from pyvmm.machine.vm import VmState
from pyvmm.schema import MiB, Size
from pyvmm.uapi import kvm as K
from pyvmm.uapi import pci as P

if TYPE_CHECKING:
    from pyvmm.bus import Bus, BusRange
    from pyvmm.machine.config import MachineConfig
    from pyvmm.machine.vm import Machine

EXIT_IO_NAME = "io"
EXIT_MMIO_NAME = "mmio"


# --- configs as JSON ----------------------------------------------------------------------
def _value(v: Any) -> Any:
    if isinstance(v, enum.Enum):
        return v.value
    if isinstance(v, Size):
        # As the config file spells sizes: text (a bare JSON integer would mean MiB).
        if v % (1 << 30) == 0 and v:
            return f"{v >> 30}G"
        return f"{v >> 20}M" if v % MiB == 0 else f"{v >> 10}K"
    if isinstance(v, list):
        return [_value(x) for x in v]
    return v


def config_json(cfg: object) -> dict[str, Any]:
    """A typed config as its JSON form (what ``schema.build`` reads back)."""
    return {f.key: _value(getattr(cfg, f.name)) for f in schema.fields_of(type(cfg))
            if f.key != "devices"}


def machine_config_json(cfg: MachineConfig) -> dict[str, Any]:
    """The machine's config as a JSON config file would spell it."""
    out = config_json(cfg)
    out["devices"] = [{"type": d.name, **config_json(d.config)} for d in cfg.devices]
    return out


# --- the VM ---------------------------------------------------------------------------------
def uptime(m: Machine) -> float:
    if m.started_at is None:
        return 0.0
    end = time.monotonic()
    if m.result is not None and m.state is VmState.STOPPED and m.result.wall_time:
        end = m.started_at + m.result.wall_time
    return max(0.0, end - m.started_at)


def vm_info(m: Machine) -> M.VmInfo:
    r = m.result
    return M.VmInfo(state=m.state.value, uptime_s=round(uptime(m), 6), pid=os.getpid(),
                    stopping=m.flags.stopping,
                    result=None if r is None else M.RunResult(r.reason, r.exit_code, r.message),
                    config=machine_config_json(m.cfg))


# --- the map and the PCI tree ---------------------------------------------------------------
def _range(bus: Bus, r: BusRange) -> M.BusRange:
    return M.BusRange(r.name, bus.kind, r.base, r.size, r.reads, r.writes)


def machine_map(m: Machine) -> M.MachineMap:
    return M.MachineMap(
        map=[M.MapEntry(e.name, e.space, e.base, e.size, e.gsi, e.what) for e in L.MACHINE_MAP],
        pio=[_range(m.pio, r) for r in m.pio.ranges()],
        mmio=[_range(m.mmio, r) for r in m.mmio.ranges()])


def pci_tree(m: Machine) -> M.PciTree:
    lines = describe(m.pci)
    out = []
    for ((bus, slot, fn), dev), line in zip(m.pci.functions(), lines, strict=True):
        c = dev.config
        pin = c.data[P.PCI_INTERRUPT_PIN]
        bars = [M.PciBar(b.index, "io" if b.is_io else ("mem64" if b.is_64bit else "mem"),
                         c.bar_address(b.index), b.size) for b in c.bars if b is not None]
        msix = getattr(dev, "msix", None)
        out.append(M.PciFunction(
            bdf=f"{bus:02x}:{slot:02x}.{fn}", name=getattr(dev, "name", type(dev).__name__),
            vendor_id=c.get16(0), device_id=c.get16(2),
            class_code=int.from_bytes(c.data[P.PCI_CLASS_PROG:P.PCI_CLASS_PROG + 3], "little"),
            intx_pin="ABCD"[pin - 1] if 1 <= pin <= 4 else None,
            intx_gsi=c.data[P.PCI_INTERRUPT_LINE] if pin else None,
            msix_vectors=len(getattr(msix, "_sinks", ())) if msix is not None else 0,
            bars=bars, line=line))
    return M.PciTree(out)


# --- devices -------------------------------------------------------------------------------
def _unwrap(dev: object) -> object:
    """The device behind a bus adapter (the chipset lock, a BAR window)."""
    while isinstance(dev, Locked | BarWindow):
        dev = dev.device
    return dev


def _numbers(d: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """A device's ``metrics()`` as flat numbers (nested dicts become ``a.b``)."""
    out: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, bool):
            out[prefix + k] = int(v)
        elif isinstance(v, int | float):
            out[prefix + k] = v
        elif isinstance(v, dict):
            out.update(_numbers(v, f"{prefix}{k}."))
    return out


class _Owner:
    def __init__(self, name: str, type_: str, kind: str, mode: str,
                 config: DeviceConfig | None, objs: list[object]) -> None:
        self.name, self.type, self.kind, self.mode = name, type_, kind, mode
        self.config, self.objs = config, objs
        self.ranges: list[M.BusRange] = []
        self.raw: list[tuple[str, BusRange]] = []  # (bus kind, the live range)


def _owners(m: Machine) -> list[_Owner]:
    """Every device with the objects that stand for it on the buses (its transport,
    its PCI function), board devices first, grouped by bus device identity."""
    configured: list[_Owner] = []
    by_id: dict[int, _Owner] = {}
    transports = {id(t.device): t for t in m.virtio_transports()}
    configs = config_names(m)
    for name, spec, dev in m.devices:
        objs: list[object] = [dev]
        t = transports.get(id(dev))
        if t is not None:
            objs.append(t)
        o = _Owner(name, spec.name, spec.kind.value, spec.io_mode.value,
                   configs.get(name), objs)
        configured.append(o)
        for x in objs:
            by_id[id(x)] = o
    board: list[_Owner] = []
    for bus in (m.pio, m.mmio):
        for r in bus.ranges():
            dev = _unwrap(r.device)
            found = by_id.get(id(dev))
            if found is not None:
                o = found
            else:
                base = r.name.split(".bar")[0]
                o = _Owner(base, "board", "board", "emulated", None, [dev])
                board.append(o)
                by_id[id(dev)] = o
            o.ranges.append(_range(bus, r))
            o.raw.append((bus.kind, r))
    return board + configured


def owners(m: Machine) -> list[_Owner]:
    """Every device with its live bus ranges (``raw``)."""
    return _owners(m)


def device_ranges(m: Machine, name: str) -> list[tuple[str, BusRange]] | None:
    """The live bus ranges of device ``name`` (None: no such device)."""
    for o in _owners(m):
        if o.name == name:
            return o.raw
    return None


def config_names(m: Machine) -> dict[str, DeviceConfig]:
    """Instance name -> the config entry it was made from: the n-th entry of a type
    makes ``<type><n>`` (``builder.BuildContext``); for entries that attach to one
    device (IDE disks), the device's name is its first entry's."""
    counts: dict[str, int] = {}
    out: dict[str, DeviceConfig] = {}
    for e in m.cfg.devices:
        i = counts.get(e.name, 0)
        counts[e.name] = i + 1
        out[f"{e.name}{i}"] = e.config
    return out


def devices(m: Machine) -> M.DeviceList:
    out = []
    for o in _owners(m):
        counters: dict[str, float] = {}
        for x in o.objs:
            fn = getattr(x, "metrics", None)
            if callable(fn):
                # RuntimeError: a dict the device changed while it was read: skipped.
                with contextlib.suppress(RuntimeError):
                    counters.update(_numbers(dict(fn())))
        for x in o.objs:
            if hasattr(x, "throttled") and isinstance(x.throttled, int):
                counters.setdefault("throttled", x.throttled)
        out.append(M.Device(
            name=o.name, type=o.type, kind=o.kind, mode=o.mode,
            config=None if o.config is None else config_json(o.config),
            ranges=o.ranges, exits=sum(r.reads + r.writes for r in o.ranges),
            counters=counters))
    return M.DeviceList(out)


# --- counters ------------------------------------------------------------------------------
def _instance_names(m: Machine) -> dict[int, str]:
    """id(bus-facing object: the device, its virtio transport) -> its instance name."""
    out: dict[int, str] = {}
    transports = {id(t.device): t for t in m.virtio_transports()}
    for name, _, dev in m.devices:
        out[id(dev)] = name
        t = transports.get(id(dev))
        if t is not None:
            out[id(t)] = name
    return out


def _line_sources(m: Machine) -> dict[int, str]:
    """GSI -> the device that drives it, where the machine says: the board's fixed
    lines, PCI INTx pins, virtio-mmio slots, ISA specs' lines."""
    src: dict[int, str] = {L.COM1_GSI: "serial0", L.RTC_GSI: "rtc", 0: "pit"}
    names = _instance_names(m)
    for _, dev in m.pci.functions():
        c = dev.config
        if c.data[P.PCI_INTERRUPT_PIN]:
            src.setdefault(c.data[P.PCI_INTERRUPT_LINE],
                           names.get(id(dev), getattr(dev, "name", "pci")))
    slots = dict(L.virtio_mmio_slots())
    for t in m.virtio_mmio:
        r = next((r for r in m.mmio.ranges() if r.device is t), None)
        if r is not None and r.base in slots:
            src[slots[r.base]] = names.get(id(t), t.name)
    for name, spec, _ in m.devices:
        gsis = (spec.gsi,) if isinstance(spec.gsi, int) else spec.gsi or ()
        for g in gsis:
            src.setdefault(g, name)
    return src


def _vector_sources(m: Machine) -> dict[int, str]:
    """id(IrqfdVector) -> "<function>.msix<n>" / ".msi<n>"."""
    out: dict[int, str] = {}
    names = _instance_names(m)
    for _, dev in m.pci.functions():
        name = names.get(id(dev), getattr(dev, "name", type(dev).__name__))
        for cap in ("msix", "msi"):
            c = getattr(dev, cap, None)
            for n, sink in enumerate(getattr(c, "_sinks", ()) if c is not None else ()):
                out.setdefault(id(sink), f"{name}.{cap}{n}")
    return out


def interrupts(m: Machine) -> list[M.Interrupt]:
    chip = m.irqchip
    out: list[M.Interrupt] = []
    sources = _line_sources(m)
    lines = dict(getattr(chip, "_lines", {}))
    for gsi, line in sorted(lines.items()):
        route = "KVM_IRQ_LINE" if isinstance(line, KvmIrqLine) else (
            "split" if isinstance(line, SplitLine) else type(line).__name__)
        out.append(M.Interrupt(route, gsi, None, sources.get(gsi), line.raised))
    vsrc = _vector_sources(m)
    for v in list(chip.irqfd_vectors):
        assert isinstance(v, IrqfdVector)
        irqfd = v.irqfd
        if irqfd is None:
            continue  # never used: no GSI yet
        routed = irqfd._routed
        out.append(M.Interrupt("irqfd", irqfd.gsi, None if routed is None else routed[1] & 0xFF,
                               vsrc.get(id(v)), v.sent))
    for vec, n in sorted(dict(chip.signalled).items()):
        out.append(M.Interrupt("KVM_SIGNAL_MSI", None, vec, None, n))
    return out


def exits_by_kind(m: Machine) -> dict[str, int]:
    """Exits by kind. The run loop adds its io/mmio exit totals to ``exit_counts``
    only when it ends (a per-exit dict update would cost the hot path), so while the
    VM runs those two are the buses' trapped-access counts."""
    counts = dict(m.exit_counts)
    out: dict[str, int] = {}
    for k, v in sorted(counts.items()):
        if k in (K.KVM_EXIT_IO, K.KVM_EXIT_MMIO):
            continue
        out[EXIT_NAMES.get(k, str(k))] = v
    if m.state is VmState.STOPPED:
        out[EXIT_IO_NAME] = counts.get(K.KVM_EXIT_IO, 0)
        out[EXIT_MMIO_NAME] = counts.get(K.KVM_EXIT_MMIO, 0)
    else:
        out[EXIT_IO_NAME] = _accesses(m.pio)
        out[EXIT_MMIO_NAME] = _accesses(m.mmio)
    return out


def _accesses(bus: Bus) -> int:
    return (sum(r.reads + r.writes for r in bus.ranges())
            + sum(dict(bus.unclaimed).values()))


def counters(m: Machine) -> M.Counters:
    by_dev: dict[str, M.DeviceExits] = {}
    for o in _owners(m):
        reads = sum(r.reads for r in o.ranges)
        writes = sum(r.writes for r in o.ranges)
        by_dev[o.name] = M.DeviceExits(o.name, reads, writes)
    chip = m.irqchip
    return M.Counters(
        uptime_s=round(uptime(m), 6), exits=exits_by_kind(m), devices=list(by_dev.values()),
        unclaimed={b.kind: sum(dict(b.unclaimed).values()) for b in (m.pio, m.mmio)},
        interrupts=interrupts(m),
        msi={"sent": chip.msis_sent, "dropped": chip.msis_dropped,
             "by_irqfd": chip.msis_by_irqfd, "by_signal": sum(dict(chip.signalled).values())})


def flat_counters(c: M.Counters) -> dict[str, int]:
    """Counters as one flat map of totals, what the event stream sends deltas of:
    ``exits.<kind>``, ``device.<name>``, ``irq.<route>.<gsi or vector>``."""
    out: dict[str, int] = {f"exits.{k}": v for k, v in c.exits.items()}
    for d in c.devices:
        out[f"device.{d.name}"] = d.reads + d.writes
    for i in c.interrupts:
        key = f"gsi{i.gsi}" if i.gsi is not None else f"vector{i.vector}"
        out[f"irq.{i.route}.{key}"] = i.count
    return out
