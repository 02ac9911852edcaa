"""The same NVMe guest and image, the controller in two places: emulated inside pyvmm
vs served by ``pyvmm backend vfio-user --device nvme`` in another process and attached
through pyvmm's vfio-user client (direct-assignment mode: guest RAM mapped by the
server, MSI-X by irqfd, the doorbells in BAR0 trapped and forwarded as REGION_WRITE).

Workload: guests/src/nvme.c ``bench=N``, 4k random reads at QD1 timed by the guest's
TSC (p50/p99), on a warm page cache. Per request: userspace exits and VMM CPU
(differences between a run of N and one of a few, so boot and setup fall out), and
for the vfio-user row the server process's CPU (same difference). Ratios are medians
against the in-VMM controller. Rounds interleave.

    python bench/vfio_user_nvme.py [--n 3000] [--rounds 3]

The NVMe guest has one benchmark mode (QD1 4k reads), so QD32 and 1M sequential are
not measured here; blkload (bench/vhost_user_frontend.py) is virtio-blk only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from blk import timed  # noqa: E402  (run, and the child's CPU seconds)
from exit_roundtrip import tsc_hz  # noqa: E402
from modes import NVME  # noqa: E402  (the guest's nvme-bench line)
from vhost_user_blk import cpu_seconds  # noqa: E402

GUEST = ROOT / "guests" / "out" / "nvme.elf"
FEW = 20
CONFIGS = ("in-VMM nvme", "vfio-user client nvme", "vfio-user client nvme, posted_writes")


def run_one(config: str, d: Path, img: Path, n: int) -> tuple[str, float, int, float]:
    """(guest output, VMM CPU s, exits, server CPU s) of one run of ``n`` reads."""
    server = None
    sock = d / "vfu.sock"
    if config == "in-VMM nvme":
        disk = ["--disk", f"path={img},if=nvme"]
    else:
        server = subprocess.Popen([sys.executable, "-m", "pyvmm", "backend", "vfio-user",
                                   "--device", "nvme", "--disk", str(img), "--socket",
                                   str(sock)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        disk = ["--device", f"vfio-user,socket={sock}"
                + (",posted_writes=on" if "posted" in config else "")]
    try:
        s0 = cpu_seconds(server.pid) if server else 0.0
        js = d / "x.json"
        out, cpu = timed([sys.executable, "-m", "pyvmm", "run", "-q", "--timeout", "300",
                          "--no-pci-testdev", "--kernel", str(GUEST), *disk,
                          "--cmdline", f"bench={n} spin=20000000000", "--exits-json", str(js)])
        s = cpu_seconds(server.pid) - s0 if server else 0.0
        exits = sum(json.loads(js.read_text())["exits"].values())
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
            sock.unlink(missing_ok=True)
    return out, cpu, exits, s


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="reads per run (at most 4096)")
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    hz = tsc_hz()
    rows: dict[str, list[tuple[float, float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pyvmm-vfn-") as td:
        d = Path(td)
        img = d / "nvme.img"
        with img.open("wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
        for r in range(a.rounds):
            for c in (CONFIGS if r % 2 == 0 else CONFIGS[::-1]):
                out, cpu, exits, srv = run_one(c, d, img, a.n)
                _, cpu0, exits0, srv0 = run_one(c, d, img, FEW)
                m = NVME.search(out)
                assert m, out[-400:]
                per = a.n - FEW
                rows.setdefault(c, []).append((
                    int(m.group(2)) / hz * 1e6, int(m.group(3)) / hz * 1e6,
                    (exits - exits0) / per, (cpu - cpu0) / per * 1e6, (srv - srv0) / per * 1e6))
    med = {c: [statistics.median(x[i] for x in v) for i in range(5)] for c, v in rows.items()}

    def spread(c: str, i: int) -> str:
        vals = [x[i] for x in rows[c]]
        return f"{min(vals):.1f} / {statistics.median(vals):.1f} / {max(vals):.1f}"

    print(f"NVMe 4k random reads, QD1, {a.n} requests, {a.rounds} interleaved rounds, "
          "min / median / max (page-cache hits)")
    print("| device | p50 µs | p99 µs (median) | exits/req | VMM CPU µs/req | "
          "server CPU µs/req | p50 x | VMM CPU x |")
    print("|---|---|---|---|---|---|---|---|")
    base = med[CONFIGS[0]]
    for c in CONFIGS:
        p50, p99, ex, cpu, _ = med[c]
        print(f"| {c} | {spread(c, 0)} | {p99:.1f} | {ex:.2f} | {spread(c, 3)} | "
              f"{spread(c, 4)} | {p50 / base[0]:.2f}x | {cpu / base[3]:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
