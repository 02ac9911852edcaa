"""Virtual functions: one NVMe "physical function" process that offers N functions
over vfio-user (``pyvmm backend vfio-user --device nvme --disk IMG --vfs N``), SR-IOV
style — one image shared by many guests, each function its own device.

Each VF is one listening socket (a ``VfioUserServer``; every client that connects gets
its own session and its own ``NvmeController``, so its own queues, registers and
interrupts) whose namespace is a ``SliceBackend``: a window of the image, ``[i * size,
(i + 1) * size)``. The controller answers LBA Out of Range for anything past its
namespace (what the spec says a drive does), and the slice refuses anything outside
its window in any case, so no command of a VF's guest reaches another VF's bytes.
A VF may have its own token buckets (``Limits``): its commands then wait in its
guest's submission queue while they are empty, and the other VFs are not slowed.

All VFs share one event loop: a command runs to completion on it, so a VF that floods
gets its turn per doorbell as the others do (and its buckets, if it has any, stop
it fetching). A VF whose client dies or misbehaves loses its session only (the
server's rule); the other VFs' sessions go on.

The physical function's view — per VF: sessions, commands, bytes, failed commands,
throttled waits and limits — is ``report()``; the CLI prints it when the backend stops
and writes it with ``--stats-json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pyvmm.backends.block import BlockBackend, SliceBackend
from pyvmm.devices.nvme.controller import NvmeController
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.errors import ConfigError
from pyvmm.event import EventManager
from pyvmm.irq.msi import RecordingMsiSink
from pyvmm.memory import GuestMemory
from pyvmm.sharing.ratelimit import Limits
from pyvmm.vfio_user.server import VfioUserServer

MAX_VFS = 64  # more sockets than this on one image is a typo, not a request
COUNTERS = ("commands", "bytes", "failures", "throttled")


def slice_size(image_size: int, vfs: int, vf_size: int | None) -> int:
    """Each VF's bytes: ``vf_size``, or the image split in ``vfs`` equal parts (whole
    512-byte blocks; a remainder at the end belongs to no VF)."""
    if not 1 <= vfs <= MAX_VFS:
        raise ConfigError(f"--vfs {vfs}: give 1 to {MAX_VFS} virtual functions")
    size = vf_size if vf_size is not None else (image_size // vfs) & ~511
    if size % 512 or size < 1 << 20:
        raise ConfigError(f"a VF's namespace must be whole 512-byte blocks and at least "
                          f"1 MiB, not {size} bytes")
    if size * vfs > image_size:
        raise ConfigError(f"{vfs} VFs of {size} bytes do not fit in the image of "
                          f"{image_size} bytes")
    return size


@dataclass
class VirtualFunction:
    index: int
    socket: str
    backend: SliceBackend
    limits: Limits | None
    live: list[NvmeController] = field(default_factory=list)
    sessions: int = 0
    closed: dict[str, int] = field(default_factory=lambda: dict.fromkeys(COUNTERS, 0))
    server: VfioUserServer | None = None

    def make(self, mem: GuestMemory, events: EventManager) -> PCIDevice:
        # MSI-X goes to the client's eventfds (the session sets ``msix.direct``).
        c = NvmeController(self.backend, mem, RecordingMsiSink(),
                           serial=f"pyvmm-vf{self.index}", limits=self.limits,
                           call_later=events.call_later)
        self.sessions += 1
        self.live.append(c)
        inner = c.close

        def close() -> None:  # the session ends: its counters stay in the VF's totals
            inner()
            if c in self.live:
                self.live.remove(c)
                for k, v in self._counts(c).items():
                    self.closed[k] += v

        c.close = close  # type: ignore[method-assign]
        return c

    @staticmethod
    def _counts(c: NvmeController) -> dict[str, int]:
        m = c.metrics()
        return {k: m[k] for k in COUNTERS}

    def stats(self) -> dict[str, Any]:
        total = dict(self.closed)
        for c in self.live:
            for k, v in self._counts(c).items():
                total[k] += v
        lim = self.limits._asdict() if self.limits is not None else {}
        return {"vf": self.index, "socket": self.socket, "offset": self.backend.offset,
                "size": self.backend.size, "sessions": self.sessions, **total,
                "limits": {k: v for k, v in lim.items() if v is not None}}


class NvmeFunctions:
    """N NVMe functions over one image, one vfio-user socket each, one event loop."""

    def __init__(self, image: BlockBackend, sockets: list[str], vf_size: int | None = None,
                 limits: list[Limits | None] | None = None,
                 events: EventManager | None = None) -> None:
        self.events = events or EventManager()
        self.image = image
        size = slice_size(image.size, len(sockets), vf_size)
        lims = limits or [None] * len(sockets)
        if len(lims) != len(sockets):
            raise ConfigError(f"give one --vf-limit for every VF, or one for all "
                              f"({len(lims)} for {len(sockets)} VFs)")
        self.vfs = [VirtualFunction(i, s, SliceBackend(image, i * size, size), lims[i])
                    for i, s in enumerate(sockets)]
        try:
            for vf in self.vfs:
                vf.server = VfioUserServer(vf.socket, self._factory(vf), self.events)
        except BaseException:
            self.close()
            raise

    def _factory(self, vf: VirtualFunction) -> Any:
        return lambda mem: vf.make(mem, self.events)

    def serve_forever(self) -> None:
        while True:
            self.events.run_once(None)

    def close(self) -> None:
        for vf in self.vfs:
            if vf.server is not None:
                vf.server.close()

    def report(self) -> dict[str, Any]:
        return {"image_size": self.image.size, "vfs": [vf.stats() for vf in self.vfs]}
