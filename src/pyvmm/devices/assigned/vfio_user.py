"""A vfio-user client: a PCI function of pyvmm's VM that another process serves
(QEMU docs/devel/vfio-user.rst, the client side; any spec-conformant server —
``pyvmm backend vfio-user`` here). The VMM stays out of the device's data path
wherever it can: direct assignment, with a socket where the IOMMU group would be.

- **At creation** it connects (bounded), negotiates VERSION, asks DEVICE_GET_INFO,
  DEVICE_GET_REGION_INFO for BARs 0-5 and the config region (with the sparse-mmap
  capability where offered), reads the server's config space once and
  DEVICE_GET_IRQ_INFO for MSI-X, and gives the server all of guest RAM with DMA_MAP
  and each region's memfd, so the device DMAs into guest memory directly. Anything
  unusable — no socket, a refusal, a malformed or absurd answer — is a one-line
  ``ConfigError`` and nothing stays open.
- **Config space** is the server's, forwarded with REGION_READ/WRITE on region 7,
  except what the VMM must own: the BAR registers (sizes from the region info, the
  addresses the VMM assigns from its PCI windows like any other function's, moves
  applied by the PCI root), the ROM BAR (none), the interrupt line, and
  the MSI-X and MSI capabilities, which are emulated here (``MsixCapability``,
  ``MsiCapability`` at the server's offsets; the table and PBA in the BAR the server
  names).
- **BARs:** the mmap'able areas of a region (the whole region, or the sparse-mmap
  areas) are mapped from the server's fd and become **KVM memslots** at the BAR's
  address (``ctx.bar_mapper()``), following BAR moves: the guest's accesses there
  never exit. Every other BAR access is trapped, counted in the exit table under
  ``<name>.bar<i>``, and forwarded as REGION_READ/WRITE — except the MSI-X table and
  PBA, which are the VMM's. Each access waits for its reply, so a write has taken
  effect in the server when the vCPU goes on — what an emulated device gives and
  tiny guests with short polling budgets rely on. With ``posted_writes=on`` memory-BAR
  writes are sent no-reply instead (as PCI posts memory writes), while no BAR area
  is mapped (a guest access through a mapping would bypass the stream and overtake
  them).
- **Interrupts:** when the guest enables MSI-X, DEVICE_SET_IRQS hands the server one
  eventfd per vector: for an unmasked vector its **KVM irqfd** (the route follows the
  guest's table writes), so an interrupt goes device → KVM → guest with no VMM
  thread; for a masked one the VMM's own eventfd, whose signals become PBA bits, and
  unmasking swaps the irqfd back and delivers what is pending. Without irqfds
  (``--msi signal``) every vector uses the VMM's eventfd (``interrupt_forwards``).
  MSI (same capability layout as the VMM's emulation) and INTx get the VMM's
  eventfds: the VMM raises the vector, or pulses the function's GSI.

Every reply is untrusted: message id, command, reply type and length are checked
before the payload is used, fds are counted and the unexpected closed, and every
wait is bounded (``timeout``). At run time a violation, a timeout, or the socket's
hang-up (watched on the event loop) fails the device once, in one log line: its
memslots are removed, trapped reads return all-ones, writes are dropped, and the VM
goes on. A refused access (an error reply) is logged once and reads as all-ones.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import mmap
import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pyvmm.devices.pci.config_space import BarChange, PCIConfigSpace, WriteHook
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.devices.pci.msi import MsiCapability
from pyvmm.devices.pci.msix import MsixCapability
from pyvmm.devices.spec import DeviceConfig, DeviceSpec, HostContext, Kind, Mode
from pyvmm.errors import BackendError, ConfigError, GuestMemoryError
from pyvmm.memory import check_mappable
from pyvmm.peer.requester import Requester
from pyvmm.ratelimit_log import OnceLog
from pyvmm.schema import option
from pyvmm.uapi import pci as PC
from pyvmm.unix_socket import check_socket_path
from pyvmm.vfio_user import protocol as P

if TYPE_CHECKING:
    from pyvmm.devices.assigned.shmem import BarMapper
    from pyvmm.event import EventManager
    from pyvmm.irq.msi import MsiSink
    from pyvmm.memory import GuestMemory

DEFAULT_TIMEOUT = 5.0
VERSION_MAJOR, VERSION_MINOR = 0, 1
MAX_FDS = 16  # per reply we accept (only REGION_INFO carries one)
CAPS_ROOM = 1024  # argsz room offered for REGION_INFO capabilities
MAX_CAPS_JSON = 4096
MAX_SPARSE_AREAS = 64
MAX_BAR_32 = 1 << 31  # a 32-bit BAR larger than this cannot be placed anyway
MAX_BAR_64 = 1 << 40
PAGE = mmap.PAGESIZE

VFIO_REGION_INFO_FLAG_CAPS = 1 << 3
VFIO_REGION_INFO_CAP_SPARSE_MMAP = 1
CAP_HEADER = struct.Struct("<HHI")  # struct vfio_info_cap_header: id, version, next
SPARSE = struct.Struct("<II")  # nr_areas, reserved; then (offset u64, size u64) each
AREA = struct.Struct("<QQ")

# Config-space bytes the VMM owns (never forwarded): BARs, ROM BAR, interrupt line/pin.
OWN_RANGES = ((PC.PCI_BASE_ADDRESS_0, PC.PCI_BASE_ADDRESS_0 + 24),
              (PC.PCI_ROM_ADDRESS, PC.PCI_ROM_ADDRESS + 4),
              (PC.PCI_INTERRUPT_LINE, PC.PCI_INTERRUPT_PIN + 1))
MSIX_CAP_SIZE = 12
MSI_CAP_SIZE = 24  # 64-bit address with per-vector masking: the layout MsiCapability has


class Refused(BackendError):
    """The server answered with an error reply (``errno``): protocol-legal, not fatal."""

    def __init__(self, errno_: int, what: str) -> None:
        super().__init__(f"refused {what} ({errno.errorcode.get(errno_, errno_)})")
        self.errno = errno_


@dataclass(kw_only=True)
class VfioUserConfig(DeviceConfig):
    socket: str = option(doc="the vfio-user server's Unix socket (the server listens, "
                         "pyvmm connects)", metavar="PATH")
    timeout: float = option(DEFAULT_TIMEOUT, "seconds to wait for each of the server's "
                            "replies (connecting included)")
    mmap: bool = option(True, "map the server's mmap'able BAR areas into the guest as "
                        "KVM memslots (off: every BAR access is a message)")
    posted_writes: bool = option(False, "send trapped memory-BAR writes without waiting "
                                 "for the reply (PCI posts memory writes) while no BAR area "
                                 "is mapped into the guest (off: each write returns once the "
                                 "server has handled it)")

    def check(self) -> None:
        if not 0 < self.timeout <= 600:
            raise ValueError("timeout must be between 0 and 600 seconds")

    def validate(self) -> None:
        """Before the VM is built: a socket is there (connecting comes at build)."""
        check_socket_path(self.socket, "vfio-user")


# --- the connection ---------------------------------------------------------------------
def connect_socket(path: str, timeout: float) -> socket.socket:
    """A connected socket, or a one-line ConfigError saying why not."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as e:
        s.close()
        why = {FileNotFoundError: "does not exist",
               ConnectionRefusedError: "refuses connections (no server listens on it)",
               TimeoutError: f"did not accept within {timeout:g} s"}.get(
                   type(e), f"cannot be connected to ({e.strerror or e})")
        raise ConfigError(f"vfio-user socket {path!r} {why}") from None
    except BaseException:
        s.close()
        raise
    return s


def _close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
    fds.clear()


class Client(Requester):
    """The client's end of the socket: one request at a time (callers hold the
    device's lock), every wait bounded by ``timeout``, every reply checked before its
    payload is used."""

    def __init__(self, sock: socket.socket, timeout: float) -> None:
        super().__init__(sock, timeout, MAX_FDS)
        self._id = 0

    def post(self, cmd: P.Command, payload: bytes, what: str = "") -> None:
        """Send ``cmd`` flagged no-reply: the server answers nothing, not even an error
        (a posted write). Ordered with every other message on the stream."""
        self._id = (self._id + 1) & 0xFFFF
        self.send_all(P.encode(self._id, cmd, payload, P.FLAG_NO_REPLY), [],
                   time.monotonic() + self.timeout, what or cmd.name)
        self.messages += 1

    def request(self, cmd: P.Command, payload: bytes = b"", fds: list[int] | None = None,
                *, nfds: int = 0, what: str = "") -> tuple[bytes, list[int]]:
        """Send ``cmd`` and return the reply's payload and its fds (at most ``nfds``,
        the caller's to close). BackendError for anything the protocol does not
        allow; Refused for an error reply."""
        what = what or cmd.name
        self._id = (self._id + 1) & 0xFFFF
        msg_id = self._id
        deadline = time.monotonic() + self.timeout
        self.send_all(P.encode(msg_id, cmd, payload), fds or [], deadline, what)
        got: list[int] = []
        try:
            rid, rcmd, size, flags, err = P.HEADER.unpack(
                self.read_exact(P.HEADER.size, deadline, what, got))
            if rid != msg_id or rcmd != cmd:
                raise BackendError(f"answered {what} (message {msg_id}) with command "
                                   f"{rcmd}, message {rid}")
            if flags & 0xF != P.FLAG_TYPE_REPLY:
                raise BackendError(f"reply to {what} has flags {flags:#x}")
            if not P.HEADER.size <= size <= P.MAX_MESSAGE:
                raise BackendError(f"reply to {what} is {size} bytes long")
            body = self.read_exact(size - P.HEADER.size, deadline, what, got
                              ) if size > P.HEADER.size else b""
            if flags & P.FLAG_ERROR:
                raise Refused(err, what)
            if len(got) > nfds:
                raise BackendError(f"reply to {what} came with {len(got)} fds, at most "
                                   f"{nfds} expected")
        except BaseException:
            _close_fds(got)
            raise
        self.messages += 1
        return body, got


# --- what the server offers ------------------------------------------------------------
@dataclass
class Area:
    """An mmap'able part of a BAR: its offset in the BAR, our mapping of it, and the
    memslot it is at (None: not mapped into the guest now)."""

    offset: int
    size: int
    map: mmap.mmap
    host_addr: int = 0
    handle: object | None = None
    anchor: ctypes.c_char | None = field(default=None, repr=False)


@dataclass
class Region:
    index: int
    size: int
    flags: int
    is_io: bool = False
    is_64bit: bool = False
    prefetchable: bool = False
    areas: list[Area] = field(default_factory=list)


class _MirrorConfig(PCIConfigSpace):
    """The local copy of the server's config space; a capability emulated here goes
    at the offset the server gave it (``place_at``), in the server's list."""

    place_at: int | None = None

    def add_capability(self, cap_id: int, body: bytes, body_wmask: bytes | None = None,
                       hook: WriteHook | None = None) -> int:
        at = self.place_at
        if at is None:
            return super().add_capability(cap_id, body, body_wmask, hook)
        keep = (self.data[PC.PCI_CAPABILITY_LIST], self.get16(PC.PCI_STATUS),
                self.data[at + 1], self._cap_tail, self._next_cap)
        self._cap_tail, self._next_cap = None, at
        off = super().add_capability(cap_id, body, body_wmask, hook)
        self.data[PC.PCI_CAPABILITY_LIST], status, self.data[at + 1] = keep[:3]
        self.set16(PC.PCI_STATUS, status)
        self._cap_tail, self._next_cap = keep[3], keep[4]
        return off


def _overlaps(a: int, n: int, ranges: list[tuple[int, int]]) -> bool:
    return any(a < e and s < a + n for s, e in ranges)


class VfioUserDevice(PCIDevice):
    """A PCI function served over vfio-user (see the module doc)."""

    def __init__(self, client: Client, *, name: str, mem: GuestMemory, events: EventManager,
                 msi: MsiSink, bar_mapper: BarMapper | None, path: str = "",
                 use_mmap: bool = True, posted_writes: bool = False) -> None:
        super().__init__()
        self.name, self.path, self.events = name, path, events
        self.errors = OnceLog()
        self.lock = threading.RLock()  # vCPU (config, BARs) vs event loop (HUP, vectors)
        self._client: Client | None = client
        self.mapper = bar_mapper if use_mmap else None
        self.posted_writes = posted_writes
        self.regions: dict[int, Region] = {}
        self.msix: MsixCapability | None = None
        self.msi: MsiCapability | None = None
        self._msi_fds: list[int] = []  # our eventfds the server signals for MSI vectors
        self._intx_fd: int | None = None  # ... and for INTx
        self.intx_forwards = 0
        self._forward_fds: list[int | None] = []  # own eventfds: masked vectors, no irqfd
        self._handed: list[str | None] = []  # per vector: "irqfd", "forward" (or None)
        self.failed: str | None = None
        self.trapped_reads = self.trapped_writes = self.config_messages = 0
        self.interrupt_forwards = self.fast_vectors = self.refusals = 0
        self.map_failures = 0
        self.dma_maps = 0
        self._closed = False
        try:
            self._handshake(client, mem, msi)
        except BaseException:
            self._release()
            raise
        # Hang-ups only (EPOLLHUP/ERR come anyway): with EPOLLIN every reply a vCPU
        # request reads would wake the event loop too. Data sent unasked is seen by the
        # next request (another message id) or with the server's hang-up.
        events.add(client.fileno(), self._on_socket, select.EPOLLRDHUP)

    # --- creation ------------------------------------------------------------------------
    def _handshake(self, c: Client, mem: GuestMemory, msi: MsiSink) -> None:
        caps = json.dumps({"capabilities": {"max_msg_fds": MAX_FDS,
                                            "max_data_xfer_size": P.MAX_MESSAGE}})
        body, _ = c.request(P.Command.VERSION, struct.pack("<HH", VERSION_MAJOR, VERSION_MINOR)
                            + caps.encode() + b"\0")
        if len(body) < 4:
            raise BackendError(f"VERSION reply of {len(body)} bytes")
        major, _minor = struct.unpack_from("<HH", body)
        if major != VERSION_MAJOR:
            raise BackendError(f"speaks vfio-user version {major}, not {VERSION_MAJOR}")
        self.max_fds = self._server_max_fds(body[4:])
        body, _ = c.request(P.Command.DEVICE_GET_INFO, P.DEVICE_INFO.pack(
            P.DEVICE_INFO.size, 0, 0, 0))
        if len(body) < P.DEVICE_INFO.size:
            raise BackendError(f"DEVICE_GET_INFO reply of {len(body)} bytes")
        _argsz, flags, nregions, nirqs = P.DEVICE_INFO.unpack_from(body)
        if not flags & P.VFIO_DEVICE_FLAGS_PCI:
            raise BackendError(f"device flags {flags:#x}: not a PCI device")
        if not P.VFIO_PCI_CONFIG_REGION_INDEX < nregions <= 64 or nirqs > 64:
            raise BackendError(f"says it has {nregions} regions and {nirqs} IRQ indices")
        cfg = self._region_info(c, P.VFIO_PCI_CONFIG_REGION_INDEX)
        if not PC.PCI_CFG_SPACE_SIZE <= cfg.size <= 4096 or cfg.areas:
            raise BackendError(f"config region of {cfg.size:#x} bytes")
        raw = self._region_read(c, P.VFIO_PCI_CONFIG_REGION_INDEX, 0, PC.PCI_CFG_SPACE_SIZE)
        for i in range(PC.PCI_STD_NUM_BARS):
            r = self._region_info(c, i)
            if r.size:
                self.regions[i] = r
        self._build_config(raw, cfg.size)
        self._setup_msix(c, raw, nirqs, msi)
        self._setup_msi(c, raw, nirqs, msi)
        self._setup_intx(c, raw, nirqs)
        for ram in mem.regions():  # the device DMAs into guest RAM directly
            c.request(P.Command.DMA_MAP, P.DMA_MAP.pack(
                P.DMA_MAP.size, P.VFIO_USER_F_DMA_REGION_READ | P.VFIO_USER_F_DMA_REGION_WRITE,
                ram.map_offset, ram.guest_addr, ram.size), [ram.fd],
                what=f"DMA_MAP {ram.guest_addr:#x}")
            self.dma_maps += 1

    @staticmethod
    def _server_max_fds(raw: bytes) -> int:
        """max_msg_fds from the server's capabilities JSON (1 if it says nothing)."""
        text = raw.split(b"\0", 1)[0]
        if not text:
            return 1
        if len(text) > MAX_CAPS_JSON:
            raise BackendError(f"VERSION capabilities of {len(text)} bytes")
        try:
            caps = json.loads(text.decode())
        except (UnicodeDecodeError, ValueError):
            raise BackendError("VERSION capabilities are not JSON") from None
        n = caps.get("capabilities", {}).get("max_msg_fds", 1) if isinstance(caps, dict) else 1
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise BackendError(f"max_msg_fds {n!r}")
        return min(n, MAX_FDS)

    def _region_info(self, c: Client, index: int) -> Region:
        body, fds = c.request(P.Command.DEVICE_GET_REGION_INFO, P.REGION_INFO.pack(
            P.REGION_INFO.size + CAPS_ROOM, 0, index, 0, 0, 0), nfds=1,
            what=f"REGION_INFO {index}")
        try:
            if len(body) < P.REGION_INFO.size:
                raise BackendError(f"REGION_INFO {index} reply of {len(body)} bytes")
            _argsz, flags, rindex, cap_off, size, offset = P.REGION_INFO.unpack_from(body)
            if rindex != index:
                raise BackendError(f"answered REGION_INFO {index} for region {rindex}")
            r = Region(index, size, flags)
            if index < PC.PCI_STD_NUM_BARS and size:
                self._check_bar(r)
            if not flags & P.VFIO_REGION_INFO_FLAG_MMAP or not size:
                if fds:
                    raise BackendError(f"REGION_INFO {index} came with an fd but no "
                                       "VFIO_REGION_INFO_FLAG_MMAP")
                return r
            if not fds:
                raise BackendError(f"region {index} is mmap'able but came with no fd")
            if index >= PC.PCI_STD_NUM_BARS or r.is_io:
                return r  # we map memory BARs only; the rest is trapped
            areas = [(0, size)]
            if flags & VFIO_REGION_INFO_FLAG_CAPS and cap_off:
                areas = self._sparse_areas(body, cap_off, size, index) or areas
            if self.mapper is not None:
                self._map_areas(r, fds[0], offset, areas)
            return r
        finally:
            _close_fds(fds)

    def _check_bar(self, r: Region) -> None:
        size, i = r.size, r.index
        if size & (size - 1) or size < 4:
            raise BackendError(f"BAR {i} of {size:#x} bytes is not a power of two")
        if size > MAX_BAR_64:
            raise BackendError(f"BAR {i} of {size:#x} bytes is absurd")

    def _sparse_areas(self, body: bytes, cap_off: int, size: int,
                      index: int) -> list[tuple[int, int]]:
        """The sparse-mmap capability's areas, checked: inside the region, page-aligned,
        not overlapping. Other capabilities are skipped; the chain is bounded."""
        seen: set[int] = set()
        off = cap_off
        while off:
            if off in seen or off < P.REGION_INFO.size or off + CAP_HEADER.size > len(body):
                raise BackendError(f"region {index}: capability chain broken at {off}")
            seen.add(off)
            cid, _ver, nxt = CAP_HEADER.unpack_from(body, off)
            if cid == VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                p = off + CAP_HEADER.size
                if p + SPARSE.size > len(body):
                    raise BackendError(f"region {index}: short sparse-mmap capability")
                n = SPARSE.unpack_from(body, p)[0]
                p += SPARSE.size
                if n > MAX_SPARSE_AREAS or p + n * AREA.size > len(body):
                    raise BackendError(f"region {index}: {n} sparse-mmap areas")
                out: list[tuple[int, int]] = []
                for k in range(n):
                    a, s = AREA.unpack_from(body, p + k * AREA.size)
                    if (not s or a % PAGE or s % PAGE or a + s > size
                            or _overlaps(a, s, [(x, x + y) for x, y in out])):
                        raise BackendError(f"region {index}: sparse-mmap area {a:#x}+{s:#x} "
                                           f"outside, unaligned or overlapping")
                    out.append((a, s))
                return out
            off = nxt
        return []

    def _map_areas(self, r: Region, fd: int, offset: int, areas: list[tuple[int, int]]) -> None:
        """Map the areas from the server's fd; one that cannot be mapped safely stays
        trapped (logged once), it is not an error of the device."""
        try:
            if offset % PAGE:
                raise GuestMemoryError(f"file offset {offset:#x} is not page-aligned")
            for a, s in areas:
                check_mappable(fd, offset + a, s)
        except GuestMemoryError as e:
            self.map_failures += 1
            self.errors.warn("mmap", f"{self.name}: BAR {r.index} cannot be mapped ({e}); "
                             "its accesses are forwarded")
            return
        for a, s in areas:
            try:
                m = mmap.mmap(fd, s, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=offset + a)
            except (OSError, ValueError, OverflowError) as e:
                self.map_failures += 1
                self.errors.warn("mmap", f"{self.name}: BAR {r.index} area {a:#x}+{s:#x} "
                                 f"cannot be mapped ({e}); its accesses are forwarded")
                continue
            anchor = ctypes.c_char.from_buffer(m)
            r.areas.append(Area(a, s, m, ctypes.addressof(anchor), anchor=anchor))

    def _build_config(self, raw: bytes, size: int) -> None:
        """The local config space: the server's snapshot, with the BAR registers the
        VMM's (sizes from the region info, types from the server's registers)."""
        vid, did = struct.unpack_from("<HH", raw)
        c = self.config = _MirrorConfig(vid, did, int.from_bytes(raw[9:12], "little"),
                                        size=size)
        c.data[:len(raw)] = raw
        for off in range(PC.PCI_BASE_ADDRESS_0, PC.PCI_BASE_ADDRESS_0 + 24):
            c.data[off] = 0
        c.set32(PC.PCI_ROM_ADDRESS, 0)
        c.data[PC.PCI_INTERRUPT_PIN] = 0  # set by _setup_intx if the server has INTx
        c.data[PC.PCI_INTERRUPT_LINE] = 0
        skip = -1
        for i in range(PC.PCI_STD_NUM_BARS):
            reg = int.from_bytes(raw[PC.PCI_BASE_ADDRESS_0 + 4 * i:][:4], "little")
            r = self.regions.get(i)
            if i == skip:
                if r is not None:
                    raise BackendError(f"region {i} is the upper half of 64-bit BAR {i - 1} "
                                       "but has a size")
                continue
            if r is None:
                continue
            r.is_io = bool(reg & PC.PCI_BASE_ADDRESS_SPACE_IO)
            r.is_64bit = not r.is_io and reg & 0x6 == PC.PCI_BASE_ADDRESS_MEM_TYPE_64
            r.prefetchable = not r.is_io and bool(reg & PC.PCI_BASE_ADDRESS_MEM_PREFETCH)
            limit = 1 << 16 if r.is_io else (MAX_BAR_64 if r.is_64bit else MAX_BAR_32)
            if r.size > limit or (r.is_64bit and i == 5) or (not r.is_io and r.size < 16):
                raise BackendError(f"BAR {i} ({'io' if r.is_io else 'mem'}, {r.size:#x} "
                                   "bytes) cannot be placed")
            if r.is_io and r.areas:
                raise BackendError(f"I/O BAR {i} offered as mmap'able")
            c.add_bar(i, r.size, is_io=r.is_io, is_64bit=r.is_64bit,
                      prefetchable=r.prefetchable)
            if r.is_64bit:
                skip = i + 1

    def _find_cap(self, raw: bytes, cap_id: int) -> int | None:
        if not raw[PC.PCI_STATUS] & PC.PCI_STATUS_CAP_LIST:
            return None
        off, seen = raw[PC.PCI_CAPABILITY_LIST] & ~3, set()
        while off:
            if off in seen or off < PC.PCI_STD_HEADER_SIZEOF or off + 2 > len(raw):
                raise BackendError(f"capability list broken at {off:#x}")
            seen.add(off)
            if raw[off] == cap_id:
                return off
            off = raw[off + 1] & ~3
        return None

    def _setup_msix(self, c: Client, raw: bytes, nirqs: int, msi: MsiSink) -> None:
        off = self._find_cap(raw, PC.PCI_CAP_ID_MSIX)
        if off is None:
            return
        if off % 4 or off + MSIX_CAP_SIZE > PC.PCI_CFG_SPACE_SIZE:
            raise BackendError(f"MSI-X capability at {off:#x}")
        flags, table, pba = struct.unpack_from("<HII", raw, off + 2)
        vectors = (flags & PC.PCI_MSIX_FLAGS_QSIZE) + 1
        tbar, toff = table & PC.PCI_MSIX_TABLE_BIR, table & PC.PCI_MSIX_TABLE_OFFSET
        pbar, poff = pba & PC.PCI_MSIX_TABLE_BIR, pba & PC.PCI_MSIX_TABLE_OFFSET
        r = self.regions.get(tbar)
        tsize, psize = vectors * PC.PCI_MSIX_ENTRY_SIZE, ((vectors + 63) // 64) * 8
        if (r is None or r.is_io or pbar != tbar or toff + tsize > r.size
                or poff + psize > r.size or _overlaps(toff, tsize, [(poff, poff + psize)])):
            raise BackendError(f"MSI-X table {tbar}:{toff:#x} / PBA {pbar}:{poff:#x} for "
                               f"{vectors} vectors does not fit its BAR")
        if nirqs <= P.VFIO_PCI_MSIX_IRQ_INDEX:
            raise BackendError("has an MSI-X capability but no MSI-X IRQ index")
        count = self._irq_info(c, P.VFIO_PCI_MSIX_IRQ_INDEX)
        if count != vectors:
            raise BackendError(f"MSI-X capability has {vectors} vectors, IRQ_INFO {count}")
        # The table and PBA are the VMM's: an mmap'able area over them is not mapped.
        for a in list(r.areas):
            if _overlaps(a.offset, a.size, [(toff, toff + tsize), (poff, poff + psize)]):
                r.areas.remove(a)
                self._unmap_area(a)
        cfgsp = self.config
        assert isinstance(cfgsp, _MirrorConfig)
        cfgsp.place_at = off
        try:
            self.msix = MsixCapability(cfgsp, msi, vectors, tbar, toff, poff)
        finally:
            cfgsp.place_at = None
        self._forward_fds = [None] * vectors

    def _irq_info(self, c: Client, index: int) -> int:
        """The vector count of IRQ index ``index`` (which must take eventfds)."""
        body, _ = c.request(P.Command.DEVICE_GET_IRQ_INFO, P.IRQ_INFO.pack(
            P.IRQ_INFO.size, 0, index, 0), what=f"IRQ_INFO {index}")
        if len(body) < P.IRQ_INFO.size:
            raise BackendError(f"IRQ_INFO reply of {len(body)} bytes")
        _a, flags, rindex, count = P.IRQ_INFO.unpack_from(body)
        if rindex != index or not flags & P.VFIO_IRQ_INFO_EVENTFD:
            raise BackendError(f"IRQ_INFO for index {index} answered index {rindex} "
                               f"flags {flags:#x}")
        return int(count)

    def _setup_msi(self, c: Client, raw: bytes, nirqs: int, msi: MsiSink) -> None:
        """MSI, emulated here at the server's offset when its capability has the layout
        the VMM's emulation has (64-bit, per-vector masking); else it stays the
        server's, forwarded, and MSI is not delivered (docs: not modelled)."""
        off = self._find_cap(raw, PC.PCI_CAP_ID_MSI)
        if off is None or nirqs <= P.VFIO_PCI_MSI_IRQ_INDEX:
            return
        flags = int.from_bytes(raw[off + 2:off + 4], "little")
        want = PC.PCI_MSI_FLAGS_64BIT | PC.PCI_MSI_FLAGS_MASKBIT
        vectors = 1 << ((flags & PC.PCI_MSI_FLAGS_QMASK) >> 1)
        if (flags & want != want or off % 4 or off + MSI_CAP_SIZE > PC.PCI_CFG_SPACE_SIZE
                or vectors > 32):
            return
        msix = self.msix
        if msix is not None and _overlaps(off, MSI_CAP_SIZE,
                                          [(msix.off, msix.off + MSIX_CAP_SIZE)]):
            raise BackendError(f"MSI capability at {off:#x} overlaps MSI-X's")
        count = self._irq_info(c, P.VFIO_PCI_MSI_IRQ_INDEX)
        if count != vectors:
            raise BackendError(f"MSI capability has {vectors} vectors, IRQ_INFO {count}")
        cfgsp = self.config
        assert isinstance(cfgsp, _MirrorConfig)
        cfgsp.place_at = off
        try:
            self.msi = MsiCapability(cfgsp, msi, vectors)
        finally:
            cfgsp.place_at = None

    def _setup_intx(self, c: Client, raw: bytes, nirqs: int) -> None:
        """INTx, when the server has it: our eventfd, which the server signals on each
        rising edge of its line; the VMM pulses the function's GSI (see the docs)."""
        pin = raw[PC.PCI_INTERRUPT_PIN]
        if not 1 <= pin <= 4 or nirqs <= P.VFIO_PCI_INTX_IRQ_INDEX:
            return
        if self._irq_info(c, P.VFIO_PCI_INTX_IRQ_INDEX) != 1:
            return
        fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._intx_fd = fd
        c.request(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
            P.IRQ_SET.size, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER,
            P.VFIO_PCI_INTX_IRQ_INDEX, 0, 1), [fd], what="SET_IRQS INTx")
        self.config.data[PC.PCI_INTERRUPT_PIN] = pin
        self.events.add(fd, self._on_intx)

    def _on_intx(self, _fd: int = -1, _ev: int = 0) -> None:
        with self.lock:
            fd = self._intx_fd
            if fd is None:
                return
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            self.intx_forwards += 1
            self.intx.pulse()

    # --- the connection ------------------------------------------------------------------
    def _on_socket(self, fd: int, ev: int) -> None:
        """The server hung up (or the socket failed); data it left unread-by-us is a
        message no one asked for, which is as bad."""
        with self.lock:
            c = self._client
            if c is None or fd != c.fileno():
                return
            why = c.unasked()
            if why is not None:
                self._fail(why)

    def _fail(self, why: str) -> None:
        """The server is unusable: log once, let go of everything it gave us; the
        function reads as all-ones from now on. Called with ``lock`` held."""
        if self.failed is not None:
            return
        self.failed = why
        self.errors.warn("failed", f"{self.name}: vfio-user server {self.path or ''} {why}; "
                         "the device is failed (reads all-ones), the VM goes on")
        self._release()

    def _release(self) -> None:
        c, self._client = self._client, None
        if c is not None:
            with contextlib.suppress(Exception):
                self.events.remove(c.fileno())
            c.close()
        for r in self.regions.values():
            for a in r.areas:
                self._unmap_area(a)
            r.areas.clear()
        for n, fd in enumerate(self._forward_fds):
            if fd is not None:
                with contextlib.suppress(Exception):
                    self.events.remove(fd)
                os.close(fd)
                self._forward_fds[n] = None
        own = [*self._msi_fds, *([self._intx_fd] if self._intx_fd is not None else [])]
        self._msi_fds, self._intx_fd = [], None
        for fd in own:
            with contextlib.suppress(Exception):
                self.events.remove(fd)
            os.close(fd)

    def _unmap_area(self, a: Area) -> None:
        if a.handle is not None and self.mapper is not None:
            with contextlib.suppress(Exception):
                self.mapper.unmap(a.handle)
        a.handle = None
        a.anchor = None
        with contextlib.suppress(BufferError):
            a.map.close()

    def _call(self, cmd: P.Command, payload: bytes = b"", fds: list[int] | None = None,
              what: str = "") -> bytes | None:
        """A run-time request: None if refused (logged once) or the device has failed
        (a violation fails it here)."""
        c = self._client
        if c is None:
            return None
        try:
            return c.request(cmd, payload, fds, what=what)[0]
        except Refused as e:
            self.refusals += 1
            self.errors.warn(f"refused:{cmd.name}", f"{self.name}: vfio-user server {e}")
            return None
        except BackendError as e:
            self._fail(str(e))
            return None

    @staticmethod
    def _region_read(c: Client, region: int, offset: int, count: int) -> bytes:
        body, _ = c.request(P.Command.REGION_READ, P.REGION_ACCESS.pack(offset, region, count),
                            what=f"REGION_READ {region}:{offset:#x}+{count}")
        return VfioUserDevice._check_access(body, region, offset, count, count)

    @staticmethod
    def _check_access(body: bytes, region: int, offset: int, count: int, data: int) -> bytes:
        if len(body) != P.REGION_ACCESS.size + data:
            raise BackendError(f"region access reply of {len(body)} bytes for {count}")
        if P.REGION_ACCESS.unpack_from(body) != (offset, region, count):
            raise BackendError(f"region access reply for {P.REGION_ACCESS.unpack_from(body)}, "
                               f"not {(offset, region, count)}")
        return body[P.REGION_ACCESS.size:]

    def _access(self, region: int, offset: int, size: int, value: int | None) -> int | None:
        """REGION_READ (value None) or REGION_WRITE; the value read, None if it failed."""
        hdr = P.REGION_ACCESS.pack(offset, region, size)
        if value is None:
            body = self._call(P.Command.REGION_READ, hdr)
        else:
            body = self._call(P.Command.REGION_WRITE,
                              hdr + (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
        if body is None:
            return None
        try:
            data = self._check_access(body, region, offset, size, size if value is None else 0)
        except BackendError as e:
            self._fail(str(e))
            return None
        return int.from_bytes(data, "little")

    # --- config space --------------------------------------------------------------------
    def _own(self) -> list[tuple[int, int]]:
        own = list(OWN_RANGES)
        if self.msix is not None:
            own.append((self.msix.off, self.msix.off + MSIX_CAP_SIZE))
        if self.msi is not None:
            own.append((self.msi.off, self.msi.off + MSI_CAP_SIZE))
        return own

    def config_read(self, offset: int, size: int) -> int:
        with self.lock:
            if self.failed is not None or size not in (1, 2, 4) or offset < 0 or (
                    offset + size > self.config.size):
                return (1 << (8 * max(1, min(size, 4)))) - 1
            own = self._own()
            local = self.config.read(offset, size)
            if all(_overlaps(offset + i, 1, own) for i in range(size)):
                return local
            self.config_messages += 1
            remote = self._access(P.VFIO_PCI_CONFIG_REGION_INDEX, offset, size, None)
            if remote is None:
                return (1 << (8 * size)) - 1
            for i in range(size):  # our bytes over the server's
                if _overlaps(offset + i, 1, own):
                    m = 0xFF << (8 * i)
                    remote = (remote & ~m) | (local & m)
            return remote

    def config_write(self, offset: int, size: int, value: int) -> list[BarChange]:
        with self.lock:
            if self.failed is not None:
                return []
            was = self.msix.enabled if self.msix is not None else False
            was_msi = self.msi.enabled if self.msi is not None else False
            changes = super().config_write(offset, size, value)  # BARs, command, MSI-X
            own = self._own()
            if size in (1, 2, 4) and not all(_overlaps(offset + i, 1, own)
                                             for i in range(size)):
                self.config_messages += 1
                self._access(P.VFIO_PCI_CONFIG_REGION_INDEX, offset, size, value)
            if self.msix is not None and self.failed is None:
                if self.msix.enabled != was:
                    self._set_msix(self.msix.enabled)
                elif _overlaps(offset, size, [(self.msix.off, self.msix.off + 4)]):
                    self._sync_masks()  # the function mask may have changed
            if self.msi is not None and self.failed is None and self.msi.enabled != was_msi:
                self._set_msi(self.msi.enabled)
            return changes

    # --- interrupts ----------------------------------------------------------------------
    def _forward_fd(self, n: int) -> int:
        fd = self._forward_fds[n]
        if fd is None:
            fd = self._forward_fds[n] = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            self.events.add(fd, functools.partial(self._on_vector, n))
        return fd

    def _want(self, n: int) -> tuple[str, int]:
        """What vector ``n``'s server side should signal now: its irqfd while unmasked
        (KVM injects, no VMM thread), our own eventfd while masked or where the chip
        has no irqfds (the VMM then sets the PBA bit, or raises the vector itself)."""
        msix = self.msix
        assert msix is not None
        if not msix.masked(n):
            fd = msix.irqfd(n)
            if fd is not None:
                return "irqfd", fd
        return "forward", self._forward_fd(n)

    def _set_msix(self, on: bool) -> None:
        """DEVICE_SET_IRQS for MSI-X: one eventfd per vector (``_want``) when the guest
        enables it, none when it disables it."""
        msix = self.msix
        assert msix is not None
        trigger = P.VFIO_IRQ_SET_ACTION_TRIGGER
        self._handed = [None] * msix.vectors
        if not on:
            self._call(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
                P.IRQ_SET.size, P.VFIO_IRQ_SET_DATA_NONE | trigger,
                P.VFIO_PCI_MSIX_IRQ_INDEX, 0, 0))
            self.fast_vectors = 0
            return
        try:
            wants = [self._want(n) for n in range(msix.vectors)]
        except OSError as e:  # EMFILE: a server offering 2048 vectors, all masked
            self._fail(f"needs more eventfds than this VMM may open ({e.strerror or e})")
            return
        for start in range(0, len(wants), self.max_fds):
            part = wants[start:start + self.max_fds]
            if self._call(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
                    P.IRQ_SET.size, P.VFIO_IRQ_SET_DATA_EVENTFD | trigger,
                    P.VFIO_PCI_MSIX_IRQ_INDEX, start, len(part)), [fd for _, fd in part]
                          ) is None:
                return
            for i, (kind, _) in enumerate(part):
                self._handed[start + i] = kind
        self.fast_vectors = self._handed.count("irqfd")

    def _sync_masks(self) -> None:
        """The guest masked or unmasked vectors (entry or function mask): a vector whose
        server side should change gets its new eventfd (one SET_IRQS each). Masking
        hands the server our eventfd, so what it signals meanwhile becomes a PBA bit;
        unmasking hands the irqfd back and delivers what is pending — including a
        signal that reached our eventfd before the swap (as QEMU's masked notifier)."""
        msix = self.msix
        if msix is None or not msix.enabled or self.failed is not None:
            return
        for n in range(msix.vectors):
            try:
                kind, fd = self._want(n)
            except OSError as e:
                self._fail(f"needs more eventfds than this VMM may open ({e.strerror or e})")
                return
            if self._handed[n] == kind:
                continue
            if self._call(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
                    P.IRQ_SET.size, P.VFIO_IRQ_SET_DATA_EVENTFD | P.VFIO_IRQ_SET_ACTION_TRIGGER,
                    P.VFIO_PCI_MSIX_IRQ_INDEX, n, 1), [fd]) is None:
                return
            self._handed[n] = kind
            if kind == "irqfd":
                self._on_vector(n)  # a signal that came before the swap
        self.fast_vectors = self._handed.count("irqfd")

    def _set_msi(self, on: bool) -> None:
        """MSI enabled: the server gets one of our eventfds per vector, and the VMM
        raises the vector through its emulation (masking and pending bits honoured;
        MSI has no irqfd route that follows the capability here). Disabled: none."""
        msi = self.msi
        assert msi is not None
        trigger = P.VFIO_IRQ_SET_ACTION_TRIGGER
        if not on:
            self._call(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
                P.IRQ_SET.size, P.VFIO_IRQ_SET_DATA_NONE | trigger,
                P.VFIO_PCI_MSI_IRQ_INDEX, 0, 0))
            return
        while len(self._msi_fds) < msi.vectors:
            try:
                fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            except OSError as e:
                self._fail(f"needs more eventfds than this VMM may open ({e.strerror or e})")
                return
            self._msi_fds.append(fd)
            self.events.add(fd, functools.partial(self._on_msi, len(self._msi_fds) - 1))
        for start in range(0, msi.vectors, self.max_fds):
            part = self._msi_fds[start:start + self.max_fds]
            if self._call(P.Command.DEVICE_SET_IRQS, P.IRQ_SET.pack(
                    P.IRQ_SET.size, P.VFIO_IRQ_SET_DATA_EVENTFD | trigger,
                    P.VFIO_PCI_MSI_IRQ_INDEX, start, len(part)), part) is None:
                return

    def _on_msi(self, n: int, _fd: int = -1, _ev: int = 0) -> None:
        with self.lock:
            if n >= len(self._msi_fds) or self.msi is None:
                return
            try:
                os.eventfd_read(self._msi_fds[n])
            except BlockingIOError:
                return
            self.interrupt_forwards += 1
            self.msi.trigger(n)

    def _on_vector(self, n: int, _fd: int = -1, _ev: int = 0) -> None:
        """Our eventfd of vector ``n`` was signalled (the vector is masked, or the chip
        has no irqfds): raise it through the MSI-X emulation, which sets the PBA bit
        while it is masked and delivers it on unmask."""
        with self.lock:
            fd = self._forward_fds[n] if n < len(self._forward_fds) else None
            if fd is None or self.msix is None:
                return
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                return
            self.interrupt_forwards += 1
            self.msix.trigger(n)

    # --- BARs ----------------------------------------------------------------------------
    def read_bar(self, index: int, offset: int, size: int) -> int:
        with self.lock:
            msix = self.msix
            if msix is not None and index == msix.bar and msix.contains(offset):
                return msix.read(offset, size)
            if self.failed is not None or index not in self.regions:
                return (1 << (8 * size)) - 1
            self.trapped_reads += 1
            v = self._access(index, offset, size, None)
            return (1 << (8 * size)) - 1 if v is None else v

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        with self.lock:
            msix = self.msix
            if msix is not None and index == msix.bar and msix.contains(offset):
                msix.write(offset, size, value)
                if (offset - msix.table_offset) % PC.PCI_MSIX_ENTRY_SIZE + size > (
                        PC.PCI_MSIX_ENTRY_VECTOR_CTRL):
                    self._sync_masks()  # the write reached a vector control word
                return
            if self.failed is not None or index not in self.regions:
                return
            self.trapped_writes += 1
            c = self._client
            if (self.posted_writes and c is not None and not self.regions[index].is_io
                    and not self._mapped()):
                # A memory write is posted on PCI: the vCPU goes on at once (a doorbell
                # costs one send, not a round trip); a later read or non-posted write
                # is ordered after it on the stream. I/O writes are non-posted. Not while
                # any BAR area is mapped: a guest access there bypasses the stream and
                # could overtake the write, which PCI ordering forbids (a read does not
                # pass a posted write to the same function).
                try:
                    c.post(P.Command.REGION_WRITE, P.REGION_ACCESS.pack(offset, index, size)
                           + (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
                except BackendError as e:
                    self._fail(str(e))
                return
            self._access(index, offset, size, value)

    def bar_moved(self, index: int, new: int | None) -> None:
        """The BAR decodes at ``new`` now: its mapped areas follow as memslots (one KVM
        refuses — the guest put the BAR over RAM — stays trapped, counted)."""
        with self.lock:
            r = self.regions.get(index)
            if r is None or self.mapper is None:
                return
            for a in r.areas:
                if a.handle is not None:
                    self.mapper.unmap(a.handle)
                    a.handle = None
                if new is None or self.failed is not None:
                    continue
                try:
                    a.handle = self.mapper.map(new + a.offset, a.size, a.host_addr)
                except Exception as e:  # KVM refused (KvmError, no free slot): it traps
                    self.map_failures += 1
                    self.errors.warn("memslot", f"{self.name}: BAR {index} area at "
                                     f"{new + a.offset:#x} cannot be a memslot ({e}); trapped")

    # --- state ---------------------------------------------------------------------------
    @property
    def connected(self) -> bool:
        return self._client is not None

    def _mapped(self) -> bool:
        return any(a.handle is not None for r in self.regions.values() for a in r.areas)

    def mapped_areas(self) -> list[tuple[int, int, int]]:
        """(BAR, offset, size) of each area mapped into the guest now."""
        return [(r.index, a.offset, a.size) for r in self.regions.values() for a in r.areas
                if a.handle is not None]

    def metrics(self) -> dict[str, int]:
        c = self._client
        return {"server_messages": 0 if c is None else c.messages,
                "trapped_reads": self.trapped_reads, "trapped_writes": self.trapped_writes,
                "config_messages": self.config_messages,
                "mapped_areas": len(self.mapped_areas()), "map_failures": self.map_failures,
                "fast_vectors": self.fast_vectors,
                "interrupt_forwards": self.interrupt_forwards,
                "intx_forwards": self.intx_forwards,
                "dma_maps": self.dma_maps, "refusals": self.refusals,
                "failed": int(self.failed is not None)}

    def close(self) -> None:
        """The VM is going away (after its vCPU stopped)."""
        with self.lock:
            if self._closed:
                return
            self._closed = True
            self._release()


def create(cfg: VfioUserConfig, ctx: HostContext) -> VfioUserDevice:
    sock = connect_socket(cfg.socket, cfg.timeout)
    try:
        dev = VfioUserDevice(Client(sock, cfg.timeout), name=ctx.name, mem=ctx.mem,
                             events=ctx.events, msi=ctx.msi, bar_mapper=ctx.bar_mapper(),
                             path=cfg.socket, use_mmap=cfg.mmap,
                             posted_writes=cfg.posted_writes)
    except BackendError as e:
        sock.close()
        raise ConfigError(f"{ctx.name}: vfio-user server {cfg.socket!r}: {e}") from None
    except OSError as e:  # our own side: eventfds, mappings (EMFILE, ENOMEM)
        sock.close()
        raise ConfigError(f"{ctx.name}: vfio-user server {cfg.socket!r}: cannot set up "
                          f"the device here ({e.strerror or e})") from None
    except BaseException:
        sock.close()
        raise
    ctx.on_close(dev.close)
    return dev


SPEC = DeviceSpec("vfio-user", VfioUserConfig, Kind.PCI, create,
                  "a PCI function served by a vfio-user server in another process "
                  "(direct assignment)", positional="socket", exportable=False,
                  doc="vfio-user-client", mode=Mode.ASSIGNED)
