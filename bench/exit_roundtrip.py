"""Exit round trip: pyvmm vs a minimal C VMM loop on the same tiny guests, one run.

The guests (pio-loop: ``outb`` to the UART scratch register through the int3 gate;
mmio-loop: a 32-bit store to the test device at CPL3) time ``iters`` exits with the
guest TSC and print cycles per operation. Both VMMs run the same flat image from
the same PVH entry with the in-kernel irqchip; runs are interleaved
(C, pyvmm, C, pyvmm, ...) so drift on a shared host hits both. The TSC is
calibrated against the host clock to print microseconds.

    python bench/exit_roundtrip.py [--iters N] [--rounds R] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "out"
TSC_RE = re.compile(rb"tsc_per_op=(\d+)")


def build_cloop(out: Path) -> Path:
    exe = out / "cloop"
    subprocess.run(["gcc", "-O2", "-Wall", "-o", str(exe), str(ROOT / "bench" / "c" / "cloop.c")],
                   check=True)
    return exe


def entry32(elf: Path) -> int:
    from pyvmm.loader import load_kernel
    from pyvmm.memory import GuestMemory

    with GuestMemory([(0, 16 << 20)]) as mem:
        return load_kernel(elf, mem).entry


def tsc_hz() -> float:
    """Calibrate the TSC against CLOCK_MONOTONIC with a small C helper."""
    src = (b"#include <stdio.h>\n#include <time.h>\n#include <x86intrin.h>\n"
           b"int main(void){struct timespec a,b;clock_gettime(CLOCK_MONOTONIC,&a);"
           b"unsigned long t0=__rdtsc();struct timespec s={0,200000000};nanosleep(&s,0);"
           b"unsigned long t1=__rdtsc();clock_gettime(CLOCK_MONOTONIC,&b);"
           b"double ns=(b.tv_sec-a.tv_sec)*1e9+(b.tv_nsec-a.tv_nsec);"
           b"printf(\"%f\\n\",(t1-t0)/ns*1e9);return 0;}\n")
    with tempfile.TemporaryDirectory() as d:
        c = Path(d) / "tsc.c"
        c.write_bytes(src)
        subprocess.run(["gcc", "-O2", "-o", f"{d}/tsc", str(c)], check=True)
        return float(subprocess.run([f"{d}/tsc"], capture_output=True, check=True).stdout)


def run_c(cloop: Path, guest: str, iters: int) -> int:
    p = subprocess.run([str(cloop), str(GUESTS / f"{guest}.bin"), hex(entry32(
        GUESTS / f"{guest}.elf")), f"iters={iters}"], capture_output=True, timeout=600)
    m = TSC_RE.search(p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"cloop {guest} failed: rc={p.returncode} {p.stderr!r}")
    return int(m.group(1))


def run_pyvmm(guest: str, iters: int) -> int:
    p = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-q", "--kernel",
                        str(GUESTS / f"{guest}.elf"), "--cmdline", f"iters={iters}"],
                       capture_output=True, timeout=600)
    m = TSC_RE.search(p.stdout)
    if p.returncode != 0 or not m:
        raise RuntimeError(f"pyvmm {guest} failed: rc={p.returncode} {p.stderr!r}")
    return int(m.group(1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=50000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="also write the results here")
    a = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    hz = tsc_hz()
    results: dict[str, dict[str, list[int]]] = {}
    with tempfile.TemporaryDirectory() as d:
        cloop = build_cloop(Path(d))
        for _ in range(a.rounds):
            for guest in ("pio_loop", "mmio_loop"):
                r = results.setdefault(guest, {"c": [], "pyvmm": []})
                r["c"].append(run_c(cloop, guest, a.iters))
                r["pyvmm"].append(run_pyvmm(guest, a.iters))
    print(f"exit round trip, {a.iters} exits per run, {a.rounds} interleaved rounds, "
          f"TSC {hz / 1e9:.3f} GHz; medians")
    print(f"{'path':34} {'C loop us':>10} {'pyvmm us':>10} {'ratio':>7}")
    summary = {}
    for guest, label in (("pio_loop", "PIO (CPL3 int3 -> CPL0 outb)"),
                         ("mmio_loop", "MMIO (CPL3 store, no memslot)")):
        c = statistics.median(results[guest]["c"]) / hz * 1e6
        py = statistics.median(results[guest]["pyvmm"]) / hz * 1e6
        summary[guest] = {"c_us": c, "pyvmm_us": py, "ratio": py / c, "raw_tsc": results[guest]}
        print(f"{label:34} {c:10.2f} {py:10.2f} {py / c:6.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps({"iters": a.iters, "rounds": a.rounds,
                                            "tsc_hz": hz, "time": time.time(),
                                            "results": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
