"""vfio-user messages (QEMU docs/devel/vfio-user.rst; numbering as libvfio-user), sans I/O.

Header (16 bytes): msg_id u16, command u16, message size u32 (header included), flags
u32 (type in bits 0-3: 0 command, 1 reply; bit 4 no-reply; bit 5 error), error u32.
"""

from __future__ import annotations

import enum
import struct

from pyvmm.errors import PyvmmError

HEADER = struct.Struct("<HHIII")
FLAG_TYPE_REPLY = 0x1
FLAG_NO_REPLY = 0x10
FLAG_ERROR = 0x20
MAX_MESSAGE = 1 << 20  # max_data_xfer_size we advertise, plus headers

# struct vfio_region_info / vfio_irq_info / vfio_irq_set (linux/vfio.h)
REGION_INFO = struct.Struct("<IIIIQQ")
IRQ_INFO = struct.Struct("<IIII")
IRQ_SET = struct.Struct("<IIIII")
DMA_MAP = struct.Struct("<IIQQQ")
DMA_UNMAP = struct.Struct("<IIQQ")
REGION_ACCESS = struct.Struct("<QII")
DEVICE_INFO = struct.Struct("<IIII")

VFIO_DEVICE_FLAGS_RESET = 1 << 0
VFIO_DEVICE_FLAGS_PCI = 1 << 1
VFIO_REGION_INFO_FLAG_READ = 1 << 0
VFIO_REGION_INFO_FLAG_WRITE = 1 << 1
VFIO_REGION_INFO_FLAG_MMAP = 1 << 2
VFIO_IRQ_INFO_EVENTFD = 1 << 0
VFIO_IRQ_INFO_MASKABLE = 1 << 1
VFIO_IRQ_INFO_NORESIZE = 1 << 3
VFIO_IRQ_SET_DATA_NONE = 1 << 0
VFIO_IRQ_SET_DATA_BOOL = 1 << 1
VFIO_IRQ_SET_DATA_EVENTFD = 1 << 2
VFIO_IRQ_SET_ACTION_MASK = 1 << 3
VFIO_IRQ_SET_ACTION_UNMASK = 1 << 4
VFIO_IRQ_SET_ACTION_TRIGGER = 1 << 5
VFIO_PCI_BAR0_REGION_INDEX = 0
VFIO_PCI_ROM_REGION_INDEX = 6
VFIO_PCI_CONFIG_REGION_INDEX = 7
VFIO_PCI_NUM_REGIONS = 9
VFIO_PCI_INTX_IRQ_INDEX = 0
VFIO_PCI_MSI_IRQ_INDEX = 1
VFIO_PCI_MSIX_IRQ_INDEX = 2
VFIO_PCI_ERR_IRQ_INDEX = 3
VFIO_PCI_REQ_IRQ_INDEX = 4
VFIO_PCI_NUM_IRQS = 5
VFIO_USER_F_DMA_REGION_READ = 1 << 0
VFIO_USER_F_DMA_REGION_WRITE = 1 << 1


class Command(enum.IntEnum):
    VERSION = 1
    DMA_MAP = 2
    DMA_UNMAP = 3
    DEVICE_GET_INFO = 4
    DEVICE_GET_REGION_INFO = 5
    DEVICE_GET_REGION_IO_FDS = 6
    DEVICE_GET_IRQ_INFO = 7
    DEVICE_SET_IRQS = 8
    REGION_READ = 9
    REGION_WRITE = 10
    DMA_READ = 11
    DMA_WRITE = 12
    DEVICE_RESET = 13


class VfioUserError(PyvmmError):
    """A request the server refuses; ``errno`` goes back in the reply header."""

    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


def frame(header: bytes) -> int:
    """A message's total length from its header (the channel's framing function)."""
    size = int(HEADER.unpack(header)[2])
    if not HEADER.size <= size <= MAX_MESSAGE:
        raise VfioUserError(0, f"message size {size} outside {HEADER.size}..{MAX_MESSAGE}")
    return size


def encode(msg_id: int, cmd: int, payload: bytes = b"", flags: int = 0, error: int = 0) -> bytes:
    return HEADER.pack(msg_id, cmd, HEADER.size + len(payload), flags, error) + payload


def reply(msg_id: int, cmd: int, payload: bytes = b"") -> bytes:
    return encode(msg_id, cmd, payload, FLAG_TYPE_REPLY)


def error_reply(msg_id: int, cmd: int, errno_: int) -> bytes:
    return encode(msg_id, cmd, b"", FLAG_TYPE_REPLY | FLAG_ERROR, errno_)
