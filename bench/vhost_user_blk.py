"""vhost-user-blk: pyvmm's backend vs qemu-storage-daemon serving the same Linux guest.

Linux (the e2e kit, under QEMU with software emulation) runs busybox dd with O_DIRECT
against /dev/vda, backed over vhost-user by either pyvmm's backend (the VirtioBlk class
the in-VMM device uses) or qemu-storage-daemon, on the same image file; runs are
interleaved. dd reports its own throughput. The guest's CPU (TCG) bounds small blocks,
so 4k numbers compare the backends only loosely; 1M numbers are backend-bound.
Timing is the guest's /proc/uptime (10 ms resolution) around each dd. The order
alternates between rounds and every run starts after a sync, so no run inherits the
other's writeback.

    python bench/vhost_user_blk.py [--rounds 3] [--only R4K,W4K]

With ``--only`` a single test per run, the backend's CPU time (user + system, from
/proc) per request is printed too.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.framework.qemu import run_linux  # noqa: E402

# busybox dd prints no timing here: time each transfer with the guest's /proc/uptime.
PROLOGUE = """
t() { a=$(cut -d' ' -f1 /proc/uptime); shift; "$@" 2>/dev/null; b=$(cut -d' ' -f1 /proc/uptime); }
run() { n=$1; shift; t x "$@"; echo "$n $a $b"; }
"""
TESTS = {
    "W1M": "run W1M dd if=/dev/zero of=/dev/vda bs=1M count=256 oflag=direct",
    "R1M": "run R1M dd if=/dev/vda of=/dev/null bs=1M count=256 iflag=direct",
    "W4K": "run W4K dd if=/dev/zero of=/dev/vda bs=4k count=8192 oflag=direct",
    "R4K": "run R4K dd if=/dev/vda of=/dev/null bs=4k count=8192 iflag=direct",
}
RATE = re.compile(r"^(W1M|R1M|W4K|R4K) ([0-9.]+) ([0-9.]+)", re.M)
SIZES = {"W1M": 256 << 20, "R1M": 256 << 20, "W4K": 8192 * 4096, "R4K": 8192 * 4096}
COUNTS = {"W1M": 256, "R1M": 256, "W4K": 8192, "R4K": 8192}


def cpu_seconds(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def start(kind: str, sock: Path, img: Path) -> subprocess.Popen[bytes]:
    if kind == "pyvmm":
        cmd = [sys.executable, "-m", "pyvmm", "backend", "vhost-user-blk", "--socket",
               str(sock), "--disk", str(img)]
    else:
        cmd = ["qemu-storage-daemon", "--blockdev",
               f"driver=file,node-name=f0,filename={img},cache.direct=off,aio=threads",
               "--export", f"type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,"
               f"addr.path={sock},writable=on,num-queues=1"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while not sock.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    return p


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", help="comma-separated tests, each in a run of its own")
    a = ap.parse_args()
    tests = a.only.split(",") if a.only else list(TESTS)
    if any(t not in TESTS for t in tests):
        ap.error(f"--only takes {','.join(TESTS)}")
    # One guest runs all four tests, or (--only) one guest per test so CPU is per test.
    scripts = [tests] if not a.only else [[t] for t in tests]
    kinds = ["pyvmm"] + (["qsd"] if shutil.which("qemu-storage-daemon") else [])
    res: dict[str, dict[str, list[float]]] = {k: {t: [] for t in SIZES} for k in kinds}
    cpu: dict[str, dict[str, list[float]]] = {k: {t: [] for t in SIZES} for k in kinds}
    with tempfile.TemporaryDirectory() as d:
        img = Path(d) / "vu.img"
        with img.open("wb") as f:
            f.truncate(512 << 20)
        for r in range(a.rounds):
            for script in scripts:
                # Alternate who goes first, and let the previous run's writeback finish,
                # so neither backend inherits the other's dirty pages or the disk's queue.
                for kind in (kinds if r % 2 == 0 else kinds[::-1]):
                    os.sync()
                    sock = Path(d) / f"{kind}{r}.sock"
                    proc = start(kind, sock, img)
                    started = cpu_seconds(proc.pid)  # start-up (imports) is not per request
                    try:
                        out = run_linux(Path(tempfile.mkdtemp(dir=d)),
                                        PROLOGUE + "\n".join(TESTS[t] for t in script), [
                            "-chardev", f"socket,id=v,path={sock}",
                            "-device", "vhost-user-blk-pci,chardev=v,num-queues=1"],
                            timeout=600)
                        used = cpu_seconds(proc.pid) - started
                    finally:
                        proc.terminate()
                        proc.wait(timeout=30)
                    for test, t0, t1 in RATE.findall(out.output):
                        secs = max(float(t1) - float(t0), 0.01)
                        res[kind][test].append(SIZES[test] / secs / 1e6)
                        if len(script) == 1:
                            cpu[kind][test].append(used / COUNTS[test] * 1e6)
    print(f"vhost-user-blk behind Linux under QEMU TCG, {a.rounds} interleaved rounds, "
          "median MB/s (dd, O_DIRECT)" + (", backend CPU µs per request" if a.only else ""))
    print(f"{'test':6} " + " ".join(f"{k:>8}" for k in kinds) + "   pyvmm/qsd"
          + ("".join(f" {'cpu ' + k:>10}" for k in kinds) if a.only else ""))
    for t in tests:
        meds = [statistics.median(res[k][t]) if res[k][t] else float("nan") for k in kinds]
        ratio = meds[0] / meds[1] if len(meds) > 1 else float("nan")
        line = f"{t:6} " + " ".join(f"{m:8.1f}" for m in meds) + f"   {ratio:8.2f}x"
        if a.only:
            line += "".join(f" {statistics.median(cpu[k][t]) if cpu[k][t] else float('nan'):10.1f}"
                            for k in kinds)
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
