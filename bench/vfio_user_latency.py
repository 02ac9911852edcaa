"""vfio-user: per-message latency of a trapped BAR read, against the IPC floor.

A client in this process sends REGION_READ (BAR 0, offset 0: the PCI test device's ID
register) to ``pyvmm backend vfio-user --device pci-testdev`` in another process and
waits for the reply, n times. The floor is the same-size request/reply over a Unix
socket to a Python echo process. Both are timed with perf_counter_ns; runs interleave.

    python bench/vfio_user_latency.py [--n 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
from pyvmm.vfio_user import protocol as P  # noqa: E402

ECHO = """
import socket, sys
s = socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(1)
c, _ = s.accept()
while True:
    d = c.recv(64)
    if not d:
        break
    c.sendall(d + b"\\0" * 8)
"""


def wait_for(path: Path) -> None:
    deadline = time.monotonic() + 30
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)


def measure(sock: socket.socket, req: bytes, reply_len: int, n: int) -> list[int]:
    lat = []
    for _ in range(n):
        t0 = time.perf_counter_ns()
        sock.sendall(req)
        got = 0
        while got < reply_len:
            got += len(sock.recv(reply_len - got))
        lat.append(time.perf_counter_ns() - t0)
    return lat


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    res: dict[str, list[int]] = {"vfio-user REGION_READ BAR0": [], "unix socket echo": []}
    with tempfile.TemporaryDirectory() as d:
        for r in range(a.rounds):
            vsock = Path(d) / f"v{r}.sock"
            srv = subprocess.Popen([sys.executable, "-m", "pyvmm", "backend", "vfio-user",
                                    "--device", "pci-testdev", "--socket", str(vsock)],
                                   stderr=subprocess.DEVNULL)
            esock = Path(d) / f"e{r}.sock"
            echo = subprocess.Popen([sys.executable, "-c", ECHO, str(esock)])
            try:
                wait_for(vsock)
                wait_for(esock)
                c = socket.socket(socket.AF_UNIX)
                c.connect(str(vsock))
                req = P.encode(1, P.Command.REGION_READ, P.REGION_ACCESS.pack(0, 0, 4))
                reply_len = P.HEADER.size + P.REGION_ACCESS.size + 4
                res["vfio-user REGION_READ BAR0"] += measure(c, req, reply_len, a.n)
                e = socket.socket(socket.AF_UNIX)
                e.connect(str(esock))
                res["unix socket echo"] += measure(e, req, len(req) + 8, a.n)
                c.close()
                e.close()
            finally:
                srv.terminate()
                echo.terminate()
                srv.wait()
                echo.wait()
    print(f"request/reply latency, {a.rounds} rounds x {a.n} messages (us)")
    print(f"{'path':30} {'p50':>7} {'p90':>7} {'p99':>7}")
    for name, lat in res.items():
        q = statistics.quantiles(lat, n=100)
        print(f"{name:30} {q[49] / 1e3:7.1f} {q[89] / 1e3:7.1f} {q[98] / 1e3:7.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
