"""The registry entries of pyvmm's vhost-user front end (``frontend.py``): their typed
configs and ``create``. Kept apart from the front end itself so that a machine without a
vhost-user device does not import the protocol machinery at start-up (~4 ms measured);
``create`` imports it when one is configured."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pyvmm.devices.spec import DeviceSpec, HostContext, Kind, Mode, VirtioConfig
from pyvmm.devices.virtio.net import check_mac
from pyvmm.errors import BackendError, ConfigError
from pyvmm.schema import option
from pyvmm.uapi import virtio as V
from pyvmm.unix_socket import check_socket_path

if TYPE_CHECKING:
    from pyvmm.vhost_user.frontend import Model, VhostUserFrontend

DEFAULT_TIMEOUT = 5.0


@dataclass(kw_only=True)
class VhostUserConfig(VirtioConfig):
    socket: str = option(doc="the backend's Unix socket (the backend listens, pyvmm "
                         "connects)", metavar="PATH")
    fast_path: bool = option(True, "give the backend KVM's ioeventfd (kicks) and irqfd "
                             "(MSI-X interrupts) of each queue; off: the VMM forwards both")
    queue_size: int = option(256, "the largest ring the guest may set up (a power of two "
                             "the backend accepts)")
    timeout: float = option(DEFAULT_TIMEOUT, "seconds to wait for the backend's answer to "
                            "each message (connecting included)")
    reconnect: float = option(0.0, "seconds to keep reconnecting to a backend that went "
                              "away, resuming its rings (0: the device needs a reset)")

    def check(self) -> None:
        qs = self.queue_size
        if not 1 <= qs <= V.VIRTQUEUE_MAX_SIZE or qs & (qs - 1):
            raise ValueError(f"queue_size {qs} is not a power of two up to "
                             f"{V.VIRTQUEUE_MAX_SIZE}")
        if not 0 < self.timeout <= 600:
            raise ValueError("timeout must be between 0 and 600 seconds")
        if not 0 <= self.reconnect <= 86400:
            raise ValueError("reconnect must be between 0 and 86400 seconds")

    def validate(self) -> None:
        """Before the VM is built: a socket is there (connecting comes at build)."""
        check_socket_path(self.socket, "vhost-user")


@dataclass(kw_only=True)
class VhostUserBlkConfig(VhostUserConfig):
    pass


@dataclass(kw_only=True)
class VhostUserNetConfig(VhostUserConfig):
    mac: str | None = option(None, "the guest's MAC (default 52:54:00:12:35:00 + index)")

    def check(self) -> None:
        super().check()
        if self.mac is not None:
            check_mac(self.mac)

    def mac_bytes(self, index: int) -> bytes:
        if self.mac is not None:
            return bytes.fromhex(self.mac.replace(":", ""))
        return bytes((0x52, 0x54, 0x00, 0x12, 0x35, index & 0xFF))


def open_frontend(cfg: VhostUserConfig, model: Model, ctx: HostContext,
                  mac: bytes | None = None) -> VhostUserFrontend:
    """Connect and negotiate (one-line ConfigError if the backend is not usable)."""
    from pyvmm.vhost_user.frontend import Channel, VhostUserFrontend, connect_socket

    sock = connect_socket(cfg.socket, cfg.timeout)
    try:
        dev = VhostUserFrontend(Channel(sock, cfg.timeout), model, name=ctx.name,
                                events=ctx.events, path=cfg.socket,
                                queue_size=cfg.queue_size, fast_path=cfg.fast_path, mac=mac,
                                reconnect=cfg.reconnect)
    except BackendError as e:
        raise ConfigError(f"{ctx.name}: vhost-user backend {cfg.socket!r}: {e}") from None
    ctx.on_close(dev.close)
    return dev


def create_blk(cfg: VhostUserBlkConfig, ctx: HostContext) -> VhostUserFrontend:
    from pyvmm.vhost_user.frontend import BLK

    return open_frontend(cfg, BLK, ctx)


def create_net(cfg: VhostUserNetConfig, ctx: HostContext) -> VhostUserFrontend:
    from pyvmm.vhost_user.frontend import NET

    return open_frontend(cfg, NET, ctx, cfg.mac_bytes(ctx.index))


BLK_SPEC = DeviceSpec("vhost-user-blk", VhostUserBlkConfig, Kind.VIRTIO, create_blk,
                      "virtio-blk served by a vhost-user backend in another process",
                      option="disk", select=("if", "vhost-user"), positional="socket",
                      exportable=False, doc="vhost-user-frontend",
                      mode=Mode.OUT_OF_PROCESS)
NET_SPEC = DeviceSpec("vhost-user-net", VhostUserNetConfig, Kind.VIRTIO, create_net,
                      "virtio-net served by a vhost-user backend in another process",
                      option="net", select=("model", "vhost-user"), positional="socket",
                      exportable=False, doc="vhost-user-frontend",
                      mode=Mode.OUT_OF_PROCESS)

