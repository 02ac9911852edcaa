"""The registry entry of the e1000: its typed config and ``create``. Kept apart from the
device (``nic.py``) so that a machine without an e1000 does not import it at start-up.

It is ``--net ...,model=e1000``: the same option, TAP and MAC rule as virtio-net (the
``model`` key chooses between the two, as ``if=`` chooses the disk interface), because
to a user both are "a NIC on this host end"; only the guest-visible model differs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.devices.spec import DeviceConfig, DeviceSpec, HostContext, Kind
from pyvmm.schema import option

if TYPE_CHECKING:
    from pyvmm.devices.emulated.e1000.nic import E1000


@dataclass(kw_only=True)
class E1000Config(DeviceConfig):
    """An Intel 82540EM on a TAP, or on a port of pyvmm's learning switch."""

    tap: str = option("auto", "the TAP to attach (auto: a new one the kernel names)")
    switch: str | None = option(None, "instead of a TAP: a port of pyvmm's switch, the "
                                "socket of `pyvmm backend vhost-user-net --port PATH`",
                                metavar="PATH")
    mac: str | None = option(None, "the MAC in the EEPROM (default 52:54:00:12:34:56 + "
                             "index)")

    def check(self) -> None:
        from pyvmm.devices.virtio.net import check_mac

        if self.mac is not None:
            check_mac(self.mac)
        if self.switch is not None and self.tap != "auto":
            raise ValueError("tap and switch exclude each other: the NIC has one host end")

    def mac_bytes(self, index: int) -> bytes:
        if self.mac is not None:
            return bytes.fromhex(self.mac.replace(":", ""))
        return bytes((0x52, 0x54, 0x00, 0x12, 0x34, (0x56 + index) & 0xFF))


def create(cfg: E1000Config, ctx: HostContext) -> E1000:
    from pyvmm.backends.tap import Tap
    from pyvmm.devices.emulated.e1000.nic import E1000
    from pyvmm.sharing.switch import SwitchPort, connect_port

    backend: Tap | SwitchPort
    if cfg.switch is not None:
        backend = connect_port(cfg.switch)
    else:
        backend = Tap("" if cfg.tap == "auto" else cfg.tap)
    ctx.on_close(backend.close)
    nic = E1000(ctx.mem, backend, cfg.mac_bytes(ctx.index), ctx.events)
    ctx.on_close(nic.close)
    return nic


SPEC = DeviceSpec("e1000", E1000Config, Kind.PCI, create,
                  "Intel 82540EM (e1000) NIC on a TAP or a switch port, fully emulated",
                  option="net", select=("model", "e1000"), positional="tap", doc="e1000")
