"""Interrupt delivery, kernel irqchip vs pyvmm's split irqchip, one run.

1. Latency from a device register write to the guest's CPL3 handler, timed by the
   guest TSC (guests/src/irq_latency.c): MSI from the PCI test device, its INTx through
   the IOAPIC, and the UART's IRQ 4 through the 8259. The register write itself is a
   userspace exit in both modes; what differs is who models the PIC/IOAPIC. MSI is
   measured both ways a message can leave: an eventfd write to the vector's irqfd, and
   a KVM_SIGNAL_MSI ioctl (--msi signal).
2. Userspace exits per PIT tick at 1 kHz: (exits of a 1 s run - exits of a 0 s run) /
   (ticks difference), through the PIC and through the IOAPIC.

    python bench/irq.py [--n 2000] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUESTS = ROOT / "guests" / "out"
sys.path.insert(0, str(ROOT / "bench"))
from exit_roundtrip import tsc_hz  # noqa: E402


def pyvmm(guest: str, chip: str, cmdline: str, msi: str = "irqfd",
          ok: tuple[int, ...] = (0,)) -> tuple[str, dict]:  # type: ignore[type-arg]
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "x.json"
        p = subprocess.run([sys.executable, "-m", "pyvmm", "run", "-q", "--irqchip", chip,
                            "--msi", msi,
                            "--timeout", "120", "--kernel", str(GUESTS / f"{guest}.elf"),
                            "--cmdline", cmdline, "--exits-json", str(js)],
                           capture_output=True, text=True, timeout=300)
        if p.returncode not in ok:
            raise RuntimeError(f"{guest} {chip} {cmdline}: rc={p.returncode} {p.stdout[-300:]}")
        return p.stdout, json.loads(js.read_text())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--json")
    a = ap.parse_args()
    subprocess.run(["make", "-s", "-C", str(ROOT / "guests")], check=True)
    hz = tsc_hz()
    khz = int(hz / 1000)
    res: dict[str, dict[str, float]] = {}
    print(f"interrupt latency, device register write -> CPL3 handler, n={a.n}, "
          f"TSC {hz / 1e9:.3f} GHz (us)")
    print(f"{'route':34} {'chip':7} {'p50':>8} {'p90':>8} {'p99':>8}")
    routes = {(1, "irqfd"): "MSI (PCI test device), irqfd",
              (1, "signal"): "MSI (PCI test device), SIGNAL_MSI",
              (2, "irqfd"): "INTx via IOAPIC (edge)", (3, "irqfd"): "UART IRQ4 via 8259"}
    for (mode, msi), label in routes.items():
        for chip in ("kernel", "split"):
            out, _ = pyvmm("irq_latency", chip, f"mode={mode} n={a.n}", msi)
            m = re.search(r"p50=(\d+) p90=(\d+) p99=(\d+)", out)
            assert m
            p50, p90, p99 = (int(x) / hz * 1e6 for x in m.groups())
            res[f"latency:{mode}:{msi}:{chip}"] = {"p50_us": p50, "p90_us": p90, "p99_us": p99}
            print(f"{label:34} {chip:7} {p50:8.1f} {p90:8.1f} {p99:8.1f}")
    print()
    print(f"{'PIT 1 kHz, exits per tick':34} {'chip':7} {'exits/tick':>10}")
    for route, label in ((1, "through the 8259"), (2, "through the IOAPIC")):
        for chip in ("kernel", "split"):
            runs = []
            for ms in (0, 1000):
                # rc 7: the guest counted more than 5% of ticks lost (coalesced while
                # the host delayed the timer's thread); still a measurement here.
                out, rep = pyvmm("pit_irq", chip, f"route={route} hz=1000 ms={ms} tsc_khz={khz}",
                                 ok=(0, 7))
                m = re.search(r"ticks=(\d+)", out)
                assert m
                runs.append((int(m.group(1)), sum(rep["exits"].values())))
            (t0, e0), (t1, e1) = runs
            per = (e1 - e0) / max(1, t1 - t0)
            res[f"exits_per_tick:{route}:{chip}"] = {"exits_per_tick": per}
            print(f"{label:34} {chip:7} {per:10.2f}")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
