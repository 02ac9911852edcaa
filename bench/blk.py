"""virtio-blk: pyvmm vs QEMU on the same guest binary and image, and host fio, one run.

The guest (guests/src/blkload.c) keeps qd requests in flight against the first
virtio-blk PCI device and polls for completions with interrupts suppressed; it times
everything with its TSC. pyvmm and QEMU (q35, -accel kvm -cpu host,arch-capabilities=off,
virtio-blk-pci modern-only, cache=writeback like pyvmm's buffered I/O) get the same
image; runs are interleaved. Host fio reads the same file with the same block sizes.
Each workload runs twice per round, with the image's page cache dropped first
(posix_fadvise DONTNEED: "cold", reads reach the disk) and with the image read into it
first ("warm"), so no run inherits the cache state its predecessor left.
Reported: IOPS, MB/s, p50/p99 latency, pyvmm's userspace exits per request (all exits of
the run / requests: an upper bound that includes boot and printing), VMM CPU per request
(all threads, which includes the vCPU polling; for pyvmm also its event-loop thread alone).

    python bench/blk.py [--rounds 3] [--cache cold,warm] [--only QD32] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guests" / "out" / "blkload.elf"
sys.path.insert(0, str(ROOT / "bench"))
from exit_roundtrip import tsc_hz  # noqa: E402

WORKLOADS = [  # (label, cmdline, fio args)
    ("4k randread QD1", "mode=0 qd=1 bs=4096 n=4000", ["--rw=randread", "--bs=4k",
                                                       "--iodepth=1"]),
    ("4k randread QD32", "mode=0 qd=32 bs=4096 n=8000", ["--rw=randread", "--bs=4k",
                                                         "--iodepth=32"]),
    ("1M seq read QD4", "mode=1 qd=4 bs=1048576 n=400", ["--rw=read", "--bs=1M",
                                                         "--iodepth=4"]),
    ("1M seq write QD4", "mode=2 qd=4 bs=1048576 n=400", ["--rw=write", "--bs=1M",
                                                          "--iodepth=4"]),
]
LINE = re.compile(r"iops=(\d+) mbps=(\d+) p50_us=(\d+) p99_us=(\d+)")


def timed(cmd: list[str]) -> tuple[str, float]:
    """Run; return stdout and the child's CPU seconds (user + system, all threads)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed rc={p.returncode}: {p.stdout[-400:]}{p.stderr[-400:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return p.stdout, cpu


def run_pyvmm(img: Path, cmdline: str, khz: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "x.json"
        out, cpu = timed([sys.executable, "-m", "pyvmm", "run", "-q", "--timeout", "300",
                          "--no-pci-testdev", "--kernel", str(GUEST), "--disk", f"path={img}",
                          "--cmdline", f"{cmdline} tsc_khz={khz}", "--exits-json", str(js)])
        rep = json.loads(js.read_text())
    m = LINE.search(out)
    assert m, out
    n = int(re.search(r"n=(\d+)", cmdline).group(1))  # type: ignore[union-attr]
    iops, mbps, p50, p99 = (float(x) for x in m.groups())
    return {"iops": iops, "mbps": mbps, "p50_us": p50, "p99_us": p99,
            "exits_per_req": sum(rep["exits"].values()) / n, "cpu_us_per_req": cpu / n * 1e6,
            "loop_cpu_us_per_req": rep["result"]["event_loop_cpu_s"] / n * 1e6}


def run_qemu(qemu: str, img: Path, cmdline: str, khz: int) -> dict[str, float]:
    out, cpu = timed([qemu, "-accel", "kvm", "-cpu", "host,arch-capabilities=off", "-M", "q35",
                      "-m", "64", "-nodefaults", "-nographic", "-serial", "stdio", "-monitor",
                      "none", "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                      "-kernel", str(GUEST), "-append", f"{cmdline} tsc_khz={khz}",
                      "-drive", f"file={img},format=raw,if=none,id=d0,cache=writeback",
                      "-device", "virtio-blk-pci,drive=d0,disable-legacy=on"])
    m = LINE.search(out)
    assert m, out[-500:]
    n = int(re.search(r"n=(\d+)", cmdline).group(1))  # type: ignore[union-attr]
    iops, mbps, p50, p99 = (float(x) for x in m.groups())
    return {"iops": iops, "mbps": mbps, "p50_us": p50, "p99_us": p99,
            "cpu_us_per_req": cpu / n * 1e6}


def set_cache(img: Path, state: str) -> None:
    """cold: drop the image from the page cache; warm: read all of it in."""
    fd = os.open(img, os.O_RDONLY)
    try:
        if state == "cold":
            os.fsync(fd)  # written pages must be clean to be dropped
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        else:
            while os.read(fd, 1 << 20):
                pass
    finally:
        os.close(fd)


def run_fio(img: Path, args: list[str], state: str) -> dict[str, float]:
    out = subprocess.run(["fio", "--name=b", f"--filename={img}", "--ioengine=libaio",
                          "--direct=0", "--runtime=3", "--time_based", "--output-format=json",
                          f"--invalidate={int(state == 'cold')}", *args],
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out)["jobs"][0]
    side = job["read"] if job["read"]["io_bytes"] else job["write"]
    return {"iops": side["iops"], "mbps": side["bw_bytes"] / 1e6,
            "p50_us": side["clat_ns"]["percentile"]["50.000000"] / 1000,
            "p99_us": side["clat_ns"]["percentile"]["99.000000"] / 1000}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--image-mb", type=int, default=512)
    ap.add_argument("--json")
    ap.add_argument("--cache", default="cold,warm", help="page-cache states to run: cold,warm")
    ap.add_argument("--only", help="run only workloads whose label contains this")
    a = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    khz = int(tsc_hz() / 1000)
    qemu, fio = shutil.which("qemu-system-x86_64"), shutil.which("fio")
    res: dict[str, dict[str, list[dict[str, float]]]] = {}
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        img = Path(d) / "bench.img"
        with img.open("wb") as f:  # a real, fully written file (not sparse)
            chunk = os.urandom(1 << 20)
            for _ in range(a.image_mb):
                f.write(chunk)
        for _ in range(a.rounds):
            for label, cmdline, fio_args in WORKLOADS:
                if a.only and a.only not in label:
                    continue
                for state in a.cache.split(","):
                    r = res.setdefault(f"{label} {state}", {"pyvmm": [], "qemu": [], "fio": []})
                    set_cache(img, state)
                    r["pyvmm"].append(run_pyvmm(img, cmdline, khz))
                    if qemu:
                        set_cache(img, state)
                        r["qemu"].append(run_qemu(qemu, img, cmdline, khz))
                    if fio:
                        set_cache(img, state)
                        r["fio"].append(run_fio(img, fio_args, state))

    def med(rows: list[dict[str, float]], key: str) -> float:
        return statistics.median(x[key] for x in rows) if rows else float("nan")

    print(f"virtio-blk, {a.rounds} interleaved rounds, medians; image {a.image_mb} MiB "
          "(buffered I/O in every case)")
    print(f"{'workload':23} {'who':6} {'IOPS':>8} {'MB/s':>7} {'p50us':>7} {'p99us':>7} "
          f"{'exits/req':>9} {'CPUus/req':>9} {'loopus/req':>10} {'vs QEMU':>8}")
    for label, r in res.items():
        q_iops = med(r["qemu"], "iops")
        for who in ("pyvmm", "qemu", "fio"):
            rows = r[who]
            if not rows:
                continue
            ratio = med(rows, "iops") / q_iops if who == "pyvmm" and r["qemu"] else float("nan")
            print(f"{label:23} {who:6} {med(rows, 'iops'):8.0f} {med(rows, 'mbps'):7.0f} "
                  f"{med(rows, 'p50_us'):7.0f} {med(rows, 'p99_us'):7.0f} "
                  f"{med(rows, 'exits_per_req') if who == 'pyvmm' else float('nan'):9.3f} "
                  f"{med(rows, 'cpu_us_per_req') if who != 'fio' else float('nan'):9.1f} "
                  f"{med(rows, 'loop_cpu_us_per_req') if who == 'pyvmm' else float('nan'):10.1f} "
                  f"{ratio:7.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
