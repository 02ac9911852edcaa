"""MSI as devices see it: a message (address, data) sent to a sink. What the sink does
with it — KVM_SIGNAL_MSI, an irqfd, the client's eventfd, a list in a test — is the
host's business (``pyvmm.irqchip``, the vfio-user server)."""

from __future__ import annotations

from typing import NamedTuple, Protocol, runtime_checkable

from pyvmm.irq.line import InterruptLine
from pyvmm.uapi.pci import MSI_ADDRESS_BASE, MSI_ADDRESS_MASK


class MsiMessage(NamedTuple):
    address: int
    data: int

    @property
    def valid(self) -> bool:
        return (self.address & MSI_ADDRESS_MASK) == MSI_ADDRESS_BASE and self.data <= 0xFFFF

    @property
    def vector(self) -> int:
        return self.data & 0xFF


class MsiSink(Protocol):
    def send_msi(self, msg: MsiMessage) -> None: ...


@runtime_checkable
class EventfdSink(Protocol):
    """A vector sink that can hand out the eventfd it signals (an irqfd), so that
    another process — a vhost-user backend — raises the vector without the VMM."""

    def send_msi(self, msg: MsiMessage) -> None: ...

    def eventfd(self, msg: MsiMessage) -> int:
        """The eventfd, routed to ``msg`` (the sink keeps it; dup to hand it on)."""
        ...

    def route(self, msg: MsiMessage) -> None:
        """The vector's message changed: route the eventfd to the new one."""
        ...


def vector_sinks(sink: MsiSink, n: int) -> list[MsiSink]:
    """One sink per device vector: the chip's irqfd vectors where it offers them
    (``vector_sink``), else the shared sink (tests, a vfio-user export)."""
    make = getattr(sink, "vector_sink", None)
    return [make() for _ in range(n)] if callable(make) else [sink] * n


class IrqChip(MsiSink, Protocol):
    def line(self, gsi: int) -> InterruptLine: ...


class RecordingMsiSink:
    """Collects messages (tests)."""

    def __init__(self) -> None:
        self.sent: list[MsiMessage] = []

    def send_msi(self, msg: MsiMessage) -> None:
        self.sent.append(msg)
