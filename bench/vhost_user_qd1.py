"""vhost-user-blk back ends without a guest: pyvmm's backend vs qemu-storage-daemon,
both driven by the same front end written here.

The Linux-under-TCG benchmark (bench/vhost_user_blk.py) is what users see, but the
TCG guest takes most of each request's time and scatters ±15%. This one isolates
the back end: a front end in this process maps guest memory (a memfd), hands it over
with SET_MEM_TABLE, sets up one ring, and issues 4k reads one at a time (QD1): write
the chain, kick the eventfd, wait for the call eventfd. Per request it reports the
round trip (p50/p99) and the back end's CPU time (from /proc, start-up excluded).
The front end's own cost is in both round trips alike, so the ratio understates the
back ends' difference; the CPU column does not.

    python bench/vhost_user_qd1.py [--requests 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import select
import shutil
import socket
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from pyvmm.memory import GuestMemory  # noqa: E402
from pyvmm.testing import DriverQueue  # noqa: E402
from pyvmm.uapi import virtio as V  # noqa: E402
from pyvmm.vhost_user.protocol import HEADER, Request, encode  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
from vhost_user_blk import cpu_seconds, start  # noqa: E402  (the same two backends)

UADDR = 0x7F0000000000
RAM = 16 << 20
IMAGE = 256 << 20


class Frontend:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.connect(str(path))

    def send(self, req: int, payload: bytes = b"", fds: list[int] | None = None) -> None:
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, struct.pack(f"{len(fds)}i", *fds))] \
            if fds else []
        self.sock.sendmsg([encode(req, payload)], anc)

    def call(self, req: int, payload: bytes = b"") -> bytes:
        self.send(req, payload)
        _r, _f, size = HEADER.unpack(self.sock.recv(HEADER.size, socket.MSG_WAITALL))
        return self.sock.recv(size, socket.MSG_WAITALL) if size else b""


def run(kind: str, d: Path, img: Path, requests: int) -> tuple[float, float, float]:
    """(p50 µs, p99 µs, back-end CPU µs) per 4k read at QD1."""
    sock = d / f"{kind}.sock"
    proc = start(kind, sock, img)
    try:
        with GuestMemory([(0, RAM)]) as mem:
            fe = Frontend(sock)
            region = next(mem.regions())
            features = struct.unpack("<Q", fe.call(Request.GET_FEATURES))[0]
            fe.send(Request.SET_OWNER)
            want = (1 << V.VIRTIO_F_VERSION_1) | (1 << 30)  # + PROTOCOL_FEATURES
            if features & want != want:
                raise SystemExit(f"{kind}: features {features:#x} lack VERSION_1/PROTOCOL")
            fe.call(Request.GET_PROTOCOL_FEATURES)
            fe.send(Request.SET_PROTOCOL_FEATURES, struct.pack("<Q", 0))
            fe.send(Request.SET_FEATURES, struct.pack("<Q", want))
            fe.send(Request.SET_MEM_TABLE, struct.pack("<II", 1, 0) + struct.pack(
                "<QQQQ", 0, RAM, UADDR, 0), fds=[region.fd])
            dq = DriverQueue(mem, size=128)
            fe.send(Request.SET_VRING_NUM, struct.pack("<II", 0, dq.size))
            fe.send(Request.SET_VRING_BASE, struct.pack("<II", 0, 0))
            fe.send(Request.SET_VRING_ADDR, struct.pack(
                "<IIQQQQ", 0, 0, UADDR + dq.desc, UADDR + dq.used, UADDR + dq.avail, 0))
            kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
            fe.send(Request.SET_VRING_CALL, struct.pack("<Q", 0), fds=[call])
            fe.send(Request.SET_VRING_KICK, struct.pack("<Q", 0), fds=[kick])
            fe.send(Request.SET_VRING_ENABLE, struct.pack("<II", 0, 1))
            fe.call(Request.GET_FEATURES)  # a round trip: everything before is applied
            hdr, buf, st = dq.alloc(16), dq.alloc(4096), dq.alloc(1)
            rnd = random.Random(1)
            poll = select.poll()
            poll.register(call, select.POLLIN)
            lat: list[float] = []
            cpu0 = 0.0
            for i in range(requests + 1000):
                if i == 1000:  # warmed up
                    cpu0 = cpu_seconds(proc.pid)
                sector = rnd.randrange(IMAGE // 4096) * 8
                mem.write(hdr, struct.pack("<IIQ", V.VIRTIO_BLK_T_IN, 0, sector))
                t0 = time.perf_counter()
                dq.add([(hdr, 16, False), (buf, 4096, True), (st, 1, True)])
                os.eventfd_write(kick, 1)
                while not dq.take_used():
                    if not poll.poll(5000):
                        raise SystemExit(f"{kind}: no completion in 5 s")
                    with contextlib.suppress(BlockingIOError):
                        os.eventfd_read(call)
                if i >= 1000:
                    lat.append(time.perf_counter() - t0)
                if mem.read(st, 1) != b"\0":
                    raise SystemExit(f"{kind}: request failed (status {mem.read(st, 1)!r})")
            cpu = cpu_seconds(proc.pid) - cpu0
            os.close(kick)
            os.close(call)
            fe.sock.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    lat.sort()
    return (lat[len(lat) // 2] * 1e6, lat[len(lat) * 99 // 100] * 1e6,
            cpu / requests * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["pyvmm", "qsd"])
    a = ap.parse_args()
    kinds = ["pyvmm"] + (["qsd"] if shutil.which("qemu-storage-daemon") else [])
    if a.only:
        kinds = [a.only]
    res: dict[str, list[tuple[float, float, float]]] = {k: [] for k in kinds}
    with tempfile.TemporaryDirectory() as td:
        d = Path(td)
        img = d / "vu.img"
        with img.open("wb") as f:
            for _ in range(IMAGE >> 20):
                f.write(os.urandom(1 << 20))  # in the page cache: the path, not the disk
        for r in range(a.rounds):
            for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                res[kind].append(run(kind, d, img, a.requests))
    print(f"vhost-user-blk 4k random reads at QD1 from a front end in Python, "
          f"{a.requests} requests x {a.rounds} rounds, medians (page-cache hits)")
    print(f"{'backend':8} {'p50 µs':>8} {'p99 µs':>8} {'CPU µs/req':>11}")
    meds = {}
    for k in kinds:
        meds[k] = [statistics.median(x[i] for x in res[k]) for i in range(3)]
        print(f"{k:8} {meds[k][0]:8.1f} {meds[k][1]:8.1f} {meds[k][2]:11.1f}")
    if len(kinds) == 2:
        p, q = meds["pyvmm"], meds["qsd"]
        print(f"pyvmm/qsd: IOPS (1/p50) {q[0] / p[0]:.2f}x, CPU per request {p[2] / q[2]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
