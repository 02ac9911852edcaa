"""Four pyvmm VMs on one vhost-user-blk backend process, each its own image, under one
shared group limit (``--group-limit iops=N``): how fairly the group's rate is split.

Per round, all VMs run guests/src/blkload.c (4k random reads, QD32) at once; the backend
reports (``--stats-json``) the requests each VM got while all were busy, their Jain
index, and the total rate against the group's limit. Also, for contrast, the same four
VMs with no limit (first come, first served: the shares are whatever the scheduler
makes them). Reported: min/median/max over rounds.

    python bench/shared_backend.py [--rounds 3] [--vms 4] [--iops 400] [--requests 500]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GUEST = ROOT / "guests" / "out" / "blkload.elf"
sys.path.insert(0, str(ROOT / "bench"))
from exit_roundtrip import tsc_hz  # noqa: E402


def one_round(d: Path, vms: int, iops: int | None, n: int, khz: int) -> dict[str, object]:
    socks = [d / f"vm{i}.sock" for i in range(vms)]
    for i in range(vms):
        with open(d / f"vm{i}.img", "wb") as f:
            f.truncate(64 << 20)
    stats = d / "stats.json"
    stats.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "pyvmm", "backend", "vhost-user-blk", "--stats-json",
           str(stats)]
    if iops is not None:
        cmd += ["--group-limit", f"iops={iops},iops_burst=8"]
    else:
        # No limit: a bucket far above what the guests reach, so the same per-request
        # accounting runs (shares and Jain are computed the same way).
        cmd += ["--group-limit", "iops=100000000"]
    for i, s in enumerate(socks):
        cmd += ["--socket", str(s), "--disk", str(d / f"vm{i}.img")]
    backend = subprocess.Popen(cmd, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not all(s.exists() for s in socks) and time.monotonic() < deadline:
            time.sleep(0.02)
        procs = [subprocess.Popen(
            [sys.executable, "-m", "pyvmm", "run", "-q", "--timeout", "600",
             "--no-pci-testdev", "--kernel", str(GUEST), "--disk",
             f"if=vhost-user,socket={s}", "--cmdline",
             f"mode=0 qd=32 n={n} tsc_khz={khz}"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True) for s in socks]
        for p in procs:
            out, err = p.communicate(timeout=900)
            if p.returncode != 0:
                raise SystemExit(f"a VM failed: {out}{err}")
    finally:
        backend.send_signal(signal.SIGTERM)
        backend.wait(timeout=60)
    st = json.loads(stats.read_text())
    total = sum(r["requests"] for r in st["sockets"])
    shares = st["common_window_shares"]
    mean = sum(shares) / len(shares) if shares else 0
    return {"jain": st["jain"], "shares": shares,
            "max_dev": max(abs(x - mean) / mean for x in shares) if mean else 0.0,
            "rate": total / st["span_seconds"] if st["span_seconds"] else 0.0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--vms", type=int, default=4)
    ap.add_argument("--iops", type=int, default=400, help="the group's limit")
    ap.add_argument("--requests", type=int, default=500, help="per VM")
    a = ap.parse_args()
    khz = tsc_hz() // 1000
    rows: dict[str, list[dict[str, object]]] = {"group limit": [], "no limit": []}
    with tempfile.TemporaryDirectory(prefix="pyvmm-share-") as t:
        for r in range(a.rounds):
            rows["group limit"].append(one_round(Path(t), a.vms, a.iops, a.requests, khz))
            rows["no limit"].append(one_round(Path(t), a.vms, None, a.requests * 8, khz))
            print(f"round {r + 1}: {rows['group limit'][-1]} | {rows['no limit'][-1]}",
                  file=sys.stderr)

    def mmm(xs: list[float], fmt: str) -> str:
        return " / ".join(format(x, fmt) for x in (min(xs), statistics.median(xs), max(xs)))

    print(f"{a.vms} VMs on one vhost-user-blk backend, {a.rounds} rounds, min / median / max")
    print("| configuration | Jain index | largest share deviation from the mean | "
          "total requests/s |")
    print("|---|---|---|---|")
    for name, rs in rows.items():
        label = f"{name} (iops={a.iops})" if name == "group limit" else name
        print(f"| {label} | {mmm([float(r['jain']) for r in rs], '.4f')} | "  # type: ignore[arg-type]
              f"{mmm([100 * float(r['max_dev']) for r in rs], '.1f')} % | "  # type: ignore[arg-type]
              f"{mmm([float(r['rate']) for r in rs], '.0f')} |")  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
