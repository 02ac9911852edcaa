"""``GET /metrics``: the VM's counters in the Prometheus text format (prometheus_client).

A custom collector reads the counters that already exist — the buses' per-range
access counts, the irqchip's lines and vectors, each device's ``metrics()`` — at
scrape time, through the same lock-free views as the JSON API; nothing is added to
the hot path. prometheus_client is imported only when ``/metrics`` is first scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from pyvmm.api import views

if TYPE_CHECKING:
    from pyvmm.api.server import ApiServer
    from pyvmm.machine.vm import Machine

CONTENT_TYPE = CONTENT_TYPE_LATEST

# A device's metrics() key -> (metric name, help). Only counters that exist are
# exported; a device without the key has no sample.
_DEVICE_COUNTERS = {
    "requests": ("pyvmm_virtio_requests", "virtqueue requests completed"),
    "bytes": ("pyvmm_virtio_bytes", "bytes moved by virtqueue requests"),
    "notifications": ("pyvmm_virtio_notifications", "queue notifications (kicks) taken"),
    "interrupts": ("pyvmm_virtio_interrupts", "interrupts the transport raised"),
    "throttled": ("pyvmm_ratelimit_throttled", "times a rate limiter's bucket was empty"),
    "kick_forwards": ("pyvmm_vhost_user_kick_forwards",
                      "kicks the VMM forwarded to a vhost-user backend"),
    "interrupt_forwards": ("pyvmm_vhost_user_interrupt_forwards",
                           "interrupts the VMM forwarded from a vhost-user backend"),
}


class VmCollector(Collector):
    def __init__(self, m: Machine, server: ApiServer | None = None) -> None:
        self.m, self.server = m, server

    def collect(self) -> Iterator[Metric]:
        m = self.m
        c = views.counters(m)
        up = GaugeMetricFamily("pyvmm_vm_uptime_seconds", "seconds since the VM started")
        up.add_metric([], c.uptime_s)
        yield up
        st = GaugeMetricFamily("pyvmm_vm_state", "1 for the VM's current state",
                               labels=["state"])
        for s in ("created", "running", "paused", "stopped"):
            st.add_metric([s], 1.0 if m.state.value == s else 0.0)
        yield st
        kinds = CounterMetricFamily("pyvmm_exits", "VM exits by kind (io and mmio: trapped "
                                    "bus accesses while running)", labels=["kind"])
        for k, v in c.exits.items():
            kinds.add_metric([k], v)
        yield kinds
        dev = CounterMetricFamily("pyvmm_device_exits", "trapped guest accesses by device "
                                  "and bus range",
                                  labels=["device", "range", "bus", "base", "access"])
        for d in views.devices(m).devices:
            for r in d.ranges:
                base = f"{r.base:#x}"
                dev.add_metric([d.name, r.name, r.bus, base, "read"], r.reads)
                dev.add_metric([d.name, r.name, r.bus, base, "write"], r.writes)
        yield dev
        yield self._registers(m)
        irq = CounterMetricFamily("pyvmm_interrupts", "interrupts raised, by route and "
                                  "GSI/vector", labels=["route", "gsi", "vector", "source"])
        for i in c.interrupts:
            irq.add_metric([i.route, "" if i.gsi is None else str(i.gsi),
                            "" if i.vector is None else str(i.vector), i.source or ""],
                           i.count)
        yield irq
        msi = CounterMetricFamily("pyvmm_msi_messages", "MSI messages by outcome",
                                  labels=["outcome"])
        for k, v in c.msi.items():
            msi.add_metric([k], v)
        yield msi
        yield from self._device_counters(m)
        if self.server is not None:
            g = CounterMetricFamily("pyvmm_api_event_clients_dropped",
                                    "event-stream clients dropped for not reading")
            g.add_metric([], self.server.dropped_streams)
            yield g

    def _registers(self, m: Machine) -> Metric:
        """Trapped accesses by register offset: the buses' per-(offset, size, kind)
        counts, the same the exit table is made from."""
        fam = CounterMetricFamily("pyvmm_register_accesses", "trapped guest accesses by "
                                  "device, bus range, register offset, size and direction",
                                  labels=["device", "range", "base", "offset", "size",
                                          "access"])
        names = {id(r): o.name for o in views.owners(m) for _, r in o.raw}
        for bus in (m.pio, m.mmio):
            for r in bus.ranges():
                counts = dict(r.counts)  # one C-level copy: the vCPU thread adds keys
                for key, n in sorted(counts.items()):
                    fam.add_metric([names.get(id(r), r.name), r.name, f"{r.base:#x}",
                                    f"{key >> 4:#x}", str((key >> 1) & 7),
                                    "write" if key & 1 else "read"], n)
        return fam

    def _device_counters(self, m: Machine) -> Iterator[Metric]:
        fams: dict[str, CounterMetricFamily] = {}
        for d in views.devices(m).devices:
            for key, value in d.counters.items():
                spec = _DEVICE_COUNTERS.get(key)
                if spec is None:
                    continue
                name, help_ = spec
                fam = fams.get(name)
                if fam is None:
                    fam = fams[name] = CounterMetricFamily(name, help_, labels=["device"])
                fam.add_metric([d.name], value)
        yield from fams.values()


def make_registry(m: Machine, server: ApiServer | None = None) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(VmCollector(m, server))
    return reg


def scrape(reg: Any) -> bytes:
    out: bytes = generate_latest(reg)
    return out
