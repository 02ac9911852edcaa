"""One device class, several emulation modes — now ``pyvmm compare --class disk
--with-qemu`` (src/pyvmm/compare, docs/comparison.md); this script keeps its old options
and passes them on.

    python bench/modes.py [--n 3000] [--n-pio 60] [--rounds 3] [--modes ide-pio,nvme]
                          [--plot docs/img/modes.png]

--modes picks the disk rows by their old names (ide-pio, ide-dma, nvme, virtio-blk);
QEMU's rows come along when qemu-system-x86_64 is installed.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

# The NVMe guest's result line (bench/vfio_user_nvme.py reads it with this).
NVME = re.compile(r"nvme-bench reads=(\d+) p50_cycles=(\d+) p99_cycles=(\d+)")
MODES = {"ide-pio": "ide-pio", "ide-dma": "ide-dma", "nvme": "nvme",
         "virtio-blk": "virtio-blk-pci"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=3000, help="requests per run (at most 4096)")
    ap.add_argument("--n-pio", type=int, default=60, help="requests per IDE PIO run")
    ap.add_argument("--modes", default=",".join(MODES), help="which of " + ", ".join(MODES))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--plot", help="write the plot here (.png or .svg)")
    a = ap.parse_args()
    unknown = [m for m in a.modes.split(",") if m not in MODES]
    if unknown:
        ap.error(f"--modes: unknown {', '.join(unknown)}")
    qemu = shutil.which("qemu-system-x86_64") is not None
    rows = [MODES[m] for m in a.modes.split(",")]
    rows += [f"qemu-{r}" for r in rows] if qemu else []
    cmd = [sys.executable, "-m", "pyvmm", "compare", "--class", "disk", "--only",
           ",".join(rows), "--ops", str(a.n), "--ops-pio", str(a.n_pio), "--rounds",
           str(a.rounds)] + (["--with-qemu"] if qemu else []) + \
        (["--plot", a.plot] if a.plot else [])
    return subprocess.run(cmd, check=False).returncode


if __name__ == "__main__":
    sys.exit(main())
