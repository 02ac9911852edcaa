"""virtio-console (virtio 1.2 §5.3), single port, no MULTIPORT: queue 0 receives,
queue 1 transmits.

Transmit writes every readable byte of a chain to the host end (stdio, a file or a
Unix socket, as for the UART). Receive takes host input only as far as the driver
has posted buffers (``enqueue_input`` returns what it took; the host end pauses its
source and is resumed when the driver posts more), so a fast host cannot lose bytes.

Threat model: a transmit chain is capped at 64 KiB of output; receive writes only into
device-writable descriptors inside guest RAM.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.devices.spec import DeviceSpec, HostContext, Kind, VirtioConfig
from pyvmm.devices.virtio.core import VirtioDevice
from pyvmm.devices.virtio.queue import DescriptorChain
from pyvmm.schema import option
from pyvmm.uapi import virtio as V

RXQ, TXQ = 0, 1
MAX_TX = 64 * 1024


class VirtioConsole(VirtioDevice):
    device_type = V.VIRTIO_ID_CONSOLE
    queue_max_sizes = (64, 64)
    features = (1 << V.VIRTIO_F_VERSION_1) | (1 << V.VIRTIO_RING_F_EVENT_IDX)

    def __init__(self, output: Callable[[bytes], None]) -> None:
        super().__init__()
        self.output = output
        self.on_rx_space: Callable[[], None] | None = None
        self._rx_chain: DescriptorChain | None = None

    def config_bytes(self) -> bytes:
        return struct.pack("<HHII", 80, 25, 1, 0)  # cols, rows, max_nr_ports, emerg_wr

    def process_queue(self, index: int) -> None:
        if index == TXQ:
            vq, mem = self.queue(TXQ), self.mem
            assert mem is not None
            while (chain := vq.pop()) is not None:
                budget = MAX_TX
                for d in chain:
                    if d.write or budget <= 0:
                        continue
                    data = mem.read(d.addr, min(d.len, budget))
                    budget -= len(data)
                    self.output(data)
                    self.bytes += len(data)
                self.requests += 1
                self.complete(vq, chain, 0)
        elif index == RXQ and self.on_rx_space is not None:
            self.on_rx_space()  # new buffers: let the host end feed us again

    # --- host input (event loop) -----------------------------------------------------------
    def rx_space(self) -> int:
        return 1 if self.queues and self.queues[RXQ] is not None else 0

    def enqueue_input(self, data: bytes) -> int:
        """Place host input into posted buffers; returns the bytes taken."""
        with self.core_lock:
            if not self.queues or self.queues[RXQ] is None:
                return 0
            vq, mem = self.queue(RXQ), self.mem
            assert mem is not None
            taken = 0
            try:
                while taken < len(data):
                    chain = vq.pop()
                    if chain is None:
                        break
                    written = 0
                    for d in chain:
                        if not d.write or taken >= len(data):
                            continue
                        n = min(d.len, len(data) - taken)
                        mem.write(d.addr, data[taken:taken + n])
                        taken += n
                        written += n
                    self.complete(vq, chain, written)
            except Exception as e:  # a broken chain, a buffer outside RAM: NEEDS_RESET
                self.fail(RXQ, e)
            return taken


# --- registry entry ---------------------------------------------------------------------
@dataclass(kw_only=True)
class ConsoleConfig(VirtioConfig):
    backend: str = option("stdio", "the host end: stdio, file:PATH, socket:PATH or none",
                          metavar="stdio|file:PATH|socket:PATH|none")

    def check(self) -> None:
        from pyvmm.backends.char import CharSpec

        CharSpec.parse(self.backend)  # raises ValueError with the reason


def create(cfg: ConsoleConfig, ctx: HostContext) -> VirtioConsole:
    from pyvmm.backends.char import CharSpec, SerialIo

    io = SerialIo(CharSpec.parse(cfg.backend), ctx.events)
    ctx.on_close(io.close)
    console = VirtioConsole(io.write)
    console.on_rx_space = io.resume_input
    io.attach(console)
    return console


SPEC = DeviceSpec("virtio-console", ConsoleConfig, Kind.VIRTIO, create,
                  "virtio-console, one port", option="console", positional="backend",
                  doc="virtio")
