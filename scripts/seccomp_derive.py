#!/usr/bin/env python3
"""Derive and check the seccomp lists (src/pyvmm/sandbox.py) from what pyvmm's threads
really call: run guests under ``strace -f -ff`` with ``--seccomp log`` (nothing is
refused), put each thread's calls under its kind (the name it gives itself with
PR_SET_NAME: vcpu0, event-loop, blk-io<N>), and print per kind the calls the list lacks
and the listed calls never seen. Exit 1 if a kind made a call its list lacks.

    .venv/bin/python scripts/seccomp_derive.py [--keep DIR]

The workloads are the tiny guests that reach every thread kind's device code: the
chipset timers (the vCPU programs timerfds), virtio-blk with a cold cache (I/O pool),
NVMe, IDE, fw_cfg. Net, the console and the vhost-user front end are checked by the
kvm tests, which run with the default (enforce).
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from pyvmm import sandbox  # noqa: E402

G = ROOT / "guests" / "out"
KHZ = "tsc_khz=2000000"


def workloads(tmp: Path) -> list[list[str]]:
    img = tmp / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 << 20)
    fw = tmp / "fw.txt"
    fw.write_text("hello from the host\n")
    runs = []
    for chip in ("split", "kernel"):
        runs += [
            ["--kernel", G / "pit_irq.elf", "--irqchip", chip,
             "--cmdline", f"route=pic hz=1000 ms=200 {KHZ}"],
            ["--kernel", G / "rtc.elf", "--irqchip", chip],
            ["--kernel", G / "blkload.elf", "--no-pci-testdev", "--irqchip", chip,
             "--disk", f"path={img}", "--cmdline", f"mode=0 qd=32 n=2000 {KHZ}"],
        ]
    runs += [
        ["--kernel", G / "virtio_blk.elf", "--disk", f"path={img}"],
        ["--kernel", G / "virtio_blk.elf", "--disk", f"path={img},transport=mmio",
         "--cmdline", "mmio=1"],
        ["--kernel", G / "nvme.elf", "--device", f"nvme,path={img}"],
        ["--kernel", G / "ide.elf", "--disk", f"path={img},if=ide", "--cmdline", "route=2"],
        ["--kernel", G / "virtio_rng.elf", "--rng"],
        ["--kernel", G / "fw_cfg.elf", "--fw-cfg", f"file=opt/pyvmm/test=@{fw}"],
        ["--kernel", G / "irq_latency.elf", "--irqchip", "split"],
        ["--kernel", G / "pci_testdev.elf"],
    ]
    return [[str(a) for a in r] for r in runs]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", help="keep the strace files in this folder")
    args = ap.parse_args()
    if shutil.which("strace") is None:
        print("seccomp_derive: strace is not installed", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="pyvmm-seccomp-"))
    out = Path(args.keep) if args.keep else tmp / "trace"
    out.mkdir(parents=True, exist_ok=True)
    seen: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    call = re.compile(r"^(?:\d+ +)?([a-z_0-9]+)\(")
    for i, run in enumerate(workloads(tmp)):
        prefix = out / f"w{i}"
        cmd = ["strace", "-f", "-ff", "-qq", "-o", str(prefix), sys.executable, "-m",
               "pyvmm", "run", "-q", "--seccomp", "log", "--timeout", "60", *run]
        r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                           env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
        print(f"{' '.join(run[:2])} {' '.join(run[2:])[:60]}: exit {r.returncode}")
        for f in out.glob(f"w{i}.*"):
            text = f.read_text(errors="replace").splitlines()
            kind = None
            counting: set[str] = set()
            for line in text:
                m = re.search(r'prctl\(PR_SET_NAME, "([^"]+)"', line)
                if m:
                    name = m.group(1)
                    kind = ("vcpu" if name.startswith("vcpu") else
                            "io-pool" if name.startswith("blk-io") else name)
                    continue
                # From the seccomp() call on, the list is in force: count from there
                # (before it, the thread imports the binding, which may run ldconfig).
                m = call.match(line)
                if kind and m and m.group(1) == "seccomp":
                    counting.add(kind)
                elif kind in counting and m:
                    seen[kind][m.group(1)] += 1
    bad = 0
    for kind, calls in sorted(seen.items()):
        listed = set(sandbox.KINDS.get(kind, ()))
        if kind in sandbox.UNIX_SOCKETS_ONLY:
            listed.add("socket")
        missing = sorted(set(calls) - listed - {"prctl"})
        unused = sorted(listed - set(calls))
        print(f"\n[{kind}] {len(calls)} distinct calls seen")
        print("  seen:    " + " ".join(f"{c}({n})" for c, n in calls.most_common()))
        print("  MISSING: " + (" ".join(missing) or "-"))
        print("  listed, not seen: " + (" ".join(unused) or "-"))
        bad += bool(missing) and kind in sandbox.KINDS
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
