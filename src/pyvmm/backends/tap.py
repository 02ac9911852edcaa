"""A TAP device opened by the VMM: frames with a 12-byte virtio_net_hdr_v1 in front,
so the guest's header passes through unchanged (checksum/TSO offload metadata).
Never imports pyvmm.kvm."""

from __future__ import annotations

import fcntl
import os
import struct
from collections.abc import Sequence

from pyvmm.errors import ConfigError
from pyvmm.uapi import tun as T
from pyvmm.uapi import virtio as V


class Tap:
    def __init__(self, name: str = "") -> None:
        """Attach to TAP ``name`` (created if it does not exist, when permitted), or
        let the kernel pick a name (``tap%d``) for an empty name."""
        try:
            self.fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            raise ConfigError(f"cannot open /dev/net/tun: {e.strerror}") from None
        if len(name.encode()) >= T.IFNAMSIZ:
            os.close(self.fd)
            raise ConfigError(f"tap name {name!r} is longer than {T.IFNAMSIZ - 1} bytes")
        req = struct.pack(f"{T.IFNAMSIZ}sH22x", name.encode(),
                          T.IFF_TAP | T.IFF_NO_PI | T.IFF_VNET_HDR)
        try:
            res = fcntl.ioctl(self.fd, T.TUNSETIFF, req)
            fcntl.ioctl(self.fd, T.TUNSETVNETHDRSZ, struct.pack("i", V.VIRTIO_NET_HDR_SIZE))
        except OSError as e:
            os.close(self.fd)
            raise ConfigError(f"cannot attach tap {name or '(auto)'}: {e.strerror}") from None
        self.name = res[:T.IFNAMSIZ].rstrip(b"\0").decode()
        self.set_offload(0)

    def set_offload(self, flags: int) -> None:
        fcntl.ioctl(self.fd, T.TUNSETOFFLOAD, flags)

    def read(self, n: int = 65562) -> bytes | None:
        """One frame (with its vnet header), or None if none is waiting."""
        try:
            return os.read(self.fd, n)
        except BlockingIOError:
            return None

    def writev(self, bufs: Sequence[memoryview | bytes]) -> int:
        return os.writev(self.fd, bufs)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
