"""Every device a machine can be given, in one explicit tuple.

Adding a device is its module (ending in a ``SPEC``) plus one line here. The builder,
the command line (``--device NAME``, and the shortcut options specs declare), the JSON
config (``"devices": [{"type": NAME, ...}]``), ``pyvmm info --devices``, the vfio-user
export and docs/config.md all read this tuple; nothing registers itself on import.
Tests may pass a longer tuple of their own to ``MachineConfig`` and ``Machine``.
"""

from __future__ import annotations

from pyvmm.devices.assigned import vfio_user
from pyvmm.devices.display import spec as vga
from pyvmm.devices.emulated.e1000 import spec as e1000
from pyvmm.devices.emulated.ide import spec as ide
from pyvmm.devices.legacy import fw_cfg
from pyvmm.devices.nvme import controller as nvme
from pyvmm.devices.spec import DeviceSpec
from pyvmm.devices.virtio import blk, console, net, rng
from pyvmm.vhost_user import spec as vhost_user

DEVICES: tuple[DeviceSpec, ...] = (
    blk.SPEC,
    nvme.SPEC,
    vhost_user.BLK_SPEC,
    net.SPEC,
    vhost_user.NET_SPEC,
    console.SPEC,
    rng.SPEC,
    fw_cfg.SPEC,
    ide.SPEC,
    vga.SPEC,
    vfio_user.SPEC,
    e1000.SPEC,
)


def find(name: str, registry: tuple[DeviceSpec, ...] = DEVICES) -> DeviceSpec | None:
    for spec in registry:
        if spec.name == name:
            return spec
    return None
