"""VM start: process start to the guest's first serial byte, pyvmm vs QEMU, one run.

The same hello guest (ELF with a PVH note) under pyvmm, under QEMU q35 (SeaBIOS,
then its PVH option ROM) and under QEMU microvm (qboot), both QEMUs with
``-accel kvm -cpu host,arch-capabilities=off``. The first byte the guest writes to
COM1 is the first guest exit either VMM can observe from outside, so both are timed
the same way: from spawning the process to reading that byte on its stdout. Runs
are interleaved.

    python bench/vm_start.py [--rounds R] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import select
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HELLO = ROOT / "guests" / "out" / "hello.elf"


def commands() -> dict[str, list[str]]:
    cmds = {"pyvmm": [sys.executable, "-m", "pyvmm", "run", "-q", "--kernel", str(HELLO)]}
    qemu = shutil.which("qemu-system-x86_64")
    if qemu:
        base = [qemu, "-accel", "kvm", "-cpu", "host,arch-capabilities=off", "-m", "64",
                "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none",
                "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                "-kernel", str(HELLO)]
        cmds["qemu-q35"] = [*base, "-M", "q35"]
        cmds["qemu-microvm"] = [*base, "-M", "microvm"]
    return cmds


def time_first_byte(cmd: list[str], marker: bytes = b"Hello") -> tuple[float, float]:
    """(seconds to the guest's first greeting byte, seconds to process exit)."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    buf, first = b"", None
    try:
        while first is None and time.monotonic() - t0 < 120:
            r, _, _ = select.select([p.stdout], [], [], 1)
            if r:
                chunk = os.read(p.stdout.fileno(), 4096)
                if not chunk:
                    break
                buf += chunk
                if marker in buf:
                    first = time.monotonic() - t0
        p.wait(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    if first is None:
        raise RuntimeError(f"no greeting from {cmd[0]}: {buf[-200:]!r}")
    return first, time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    cmds = commands()
    res: dict[str, dict[str, list[float]]] = {k: {"first": [], "total": []} for k in cmds}
    for _ in range(a.rounds):
        for name, cmd in cmds.items():
            first, total = time_first_byte(cmd)
            res[name]["first"].append(first)
            res[name]["total"].append(total)
    print(f"VM start, {a.rounds} interleaved rounds, medians (ms)")
    print(f"{'vmm':14} {'to first byte':>14} {'to exit':>9} {'vs pyvmm':>9}")
    ref = statistics.median(res["pyvmm"]["first"])
    for name, r in res.items():
        f, t = statistics.median(r["first"]), statistics.median(r["total"])
        print(f"{name:14} {f * 1e3:14.1f} {t * 1e3:9.1f} {f / ref:8.2f}x")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
