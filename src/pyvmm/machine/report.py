"""What a run did, made from the counters that routed it: the buses' per-device exit
accounting, each device's ``metrics()``, the irqchip's and the event loop's counts."""

from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from pyvmm.devices.nvme.controller import NvmeController
from pyvmm.devices.pci.testdev import PciTestDev
from pyvmm.irqchip.split import SplitIrqChip
from pyvmm.uapi import kvm as K

if TYPE_CHECKING:
    from pyvmm.machine.vm import Machine

EXIT_NAMES = {v: k[len("KVM_EXIT_"):].lower() for k, v in vars(K).items()
              if k.startswith("KVM_EXIT_") and isinstance(v, int) and k not in (
                  "KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")}


def exit_kinds(counts: Counter[int]) -> dict[str, int]:
    return {EXIT_NAMES.get(k, str(k)): v for k, v in sorted(counts.items())}


def exit_report(m: Machine) -> dict[str, Any]:
    r = m.result
    return {
        "result": None if r is None else {
            "reason": r.reason, "exit_code": r.exit_code, "message": r.message,
            "wall_time_s": r.wall_time, "event_loop_cpu_s": m.event_loop_cpu,
            "off_vcpu_cpu_s": m.off_vcpu_cpu, "vcpu_thread_cpu_s": m.vcpu_thread_cpu,
        },
        "state": m.state.value,
        "exits": exit_kinds(m.exit_counts),
        "buses": [m.pio.snapshot(), m.mmio.snapshot()],
        "guest_errors": dict(m.guest_errors.counts),
        # Exceptions the event loop contained: faults (PyvmmErrors) and VMM bugs.
        "event_loop": {"faults": m.events.faults, "bugs": m.events.bugs,
                       "errors": dict(m.events.errors.counts)},
        "vcpu_stuck": m.vcpu_stuck,
        "irqchip": irqchip_report(m),
        "devices": [{"name": name, "type": spec.name, "kind": spec.kind.value,
                     **_metrics(dev)} for name, spec, dev in m.devices],
        "virtio": [{"device": v.name, **v.metrics()} for v in m.virtio_transports()],
        "pci": {"bad_config_accesses": m.pci.bad_config_accesses,
                "rejected_bars": m.pci.rejected_bars,
                "msis_sent": m.irqchip.msis_sent,
                "msis_dropped": m.irqchip.msis_dropped,
                "msix_bad_accesses": sum(
                    d.msix.bad_accesses for _, d in m.pci.functions()
                    if isinstance(d, PciTestDev))},
        "nvme": [{"device": dev.serial, **dev.metrics(), "errors": dict(dev.errors.counts)}
                 for _, _, dev in m.devices if isinstance(dev, NvmeController)],
        "serial": {"tx_bytes": m.serial.tx_bytes, "rx_dropped": m.serial.rx_dropped},
        "i8042": {**m.i8042.metrics(), "errors": dict(
            m.i8042.errors.counts + m.keyboard.errors.counts + m.mouse.errors.counts)},
    }


def _metrics(dev: object) -> dict[str, Any]:
    fn = getattr(dev, "metrics", None)
    return dict(fn()) if fn is not None else {}


def irqchip_report(m: Machine) -> dict[str, Any]:
    chip = m.irqchip
    rep: dict[str, Any] = {"mode": m.cfg.irqchip.value, "msis_sent": chip.msis_sent,
                           "msis_dropped": chip.msis_dropped, "msi_path": m.cfg.msi.value,
                           "msis_by_irqfd": chip.msis_by_irqfd,
                           "gsi_route_commits": chip.routing.commits}
    if isinstance(chip, SplitIrqChip):
        rep.update(pic_injected=chip.injected, ioapic_delivered=chip.ioapic.delivered,
                   ioapic_eois=chip.eois, pic_spurious=chip.pic.spurious)
    if m.pit is not None:
        pit = m.pit
        rep.update(pit_ticks=pit.ticks, pit_missed=pit.missed, pit_due=pit.due.due(),
                   pit_periods=pit.periods, pit_reinjected=pit.reinjected,
                   pit_backlog=pit.backlog, pit_forgiven=pit.forgiven, pit_dropped=pit.dropped)
    r = m.rtc
    rep.update(rtc_periodic=r.periodic_interrupts, rtc_missed=r.periodic_missed,
               rtc_due=r.periodic_due.due(), rtc_periods=r.periodic_periods,
               rtc_reinjected=r.periodic_reinjected, rtc_backlog=r.backlog,
               rtc_forgiven=r.periodic_forgiven, rtc_dropped=r.periodic_dropped)
    return rep


def exit_table(m: Machine) -> str:
    rows = [("device", "bus", "base", "reads", "writes", "exits")]
    for bus in (m.pio, m.mmio):
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
    total = sum(m.exit_counts.values())
    kinds = ", ".join(f"{k} {v}" for k, v in exit_kinds(m.exit_counts).items())
    lines.append(f"total exits: {total} ({kinds})")
    return "\n".join(lines)
