"""The same disk, the same guest, three places for the device: virtio-blk inside pyvmm
vs pyvmm's vhost-user front end with the device in pyvmm's backend process vs in
qemu-storage-daemon (and, for scale, the front end with its fast path off, so the VMM
forwards every kick).

The guest is guests/src/blkload.c (4k random reads, completions polled with interrupts
suppressed, timed by its TSC) over virtio-pci, on a warm page cache. Reported per
configuration, min/median/max over interleaved rounds: IOPS; the VMM's CPU per request
off the vCPU thread (event loop and I/O pool, from the run's --exits-json: the vCPU
thread's time is the guest polling, and its VMM share is the exits, shown per
request), the backend process's CPU per request (start-up excluded) and the sum; the
VMM's kick forwards per request. Ratios are medians against in-VMM virtio-blk.

    python bench/vhost_user_frontend.py [--rounds 3] [--requests 20000] [--qd 1,32]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guests" / "out" / "blkload.elf"
sys.path.insert(0, str(ROOT / "bench"))
from blk import LINE, set_cache  # noqa: E402
from exit_roundtrip import tsc_hz  # noqa: E402
from vhost_user_blk import cpu_seconds, start  # noqa: E402  (the two backends as started there)

CONFIGS = {  # name -> (backend or None, --disk text with {img}/{sock})
    "in-VMM virtio-blk": (None, "path={img}"),
    "vhost-user pyvmm": ("pyvmm", "if=vhost-user,socket={sock}"),
    "vhost-user qsd": ("qsd", "if=vhost-user,socket={sock}"),
    "vhost-user pyvmm, fast_path=off": ("pyvmm", "if=vhost-user,socket={sock},fast_path=off"),
}


def run_one(config: str, d: Path, img: Path, qd: int, n: int, khz: int) -> dict[str, float]:
    kind, disk = CONFIGS[config]
    sock = d / "vu.sock"
    backend = start(kind, sock, img) if kind else None
    try:
        be0 = cpu_seconds(backend.pid) if backend else 0.0  # start-up is not per request
        js = d / "x.json"
        p = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-q", "--timeout", "300",
                            "--no-pci-testdev", "--kernel", str(GUEST), "--disk",
                            disk.format(img=img, sock=sock), "--cmdline",
                            f"mode=0 qd={qd} bs=4096 n={n} tsc_khz={khz}", "--exits-json",
                            str(js)], capture_output=True, text=True, timeout=600)
        be = cpu_seconds(backend.pid) - be0 if backend else 0.0
    finally:
        if backend:
            backend.terminate()
            backend.wait(timeout=30)
            sock.unlink(missing_ok=True)
    m = LINE.search(p.stdout)
    if p.returncode != 0 or not m:
        raise SystemExit(f"{config}: rc={p.returncode} {p.stdout[-300:]} {p.stderr[-300:]}")
    rep = json.loads(js.read_text())
    v = rep["virtio"][0]
    return {"iops": float(m.group(1)), "vmm_us": rep["result"]["off_vcpu_cpu_s"] / n * 1e6,
            "backend_us": be / n * 1e6, "exits": sum(rep["exits"].values()) / n,
            "forwards": v.get("kick_forwards", 0) / n}


def spread(xs: list[float], fmt: str) -> str:
    return "/".join(format(x, fmt) for x in (min(xs), statistics.median(xs), max(xs)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=20000)
    ap.add_argument("--qd", default="1,32")
    a = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    khz = int(tsc_hz() / 1000)
    configs = [c for c in CONFIGS if CONFIGS[c][0] != "qsd" or shutil.which(
        "qemu-storage-daemon")]
    qds = [int(x) for x in a.qd.split(",")]
    res: dict[tuple[int, str], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="pyvmm-vub-") as td:
        d = Path(td)
        img = d / "bench.img"
        with img.open("wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))
        for r in range(a.rounds):
            for qd in qds:
                order = configs if r % 2 == 0 else configs[::-1]
                for c in order:
                    set_cache(img, "warm")
                    res.setdefault((qd, c), []).append(run_one(c, d, img, qd, a.requests, khz))
    print(f"blkload 4k random reads over virtio-pci, warm page cache, {a.requests} requests, "
          f"{a.rounds} interleaved rounds; min/median/max")
    print(f"{'QD':>3} {'device':32} {'IOPS':>20} {'VMM CPU us/req':>17} "
          f"{'backend us/req':>17} {'sum':>6} {'exits/req':>9} {'fwd/req':>7} {'IOPS x':>7} "
          f"{'VMM CPU x':>9} {'sum x':>6}")
    for qd in qds:
        base = res[(qd, configs[0])]
        b_iops = statistics.median(x["iops"] for x in base)
        b_cpu = statistics.median(x["vmm_us"] for x in base)
        b_sum = statistics.median(x["vmm_us"] + x["backend_us"] for x in base)
        for c in configs:
            rows = res[(qd, c)]
            iops = [x["iops"] for x in rows]
            vmm = [x["vmm_us"] for x in rows]
            be = [x["backend_us"] for x in rows]
            both = statistics.median(x["vmm_us"] + x["backend_us"] for x in rows)
            print(f"{qd:3} {c:32} {spread(iops, '.0f'):>20} {spread(vmm, '.1f'):>17} "
                  f"{spread(be, '.1f'):>17} {both:6.1f} "
                  f"{statistics.median(x['exits'] for x in rows):9.3f} "
                  f"{statistics.median(x['forwards'] for x in rows):7.2f} "
                  f"{statistics.median(iops) / b_iops:6.2f}x "
                  f"{statistics.median(vmm) / b_cpu if b_cpu else float('nan'):8.2f}x "
                  f"{both / b_sum if b_sum else float('nan'):5.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
