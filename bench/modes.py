"""One device class, several emulation modes: a disk as a legacy IDE/ATA disk (full
emulation of the oldest kind: by PIO every 16-bit word is a trapped port exit; by
bus-master DMA a dozen register exits a request), as an emulated NVMe controller (full
emulation: the guest's driver rings trapped doorbells) and as virtio-blk (paravirtual:
notifications by ioeventfd, no userspace exit), the same 4k random-read QD1 workload,
under pyvmm and under QEMU (-accel kvm) in one run. Prints a table and, with
matplotlib, writes a plot.

Per request: latency (guest TSC, p50/p99), userspace exits and VMM CPU. Exits and CPU
are differences between a run of N requests and one of a few, so boot and setup fall
out. QEMU's rows have latency only: its exits are not visible from outside, and its
CPU difference drowns in its boot (SeaBIOS runs in KVM's instruction emulator here
for ~4 s, varying by more than the whole workload costs).
Direct assignment has no disk device yet; its cost per access is shown for the PCI
test device's shared-memory BAR (0 exits, tests/kvm/test_pci.py).

    python bench/modes.py [--n 3000] [--n-pio 100] [--rounds 3] [--plot docs/img/modes.png]

IDE PIO costs ~2000 exits a request, so it runs --n-pio requests (FEW are subtracted
from both). QEMU's IDE rows use its i440FX machine (-M pc: PIIX3 IDE built in).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from blk import timed  # noqa: E402  (run, and the child's CPU seconds)
from exit_roundtrip import tsc_hz  # noqa: E402

OUT = ROOT / "guests" / "out"
FEW = 20
NVME = re.compile(r"nvme-bench reads=(\d+) p50_cycles=(\d+) p99_cycles=(\d+)")
IDE = re.compile(r"ide-bench mode=\w+ reads=(\d+) p50_cycles=(\d+) p99_cycles=(\d+)")
MODES = ("ide-pio", "ide-dma", "nvme", "virtio-blk")
DISK = {"ide-pio": ",if=ide", "ide-dma": ",if=ide", "nvme": ",if=nvme", "virtio-blk": ""}
BLK = re.compile(r"iops=(\d+) mbps=(\d+) p50_us=(\d+) p99_us=(\d+)")


def guest(mode: str, n: int, khz: int) -> tuple[str, str]:
    if mode == "nvme":
        return "nvme.elf", f"bench={n}"
    if mode.startswith("ide"):
        return "ide.elf", f"bench={n} bench_mode={int(mode == 'ide-dma')}"
    return "blkload.elf", f"mode=0 qd=1 bs=4096 n={n} tsc_khz={khz}"


def latency(mode: str, out: str, hz: float) -> tuple[float, float]:
    if mode == "nvme" or mode.startswith("ide"):
        m = (NVME if mode == "nvme" else IDE).search(out)
        assert m, out[-400:]
        return int(m.group(2)) / hz * 1e6, int(m.group(3)) / hz * 1e6
    m = BLK.search(out)
    assert m, out[-400:]
    return float(m.group(3)), float(m.group(4))


def pyvmm(mode: str, img: Path, n: int, khz: int) -> tuple[str, float, int]:
    exe, cmdline = guest(mode, n, khz)
    disk = f"path={img}" + DISK[mode]
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "x.json"
        out, cpu = timed([sys.executable, "-m", "pyvmm", "run", "-q", "--timeout", "300",
                          "--no-pci-testdev", "--kernel", str(OUT / exe), "--disk", disk,
                          "--cmdline", cmdline, "--exits-json", str(js)])
        exits = sum(json.loads(js.read_text())["exits"].values())
    return out, cpu, exits


def qemu(mode: str, img: Path, n: int, khz: int) -> tuple[str, float, int]:
    exe, cmdline = guest(mode, n, khz)
    dev = ("nvme,drive=d0,serial=q" if mode == "nvme"
           else "virtio-blk-pci,drive=d0,disable-legacy=on")
    disk = ["-drive", f"file={img},format=raw,if=none,id=d0,cache=writeback", "-device", dev]
    if mode.startswith("ide"):
        disk = ["-drive", f"file={img},format=raw,if=ide,cache=writeback"]
    out, cpu = timed([shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-accel",
                      "kvm", "-cpu", "host,arch-capabilities=off",
                      "-M", "pc" if mode.startswith("ide") else "q35", "-m", "64",
                      "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none",
                      "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                      "-kernel", str(OUT / exe), "-append", cmdline, *disk])
    return out, cpu, 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="requests per run (at most 4096)")
    ap.add_argument("--n-pio", type=int, default=100, help="requests per IDE PIO run")
    ap.add_argument("--modes", default=",".join(MODES), help="which of " + ", ".join(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plot", type=Path, help="write a PNG bar chart here (needs matplotlib)")
    a = ap.parse_args()
    hz = tsc_hz()
    khz = int(hz / 1000)
    vmms = [("pyvmm", pyvmm)] + ([("QEMU", qemu)] if shutil.which("qemu-system-x86_64") else [])
    rows: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    with tempfile.TemporaryDirectory() as d:
        img = Path(d) / "m.img"
        with img.open("wb") as f:
            for _ in range(64):
                f.write(os.urandom(1 << 20))  # in the page cache: the I/O path, not the disk
        for r in range(a.rounds):
            order = vmms if r % 2 == 0 else vmms[::-1]
            for name, run in order:
                for mode in a.modes.split(","):
                    n = a.n_pio if mode == "ide-pio" else a.n
                    out, cpu, exits = run(mode, img, n, khz)
                    _, cpu0, exits0 = run(mode, img, FEW, khz)
                    p50, p99 = latency(mode, out, hz)
                    per = n - FEW
                    rows.setdefault((name, mode), []).append(
                        (p50, p99, (exits - exits0) / per, (cpu - cpu0) / per * 1e6))
    med = {k: [statistics.median(x[i] for x in v) for i in range(4)] for k, v in rows.items()}

    def spread(k: tuple[str, str], i: int) -> str:
        vals = [x[i] for x in rows[k]]
        return f"{min(vals):.1f} / {statistics.median(vals):.1f} / {max(vals):.1f}"

    print(f"4k random read, QD1, {a.n} requests ({a.n_pio} by IDE PIO), {a.rounds} "
          "interleaved rounds, min / median / max over the rounds (page-cache hits)")
    print("| VMM | mode | device | p50 µs | p99 µs (median) | exits/req | VMM CPU µs/req |")
    print("|---|---|---|---|---|---|---|")
    for (name, mode), (_, p99, ex, _) in sorted(med.items()):
        kind = "paravirtual" if mode == "virtio-blk" else "full emulation"
        k = (name, mode)
        exs, cpus = (f"{ex:.2f}", spread(k, 3)) if name == "pyvmm" else ("n/a", "n/a")
        print(f"| {name} | {kind} | {mode} | {spread(k, 0)} | {p99:.1f} | {exs} | {cpus} |")
    for mode in MODES:
        if ("QEMU", mode) in med and ("pyvmm", mode) in med:
            print(f"pyvmm/QEMU latency, {mode}: "
                  f"{med[('pyvmm', mode)][0] / med[('QEMU', mode)][0]:.2f}x")
    if a.plot:
        plot(med, a.plot)
    return 0


def plot(med: dict[tuple[str, str], list[float]], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no matplotlib: no plot written")
        return
    keys = sorted(med)
    labels = [f"{vmm}\n{mode}" for vmm, mode in keys]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    ax1.bar(labels, [med[k][0] for k in keys], color=["#69c" if k[1] == "virtio-blk" else "#c66"
                                                      for k in keys])
    ax1.set_yscale("log")  # IDE PIO is three orders of magnitude above the rest
    ax1.set_ylabel("p50 latency, µs (4k read, QD1)")
    mine = [k for k in keys if k[0] == "pyvmm"]
    ax2.bar([f"{v}\n{m}" for v, m in mine], [med[k][2] for k in mine], color="#999")
    ax2.set_ylabel("pyvmm userspace exits per request")
    ax2.set_yscale("symlog")
    for ax in (ax1, ax2):
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("Full emulation (IDE PIO, IDE DMA, NVMe) vs paravirtual (virtio-blk)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    print(f"plot: {path}")


if __name__ == "__main__":
    sys.exit(main())
