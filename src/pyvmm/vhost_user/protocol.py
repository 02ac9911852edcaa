"""vhost-user messages (QEMU docs/interop/vhost-user.rst), sans I/O.

A message is a 12-byte header (request, flags, size) and ``size`` bytes of payload,
with file descriptors riding along in SCM_RIGHTS. ``decode`` checks every size
against what the request needs and raises :class:`ProtocolError` (never anything
else) for a malformed one; ``encode_reply`` builds answers.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

from pyvmm.errors import PyvmmError

VHOST_USER_VERSION = 0x1
VHOST_USER_VERSION_MASK = 0x3
VHOST_USER_REPLY_MASK = 0x4
VHOST_USER_NEED_REPLY_MASK = 0x8
HEADER = struct.Struct("<III")
INFLIGHT = struct.Struct("<QQHH4x")  # VhostUserInflight, padded as QEMU sends it
MAX_PAYLOAD = 4096
VHOST_USER_MAX_RAM_SLOTS = 8
VHOST_USER_F_PROTOCOL_FEATURES = 30
VHOST_USER_VRING_IDX_MASK = 0xFF
VHOST_USER_VRING_NOFD_MASK = 1 << 8


class Request(enum.IntEnum):
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    GET_CONFIG = 24
    SET_CONFIG = 25
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    RESET_DEVICE = 34


class ProtocolFeature(enum.IntEnum):
    MQ = 0
    REPLY_ACK = 3
    CONFIG = 9
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13


class ProtocolError(PyvmmError):
    """A malformed message: the session answers it (if it can) and is closed."""


@dataclass
class MemoryRegion:
    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int] = field(default_factory=list)

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & VHOST_USER_NEED_REPLY_MASK)

    # --- fds: the message holds them until a handler takes one (peer/channel.py) ------
    def one_fd(self) -> int:
        """The message's single fd (still the message's: ``take`` it once it is used)."""
        if len(self.fds) != 1:
            raise ProtocolError(f"request {self.request} with {len(self.fds)} fds, needs 1")
        return self.fds[0]

    def take(self, fd: int) -> int:
        """The handler keeps ``fd``: the channel will not close it."""
        self.fds.remove(fd)
        return fd

    # --- payload views, each checking its size -----------------------------------------
    def _need(self, n: int, exact: bool = True) -> None:
        if len(self.payload) < n or (exact and len(self.payload) != n):
            raise ProtocolError(f"request {self.request}: payload of {len(self.payload)} bytes, "
                                f"needs {n}")

    def u64(self) -> int:
        self._need(8)
        return int(struct.unpack("<Q", self.payload)[0])

    def vring_state(self) -> tuple[int, int]:
        self._need(8)
        index, num = struct.unpack("<II", self.payload)
        return index, num

    def vring_addr(self) -> tuple[int, int, int, int, int]:
        """(index, flags, desc, used, avail) as frontend user addresses."""
        self._need(40)
        index, flags, desc, used, avail, _log = struct.unpack("<IIQQQQ", self.payload)
        return index, flags, desc, used, avail

    def mem_table(self) -> list[MemoryRegion]:
        self._need(8, exact=False)
        n = struct.unpack_from("<I", self.payload)[0]
        if not 1 <= n <= VHOST_USER_MAX_RAM_SLOTS or len(self.payload) != 8 + 32 * n:
            raise ProtocolError(f"memory table of {n} regions in {len(self.payload)} bytes")
        return [MemoryRegion(*struct.unpack_from("<QQQQ", self.payload, 8 + 32 * i))
                for i in range(n)]

    def inflight(self) -> tuple[int, int, int, int]:
        """(mmap_size, mmap_offset, num_queues, queue_size) of VhostUserInflight."""
        self._need(INFLIGHT.size)
        size, offset, nq, qs = INFLIGHT.unpack(self.payload)
        return size, offset, nq, qs

    def config(self) -> tuple[int, int, int, bytes]:
        self._need(12, exact=False)
        offset, size, flags = struct.unpack_from("<III", self.payload)
        if size > 256 or len(self.payload) != 12 + size:
            raise ProtocolError(f"config message of size {size} in {len(self.payload)} bytes")
        return offset, size, flags, self.payload[12:]


def frame(header: bytes) -> int:
    """A message's total length from its header (the channel's framing function)."""
    return HEADER.size + decode_header(header)[2]


def decode_header(raw: bytes) -> tuple[int, int, int]:
    if len(raw) != HEADER.size:
        raise ProtocolError(f"short header ({len(raw)} bytes)")
    request, flags, size = HEADER.unpack(raw)
    if flags & VHOST_USER_VERSION_MASK != VHOST_USER_VERSION:
        raise ProtocolError(f"unsupported protocol version in flags {flags:#x}")
    if size > MAX_PAYLOAD:
        raise ProtocolError(f"payload of {size} bytes is over the {MAX_PAYLOAD}-byte limit")
    return request, flags, size


def encode_reply(request: int, payload: bytes) -> bytes:
    return HEADER.pack(request, VHOST_USER_VERSION | VHOST_USER_REPLY_MASK, len(payload)) + payload


def encode(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """A frontend-side message (tests, and any frontend pyvmm grows later)."""
    return HEADER.pack(request, VHOST_USER_VERSION | flags, len(payload)) + payload
