"""One NIC, two emulation modes: the same ping-pong (a 64-byte frame out through a TAP,
a host echo sends it back) from the e1000 tiny guest on an emulated 82540EM (full
emulation) and from the virtio-net tiny guest (paravirtual), under pyvmm and under QEMU
(-device e1000 / virtio-net-pci, -accel kvm), one run. Per round trip: latency (guest
TSC, p50/p99), and for pyvmm the userspace exits and VMM CPU (differences between a run
of N round trips and one of a few, so boot and set-up fall out). Needs root (it creates
the TAP).

    python bench/nic.py [--n 2000] [--rounds 3] [--models e1000,virtio-net]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
from blk import timed  # noqa: E402  (run, and the child's CPU seconds)
from exit_roundtrip import tsc_hz  # noqa: E402

OUT = ROOT / "guests" / "out"
FEW = 20
MAC = "52:54:00:aa:bb:01"
ECHO = bytes.fromhex("020000000001")
LINE = re.compile(r"(?:e1000|virtio-net)-bench rtts=(\d+) p50_cycles=(\d+) p99_cycles=(\d+)")
MODELS = ("e1000", "virtio-net")
GUEST = {"e1000": "e1000.elf", "virtio-net": "virtio_net.elf"}
PYVMM_NET = {"e1000": ",model=e1000", "virtio-net": ""}
QEMU_DEV = {"e1000": "e1000", "virtio-net": "virtio-net-pci,disable-legacy=on"}


@contextmanager
def echo_tap() -> Iterator[str]:
    """A TAP with a thread that sends the guest's pings back (dst and src swapped)."""
    name = f"pvbench{os.getpid() % 10000}"
    subprocess.run(["ip", "tuntap", "add", "dev", name, "mode", "tap"], check=True)
    subprocess.run(["sysctl", "-qw", f"net.ipv6.conf.{name}.disable_ipv6=1"], check=False,
                   capture_output=True)
    subprocess.run(["ip", "link", "set", name, "up"], check=True)
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
    sock.bind((name, 0))
    sock.settimeout(0.5)
    stop = threading.Event()
    guest = bytes.fromhex(MAC.replace(":", ""))

    def loop() -> None:
        while not stop.is_set():
            try:
                f = sock.recv(2048)
            except TimeoutError:
                continue
            if f[:6] == ECHO and f[6:12] == guest:
                sock.send(guest + ECHO + f[12:])

    t = threading.Thread(target=loop, daemon=True)
    t.start()
    try:
        yield name
    finally:
        stop.set()
        t.join()
        sock.close()
        subprocess.run(["ip", "link", "del", name], check=False)


def pyvmm(model: str, tap: str, n: int) -> tuple[str, float, int]:
    with tempfile.TemporaryDirectory() as d:
        js = Path(d) / "x.json"
        out, cpu = timed([sys.executable, "-m", "pyvmm", "run", "-q", "--timeout", "300",
                          "--no-pci-testdev", "--kernel", str(OUT / GUEST[model]), "--net",
                          f"tap={tap}{PYVMM_NET[model]},mac={MAC}", "--cmdline", f"bench={n}",
                          "--exits-json", str(js)])
        exits = sum(json.loads(js.read_text())["exits"].values())
    return out, cpu, exits


def qemu(model: str, tap: str, n: int) -> tuple[str, float, int]:
    out, cpu = timed([shutil.which("qemu-system-x86_64") or "qemu-system-x86_64", "-accel",
                      "kvm", "-cpu", "host,arch-capabilities=off", "-M", "q35", "-m", "64",
                      "-nodefaults", "-nographic", "-serial", "stdio", "-monitor", "none",
                      "-no-reboot", "-device", "isa-debug-exit,iobase=0xf4,iosize=4",
                      "-kernel", str(OUT / GUEST[model]), "-append", f"bench={n} qemu=1",
                      "-netdev", f"tap,id=n0,ifname={tap},script=no,downscript=no",
                      "-device", f"{QEMU_DEV[model]},netdev=n0,mac={MAC},romfile="])
    return out, cpu, 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2000, help="round trips per run (at most 4096)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default=",".join(MODELS), help="which of " + ", ".join(MODELS))
    a = ap.parse_args()
    hz = tsc_hz()
    vmms: list[tuple[str, Callable[[str, str, int], tuple[str, float, int]]]] = [
        ("pyvmm", pyvmm)]
    if shutil.which("qemu-system-x86_64"):
        vmms.append(("QEMU", qemu))
    rows: dict[tuple[str, str], list[tuple[float, float, float, float]]] = {}
    with echo_tap() as tap:
        for r in range(a.rounds):
            for name, run in (vmms if r % 2 == 0 else vmms[::-1]):
                for model in a.models.split(","):
                    try:
                        out, cpu, exits = run(model, tap, a.n)
                        _, cpu0, exits0 = run(model, tap, FEW)
                    except RuntimeError as e:
                        print(f"{name} {model}: {e}", file=sys.stderr)
                        continue
                    m = LINE.search(out)
                    assert m, out[-400:]
                    per = a.n - FEW
                    rows.setdefault((name, model), []).append(
                        (int(m.group(2)) / hz * 1e6, int(m.group(3)) / hz * 1e6,
                         (exits - exits0) / per, (cpu - cpu0) / per * 1e6))
    print(f"ping-pong through a TAP (64-byte frames, host echo), {a.n} round trips, "
          f"{a.rounds} interleaved rounds, median over the rounds")
    print("| VMM | mode | device | p50 µs | p99 µs | exits/round trip | VMM CPU µs/round trip |")
    print("|---|---|---|---|---|---|---|")
    med = {k: [statistics.median(x[i] for x in v) for i in range(4)] for k, v in rows.items()}
    for (name, model), (p50, p99, ex, cpu) in sorted(med.items()):
        kind = "paravirtual" if model == "virtio-net" else "full emulation"
        exs, cpus = (f"{ex:.1f}", f"{cpu:.0f}") if name == "pyvmm" else ("n/a", "n/a")
        print(f"| {name} | {kind} | {model} | {p50:.1f} | {p99:.1f} | {exs} | {cpus} |")
    for model in MODELS:
        if ("pyvmm", model) in med and ("QEMU", model) in med:
            print(f"pyvmm/QEMU latency, {model}: "
                  f"{med[('pyvmm', model)][0] / med[('QEMU', model)][0]:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
