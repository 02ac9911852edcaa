"""What the control API costs the guest: µs per PIO exit (pio-loop, the guest's own TSC)
with no API, with an idle API, with slow clients (an event stream that is never read
and a connection that sent half a request), and with a busy client (GET vm.counters
back to back, as fast as the server answers). Runs are interleaved round by round.

    python bench/api_load.py [--iters N] [--rounds R] [--json PATH]

The slow clients should cost nothing (their handlers wait on the API's own loop); the
busy client shares the GIL with the vCPU thread, so it costs what its Python costs.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from exit_roundtrip import GUESTS, TSC_RE, tsc_hz  # noqa: E402

MODES = ("no-api", "idle", "slow-clients", "busy-client")


def _connect(path: str, deadline: float) -> socket.socket | None:
    while time.monotonic() < deadline:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return s
        except OSError:
            s.close()
            time.sleep(0.002)
    return None


def _busy(path: str, stop: threading.Event, count: list[int]) -> None:
    req = b"GET /api/v1/vm.counters HTTP/1.1\r\nHost: x\r\n\r\n"
    s = _connect(path, time.monotonic() + 30)
    while s is not None and not stop.is_set():
        try:
            s.sendall(req)
            buf = b""
            while b"\r\n\r\n" not in buf:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            while len(body) < n:
                chunk = s.recv(65536)
                if not chunk:
                    raise OSError
                body += chunk
            count[0] += 1
        except (OSError, IndexError, ValueError):
            s.close()
            s = None if stop.is_set() else _connect(path, time.monotonic() + 1)
    if s is not None:
        s.close()


def _slow(path: str, held: list[socket.socket]) -> None:
    s = _connect(path, time.monotonic() + 30)
    if s is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"GET /api/v1/events HTTP/1.1\r\nHost: x\r\n\r\n")  # never read
        held.append(s)
    s2 = _connect(path, time.monotonic() + 30)
    if s2 is not None:
        s2.sendall(b"GET /api/v1/vm HTTP/1.1\r\nHo")  # half a request, never finished
        held.append(s2)


def run(mode: str, iters: int, d: Path) -> tuple[int, int]:
    sock = str(d / f"api-{mode}.sock")
    cmd = [sys.executable, "-m", "pyvmm", "run", "--kernel", str(GUESTS / "pio_loop.elf"),
           "--cmdline", f"iters={iters}", "--serial", "stdio", "-q", "--timeout", "600"]
    if mode != "no-api":
        cmd += ["--api-socket", sock]
    stop = threading.Event()
    count = [0]
    held: list[socket.socket] = []
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": str(HERE.parent / "src")})
    t = None
    if mode == "busy-client":
        t = threading.Thread(target=_busy, args=(sock, stop, count), daemon=True)
        t.start()
    elif mode == "slow-clients":
        _slow(sock, held)
    out, _ = p.communicate(timeout=600)
    stop.set()
    if t is not None:
        t.join(10)
    for s in held:
        s.close()
    m = TSC_RE.search(out)
    if p.returncode != 0 or m is None:
        raise SystemExit(f"{mode}: pio-loop failed (exit {p.returncode}): {out[-200:]!r}")
    return int(m.group(1)), count[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    a = ap.parse_args()
    hz = tsc_hz()
    us: dict[str, list[float]] = {m: [] for m in MODES}
    reqs: list[int] = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(a.rounds):
            for mode in MODES:
                tsc, n = run(mode, a.iters, Path(d))
                us[mode].append(tsc / hz * 1e6)
                if mode == "busy-client":
                    reqs.append(n)
    print(f"{a.rounds} interleaved rounds of {a.iters} PIO exits; µs per exit, "
          "min / median / max")
    for mode in MODES:
        xs = us[mode]
        print(f"  {mode:13} {min(xs):7.2f} {statistics.median(xs):7.2f} {max(xs):7.2f}")
    print(f"  busy client: {statistics.median(reqs)} GET vm.counters answered per run "
          "(median)")
    if a.json:
        Path(a.json).write_text(json.dumps({"us_per_exit": us, "busy_requests": reqs,
                                            "iters": a.iters, "tsc_hz": hz}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
