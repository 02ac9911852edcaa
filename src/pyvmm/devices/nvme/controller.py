"""An NVMe controller (NVM Express Base 1.4) with one namespace over a ``BlockBackend``:
full emulation, for unmodified drivers (Linux's ``nvme`` binds to it by class code).

Modelled: BAR0 registers (CAP, VS 1.2, INTMS/INTMC, CC with enable and shutdown, CSTS,
AQA/ASQ/ACQ) and doorbells (stride 4 bytes); the admin queue with Identify (controller,
namespace, active namespace list), Create/Delete I/O SQ and CQ, Set/Get Features
(number of queues, volatile write cache, and the rest stored and read back), Get Log
Page (error, SMART, firmware slot), Asynchronous Event Request (held: no events are
raised) and Abort (never aborts); up to ``MAX_IO_QUEUES`` I/O queue pairs with Read,
Write, Flush, Write Zeroes and Dataset Management (deallocate). Data moves with
preadv/pwritev straight between the image and guest memory named by PRPs. MSI-X (one
vector per completion queue, table in BAR4), INTx when MSI-X is off.

Every doorbell write is a trapped MMIO exit and the command runs on the vCPU thread
that wrote it — what full emulation costs, compared with virtio in docs/benchmarks.md.

A malicious driver can: point queues or PRPs anywhere (queues outside RAM are refused
at creation; a PRP outside RAM fails the command with Data Transfer Error; a queue
whose memory fails later makes the controller fatal, CSTS.CFS, until reset); ring
doorbells for queues that do not exist or with out-of-range values (ignored, logged
once); submit unknown opcodes, bad fields, LBAs past the end or transfers over MDTS
(each fails with the spec's status, DNR set). A command costs at most MDTS bytes of
I/O and a bounded PRP walk.

With ``limits`` (a virtual function's, ``vfio_user/vfs.py``) I/O commands pass token
buckets (``sharing/ratelimit.py``): when they are empty the controller stops fetching
from its I/O submission queues — the commands wait in the guest's queue, nothing is
dropped — and goes on from the limiter's timer. Every I/O command is charged one
operation and its bytes, failed ones too (a flood of bad commands is limited as well).
"""

from __future__ import annotations

import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from pyvmm.backends.block import BlockBackend
from pyvmm.devices.nvme import pages
from pyvmm.devices.nvme.queues import (
    CMD_SIZE,
    CompletionQueue,
    PrpError,
    SubmissionQueue,
    prp_views,
)
from pyvmm.devices.pci.config_space import PCIConfigSpace
from pyvmm.devices.pci.device import PCIDevice
from pyvmm.devices.pci.msix import MsixCapability
from pyvmm.devices.spec import DeviceSpec, DiskConfig, HostContext, Kind
from pyvmm.errors import GuestMemoryError
from pyvmm.irq.msi import MsiSink
from pyvmm.memory import GuestMemory
from pyvmm.ratelimit_log import OnceLog
from pyvmm.sharing.ratelimit import Limiter, Limits
from pyvmm.uapi import nvme as N
from pyvmm.uapi import pci as P

NVME_VENDOR, NVME_DEVICE = 0x1234, 0x4E56
MAX_IO_QUEUES = 4
MQES = 1023  # queue entries, 0-based (1024)
MDTS = 5  # 2^5 pages: 128 KiB per command
LBA_SHIFT = 9
BAR_REGS, BAR_MSIX = 0, 4
REGS_SIZE = 0x4000
AERL = 3  # 4 outstanding async event requests
_cmd = struct.Struct("<BBHI8xQQQ6I")  # opcode, flags, cid, nsid, mptr, prp1, prp2, cdw10-15


class NvmeController(PCIDevice):
    name = "nvme"

    def __init__(self, backend: BlockBackend, mem: GuestMemory, msi_sink: MsiSink,
                 serial: str = "pyvmm-nvme0", limits: Limits | None = None,
                 call_later: Callable[[float, Callable[[], None]], object] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.backend, self.mem = backend, mem
        self.serial = serial
        self.nsze = backend.size >> LBA_SHIFT
        c = self.config = PCIConfigSpace(NVME_VENDOR, NVME_DEVICE, N.NVME_PCI_CLASS,
                                         subsystem_vendor_id=NVME_VENDOR, subsystem_id=1)
        c.data[P.PCI_INTERRUPT_PIN] = 1
        c.add_bar(BAR_REGS, REGS_SIZE)
        c.add_bar(BAR_MSIX, 0x1000)
        self.msix = MsixCapability(c, msi_sink, vectors=1 + MAX_IO_QUEUES, bar=BAR_MSIX)
        self.errors = OnceLog()
        self.commands = 0
        self.bytes = 0
        self.failures = 0  # commands completed with an error status
        self._io_bytes = 0  # what the last I/O command moved, for the limiter
        self.limiter: Limiter | None = None
        if limits is not None and any(v is not None for v in limits):
            if call_later is None:
                raise ValueError("a rate limit needs call_later (the event loop's timer)")
            self.limiter = Limiter(limits, call_later, self._resume, clock=clock)
        self.reset()

    # --- state ------------------------------------------------------------------------
    def metrics(self) -> dict[str, int]:
        return {"commands": self.commands, "bytes": self.bytes, "failures": self.failures,
                "throttled": self.limiter.throttled if self.limiter is not None else 0,
                "fatal": int(bool(self.csts & N.NVME_CSTS_CFS))}

    def reset(self) -> None:
        self.cc = self.csts = self.aqa = self.asq = self.acq = 0
        self.intms = 0
        self.sqs: dict[int, SubmissionQueue] = {}
        self.cqs: dict[int, CompletionQueue] = {}
        self.features: dict[int, int] = {}
        self.aers = 0
        self.set_intx(False)

    def _fatal(self, why: str) -> None:
        """The controller cannot go on (its queue memory failed): CSTS.CFS, as hardware
        reports it; the host's recovery is a controller reset (CC.EN 1 -> 0)."""
        self.errors.warn("nvme-fatal", f"nvme: controller fatal: {why}")
        self.csts |= N.NVME_CSTS_CFS

    def dma_unmapped(self, start: int, size: int) -> None:
        """A queue's memory is going away (vfio-user DMA_UNMAP): fatal, as for a queue
        whose memory failed. Commands run synchronously, so none is in flight."""
        end = start + size
        queues: list[SubmissionQueue | CompletionQueue] = [*self.sqs.values(),
                                                           *self.cqs.values()]
        for q in queues:
            n = q.size * (CMD_SIZE if isinstance(q, SubmissionQueue) else 16)
            if q.base < end and start < q.base + n:
                self._fatal(f"queue {q.qid} memory at {q.base:#x} was unmapped")
                return

    @property
    def cap(self) -> int:
        return (MQES | 1 << 16  # CQR: queues must be physically contiguous
                | 10 << 24  # TO: 5 s to become ready
                | 1 << 37)  # CSS: NVM command set; DSTRD 0, MPSMIN/MAX 0 (4 KiB)

    # --- BAR0 -------------------------------------------------------------------------
    def read_bar(self, index: int, offset: int, size: int) -> int:
        if index == BAR_MSIX:
            return self.msix.read(offset, size)
        if index != BAR_REGS:
            return 0
        regs = {N.NVME_REG_CAP: self.cap, N.NVME_REG_VS: pages.VERSION,
                N.NVME_REG_INTMS: self.intms, N.NVME_REG_INTMC: self.intms,
                N.NVME_REG_CC: self.cc, N.NVME_REG_CSTS: self.csts,
                N.NVME_REG_AQA: self.aqa, N.NVME_REG_ASQ: self.asq, N.NVME_REG_ACQ: self.acq}
        base = offset & ~7 if (offset & ~7) in (0, 0x28, 0x30) else offset & ~3
        value = regs.get(base, 0) >> (8 * (offset - base))
        return value & ((1 << (8 * size)) - 1)

    def write_bar(self, index: int, offset: int, size: int, value: int) -> None:
        if index == BAR_MSIX:
            self.msix.write(offset, size, value)
            return
        if index != BAR_REGS:
            return
        if offset >= N.NVME_REG_DBS:
            self._doorbell((offset - N.NVME_REG_DBS) // 4, value & 0xFFFF)
            return
        v32 = value & 0xFFFFFFFF
        if offset == N.NVME_REG_INTMS:
            self.intms |= v32
            self._refresh_intx()
        elif offset == N.NVME_REG_INTMC:
            self.intms &= ~v32
            self._refresh_intx()
        elif offset == N.NVME_REG_CC:
            self._write_cc(v32)
        elif offset == N.NVME_REG_AQA:
            self.aqa = v32 & 0x0FFF0FFF
        elif offset in (N.NVME_REG_ASQ, N.NVME_REG_ASQ + 4, N.NVME_REG_ACQ, N.NVME_REG_ACQ + 4):
            reg = offset & ~7
            old = self.asq if reg == N.NVME_REG_ASQ else self.acq
            if size == 8:
                new = value
            elif offset == reg:
                new = (old & ~0xFFFFFFFF) | v32
            else:
                new = (old & 0xFFFFFFFF) | (v32 << 32)
            new &= ~0xFFF  # page aligned (bits 11:0 reserved)
            if reg == N.NVME_REG_ASQ:
                self.asq = new
            else:
                self.acq = new

    def _write_cc(self, v: int) -> None:
        was_on = self.cc & N.NVME_CC_ENABLE
        self.cc = v
        if not v & N.NVME_CC_ENABLE:
            if was_on:
                self.reset()  # a controller reset: queues gone, registers cleared
                self.cc = v
            return
        if v & N.NVME_CC_SHN_MASK:
            self.csts |= N.NVME_CSTS_SHST_CMPLT  # nothing is cached: shutdown is immediate
        if was_on:
            return
        asqs, acqs = (self.aqa & 0xFFF) + 1, ((self.aqa >> 16) & 0xFFF) + 1
        mps, css = (v >> 7) & 0xF, (v >> 4) & 7
        if (asqs < 2 or acqs < 2 or mps != 0 or css != 0
                or not self.mem.contains(self.asq, asqs * CMD_SIZE)
                or not self.mem.contains(self.acq, acqs * 16)):
            self._fatal(f"enabled with an unusable admin queue (AQA {self.aqa:#x}, "
                        f"ASQ {self.asq:#x}, ACQ {self.acq:#x}, MPS {mps}, CSS {css})")
            return
        cq = self.cqs[0] = CompletionQueue(0, self.acq, acqs, vector=0)
        sq = self.sqs[0] = SubmissionQueue(0, self.asq, asqs, cq)
        cq.sqs.append(sq)
        self.csts = N.NVME_CSTS_RDY

    # --- doorbells --------------------------------------------------------------------
    def _doorbell(self, index: int, value: int) -> None:
        qid, is_cq = index // 2, index % 2
        if not self.csts & N.NVME_CSTS_RDY or self.csts & N.NVME_CSTS_CFS:
            self.errors.warn("nvme-db-off", "nvme: doorbell while not ready; ignored")
            return
        q: SubmissionQueue | CompletionQueue | None = (self.cqs if is_cq else self.sqs).get(qid)
        if q is None or value >= q.size:
            self.errors.warn("nvme-db", f"nvme: doorbell {index} value {value} for no such "
                             "queue or beyond its size; ignored")
            return
        if isinstance(q, CompletionQueue):
            q.head = value
            self._refresh_intx()
            for sq in list(q.sqs):  # submission queues stalled on a full CQ go on
                self._run(sq)
        else:
            q.tail = value
            self._run(q)

    def _run(self, sq: SubmissionQueue) -> None:
        cq = sq.cq
        posted = False
        lim = self.limiter if sq.qid else None  # admin commands are never held
        while sq.head != sq.tail and not cq.full() and not self.csts & N.NVME_CSTS_CFS:
            if lim is not None and not lim.admit():
                break  # _resume goes on when the buckets allow
            try:
                raw = sq.fetch(self.mem)
            except GuestMemoryError as e:
                self._fatal(f"SQ {sq.qid}: {e}")
                return
            opcode, _flags, cid, nsid, _mptr, prp1, prp2, *cdw = _cmd.unpack(raw)
            self.commands += 1
            self._io_bytes = 0
            try:
                out = (self._admin(opcode, nsid, prp1, prp2, cdw) if sq.qid == 0
                       else self._io(opcode, nsid, prp1, prp2, cdw))
            except PrpError as e:
                out = (e.status, 0)
            if lim is not None:
                lim.charge(self._io_bytes)
            if out is None:
                continue  # held (an async event request)
            status, result = out
            if status:
                status |= N.NVME_SC_DNR
                self.failures += 1
            if sq.qid not in self.sqs:  # it deleted itself: no completion queue to post
                return
            try:
                cq.post(self.mem, sq, cid, status, result)
            except GuestMemoryError as e:
                self._fatal(f"CQ {cq.qid}: {e}")
                return
            posted = True
        if posted:
            self._interrupt(cq)

    def _resume(self) -> None:
        """The limiter's timer (the event loop): serve what waited, as a doorbell would."""
        if not self.csts & N.NVME_CSTS_RDY:
            return  # reset or disabled meanwhile: its queues are gone
        for sq in list(self.sqs.values()):
            if sq.qid and sq.qid in self.sqs:
                self._run(sq)

    # --- interrupts -------------------------------------------------------------------
    def _msix_on(self) -> bool:
        # Exported over vfio-user, the client emulates the capability and hands us
        # eventfds (``direct``); the enable bit here then stays clear.
        return self.msix.enabled or self.msix.direct is not None

    def _interrupt(self, cq: CompletionQueue) -> None:
        if not cq.irq_enabled:
            return
        if self._msix_on():
            self.msix.trigger(cq.vector)
        else:
            self._refresh_intx()

    def _refresh_intx(self) -> None:
        if self._msix_on():
            return
        level = not self.intms & 1 and any(q.irq_enabled and q.pending()
                                            for q in self.cqs.values())
        self.set_intx(level)

    # --- admin commands ---------------------------------------------------------------
    def _to_guest(self, prp1: int, prp2: int, data: bytes) -> None:
        done = 0
        for v in prp_views(self.mem, prp1, prp2, len(data)):
            v[:] = data[done:done + len(v)]
            done += len(v)

    def _admin(self, op: int, nsid: int, prp1: int, prp2: int,
               cdw: list[int]) -> tuple[int, int] | None:
        c10, c11 = cdw[0], cdw[1]
        if op == N.nvme_admin_identify:
            return self._identify(c10 & 0xFF, nsid, prp1, prp2)
        if op == N.nvme_admin_create_cq:
            return self._create_cq(c10 & 0xFFFF, (c10 >> 16) + 1, c11 & 0xFFFF, c11 >> 16, prp1)
        if op == N.nvme_admin_create_sq:
            return self._create_sq(c10 & 0xFFFF, (c10 >> 16) + 1, c11 & 0xFFFF, c11 >> 16, prp1)
        if op == N.nvme_admin_delete_sq:
            qid = c10 & 0xFFFF
            if qid == 0 or qid not in self.sqs:
                return N.NVME_SC_QID_INVALID, 0
            sq = self.sqs.pop(qid)
            sq.cq.sqs.remove(sq)
            return N.NVME_SC_SUCCESS, 0
        if op == N.nvme_admin_delete_cq:
            qid = c10 & 0xFFFF
            if qid == 0 or qid not in self.cqs:
                return N.NVME_SC_QID_INVALID, 0
            if self.cqs[qid].sqs:
                return N.NVME_SC_DELETE_INVALID, 0
            del self.cqs[qid]
            return N.NVME_SC_SUCCESS, 0
        if op in (N.nvme_admin_set_features, N.nvme_admin_get_features):
            return self._features(op == N.nvme_admin_set_features, c10 & 0xFF, c11)
        if op == N.nvme_admin_get_log_page:
            return self._log_page(c10 & 0xFF, (((c10 >> 16) & 0xFFF) | ((c11 & 0xFFFF) << 12))
                                  + 1, prp1, prp2)
        if op == N.nvme_admin_async_event:
            if self.aers > AERL:
                return N.NVME_SC_ASYNC_LIMIT, 0
            self.aers += 1
            return None  # completes when an event happens; none are raised
        if op == N.nvme_admin_abort_cmd:
            return N.NVME_SC_SUCCESS, 1  # bit 0: not aborted
        return N.NVME_SC_INVALID_OPCODE, 0

    def _identify(self, cns: int, nsid: int, prp1: int, prp2: int) -> tuple[int, int]:
        if cns == N.NVME_ID_CNS_CTRL:
            page = pages.identify_controller(self.serial, NVME_VENDOR, MDTS, AERL)
        elif cns == N.NVME_ID_CNS_NS:
            if nsid not in (1, 0xFFFFFFFF):
                return N.NVME_SC_INVALID_NS, 0
            page = pages.identify_namespace(self.nsze, LBA_SHIFT)
        elif cns == N.NVME_ID_CNS_NS_ACTIVE_LIST:
            page = pages.active_namespaces(nsid)
        else:
            return N.NVME_SC_INVALID_FIELD, 0
        self._to_guest(prp1, prp2, page)
        return N.NVME_SC_SUCCESS, 0

    def _queue_ok(self, qid: int, size: int, flags: int, base: int, entry: int,
                  table: dict[int, SubmissionQueue] | dict[int, CompletionQueue]) -> int:
        if not 1 <= qid <= MAX_IO_QUEUES or qid in table:
            return N.NVME_SC_QID_INVALID
        if not 2 <= size <= MQES + 1:
            return N.NVME_SC_QUEUE_SIZE
        if not flags & N.NVME_QUEUE_PHYS_CONTIG or base % 4096:
            return N.NVME_SC_INVALID_FIELD
        if not self.mem.contains(base, size * entry):
            return N.NVME_SC_INVALID_FIELD
        return N.NVME_SC_SUCCESS

    def _create_cq(self, qid: int, size: int, flags: int, vector: int, base: int
                   ) -> tuple[int, int]:
        st = self._queue_ok(qid, size, flags, base, 16, self.cqs)
        if st:
            return st, 0
        if vector >= self.msix.vectors:
            return N.NVME_SC_INVALID_VECTOR, 0
        self.cqs[qid] = CompletionQueue(qid, base, size, vector,
                                        bool(flags & N.NVME_CQ_IRQ_ENABLED))
        return N.NVME_SC_SUCCESS, 0

    def _create_sq(self, qid: int, size: int, flags: int, cqid: int, base: int
                   ) -> tuple[int, int]:
        st = self._queue_ok(qid, size, flags, base, CMD_SIZE, self.sqs)
        if st:
            return st, 0
        cq = self.cqs.get(cqid)
        if cqid == 0 or cq is None:
            return N.NVME_SC_CQ_INVALID, 0
        sq = self.sqs[qid] = SubmissionQueue(qid, base, size, cq)
        cq.sqs.append(sq)
        return N.NVME_SC_SUCCESS, 0

    def _features(self, set_: bool, fid: int, value: int) -> tuple[int, int]:
        if fid == N.NVME_FEAT_NUM_QUEUES:
            if set_ and (value & 0xFFFF == 0xFFFF or value >> 16 == 0xFFFF):
                return N.NVME_SC_INVALID_FIELD, 0
            n = MAX_IO_QUEUES - 1  # 0-based, whatever was asked (the spec allows fewer)
            return N.NVME_SC_SUCCESS, n | n << 16
        if fid not in (N.NVME_FEAT_ARBITRATION, N.NVME_FEAT_POWER_MGMT,
                       N.NVME_FEAT_TEMP_THRESH, N.NVME_FEAT_ERR_RECOVERY,
                       N.NVME_FEAT_VOLATILE_WC, N.NVME_FEAT_IRQ_COALESCE,
                       N.NVME_FEAT_IRQ_CONFIG, N.NVME_FEAT_WRITE_ATOMIC,
                       N.NVME_FEAT_ASYNC_EVENT):
            return N.NVME_SC_INVALID_FIELD, 0
        if set_:
            self.features[fid] = value
            return N.NVME_SC_SUCCESS, 0
        default = 1 if fid == N.NVME_FEAT_VOLATILE_WC else 0
        return N.NVME_SC_SUCCESS, self.features.get(fid, default)

    def _log_page(self, lid: int, dwords: int, prp1: int, prp2: int) -> tuple[int, int]:
        page = pages.log_page(lid)
        if page is None:
            return N.NVME_SC_INVALID_LOG_PAGE, 0
        self._to_guest(prp1, prp2, page[:min(len(page), 4 * dwords)])
        return N.NVME_SC_SUCCESS, 0

    # --- I/O commands -----------------------------------------------------------------
    def _io(self, op: int, nsid: int, prp1: int, prp2: int, cdw: list[int]) -> tuple[int, int]:
        if op == N.nvme_cmd_flush:
            if nsid not in (1, 0xFFFFFFFF):
                return N.NVME_SC_INVALID_NS, 0
            return self._host(lambda: None if self.backend.read_only else self.backend.flush())
        if nsid != 1:
            return N.NVME_SC_INVALID_NS, 0
        slba, nlb = cdw[0] | cdw[1] << 32, (cdw[2] & 0xFFFF) + 1
        if op in (N.nvme_cmd_read, N.nvme_cmd_write, N.nvme_cmd_write_zeroes):
            if slba + nlb > self.nsze:
                return N.NVME_SC_LBA_RANGE, 0
            if op != N.nvme_cmd_read and self.backend.read_only:
                return N.NVME_SC_NS_WRITE_PROTECTED, 0
            off, n = slba << LBA_SHIFT, nlb << LBA_SHIFT
            if op == N.nvme_cmd_write_zeroes:
                self._io_bytes = n  # host I/O as a write's, though no data moves
                return self._host(lambda: self.backend.write_zeroes(off, n))
            if n > 4096 << MDTS:
                return N.NVME_SC_INVALID_FIELD, 0
            self._io_bytes = n
            views = prp_views(self.mem, prp1, prp2, n)
            return self._host(lambda: self._transfer(op == N.nvme_cmd_read, off, views, n))
        if op == N.nvme_cmd_dsm:
            return self._dsm(cdw[0] & 0xFF, cdw[1], prp1, prp2)
        return N.NVME_SC_INVALID_OPCODE, 0

    def _transfer(self, read: bool, off: int, views: list[memoryview], n: int) -> None:
        be = self.backend
        got = be.readv(off, views) if read else be.writev(off, views)
        if got != n:
            raise OSError(0, f"short transfer ({got} of {n} bytes)")
        self.bytes += n

    def _dsm(self, nr: int, attrs: int, prp1: int, prp2: int) -> tuple[int, int]:
        raw = b"".join(bytes(v) for v in prp_views(self.mem, prp1, prp2, 16 * (nr + 1)))
        segs = [struct.unpack_from("<IIQ", raw, 16 * i) for i in range(nr + 1)]
        if any(slba + nlb > self.nsze for _, nlb, slba in segs):
            return N.NVME_SC_LBA_RANGE, 0
        if not attrs & N.NVME_DSMGMT_AD or self.backend.read_only:
            return N.NVME_SC_SUCCESS, 0  # only deallocation does anything (advisory)

        def deallocate() -> None:
            for _, nlb, slba in segs:
                self.backend.discard(slba << LBA_SHIFT, nlb << LBA_SHIFT)

        return self._host(deallocate)

    def _host(self, fn: Callable[[], object]) -> tuple[int, int]:
        """Run host I/O; a host error is the guest's Internal Error (logged once)."""
        try:
            fn()
        except OSError as e:
            self.errors.warn("nvme-host-io", f"nvme: host I/O error: {e.strerror or e}")
            return N.NVME_SC_INTERNAL, 0
        return N.NVME_SC_SUCCESS, 0


# --- registry entry ---------------------------------------------------------------------
@dataclass(kw_only=True)
class NvmeConfig(DiskConfig):
    """A raw image as namespace 1 (write-protected when read-only)."""


def create(cfg: NvmeConfig, ctx: HostContext) -> NvmeController:
    return NvmeController(cfg.open(ctx), ctx.mem, ctx.msi,
                          serial=cfg.serial or f"pyvmm-nvme{ctx.index}")


SPEC = DeviceSpec("nvme", NvmeConfig, Kind.PCI, create,
                  "NVMe 1.2 controller (full emulation)", option="disk", select=("if", "nvme"),
                  positional="path", doc="nvme")
